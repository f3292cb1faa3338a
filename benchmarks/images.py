"""The image results on real digits: each script's `--preset cpu` on MNIST, one protocol, a table.

    python benchmarks/images.py data                  # the data folder (below), once per machine
    python benchmarks/images.py run --jobs 2          # train (or resume) and score every run
    python benchmarks/images.py run --runs daebm      # one run
    python benchmarks/images.py run --stages train    # training only (resumable; stages below)
    python benchmarks/images.py table                 # the table of what is recorded

Data (`../data`, beside the checkout, like the runs in `../runs/images`: a fresh clone of the
project keeps both): MNIST's 10,000 test digits (../shared/data/MNIST/raw) split as the training
files of ../data/MNIST/raw (the first 9,000) and its test files (the last 1,000, held out: never
trained on; the evaluator's in-distribution test split); Fashion-MNIST's 10,000 test images
(the OOD set) as ../data/FashionMNIST/raw/t10k-*, from the PNGs of github.com/Sentdex/nnfs_book
(fashion_mnist_images/test/<class>/<k>.png, the k-th image of each class) put back in the order of
Fashion-MNIST's own label file (github.com/zalandoresearch/fashion-mnist, data/fashion/), both
fetched with the search tool's `fetch` (--sources). The full MNIST training files were not found in
a form that is byte-exact (docs/RESULTS.md). md5 of every file written is printed.

Protocol (every run): training on the 9,000 digits by the script's `--preset cpu` (plus the speed
flags measured fastest on this CPU), one torch thread, `--fid-every 500 --fid-samples 500` (the FID
curve); then `eval_fid_ood.py`: FID of 10,000 samples of the method's own sampler against the 9,000
training digits (torch-fidelity's Inception, the real weights built by
../shared/tools/inception_weights.py into ../data/inception.pth), OOD AUROC of -energy for the 1,000
held-out digits against Fashion-MNIST and the evaluator's synthetic sets, pictures; per method its
paper's claim (RUNS below). Each stage that finishes is written to benchmarks/images/<run>.json
(kept in git: commands, machine, wall times, results); a stage with a result is not run again, and
a run cut off (a session ending) resumes from its checkpoint with the same command.
"""
import argparse
import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.abspath(os.path.dirname(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from toys import machine  # noqa: E402

# outside the checkout, so that a fresh clone of the project (every session here starts from one)
# keeps the data, the Inception statistics and the runs' checkpoints of a run cut off: paths
# relative to the checkout, where every command runs
DATA = os.path.join("..", "data")
WEIGHTS = os.path.join(DATA, "inception.pth")
TRAIN = ["--device", "cpu", "--data-dir", DATA, "--seed", "1", "--log-every", "25"]
# the FID curve of the generation runs: 500 EMA samples every 500 iterations
FID_CURVE = ["--fid-every", "500", "--fid-samples", "500", "--inception-weights", WEIGHTS]
EVAL = ["--device", "cpu", "--data-dir", DATA, "--inception-weights", WEIGHTS,
        "--batch-size", "250"]
SCORE = ["--fid-samples", "10000", "--ood", "fashionmnist", "interp", "uniform", "constant"]
NO_FID = ["--fid-samples", "0", "--ood", "none"]
# name -> the training command (script and flags) and the evaluator stages after it (stage name ->
# eval_fid_ood.py flags); every command adds TRAIN / EVAL
RUNS = {
    "daebm": {
        # --compile: 0.17 against 0.15 it/s eager, side by side (docs/RESULTS.md); CDRL: none
        "train": ["pcd_diffusion_ebm.py", "--dataset", "mnist", "--preset", "cpu",
                  "--channels-last", "--compile", *FID_CURVE],
        # the paper's headline: long-run stability, FID after 1x, 10x and 100x the sampler's
        # steps (100 samples each; 100x costs 100 times a sample: the stage took 3,516 s on one
        # core here, docs/RESULTS.md)
        "eval": {"score": SCORE, "long_run": ["--fid-samples", "0", "--ood", "none",
                                              "--long-run", "100", "--long-run-samples", "100"],
                 "chains": "persistent_chains",  # functions of this file (below)
                 "mala_from_data": "mala_from_data"},
    },
    "cdrl": {
        "train": ["cdrl.py", "--dataset", "mnist", "--preset", "cpu", "--conditional",
                  "--channels-last", "--amp", "bf16", *FID_CURVE],
        # w = -1 is the null class alone: (1 + w) f(y, c) - w f(y, ∅) = f(y, ∅), the
        # unconditional model of classifier-free guidance; w = 0 conditional; w > 0 guided
        # the cheap stages first, the unconditional FID of 10,000 samples (the guidance sweep
        # has it at 1,000) last
        "eval": {"score": SCORE,
                 "guidance": ["--guidance-sweep", "-1,0,1,3", "--fid-samples", "1000", "--ood",
                              "none"],
                 "inpaint_center": [*NO_FID, "--inpaint", "center", "--n-inpaint", "1000"],
                 "inpaint_right": [*NO_FID, "--inpaint", "right", "--n-inpaint", "1000"],
                 "composition": "composition",  # a function of this file (below)
                 "unconditional": ["--guidance-sweep", "-1", "--fid-samples", "10000", "--ood",
                                   "none"]},
    },
    "dcd": {
        "train": ["dcd.py", "--dataset", "mnist", "--preset", "cpu", "--channels-last", "--amp",
                  "bf16", *FID_CURVE],
        "eval": {"score": SCORE},
    },
}
# DCD generation with the training chains started at y / a, where the ladder's sampler starts,
# instead of at the positive: the preset run's first 1,000 iterations otherwise, for its FID curve;
# it tested (and refuted) the reading that the energy is shaped only near the training chains
# (docs/RESULTS.md, "DCD: generation")
RUNS["dcd-chain-y"] = {"train": [*RUNS["dcd"]["train"], "--chain-start", "y", "--steps", "1000"],
                       "eval": {}}
# --task denoise: DCD's estimators and CD against a plain denoising-score-matching reference of the
# same network, each trained for the same wall time on the same digits (DENOISE_FLAGS), then
# scored on the same 1,000 held-out digits with the same noise (σ_d = 0.3 on the [-1, 1] scale)
DENOISE_FLAGS = ["--task", "denoise", "--steps", "1500", "--sample-every", "500"]
for name, flags in {"dcd-denoise-langevin": ["--estimator", "langevin", "--langevin-steps", "5",
                                             "--step-ratio", "0.3"],
                    "dcd-denoise-langevin-reg1e-4": ["--estimator", "langevin",
                                                     "--langevin-steps", "5", "--step-ratio",
                                                     "0.3", "--energy-reg", "1e-4"],
                    "dcd-denoise-langevin-reg1e-3": ["--estimator", "langevin",
                                                     "--langevin-steps", "5", "--step-ratio",
                                                     "0.3", "--energy-reg", "1e-3"],
                    "dcd-denoise-importance": ["--estimator", "importance", "--energy-reg", "0"],
                    "dcd-denoise-mala": ["--estimator", "langevin", "--langevin-steps", "5",
                                         "--step-ratio", "0.3", "--metropolis",
                                         "--adapt-step-ratio", "--energy-reg", "0"],
                    "cd-denoise": ["--kernel", "cd", "--langevin-steps", "5", "--cd-step-size",
                                   "0.01"]}.items():
    RUNS[name] = {"train": ["dcd.py", "--dataset", "mnist", "--preset", "cpu", "--channels-last",
                            "--amp", "bf16", *DENOISE_FLAGS, *flags], "eval": {}}
RECORDS = os.path.join(ROOT, "benchmarks", "images")
RUNS_DIR = os.path.join(os.path.dirname(ROOT), "runs", "images")


# --------------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------------
def read_idx(path):
    with gzip.open(path) as f:
        data = f.read()
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(data[3])]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * data[3]).reshape(dims)


