"""CDRL: Learning Energy-Based Models by Cooperative Diffusion Recovery Likelihood (Zhu, Xie, Wu,
Gao 2023, arXiv 2309.05153, ICLR 2024).

A Gaussian diffusion x_0 -> x_1 -> ... -> x_L (L = 6 levels, cosine log-SNR schedule) splits a hard
EBM into L easy ones. At level i one EBM f_θ(y, i) models y = α_mul x_{i-1} (α_mul = sqrt(ᾱ_i /
ᾱ_{i-1})), and what is learned is the recovery likelihood of the cleaner sample given the noisier
one,
    log p(y | x_i) = f_θ(y, i) / s_i² - ||y - x_i||² / (2 σ_i²) + const,      (DRL, Gao et al. 2021,
    eq. 6)
whose quadratic term makes the conditional nearly Gaussian and short-run Langevin good enough. At
the noisiest level the quadratic term is dropped (a plain marginal EBM). The energy is divided by
the Langevin step size s_i² ("normalised by step size", CDRL appendix A.2), so the Langevin drift on
f is ½∇f at every level. Training is cooperative: an initializer network g_φ (a U-Net) proposes y
from x_i, K = 15 Langevin steps of the recovery density refine the proposal, the EBM does maximum
recovery likelihood with the refined samples as negatives (loss = mean_i w_i (f(neg) - f(pos)), w_i
= σ_1 / σ_i), and the initializer regresses its proposal onto the refined samples (it learns to
amortise the MCMC). Sampling runs from noise level by level: proposal, Langevin, divide by α_mul;
then one Tweedie denoising step. The energy at the lowest level scores OOD inputs.

Deliberate differences from the official code (github.com/AlvinZhuyx/CDRL):
1. Several GPUs: `torchrun` splits the global `--batch-size` as the official 8 x 32 DDP run does,
   but averages gradients with one explicit all-reduce (DDP's hooks expect one forward per
   backward); one process with batch 256 is the same effective batch (no batch statistics).
2. The final Tweedie step keeps the official half step scale (score = ∇f / (s²/2), an apparent
   slip: Langevin and the appendix use s²), for comparable numbers; `--exact-tweedie` uses s².
3. The initializer's last convolution has zero weight and zero bias (exactly the identity at the
   start); the official code zeroes the weight only.
4. Spectral norm by `torch.nn.utils.parametrizations.spectral_norm`; u/v start from 15 power
   iterations, and the normalised weights are computed once per Langevin run (same numbers in eval).
5. EMA of both networks as torch_ema does it (decay min(0.9999, (1+k)/(10+k))), on one copy of the
   model; spectral-norm vectors are copied from the trained model (torch_ema leaves them live).
6. Data: shuffled epochs of an in-memory tensor, horizontal flips on CIFAR, CelebA and folders (the
   official code: CIFAR-10 only); other image sets use the CIFAR-10 configuration, the
   initializer's attention at every resolution below full size (MNIST: 14 and 7 px).
7. 2D: the default toy is our `checkerboard` (official: the complementary colouring on [-8, 8]²),
   same networks and step sizes, a schedule of minutes (official: days on a CPU, docs/RESULTS.md);
   the 2D sampler ends with the Tweedie step too (the official toy sampler skips it).
8. Conditional sampling uses balanced labels (k mod K), not random ones; `--guidance 0` evaluates
   the conditional networks only.
9. `--dataset imagenet32` reads the downsampled-ImageNet .npz batches (Chrabaszcz et al. 2017); the
   official code resizes 64x64 ImageNet files to 32x32 as it loads them.
10. Compositional generation (`--compose c1 c2 ...`, ours: no rule given): each level's EBM is
   Σ_k [(1+w) f(y, c_k) - w f(y, ∅)] in the Langevin and Tweedie steps; the initializer's Gaussian
   proposals multiply to mean (1/K) Σ_k [(1+w) g(x, c_k) - w g(x, ∅)], std / sqrt(K).
11. Inpainting (`inpaint`, ours: no scheme given): replacement (Song et al. 2021): at each level the
   known pixels are the diffused observation, fixed through the Langevin steps and kept at the end.
12. FID during training is optional (`--fid-every`; official: always, 5,000 samples every 20,000
   iterations against 5,000 test images); ours: the evaluator's protocol, against the training set.
13. `--preset cpu`: a reduced MNIST configuration (EBM and initializer width 32, one block per
   resolution, batch 64, 3,500 iterations, initializer lr 1e-4: official 1e-5 for a run 140x as
   long).
"""
import contextlib
import copy
import math
import os
import time
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import spectral_norm

import common

# Per-dataset defaults of the fields left at None: "2d" for the toys, "images" for every image set
# (the official CIFAR-10 configuration). official = github.com/AlvinZhuyx/CDRL, its CIFAR-10 or toy
# script.
PRESETS = {
    "2d": {
        "steps": 3000,  # ours, a quick start (official toy 100,000; docstring item 7)
        "batch_size": 256,  # ours (official toy 2,500)
        "lr": 1e-4,  # ours (official toy 3e-6)
        "initializer_lr": 1e-4,  # ours (official toy 1e-5)
        "warmup_steps": 500,  # ours (official toy 10,000)
        "sample_every": 1000,  # ours
        "save_every": 1000,  # ours
        "step_scale": 2e-3,  # official toy
        "noise_scaled_steps": False,  # official toy
        "ebm_channels": 128,  # official toy
        "ebm_blocks": 1,  # official toy
        "init_blocks": 1,  # official toy
        "init_dropout": 0.0,  # official toy
        "guidance": 0.0,  # ours: no guidance unless asked for
        "ebm_channel_mult": (1, 2, 2, 2),  # official toy
        "init_channels": 64,  # official toy
    },
    "images": {
        "steps": 500_000,  # the paper's CIFAR-10 run
        "batch_size": 256,  # official: 32 per GPU x 8 GPUs
        "lr": 1e-4,  # official
        "initializer_lr": 1e-5,  # official
        "warmup_steps": 10_000,  # official
        "sample_every": 5000,  # ours
        "save_every": 50_000,  # ours
        "step_scale": 4e-4,  # official
        "noise_scaled_steps": True,  # official
        "ebm_channels": 128,  # official (256 = CDRL-large)
        "ebm_blocks": 8,  # official
        "init_blocks": 3,  # official
        "init_dropout": 0.1,  # official
        "guidance": 0.0,  # ours: no guidance unless asked for
        "ebm_channel_mult": (1, 2, 2, 2),  # official
        "init_channels": 64,  # official
        "init_channel_mult": (1, 1, 1),  # official
    },
    # ImageNet 32x32: the official configuration (main_cond.py, class-conditional: 1,000 classes,
    # label dropout 0.1; Args makes imagenet32 conditional); the "images" values above hold for
    # every field not named here (batch 256 = 32 per GPU x 8, lr, warm-up, EMA, the EBM); the data
    # differ (docstring item 9)
    "imagenet32": {
        "steps": 1_000_000,  # official
        "init_blocks": 2,  # official
        "guidance": 1.0,  # official: the guidance of its in-training FID samples
    },
    # --preset cpu: the reduced MNIST configuration that trains in about 2 hours on one core of
    # this project's 2-core CPU (docs/RESULTS.md, image results); over "images" for every field it
    # names. "ours: CPU budget" = chosen so that training and a 10,000-sample FID fit that budget.
    "cpu": {
        "steps": 3500,  # ours: CPU budget (paper 500,000)
        "batch_size": 64,  # ours: CPU budget (official 256)
        "initializer_lr": 1e-4,  # ours: 10x the official for a run 1/170 as long (the 2D preset's)
        "warmup_steps": 200,  # ours: CPU budget (official 10,000)
        "sample_every": 500,  # ours
        "save_every": 1000,  # ours
        "ebm_channels": 32,  # ours: CPU budget (official 128)
        "ebm_channel_mult": (1, 2, 2),  # ours: CPU budget (official 1 2 2 2)
        "ebm_blocks": 1,  # ours: CPU budget (official 8)
        "init_channels": 32,  # ours: CPU budget (official 64)
        "init_blocks": 1,  # ours: CPU budget (official 3)
    },
}


