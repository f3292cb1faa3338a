"""Speed of every method against its FLOP floor: one command, each row printed (and written to
--out) as it finishes, a table last; a row that fails is recorded and the others go on.

    python benchmarks/bench.py                # the GPU when there is one: every config timed
    python benchmarks/bench.py --device cpu   # a few minutes: 2D timed, paper configs counted
    python benchmarks/bench.py --device cpu --overhead   # the overhead ratio at paper widths

For each method at its paper image configuration (DA-EBM MNIST, CDRL CIFAR-10, DCD CelebA, each
script's own PRESETS) and at its 2D quick-start configuration:
- flops: matrix-multiply and convolution FLOPs of one training iteration (the method's step
  function: samplers, loss, backward, optimizer), counted with torch.utils.flop_counter's formulas
  on the meta device (shapes only, so paper scale is counted in seconds on any machine);
- variants: eager fp32, eager bf16 (`--amp bf16` of the scripts), compiled fp32 and compiled bf16
  (`--compile`), each timed (compilation happens in the warm-up, outside the timing), and for the
  image configurations compiled bf16 with `--channels-last` ("NHWC");
- it/s: training iterations per second on the device (synthetic data of the right shape, after
  warm-up), and the achieved TFLOP/s = flops x it/s;
- floor: the share of the device's own measured matrix-multiply rate (fp32, or bf16 for the --amp
  bf16 rows) that this achieves (1.0 = the iteration runs at the speed of one large matmul);
- sampler: the post-training sampler's throughput (CDRL and DCD: samples/s of `sample`; DA-EBM: MGMS
  chain-transitions/s of --sample-chains chains, since the transitions a kept sample needs depend
  on the trained model) and the minutes 50,000 samples take at that rate (DA-EBM: assuming 2,500
  transitions per kept sample, the figure issue 13 gives for a trained MNIST model, not ours);
- peak GPU memory of the training iterations (CUDA only).
On a CPU the paper configurations are counted but not timed (one iteration takes many minutes
there).

--memory: each paper configuration's training iteration counted on the meta device (PeakBytes):
the peak of the bytes its operators' outputs hold at once, the floor of the GPU memory it needs
beside the parameters, their gradients and the optimizer state.

--overhead: for each method at its paper widths and a batch small enough for a CPU, the iteration
time against the time of the network passes it must do. The passes are counted while one iteration
runs (every call of the energy network, and of CDRL's initializer, with its input shape and whether
an input gradient or a parameter gradient follows), then each kind is timed in isolation; ratio =
(sum of the isolated passes) / (iteration time), 1.0 meaning no time outside the network passes.
"""
import argparse
import contextlib
import json
import os
import sys
import time
import weakref

import torch
from torch.nn.utils import parametrize
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


DAEBM_TRANSITIONS_PER_SAMPLE = 2500  # issue 13's figure for a trained MNIST model (not measured)
# variant -> (--amp, --compile, --channels-last)
VARIANTS = {"eager fp32": ("none", False, False), "eager bf16": ("bf16", False, False),
            "compiled fp32": ("none", True, False), "compiled bf16": ("bf16", True, False),
            "compiled bf16 NHWC": ("bf16", True, True)}


def method_args(method: str, config: str, amp: str = "none", compile: bool = False,
                channels_last: bool = False):
    dataset = PAPER_DATASET[method] if config == "paper" else METHODS[method].Args().dataset
    return METHODS[method].Args(dataset=dataset, device="cpu", amp=amp, compile=compile,
                                channels_last=channels_last)


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
    step.optimizers = opts if method == "cdrl" else (optimizer,)
    return model, step


