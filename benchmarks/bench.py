"""Speed of every method against its FLOP floor: one command, a table last, JSON with --out.

    python benchmarks/bench.py                # the GPU when there is one: every config timed
    python benchmarks/bench.py --device cpu   # a minute or so: 2D timed, paper configs counted

For each method at its paper image configuration (DA-EBM MNIST, CDRL CIFAR-10, DCD CelebA, each
script's own PRESETS) and at its 2D quick-start configuration:
- flops: matrix-multiply and convolution FLOPs of one training iteration (the method's step
  function: samplers, loss, backward, optimizer), counted with torch.utils.flop_counter's formulas
  on the meta device (shapes only, so paper scale is counted in seconds on any machine);
- variants: eager fp32 and eager bf16 (`--amp bf16` of the scripts), each timed;
- it/s: training iterations per second on the device (synthetic data of the right shape, after
  warm-up), and the achieved TFLOP/s = flops x it/s;
- floor: the share of the device's own measured matrix-multiply rate (fp32, or bf16 for the --amp
  bf16 rows) that this achieves (1.0 = the iteration runs at the speed of one large matmul);
- sampler: the post-training sampler's throughput (CDRL and DCD: samples/s of `sample`; DA-EBM: MGMS
  chain-transitions/s, since the transitions a kept sample needs depend on the trained model);
- peak GPU memory of the training iterations (CUDA only).
On a CPU the paper configurations are counted but not timed (one iteration takes many minutes
there).
"""
import argparse
import json
import os
import sys
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cdrl  # noqa: E402
import common  # noqa: E402
import dcd  # noqa: E402
import pcd_diffusion_ebm as daebm  # noqa: E402

METHODS = {"daebm": daebm, "cdrl": cdrl, "dcd": dcd}
PAPER_DATASET = {"daebm": "mnist", "cdrl": "cifar10", "dcd": "celeba"}


class CountFlops(TorchDispatchMode):
    """Sums torch.utils.flop_counter's per-operator formulas over every operator that runs (the same
    counts as FlopCounterMode, without its module hooks, which do not support
    torch.autograd.grad)."""

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.total += formula(*args, **kwargs, out_val=out)
        return out


def method_args(method: str, config: str, amp: str = "none"):
    dataset = PAPER_DATASET[method] if config == "paper" else METHODS[method].Args().dataset
    return METHODS[method].Args(dataset=dataset, device="cpu", amp=amp)


def training_iteration(method: str, args, device):
    """The model and a closure that runs one training iteration of the method's step function on a
    fixed synthetic batch (plus the EMA update where the method keeps one), as main() does it."""
    module = METHODS[method]
    torch.manual_seed(0)
    model = module.build_model(args).to(device)
    shape = module.sample_shape(args)
    x0 = torch.rand((args.batch_size,) + shape, device=device) * 2 - 1
    ema = [p.detach().clone() for p in model.parameters()]

    def update_ema(decay):
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in model.parameters()], 1 - decay)

    if method == "cdrl":
        opts = (torch.optim.Adam(model.ebm.parameters(), lr=args.lr),
                torch.optim.AdamW(model.initializer.parameters(), lr=args.initializer_lr))
        model.train()

        def step():
            cdrl.cdrl_step(model, x0, None, args, opts)
            update_ema(args.ema_decay)
    elif method == "dcd":
        optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
        model.train()

        def step():
            dcd.dcd_step(model, x0, args, optimizer)
            update_ema(args.ema_decay)
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, betas=(args.adam_beta1,
                                                                           args.adam_beta2))
        chains = (torch.randn((args.n_chains,) + shape, device=device),
                  torch.randint(0, args.num_levels + 1, (args.n_chains,), device=device))
        stats = (torch.zeros(args.num_levels + 1, device=device),
                 torch.zeros(args.num_levels + 1, device=device))
        model.train()

        def step():
            daebm.daebm_step(model, x0, chains, args, optimizer, stats, metropolis=True)
    return model, step


def count_flops(method: str, args) -> int:
    _, step = training_iteration(method, args, torch.device("meta"))
    with CountFlops() as counter:
        step()
    return counter.total


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_it(function, device, min_seconds: float, warmup: int = 2):
    """Calls per second of function(), after `warmup` calls, over at least min_seconds."""
    for _ in range(warmup):
        function()
    synchronize(device)
    calls, start = 0, time.perf_counter()
    while True:
        function()
        calls += 1
        synchronize(device)
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return calls / elapsed


def matmul_rate(device, dtype) -> float:
    """FLOP/s of a square matrix multiply, the device's practical matmul ceiling for that dtype."""
    n = 4096 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n ** 3 * time_it(lambda: a @ b, device, min_seconds=1.0)


