"""benchmarks/images.py: the data folder from the sources (the split, the Fashion-MNIST order), the
IDX files read back by the scripts' loader, and the table from hand-written records."""
import json
import os
import sys

import numpy as np
from conftest import ROOT

import common

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import images  # noqa: E402


def test_data_folder_splits_mnist_and_orders_fashion_mnist(tmp_path, capsys):
    from PIL import Image

    mnist = tmp_path / "mnist"
    digits = (np.arange(10_000)[:, None, None] % 251 + np.zeros((1, 28, 28))).astype(np.uint8)
    images.write_idx(str(mnist / "t10k-images-idx3-ubyte.gz"), digits)
    images.write_idx(str(mnist / "t10k-labels-idx1-ubyte.gz"),
                     (np.arange(10_000) % 10).astype(np.uint8))
    sources = tmp_path / "sources"
    labels = np.array([3, 1, 3, 0, 1, 2, 2, 0, 9, 9], dtype=np.uint8)
    images.write_idx(str(sources / "fashion-t10k-labels-idx1-ubyte.gz"), labels)
    for c in range(10):
        os.makedirs(sources / "fashion_mnist_images" / "test" / str(c))
        for k in range(2):  # image k of class c is filled with 10 c + k
            Image.fromarray(np.full((28, 28), 10 * c + k, np.uint8)).save(
                sources / "fashion_mnist_images" / "test" / str(c) / f"{k:04d}.png")
    out = tmp_path / "data"
    images.main(["data", "--mnist", str(mnist), "--sources", str(sources), "--out", str(out)])
    printed = capsys.readouterr().out
    train = common.load_images("mnist", str(out), train=True)
    test = common.load_images("mnist", str(out), train=False)
    assert train.shape == (9000, 1, 28, 28) and test.shape == (1000, 1, 28, 28)
    assert np.array_equal(train[:, 0].numpy(), digits[:9000])
    assert np.array_equal(test[:, 0].numpy(), digits[9000:])
    assert common.load_labels("mnist", str(out), train=False).tolist()[:3] == [0, 1, 2]
    fashion = common.load_images("fashionmnist", str(out), train=False)[:, 0, 0, 0].tolist()
    # the k-th label c of the label file takes the k-th image of class c
    assert fashion == [30, 10, 31, 0, 11, 20, 21, 1, 90, 91]
    md5 = images.md5(str(out / "MNIST" / "raw" / "train-images-idx3-ubyte.gz"))
    assert f"{md5} MNIST/raw/train-images-idx3-ubyte.gz" in printed
    # the same bytes every time (gzip without a time stamp)
    images.main(["data", "--mnist", str(mnist), "--sources", str(sources), "--out", str(out)])
    assert images.md5(str(out / "MNIST" / "raw" / "train-images-idx3-ubyte.gz")) == md5