class PeakBytes(TorchDispatchMode):
    """The peak of the bytes held by the storages that operators create while it is open, each
    storage freed when the last tensor on it dies (run on the meta device: the activations,
    gradients and sampler states of a paper-scale iteration, without the allocator's caching,
    fragmentation or cuDNN workspaces, and without the tensors made before it opened)."""

    def __init__(self):
        super().__init__()
        self.live, self.peak, self.storages = 0, 0, {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(tensor, torch.Tensor):
                key = tensor.untyped_storage()._cdata
                if key not in self.storages:
                    self.storages[key] = [tensor.untyped_storage().nbytes(), 0]
                    self.live += self.storages[key][0]
                    self.peak = max(self.peak, self.live)
                self.storages[key][1] += 1
                weakref.finalize(tensor, self.release, key)
        return out

    def release(self, key):
        entry = self.storages[key]
        entry[1] -= 1
        if entry[1] == 0:
            self.live -= entry[0]
            del self.storages[key]


def peak_bytes(method: str, args) -> dict:
    """One training iteration counted on the meta device: the peak of its live operator outputs,
    and the bytes of the parameters (the gradients take as much again, Adam twice that)."""
    model, step = training_iteration(method, args, torch.device("meta"))
    step()  # the first creates the gradients and optimizer state: counted in the next
    with PeakBytes() as counter:
        step()
    return {"activations_gib": counter.peak / 2 ** 30,
            "parameters_gib": sum(p.numel() * p.element_size() for p in model.parameters())
            / 2 ** 30}


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


def matmul_rate(device, dtype, per_call: int = 20) -> float:
    """FLOP/s of a square matrix multiply, the device's practical matmul ceiling for that dtype
    ("fp32" on CUDA is TF32, as pick_device sets it for training). `per_call` products between
    two synchronisations, so that the wait for the device does not understate the rate."""
    n = 4096 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)

    def products():
        for _ in range(per_call):
            a @ b
    return per_call * 2 * n ** 3 * time_it(products, device, min_seconds=1.0)


def sampler_throughput(method: str, model, args, device, min_seconds: float):
    """(value, unit, minutes for 50,000 samples): samples/s of the public sampler, or MGMS
    chain-transitions/s for DA-EBM."""
    module = METHODS[method]
    model.eval()
    if method == "daebm":
        n = args.sample_chains
        x = torch.randn((n,) + module.sample_shape(args), device=device)
        t = torch.randint(0, args.num_levels + 1, (n,), device=device)
        rate = n * time_it(lambda: daebm.mgms_transition(model, x, t, args, True), device,
                           min_seconds, warmup=1)
        return rate, "chain-transitions/s", 50_000 * DAEBM_TRANSITIONS_PER_SAMPLE / rate / 60
    n = args.sample_batch
    rate = n * time_it(lambda: module.sample(model, n, args, device), device, min_seconds,
                       warmup=1)
    return rate, "samples/s", 50_000 / rate / 60


def measure(method: str, config: str, variant: str, device, rates: dict, min_seconds: float,
            make_args=None, timed_on_cpu: bool = False) -> dict:
    """One row: FLOPs counted in fp32 (the same operations run in bf16), the rest timed.
    make_args(method, config, amp, compile, channels_last) builds the Args (default method_args);
    paper configurations are timed on a CPU only with timed_on_cpu."""
    make_args = make_args or method_args
    args = make_args(method, config, *VARIANTS[variant])
    rate = rates["bf16" if args.amp == "bf16" else "fp32"]
    row = {"method": method, "config": config, "dataset": args.dataset, "batch": args.batch_size,
           "variant": variant,
           "flops_per_iteration": count_flops(method, make_args(method, config,
                                                                *VARIANTS["eager fp32"]))}
    if device.type == "cpu" and config == "paper" and not timed_on_cpu:
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
    row["sampler"], row["sampler_unit"], row["minutes_for_50k_samples"] = sampler_throughput(
        method, model, args, device, min_seconds)
    return row


# paper widths, batches small enough for a CPU (one pass of the energy network still >= 50 ms)
OVERHEAD_BATCH = {"daebm": 16, "cdrl": 8, "dcd": 32}


def networks(method: str, model):
    return [model.ebm, model.initializer] if method == "cdrl" else [model.net]