@dataclass
class Args(common.RunArgs):
    # the shared settings (run, data, lifecycle, speed, FID) are common.RunArgs's; here the
    # method's defaults of a few of them, then its own
    exp_name: str = "cdrl"
    """name used in the run folder"""
    dataset: str = "checkerboard"
    """checkerboard (the official toy is its complementary colouring, docstring item 7) | rings |
    8gaussians | swissroll | pinwheel | 2spirals | cifar10 | cifar100 | svhn | celeba | mnist |
    fashionmnist | imagenet32 (conditional, docstring item 9) | folder:PATH (images) | points:PATH
    (2D points, .npy or .csv of shape (n, 2))"""
    ema_decay: float = 0.9999
    """EMA decay of both networks for sampling and evaluation"""

    # ---- CDRL ----
    initializer_lr: Optional[float] = None
    """initializer AdamW learning rate, weight decay 0"""
    warmup_steps: Optional[int] = None
    """linear learning-rate warm-up of both networks"""
    grad_clip: float = 1.0
    """gradient-norm clip of each network"""
    num_levels: int = 6
    """L: noise levels of the recovery-likelihood ladder"""
    logsnr_min: float = -5.1
    """log-SNR of the noisiest level (cosine schedule clipped to [logsnr_min, logsnr_max])"""
    logsnr_max: float = 9.8
    """log-SNR of level 0 (the data level)"""
    langevin_steps: int = 15
    """K: Langevin steps per level in training"""
    sample_langevin_steps: Optional[int] = None
    """Langevin steps per level when sampling (default --langevin-steps; the paper's ablation uses
    8, 5, 3)"""
    step_scale: Optional[float] = None
    """Langevin step s_i² = step_scale c_i² σ_i²"""
    noise_scaled_steps: Optional[bool] = None
    """c_i² = sqrt(1-ᾱ_{i-1}) / sqrt(1-ᾱ_0) (True) or the constant 1 / sqrt(1-ᾱ_0) (False)"""
    exact_tweedie: bool = False
    """final Tweedie step with the recovery density's own step s² (default: the official half, see
    docstring)"""
    conditional: bool = False
    """class-conditional EBM and initializer (labels from the dataset, a null class for guidance);
    always on for imagenet32, the paper's only ImageNet model"""
    label_dropout: float = 0.1
    """conditional training: probability of replacing the label by the null class"""
    guidance: Optional[float] = None
    """conditional sampling: classifier-free guidance w, f = (1+w) f(y, c) - w f(y, ∅) (same for the
    initializer)"""
    compose: Tuple[int, ...] = ()
    """conditional sampling: classes (0-based, as in the dataset) whose energies are summed for
    every sample, e.g. --compose 1 3 (compositional generation, docstring item 10); empty: each
    sample its own class, balanced"""
    num_classes: Optional[int] = None
    """set from the dataset when --conditional; stored so build_model can rebuild the nets"""
    hflip: Optional[bool] = None
    """random horizontal flips of training images (default on for cifar10, cifar100, celeba,
    imagenet32, folder)"""
    ebm_channels: Optional[int] = None
    """EBM base width (256 = CDRL-large, 2x channels)"""
    ebm_channel_mult: Optional[Tuple[int, ...]] = None
    """EBM width multipliers per resolution (images: average-pool between them; 2D: one block per
    entry)"""
    ebm_blocks: Optional[int] = None
    """EBM residual blocks per resolution"""
    init_channels: Optional[int] = None
    """initializer base width (U-Net for images, MLP for 2D)"""
    init_channel_mult: Optional[Tuple[int, ...]] = None
    """initializer U-Net width multipliers per resolution"""
    init_blocks: Optional[int] = None
    """initializer residual blocks per resolution"""
    init_dropout: Optional[float] = None
    """initializer dropout"""
    image_size: Optional[int] = None
    """folder: datasets are resized to this (default: the first image's size)"""
    image_channels: Optional[int] = None
    """set from the dataset; stored so build_model can rebuild the nets from a checkpoint"""
    sample_batch: int = 500
    """largest batch the sampler runs at once"""
    n_grid: int = 64
    """images in each sample grid"""
    n_points: int = 5000
    """2D: points drawn for each sample picture"""

    def __post_init__(self):
        common.check_dataset_name(self.dataset)
        toy = common.is_2d(self.dataset)
        common.apply_presets(self, PRESETS)
        if self.hflip is None:
            self.hflip = common.flips_by_default(self.dataset)
        if self.sample_langevin_steps is None:
            self.sample_langevin_steps = self.langevin_steps
        common.set_image_shape(self)
        self.conditional = self.conditional or self.dataset == "imagenet32"
        if self.conditional and self.num_classes is None and not self.dataset.startswith("folder:"):
            if toy or self.dataset == "celeba":
                raise common.UserError(f"--conditional needs class labels, and {self.dataset} has "
                                       "none")
            self.num_classes = {"cifar100": 100, "imagenet32": 1000}.get(self.dataset, 10)
        self.ebm_channel_mult = tuple(self.ebm_channel_mult)
        if self.init_channel_mult is not None:  # images only
            self.init_channel_mult = tuple(self.init_channel_mult)
        common.check_positive(self, ["num_levels", "langevin_steps", "sample_langevin_steps",
                                     "ebm_channels", "ebm_blocks", "init_channels", "init_blocks",
                                     "sample_batch", "n_grid", "n_points"])
        self.compose = tuple(self.compose)
        common.require(
            (self.initializer_lr > 0 and self.step_scale > 0 and self.grad_clip > 0,
             "--initializer-lr, --step-scale and --grad-clip must be positive"),
            (0 <= self.label_dropout < 1 and 0 <= self.init_dropout < 1,
             "--label-dropout and --init-dropout must be in [0, 1)"),
            (self.warmup_steps >= 0, f"--warmup-steps must be >= 0, got {self.warmup_steps}"),
            (self.logsnr_min < self.logsnr_max, "--logsnr-min must be below --logsnr-max"),
            (self.guidance == 0 or self.conditional, "--guidance needs a --conditional model"),
            (not self.compose or self.conditional, "--compose needs a --conditional model"))
        self.check_compose()

    def check_compose(self):
        """--compose names classes of the model (folder: datasets know theirs once loaded)."""
        known = self.num_classes if self.num_classes is not None else math.inf
        if not all(0 <= c < known for c in self.compose):
            raise common.UserError(f"--compose takes classes 0..{known - 1}, got "
                                   f"{list(self.compose)}")