def test_table_from_records(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(images, "RECORDS", str(tmp_path))
    records = {
        "daebm": {"run": "daebm", "train_segments": [{"wall_s": 3600}, {"wall_s": 1800}],
                  "it_per_s_median": 0.3, "fid_curve": [{"step": 500, "fid": 120.4}],
                  "eval": {"score": {"result": {"fid": 55.55, "ood": {
                      "fashionmnist": {"auroc": 0.9}}, "ood_mean": 0.7}},
                      "long_run": {"result": {"long_run": {"n_samples": 100, "records": [
                          {"fid": 60.0}, {"fid": 61.0}, {"fid": 70.25}]}}}}},
        "dcd-denoise-langevin": {"run": "dcd-denoise-langevin", "train_segments": [
            {"wall_s": 360}], "eval": {}, "denoise_curve": [
            {"step": 1500, "psnr_mean": 18.331, "psnr_noisy": 19.18}]},
        "dcd": {"run": "dcd", "train_segments": [{"wall_s": 720}], "eval": {},
                "fid_curve": [{"step": 500, "fid": 380.7}]},
        "dcd-chain-y": {"run": "dcd-chain-y", "train_segments": [{"wall_s": 360}], "eval": {},
                        "fid_curve": [{"step": 500, "fid": 250.2}, {"step": 1000, "fid": 200.0}]},
        "dsm-denoise": {"run": "dsm-denoise", "train_segments": [], "eval": {"denoise": {
            "result": {"psnr_tweedie": 25.5, "psnr_noisy": 19.18, "train_wall_s": 360}}}},
    }
    for name, record in records.items():
        with open(tmp_path / f"{name}.json", "w") as f:
            json.dump(record, f)
    images.main(["table"])
    printed = capsys.readouterr().out
    assert "long-run FID x1 / x10 / x100 (100 samples)" in printed.splitlines()[0]
    rows = {line.split(" | ")[0][2:]: line.split(" | ")[1:]
            for line in printed.splitlines()[2:] if line.startswith("| ")}
    assert rows["daebm"] == ["55.5", "500: 120", "0.900 / 0.700", "60.0 / 61.0 / 70.2", "-",
                             "1.50 h", "0.30 |"]
    assert rows["dcd-denoise-langevin"][4:6] == ["18.33 / 19.18", "0.10 h"]
    assert rows["dsm-denoise"][4:6] == ["25.50 / 19.18", "0.10 h"]
    # a stage of the run's protocol not run yet: "not measured"; one outside its protocol: "-"
    assert rows["dcd"][:4] == ["not measured", "500: 381", "not measured", "-"]
    assert rows["dcd-chain-y"][:4] == ["-", "500: 250, 1000: 200", "-", "-"]
    assert "cdrl" not in rows


def test_claims_below_the_table():
    """The papers' own claims without a column: CDRL's guidance sweep and inpainting against the
    known-mean fill, DA-EBM's chains at t = 0; a stage not run says so."""
    cdrl = {"run": "cdrl", "eval": {
        "guidance": {"result": {"fid_samples": 2000, "guidance_sweep": [
            {"guidance": -1.0, "fid": 80.04}, {"guidance": 1.0, "fid": 60.96}]}},
        "inpaint_center": {"result": {"inpaint": {"mse": 0.2881, "mse_known_mean": 0.2806,
                                                  "n": 1000}}}}}
    lines = images.claims([cdrl])
    assert "- CDRL guidance sweep: FID of 2000 samples each, the same noise: w = -1: 80.0, " \
           "w = 1: 61.0" in lines
    assert "- CDRL inpainting, center: MSE 0.288 against 0.281 for the known-mean fill (1000 " \
           "held-out digits)" in lines
    assert "- CDRL inpainting, right: not measured" in lines
    assert "- DA-EBM persistent chains at t = 0 (final checkpoint): not measured" in lines
    assert "- DA-EBM long-run check of the script (MALA at t = 0 from real digits), mean " \
           "energy / RMS drift per pixel after each number of steps: not measured" in lines


def test_the_scripts_long_run_check_from_its_metrics(tmp_path):
    """DA-EBM's own long-run check (MALA from real digits at the end of training) is read from the
    run's metrics.jsonl, the training records beside it left out, and shown below the table."""
    with open(tmp_path / "metrics.jsonl", "w") as f:
        for record in ({"step": 2000, "loss": 0.5},
                       {"step": 2000, "long_run_mala_steps": 10, "long_run_mean_energy": -940.4,
                        "long_run_rms_drift": 0.0294},
                       {"step": 2000, "long_run_mala_steps": 1000, "long_run_mean_energy": -778.3,
                        "long_run_rms_drift": 0.2961}):
            f.write(json.dumps(record) + "\n")
    with open(tmp_path / "args.json", "w") as f:
        json.dump({"n_grid": 64}, f)
    result = images.mala_from_data(str(tmp_path))
    assert result == {"n_digits": 64, "records": [
        {"mala_steps": 10, "mean_energy": -940.4, "rms_drift": 0.0294},
        {"mala_steps": 1000, "mean_energy": -778.3, "rms_drift": 0.2961}]}
    lines = images.claims([{"run": "daebm", "eval": {"mala_from_data": {"result": result}}}])
    assert lines[-2].endswith("64 training digits, 10: -940 / 0.029, 1000: -778 / 0.296")


def test_two_drivers_of_one_run_keep_both_stages(tmp_path, monkeypatch):
    """Two lanes may run two stages of one run at once: each driver saves the record it loaded
    plus its own stage, and the later save must not drop the earlier one's result."""
    monkeypatch.setattr(images, "RECORDS", str(tmp_path))
    images.save_record({"run": "r", "train_segments": [], "eval": {}})
    lane_a, lane_b = images.load_record("r"), images.load_record("r")
    lane_b["eval"]["long_run"] = {"result": {"fid": 1.0}}
    images.save_record(lane_b)
    lane_a["eval"]["score"] = {"result": {"fid": 2.0}}
    images.save_record(lane_a)
    assert images.load_record("r")["eval"] == {"long_run": {"result": {"fid": 1.0}},
                                               "score": {"result": {"fid": 2.0}}}


def test_runs_and_data_live_outside_the_checkout():
    """A run cut off by a session's end resumes in the next session, which starts from a fresh
    clone: its checkpoint, the data and the cached Inception statistics must not be inside the
    checkout (they were in runs/ and data/, and every session lost them)."""
    for path in (images.RUNS_DIR, os.path.join(ROOT, images.DATA), os.path.join(ROOT,
                                                                                  images.WEIGHTS)):
        assert os.path.relpath(os.path.abspath(path), ROOT).startswith(os.pardir + os.sep)


def test_cut_and_lost_training_segments():
    """A segment whose driver was killed with the session ends where the next one starts; when
    the checkpoint is gone the earlier segments count as lost, not as the run's training time."""
    record = {"run": "r", "eval": {}, "train_segments": [
        {"from_step": 0, "to_step": 500, "wall_s": 900.0, "returncode": -15},
        {"from_step": 500, "to_step": None, "wall_s": 600.0, "returncode": None}]}
    images.account_for_cut_segments(record, 700)
    assert record["train_segments"][1]["to_step"] == 700
    assert record["train_segments"][1]["returncode"] == "cut off"
    assert images.train_wall(record) == 1500.0
    images.account_for_cut_segments(record, 0)  # the run folder is gone: the run starts again
    assert record["train_segments"] == [] and len(record["lost_segments"]) == 2
    assert images.train_wall(record) == 0


def test_a_run_records_its_training_segment(tmp_path, monkeypatch):
    """The driver end to end on a stand-in training command (it writes one metrics line into the
    run folder given last) and a stand-in evaluator stage: one finished segment, its time, the
    run's speed; --stages runs only the stages named."""
    monkeypatch.setattr(images, "RECORDS", str(tmp_path / "records"))
    monkeypatch.setattr(images, "RUNS_DIR", str(tmp_path / "runs"))
    script = ("import json, os, sys, time; os.makedirs(sys.argv[-1]); open(os.path.join("
              "sys.argv[-1], 'metrics.jsonl'), 'w').write(json.dumps({'step': 1, "
              "'it_per_s': 2.5})); time.sleep(0.3)")
    monkeypatch.setitem(images.RUNS, "stand-in", {"train": ["-c", script],
                                                  "eval": {"probe": "probe_stage"}})
    monkeypatch.setattr(images, "probe_stage", lambda run_dir: {"seen": run_dir}, raising=False)
    os.makedirs(images.RUNS_DIR)
    record = images.run("stand-in", ["probe"])  # --stages probe: not before the training
    assert record["train_segments"] == [] and record["eval"] == {}
    record = images.run("stand-in", ["train"])
    [segment] = record["train_segments"]
    assert segment["returncode"] == 0 and segment["from_step"] == segment["to_step"] == 0
    assert 0 < segment["wall_s"] < 60 and "training_done" in record
    assert record["it_per_s_median"] == 2.5 and record["eval"] == {}
    record = images.run("stand-in")
    assert record["eval"]["probe"]["result"]["seen"].endswith("stand-in")


def test_every_command_of_the_runs_parses():
    """Each run's training flags are settings of its script and each evaluator stage's flags are
    the evaluator's (a typo would otherwise surface after hours of training)."""
    import tyro

    import eval_fid_ood
    from conftest import METHODS, SCRIPTS

    module_of = {script: METHODS[method] for method, script in SCRIPTS.items()}
    for name, spec in images.RUNS.items():
        script, *flags = spec["train"]
        args = tyro.cli(module_of[script].Args, args=[*flags, *images.TRAIN, "--run-dir", "r"])
        assert args.preset == "cpu" and args.dataset == "mnist", name
        for stage, stage_flags in spec["eval"].items():
            if isinstance(stage_flags, str):
                assert callable(getattr(images, stage_flags)), (name, stage)
            else:
                tyro.cli(eval_fid_ood.EvalArgs, args=["--ckpt", "r", *images.EVAL, *stage_flags])