def write_idx(path, array):
    """A uint8 array as a gzipped IDX file (the format of the MNIST files; mtime 0: the same bytes
    every time)."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with gzip.GzipFile(path, "wb", mtime=0) as f:
        f.write(header + np.ascontiguousarray(array, np.uint8).tobytes())


def md5(path):
    with open(path, "rb") as f:
        return hashlib.md5(f.read()).hexdigest()


def make_data(ns):
    """The data folder (module docstring) under ns.out from ns.mnist and ns.sources; prints each
    IDX file's md5."""
    from PIL import Image

    images = read_idx(os.path.join(ns.mnist, "t10k-images-idx3-ubyte.gz"))
    labels = read_idx(os.path.join(ns.mnist, "t10k-labels-idx1-ubyte.gz"))
    out = os.path.join(ns.out, "MNIST", "raw")
    for split, rows in (("train", slice(0, 9000)), ("t10k", slice(9000, None))):
        write_idx(os.path.join(out, f"{split}-images-idx3-ubyte.gz"), images[rows])
        write_idx(os.path.join(out, f"{split}-labels-idx1-ubyte.gz"), labels[rows])
    fashion_labels = os.path.join(ns.sources, "fashion-t10k-labels-idx1-ubyte.gz")
    pngs = os.path.join(ns.sources, "fashion_mnist_images", "test")
    if os.path.exists(fashion_labels) and os.path.isdir(pngs):
        classes = read_idx(fashion_labels)
        taken = [0] * 10
        fashion = []
        for c in classes:  # the k-th image of class c is the k-th label c of the test file
            fashion.append(np.array(Image.open(os.path.join(pngs, str(c), f"{taken[c]:04d}.png"))))
            taken[c] += 1
        out_fashion = os.path.join(ns.out, "FashionMNIST", "raw")
        write_idx(os.path.join(out_fashion, "t10k-images-idx3-ubyte.gz"), np.stack(fashion))
        shutil.copy(fashion_labels, os.path.join(out_fashion, "t10k-labels-idx1-ubyte.gz"))
    else:
        print(f"no Fashion-MNIST sources in {ns.sources} (see --help): OOD without it")
    for folder, _, files in sorted(os.walk(ns.out)):
        for name in sorted(files):
            if "idx" in name:
                path = os.path.join(folder, name)
                print(md5(path), os.path.relpath(path, ns.out))
    if not os.path.exists(os.path.join(ns.out, "inception.pth")):
        print("the Inception weights: python3 ../shared/tools/inception_weights.py "
              f"{os.path.join(ns.out, 'inception.pth')}")