class RecordPasses:
    """Counts the network passes while it is open: (network, input shapes, what follows) -> count,
    with the first call's inputs kept to replay it. What follows: 'input-grad' when the input
    requires grad (a sampler's energy_and_grad), 'param-grad' when grad mode is on otherwise (a
    loss), 'none' under no_grad."""

    def __init__(self, nets):
        self.nets, self.counts, self.inputs, self.handles = nets, {}, {}, []

    def hook(self, index):
        def record(module, inputs):
            tensors = [a for a in inputs if isinstance(a, torch.Tensor)]
            follows = ("input-grad" if tensors[0].requires_grad else
                       "param-grad" if torch.is_grad_enabled() else "none")
            key = (index, tuple(tuple(a.shape) for a in tensors), follows, module.training)
            self.counts[key] = self.counts.get(key, 0) + 1
            self.inputs.setdefault(key, [a.detach().clone() if isinstance(a, torch.Tensor)
                                         else [c.detach().clone() for c in a] if
                                         isinstance(a, list) else a for a in inputs])
        return record

    def __enter__(self):
        self.handles = [net.register_forward_pre_hook(self.hook(i))
                        for i, net in enumerate(self.nets)]
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


def isolated_pass(net, inputs, follows: str):
    """A closure that replays one recorded pass and what followed it."""
    def run():
        x = inputs[0].detach().requires_grad_(follows == "input-grad")
        with torch.set_grad_enabled(follows != "none"), parametrize.cached() if not net.training \
                else contextlib.nullcontext():
            out = net(x, *inputs[1:])
            if follows == "input-grad":
                torch.autograd.grad(out.sum(), x)
            elif follows == "param-grad":
                out.sum().backward()
    return run


def overhead_row(method: str, device, min_seconds: float) -> dict:
    args = method_args(method, "paper")
    args.batch_size = OVERHEAD_BATCH[method]
    if method == "daebm":
        args.n_chains = 4 * args.batch_size
    model, step = training_iteration(method, args, device)
    step()  # warm-up
    gibbs_inputs = []  # DA-EBM's Gibbs draw calls the net's halves directly: count it as a whole
    if method == "daebm":
        model.all_levels_logits = lambda x: (gibbs_inputs.append(x.detach().clone()),
                                             type(model).all_levels_logits(model, x))[1]
    with RecordPasses(networks(method, model)) as recorder:
        step()
    if method == "daebm":
        del model.all_levels_logits
    iteration = 1 / time_it(step, device, min_seconds, warmup=0)
    nets = networks(method, model)
    passes, slowest = 0.0, 0.0
    for x in gibbs_inputs[:1]:
        with torch.no_grad():
            seconds = 1 / time_it(lambda: model.all_levels_logits(x), device, min_seconds / 4,
                                  warmup=1)
        passes += len(gibbs_inputs) * seconds
    for key, count in recorder.counts.items():
        net = nets[key[0]]
        net.train(key[3])
        seconds = 1 / time_it(isolated_pass(net, recorder.inputs[key], key[2]), device,
                              min_seconds / 4, warmup=1)
        passes += count * seconds
        slowest = max(slowest, seconds)
    model.train()
    return {"method": method, "dataset": args.dataset, "batch": args.batch_size,
            "iteration_s": iteration, "passes_s": passes, "ratio": passes / iteration,
            "longest_pass_s": slowest, "pass_kinds": len(recorder.counts) + len(gibbs_inputs[:1]),
            "passes": sum(recorder.counts.values()) + len(gibbs_inputs)}


def overhead_table(methods, device, out):
    rows = []
    for method in methods:
        print(f"{method} overhead ...", flush=True)
        rows.append(overhead_row(method, device, min_seconds=3.0))
        if out:
            with open(out, "w") as f:
                json.dump({"device": str(device), "rows": rows}, f, indent=2)
    print(f"\n{'method':<7}{'dataset':<9}{'batch':>6}{'passes':>8}{'iteration s':>13}"
          f"{'passes s':>10}{'ratio':>7}{'longest pass s':>16}")
    for row in rows:
        print(f"{row['method']:<7}{row['dataset']:<9}{row['batch']:>6}{row['passes']:>8}"
              f"{row['iteration_s']:>13.3f}{row['passes_s']:>10.3f}{row['ratio']:>7.2f}"
              f"{row['longest_pass_s']:>16.3f}")


