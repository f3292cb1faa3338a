"""What a lent GPU must confirm, in one command of at most 10 minutes on one H100/H200 (issue 30).

    python benchmarks/gpu_check.py --out gpu_check.json          # on the GPU machine
    python benchmarks/gpu_check.py --device cpu --tiny           # the same checks on a CPU (tests)

Checks, each printed as it finishes and written to --out after each:
1. speed: per method at its paper image configuration (DA-EBM MNIST, CDRL CIFAR-10, DCD CelebA;
   --tiny: each script's --preset cpu at batch 8), the variants eager fp32, eager bf16, compiled
   fp32 and compiled bf16 + channels-last: it/s, peak memory, the fraction of the matmul floor of
   the row's precision and the minutes for 50,000 samples (benchmarks/bench.py's rows; a row that
   fails is recorded with its error and the others go on);
2. syncs: one training iteration and the post-training sampler of each method with
   torch.cuda.set_sync_debug_mode("error") (CPU: the aten operators that read a value back are
   recorded instead), outside the optimizers' own steps (torch.optim keeps its step counter on the
   host);
3. torchrun: each script's 2D quick start for 4 iterations as a plain process and as a
   1-process torchrun: the final weights must be bitwise the same;
4. fid: the seconds of one --fid-every measurement of --fid-samples samples of a tiny CDRL image
   run (torch-fidelity's Inception with --inception-weights, or with Kaiming-random weights when
   none are given: then only the time means anything).
A table of the speed rows last.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import bench  # noqa: E402
import common  # noqa: E402

SCRIPTS = {"daebm": "pcd_diffusion_ebm.py", "cdrl": "cdrl.py", "dcd": "dcd.py"}
SPEED_VARIANTS = ["eager fp32", "eager bf16", "compiled fp32", "compiled bf16 NHWC"]
# aten operators that copy a device value to the host (and so wait for the device)
HOST_SYNCS = {"_local_scalar_dense", "nonzero", "masked_select", "equal", "is_nonzero"}


class RecordHostSyncs(TorchDispatchMode):
    """The host-reading operators that run while it is open (unless paused)."""

    def __init__(self):
        super().__init__()
        self.seen, self.paused = [], False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._overloadpacket.__name__ in HOST_SYNCS and not self.paused:
            self.seen.append(func._overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def tiny_args(method: str, config: str = "paper", amp: str = "none", compile: bool = False,
              channels_last: bool = False):
    """--preset cpu at batch 8 (and a handful of chains and samples): seconds per row on a CPU
    (bench.measure's make_args)."""
    args = bench.METHODS[method].Args(dataset="mnist", preset="cpu", device="cpu", amp=amp,
                                      compile=compile, channels_last=channels_last)
    args.batch_size = 8
    if method == "daebm":
        args.n_chains, args.sample_chains = 16, 8
    else:
        args.sample_batch = 8
    return args


def speed(ns, device, result, save):
    rates = {"fp32": bench.matmul_rate(device, torch.float32),
             "bf16": bench.matmul_rate(device, torch.bfloat16)}
    result.update(matmul_tflops_fp32=rates["fp32"] / 1e12, matmul_tflops_bf16=rates["bf16"] / 1e12)
    torch._dynamo.config.fail_on_recompile_limit_hit = True
    print(bench.HEADER, flush=True)
    for method in ns.methods:
        for variant in SPEED_VARIANTS:
            torch._dynamo.reset()
            try:
                row = bench.measure(method, "paper", variant, device, rates, ns.seconds,
                                    make_args=tiny_args if ns.tiny else None,
                                    timed_on_cpu=ns.tiny)
            except Exception as error:  # e.g. no Triton or C compiler for the compiled rows
                row = {"method": method, "config": "paper", "variant": variant,
                       "error": f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"
                       if str(error) else type(error).__name__}
            result["speed"].append(row)
            print(bench.row_line(row), flush=True)
            save()


def one_iteration_and_sampler(method: str, args, device, recorder):
    """One training iteration (step + EMA) and one call of the sampler, the optimizers' steps
    outside the recording."""
    module = bench.METHODS[method]
    model, step = bench.training_iteration(method, args, device)
    step()  # warm-up: allocator, cuDNN choices

    def unrecorded(optimizer_step):
        def run(*a, **k):
            recorder.paused = True
            try:
                return optimizer_step(*a, **k)
            finally:
                recorder.paused = False
        return run
    for optimizer in step.optimizers:
        optimizer.step = unrecorded(optimizer.step)
    with recorder:
        step()
        model.eval()
        if method == "daebm":  # one MGMS transition of the sampler's chains (no sync inside)
            n = 4
            x = torch.randn((n,) + module.sample_shape(args), device=device)
            t = torch.randint(0, args.num_levels + 1, (n,), device=device)
            module.mgms_transition(model, x, t, args, metropolis=True)
        else:
            module.sample(model, 2, args, device)


def syncs(ns, device, result, save):
    for method in ns.methods:
        args = tiny_args(method) if ns.tiny else bench.method_args(method, "paper")
        args.batch_size = min(args.batch_size, 16)  # a training iteration, not its speed
        recorder = RecordHostSyncs()
        try:
            if device.type == "cuda":
                torch.cuda.set_sync_debug_mode("error")
            one_iteration_and_sampler(method, args, device, recorder)
            entry = {"method": method, "ok": not recorder.seen, "host_reads": recorder.seen[:5]}
        except RuntimeError as error:  # sync debug mode "error" raises at the first sync
            entry = {"method": method, "ok": False, "error": str(error).splitlines()[0][:200]}
        finally:
            if device.type == "cuda":
                torch.cuda.set_sync_debug_mode("default")
        result["syncs"].append(entry)
        print(f"syncs {method}: {'none' if entry['ok'] else entry}", flush=True)
        save()


def torchrun(ns, device, result, save):
    """Each script's 2D quick start, 4 iterations, plain and under a 1-process torchrun."""
    for method in ns.methods:
        with tempfile.TemporaryDirectory() as tmp:
            weights = []
            for launcher in ([], ["-m", "torch.distributed.run", "--standalone",
                                  "--nproc_per_node", "1"]):
                run_dir = os.path.join(tmp, "torchrun" if launcher else "plain")
                command = [sys.executable, *launcher, os.path.join(ROOT, SCRIPTS[method]),
                           "--steps", "4", "--log-every", "2", "--sample-every", "100",
                           "--device", device.type, "--run-dir", run_dir]
                command += (["--no-final-samples", "--long-run-steps", "0"] if method == "daebm"
                            else ["--n-points", "100"])  # a small end-of-run picture
                start = time.time()
                proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
                if proc.returncode != 0:
                    weights = None
                    error = (proc.stderr.strip().splitlines() or ["?"])[-1]
                    break
                ckpt = torch.load(os.path.join(run_dir, "ckpt.pt"), map_location="cpu",
                                  weights_only=True)
                weights.append((ckpt["model"], time.time() - start))
            if weights is None:
                entry = {"method": method, "ok": False, "error": error}
            else:
                (plain, plain_s), (ranked, ranked_s) = weights
                same = plain.keys() == ranked.keys() and all(torch.equal(plain[k], ranked[k])
                                                             for k in plain)
                entry = {"method": method, "ok": same, "plain_s": round(plain_s, 1),
                         "torchrun_s": round(ranked_s, 1)}
        result["torchrun"].append(entry)
        print(f"torchrun {method}: {entry}", flush=True)
        save()


def random_inception(path: str):
    """torch-fidelity's InceptionV3 with Kaiming-normal weights, saved for --inception-weights."""
    from unittest import mock

    import torch_fidelity.feature_extractor_inceptionv3 as inception

    with mock.patch.object(inception, "load_state_dict_from_url", lambda *a, **k: None), \
            mock.patch.object(inception.FeatureExtractorInceptionV3, "load_state_dict",
                              lambda self, state: None):
        network = inception.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    for layer in network.modules():
        if isinstance(layer, (torch.nn.Conv2d, torch.nn.Linear)):
            torch.nn.init.kaiming_normal_(layer.weight)
    torch.save(network.state_dict(), path)


def fid(ns, device, result, save):
    """One --fid-every measurement of a tiny CDRL run on random 8x8 images: its seconds."""
    from PIL import Image

    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, "images")
        os.makedirs(folder)
        generator = torch.Generator().manual_seed(0)
        for i in range(ns.fid_samples):
            pixels = torch.randint(0, 256, (8, 8, 3), generator=generator, dtype=torch.uint8)
            Image.fromarray(pixels.numpy()).save(os.path.join(folder, f"{i:04d}.png"))
        weights = ns.inception_weights
        if weights is None:
            weights = os.path.join(tmp, "inception.pth")
            random_inception(weights)
        run_dir = os.path.join(tmp, "run")
        command = [sys.executable, os.path.join(ROOT, "cdrl.py"), "--dataset", f"folder:{folder}",
                   "--steps", "1", "--ebm-channels", "16", "--ebm-blocks", "1",
                   "--init-channels", "16", "--init-blocks", "1", "--fid-every", "1",
                   "--fid-samples", str(ns.fid_samples), "--inception-weights", weights,
                   "--data-dir", tmp, "--device", device.type, "--run-dir", run_dir,
                   "--sample-every", "100", "--batch-size", str(min(50, ns.fid_samples))]
        proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
        entry = {"ok": proc.returncode == 0, "samples": ns.fid_samples,
                 "real_weights": ns.inception_weights is not None}
        if proc.returncode == 0:
            with open(os.path.join(run_dir, "metrics.jsonl")) as f:
                record = [json.loads(line) for line in f if '"fid"' in line][-1]
            entry.update(fid=record["fid"], seconds=record["fid_seconds"])
        else:
            entry["error"] = (proc.stderr.strip().splitlines() or ["?"])[-1]
    result["fid"] = entry
    print(f"fid: {entry}", flush=True)
    save()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--tiny", action="store_true",
                        help="each script's --preset cpu at batch 8 (a CPU check of this file)")
    parser.add_argument("--out", default=None, help="JSON file for the results")
    parser.add_argument("--methods", nargs="+", default=sorted(bench.METHODS),
                        choices=sorted(bench.METHODS))
    parser.add_argument("--checks", nargs="+", default=["speed", "syncs", "torchrun", "fid"],
                        choices=["speed", "syncs", "torchrun", "fid"])
    parser.add_argument("--seconds", type=float, default=2.0,
                        help="minimum timing window of each speed row")
    parser.add_argument("--fid-samples", type=int, default=1000)
    parser.add_argument("--inception-weights", default=None,
                        help="torch-fidelity's weights (default: random ones, time only)")
    ns = parser.parse_args(argv)
    device = common.pick_device(ns.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    result = {"device": name, "torch": torch.__version__, "tiny": ns.tiny, "speed": [],
              "syncs": [], "torchrun": [], "fid": None}

    def save():
        if ns.out:
            with open(ns.out, "w") as f:
                json.dump(result, f, indent=2)
    start = time.time()
    for check in ns.checks:
        globals()[check](ns, device, result, save)
    result["seconds"] = round(time.time() - start, 1)
    save()
    if result["speed"]:
        print(f"\ndevice: {name}; matmul rate fp32 {result['matmul_tflops_fp32']:.3f}, bf16 "
              f"{result['matmul_tflops_bf16']:.3f} TFLOP/s")
        print(bench.HEADER)
        for row in result["speed"]:
            print(bench.row_line(row))
    failed = [check for check in ("syncs", "torchrun") if any(not e["ok"] for e in result[check])]
    failed += ["fid"] if result["fid"] and not result["fid"]["ok"] else []
    print(f"\n{result['seconds']:.0f} s; " + (f"failed: {', '.join(failed)}" if failed else
                                              "every check passed"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