# --------------------------------------------------------------------------------------------------
# runs
# --------------------------------------------------------------------------------------------------
def load_record(name):
    path = os.path.join(RECORDS, f"{name}.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return {"run": name, "machine": machine(), "train_segments": [], "eval": {}}


def save_record(record):
    """Write a run's record, keeping the stage results that another driver of the same run (the
    other lane, running another of its stages) wrote since this one loaded it."""
    os.makedirs(RECORDS, exist_ok=True)
    path = os.path.join(RECORDS, f"{record['run']}.json")
    for stage, entry in load_record(record["run"])["eval"].items():
        if "result" in entry and "result" not in record["eval"].get(stage, {}):
            record["eval"][stage] = entry
    temporary = f"{path}.{os.getpid()}.tmp"
    with open(temporary, "w") as f:
        json.dump(record, f, indent=1)
    os.replace(temporary, path)


def checkpoint_step(run_dir):
    import torch

    path = os.path.join(run_dir, "ckpt.pt")
    if not os.path.exists(path):
        return 0
    return torch.load(path, map_location="cpu", weights_only=True)["step"]


def account_for_cut_segments(record, step: int):
    """Before a training segment starts at checkpoint step `step`: a segment whose driver was
    killed (returncode None) ended at `step`; without a checkpoint (step 0: the run folder was
    lost with its machine) the earlier segments trained nothing that remains, so they move to
    "lost_segments" and the training wall time counts only the run that goes on."""
    for segment in record["train_segments"]:
        if segment["returncode"] is None:
            segment.update(to_step=step, returncode="cut off")
    if step == 0 and record["train_segments"]:
        record.setdefault("lost_segments", []).extend(record["train_segments"])
        record["train_segments"] = []


def curves(record, run_dir):
    """The record with the run's speed (median it/s), FID curve and denoising curve so far, from
    its metrics.jsonl."""
    rows = metrics(run_dir)
    speeds = [r["it_per_s"] for r in rows if "it_per_s" in r]
    if speeds:
        record["it_per_s_median"] = float(np.median(speeds))
    record["fid_curve"] = [{k: r[k] for k in ("step", "fid", "fid_samples", "fid_seconds")}
                           for r in rows if "fid" in r]
    record["denoise_curve"] = [{k: v for k, v in r.items() if k == "step" or "psnr" in k
                                or k == "denoise_accept"} for r in rows if "psnr_mean" in r]
    return record


def metrics(run_dir):
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def persistent_chains(run_dir):
    """DA-EBM: FID of its persistent training chains that sit at t = 0 in the final checkpoint (the
    only states of a short CPU run that look like digits: its samplers from noise do not get there;
    docs/RESULTS.md), with the evaluator's Inception and reference statistics, and a picture."""
    import common

    ckpt = common.load_checkpoint(os.path.join(run_dir, "ckpt.pt"), "daebm")
    at_zero = ckpt["chains_x"][ckpt["chains_t"] == 0].clamp(-1, 1)
    network, tag = common.load_inception(os.path.join(ROOT, WEIGHTS), "cpu")
    reference, _ = common.reference_statistics(
        "mnist", 28, lambda: common.load_images("mnist", os.path.join(ROOT, DATA)), network, tag,
        os.path.join(ROOT, DATA, "fid_stats"), 250, "cpu")
    uint8 = common.to_uint8_rgb(at_zero)
    features = common.inception_features(network, [uint8], "cpu", len(uint8), len(uint8))
    common.save_image_grid(at_zero[:64], os.path.join(run_dir, "chains_t0_final.png"))
    return {"n_chains": len(ckpt["chains_t"]), "n_at_t0": len(at_zero), "step": ckpt["step"],
            "fid": common.frechet_distance(common.feature_statistics(features), reference)}


def mala_from_data(run_dir):
    """DA-EBM: the script's own long-run check at the end of training (../shared/methods/daebm.md:
    MALA at t = 0 from real digits, --long-run-steps of them, with numbers), as metrics.jsonl
    recorded it (its picture: long_run.png in the run folder)."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f if "long_run_mala_steps" in line]
    with open(os.path.join(run_dir, "args.json")) as f:
        n_digits = json.load(f)["n_grid"]  # the check starts from the first n_grid digits
    return {"n_digits": n_digits, "records": [
        {key[len("long_run_"):]: value for key, value in record.items()
         if key.startswith("long_run_")} for record in records]}


def composition(run_dir):
    """CDRL: 64 samples from the sum of the energies of digits 1 and 7 (compositional
    generation, cdrl.py docstring item 10) beside 64 of each digit alone, guidance 1, the same
    noise for the three (pictures in the run folder)."""
    import common
    import eval_fid_ood

    ckpt = common.load_checkpoint(os.path.join(run_dir, "ckpt.pt"), "cdrl")
    module, args, model = eval_fid_ood.load_method(ckpt, "cpu")
    pictures = []
    for classes in ((1,), (7,), (1, 7)):
        args.compose, args.guidance = classes, 1.0
        with common.own_rng(args.seed):
            samples = module.sample(model, 64, args, "cpu")
        pictures.append(os.path.join(run_dir, f"compose_{'+'.join(map(str, classes))}.png"))
        common.save_image_grid(samples, pictures[-1])
    return {"classes": [1, 7], "guidance": 1.0, "pictures": [os.path.relpath(p, ROOT)
                                                             for p in pictures]}


def run(name, stages=None):
    """Train (or resume) one run to its end, then its evaluator stages; the record after each.
    `stages`: only these ("train" and/or evaluator stage names; None: all), e.g. training alone
    near a session's end, where a cut-off training resumes and a cut-off evaluator stage does
    not."""
    if name == "dsm-denoise":
        return run_dsm_reference()
    spec, record = RUNS[name], load_record(name)
    run_dir = os.path.join(RUNS_DIR, name)
    script, *flags = spec["train"]
    command = [sys.executable, script, *flags, *TRAIN, "--run-dir", run_dir]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    record["train_command"] = " ".join(["python", script, *flags, *TRAIN, "--run-dir",
                                        os.path.relpath(run_dir, ROOT)])
    log = open(os.path.join(RUNS_DIR, f"{name}.log"), "a")
    if "training_done" not in record:
        if stages is not None and "train" not in stages:
            return record
        step = checkpoint_step(run_dir)
        account_for_cut_segments(record, step)
        segment = {"from_step": step, "to_step": None, "wall_s": 0.0, "returncode": None,
                   "date": time.strftime("%Y-%m-%d")}
        record["train_segments"].append(segment)
        record["machine"] = machine()
        start = time.time()
        proc = subprocess.Popen(command + (["--resume"] if step else []), cwd=ROOT, env=env,
                                stdout=log, stderr=log)
        # the segment's wall time written every 30 s: a driver killed with the session (its run
        # resumes from the checkpoint next time) leaves its time on record
        while True:
            try:
                proc.wait(timeout=30)
                break
            except subprocess.TimeoutExpired:
                segment["wall_s"] = round(time.time() - start, 1)
                save_record(curves(record, run_dir))
        segment.update(to_step=checkpoint_step(run_dir), wall_s=round(time.time() - start, 1),
                       returncode=proc.returncode)
        if proc.returncode == 0:
            record["training_done"] = time.strftime("%Y-%m-%d")
        save_record(record)
        if proc.returncode != 0:
            print(f"{name}: training stopped (exit {proc.returncode}, see {log.name})")
            return record
    save_record(curves(record, run_dir))
    for stage, stage_flags in spec["eval"].items():
        if "result" in record["eval"].get(stage, {}) or (stages is not None
                                                         and stage not in stages):
            continue
        if isinstance(stage_flags, str):  # a measurement of this file's own
            start = time.time()
            result = globals()[stage_flags](run_dir)
            record["eval"][stage] = {"command": f"python benchmarks/images.py run --runs {name}",
                                     "wall_s": round(time.time() - start, 1),
                                     "date": time.strftime("%Y-%m-%d"), "result": result}
            save_record(record)
            continue
        out = os.path.join(run_dir, f"eval_{stage}.json")
        eval_command = ["eval_fid_ood.py", "--ckpt", run_dir, *EVAL, *stage_flags, "--out", out]
        start = time.time()
        proc = subprocess.run([sys.executable, *eval_command], cwd=ROOT, env=env, stdout=log,
                              stderr=log)
        entry = {"command": "python " + " ".join(eval_command).replace(ROOT + "/", ""),
                 "wall_s": round(time.time() - start, 1), "date": time.strftime("%Y-%m-%d")}
        if proc.returncode == 0:
            with open(out) as f:
                entry["result"] = json.load(f)
        else:
            entry["error"] = f"exit {proc.returncode} (see {log.name})"
        record["eval"][stage] = entry
        save_record(record)
    return record


def dsm_reference(seconds: float):
    """The reference point of the denoising runs: dcd.py's one-level image network (the CPU
    preset's widths) trained by plain denoising score matching at σ_d, ||σ ∇E(x + σε) - ε||² (at
    the optimum ∇E = -∇ log p_σ, the score of the noisy digits), with the same optimiser, batch,
    EMA and training digits as the DCD runs, for `seconds` of training; the estimate is Tweedie's
    y - σ² ∇E(y) of the EMA weights, scored like dcd.py's denoiser (same held-out digits, same
    noise). Saves its state every 5 minutes and resumes from it (../runs/images/dsm-denoise)."""
    import torch

    import common
    import dcd

    torch.set_num_threads(1)
    args = dcd.Args(dataset="mnist", preset="cpu", task="denoise",
                    data_dir=os.path.join(ROOT, DATA), device="cpu",
                    channels_last=True, amp="bf16")
    sigma = args.denoise_sigma
    images, _ = common.training_data(args)
    train, heldout = images[:-args.holdout], images[-args.holdout:]
    model = dcd.build_model(args)
    ema = dcd.build_model(args).requires_grad_(False)
    ema.load_state_dict(model.state_dict())
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, betas=(0.9, 0.999))
    loader = common.EpochLoader(torch.arange(len(train)), args.batch_size, args.seed)
    state_path = os.path.join(RUNS_DIR, "dsm-denoise", "state.pt")
    step, elapsed = 0, 0.0
    common.seed_everything(args.seed)
    if os.path.exists(state_path):
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        loader.load_state_dict(state["loader"])
        common.set_rng_state(state["rng"])
        step, elapsed = state["step"], state["elapsed"]
    level = torch.zeros(args.batch_size, dtype=torch.long)
    last_save = time.time()
    while elapsed < seconds:
        start = time.time()
        x = common.to_model_space(train[loader.next()])
        noise = torch.randn_like(x)
        y = (x + sigma * noise).requires_grad_(True)
        (grad,) = torch.autograd.grad(model.energy(y, level).sum(), y, create_graph=True)
        loss = (sigma * grad - noise).pow(2).flatten(1).sum(1).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        common.update_ema(ema, model, min(args.ema_decay, (2 + step) / (11 + step)), False)
        step += 1
        elapsed += time.time() - start
        if time.time() - last_save > 300 or elapsed >= seconds:
            os.makedirs(os.path.dirname(state_path), exist_ok=True)
            torch.save({"model": model.state_dict(), "ema": ema.state_dict(),
                        "optimizer": optimizer.state_dict(), "loader": loader.state_dict(),
                        "rng": common.rng_state(), "step": step, "elapsed": elapsed},
                       state_path + ".tmp")
            os.replace(state_path + ".tmp", state_path)
            last_save = time.time()
            print(f"dsm-denoise: step {step}, {elapsed:.0f} of {seconds:.0f} s, loss "
                  f"{loss.item():.2f}", flush=True)
    # score the EMA weights as dcd.denoise_heldout does: the same noise, batches and PSNR
    generator = torch.Generator().manual_seed(args.seed)
    noise = torch.randn(heldout.shape, generator=generator)
    scores = {"psnr_noisy": [], "psnr_tweedie": []}
    for first in range(0, len(heldout), args.sample_batch):
        x = common.to_unit_range(heldout[first:first + args.sample_batch])
        y = x + sigma * noise[first:first + len(x)]
        _, grad = dcd.energy_and_grad(ema, y, torch.zeros(len(y), dtype=torch.long))
        scores["psnr_noisy"].append(dcd.psnr(y, x))
        scores["psnr_tweedie"].append(dcd.psnr(y - sigma ** 2 * grad, x))
    return {"steps": step, "train_wall_s": round(elapsed, 1),
            **{key: torch.cat(value).mean().item() for key, value in scores.items()}}


def run_dsm_reference():
    """dsm_reference for as long as dcd-denoise-langevin trained (its training wall time)."""
    record, budget = load_record("dsm-denoise"), load_record("dcd-denoise-langevin")
    if "result" not in record["eval"].get("denoise", {}):
        if "training_done" not in budget:
            record["eval"]["denoise"] = {"error": "dcd-denoise-langevin has not finished: its "
                                         "training time is this run's budget"}
            return record
        seconds = sum(segment["wall_s"] for segment in budget["train_segments"])
        start = time.time()
        result = dsm_reference(seconds)
        record["eval"]["denoise"] = {"command": "python benchmarks/images.py run --runs "
                                     "dsm-denoise", "wall_s": round(time.time() - start, 1),
                                     "date": time.strftime("%Y-%m-%d"), "result": result}
        record["machine"] = machine()
        save_record(record)
    return record


def cell(value, digits=1):
    return "not measured" if value is None else f"{value:.{digits}f}"


def table() -> str:
    """Markdown: one row per recorded run (generation runs, then the denoising ones)."""
    records = [load_record(name) for name in [*RUNS, "dsm-denoise"]
               if os.path.exists(os.path.join(RECORDS, f"{name}.json"))]
    long_runs = [r["eval"]["long_run"]["result"]["long_run"] for r in records
                 if "result" in r["eval"].get("long_run", {})]
    long_run_n = f"{long_runs[0]['n_samples']} samples" if long_runs else "not measured"
    lines = ["| run | FID, 10,000 samples | FID curve (500 samples: step FID) | AUROC "
             f"Fashion-MNIST / mean of 4 sets | long-run FID x1 / x10 / x100 ({long_run_n}) | "
             "denoising PSNR, estimate / noisy input (dB) | training wall | it/s |",
             "|---" * 8 + "|"]
    for record in records:
        spec = RUNS.get(record["run"])  # None: the DSM reference (run_dsm_reference)
        if spec is None or "denoise" in spec["train"]:  # no FID, OOD or long run asked of it
            lines.append(denoise_row(record))
            continue
        # "-": not in the run's protocol (an ablation's FID curve alone)
        stages = spec["eval"]
        score = record["eval"].get("score", {}).get("result", {})
        long_run = record["eval"].get("long_run", {}).get("result", {}).get("long_run", {})
        curve = ", ".join(f"{r['step']}: {r['fid']:.0f}" for r in record.get("fid_curve", []))
        ood = score.get("ood", {})
        auroc = (f"{ood['fashionmnist']['auroc']:.3f} / {score['ood_mean']:.3f}"
                 if "fashionmnist" in ood else "not measured" if "score" in stages else "-")
        runs = " / ".join(cell(r["fid"]) for r in long_run.get("records", [])) or (
            "not measured" if "long_run" in stages else "-")
        fid = cell(score.get("fid")) if "score" in stages else "-"
        lines.append(f"| {record['run']} | {fid} | {curve or '-'} | {auroc} | {runs} | - | "
                     f"{train_wall(record) / 3600:.2f} h | {speed(record)} |")
    return "\n".join(lines + claims(records))


def claims(records) -> list:
    """Each paper's own image claim that the main table has no column for: CDRL's guidance sweep
    and inpainting, DA-EBM's persistent chains at t = 0 (a bullet each; 'not measured' where a
    stage has no result)."""
    results = {r["run"]: {stage: entry.get("result") for stage, entry in r["eval"].items()}
               for r in records}
    cdrl, daebm = results.get("cdrl", {}), results.get("daebm", {})
    guidance = cdrl.get("guidance") or {}
    lines = ["", "- CDRL guidance sweep: " + (
        f"FID of {guidance['fid_samples']} samples each, the same noise: "
        + ", ".join(f"w = {r['guidance']:g}: {r['fid']:.1f}" for r in guidance["guidance_sweep"])
        if guidance else "not measured")]
    for region in ("center", "right"):
        inpaint = (cdrl.get(f"inpaint_{region}") or {}).get("inpaint")
        lines.append(f"- CDRL inpainting, {region}: " + (
            f"MSE {inpaint['mse']:.3f} against {inpaint['mse_known_mean']:.3f} for the known-mean "
            f"fill ({inpaint['n']} held-out digits)" if inpaint else "not measured"))
    mala = daebm.get("mala_from_data")
    lines.append("- DA-EBM long-run check of the script (MALA at t = 0 from real digits), mean "
                 "energy / RMS drift per pixel after each number of steps: " + (
                     f"{mala['n_digits']} training digits, " + ", ".join(
                         f"{r['mala_steps']}: {r['mean_energy']:.0f} / {r['rms_drift']:.3f}"
                         for r in mala["records"]) if mala else "not measured"))
    chains = daebm.get("chains")
    lines.append("- DA-EBM persistent chains at t = 0 (final checkpoint): " + (
        f"{chains['n_at_t0']} of {chains['n_chains']}, FID {chains['fid']:.1f} on those"
        if chains else "not measured"))
    return lines


def train_wall(record) -> float:
    dsm = record["eval"].get("denoise", {}).get("result")
    return dsm["train_wall_s"] if dsm else sum(s["wall_s"] for s in record["train_segments"])


def speed(record) -> str:
    value = record.get("it_per_s_median")
    return cell(value, 2) if value else "-"


def denoise_row(record) -> str:
    """A denoising run's row: the PSNR of its estimate (the last measurement; the DSM reference's
    Tweedie estimate) against the noisy input's."""
    dsm = record["eval"].get("denoise", {}).get("result")
    curve = record.get("denoise_curve") or []
    if dsm:
        psnr = f"{dsm['psnr_tweedie']:.2f} / {dsm['psnr_noisy']:.2f}"
    elif curve:
        psnr = f"{curve[-1]['psnr_mean']:.2f} / {curve[-1]['psnr_noisy']:.2f}"
    else:
        psnr = "not measured"
    return (f"| {record['run']} | - | - | - | - | {psnr} | {train_wall(record) / 3600:.2f} h | "
            f"{speed(record)} |")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("what", choices=["data", "run", "table"])
    parser.add_argument("--runs", nargs="+", choices=[*RUNS, "dsm-denoise"],
                        default=[*RUNS, "dsm-denoise"])
    parser.add_argument("--jobs", type=int, default=1, help="runs at once (one thread each)")
    parser.add_argument("--stages", nargs="+", help="run: only these of each run's stages "
                        "('train' and the evaluator stages of RUNS; default: all)")
    parser.add_argument("--sources", default=os.path.join(ROOT, "..", "data_src"),
                        help="data: a folder with fashion_mnist_images/test (nnfs_book) and "
                        "fashion-t10k-labels-idx1-ubyte.gz (zalandoresearch/fashion-mnist)")
    parser.add_argument("--mnist", default=os.path.join(ROOT, "..", "shared", "data", "MNIST",
                                                        "raw"),
                        help="data: the folder of MNIST's t10k IDX files")
    parser.add_argument("--out", default=os.path.join(ROOT, DATA), help="data: where to write")
    ns = parser.parse_args(argv)
    if ns.what == "data":
        make_data(ns)
    elif ns.what == "table":
        print(table())
    elif ns.what == "run":
        os.makedirs(RUNS_DIR, exist_ok=True)
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(ns.jobs) as pool:
            for record in pool.map(lambda name: run(name, ns.stages), ns.runs):
                print(f"{record['run']}: {sorted(record['eval'])}", flush=True)


if __name__ == "__main__":
    main()
