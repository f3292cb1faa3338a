"""DA-EBM: Persistently Trained, Diffusion-assisted Energy-based Models (Zhang, Ou, Tan 2023, arXiv
2304.10707).

One network f(x, t) defines a joint EBM over data and diffusion step, p(x, t) ∝ exp(-U(x, t)) with
U = -f and t ∈ {0..T}. The positive samples are "diffusion data": t ~ Uniform{0..T} and
x_t = sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) ε (t = 0 is clean data). The negatives come from persistent
chains over (x, t) that are never re-initialised; each training step draws a batch of chains and
moves them by one MGMS transition: K Langevin steps on x at fixed t (Metropolis-adjusted once
switched on, per-level step sizes adapted toward 0.6-0.8 acceptance), then one exact Gibbs draw of t
from softmax_t f(x, t) over all levels. The loss is mean U(positives) - mean U(negatives)
(persistent contrastive divergence on the joint model). The high-noise levels mix fast and carry the
chains between modes, which keeps persistent training stable where plain persistent EBMs diverge.
After training, samples are chains started from noise at t = T and kept at their M-th visit to t =
0; the energy at t = 0 scores OOD inputs.

Deliberate differences from the official code (github.com/XinweiZhang/DAEBM):
1. Correct MALA ratio: reverse-proposal term -ξ + (s/2)(∇U(x) + ∇U(x')); the official s²/2 is not
   the MH ratio of its own proposal (`--official-mh-ratio` reproduces it).
2. Step-size adaptation averages the MH acceptance probability over the chains at each level in
   the window (sum / count); the official code averages per-iteration level means, empty levels 0.
3. The learning-rate schedule is a per-iteration function of the step (warm-up, then the paper's
   decay as fractions of --steps), not stepped once per epoch.
4. The warm-up is the paper's (2D 500 of 100,000; images 6,000 of 120,000) scaled by --steps / that
   length; the MH start and the adaptation interval are the paper's, unscaled: scaled, short runs
   diverged (docs/RESULTS.md, DA-EBM quick start and "the MH start is not scaled").
5. Data: shuffled epochs of an in-memory tensor (`common.EpochLoader`); the 2D training set is
   50,000 points drawn once, as in the official toy script.
6. Optional EMA (`--ema-decay`, off as official): when on, "ema" in the checkpoint samples and
   evaluates; the persistent chains always use the trained weights.
7. The long-run check also reports numbers (mean energy at t = 0, RMS drift), not only pictures.
8. CIFAR-10/100, SVHN, CelebA and folders use the MNIST configuration with 3 channels.
9. The 2D quick start trains 20,000 iterations (paper 100,000: `--steps 100000`).
10. At the end of a run, final samples and the long-run check cost at most what training did
   (--steps transitions, --steps x K MALA steps); `eval_fid_ood.py` and `sample` are unbounded.
11. Post-training sampler: 1,000 chains for images (official 100), kept on the model between
   `sample` calls, so 50,000 samples in batches cost the transitions of one run.
12. The 2D net's softplus is written as log(1 + e^x), F.softplus to float rounding, for CPU speed.
13. Under torchrun the persistent chains are split over the ranks, each drawing its share of the
   batch from its own rows; step sizes adapt on the acceptance summed over all ranks.
14. `--preset cpu`: a reduced MNIST configuration (width 32, T = 10, K = 15, batch 64, 2,000
   iterations, lr 1e-4) with the official annealed sampler: early in such a run no MGMS chain from
   noise reached t = 0 (docs/RESULTS.md).
"""
import copy
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Literal, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

import common

# Per-dataset defaults of the fields left at None: "2d" for the toys (the paper's rings
# configuration), "images" for every image set (the paper's MNIST configuration, docstring item 8).
# paper = arXiv 2304.10707; official = github.com/XinweiZhang/DAEBM.
PRESETS = {
    "2d": {
        "steps": 20_000,  # ours, a quick start (paper 100,000; docstring item 9)
        "batch_size": 100,  # paper
        "lr": 5e-4,  # paper
        "sample_every": 5000,  # ours
        "save_every": 10_000,  # ours
        "num_levels": 6,  # paper
        "beta_start": 1e-2,  # paper
        "beta_end": 3e-1,  # paper
        "n_chains": 10_000,  # paper
        "mh_start": 500,  # paper: one epoch (not scaled, docstring item 4)
        "adapt_every": 500,  # official: once per epoch (not scaled, docstring item 4)
        "warmup_steps": 500,  # official (scaled, docstring item 4)
        "lr_schedule": "multistep",  # official
        "long_run_steps": 10_000,  # ours
        "sample_chains": 256,  # ours
        "langevin_steps": 40,  # paper
        "visits_to_keep": 50,  # paper
        "sampler": "mgms",  # paper
    },
    "images": {
        "steps": 120_000,  # paper: 200 epochs x 600 iterations
        "batch_size": 200,  # paper
        "lr": 1e-5,  # paper
        "sample_every": 2000,  # ours
        "save_every": 10_000,  # ours
        "num_levels": 50,  # paper
        "beta_start": 2e-4,  # paper
        "beta_end": 2e-2,  # paper
        "n_chains": 50_000,  # paper
        "mh_start": 6000,  # paper: 10 epochs (not scaled, docstring item 4)
        "adapt_every": 100,  # official (not scaled, docstring item 4)
        "warmup_steps": 6000,  # official (scaled, docstring item 4)
        "lr_schedule": "linear",  # official
        "long_run_steps": 100_000,  # paper
        "sample_chains": 1000,  # ours (official post-sampling 100; docstring item 11)
        "langevin_steps": 40,  # paper
        "visits_to_keep": 50,  # paper
        "sampler": "mgms",  # paper
        "channels": 128,  # official
        "channel_mult": (1, 2, 2, 2),  # official
    },
    # --preset cpu: the reduced MNIST configuration that trains in about 2 hours on one core of
    # this project's 2-core CPU (docs/RESULTS.md, image results); over "images" for every field it
    # names. "ours: CPU budget" = chosen so that training and a 10,000-sample FID fit that budget.
    "cpu": {
        "steps": 2000,  # ours: CPU budget (paper 120,000)
        "batch_size": 64,  # ours: CPU budget (paper 200)
        "lr": 1e-4,  # ours: 10x the paper's for a run 1/40 as long
        "sample_every": 500,  # ours
        "save_every": 1000,  # ours
        "num_levels": 10,  # ours: CPU budget (paper 50)
        "beta_start": 1e-2,  # ours: with T = 10, sqrt(ᾱ_t) within 0.071 of the paper's schedule
        "beta_end": 0.16,  # at its levels 5t (tests/test_daebm.py)
        "n_chains": 1000,  # ours: ~130 transitions per chain over the run (paper ~480)
        "mh_start": 400,  # ours: after the warm-up (the paper's 6,000 is past the run's end)
        "warmup_steps": 100,  # ours: the paper's 5% of the run (scaled as the paper's)
        "langevin_steps": 15,  # ours: CPU budget (paper 40)
        "visits_to_keep": 1,  # ours: CPU budget (paper 50): a sample is a chain's first visit
        # ours: the official code's other sampler, K MALA steps per level from T to 0 (bounded
        # cost); after 500 of the 2,000 iterations no MGMS chain from noise reached t = 0 within
        # 200 transitions (docs/RESULTS.md, image results)
        "sampler": "annealed",
        "long_run_steps": 1000,  # ours: CPU budget (paper 100,000; eval_fid_ood.py --long-run)
        "sample_chains": 500,  # ours
        "channels": 32,  # ours: CPU budget (official 128)
        "channel_mult": (1, 2, 2),  # ours: CPU budget (official 1 2 2 2)
    },
}
# The run lengths the schedules above belong to: a preset warmup_steps is scaled by --steps / this,
# so that a shorter run spends the same fraction of itself warming up (docstring item 4).
PAPER_STEPS = {"2d": 100_000, "images": 120_000, "cpu": PRESETS["cpu"]["steps"]}


