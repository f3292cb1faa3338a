"""The contract every method script keeps (DESIGN.md: run lifecycle, checkpoints, public API,
failures), one test per behaviour, parametrized over the three methods."""
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
from conftest import (ROOT, METHODS, SCRIPTS, as_argv, assert_same_state, run_command_line,
                      tiny_args, tiny_fields)

import common
import eval_fid_ood

ALL = pytest.mark.parametrize("method", sorted(METHODS))
SHARED_METRICS = {"loss", "energy_pos", "energy_neg", "grad_norm", "lr", "it_per_s"}
# settings that make the first Adam step overflow the energies
DIVERGING = {"daebm": dict(lr=1e30, warmup_steps=0), "cdrl": dict(lr=1e30, warmup_steps=0),
             "dcd": dict(lr=1e30, grad_clip=0.0)}


def cli(method, argv):
    """main() through the real command-line path (tyro, --resume resolution, one-line errors)."""
    module = METHODS[method]
    common.run_cli(lambda: module.main(common.parse_args(module.Args, method, argv)))


def cli_error(method, argv, capsys) -> str:
    """The one stderr line of a refused command (exit code 2)."""
    code, err = run_command_line(method, argv, capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def load(path):
    return torch.load(path, weights_only=True)


def folder_snapshot(run_dir):
    return {name: open(os.path.join(run_dir, name), "rb").read()
            for name in sorted(os.listdir(run_dir))}


# --------------------------------------------------------------------------------------------------
# smoke: training, checkpoint round trip, evaluation through the public API
# --------------------------------------------------------------------------------------------------
@ALL
def test_smoke_2d_checkpoint_round_trip_and_eval(method, tmp_path):
    run = tmp_path / "run"
    args = tiny_args(method, run)
    METHODS[method].main(args)
    for name in ("ckpt.pt", "ckpt_00000010.pt", "metrics.jsonl", "args.json"):
        assert (run / name).exists(), name
    records = [json.loads(line) for line in open(run / "metrics.jsonl")]
    training = [r for r in records if "loss" in r]
    assert [r["step"] for r in training] == [5, 10, 15, 20]
    assert all(SHARED_METRICS <= set(r) and math.isfinite(r["loss"]) for r in training)
    assert json.load(open(run / "args.json")) == common.args_to_dict(args)
    ckpt = load(run / "ckpt.pt")
    assert ckpt["method"] == method and ckpt["step"] == 20
    box = common.data_box(common.draw_2d("8gaussians", 50_000, seed=1))
    assert ckpt["box"] == pytest.approx(box)
    if ckpt["ema"] is not None:
        assert set(ckpt["ema"]) == set(ckpt["model"])
    # the evaluator takes the run folder for its ckpt.pt
    results = eval_fid_ood.evaluate(eval_fid_ood.EvalArgs(ckpt=str(run), device="cpu", n_test=500,
                                                           grid_resolution=100))
    assert results["method"] == method and math.isfinite(results["nll"])
    assert (run / "eval.json").exists()
    module, loaded_args, model = eval_fid_ood.load_method(ckpt, "cpu")
    assert module.sample(model, 5, loaded_args, "cpu").shape == (5, 2)
    assert module.energy(model, torch.zeros(3, 2), loaded_args).shape == (3,)


@ALL
def test_points_file_trains_and_is_scored(method, tmp_path):
    points = common.draw_2d("rings", 3000, seed=5)
    np.save(tmp_path / "rings.npy", points.numpy())
    dataset = f"points:{tmp_path / 'rings.npy'}"
    run = tmp_path / "run"
    METHODS[method].main(tiny_args(method, run, dataset=dataset, steps=4, log_every=2,
                                   save_every=4, sample_every=4))
    ckpt = load(run / "ckpt.pt")
    assert ckpt["box"] == pytest.approx(common.data_box(points))  # the box from the file
    results = eval_fid_ood.evaluate(eval_fid_ood.EvalArgs(ckpt=str(run), device="cpu", n_test=500,
                                                           grid_resolution=100))
    assert math.isfinite(results["nll"]) and "true_nll" not in results
    assert "no test split" in results["test_points"]


@ALL
def test_smoke_tiny_images_and_samples_without_training_data(method, tmp_path, image_folder):
    run = tmp_path / "run"
    METHODS[method].main(tiny_args(method, run, image_folder))
    ckpt = load(run / "ckpt.pt")
    assert ckpt["args"]["image_size"] == 8 and ckpt["box"] is None
    module, loaded_args, model = eval_fid_ood.load_method(ckpt, "cpu")
    out = module.sample(model, 3, loaded_args, "cpu")
    assert out.shape == (3, 3, 8, 8) and out.abs().max() <= 1
    assert module.energy(model, out, loaded_args).shape == (3,)
    for name in os.listdir(image_folder):  # the sample-only path needs no training data
        os.remove(os.path.join(image_folder, name))
    eval_fid_ood.evaluate(eval_fid_ood.EvalArgs(ckpt=str(run), device="cpu", save_samples=5,
                                                batch_size=2))
    samples = np.load(run / "samples.npz")["samples"]
    assert samples.shape == (5, 3, 8, 8) and np.abs(samples).max() <= 1
    assert (run / "samples.png").exists()


# --------------------------------------------------------------------------------------------------
# resume: exact after an interrupt, exact when extending a finished run, settings from the
# checkpoint
# --------------------------------------------------------------------------------------------------
def interrupt_at(monkeypatch, iteration: int):
    """Send this process SIGTERM during the given training iteration (1-based): every script reads
    its batch through common.to_model_space once per iteration."""
    calls = {"n": 0}
    original = common.to_model_space

    def to_model_space(batch):
        calls["n"] += 1
        if calls["n"] == iteration:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(batch)

    monkeypatch.setattr(common, "to_model_space", to_model_space)


@ALL
def test_sigterm_saves_and_resume_is_exact(method, tmp_path, monkeypatch, capsys):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    METHODS[method].main(tiny_args(method, straight))
    with monkeypatch.context() as patch:
        interrupt_at(patch, 7)
        with pytest.raises(SystemExit) as exit_info:
            METHODS[method].main(tiny_args(method, stopped))
    assert exit_info.value.code == 143
    err = capsys.readouterr().err
    assert f"python {SCRIPTS[method]} --resume --run-dir {stopped}" in err
    assert load(stopped / "ckpt.pt")["step"] == 7
    cli(method, ["--resume", "--run-dir", str(stopped)])
    a, b = load(straight / "ckpt.pt"), load(stopped / "ckpt.pt")
    assert a["step"] == b["step"] == 20
    assert_same_state(a, b, [k for k in a if k not in ("args", "box")])
    steps = [json.loads(line)["step"] for line in open(stopped / "metrics.jsonl")
             if '"loss"' in line]
    assert steps == [5, 10, 15, 20]


@ALL
def test_extending_a_finished_run(method, tmp_path):
    straight, extended = tmp_path / "straight", tmp_path / "extended"
    METHODS[method].main(tiny_args(method, straight))
    METHODS[method].main(tiny_args(method, extended, steps=10))
    cli(method, ["--resume", "--run-dir", str(extended), "--steps", "20"])
    a, b = load(straight / "ckpt.pt"), load(extended / "ckpt.pt")
    assert b["step"] == 20 and b["args"]["steps"] == 20
    if method != "daebm":
        assert_same_state(a, b, [k for k in a if k not in ("args", "box")])
        return
    # DA-EBM's decays are fractions of --steps: the extended run follows the new schedule from step
    # 10
    args = METHODS[method].Args(**{k: tuple(v) if isinstance(v, list) else v for k,
                                   v in b["args"].items()})
    lrs = {json.loads(line)["step"]: json.loads(line)["lr"]
           for line in open(extended / "metrics.jsonl")
           if '"loss"' in line}
    assert [lrs[s] for s in (15, 20)] == pytest.approx(
        [args.lr * METHODS[method].lr_factor(s, args) for s in (15, 20)], rel=1e-12)
    assert lrs[15] > lrs[10]  # the 10-step run had decayed fully; the 20-step schedule is behind it


@ALL
def test_pictures_do_not_change_the_trained_weights(method, tmp_path):
    METHODS[method].main(tiny_args(method, tmp_path / "rare", sample_every=1000))
    METHODS[method].main(tiny_args(method, tmp_path / "often", sample_every=7))
    a, b = load(tmp_path / "rare" / "ckpt.pt"), load(tmp_path / "often" / "ckpt.pt")
    assert_same_state(a, b, ["model", "ema", "optimizer", "rng"])


@ALL
def test_resume_alone_takes_every_setting_from_the_checkpoint(method, tmp_path):
    run = tmp_path / "run"
    fields = tiny_fields(method, run, steps=10, seed=7)
    cli(method, as_argv(fields))
    resumed = common.parse_args(METHODS[method].Args, method,
                                ["--resume", "--run-dir", str(run), "--steps", "12", "--log-every",
                                 "3"])
    expected = dict(load(run / "ckpt.pt")["args"], steps=12, log_every=3, resume=True)
    assert common.args_to_dict(resumed) == expected


@ALL
def test_resume_refuses_changed_method_settings_naming_all(method, tmp_path, capsys):
    run = tmp_path / "run"
    cli(method, as_argv(tiny_fields(method, run, steps=10)))
    before = folder_snapshot(run)
    line = cli_error(method,
                     ["--resume", "--run-dir", str(run), "--seed", "9", "--batch-size", "16",
                              "--steps", "20"], capsys)
    assert "seed is 9" in line and "batch_size is 16" in line and "steps" not in line.split(".")[0]
    assert folder_snapshot(run) == before


@ALL
def test_resume_may_switch_the_speed_paths(method, tmp_path):
    # precision, compilation and memory layout change how fast, not what is trained: each may
    # change on --resume
    run = tmp_path / "run"
    cli(method, as_argv(tiny_fields(method, run, steps=10)))
    resumed = common.parse_args(METHODS[method].Args, method,
                                ["--resume", "--run-dir", str(run), "--amp", "bf16", "--compile",
                                 "--channels-last"])
    assert resumed.amp == "bf16" and resumed.compile and resumed.channels_last
    saved = load(run / "ckpt.pt")["args"]
    common.check_resume_args(resumed, saved, METHODS[method].RESUMABLE, str(run))
    resumed.seed += 1
    with pytest.raises(common.UserError, match="seed"):
        common.check_resume_args(resumed, saved, METHODS[method].RESUMABLE, str(run))


@ALL
def test_new_run_refuses_a_folder_with_a_checkpoint(method, tmp_path, capsys):
    run = tmp_path / "run"
    cli(method, as_argv(tiny_fields(method, run, steps=10)))
    before = folder_snapshot(run)
    line = cli_error(method, as_argv(tiny_fields(method, run, steps=5)), capsys)
    assert str(run) in line and "--resume" in line
    assert folder_snapshot(run) == before


@ALL
def test_resume_removes_debris_and_cuts_metrics_back(method, tmp_path):
    run = tmp_path / "run"
    METHODS[method].main(tiny_args(method, run, steps=10, save_every=5, log_every=1))
    # a crash after step 5's save: later records exist, ckpt.pt is step 5, a save left its temp file
    os.replace(run / "ckpt_00000005.pt", run / "ckpt.pt")
    (run / "ckpt.pt.tmp").write_bytes(b"half a checkpoint")
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 11, "loss": 0.')  # a record cut short by the kill
    cli(method, ["--resume", "--run-dir", str(run)])
    steps = [json.loads(line)["step"] for line in open(run / "metrics.jsonl") if '"loss"' in line]
    assert steps == list(range(1, 11))
    assert not [name for name in os.listdir(run) if name.endswith(".tmp")]


@ALL
def test_wall_clock_saves(method, tmp_path, monkeypatch):
    saves = []
    original = common.save_checkpoint
    def counted(state, *args, **kwargs):
        saves.append(state["step"])
        return original(state, *args, **kwargs)

    monkeypatch.setattr(common, "save_checkpoint", counted)
    METHODS[method].main(tiny_args(method, tmp_path / "a", steps=6, save_every=1000,
                                   save_minutes=0.0))
    assert saves == [6]
    saves.clear()
    METHODS[method].main(tiny_args(method, tmp_path / "b", steps=6, save_every=1000,
                                   save_minutes=1e-9))
    assert saves == [1, 2, 3, 4, 5, 6]


def test_training_outside_the_main_thread(tmp_path):
    """Signal handlers can only be set in the main thread: elsewhere training runs without them."""
    errors = []

    def train():
        try:
            METHODS["dcd"].main(tiny_args("dcd", tmp_path, steps=5))
        except BaseException as error:
            errors.append(error)

    worker = threading.Thread(target=train)
    worker.start()
    worker.join()
    assert errors == [] and load(tmp_path / "ckpt.pt")["step"] == 5


# --------------------------------------------------------------------------------------------------
# FID during training (--fid-every): best.pt, the curve in metrics.jsonl, resume
# --------------------------------------------------------------------------------------------------
def fake_fids(monkeypatch, values):
    """--fid-every without Inception: a stand-in network, empty reference statistics, and these
    FIDs in turn; the FID calls' sample counts are recorded."""
    values, calls = list(values), []

    def network(batch):
        return [batch.float().flatten(1)[:, :4]]

    def frechet(stats, reference):
        calls.append(len(stats["mu"]))
        return values.pop(0)
    monkeypatch.setattr(common, "load_inception", lambda path, device: (network, "fake"))
    monkeypatch.setattr(common, "reference_statistics", lambda *args: ({}, "unused"))
    monkeypatch.setattr(common, "feature_statistics", lambda features: {"mu": features.mean(1)})
    monkeypatch.setattr(common, "frechet_distance", frechet)
    return calls


def fid_records(run):
    with open(run / "metrics.jsonl") as f:
        return [r for r in map(json.loads, f) if "fid" in r]


@ALL
def test_best_checkpoint_follows_the_lowest_fid_across_a_resume(method, tmp_path, monkeypatch,
                                                                image_folder):
    calls = fake_fids(monkeypatch, [5.0, 3.0, 4.0, 6.0, 2.5, 2.7])
    run = tmp_path / "run"
    fields = dict(fid_every=1, fid_samples=6, save_every=1)
    METHODS[method].main(tiny_args(method, run, image_folder, steps=3, **fields))
    assert load(run / "best.pt")["step"] == 2 and load(run / "ckpt.pt")["best_fid"] == 3.0
    # the lowest FID so far comes back with the checkpoint: step 4's 6.0 does not replace step 2
    METHODS[method].main(tiny_args(method, run, image_folder, steps=6, resume=True, **fields))
    assert calls == [6] * 6
    records = fid_records(run)
    assert [(r["step"], r["fid"], r["best_fid"]) for r in records] == [
        (1, 5.0, 5.0), (2, 3.0, 3.0), (3, 4.0, 3.0), (4, 6.0, 3.0), (5, 2.5, 2.5), (6, 2.7, 2.5)]
    best = load(run / "best.pt")
    assert best["step"] == 5 and best["best_fid"] == 2.5
    assert_same_state(best, load(run / "ckpt_00000005.pt"), ["model", "ema", "optimizer", "rng"])
    # the curve does not disturb training: the same weights as the same run without it
    METHODS[method].main(tiny_args(method, tmp_path / "plain", image_folder, steps=3))
    METHODS[method].main(tiny_args(method, tmp_path / "plain", image_folder, steps=6, resume=True))
    assert_same_state(load(run / "ckpt.pt"), load(tmp_path / "plain" / "ckpt.pt"),
                      ["model", "ema", "optimizer", "rng"])


@ALL
def test_a_stop_at_a_fid_step_saves_without_measuring(method, tmp_path, monkeypatch, capsys,
                                                      image_folder):
    calls = fake_fids(monkeypatch, [5.0, 4.0])
    run = tmp_path / "run"
    fields = dict(fid_every=1, fid_samples=6, save_every=1)  # a save due too: stop still seen
    with monkeypatch.context() as patch:
        interrupt_at(patch, 2)
        with pytest.raises(SystemExit) as exit_info:
            METHODS[method].main(tiny_args(method, run, image_folder, steps=3, **fields))
    assert exit_info.value.code == 143 and calls == [6]
    err = capsys.readouterr().err
    assert "FID at step 2 skipped: stopping" in err
    assert f"--ckpt {run / 'ckpt.pt'}`" in err
    assert load(run / "ckpt.pt")["step"] == 2 and load(run / "best.pt")["step"] == 1
    METHODS[method].main(tiny_args(method, run, image_folder, steps=3, resume=True, **fields))
    assert [(r["step"], r["fid"]) for r in fid_records(run)] == [(1, 5.0), (3, 4.0)]


@ALL
def test_fid_every_refuses_2d_and_one_sample(method, capsys):
    assert "exact NLL" in cli_error(method, ["--fid-every", "10"], capsys)
    assert "--fid-samples >= 2" in cli_error(method, ["--dataset", "cifar10", "--fid-every", "10",
                                                      "--fid-samples", "1"], capsys)


# --------------------------------------------------------------------------------------------------
# failures: divergence, bad input, full disk
# --------------------------------------------------------------------------------------------------
@ALL
def test_divergence_stops_and_keeps_the_last_good_checkpoint(method, tmp_path, capsys):
    args = tiny_args(method, tmp_path, steps=50, save_every=1, log_every=1, **DIVERGING[method])
    with pytest.raises(SystemExit) as exit_info:
        METHODS[method].main(args)
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    ckpt = load(tmp_path / "ckpt.pt")
    assert 1 <= ckpt["step"] < 50
    assert f"diverged by step {ckpt['step'] + 1}" in err and f"(step {ckpt['step']}) is kept" in err
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_divergence_before_any_save_says_so(tmp_path, capsys):
    with pytest.raises(SystemExit):
        METHODS["dcd"].main(tiny_args("dcd", tmp_path, steps=50, save_every=100, log_every=1,
                                      **DIVERGING["dcd"]))
    assert "no checkpoint was written" in capsys.readouterr().err


@ALL
def test_missing_data_is_checked_before_the_run_folder_exists(method, tmp_path, capsys):
    run = tmp_path / "run"
    line = cli_error(method,
                     ["--dataset", "mnist", "--data-dir", str(tmp_path / "nodata"), "--device",
                      "cpu",
                              "--run-dir", str(run)], capsys)
    assert "mnist data not found" in line
    assert not run.exists()
    line = cli_error(method, ["--dataset", f"points:{tmp_path / 'absent.csv'}", "--device", "cpu",
                              "--run-dir", str(run)], capsys)
    assert line == f"error: points:{tmp_path / 'absent.csv'}: no such file"
    assert not run.exists()


@ALL
def test_unwritable_run_folder_is_refused_at_start(method, tmp_path, capsys, monkeypatch):
    (tmp_path / "a_file").write_text("")
    line = cli_error(method, as_argv(tiny_fields(method, tmp_path / "a_file" / "run")), capsys)
    assert "cannot create run folder" in line

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(common.tempfile, "TemporaryFile", read_only)
    line = cli_error(method, as_argv(tiny_fields(method, tmp_path / "run")), capsys)
    assert "cannot write to run folder" in line and "Permission denied" in line


@ALL
def test_full_disk_during_a_save_keeps_the_previous_checkpoint(method, tmp_path, capsys,
                                                               monkeypatch):
    original, calls = torch.save, {"n": 0}

    def save(obj, path, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 2:  # step 5's ckpt.pt and snapshot succeed, step 10's fail
            open(path, "wb").write(b"partial")
            raise OSError(28, "No space left on device")
        return original(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    line = cli_error(method, as_argv(tiny_fields(method, tmp_path, steps=10, save_every=5)), capsys)
    assert "No space left on device" in line and "previous checkpoint is kept" in line
    assert load(tmp_path / "ckpt.pt")["step"] == 5
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".tmp")]


@ALL
@pytest.mark.parametrize("device, message", [("mps", "not supported"), ("tpu", "not supported"),
                                             ("cuda:0", "CUDA is not available")])
def test_unavailable_device_is_one_line(method, device, message, tmp_path, capsys):
    if device.startswith("cuda") and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    line = cli_error(method, ["--device", device, "--run-dir", str(tmp_path / "run")], capsys)
    assert message in line and not (tmp_path / "run").exists()


@ALL
def test_checkpoint_from_another_version_names_the_fields(method, tmp_path, capsys):
    run = tmp_path / "run"
    METHODS[method].main(tiny_args(method, run, steps=5))
    ckpt = load(run / "ckpt.pt")
    ckpt["args"]["retired_option"] = 3
    del ckpt["args"]["save_minutes"]
    torch.save(ckpt, run / "ckpt.pt")
    capsys.readouterr()
    line = cli_error(method, ["--resume", "--run-dir", str(run)], capsys)
    assert "retired_option" in line and "save_minutes" in line
    with pytest.raises(common.UserError, match="retired_option"):
        eval_fid_ood.evaluate(eval_fid_ood.EvalArgs(ckpt=str(run), device="cpu"))


@ALL
def test_help_shows_the_real_defaults(method, capsys):
    with pytest.raises(SystemExit):
        common.parse_args(METHODS[method].Args, method, ["--help"])
    out = " ".join(capsys.readouterr().out.split())
    presets = METHODS[method].PRESETS
    # every table that names the field, in order (cdrl.py: also "imagenet32")
    shown = ", ".join(f"{kind} {table['steps']}" for kind, table in presets.items()
                      if "steps" in table)
    assert f"(default: {shown})" in out and shown.startswith("2d ")
    assert "--steps INT" in out and "--save-minutes FLOAT" in out
    assert "(default: None)" not in out and "{None}" not in out


@ALL
def test_cpu_preset_is_one_flag_over_the_image_preset(method):
    """--preset cpu: every value of PRESETS["cpu"] (the reduced image configuration), the image
    preset for the fields it does not name, a flag given on top of it wins, and 2D refuses it."""
    args_class, presets = METHODS[method].Args, METHODS[method].PRESETS
    cpu, images = args_class(dataset="mnist", preset="cpu"), args_class(dataset="mnist")
    for key, value in presets["cpu"].items():
        assert getattr(cpu, key) == value, key
        assert getattr(images, key) == presets["images"].get(key, getattr(images, key)), key
    for key in set(presets["images"]) - set(presets["cpu"]) - {"warmup_steps"}:
        assert getattr(cpu, key) == getattr(images, key), key
    assert cpu.steps < images.steps and cpu.preset == "cpu" and images.preset is None
    assert args_class(dataset="mnist", preset="cpu", steps=7, batch_size=8).steps == 7
    with pytest.raises(common.UserError, match="--preset cpu"):
        args_class(dataset="8gaussians", preset="cpu")


@ALL
@pytest.mark.slow
def test_real_sigterm_from_outside(method, tmp_path):
    """A separate process, stopped by a real SIGTERM: it saves, says how to resume, exits 143."""
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, SCRIPTS[method]),
         *as_argv(tiny_fields(method, run, steps=100_000, log_every=1, sample_every=100_000))],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    deadline = time.time() + 120
    while not (run / "metrics.jsonl").exists() or not (run / "metrics.jsonl").read_text():
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "--resume --run-dir" in err
    assert load(run / "ckpt.pt")["step"] >= 1
