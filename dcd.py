"""DCD: Training Energy-Based Models with Diffusion Contrastive Divergences (Luo, Jiang, Hu, Sun,
Li, Zhang 2023, arXiv 2307.01668), with classic short-run contrastive divergence (CD) beside it as
the baseline.

The abstract (the body and any official code were not available to us): CD is one member of a
family, DCD, which replaces CD's Langevin kernel (it depends on the EBM) by an EBM-free diffusion;
DCD is cheaper and has no neglected gradient term; experiments on 2D data, image denoising (DCD
beats CD "by a large margin") and CelebA 32x32 generation (third-party summaries name a one-step
"DCD-VE" and time-dependent EBMs). Our derivation
(../shared/methods/dcd.md): for a kernel Q, DCD_Q = KL(p_data || p_θ) - KL(Q p_data || Q p_θ) >=
0; for a θ-free Gaussian kernel (VE: y = x + σ ε; VP: y = sqrt(1 - σ²) x + σ ε) it is E_y
KL(p_data(x | y) || p_θ(x | y)), Gao et al.'s (2021) negative recovery likelihood up to a
constant, with the exact gradient
    ∇DCD = E_{x ~ data} ∇E_θ(x) - E_{x, y ~ q(y|x)} E_{x̃ ~ p_θ(x̃ | y)} ∇E_θ(x̃),
    p_θ(x̃ | y) ∝ exp(-E_θ(x̃) - ||y - a x̃||² / (2 b²))   (VE: a = 1, b = σ; VP: a = sqrt(1 - σ²)):
the negatives are recoveries of diffused data, never unconditional samples. σ -> 0: half the
Fisher divergence (score matching) per σ²; σ large: maximum likelihood. One VP kernel at σ equals
VE at σ / sqrt(1 - σ²) (the same posterior of y / a): the two differ only on the ladder (item 6).

Our choices (the abstract states none of them; each is deliberate and can be changed):
1. `langevin` negatives: K posterior Langevin steps of η = step_ratio (b / a)² from the positive x_t
   (exact fixed point up to discretisation, which --metropolis removes) or from y / a (--chain-start
   y: biased for small K); K = 1 is our one-step variant (the paper's DCD-VE may differ).
2. `--adapt-step-ratio` (with --metropolis): each level's step ratio adapts toward 0.574 MALA
   acceptance in training (a model buffer the sampler and the denoiser use too).
3. `importance` negatives: M proposals x̃_j ~ N(y / a, (b / a)² I) weighted ∝ exp(-E(x̃_j)) with
   Energy Discrepancy's w-stabilisation (Schröder et al. 2023, arXiv 2307.06431): the positive joins
   them with weight w; w = 1 is an importance-resampling step, exact fixed point for any M.
4. `--kernel cd` = classic CD: K unadjusted Langevin steps on p_θ from data (--cd-step-size), loss
   mean E(x) - mean E(x̃), x̃ detached (the gradient through the kernel, which CD neglects, is
   dropped).
5. 2D and `--task denoise` train one time-independent EBM. Denoising holds out the last --holdout
   images, corrupts them (y = x + σ_d ε) and scores PSNR of the posterior mean (second half of a
   MALA chain from y, per-image step adapted in the first half) and of one posterior sample.
6. Generation: E_θ(x, t) over a ladder of --num-levels (6) diffused levels, CDRL's cosine log-SNR
   schedule in [-5.1, 9.8], level t trained by DCD with the kernel x_t -> x_{t+1} (VP: a_t² =
   ᾱ_{t+1} / ᾱ_t; VE: levels divided by sqrt(ᾱ_t), a_t = 1), one random level per example.
7. Sampling the ladder: from N(0, (σ_L² + s_L²) I), each lower level by K posterior Langevin steps,
   divided by level 0's signal scale; the energy is the network output / b_t² (DRL's step-size
   normalisation), VE inputs divided by sqrt(1 + σ_t²); one level: the network output.
8. Networks: 2D MLP 2-128-128-128-1 with SiLU; images DA-EBM's ResNet block with a learned level
   embedding (per-channel bias), --ebm-blocks per resolution, average pooling, no normalisation.
9. Training: Adam (0.9, 0.999), gradient clip, EMA with torch_ema's warm-up, shuffled epochs, flips
   on CIFAR, CelebA and folders; energy penalty --energy-reg α (E(pos)² + E(neg)², Du & Mordatch
   2019), 1e-2 on images (brief MNIST runs diverged without); it caps energies near 1/(2α).
10. One-level post-training sampling (2D, denoising): --sample-langevin-steps unadjusted Langevin
   steps on p_θ from N(0, I), step --cd-step-size (DCD has no unconditional sampler of its own).
11. 2D defaults (importance, σ = 0.3, M = 6; langevin K = 5, ratio 0.3; CD step 0.03; α: CD 0.3,
   DCD-Langevin 0.1, importance 0) by measurement: importance at σ 0.3 and 1 was best at equal cost
   on every toy and seed (benchmarks/toys.py dcd-vs-cd; docs/RESULTS.md, 2D results).
12. The image defaults (PRESETS["images"], and PRESETS["cpu"] for --preset cpu) are ours, untuned;
   on digits at σ_d = 0.3 no estimator beat the noisy input (why: docs/RESULTS.md, image results).
"""
import copy
import math
import os
import time
from dataclasses import dataclass
from typing import Literal, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

import common