@dataclass
class Args(common.RunArgs):
    # the shared settings (run, data, lifecycle, speed, FID) are common.RunArgs's; here the
    # method's defaults of a few of them, then its own
    exp_name: str = "daebm"
    """name used in the run folder"""
    dataset: str = "rings"
    """rings | 8gaussians | checkerboard | swissroll | pinwheel | 2spirals | mnist | fashionmnist |
    cifar10 | cifar100 | svhn | celeba | folder:PATH (images) | points:PATH (2D, .npy or .csv)"""
    ema_decay: float = 0.0
    """EMA decay of the weights for sampling and evaluation; 0 = no EMA (the official code has
    none)"""

    # ---- DA-EBM ----
    num_levels: Optional[int] = None
    """T: diffusion steps above the data"""
    beta_start: Optional[float] = None
    """b1 of the sqrtcumlinear schedule β_t = (cumsum linspace(b1, b2, T))²"""
    beta_end: Optional[float] = None
    """b2 of the schedule"""
    n_chains: Optional[int] = None
    """persistent chains (--batch-size of them are the negatives of an iteration)"""
    langevin_steps: Optional[int] = None
    """K: Langevin steps at fixed t in one MGMS transition"""
    init_step_size: float = 0.1
    """initial Langevin step size s_t (images: s_t = 0.1; 2D: s_t = 0.1 sqrt(β_t) with s_0 = s_1)"""
    mh_start: Optional[int] = None
    """iteration at which the Metropolis-Hastings correction is switched on (default: the paper's,
    whatever --steps)"""
    adapt_every: Optional[int] = None
    """iterations between step-size adaptations toward 0.6-0.8 acceptance (default: the paper's,
    whatever --steps)"""
    official_mh_ratio: bool = False
    """use the official code's (incorrect) MALA ratio, with s²/2 in the reverse proposal"""
    warmup_steps: Optional[int] = None
    """linear learning-rate warm-up (default: the paper's times --steps / the paper's run
    length)"""
    lr_schedule: Optional[Literal["linear", "multistep"]] = None
    """'linear': constant to 60% of --steps, then linear decay; 'multistep': x0.1 at 70/80/90% (a
    run extended with --resume --steps follows the new schedule from where it stands)"""
    adam_beta1: float = 0.0
    """Adam β1 (paper: 0)"""
    adam_beta2: float = 0.999
    """Adam β2"""
    channels: Optional[int] = None
    """image net base width"""
    channel_mult: Optional[Tuple[int, ...]] = None
    """image net width multipliers per resolution (average-pool between them)"""
    mlp_width: int = 128
    """2D net hidden width"""
    image_size: Optional[int] = None
    """folder: datasets are resized to this (default: the first image's size)"""
    image_channels: Optional[int] = None
    """set from the dataset; stored so build_model can rebuild the net from a checkpoint"""
    sampler: Optional[Literal["mgms", "annealed"]] = None
    """post-training sampler: 'mgms' = the paper's (chains from t = T kept at their M-th visit to
    t = 0); 'annealed' = K Langevin steps at each t from T down to 0"""
    visits_to_keep: Optional[int] = None
    """M: a post-training chain is kept at its M-th visit to t = 0"""
    sample_chains: Optional[int] = None
    """parallel chains of the post-training sampler (2D: also the points of the final picture and of
    the long-run check)"""
    max_transitions: int = 100000
    """post-training sampler gives up after this many MGMS transitions"""
    final_samples: bool = True
    """after training, draw samples_<sampler>.png with the post-training sampler (MGMS: bounded by
    --steps transitions, the cost of training at most); --no-final-samples skips it"""
    long_run_steps: Optional[int] = None
    """MALA steps at t = 0 from real data after training (at most --steps x --langevin-steps); 0 =
    skip"""
    n_grid: int = 64
    """images in each sample grid"""

    def __post_init__(self):
        common.check_dataset_name(self.dataset)
        scale_warmup = self.warmup_steps is None
        common.apply_presets(self, PRESETS)
        if scale_warmup:
            kind = self.preset or ("2d" if common.is_2d(self.dataset) else "images")
            run_length = self.steps / PAPER_STEPS[kind]
            self.warmup_steps = max(1, round(self.warmup_steps * run_length))
        common.set_image_shape(self)
        if self.channel_mult is not None:  # images only
            self.channel_mult = tuple(self.channel_mult)
        common.check_positive(self, ["n_chains", "langevin_steps", "adapt_every", "num_levels",
                                     "visits_to_keep", "sample_chains", "max_transitions"])
        common.require(
            (self.init_step_size > 0, f"--init-step-size must be positive, got "
             f"{self.init_step_size}"),
            (self.n_chains >= self.batch_size, f"--n-chains {self.n_chains} is smaller than "
             f"--batch-size {self.batch_size}"))