HEADER = (f"{'method':<7}{'config':<7}{'variant':<19}{'dataset':<14}{'batch':>6}{'TFLOP/it':>11}"
          f"{'it/s':>9}{'TFLOP/s':>9}{'floor':>7}{'peak GiB':>9}{'50k min':>9}  sampler")


def row_line(row: dict) -> str:
    """One row of the table: a timed row, a counted-only row, or a row that failed."""
    start = f"{row['method']:<7}{row['config']:<7}{row['variant']:<19}"
    if "error" in row:
        return start + f"failed: {row['error']}"
    timed = "it_per_s" in row
    return (start + f"{row['dataset']:<14}{row['batch']:>6}"
            f"{row['flops_per_iteration'] / 1e12:>11.4g}"
            + (f"{row['it_per_s']:>9.3g}{row['tflops_achieved']:>9.3g}"
               f"{row['floor_fraction']:>7.1%}" if timed else f"{'-':>9}{'-':>9}{'-':>7}")
            + (f"{row['peak_memory_gib']:>9.2f}" if "peak_memory_gib" in row else f"{'-':>9}")
            + (f"{row['minutes_for_50k_samples']:>9.3g}  {row['sampler']:.4g} "
               f"{row['sampler_unit']}" if timed else f"{'-':>9}  {row['timed']}"))


def print_table(result: dict):
    print(f"\ndevice: {result['device']}; measured matmul rate fp32 "
          f"{result['matmul_tflops_fp32']:.3f}, bf16 {result['matmul_tflops_bf16']:.3f} TFLOP/s")
    print(HEADER)
    for row in result["rows"]:
        print(row_line(row))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--out", default=None, help="JSON file for the results")
    parser.add_argument("--methods", nargs="+", default=sorted(METHODS), choices=sorted(METHODS))
    parser.add_argument("--configs", nargs="+", default=["paper", "2d"], choices=["paper", "2d"])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                        metavar="VARIANT", help=f"variants to time: {', '.join(VARIANTS)}")
    parser.add_argument("--seconds", type=float, default=3.0,
                        help="minimum timing window per measurement")
    parser.add_argument("--overhead", action="store_true",
                        help="measure the overhead ratio instead (see the docstring)")
    parser.add_argument("--memory", action="store_true",
                        help="count each paper configuration's peak memory instead (docstring)")
    options = parser.parse_args(argv)
    device = common.pick_device(options.device)
    if options.overhead:
        return overhead_table(options.methods, device, options.out)
    if options.memory:
        for method in options.methods:
            args = method_args(method, "paper")
            counted = peak_bytes(method, args)
            print(f"{method:<7}{args.dataset:<9}batch {args.batch_size:>4}: live activations "
                  f"{counted['activations_gib']:.2f} GiB at the peak, parameters "
                  f"{counted['parameters_gib']:.3f} GiB", flush=True)
        return None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    rates = {"fp32": matmul_rate(device, torch.float32),
             "bf16": matmul_rate(device, torch.bfloat16)}
    result = {"device": name, "torch": torch.__version__, "threads": torch.get_num_threads(),
              "matmul_tflops_fp32": rates["fp32"] / 1e12,
              "matmul_tflops_bf16": rates["bf16"] / 1e12, "rows": []}
    # a compiled row that hit the recompile limit would run eager while labelled compiled: fail it
    torch._dynamo.config.fail_on_recompile_limit_hit = True
    print(HEADER, flush=True)
    for method in options.methods:
        for config in options.configs:
            for variant in options.variants:
                if config == "2d" and VARIANTS[variant][2]:
                    continue  # an MLP has no convolution weights to lay out
                torch._dynamo.reset()  # each row compiles its own model from a clean state
                try:
                    row = measure(method, config, variant, device, rates, options.seconds)
                except Exception as error:  # e.g. no C compiler or Triton for --compile here
                    row = {"method": method, "config": config, "variant": variant,
                           "error": f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"
                           if str(error) else type(error).__name__}
                result["rows"].append(row)
                print(row_line(row), flush=True)  # each row as it finishes, and the JSON
                if options.out:
                    with open(options.out, "w") as f:
                        json.dump(result, f, indent=2)
    print_table(result)


if __name__ == "__main__":
    common.run_cli(main)