common.show_preset_defaults(Args, PRESETS)


# ==================================================================================================
# NETWORK
# ==================================================================================================
def logsnr_to_time(logsnr: torch.Tensor) -> torch.Tensor:
    """The networks' time input: arctan(exp(-logSNR/2)) / (π/2) in [0, 1], times 1000 (official
    scaling)."""
    return torch.arctan(torch.exp(-0.5 * logsnr.clamp(-20.0, 20.0))) / (0.5 * math.pi) * 1000.0


def sinusoidal_embedding(time: torch.Tensor, dim: int) -> torch.Tensor:
    """DDPM / tensor2tensor sinusoidal embedding of a real-valued time."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000)
                      * torch.arange(half, device=time.device, dtype=torch.float32) / (half - 1))
    angles = time.float()[:, None] * freqs[None]
    return torch.cat([angles.sin(), angles.cos()], 1)


def lrelu(x):
    return F.leaky_relu(x, 0.2)


def as_feature_map(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B, C) -> broadcastable against `like` (B, C) or (B, C, H, W)."""
    return v.view(*v.shape, *[1] * (like.dim() - 2))


class EBMBlock(nn.Module):
    """Official EBM residual block: lrelu -> conv -> + lrelu(Linear(lrelu(temb))) -> lrelu -> conv x
    learnable per-channel scale; 3x3 conv shortcut when the width changes. Spectral norm on every
    conv and linear. 2D: the same with linear layers."""

    def __init__(self, c_in: int, c_out: int, temb_dim: int, image: bool):
        super().__init__()
        layer = (lambda i, o: nn.Conv2d(i, o, 3, padding=1)) if image else nn.Linear
        self.conv1 = spectral_norm(layer(c_in, c_out))
        self.conv2 = spectral_norm(layer(c_out, c_out))
        self.temb_proj = spectral_norm(nn.Linear(temb_dim, c_out))
        self.scale = nn.Parameter(torch.ones(c_out))
        self.shortcut = spectral_norm(layer(c_in, c_out)) if c_in != c_out else nn.Identity()

    def level_bias(self, temb):
        """The per-channel bias lrelu(Linear(lrelu(temb))); it depends on the level only."""
        return lrelu(self.temb_proj(lrelu(temb)))

    def forward(self, x, bias):
        # the level bias and the scale (fp32) in the activations' dtype: under --amp bf16 the
        # block stays bf16 instead of being promoted back to fp32 after every convolution
        h = self.conv1(lrelu(x))
        h = h + as_feature_map(bias, x).to(h.dtype)
        h = self.conv2(lrelu(h)) * as_feature_map(self.scale, h).to(h.dtype)
        return h + self.shortcut(x)


class EnergyNet(nn.Module):
    """f_θ(y, level): the official EBM. Images: 3x3 conv in, `blocks` EBMBlocks per resolution,
    average-pool between resolutions, output <sum over pixels of relu(h), Linear(lrelu(temb))> (that
    last linear without spectral norm, as official). 2D (official toy): linear in, `blocks` blocks
    per width entry, no pooling, output Linear(relu(h)) -> 1.

    Everything that depends on the level alone (the time embedding from the lower level's log-SNR,
    plus a class embedding when conditional, and what each block and the output take from it) is
    split off as `embed`, so that a Langevin run computes it once (the same numbers; on the 2D net
    the blocks' embedding projections are most of a pass's FLOPs).
    """

    def __init__(self, in_dim: int, ch: int, ch_mult: Tuple[int, ...], blocks: int, image: bool,
                 num_classes: Optional[int]):
        super().__init__()
        self.ch, self.image = ch, image
        temb_dim = 4 * ch
        self.temb_map1 = spectral_norm(nn.Linear(ch, temb_dim))
        self.temb_map2 = spectral_norm(nn.Linear(temb_dim, temb_dim))
        # labels 1..K are classes, 0 the null class of classifier-free guidance (official
        # convention)
        self.class_map = (spectral_norm(nn.Linear(num_classes + 1, temb_dim)) if num_classes
                          else None)
        self.conv_in = spectral_norm(nn.Conv2d(in_dim, ch, 3, padding=1) if image
                                     else nn.Linear(in_dim, ch))
        self.stages = nn.ModuleList()
        width = ch
        for mult in ch_mult:
            stage = nn.ModuleList()
            for _ in range(blocks):
                stage.append(EBMBlock(width, ch * mult, temb_dim, image))
                width = ch * mult
            self.stages.append(stage)
        self.head = (nn.Linear(temb_dim, width, bias=False) if image
                     else nn.Linear(width, 1, bias=False))

    def embed(self, logsnr: torch.Tensor, labels: Optional[torch.Tensor]) -> list:
        """Per row: each block's level bias, then (images) the output projection
        Linear(lrelu(temb))."""
        time_features = sinusoidal_embedding(logsnr_to_time(logsnr), self.ch)
        temb = self.temb_map2(lrelu(self.temb_map1(time_features)))
        if self.class_map is not None:
            temb = temb + self.class_map(F.one_hot(labels, self.class_map.in_features).float())
        biases = [block.level_bias(temb) for stage in self.stages for block in stage]
        return biases + [self.head(lrelu(temb))] if self.image else biases

    def forward(self, y, cond):
        """f(y) for cond = embed(logsnr, labels)."""
        h, biases = self.conv_in(y), iter(cond)
        for i, stage in enumerate(self.stages):
            for block in stage:
                h = block(h, next(biases))
            if self.image and i < len(self.stages) - 1:
                h = F.avg_pool2d(h, 2)
        if self.image:
            return (F.relu(h).sum((2, 3)) * next(biases)).sum(1)
        return self.head(F.relu(h)).squeeze(1)