common.show_preset_defaults(Args, PRESETS)


# ==================================================================================================
# NETWORK
# ==================================================================================================
def sinusoidal_embedding(time: torch.Tensor, dim: int) -> torch.Tensor:
    """DDPM / tensor2tensor sinusoidal embedding of the (integer) diffusion step."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000)
                      * torch.arange(half, device=time.device, dtype=torch.float32) / (half - 1))
    angles = time.float()[:, None] * freqs[None]
    return torch.cat([angles.sin(), angles.cos()], 1)


def per_level(op, a, b):
    """op(a, b) where b may have L times a's rows: a's rows at L levels, level-major (the Gibbs
    draw's pass over all levels); broadcast, so that a is not copied L times."""
    if len(a) == len(b):
        return op(a, b)
    return op(a.unsqueeze(0), b.view(-1, *a.shape[:1], *b.shape[1:])).flatten(0, 1)


class ResBlock(nn.Module):
    """act -> conv -> + Linear(act(temb)) as a per-channel bias -> act -> conv; 3x3 conv
    shortcut."""

    def __init__(self, c_in: int, c_out: int, temb_dim: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.temb_proj = nn.Linear(temb_dim, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.shortcut = nn.Conv2d(c_in, c_out, 3, padding=1) if c_in != c_out else nn.Identity()

    def forward(self, x, bias, first_conv=None):
        """first_conv: conv1(act(x)) when the caller has it (it does not depend on t). bias may
        have L times x's rows (all_levels_logits): x's rows at L levels."""
        h = self.conv1(F.silu(x)) if first_conv is None else first_conv
        # .to: an fp32 table would promote bf16 (--amp)
        h = per_level(torch.add, h, bias[:, :, None, None].to(h.dtype))
        h = self.conv2(F.silu(h))
        return per_level(torch.add, self.shortcut(x), h)


class ResNetTemb(nn.Module):
    """The official image net: one ResBlock per resolution, average-pool down, SiLU, no
    normalisation.

    Output f(x, t) = <sum-pool(act(h)), Linear(act(temb))>. A 28x28 input is padded to 32 by the
    first conv (padding 3), as in the official code. Everything that depends on t alone is computed
    once per level (`level_table`) and indexed per row, which gives the same numbers as computing it
    per row. What does not depend on t (the input conv and the first block's first conv, about a
    fifth of a pass) is `features`, computed once per x by the Gibbs draw over all levels and
    broadcast over them (per_level).
    """

    def __init__(self, in_channels: int, image_size: int, ch: int, ch_mult: Tuple[int, ...],
                 num_levels: int):
        super().__init__()
        self.ch, self.num_levels = ch, num_levels
        temb_dim = 4 * ch
        self.temb_dense = nn.Sequential(nn.Linear(ch, temb_dim), nn.SiLU(),
                                        nn.Linear(temb_dim, temb_dim))
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=3 if image_size == 28 else 1)
        widths = [ch] + [ch * m for m in ch_mult]
        self.blocks = nn.ModuleList(ResBlock(widths[i], widths[i + 1], temb_dim)
                                    for i in range(len(ch_mult)))
        self.temb_final = nn.Linear(temb_dim, widths[-1])

    def level_table(self):
        """Per level t = 0..T: each block's per-channel bias and the final projection."""
        levels = torch.arange(self.num_levels + 1, device=self.conv_in.weight.device)
        temb_act = F.silu(self.temb_dense(sinusoidal_embedding(levels, self.ch)))
        return [block.temb_proj(temb_act) for block in self.blocks] + [self.temb_final(temb_act)]

    def features(self, x):
        h = self.conv_in(x)
        return h, self.blocks[0].conv1(F.silu(h))

    def forward(self, x, t, table=None):
        return self.from_features(self.features(x), t, table)

    def from_features(self, features, t, table=None):
        table = [c[t] for c in (self.level_table() if table is None else table)]
        h, first_conv = features
        for i, block in enumerate(self.blocks):
            h = block(h, table[i], first_conv if i == 0 else None)
            if i < len(self.blocks) - 1:
                h = F.avg_pool2d(h, 2)
        h = F.silu(h).sum((2, 3))
        return (h * table[-1]).sum(1)


def softplus(x):
    """log(1 + e^x), and x itself above 20 (F.softplus's threshold): the same function as
    F.softplus to float rounding, with the exact sigmoid as its gradient. Written out because
    F.softplus calls log1p, which has no vectorised CPU kernel: this form makes the 2D iteration
    about 15% (eager) to 25% (compiled) faster on a CPU (docs/RESULTS.md)."""
    return torch.where(x > 20, x, torch.log(1 + torch.exp(x.clamp(max=40))))  # e^40 is finite


class GatedMLP(nn.Module):
    """The official 2D net (ToyTembModel): 3 hidden layers, Softplus, each gated by a projection of
    temb."""

    def __init__(self, width: int, num_levels: int):
        super().__init__()
        self.width, self.num_levels = width, num_levels
        self.temb_dense = nn.Sequential(nn.Linear(width, width), nn.Softplus(),
                                        nn.Linear(width, width))
        self.lin1 = nn.Linear(2, width)
        self.lin2, self.lin3 = nn.Linear(width, width), nn.Linear(width, width)
        self.gate1, self.gate2, self.gate3 = (nn.Linear(width, width) for _ in range(3))
        self.out = nn.Linear(width, 1)

    def level_table(self):
        """Per level t = 0..T: the three gates."""
        levels = torch.arange(self.num_levels + 1, device=self.out.weight.device)
        temb_act = F.softplus(self.temb_dense(sinusoidal_embedding(levels, self.width)))
        return [self.gate1(temb_act), self.gate2(temb_act), self.gate3(temb_act)]

    def features(self, x):
        """The part of a pass that does not depend on t."""
        return (self.lin1(x),)

    def forward(self, x, t, table=None):
        return self.from_features(self.features(x), t, table)

    def from_features(self, features, t, table=None):
        gate1, gate2, gate3 = (c[t] for c in (self.level_table() if table is None else table))
        h = softplus(per_level(torch.mul, features[0], gate1))  # official order: gate inside
        h = softplus(self.lin2(h)) * gate2  # the first act, outside the second and third
        h = softplus(self.lin3(h)) * gate3
        return self.out(h).squeeze(1)


def kaiming_init(net: nn.Module):
    """Official initialisation: Kaiming-normal fan-in (gain 1 for SiLU/Softplus), zero biases."""
    for m in net.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="linear")
            nn.init.zeros_(m.bias)
    return net


class DAEBM(nn.Module):
    """The net f(x, t) plus everything the samplers need as buffers: the schedule and adapted step
    sizes."""

    def __init__(self, net: nn.Module, num_levels: int, beta_start: float, beta_end: float,
                 step_size, amp: bool = False, compile_sampler: bool = False):
        super().__init__()
        self.net, self.amp, self.compile_sampler = net, amp, compile_sampler
        self.num_levels = num_levels
        betas, sqrt_alpha_bar = sqrtcumlinear_schedule(num_levels, beta_start, beta_end)
        self.register_buffer("betas", betas.float())
        self.register_buffer("sqrt_alpha_bar", sqrt_alpha_bar.float())
        self.register_buffer("sqrt_one_minus_alpha_bar", (1 - sqrt_alpha_bar ** 2).sqrt().float())
        self.register_buffer("step_size", step_size.float())

    def energy(self, x, t, table=None):
        """U(x, t) = -f(x, t), one value per row; `table` = net.level_table() when the caller has
        it."""
        return -self.net_output(x, t, table)

    def net_output(self, x, t, table=None):
        """f(x, t) in fp32, the network's passes in bf16 when --amp bf16."""
        with common.autocast_bf16(self.amp, x.device.type):
            return self.net(x, t, table).float()

    def all_levels_logits(self, x, max_rows=2048):
        """f(x, t) for every t = 0..T, (B, T+1): the t-independent features once, then the levels
        batched together, at most max_rows rows per pass (all 51 MNIST levels of a 200-chain batch
        in one pass need far more GPU memory: docs/RESULTS.md). The passes take equal shares of
        the levels (to one), so that --compile's one graph serves them all: a last pass of one
        level would be a second graph (torch specialises sizes 0 and 1)."""
        levels_per_pass = max(1, max_rows // len(x))
        passes = -(-(self.num_levels + 1) // levels_per_pass)
        level_pass = common.compiled(levels_logits, self.compile_sampler)
        logits = []
        with common.autocast_bf16(self.amp, x.device.type):
            features, table = self.net.features(x), self.net.level_table()
            for levels in torch.arange(self.num_levels + 1, device=x.device).tensor_split(passes):
                logits.append(level_pass(self.net, features, table, levels))
        return torch.cat(logits).t()


def levels_logits(net: nn.Module, features, table, levels: torch.Tensor) -> torch.Tensor:
    """f(x, t) for each t of `levels` and each of the B rows whose t-independent features are
    given, (L, B); the features broadcast over the levels (per_level), never copied L times."""
    t = levels.repeat_interleave(len(features[0]))
    return net.from_features(features, t, table).float().view(len(levels), -1)


# ==================================================================================================
# NOISE SCHEDULE
# ==================================================================================================
def sqrtcumlinear_schedule(num_levels: int, beta_start: float, beta_end: float):
    """β_1..T = (cumsum(linspace(b1, b2, T)))², β_0 = 0; returns (β_0..T, sqrt(ᾱ_0..T)) in
    float64."""
    linear = torch.linspace(beta_start, beta_end, num_levels, dtype=torch.float64)
    betas = torch.cumsum(linear, 0) ** 2
    betas = torch.cat([torch.zeros(1, dtype=torch.float64), betas.clamp(0, 1)])
    return betas, torch.cumprod(torch.sqrt(1 - betas), 0)


def initial_step_sizes(args, betas: torch.Tensor) -> torch.Tensor:
    """Images: s_t = init_step_size at every level. 2D: s_t = init_step_size * sqrt(β_t), s_0 =
    s_1."""
    if not common.is_2d(args.dataset):
        return torch.full_like(betas, args.init_step_size)
    sizes = args.init_step_size * betas.sqrt()
    sizes[0] = sizes[1]
    return sizes


def diffuse(model: DAEBM, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) ε (eq. of the forward process; t = 0 returns x_0)."""
    return (as_batch(model.sqrt_alpha_bar[t], x0) * x0
            + as_batch(model.sqrt_one_minus_alpha_bar[t], x0) * noise)


def as_batch(per_example: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return per_example.view(-1, *[1] * (like.dim() - 1))


# ==================================================================================================
# SAMPLER
# ==================================================================================================
def energy_and_grad(model: DAEBM, x: torch.Tensor, t: torch.Tensor, table):
    """U(x, t) and its gradient in x, without touching parameter gradients."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        u = model.energy(x, t, table)
        (grad,) = torch.autograd.grad(u.sum(), x)
    return u.detach(), grad


def langevin(model: DAEBM, x, t, n_steps: int, metropolis: bool, official_ratio: bool = False,
             stats=None):
    """n_steps of Langevin on x at fixed t, x' = x - (s_t²/2)∇U + s_t ξ, MALA-corrected when
    `metropolis`.

    The MH log-ratio is U(x) - U(x') - |ξ_rev|²/2 + |ξ|²/2 with ξ_rev = -ξ + (s/2)(∇U(x) + ∇U(x')),
    the standard-normal draw that the reverse proposal x' -> x would need. `stats` = (sum, count)
    tensors of size T+1 that accumulate the acceptance probability per level, on the device (no host
    sync in the loop).
    """
    s = as_batch(model.step_size[t], x)
    reverse_coef = s * s / 2 if official_ratio else s / 2
    with torch.no_grad():
        table = model.net.level_table()  # depends on t only: once per call, not once per step
    grad_pass = common.compiled(energy_and_grad, model.compile_sampler)
    u, grad = grad_pass(model, x, t, table)
    x = x.detach()
    for _ in range(n_steps):
        noise = torch.randn_like(x)
        x_prop = x - 0.5 * s * s * grad + s * noise
        u_prop, grad_prop = grad_pass(model, x_prop, t, table)
        reverse_noise = -noise + reverse_coef * (grad + grad_prop)
        log_ratio = (u - u_prop - 0.5 * reverse_noise.flatten(1).pow(2).sum(1)
                     + 0.5 * noise.flatten(1).pow(2).sum(1))
        accept_prob = log_ratio.clamp(max=0).exp()
        if stats is not None:
            stats[0].index_add_(0, t, accept_prob)
            stats[1].index_add_(0, t, torch.ones_like(accept_prob))
        if metropolis:
            accept = torch.rand_like(accept_prob) < accept_prob
            mask = accept.view(s.shape)
            x, grad = torch.where(mask, x_prop, x), torch.where(mask, grad_prop, grad)
            u = torch.where(accept, u_prop, u)
        else:
            x, u, grad = x_prop, u_prop, grad_prop
    return x


@torch.no_grad()
def gibbs_level(model: DAEBM, x):
    """Exact Gibbs draw of t | x from softmax over t of f(x, t), all T+1 levels, by the Gumbel-max
    trick (argmax of logits + Gumbel noise is a softmax draw; unlike Categorical/multinomial it
    never syncs)."""
    logits = model.all_levels_logits(x)
    gumbel = -torch.log(-torch.log(torch.rand_like(logits).clamp_(1e-20, 1.0)))
    return (logits + gumbel).argmax(1)


def mgms_transition(model: DAEBM, x, t, args, metropolis: bool, stats=None):
    """One MGMS transition: K Langevin steps at fixed t, then one Gibbs draw of t."""
    x = langevin(model, x, t, args.langevin_steps, metropolis, args.official_mh_ratio, stats)
    return x, gibbs_level(model, x)


def adapt_step_sizes(model: DAEBM, accept_stats, metropolis: bool):
    """Every --adapt-every iterations: per level, step x 1.1 above 0.8 mean acceptance, / 1.2 below
    0.6 (levels no chain visited keep theirs; only once MH is on), then reset the window. On the
    device, no sync; under torchrun the window is summed over the ranks first, so that every rank
    adapts alike. Returns the window's mean acceptance over all levels."""
    accept_sum, accept_count = accept_stats
    common.sum_over_ranks_(accept_sum, accept_count)
    if metropolis:
        rate = accept_sum / accept_count.clamp_min(1)
        factor = torch.where(rate > 0.8, 1.1, torch.where(rate < 0.6, 1 / 1.2, 1.0))
        model.step_size.mul_(torch.where(accept_count > 0, factor, 1.0))
    window_rate = accept_sum.sum() / accept_count.sum().clamp_min(1)
    accept_sum.zero_()
    accept_count.zero_()
    return window_rate


def chain_pool(model: DAEBM, args, device, step_multiplier: int, n_chains: int) -> dict:
    """The post-training sampler's chains {x, t, visits to t = 0, Langevin steps taken}, kept on
    the model between calls: chains still running when one call has its samples go on in the next,
    so drawing 50,000 samples in batches costs no more transitions than drawing them at once. A
    fresh pool (N(0, I) at t = T) when the weights, step sizes or sampler settings changed: the key
    holds every parameter's and buffer's in-place version counter."""
    key = (n_chains, step_multiplier, sample_shape(args), str(device),
           tuple(v._version for v in model.state_dict(keep_vars=True).values()))
    pool = getattr(model, "chain_pool", None)
    if pool is None or pool["key"] != key:
        pool = {"key": key, "x": torch.randn((n_chains,) + sample_shape(args), device=device),
                "t": torch.full((n_chains,), args.num_levels, device=device, dtype=torch.long),
                "visits": torch.zeros(n_chains, dtype=torch.long, device=device),
                "steps_taken": torch.zeros(n_chains, dtype=torch.long, device=device)}
        model.chain_pool = pool
    return pool


def generate(model: DAEBM, n: int, args, device, step_multiplier: int = 1, max_transitions=None,
             n_chains=None):
    """The paper's post-training sampler: chains start at N(0, I) with t = T and run MGMS
    transitions (MALA on); a chain's x is kept at its M-th visit to t = 0, and that chain restarts
    from noise at t = T. step_multiplier m keeps it at the (m M)-th visit instead (about m times the
    transitions), the evaluator's long-run check. n_chains (default --sample-chains) chains run in
    parallel, persistent across calls (chain_pool). It stops after max_transitions (default m x
    --max-transitions) and prints progress every 30 s.

    Returns (samples (k, ...), Langevin steps each kept chain took (k,)), k = n unless the budget
    ran out.
    """
    pool = chain_pool(model, args, device, step_multiplier, n_chains or args.sample_chains)
    x, t, visits, steps_taken = pool["x"], pool["t"], pool["visits"], pool["steps_taken"]
    kept, kept_steps = [], []
    n_kept = 0
    visits_to_keep = args.visits_to_keep * step_multiplier
    max_transitions = max_transitions or args.max_transitions * step_multiplier
    progress = common.Progress(f"MGMS sampler, chains kept of {n}", n, interval=30, quiet=True)
    for _ in range(max_transitions):
        x, t = mgms_transition(model, x, t, args, metropolis=True)
        steps_taken += args.langevin_steps
        visits += t == 0
        done = visits == visits_to_keep
        # one sync per transition (40 Langevin steps), outside the Langevin loop
        n_done = int(done.sum())
        progress.update(min(n_done, n - n_kept))
        if n_done:
            kept.append(x[done])
            kept_steps.append(steps_taken[done])
            n_kept += n_done
            x[done] = torch.randn_like(x[done])
            t[done], visits[done], steps_taken[done] = args.num_levels, 0, 0
            if n_kept >= n:
                break
    pool.update(x=x, t=t)
    if not kept:
        return x[:0], steps_taken[:0]
    return torch.cat(kept)[:n], torch.cat(kept_steps)[:n]


def annealed_generate(model: DAEBM, n: int, args, device, step_multiplier: int = 1):
    """K MALA steps (m K with step_multiplier m) at each level from t = T down to t = 0, starting
    from N(0, I) (the official p_sample_langevin_progressive). Returns samples (n, ...)."""
    x = torch.randn((n,) + sample_shape(args), device=device)
    progress = common.Progress("annealed sampler, levels", args.num_levels + 1, interval=30,
                               quiet=True)
    for level in range(args.num_levels, -1, -1):
        t = torch.full((n,), level, device=device, dtype=torch.long)
        x = langevin(model, x, t, args.langevin_steps * step_multiplier, metropolis=True,
                     official_ratio=args.official_mh_ratio)
        progress.update(1)
    return x


def long_run(model: DAEBM, x0, n_steps: int, checkpoints, official_ratio=False):
    """MALA at t = 0 from real data for n_steps; at each step count in `checkpoints` record the mean
    energy and the RMS drift from the start (per coordinate). Runs in pieces of at most 1,000 steps
    (the same numbers as one run: a piece starts from the state and random stream where the last
    ended) so that it can print progress. Returns (records, final x)."""
    t = torch.zeros(len(x0), dtype=torch.long, device=x0.device)
    x, done, records = x0, 0, []
    progress = common.Progress("long-run MALA steps", n_steps, interval=30, quiet=True)
    for mark in checkpoints:
        while done < mark:
            piece = min(1000, mark - done)
            x = langevin(model, x, t, piece, metropolis=True, official_ratio=official_ratio)
            done += piece
            progress.update(piece)
        with torch.no_grad():
            records.append({"mala_steps": mark, "mean_energy": model.energy(x, t).mean().item(),
                            "rms_drift": (x - x0).pow(2).mean().sqrt().item()})
    return records, x


# ==================================================================================================
# LOSS
# ==================================================================================================
def daebm_loss(model: DAEBM, x_pos, t_pos, x_neg, t_neg):
    """PCD on the joint model: mean U(positives) - mean U(negatives); its gradient is the
    maximum-likelihood gradient of p(x, t) with the negatives standing in for model samples."""
    u_pos = model.energy(x_pos, t_pos)
    u_neg = model.energy(x_neg, t_neg)
    return u_pos.mean() - u_neg.mean(), u_pos.detach(), u_neg.detach()


def daebm_step(model: DAEBM, x0, chains, args, optimizer, accept_stats, metropolis: bool):
    """One training iteration (official order): a batch of persistent chains, drawn with
    replacement, makes one MGMS transition and is written back (the negatives); the positives are
    fresh diffusion data x_t, t ~ U{0..T}; one Adam step on daebm_loss. Returns detached (loss,
    mean U(pos), mean U(neg), grad norm)."""
    chains_x, chains_t = chains  # this rank's chains and batch under torchrun
    idx = torch.randint(0, len(chains_x), (len(x0),), device=x0.device)
    x_neg, t_neg = mgms_transition(model, chains_x[idx], chains_t[idx], args, metropolis,
                                   accept_stats)
    chains_x[idx], chains_t[idx] = x_neg, t_neg
    t_pos = torch.randint(0, model.num_levels + 1, (len(x0),), device=x0.device)
    x_pos = diffuse(model, x0, t_pos, torch.randn_like(x0))
    loss, u_pos, u_neg = daebm_loss(model, x_pos, t_pos, x_neg, t_neg)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    common.average_gradients(model.parameters())  # torchrun: the global batch's gradient
    grad_norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
    optimizer.step()
    return loss.detach(), u_pos.mean(), u_neg.mean(), grad_norm


def lr_factor(step: int, args) -> float:
    """Multiplier of the base learning rate at iteration `step` (0-based): linear warm-up, then the
    decay."""
    warm = min(1.0, (step + 1) / args.warmup_steps) if args.warmup_steps > 0 else 1.0
    frac = step / args.steps
    if args.lr_schedule == "multistep":
        decay = 0.1 ** sum(frac >= m for m in (0.7, 0.8, 0.9))
    else:  # constant to 60% (72k of 120k), then linear toward 1e-5 of the base rate at the end
        decay = 1.0 if frac < 0.6 else 1.0 - (1 - 1e-5) * (frac - 0.6) / 0.4
    return warm * decay


# ==================================================================================================
# PUBLIC API
# ==================================================================================================
def sample_shape(args):
    if common.is_2d(args.dataset):
        return (2,)
    return (args.image_channels, args.image_size, args.image_size)


def build_model(args) -> DAEBM:
    """The DA-EBM with its schedule and (initial) step sizes as buffers; the net
    Kaiming-initialised."""
    if common.is_2d(args.dataset):
        net = GatedMLP(args.mlp_width, args.num_levels)
    else:
        if args.image_size != 28 and args.image_size % 2 ** (len(args.channel_mult) - 1):
            raise common.UserError(f"image size {args.image_size} is not divisible by "
                                   f"{2 ** (len(args.channel_mult) - 1)} (one halving per "
                                   "--channel-mult entry)")
        net = ResNetTemb(args.image_channels, args.image_size, args.channels,
                         tuple(args.channel_mult), args.num_levels)
    betas, _ = sqrtcumlinear_schedule(args.num_levels, args.beta_start, args.beta_end)
    model = DAEBM(kaiming_init(net), args.num_levels, args.beta_start, args.beta_end,
                  initial_step_sizes(args, betas), amp=args.amp == "bf16",
                  compile_sampler=args.compile)
    return common.memory_layout(model, args.channels_last)


def sample(model: DAEBM, n: int, args, device, step_multiplier: int = 1) -> torch.Tensor:
    """n samples by the post-training sampler named in args.sampler ('mgms' is the paper's), images
    clamped to [-1, 1]; step_multiplier m runs it m times longer (kept at the (m M)-th visit to t =
    0, or m K steps per level when annealed)."""
    model.eval()
    if args.sampler == "annealed":
        samples = annealed_generate(model, n, args, device, step_multiplier).detach()
    else:
        samples, _ = generate(model, n, args, device, step_multiplier)
        if len(samples) < n:
            raise RuntimeError(f"post-training sampler kept {len(samples)}/{n} chains in "
                               f"{args.max_transitions * step_multiplier} transitions; raise "
                               "--max-transitions or lower --visits-to-keep")
    return samples.detach() if common.is_2d(args.dataset) else samples.detach().clamp(-1, 1)


def energy(model: DAEBM, x: torch.Tensor, args) -> torch.Tensor:
    """U(x, t = 0) of clean data; lower = more likely."""
    with torch.no_grad():
        return model.energy(x, torch.zeros(len(x), dtype=torch.long, device=x.device))


# ==================================================================================================
# TRAINING
# ==================================================================================================
# settings that may change on --resume besides common.RESUMABLE (post-training options)
RESUMABLE = common.RESUMABLE | {"long_run_steps", "n_grid", "sampler", "visits_to_keep",
                                "sample_chains", "max_transitions", "final_samples"}


def save_pictures(model: DAEBM, args, tag, device, box, chains_x, chains_t):
    """2D: learned density exp(-U(x, t)) per level on a grid and the chains per level. Images:
    chains at t = 0 and an annealed T -> 0 sweep."""
    model.eval()
    if common.is_2d(args.dataset):
        lo, hi = box
        grid = common.grid_2d(lo, hi, 200).float().to(device)
        densities, scatters = [], []
        with torch.no_grad():
            for level in range(args.num_levels + 1):
                u = model.energy(grid,
                                 torch.full((len(grid),), level, device=device, dtype=torch.long))
                densities.append(torch.softmax(-u, 0).view(200, 200).cpu())
                scatters.append(common.histogram_2d(chains_x[chains_t == level].cpu(), lo, hi, 200))
        common.save_panels(densities, os.path.join(args.run_dir, f"density_per_t_{tag}.png"))
        common.save_panels(scatters, os.path.join(args.run_dir, f"chains_per_t_{tag}.png"))
    else:
        at_zero = chains_x[chains_t == 0][: args.n_grid]
        if len(at_zero):
            common.save_image_grid(at_zero, os.path.join(args.run_dir, f"chains_t0_{tag}.png"))
        common.save_image_grid(annealed_generate(model, args.n_grid, args, device),
                               os.path.join(args.run_dir, f"annealed_{tag}.png"))
    model.train()


def after_training(model: DAEBM, args, device, box, train_data, log):
    """Samples of the post-training sampler (MGMS, the paper's: bounded by --steps transitions)
    and the long-run stability check."""
    model.eval()
    if args.final_samples:
        n = args.sample_chains if common.is_2d(args.dataset) else args.n_grid
        budget = min(args.max_transitions, args.steps)
        if args.sampler == "annealed":
            generated, steps_taken = sample(model, n, args, device), None
        else:
            generated, steps_taken = generate(model, n, args, device, max_transitions=budget,
                                              n_chains=min(n, args.sample_chains))
        if len(generated) < n:
            print(f"warning: the MGMS sampler kept {len(generated)} of {n} chains within "
                  f"{min(args.max_transitions, args.steps)} transitions (bounded by --steps)",
                  file=sys.stderr)
        if len(generated):
            path = os.path.join(args.run_dir, f"samples_{args.sampler}.png")
            if common.is_2d(args.dataset):
                common.save_panels([common.histogram_2d(generated.cpu(), *box, 200)], path)
            else:
                common.save_image_grid(generated, path)
        if steps_taken is not None and len(generated):
            log.note(args.steps,
                     {"post_sampling_mean_langevin_steps": steps_taken.float().mean().item()})
    # at most as many MALA steps as the training chains made Langevin steps (--steps x K)
    n_steps = min(args.long_run_steps, args.steps * args.langevin_steps)
    if n_steps < args.long_run_steps:
        print(f"long-run check shortened to {n_steps} MALA steps (--steps x --langevin-steps)")
    if n_steps > 0:
        start = (common.draw_2d(args.dataset, args.sample_chains, seed=args.seed + 1)
                 if common.is_2d(args.dataset)
                 else common.to_model_space(train_data[: args.n_grid]))
        marks = sorted({m for m in (10, 100, 1000, 10_000, 100_000, n_steps) if m <= n_steps})
        records, x_end = long_run(model, start.to(device), n_steps, marks, args.official_mh_ratio)
        for record in records:
            log.note(args.steps, {f"long_run_{k}": v for k, v in record.items()})
        path = os.path.join(args.run_dir, "long_run.png")
        if common.is_2d(args.dataset):
            common.save_panels([common.histogram_2d(x_end.cpu(), *box, 200)], path)
        else:
            common.save_image_grid(x_end, path)


def main(args: Args):
    device = common.start_processes(args.device)
    ckpt = common.open_run(args, "daebm", RESUMABLE)
    common.seed_everything(args.seed)
    common.check_divisible(batch_size=args.batch_size, n_chains=args.n_chains)

    # ---- data ----
    train_data, box = common.training_data(args)
    indices = torch.arange(len(train_data), device=device)
    loader = common.EpochLoader(indices, args.batch_size, args.seed)
    train_data = train_data.to(device)
    common.prepare_run_dir(args, ckpt["step"] if ckpt else 0)

    # ---- model, optimiser, EMA, chains ----
    model = build_model(args).to(device)
    common.broadcast_from_main(model)
    ema = copy.deepcopy(model).requires_grad_(False) if args.ema_decay > 0 else None
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr,
                                 betas=(args.adam_beta1, args.adam_beta2))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, args))
    levels = args.num_levels + 1
    chains_x = torch.randn((args.n_chains,) + sample_shape(args), device=device)
    chains_t = torch.arange(levels, device=device).repeat_interleave(args.n_chains // levels + 1)
    chains_t = chains_t[: args.n_chains]
    chains_x, chains_t = common.shard(chains_x), common.shard(chains_t)  # torchrun: rank's chains
    accept_stats = (torch.zeros(levels, device=device), torch.zeros(levels, device=device))
    start_step = 0
    if ckpt is not None:
        start_step = common.restore(ckpt, model, ema, loader)
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        chains_x = common.shard(ckpt["chains_x"].to(device))
        chains_t = common.shard(ckpt["chains_t"].to(device))
        # the acceptance window: this rank's own, else (another number of processes) all on rank 0
        own = common.own_rank_state(ckpt) or (ckpt if common.is_main() else None)
        if own is not None:
            accept_stats = (own["accept_sum"].to(device), own["accept_count"].to(device))
    common.print_start(args,
                       f"DA-EBM on {args.dataset}: {common.count_parameters(model)}, device "
                       f"{device}")
    fid = common.TrainingFid(args, train_data, device, ckpt, start_step)

    def checkpoint(step, snapshot, best=False):
        window = [stat.clone() for stat in accept_stats]
        common.sum_over_ranks_(*window)
        state = common.checkpoint_state(
            "daebm", args, step, model, ema, best_fid=fid.best, box=box, loader=loader.state_dict(),
            optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
            chains_x=common.gather_shards(chains_x), chains_t=common.gather_shards(chains_t),
            accept_sum=window[0], accept_count=window[1],
            rank_state={"accept_sum": accept_stats[0], "accept_count": accept_stats[1]})
        common.save_checkpoint(state, args.run_dir, snapshot_step=step if snapshot else None,
                               best=best)

    log = common.MetricLog(args.run_dir, args.steps, start_step)
    model.train()
    t_start = time.time()
    with common.StopGuard(args.save_minutes) as guard:
        for step in range(start_step, args.steps):
            x0 = common.to_model_space(train_data[loader.next()])
            metropolis = step >= args.mh_start
            loss, energy_pos, energy_neg, grad_norm = daebm_step(
                model, x0, (chains_x, chains_t), args, optimizer, accept_stats, metropolis)
            scheduler.step()
            if ema is not None:
                common.update_ema(ema, model, args.ema_decay, copy_buffers=True)
            window_rate = None
            if (step + 1) % args.adapt_every == 0:
                window_rate = adapt_step_sizes(model, accept_stats, metropolis)

            done = step + 1
            log_now, sample_now, fid_now, save_now = guard.due(done, args)
            if log_now or sample_now or save_now:
                loss, energy_pos, energy_neg, frac_t0 = common.mean_over_ranks(
                    loss, energy_pos, energy_neg, (chains_t == 0).float().mean())
                common.stop_if_diverged(done, loss, energy_pos, energy_neg, args.run_dir,
                                        "Lower --lr or --init-step-size.", also_finite=chains_x)
            if log_now:
                metrics = {"loss": loss.item(), "energy_pos": energy_pos.item(),
                           "energy_neg": energy_neg.item(), "grad_norm": grad_norm.item(),
                           "lr": optimizer.param_groups[0]["lr"], "mh": int(metropolis),
                           "frac_chains_t0": frac_t0.item(),
                           "step_min": model.step_size.min().item(),
                           "step_max": model.step_size.max().item()}
                if window_rate is not None:
                    metrics["accept"] = window_rate.item()
                log.log(done, metrics)
            if sample_now:
                shown_x, shown_t = common.gather_shards(chains_x), common.gather_shards(chains_t)
                if common.is_main():
                    with common.own_rng(args.seed + done):
                        save_pictures(ema or model, args, f"{done:08d}", device, box, shown_x,
                                      shown_t)
            best = fid_now and fid.measure(sample, ema or model, done, log, guard.stopping)
            if save_now:
                checkpoint(done, snapshot=done % args.save_every == 0, best=best)
                guard.saved(args.run_dir, done, "pcd_diffusion_ebm.py")
    print(f"training done in {common.format_seconds(time.time() - t_start)}")

    # ---- after training (rank 0): the paper's sampler and the long-run stability check ----
    if common.end_processes():
        with common.own_rng(args.seed + args.steps):
            after_training(ema or model, args, device, box, train_data, log)


if __name__ == "__main__":
    common.run_cli(lambda: main(common.parse_args(Args, "daebm")))