# Per-dataset defaults of the fields left at None: "2d" for the toys, "images" for every image set.
# The abstract fixes none of them, so every value is ours (docstring items 9, 11 and 12; how the
# 2D ones were chosen: docs/RESULTS.md, DCD).
PRESETS = {
    "2d": {
        "steps": 3000,  # ours
        "batch_size": 1000,  # ours
        "lr": 1e-3,  # ours
        "ema_decay": 0.995,  # ours
        "sample_every": 1000,  # ours
        "save_every": 1000,  # ours
        "estimator": "importance",  # ours, by measurement
        "sigma": 0.3,  # ours, by measurement (docstring item 11)
        "langevin_steps": 5,  # ours
        "step_ratio": 0.3,  # ours
        "cd_step_size": 0.03,  # ours
        "num_levels": 1,  # ours: a time-independent EBM
    },
    "images": {
        "steps": 200_000,  # ours
        "batch_size": 128,  # ours
        "lr": 1e-4,  # ours
        "ema_decay": 0.9999,  # ours
        "sample_every": 5000,  # ours
        "save_every": 20_000,  # ours
        "estimator": "langevin",  # ours
        "sigma": 0.3,  # ours; one-level models (--task denoise) only
        "langevin_steps": 15,  # ours
        "step_ratio": 0.2,  # ours
        "cd_step_size": 1e-4,  # ours
        "num_levels": 6,  # ours (--task generate; --task denoise trains one level)
        "energy_reg": 1e-2,  # ours: without it brief MNIST runs diverged (docstring item 9)
        "ebm_channels": 128,  # ours
        "ebm_channel_mult": (1, 2, 2, 2),  # ours
        "ebm_blocks": 2,  # ours
    },
    # --preset cpu: the reduced MNIST configuration that trains in about 2 hours on one core of
    # this project's 2-core CPU (docs/RESULTS.md, image results); over "images" for every field it
    # names. "ours: CPU budget" = chosen so that training and a 10,000-sample FID fit that budget.
    "cpu": {
        "steps": 4000,  # ours: CPU budget
        "batch_size": 64,  # ours: CPU budget
        "sample_every": 500,  # ours
        "save_every": 1000,  # ours
        "ebm_channels": 32,  # ours: CPU budget
        "ebm_channel_mult": (1, 2, 2),  # ours: CPU budget
        "ebm_blocks": 1,  # ours: CPU budget
    },
}