class InitBlock(nn.Module):
    """Initializer residual block (official, from lucidrains' DDPM U-Net): GroupNorm -> SiLU ->
    [resample] -> conv -> GroupNorm x (1 + scale) + shift from the time embedding -> SiLU -> dropout
    -> zero-initialised conv; 1x1 conv shortcut when the width changes. 2D: the same with linear
    layers."""

    def __init__(self, c_in: int, c_out: int, temb_dim: int, image: bool, dropout: float,
                 resample=None):
        super().__init__()
        self.norm1 = nn.GroupNorm(min(32, c_in), c_in, eps=1e-6)
        self.norm2 = nn.GroupNorm(min(32, c_out), c_out, eps=1e-6)
        layer = (lambda i, o: nn.Conv2d(i, o, 3, padding=1)) if image else nn.Linear
        self.conv1, self.conv2 = layer(c_in, c_out), layer(c_out, c_out)
        nn.init.zeros_(self.conv2.weight)
        self.scale_shift = nn.Linear(temb_dim, 2 * c_out)
        self.dropout = nn.Dropout(dropout)
        self.resample = resample
        self.shortcut = nn.Identity()
        if c_in != c_out:
            self.shortcut = nn.Conv2d(c_in, c_out, 1) if image else nn.Linear(c_in, c_out)

    def forward(self, x, temb):
        h = F.silu(self.norm1(x))
        if self.resample == "down":
            h, x = F.avg_pool2d(h, 2), F.avg_pool2d(x, 2)
        elif self.resample == "up":
            h = F.interpolate(h, scale_factor=2.0, mode="nearest")
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        scale, shift = as_feature_map(self.scale_shift(F.silu(temb)), x).chunk(2, dim=1)
        h = F.silu(self.norm2(self.conv1(h)) * (1 + scale) + shift)
        return self.conv2(self.dropout(h)) + self.shortcut(x)


class Attention(nn.Module):
    """Single-head self-attention over pixels with a zero-initialised output projection and a
    residual."""

    def __init__(self, ch: int):
        super().__init__()
        self.norm = nn.GroupNorm(min(32, ch), ch, eps=1e-6)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.out = nn.Conv2d(ch, ch, 1)
        nn.init.zeros_(self.out.weight)

    def forward(self, x):
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).view(b, 3, 1, c, h * w).transpose(-1, -2).unbind(1)
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q kᵀ / sqrt(c)) v, (b, 1, hw, c)
        return x + self.out(out.transpose(-1, -2).reshape(b, c, h, w))


class TimeMLP(nn.Module):
    """sinusoid(logSNR time) -> Linear -> SiLU -> Linear, plus Linear(one-hot label) when
    conditional."""

    def __init__(self, ch: int, temb_dim: int, num_classes: Optional[int]):
        super().__init__()
        self.ch = ch
        self.mlp = nn.Sequential(nn.Linear(ch, temb_dim), nn.SiLU(), nn.Linear(temb_dim, temb_dim))
        self.class_map = nn.Linear(num_classes + 1, temb_dim) if num_classes else None

    def forward(self, logsnr, labels):
        temb = self.mlp(sinusoidal_embedding(logsnr_to_time(logsnr), self.ch))
        if self.class_map is not None:
            temb = temb + self.class_map(F.one_hot(labels, self.class_map.in_features).float())
        return temb


class UNetInitializer(nn.Module):
    """g_φ(x_i, level) for images: the official U-Net (64 channels, mult (1, 1, 1), 3 blocks per
    resolution, attention below full resolution and in the middle, dropout 0.1, GroupNorm + SiLU,
    scale-shift time conditioning), predicting the mean of y = α_mul x_{i-1} as x_i + net(x_i) with
    a zero-initialised last conv, so it starts as the identity."""

    def __init__(self, in_ch: int, ch: int, ch_mult: Tuple[int, ...], blocks: int, dropout: float,
                 num_classes: Optional[int]):
        super().__init__()
        temb_dim = 4 * ch
        self.time = TimeMLP(ch, temb_dim, num_classes)
        self.conv_in = nn.Conv2d(in_ch, ch, 3, padding=1)
        widths = [ch] + [ch * m for m in ch_mult]
        self.down, self.up = nn.ModuleList(), nn.ModuleList()
        skip_widths = [ch]
        # down: `blocks` blocks (+ attention), then a downsampling block
        for level in range(len(ch_mult)):
            for b in range(blocks):
                self.down.append(InitBlock(widths[level] if b == 0 else widths[level + 1],
                                           widths[level + 1], temb_dim, True, dropout))
                self.down.append(Attention(widths[level + 1]) if level > 0 else nn.Identity())
                skip_widths.append(widths[level + 1])
            if level < len(ch_mult) - 1:
                self.down.append(InitBlock(widths[level + 1], widths[level + 1], temb_dim, True,
                                           dropout, "down"))
                self.down.append(nn.Identity())
                skip_widths.append(widths[level + 1])
        self.mid1 = InitBlock(widths[-1], widths[-1], temb_dim, True, dropout)
        self.mid_attn = Attention(widths[-1])
        self.mid2 = InitBlock(widths[-1], widths[-1], temb_dim, True, dropout)
        width = widths[-1]
        # up: blocks + 1 blocks on [h, skip], then upsample
        for level in reversed(range(len(ch_mult))):
            for _ in range(blocks + 1):
                self.up.append(InitBlock(width + skip_widths.pop(), widths[level + 1], temb_dim,
                                         True, dropout))
                self.up.append(Attention(widths[level + 1]) if level > 0 else nn.Identity())
                width = widths[level + 1]
            if level > 0:
                self.up.append(InitBlock(width, width, temb_dim, True, dropout, "up"))
                self.up.append(nn.Identity())
        self.norm_out = nn.GroupNorm(min(32, width), width, eps=1e-6)
        self.conv_out = nn.Conv2d(width, in_ch, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x, logsnr, labels=None):
        temb = self.time(logsnr, labels)
        h = self.conv_in(x)
        skips = [h]
        for block, attn in zip(self.down[::2], self.down[1::2]):
            h = attn(block(h, temb))
            skips.append(h)
        h = self.mid2(self.mid_attn(self.mid1(h, temb)), temb)
        for block, attn in zip(self.up[::2], self.up[1::2]):
            h = attn(block(torch.cat([h, skips.pop()], 1) if block.resample is None else h, temb))
        return x + self.conv_out(F.silu(self.norm_out(h)))