def sampler_throughput(method: str, model, args, device, min_seconds: float):
    """(value, unit): samples/s of the public sampler, or MGMS chain-transitions/s for DA-EBM."""
    module = METHODS[method]
    model.eval()
    if method == "daebm":
        n = args.sample_chains
        x = torch.randn((n,) + module.sample_shape(args), device=device)
        t = torch.randint(0, args.num_levels + 1, (n,), device=device)
        return n * time_it(lambda: daebm.mgms_transition(model, x, t, args, True), device,
                           min_seconds, warmup=1), "chain-transitions/s"
    n = args.sample_batch
    return n * time_it(lambda: module.sample(model, n, args, device), device, min_seconds,
                       warmup=1), "samples/s"


def measure(method: str, config: str, amp: str, device, rates: dict, min_seconds: float) -> dict:
    """One row: FLOPs counted in fp32 (the same operations run in bf16), the rest timed."""
    args = method_args(method, config, amp)
    rate = rates["bf16" if amp == "bf16" else "fp32"]
    row = {"method": method, "config": config, "dataset": args.dataset, "batch": args.batch_size,
           "variant": f"eager {'bf16' if amp == 'bf16' else 'fp32'}",
           "flops_per_iteration": count_flops(method, method_args(method, config))}
    if device.type == "cpu" and config == "paper":
        row["timed"] = "not on cpu (one iteration takes many minutes)"
        return row
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model, step = training_iteration(method, args, device)
    its = time_it(step, device, min_seconds)
    row.update({"it_per_s": its, "tflops_achieved": row["flops_per_iteration"] * its / 1e12,
                "floor_fraction": row["flops_per_iteration"] * its / rate})
    if device.type == "cuda":
        row["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
    rate_and_unit = sampler_throughput(method, model, args, device, min_seconds)
    row["sampler"], row["sampler_unit"] = rate_and_unit
    return row


def print_table(result: dict):
    print(f"\ndevice: {result['device']}; measured matmul rate fp32 "
          f"{result['matmul_tflops_fp32']:.3f}, bf16 {result['matmul_tflops_bf16']:.3f} TFLOP/s")
    header = (f"{'method':<7}{'config':<7}{'variant':<11}{'dataset':<14}{'batch':>6}"
              f"{'TFLOP/it':>11}{'it/s':>9}{'TFLOP/s':>9}{'floor':>7}{'peak GiB':>9}  sampler")
    print(header)
    for row in result["rows"]:
        timed = "it_per_s" in row
        print(f"{row['method']:<7}{row['config']:<7}{row['variant']:<11}{row['dataset']:<14}"
              f"{row['batch']:>6}"
              f"{row['flops_per_iteration'] / 1e12:>11.4g}"
              + (f"{row['it_per_s']:>9.3g}{row['tflops_achieved']:>9.3g}"
                 f"{row['floor_fraction']:>7.1%}" if timed else f"{'-':>9}{'-':>9}{'-':>7}")
              + (f"{row['peak_memory_gib']:>9.2f}" if "peak_memory_gib" in row else f"{'-':>9}")
              + (f"  {row['sampler']:.4g} {row['sampler_unit']}" if timed else f"  {row['timed']}"))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--out", default=None, help="JSON file for the results")
    parser.add_argument("--methods", nargs="+", default=sorted(METHODS), choices=sorted(METHODS))
    parser.add_argument("--configs", nargs="+", default=["paper", "2d"], choices=["paper", "2d"])
    parser.add_argument("--amp", nargs="+", default=["none", "bf16"], choices=["none", "bf16"],
                        help="precisions to time (each script's --amp)")
    parser.add_argument("--seconds", type=float, default=5.0,
                        help="minimum timing window per measurement")
    options = parser.parse_args()
    device = common.pick_device(options.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    rates = {"fp32": matmul_rate(device, torch.float32),
             "bf16": matmul_rate(device, torch.bfloat16)}
    result = {"device": name, "torch": torch.__version__, "threads": torch.get_num_threads(),
              "matmul_tflops_fp32": rates["fp32"] / 1e12,
              "matmul_tflops_bf16": rates["bf16"] / 1e12, "rows": []}
    for method in options.methods:
        for config in options.configs:
            for amp in options.amp:
                print(f"{method} {config} {amp} ...", flush=True)
                result["rows"].append(measure(method, config, amp, device, rates, options.seconds))
            if options.out:
                with open(options.out, "w") as f:
                    json.dump(result, f, indent=2)
    print_table(result)


if __name__ == "__main__":
    common.run_cli(main)