@dataclass
class Args(common.RunArgs):
    # the shared settings (run, data, lifecycle, speed, FID) are common.RunArgs's; here the
    # method's defaults of a few of them, then its own
    exp_name: str = "dcd"
    """name used in the run folder"""
    dataset: str = "checkerboard"
    """checkerboard | rings | 8gaussians | swissroll | pinwheel | 2spirals | celeba (the paper's
    image set) | cifar10 | cifar100 | svhn | mnist | fashionmnist | folder:PATH (images) |
    points:PATH (2D points, .npy or .csv of shape (n, 2))"""

    # ---- DCD ----
    task: Literal["generate", "denoise"] = "generate"
    """images: 'generate' = a time-dependent EBM on a noise ladder; 'denoise' = one clean-data EBM
    scored by denoising PSNR on held-out images every --sample-every (2D: always one EBM)"""
    kernel: Literal["ve", "vp", "cd"] = "ve"
    """ve / vp: DCD with that Gaussian kernel; cd: classic short-run CD (one-level models)"""
    estimator: Optional[Literal["langevin", "importance"]] = None
    """DCD negatives: K posterior Langevin steps (langevin) or M proposals around y (importance)"""
    sigma: Optional[float] = None
    """one-level models: std of the kernel's added noise (VP needs < 1)"""
    langevin_steps: Optional[int] = None
    """K: Langevin steps of the posterior (DCD langevin) or of p_θ from data (CD) per iteration"""
    step_ratio: Optional[float] = None
    """posterior Langevin step η = step_ratio · (b / a)², the kernel's own variance in x units"""
    num_proposals: int = 6
    """M: proposals per example of the importance estimator (6: the cost of CD with K = 5)"""
    importance_w: float = 1.0
    """importance: weight of the positive among the proposals (Schröder et al. 2023); 1 = exact
    at p_θ = p_data; 0 = plain self-normalised importance sampling (biased, unbounded below)"""
    chain_start: Literal["positive", "y"] = "positive"
    """langevin: the posterior chain starts at the positive x_t (exact if p_θ = p_data) or at y / a
    (a draw of p(y), not of the posterior)"""
    metropolis: bool = False
    """langevin: Metropolis-adjust every posterior step (MALA, no step-size bias); the ladder's
    sampler too"""
    adapt_step_ratio: bool = False
    """langevin with --metropolis: adapt each level's step ratio (from --step-ratio) in training
    toward 0.574 MALA acceptance (a model buffer the sampler and denoiser use); sharp data need
    far smaller steps"""
    cd_step_size: Optional[float] = None
    """CD Langevin step η (x ← x - η/2 ∇E + sqrt(η) ξ), also the one-level sampler's"""
    num_levels: Optional[int] = None
    """levels of the time-dependent ladder (1 = a time-independent EBM: 2D and --task denoise)"""
    logsnr_min: float = -5.1
    """ladder: log-SNR of the noisiest level x_L (cosine schedule, as CDRL)"""
    logsnr_max: float = 9.8
    """ladder: log-SNR of level x_0"""
    grad_clip: float = 1.0
    """gradient-norm clip; 0 = off"""
    energy_reg: Optional[float] = None
    """α of the penalty α (mean E(pos)² + mean E(neg)²) (Du & Mordatch 2019); 2D: --kernel cd 0.3,
    --estimator langevin 0.1, importance 0 (docstring item 11)"""
    mlp_width: int = 128
    """2D MLP hidden width"""
    ebm_channels: Optional[int] = None
    """image EBM base width"""
    ebm_channel_mult: Optional[Tuple[int, ...]] = None
    """image EBM width multipliers per resolution (average-pool between them)"""
    ebm_blocks: Optional[int] = None
    """image EBM residual blocks per resolution"""
    denoise_sigma: Optional[float] = None
    """denoise: std of the test corruption y = x + σ_d ε on the [-1, 1] scale (default --sigma)"""
    holdout: int = 1000
    """denoise: images at the end of the training split held out (never trained on) and denoised"""
    denoise_steps: int = 100
    """denoise: posterior MALA steps from y (first step --step-ratio · σ_d², adapted per image over
    the first half); the estimate is the mean of the second half"""
    sample_langevin_steps: Optional[int] = None
    """sampling: posterior steps per ladder level (default --langevin-steps); one level: steps of
    the unconditional chain (default 500)"""
    hflip: Optional[bool] = None
    """random horizontal flips of training images (default on for cifar10/cifar100/celeba/folder)"""
    image_size: Optional[int] = None
    """folder: datasets are resized to this (default: the first image's size)"""
    image_channels: Optional[int] = None
    """set from the dataset; stored so build_model can rebuild the net from a checkpoint"""
    sample_batch: int = 500
    """largest batch the sampler and the denoiser run at once"""
    n_grid: int = 64
    """images in each sample grid"""
    n_points: int = 5000
    """2D: points drawn for each sample picture"""

    def __post_init__(self):
        common.check_dataset_name(self.dataset)
        toy = common.is_2d(self.dataset)
        if self.task == "denoise" and self.num_levels is None:
            self.num_levels = 1
        common.apply_presets(self, PRESETS)
        if self.energy_reg is None:  # 2D: what each method did best with (docstring item 11)
            self.energy_reg = 0.3 if self.kernel == "cd" else \
                0.1 if self.estimator == "langevin" else 0.0
        if self.hflip is None:
            self.hflip = common.flips_by_default(self.dataset)
        if self.sample_langevin_steps is None:
            self.sample_langevin_steps = self.langevin_steps if self.num_levels > 1 else 500
        if self.denoise_sigma is None:
            self.denoise_sigma = self.sigma
        common.set_image_shape(self)
        if not toy:
            self.ebm_channel_mult = tuple(self.ebm_channel_mult)
            common.check_positive(self, ["ebm_channels", "ebm_blocks"])
        common.check_positive(self, ["langevin_steps", "num_proposals", "num_levels", "mlp_width",
                                     "holdout", "denoise_steps",
                                     "sample_langevin_steps", "sample_batch", "n_grid", "n_points"])
        one_level, langevin_mala = self.num_levels == 1, self.estimator == "langevin" and \
            self.metropolis and self.kernel != "cd"
        common.require(
            (self.step_ratio > 0 and self.cd_step_size > 0 and self.grad_clip >= 0
             and self.energy_reg >= 0 and self.importance_w >= 0, "--step-ratio and "
             "--cd-step-size must be positive, --grad-clip, --energy-reg and --importance-w >= 0"),
            (not (toy and self.task == "denoise"),
             "--task denoise needs an image dataset; 2D toys train one EBM already"),
            (one_level or not toy, "2D toys train a time-independent EBM: --num-levels must be 1"),
            (one_level or self.task != "denoise",
             "--task denoise trains a one-level (clean-data) EBM: --num-levels must be 1"),
            (not one_level or (self.sigma > 0 and (self.kernel != "vp" or self.sigma < 1)),
             f"--sigma must be positive (and below 1 for --kernel vp), got {self.sigma}"),
            (one_level or self.kernel != "cd",
             "--kernel cd is the one-level baseline: use it with --num-levels 1"),
            (langevin_mala or not self.adapt_step_ratio, "--adapt-step-ratio adapts the posterior "
             "MALA chain: it needs --estimator langevin --metropolis (and a DCD kernel)"),
            (self.task != "denoise" or self.denoise_sigma > 0,
             f"--denoise-sigma must be positive, got {self.denoise_sigma}"),
            (self.logsnr_min < self.logsnr_max, "--logsnr-min must be below --logsnr-max"))


common.show_preset_defaults(Args, PRESETS)


# ==================================================================================================
# NETWORK
# ==================================================================================================
class MLPEnergy(nn.Module):
    """2D: E(x) = MLP 2-w-w-w-1 with SiLU (time-independent; the level argument must be 0)."""

    def __init__(self, width: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
                                 nn.Linear(width, width), nn.SiLU(), nn.Linear(width, 1))

    def forward(self, x, level):
        return self.net(x).squeeze(1)