class MLPInitializer(nn.Module):
    """g_φ(x_i, level) for 2D (the official toy's): Linear(2, ch), `blocks` InitBlocks, SiLU,
    zero-initialised Linear(ch, 2) without bias, plus x_i."""

    def __init__(self, ch: int, blocks: int, num_classes: Optional[int]):
        super().__init__()
        self.time = TimeMLP(2 * ch, 2 * ch, num_classes)
        self.lin_in = nn.Linear(2, ch)
        self.blocks = nn.ModuleList(InitBlock(ch, ch, 2 * ch, False, 0.0) for _ in range(blocks))
        self.lin_out = nn.Linear(ch, 2, bias=False)
        nn.init.zeros_(self.lin_out.weight)

    def forward(self, x, logsnr, labels=None):
        temb = self.time(logsnr, labels)
        h = self.lin_in(x)
        for block in self.blocks:
            h = block(h, temb)
        return x + self.lin_out(F.silu(h))


class CDRL(nn.Module):
    """Both networks plus the level tables (buffers, index = level 0..L) that training and sampling
    use."""

    def __init__(self, ebm: nn.Module, initializer: nn.Module, tables: dict, amp: bool = False,
                 compile_sampler: bool = False):
        super().__init__()
        self.ebm, self.initializer = ebm, initializer
        self.amp, self.compile_sampler = amp, compile_sampler
        for name, value in tables.items():
            self.register_buffer(name, value.float())
        self.num_levels = len(tables["logsnr"]) - 1

    def f(self, y, level, labels=None):
        """f_θ(y, level) with the lower level's log-SNR as the time input. Under --amp bf16 the
        spectral-normalised weights are computed first, in fp32 (on CUDA autocast would run their
        power iteration's matrix-vector products in bf16), and once for the pass."""
        with parametrize.cached() if self.amp else contextlib.nullcontext():
            if self.amp:
                normalised_weights(self.ebm)
            return self.f_embedded(y, self.ebm.embed(self.logsnr[level - 1], labels))

    def f_embedded(self, y, cond):
        """f_θ(y) for cond = ebm.embed(...), in fp32; the EBM's passes in bf16 when --amp bf16."""
        with common.autocast_bf16(self.amp, y.device.type):
            return self.ebm(y, cond).float()


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
    """Per-level constants (float64, index 0..L; entries at index 0 are unused except logsnr /
    alpha_bar).

    α_mul_i = sqrt(ᾱ_i / ᾱ_{i-1}) (1 at the top level: its EBM sees x_{L-1} itself), σ_i² = 1 -
    ᾱ_i/ᾱ_{i-1}, the Langevin step s_i² = step_scale c_i² σ_i², the coefficient q_i = step_scale
    c_i² / 2 = s_i² / (2σ_i²) of the quadratic term's drift (s²/2) ∇(-||y - x||²/(2σ²)) = -q (y - x)
    (0 at the top level), the loss weight σ_1 / σ_i and the initializer's proposal noise std
    sqrt(β̃_i α_mul²) (DDPM posterior variance β̃).
    """
    levels = torch.arange(args.num_levels + 1, dtype=torch.float64)
    logsnr = logsnr_schedule(levels / args.num_levels, args.logsnr_min, args.logsnr_max)
    alpha_bar = torch.sigmoid(logsnr)
    ratio = torch.ones_like(alpha_bar)
    ratio[1:] = alpha_bar[1:] / alpha_bar[:-1]
    sigma_sq = 1 - ratio
    prev_var = torch.ones_like(alpha_bar)
    prev_var[1:] = 1 - alpha_bar[:-1]  # 1 - ᾱ_{i-1}
    if args.noise_scaled_steps:
        c_sq = prev_var.sqrt() / (1 - alpha_bar[0]).sqrt()
    else:
        c_sq = torch.ones_like(alpha_bar) / (1 - alpha_bar[0]).sqrt()
    top = levels == args.num_levels
    alpha_mul = torch.where(top, 1.0, ratio.sqrt())
    posterior_var = prev_var / (1 - alpha_bar) * sigma_sq  # β̃_i = (1-ᾱ_{i-1}) / (1-ᾱ_i) β_i
    weight = torch.zeros_like(alpha_bar)
    weight[1:] = sigma_sq[1].sqrt() / sigma_sq[1:].sqrt()
    return {"logsnr": logsnr, "alpha_bar": alpha_bar, "alpha_mul": alpha_mul,
            "sigma": sigma_sq.sqrt(),
            "step_sq": args.step_scale * c_sq * sigma_sq,
            "quad_coef": torch.where(top, 0.0, args.step_scale * c_sq / 2),
            "loss_weight": weight, "proposal_std": (posterior_var * alpha_mul ** 2).sqrt()}


def diffuse(model: CDRL, x0, level, noise):
    """x_level = sqrt(ᾱ) x_0 + sqrt(1 - ᾱ) ε (variance preserving)."""
    alpha_bar = as_batch(model.alpha_bar[level], x0)
    return alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise


def as_batch(per_example: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return per_example.view(-1, *[1] * (like.dim() - 1))


# ==================================================================================================
# SAMPLER
# ==================================================================================================
def conditions(labels: Optional[torch.Tensor]) -> list:
    """The conditions a sampler composes: [None] (unconditional), [labels] for labels (n,) (one
    class per row), or the K columns of labels (n, K) (--compose: K classes for every row)."""
    if labels is None:
        return [None]
    return list(labels.view(len(labels), -1).unbind(1))


def guided(output, conds: list, cond_null, guidance: float):
    """The sum over composed conditions c_k of classifier-free-guided outputs, Σ_k (1+w) output(c_k)
    - w output(∅) (a product of the conditional densities for an energy); with one condition plain
    guidance, with w = 0 output(∅) is not computed."""
    total = sum(output(cond) for cond in conds)
    if guidance == 0:
        return total
    return (1 + guidance) * total - guidance * len(conds) * output(cond_null)


def energy_and_grad(model: CDRL, y, conds: list, guidance: float = 0.0, cond_null=None):
    """The energy -f(y) (the network's output before the 1/s² scale; the sum over the composed
    conditions' embeddings conds, guided by w = guidance with the null class's embedding cond_null)
    and its gradient in y, without touching parameter gradients."""
    with torch.enable_grad():
        y = y.detach().requires_grad_(True)
        f = guided(lambda cond: model.f_embedded(y, cond), conds, cond_null, guidance)
        (grad,) = torch.autograd.grad(f.sum(), y)
    return -f.detach(), -grad


def normalised_weights(ebm: nn.Module):
    """Compute every spectral-normalised weight of the EBM now, outside any autocast, so that
    inside parametrize.cached() the passes that follow reuse them."""
    for module in ebm.modules():
        if parametrize.is_parametrized(module, "weight"):
            module.weight


def recovery_langevin(model: CDRL, y, x_noisy, level, labels, n_steps: int, guidance: float = 0.0,
                      known=None):
    """n_steps of Langevin on the recovery density f(y)/s² - ||y - x_noisy||²/(2σ²) (the marginal
    f(y)/s² at the top level), step s²:  y <- y + ½∇f(y) - q (y - x_noisy) + s ε with q = step_scale
    c² / 2 (0 at the top); known = (mask, values) holds the masked entries of y at the values after
    every step (inpainting: Langevin on the other entries given them). The EBM should be in eval
    mode; nothing here syncs with the host."""
    step = as_batch(model.step_sq[level], y).sqrt()
    quad = as_batch(model.quad_coef[level], y)
    columns = conditions(labels)
    with torch.no_grad():
        conds = [model.ebm.embed(model.logsnr[level - 1], column) for column in columns]
        cond_null = (model.ebm.embed(model.logsnr[level - 1], torch.zeros_like(columns[0]))
                     if guidance else None)
    y = y.detach()
    grad_pass = common.compiled(energy_and_grad, model.compile_sampler)
    with parametrize.cached():  # spectral-normalised weights computed once for the whole run
        with torch.no_grad():  # here, so that a --compile graph reads them as plain inputs
            normalised_weights(model.ebm)
        for _ in range(n_steps):
            _, grad = grad_pass(model, y, conds, guidance, cond_null)  # grad = -∇f
            y = y - 0.5 * grad - quad * (y - x_noisy) + step * torch.randn_like(y)
            if known is not None:
                y = torch.where(known[0], known[1], y)
    return y


def tweedie_step(model: CDRL, x, labels, guidance: float, exact: bool):
    """E[x_clean | x at level 0] = (x + (1-ᾱ_0) ∇ log p(x)) / sqrt(ᾱ_0) with log p(x) = f(α_mul x,
    1) / s_1²; the official code divides by s_1²/2 (docstring item 2), `exact` by s_1²."""
    one = torch.ones(len(x), dtype=torch.long, device=x.device)
    scale = model.step_sq[1] if exact else model.step_sq[1] / 2
    with torch.enable_grad():
        x_var = x.detach().requires_grad_(True)
        y = model.alpha_mul[1] * x_var
        columns = conditions(labels)
        f = guided(lambda column: model.f(y, one, column), columns,
                   None if labels is None else torch.zeros_like(columns[0]), guidance)
        (score,) = torch.autograd.grad(f.sum() / scale, x_var)
    return ((x + (1 - model.alpha_bar[0]) * score) / model.alpha_bar[0].sqrt()).detach()


def generate(model: CDRL, n: int, args, device, step_multiplier: int = 1, labels=None,
             keep_levels: bool = False, known=None):
    """The paper's sampler from x_L ~ N(0, I): for i = L..1, y = g(x_i) + proposal noise, Langevin
    on the recovery density (step_multiplier x --sample-langevin-steps, --guidance), x_{i-1} = y /
    α_mul; then one Tweedie step. Returns x_0 (and x_{L-1}..x_0 if keep_levels).

    Inpainting (known = (mask, x_clean), our replacement scheme, docstring item 11): at level i the
    masked entries of x_i are replaced by the diffused observation sqrt(ᾱ_i) x_clean + sqrt(1-ᾱ_i) ε
    and held at α_mul times its level-(i-1) twin (the same ε, as the training pairs) through the
    Langevin steps; the result has the clean masked entries."""
    x, per_level = torch.randn((n,) + sample_shape(args), device=device), []
    columns = conditions(labels)
    null = None if labels is None else torch.zeros_like(columns[0])
    progress = common.Progress("sampler, levels", model.num_levels, interval=30, quiet=True)
    for i in range(model.num_levels, 0, -1):
        level = torch.full((len(x),), i, dtype=torch.long, device=x.device)
        held = None
        if known is not None:
            mask, clean = known
            noise = torch.randn_like(x)
            x = torch.where(mask, diffuse(model, clean, level, noise), x)
            held = (mask, model.alpha_mul[i] * diffuse(model, clean, level - 1, noise))
        # composed (K conditions): the product of the K Gaussian proposals N(mean_k, std²), i.e.
        # their average mean and std / sqrt(K) (our choice, docstring item 10)
        with torch.no_grad():
            mean = guided(lambda column: model.initializer(x, model.logsnr[level], column),
                          columns, null, args.guidance) / len(columns)
        std = as_batch(model.proposal_std[level], x) / math.sqrt(len(columns))
        y = mean + std * torch.randn_like(x)
        y = recovery_langevin(model, y, x, level, labels, args.sample_langevin_steps
                              * step_multiplier, args.guidance, held)
        x = y / model.alpha_mul[i]
        if keep_levels:
            per_level.append(x)
        progress.update(1)
    x = tweedie_step(model, x, labels, args.guidance, args.exact_tweedie)
    if known is not None:
        x = torch.where(known[0], known[1], x)
    return (x, per_level) if keep_levels else x


# ==================================================================================================
# LOSS
# ==================================================================================================
def cdrl_step(model: CDRL, x0, labels, args, optimizers):
    """One cooperative update (official order): EBM positives in train mode (one spectral-norm power
    iteration), proposals from the initializer (train mode, dropout on), K Langevin steps with the
    EBM in eval mode, EBM negatives, EBM step; then the initializer regresses its proposal onto the
    refined samples.

    Returns detached (EBM loss, initializer loss, mean energy -f(pos), mean -f(neg) (the network's
    output before the 1/s² scale), EBM grad norm, initializer grad norm).
    """
    ebm_opt, init_opt = optimizers
    level = torch.randint(1, model.num_levels + 1, (len(x0),), device=x0.device)
    noise = torch.randn_like(x0)  # shared by x_{i-1} and x_i ("variance reduction", official)
    x_prev, x_noisy = diffuse(model, x0, level - 1, noise), diffuse(model, x0, level, noise)
    weight = model.loss_weight[level]

    ebm_opt.zero_grad(set_to_none=True)
    init_opt.zero_grad(set_to_none=True)
    model.ebm.train()
    f_pos = model.f(as_batch(model.alpha_mul[level], x0) * x_prev, level, labels)
    (-(weight * f_pos).mean()).backward()
    proposal = model.initializer(x_noisy, model.logsnr[level], labels) + \
        as_batch(model.proposal_std[level], x0) * torch.randn_like(x0)
    model.ebm.eval()
    refined = recovery_langevin(model, proposal.detach(), x_noisy, level, labels,
                                args.langevin_steps)
    f_neg = model.f(refined, level, labels)
    (weight * f_neg).mean().backward()
    common.average_gradients(model.ebm.parameters())  # torchrun: the global batch's gradient
    ebm_grad = torch.nn.utils.clip_grad_norm_(model.ebm.parameters(), args.grad_clip)
    ebm_opt.step()

    # initializer: sum of squares over coordinates, mean over the batch
    init_loss = (refined - proposal).pow(2).flatten(1).sum(1).mean()
    init_loss.backward()
    common.average_gradients(model.initializer.parameters())
    init_grad = torch.nn.utils.clip_grad_norm_(model.initializer.parameters(), args.grad_clip)
    init_opt.step()
    ebm_loss = (weight * (f_neg.detach() - f_pos.detach())).mean()
    return (ebm_loss, init_loss.detach(), -f_pos.detach().mean(), -f_neg.detach().mean(), ebm_grad,
            init_grad)


def warmup_factors(args):
    """Official warm-ups over W = --warmup-steps: EBM lr x min(1, k / W) (so 0 at the first update,
    as official), initializer lr x min(1, (k + 500) / W); W = 0 means no warm-up."""
    if args.warmup_steps == 0:
        return (lambda k: 1.0), (lambda k: 1.0)
    warm = args.warmup_steps
    return (lambda k: min(1.0, k / warm)), (lambda k: min(1.0, (k + 500) / warm))


# ==================================================================================================
# PUBLIC API
# ==================================================================================================
def sample_shape(args):
    if common.is_2d(args.dataset):
        return (2,)
    return (args.image_channels, args.image_size, args.image_size)


def build_model(args) -> CDRL:
    """EBM + initializer (PyTorch default init, zero-initialised residual outputs) + level
    tables."""
    num_classes = args.num_classes if args.conditional else None
    if common.is_2d(args.dataset):
        ebm = EnergyNet(2, args.ebm_channels, args.ebm_channel_mult, args.ebm_blocks, False,
                        num_classes)
        initializer = MLPInitializer(args.init_channels, args.init_blocks, num_classes)
    else:
        factor = 2 ** (len(args.init_channel_mult) - 1)
        if args.image_size % factor:
            raise common.UserError(f"image size {args.image_size} is not divisible by {factor}: "
                                   "the initializer U-Net halves it once per --init-channel-mult "
                                   "entry after the first")
        ebm = EnergyNet(args.image_channels, args.ebm_channels, args.ebm_channel_mult,
                        args.ebm_blocks, True, num_classes)
        initializer = UNetInitializer(args.image_channels, args.init_channels,
                                      args.init_channel_mult,
                                      args.init_blocks, args.init_dropout, num_classes)
    model = CDRL(ebm, initializer, level_tables(args), amp=args.amp == "bf16",
                 compile_sampler=args.compile)
    return common.memory_layout(model, args.channels_last)


def sample_labels(n: int, args, device):
    """Balanced class labels 1..K (sample k has class k mod K), None for an unconditional model;
    with --compose the composed classes for every sample, (n, K)."""
    if not args.conditional:
        return None
    if args.compose:
        return (torch.tensor(args.compose, device=device) + 1).expand(n, -1)
    return torch.arange(n, device=device) % args.num_classes + 1


def sample(model: CDRL, n: int, args, device, step_multiplier: int = 1) -> torch.Tensor:
    """n samples by the paper's sampler (EMA weights when the caller loaded them), in batches of
    --sample-batch, with step_multiplier x --sample-langevin-steps per level and --guidance for
    conditional models."""
    model.eval()
    out = []
    labels = sample_labels(n, args, device)
    for first in range(0, n, args.sample_batch):
        count = min(args.sample_batch, n - first)
        batch = generate(model, count, args, device, step_multiplier,
                         None if labels is None else labels[first:first + count])
        out.append(batch if common.is_2d(args.dataset) else batch.clamp(-1, 1))
    return torch.cat(out)


def inpaint(model: CDRL, x: torch.Tensor, known: torch.Tensor, args, device) -> torch.Tensor:
    """Images x in [-1, 1] with the entries where `known` (a bool mask of x's shape) is False
    missing -> the same images with those entries sampled given the others (generate's replacement
    scheme; conditional models: balanced labels, --guidance), in batches of --sample-batch."""
    model.eval()
    out = []
    labels = sample_labels(len(x), args, device)
    for first in range(0, len(x), args.sample_batch):
        rows = slice(first, first + args.sample_batch)
        batch = (x[rows].to(device), known[rows].to(device))
        out.append(generate(model, len(batch[0]), args, device, known=(batch[1], batch[0]),
                            labels=None if labels is None else labels[rows]).clamp(-1, 1))
    return torch.cat(out)


def energy(model: CDRL, x: torch.Tensor, args) -> torch.Tensor:
    """Energy of clean data at the lowest level, -f(α_mul,1 x) / s_1² (the recovery marginal's
    log-density up to a constant, as the official toy plots it); conditional models use the null
    class."""
    model.eval()
    level = torch.ones(len(x), dtype=torch.long, device=x.device)
    labels = torch.zeros(len(x), dtype=torch.long, device=x.device) if args.conditional else None
    with torch.no_grad():
        return -model.f(model.alpha_mul[1] * x, level, labels) / model.step_sq[1]


# ==================================================================================================
# TRAINING
# ==================================================================================================
# settings that may change on --resume besides common.RESUMABLE (sampling options)
RESUMABLE = common.RESUMABLE | {"sample_langevin_steps", "sample_batch", "n_grid", "n_points",
                                "exact_tweedie", "guidance", "compose", "num_classes"}


def save_pictures(model: CDRL, args, tag, device, box):
    """2D: the learned density of every level (exp(f(α_mul x, i)/s_i²) on a grid, i.e. the marginal
    of x_{i-1}) and the sampler's points after each level. Images: a grid of samples."""
    model.eval()
    if common.is_2d(args.dataset):
        lo, hi = box
        grid = common.grid_2d(lo, hi, 200).float().to(device)
        densities = []
        with torch.no_grad():
            for i in range(1, args.num_levels + 1):
                level = torch.full((len(grid),), i, dtype=torch.long, device=device)
                null = torch.zeros_like(level) if args.conditional else None
                logits = model.f(model.alpha_mul[i] * grid, level, null) / model.step_sq[i]
                densities.append(torch.softmax(logits, 0).view(200, 200).cpu())
        x, per_level = generate(model, args.n_points, args, device,
                                labels=sample_labels(args.n_points, args, device), keep_levels=True)
        common.save_panels(densities, os.path.join(args.run_dir, f"density_per_level_{tag}.png"))
        common.save_panels([common.histogram_2d(p.cpu(), lo, hi, 200) for p in per_level[::-1]] +
                           [common.histogram_2d(x.cpu(), lo, hi, 200)],
                           os.path.join(args.run_dir, f"samples_per_level_{tag}.png"))
    else:
        common.save_image_grid(sample(model, args.n_grid, args, device),
                               os.path.join(args.run_dir, f"samples_{tag}.png"),
                               nrow=args.num_classes if args.conditional and args.num_classes <= 16
                               else None)
    model.train()


def main(args: Args):
    device = common.start_processes(args.device)
    ckpt = common.open_run(args, "cdrl", RESUMABLE)
    common.seed_everything(args.seed)
    common.check_divisible(batch_size=args.batch_size)

    # ---- data ----
    train_data, box = common.training_data(args)
    all_labels = None
    if args.conditional:
        all_labels = common.load_labels(args.dataset, args.data_dir, train=True).to(device)
        args.num_classes = args.num_classes or int(all_labels.max()) + 1
        args.check_compose()
    indices = torch.arange(len(train_data), device=device)
    loader = common.EpochLoader(indices, args.batch_size, args.seed)
    train_data = train_data.to(device)
    common.prepare_run_dir(args, ckpt["step"] if ckpt else 0)

    # ---- model, optimisers, EMA ----
    model = build_model(args).to(device)
    common.broadcast_from_main(model)
    ema = copy.deepcopy(model).requires_grad_(False)
    ebm_opt = torch.optim.Adam(model.ebm.parameters(), lr=args.lr, betas=(0.9, 0.999))
    init_opt = torch.optim.AdamW(model.initializer.parameters(), lr=args.initializer_lr,
                                 betas=(0.9, 0.999), weight_decay=0.0)
    ebm_warm, init_warm = warmup_factors(args)
    ebm_sched = torch.optim.lr_scheduler.LambdaLR(ebm_opt, ebm_warm)
    init_sched = torch.optim.lr_scheduler.LambdaLR(init_opt, init_warm)
    start_step = 0
    if ckpt is not None:
        start_step = common.restore(ckpt, model, ema, loader)
        ebm_opt.load_state_dict(ckpt["optimizer"]["ebm"])
        init_opt.load_state_dict(ckpt["optimizer"]["initializer"])
        ebm_sched.load_state_dict(ckpt["scheduler"]["ebm"])
        init_sched.load_state_dict(ckpt["scheduler"]["initializer"])
    common.print_start(args, f"CDRL on {args.dataset}: EBM {common.count_parameters(model.ebm)}, "
                             f"initializer {common.count_parameters(model.initializer)}, device "
                             f"{device}")
    fid = common.TrainingFid(args, train_data, device, ckpt, start_step)

    def checkpoint(step, snapshot, best=False):
        state = common.checkpoint_state(
            "cdrl", args, step, model, ema, best_fid=fid.best, box=box, loader=loader.state_dict(),
            optimizer={"ebm": ebm_opt.state_dict(), "initializer": init_opt.state_dict()},
            scheduler={"ebm": ebm_sched.state_dict(), "initializer": init_sched.state_dict()})
        common.save_checkpoint(state, args.run_dir, snapshot_step=step if snapshot else None,
                               best=best)

    log = common.MetricLog(args.run_dir, args.steps, start_step)
    model.train()
    t_start = time.time()
    with common.StopGuard(args.save_minutes) as guard:
        for step in range(start_step, args.steps):
            idx = loader.next()
            x0 = common.to_model_space(train_data[idx])
            if args.hflip:
                x0 = torch.where(torch.rand(len(x0), 1, 1, 1, device=device) < 0.5, x0.flip(3), x0)
            labels = None
            if args.conditional:  # classes 1..K, the null class 0 with probability label_dropout
                labels = torch.where(torch.rand(len(idx), device=device) < args.label_dropout, 0,
                                     all_labels[idx] + 1)
            loss, init_loss, energy_pos, energy_neg, grad_norm, init_grad_norm = cdrl_step(
                model, x0, labels, args, (ebm_opt, init_opt))
            ebm_sched.step()
            init_sched.step()
            # torch_ema's decay warm-up: min(decay, (1 + k) / (10 + k)) at update k
            decay = min(args.ema_decay, (2 + step) / (11 + step))
            common.update_ema(ema, model, decay, copy_buffers=True)

            done = step + 1
            log_now, sample_now, fid_now, save_now = guard.due(done, args)
            if log_now or sample_now or save_now:
                loss, init_loss, energy_pos, energy_neg = common.mean_over_ranks(
                    loss, init_loss, energy_pos, energy_neg)
                common.stop_if_diverged(done, loss, energy_pos, energy_neg, args.run_dir,
                                        "Lower --lr or --step-scale.")
            if log_now:
                log.log(done, {"loss": loss.item(), "energy_pos": energy_pos.item(),
                               "energy_neg": energy_neg.item(), "grad_norm": grad_norm.item(),
                               "lr": ebm_opt.param_groups[0]["lr"], "init_loss": init_loss.item(),
                               "init_grad_norm": init_grad_norm.item()})
            if sample_now and common.is_main():
                with common.own_rng(args.seed + done):
                    save_pictures(ema, args, f"{done:08d}", device, box)
            best = fid_now and fid.measure(sample, ema, done, log, guard.stopping)
            if save_now:
                checkpoint(done, snapshot=done % args.save_every == 0, best=best)
                guard.saved(args.run_dir, done, "cdrl.py")
    print(f"training done in {common.format_seconds(time.time() - t_start)}")
    # resumed a finished run: only draw samples (e.g. with new sampling options)
    if common.end_processes() and start_step >= args.steps:
        with common.own_rng(args.seed + args.steps):
            save_pictures(ema, args,
                          f"{args.steps:08d}_K{args.sample_langevin_steps}_w{args.guidance:g}"
                          + ("_c" + "+".join(map(str, args.compose)) if args.compose else ""),
                          device, box)


if __name__ == "__main__":
    common.run_cli(lambda: main(common.parse_args(Args, "cdrl")))