class ResBlock(nn.Module):
    """SiLU -> conv -> + per-channel level bias -> SiLU -> conv; 3x3 conv shortcut when the width
    changes."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.shortcut = nn.Conv2d(c_in, c_out, 3, padding=1) if c_in != c_out else nn.Identity()

    def forward(self, x, emb):
        h = self.conv1(F.silu(x)) + self.emb_proj(emb)[:, :, None, None]
        return self.shortcut(x) + self.conv2(F.silu(h))


class ResNetEnergy(nn.Module):
    """Images: network output n(x, t) = <sum-pool SiLU(h), Linear(SiLU(emb_t))>, emb_t a learned
    embedding of the level; `blocks` ResBlocks per resolution, average-pool between resolutions."""

    def __init__(self, in_channels: int, ch: int, ch_mult: Tuple[int, ...], blocks: int,
                 num_levels: int):
        super().__init__()
        emb_dim = 4 * ch
        self.level_emb = nn.Sequential(nn.Embedding(num_levels, emb_dim), nn.SiLU(),
                                       nn.Linear(emb_dim, emb_dim))
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        self.stages = nn.ModuleList()
        width = ch
        for mult in ch_mult:
            blocks_here = [ResBlock(width if b == 0 else ch * mult, ch * mult, emb_dim)
                           for b in range(blocks)]
            self.stages.append(nn.ModuleList(blocks_here))
            width = ch * mult
        self.head = nn.Linear(emb_dim, width)

    def forward(self, x, level):
        emb = F.silu(self.level_emb(level))
        h = self.conv_in(x)
        for i, stage in enumerate(self.stages):
            for block in stage:
                h = block(h, emb)
            if i < len(self.stages) - 1:
                h = F.avg_pool2d(h, 2)
        return (F.silu(h).sum((2, 3)) * self.head(emb)).sum(1)


class DCD(nn.Module):
    """The network plus the ladder tables (buffers): level t = 0..L has x_t = signal_t x_0 + noise_t
    ε; the kernel of level t < L is x_{t+1} = kernel_a_t x_t + kernel_b_t ε."""

    def __init__(self, net: nn.Module, tables: dict, amp: bool = False,
                 compile_sampler: bool = False):
        super().__init__()
        self.net, self.amp, self.compile_sampler = net, amp, compile_sampler
        for name, value in tables.items():
            self.register_buffer(name, value.float())
        self.num_levels = len(tables["kernel_a"])

    def energy(self, x, level):
        """E_θ(x, t), one value per row (level: long tensor of rows' levels)."""
        with common.autocast_bf16(self.amp, x.device.type):
            out = self.net(x * as_batch(self.input_scale[level], x), level).float()
        return out * self.energy_scale[level]


# ==================================================================================================
# NOISE SCHEDULE
# ==================================================================================================
def logsnr_schedule(t: torch.Tensor, logsnr_min: float, logsnr_max: float) -> torch.Tensor:
    """Cosine schedule in log-SNR clipped to [logsnr_min, logsnr_max]: -2 log tan(a t + b) (DRL /
    CDRL)."""
    b = math.atan(math.exp(-0.5 * logsnr_max))
    a = math.atan(math.exp(-0.5 * logsnr_min)) - b
    return -2.0 * torch.log(torch.tan(a * t + b))


def level_tables(args) -> dict:
    """Ladder constants in float64. One level (2D, denoise): x_0 = data, x_1 = the kernel's y (VE:
    signal 1, noise σ; VP: signal sqrt(1 - σ²), noise σ; CD: the same numbers, unused by its loss).
    L levels: log-SNR λ_t from the cosine schedule, VP signal sqrt(sigmoid λ), noise sqrt(sigmoid
    -λ); VE signal 1, noise exp(-λ / 2). Kernel t -> t+1: a_t = signal_{t+1} / signal_t, b_t² =
    noise_{t+1}² - a_t² noise_t². Energy scale 1 / b_t² and input scale 1 / sqrt(signal_t² +
    noise_t²) on a ladder; 1 and 1 with one level.
    """
    if args.num_levels == 1:
        signal = torch.tensor([1.0, math.sqrt(1 - args.sigma ** 2) if args.kernel == "vp" else 1.0],
                              dtype=torch.float64)
        noise = torch.tensor([0.0, args.sigma], dtype=torch.float64)
    else:
        levels = torch.arange(args.num_levels + 1, dtype=torch.float64)
        logsnr = logsnr_schedule(levels / args.num_levels, args.logsnr_min, args.logsnr_max)
        if args.kernel == "vp":
            signal, noise = torch.sigmoid(logsnr).sqrt(), torch.sigmoid(-logsnr).sqrt()
        else:
            signal, noise = torch.ones_like(logsnr), torch.exp(-0.5 * logsnr)
    kernel_a = signal[1:] / signal[:-1]
    kernel_b = (noise[1:] ** 2 - kernel_a ** 2 * noise[:-1] ** 2).sqrt()
    ladder = args.num_levels > 1
    return {"signal": signal, "noise": noise, "kernel_a": kernel_a, "kernel_b": kernel_b,
            "energy_scale": kernel_b ** -2 if ladder else torch.ones_like(kernel_b),
            "input_scale": (signal[:-1] ** 2 + noise[:-1] ** 2).rsqrt() if ladder
            else torch.ones_like(kernel_b)}


def diffuse(model: DCD, x0, level, noise):
    """x_t = signal_t x_0 + noise_t ε."""
    return as_batch(model.signal[level], x0) * x0 + as_batch(model.noise[level], x0) * noise


def as_batch(per_example: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return per_example.view(-1, *[1] * (like.dim() - 1))


# ==================================================================================================
# SAMPLER
# ==================================================================================================
def energy_and_grad(model: DCD, x, level):
    """E_θ(x, t) and its gradient in x, without touching parameter gradients."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        energy = model.energy(x, level)
        (grad,) = torch.autograd.grad(energy.sum(), x)
    return energy.detach(), grad


# Robbins-Monro rate of the per-row MALA step adaptation (posterior_langevin's adapt_steps): log η
# moves by ADAPT_RATE (p - ADAPT_TARGET) per step, toward MALA's optimal acceptance 0.574
ADAPT_RATE, ADAPT_TARGET = 0.5, 0.574


def posterior_langevin(model: DCD, y, level, a, b, n_steps: int, step_ratio: float, start=None,
                       metropolis: bool = False, adapt_steps: int = 0):
    """n_steps of Langevin on p_θ(x | y) ∝ exp(-E(x, t) - ||y - a x||² / (2 b²)) from `start`
    (default y / a), step η = step_ratio (b / a)²: x' = x + η/2 ∇log p(x) + sqrt(η) ξ, kept always
    (unadjusted) or with the Metropolis-Hastings probability of this proposal (MALA; one more
    gradient pass, at the start). With MALA, adapt_steps k > 0 adapts each row's η over the first k
    steps (log η += ADAPT_RATE (acceptance probability - ADAPT_TARGET)) and holds it after: a
    posterior much narrower than b / a (sharp data) needs a far smaller step, at which unadjusted
    Langevin diverges (tests/test_dcd.py). a, b, step_ratio: numbers or per-row tensors. Returns
    (the last state, the mean of the states of the chain's second half, each row's mean
    acceptance: 1 when unadjusted)."""
    step = step_ratio * (b / a) ** 2
    if adapt_steps:
        step = torch.full((len(y),) + (1,) * (y.dim() - 1), 1.0, device=y.device) * step
    x = y / a if start is None else start.detach()
    total, accepted = torch.zeros_like(y), torch.zeros(len(y), device=y.device)
    grad_pass = common.compiled(energy_and_grad, model.compile_sampler)

    def energy_and_drift(x):  # E(x, t) and ∇ log p(x | y)
        energy, grad = grad_pass(model, x, level)
        return energy, -grad + a * (y - a * x) / b ** 2

    def log_post(x, energy):  # log p(x | y) + const
        return -energy - ((y - a * x) ** 2 / (2 * b ** 2)).flatten(1).sum(1)

    if metropolis:
        energy, drift = energy_and_drift(x)
        log_p = log_post(x, energy)
    for k in range(n_steps):
        if not metropolis:
            _, drift = energy_and_drift(x)
        proposal = x + 0.5 * step * drift + step ** 0.5 * torch.randn_like(x)
        if metropolis:
            energy_new, drift_new = energy_and_drift(proposal)
            log_p_new = log_post(proposal, energy_new)
            forward = ((proposal - x - 0.5 * step * drift) ** 2 / (2 * step)).flatten(1).sum(1)
            backward = ((x - proposal - 0.5 * step * drift_new) ** 2 / (2 * step)).flatten(1).sum(1)
            accept_prob = (log_p_new - log_p - backward + forward).clamp(max=0).exp()
            accept = torch.rand_like(accept_prob) < accept_prob
            x = torch.where(as_batch(accept, x), proposal, x)
            log_p = torch.where(accept, log_p_new, log_p)
            drift = torch.where(as_batch(accept, x), drift_new, drift)
            accepted = accepted + accept_prob
            if k < adapt_steps:
                step = step * torch.exp(ADAPT_RATE * (as_batch(accept_prob, x) - ADAPT_TARGET))
        else:
            x = proposal
        if k >= n_steps // 2:
            total += x
    acceptance = accepted / n_steps if metropolis else torch.ones(len(y), device=y.device)
    return x, total / (n_steps - n_steps // 2), acceptance


def adapt_step_ratio(model: DCD, level, acceptance):
    """--adapt-step-ratio, after each training chain: per level, step_ratio x exp(ADAPT_RATE (mean
    acceptance of its rows - ADAPT_TARGET)); levels without rows keep theirs. In place on the
    device, no sync; under torchrun on the acceptance summed over all ranks, so that every rank
    adapts alike."""
    with torch.no_grad():
        total = torch.zeros_like(model.step_ratio).index_add_(0, level, acceptance.float())
        count = torch.zeros_like(model.step_ratio).index_add_(0, level,
                                                              torch.ones_like(total[level]))
        common.sum_over_ranks_(total, count)
        rate = total / count.clamp_min(1)
        model.step_ratio.mul_(torch.where(count > 0, torch.exp(ADAPT_RATE * (rate - ADAPT_TARGET)),
                                          1.0))


def step_ratios(model: DCD, level, args, like):
    """The posterior chain's step ratio for each row of `like`: the adapted one of its level
    (--adapt-step-ratio) or --step-ratio."""
    return as_batch(model.step_ratio[level], like) if args.adapt_step_ratio else args.step_ratio


def model_langevin(model: DCD, x, level, n_steps: int, step: float):
    """n_steps of unadjusted Langevin on p_θ(x, t) itself: x ← x - η/2 ∇E + sqrt(η) ξ (CD's
    kernel)."""
    grad_pass = common.compiled(energy_and_grad, model.compile_sampler)
    for _ in range(n_steps):
        _, grad = grad_pass(model, x, level)
        x = x - 0.5 * step * grad + math.sqrt(step) * torch.randn_like(x)
    return x


def generate(model: DCD, n: int, args, device, step_multiplier: int = 1):
    """One-level model: step_multiplier x --sample-langevin-steps Langevin steps on p_θ from N(0,
    I). Ladder: x_L from the wide Gaussian, then each level t = L-1 .. 0 from the posterior given
    x_{t+1} (that many steps each); returns x_0 / signal_0."""
    shape, langevin_steps = sample_shape(args), args.sample_langevin_steps * step_multiplier
    if model.num_levels == 1:
        level = torch.zeros(n, dtype=torch.long, device=device)
        return model_langevin(model, torch.randn((n,) + shape, device=device), level,
                              langevin_steps, args.cd_step_size)
    top = model.num_levels
    scale = (model.noise[top] ** 2 + model.signal[top] ** 2).sqrt()
    x = torch.randn((n,) + shape, device=device) * scale
    progress = common.Progress("sampler, levels", top, interval=30, quiet=True)
    for t in reversed(range(top)):
        level = torch.full((n,), t, dtype=torch.long, device=device)
        x, _, _ = posterior_langevin(model, x, level, model.kernel_a[t], model.kernel_b[t],
                                     langevin_steps, step_ratios(model, level, args, x),
                                     metropolis=args.metropolis)
        progress.update(1)
    return x / model.signal[0]


def denoise(model: DCD, y, sigma: float, n_steps: int, step_ratio: float):
    """Posterior p_θ(x | y) ∝ exp(-E(x) - ||y - x||² / (2 σ²)) of a one-level model: n_steps MALA
    steps from y, each image's step adapted from step_ratio σ² over the first half and held over
    the second -> (posterior-mean estimate: the mean of the second half, the last state, each
    image's mean acceptance)."""
    level = torch.zeros(len(y), dtype=torch.long, device=y.device)
    last, mean, acceptance = posterior_langevin(model, y, level, 1.0, sigma, n_steps, step_ratio,
                                                metropolis=True, adapt_steps=n_steps // 2)
    return mean, last, acceptance


def psnr(estimate, clean):
    """Per-image PSNR in dB of images in [-1, 1] mapped to [0, 1] (estimates clamped), (N,)."""
    mse = ((estimate.clamp(-1, 1) - clean) / 2).pow(2).flatten(1).mean(1)
    return -10 * torch.log10(mse)


# ==================================================================================================
# LOSS
# ==================================================================================================
def dcd_loss(model: DCD, x0, args):
    """The estimator's loss on a batch of clean data; its parameter gradient estimates ∇DCD (∇ of
    CD's objective without the kernel term for --kernel cd). Level t per example (always 0 with one
    level); positives x_t; negatives: CD = K Langevin steps on p_θ from x_t; DCD = draws of p_θ(x̃ |
    y), y = a_t x_t + b_t ε, by K posterior Langevin steps (langevin), or self-normalised importance
    weights over M Gaussian proposals around y / a and the positive itself (importance).

    Returns (loss, mean E(pos), mean E(neg), diagnostic), all but the loss detached: the diagnostic
    is the importance weights' effective sample size / (M + 1 with the positive), the posterior
    chain's acceptance (--metropolis), or the mean distance of the negatives from their start.
    """
    level = torch.randint(0, model.num_levels, (len(x0),), device=x0.device)
    x_pos = diffuse(model, x0, level, torch.randn_like(x0))
    e_pos = model.energy(x_pos, level)
    if args.kernel == "cd":  # classic CD: K Langevin steps on p_θ itself from the positives
        start = x_pos
        x_neg = model_langevin(model, x_pos, level, args.langevin_steps, args.cd_step_size)
    else:  # DCD: one step of the θ-free kernel, y = a x_t + b ε, then recover x̃ from p_θ(x̃ | y)
        a, b = as_batch(model.kernel_a[level], x0), as_batch(model.kernel_b[level], x0)
        y = a * x_pos + b * torch.randn_like(x0)
        start = y / a
        if args.estimator == "importance":
            m = args.num_proposals
            proposals = start.repeat(m, *[1] * (x0.dim() - 1))
            proposal_std = (b / a).repeat(m, *[1] * (x0.dim() - 1))
            proposals = proposals + proposal_std * torch.randn_like(proposals)
            e_proposals = model.energy(proposals, level.repeat(m)).view(m, len(x0))
            # Energy Discrepancy's loss (Schröder et al. 2023, eq. 8 with its w-stabilisation):
            # mean_i log (w/M + (1/M) Σ_j exp(E(x_i) - E(x̃_ij))) = mean E(x) + mean_i log (1/M)
            # (w exp(-E(x_i)) + Σ_j exp(-E(x̃_ij))); its gradient is ∇E(x) minus the ∇E average
            # over the proposals and, with weight w, the positive, weighted ∝ exp(-E)
            log_w = -e_proposals
            if args.importance_w > 0:
                log_w = torch.cat([log_w, (math.log(args.importance_w) - e_pos)[None]])
            loss = e_pos.mean() + (torch.logsumexp(log_w, 0) - math.log(m)).mean() + \
                args.energy_reg * (e_pos.pow(2).mean() + e_proposals.pow(2).mean())
            weights = torch.softmax(log_w.detach(), 0)
            energies = torch.cat([e_proposals, e_pos[None]])[:len(log_w)].detach()
            e_neg = (weights * energies).sum(0)
            ess_fraction = (1.0 / weights.pow(2).sum(0)).mean() / len(log_w)
            return loss, e_pos.detach().mean(), e_neg.mean(), ess_fraction
        start = x_pos if args.chain_start == "positive" else start
        x_neg, _, acceptance = posterior_langevin(model, y, level, a, b, args.langevin_steps,
                                                  step_ratios(model, level, args, x0), start,
                                                  args.metropolis)
        if args.adapt_step_ratio:
            adapt_step_ratio(model, level, acceptance)
    e_neg = model.energy(x_neg.detach(), level)
    loss = e_pos.mean() - e_neg.mean() + args.energy_reg * (e_pos.pow(2).mean()
                                                            + e_neg.pow(2).mean())
    if args.kernel != "cd" and args.metropolis:
        diagnostic = acceptance.mean()
    else:
        diagnostic = (x_neg - start).flatten(1).norm(dim=1).mean().detach()
    return loss, e_pos.detach().mean(), e_neg.detach().mean(), diagnostic


def diagnostic_of(args) -> str:
    """The name of dcd_loss's diagnostic in the logs."""
    if args.kernel == "cd":
        return "neg_move"
    if args.estimator == "importance":
        return "ess_fraction"
    return "accept_rate" if args.metropolis else "neg_move"


def dcd_step(model: DCD, x0, args, optimizer):
    """One Adam update on dcd_loss with the gradient-norm clip; returns detached (loss, mean E(pos),
    mean E(neg), grad norm, diagnostic)."""
    optimizer.zero_grad(set_to_none=True)
    loss, e_pos, e_neg, diagnostic = dcd_loss(model, x0, args)
    loss.backward()
    common.average_gradients(model.parameters())  # torchrun: the global batch's gradient
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip
                                               if args.grad_clip > 0 else math.inf)
    optimizer.step()
    return loss.detach(), e_pos, e_neg, grad_norm, diagnostic


# ==================================================================================================
# PUBLIC API
# ==================================================================================================
def sample_shape(args):
    if common.is_2d(args.dataset):
        return (2,)
    return (args.image_channels, args.image_size, args.image_size)


def build_model(args) -> DCD:
    """The EBM (PyTorch default initialisation) and the ladder tables."""
    if common.is_2d(args.dataset):
        net = MLPEnergy(args.mlp_width)
    else:
        net = ResNetEnergy(args.image_channels, args.ebm_channels, args.ebm_channel_mult,
                           args.ebm_blocks, args.num_levels)
    tables = level_tables(args)
    if args.adapt_step_ratio:  # one per level, adapted in training (adapt_step_ratio)
        tables["step_ratio"] = torch.full((args.num_levels,), args.step_ratio)
    model = DCD(net, tables, amp=args.amp == "bf16", compile_sampler=args.compile)
    return common.memory_layout(model, args.channels_last)


def sample(model: DCD, n: int, args, device, step_multiplier: int = 1) -> torch.Tensor:
    """n samples (EMA weights when the caller loaded them) in batches of --sample-batch: the
    ladder's progressive posterior sampler, or the unconditional Langevin chain of a one-level
    model, with step_multiplier x --sample-langevin-steps per level."""
    model.eval()
    out = []
    for first in range(0, n, args.sample_batch):
        batch = generate(model, min(args.sample_batch, n - first), args, device, step_multiplier)
        out.append(batch if common.is_2d(args.dataset) else batch.clamp(-1, 1))
    return torch.cat(out)


def energy(model: DCD, x: torch.Tensor, args) -> torch.Tensor:
    """E_θ(x, 0), the energy of the cleanest level (lower = more likely)."""
    model.eval()
    with torch.no_grad():
        return model.energy(x, torch.zeros(len(x), dtype=torch.long, device=x.device))


# ==================================================================================================
# TRAINING
# ==================================================================================================
# settings that may change on --resume besides common.RESUMABLE (sampling and denoising options)
RESUMABLE = common.RESUMABLE | {"sample_langevin_steps", "sample_batch", "n_grid", "n_points",
                                "denoise_sigma", "denoise_steps"}


def denoise_heldout(model: DCD, clean, args, device):
    """Denoise the held-out images (fixed corruption, seed --seed) -> (PSNR dict, picture rows)."""
    generator = torch.Generator().manual_seed(args.seed)
    noise = torch.randn(clean.shape, generator=generator, device="cpu").to(device)
    scores = {"psnr_noisy": [], "psnr_mean": [], "psnr_sample": [], "denoise_accept": []}
    ratio = model.step_ratio[0].item() if args.adapt_step_ratio else args.step_ratio
    for first in range(0, len(clean), args.sample_batch):
        x = common.to_unit_range(clean[first:first + args.sample_batch]).to(device)
        y = x + args.denoise_sigma * noise[first:first + len(x)]
        mean, last, acceptance = denoise(model, y, args.denoise_sigma, args.denoise_steps, ratio)
        for key, estimate in (("psnr_noisy", y), ("psnr_mean", mean), ("psnr_sample", last)):
            scores[key].append(psnr(estimate, x))
        scores["denoise_accept"].append(acceptance)
        if first == 0:
            rows = [x[:8], y[:8].clamp(-1, 1), mean[:8].clamp(-1, 1), last[:8].clamp(-1, 1)]
    return {key: torch.cat(value).mean().item() for key, value in scores.items()}, rows


def save_pictures(model: DCD, args, tag, device, box):
    """2D: the model density exp(-E) on a grid and a histogram of sampler points. Images: a sample
    grid."""
    model.eval()
    if common.is_2d(args.dataset):
        lo, hi = box
        grid = common.grid_2d(lo, hi, 200).float().to(device)
        with torch.no_grad():
            density = torch.softmax(-model.energy(grid, torch.zeros(len(grid), dtype=torch.long,
                                                                    device=device)), 0)
        points = sample(model, args.n_points, args, device).cpu()
        common.save_panels([density.view(200, 200).cpu(), common.histogram_2d(points, lo, hi, 200)],
                           os.path.join(args.run_dir, f"density_samples_{tag}.png"))
    else:
        common.save_image_grid(sample(model, args.n_grid, args, device),
                               os.path.join(args.run_dir, f"samples_{tag}.png"))
    model.train()


def main(args: Args):
    device = common.start_processes(args.device)
    ckpt = common.open_run(args, "dcd", RESUMABLE)
    common.seed_everything(args.seed)
    common.check_divisible(batch_size=args.batch_size)

    # ---- data ----
    train_data, box = common.training_data(args)
    heldout = None
    if args.task == "denoise":
        if args.holdout >= len(train_data):
            raise common.UserError(f"--holdout {args.holdout} leaves no training images of "
                                   f"{len(train_data)}")
        train_data, heldout = train_data[:-args.holdout], train_data[-args.holdout:]
    indices = torch.arange(len(train_data), device=device)
    loader = common.EpochLoader(indices, args.batch_size, args.seed)
    train_data = train_data.to(device)
    common.prepare_run_dir(args, ckpt["step"] if ckpt else 0)

    # ---- model, optimiser, EMA ----
    model = build_model(args).to(device)
    common.broadcast_from_main(model)
    ema = copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, betas=(0.9, 0.999))
    start_step = 0
    if ckpt is not None:
        start_step = common.restore(ckpt, model, ema, loader)
        optimizer.load_state_dict(ckpt["optimizer"])
    method = "CD" if args.kernel == "cd" else f"DCD-{args.kernel.upper()} ({args.estimator})"
    common.print_start(args, f"{method} on {args.dataset}, {args.num_levels} level(s): "
                             f"{common.count_parameters(model)}, device {device}")
    fid = common.TrainingFid(args, train_data, device, ckpt, start_step)

    def checkpoint(step, snapshot, best=False):
        state = common.checkpoint_state("dcd", args, step, model, ema, best_fid=fid.best, box=box,
                                        optimizer=optimizer.state_dict(),
                                        loader=loader.state_dict())
        common.save_checkpoint(state, args.run_dir, snapshot_step=step if snapshot else None,
                               best=best)

    log = common.MetricLog(args.run_dir, args.steps, start_step)
    model.train()
    t_start = time.time()
    with common.StopGuard(args.save_minutes) as guard:
        for step in range(start_step, args.steps):
            x0 = common.to_model_space(train_data[loader.next()])
            if args.hflip:
                x0 = torch.where(torch.rand(len(x0), 1, 1, 1, device=device) < 0.5, x0.flip(3), x0)
            loss, energy_pos, energy_neg, grad_norm, diagnostic = dcd_step(
                model, x0, args, optimizer)
            # torch_ema's decay warm-up: min(decay, (1 + k) / (10 + k)) at update k
            decay = min(args.ema_decay, (2 + step) / (11 + step))
            common.update_ema(ema, model, decay, copy_buffers=args.adapt_step_ratio)

            done = step + 1
            log_now, sample_now, fid_now, save_now = guard.due(done, args)
            if log_now or sample_now or save_now:
                loss, energy_pos, energy_neg, diagnostic = common.mean_over_ranks(
                    loss, energy_pos, energy_neg, diagnostic)
                common.stop_if_diverged(done, loss, energy_pos, energy_neg, args.run_dir,
                                        "Lower --lr, --step-ratio or --cd-step-size.")
            scores = {}
            if sample_now and common.is_main():
                with common.own_rng(args.seed + done):
                    save_pictures(ema, args, f"{done:08d}", device, box)
                    if heldout is not None:
                        scores, rows = denoise_heldout(ema, heldout, args, device)
                        common.save_image_grid(torch.cat(rows), os.path.join(
                            args.run_dir, f"denoise_{done:08d}.png"), nrow=8)
            if log_now or scores:
                diagnostic_name = diagnostic_of(args)
                log.log(done, {"loss": loss.item(), "energy_pos": energy_pos.item(),
                               "energy_neg": energy_neg.item(), "grad_norm": grad_norm.item(),
                               "lr": optimizer.param_groups[0]["lr"],
                               diagnostic_name: diagnostic.item(), **scores,
                               **({"step_ratio_min": model.step_ratio.min().item(),
                                   "step_ratio_max": model.step_ratio.max().item()}
                                  if args.adapt_step_ratio else {})})
            best = fid_now and fid.measure(sample, ema, done, log, guard.stopping)
            if save_now:
                checkpoint(done, snapshot=done % args.save_every == 0, best=best)
                guard.saved(args.run_dir, done, "dcd.py")
    print(f"training done in {common.format_seconds(time.time() - t_start)}")
    common.end_processes()


if __name__ == "__main__":
    common.run_cli(lambda: main(common.parse_args(Args, "dcd")))
