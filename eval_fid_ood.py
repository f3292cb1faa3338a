"""Score a checkpoint of any method script through its public API (build_model, sample, energy).

    python eval_fid_ood.py --ckpt runs/<run> [--device cpu] [--inception-weights PATH]
                           [--ood svhn cifar100 uniform] [--long-run 100]
    python eval_fid_ood.py --ckpt runs/<run> --save-samples 10000
    python eval_fid_ood.py --ckpt runs/<conditional cdrl run> --guidance-sweep 0,0.5,1,2
    python eval_fid_ood.py --ckpt runs/<cdrl run> --inpaint center --fid-samples 0 --ood none

--ckpt takes a checkpoint or a run folder (its ckpt.pt).

The checkpoint names its method; the evaluator imports that script, rebuilds its Args and model (EMA
weights when the checkpoint has them) and calls only `sample(model, n, args, device,
step_multiplier)` and `energy(model, x, args)`. Results go to a JSON file (default eval.json next to
the checkpoint, pictures beside it) and a table on stdout. What each number means:

Images
- fid: Frechet Inception distance between --fid-samples samples of the method's post-training
  sampler and the whole training split, with torch-fidelity's InceptionV3 ("inception-v3-compat",
  its port of the TensorFlow 2015 Inception graph of the original FID code): 2048-d pool features of
  uint8 RGB images (grey images repeated to 3 channels, resized to 299 inside the network), their
  mean and unbiased covariance (torch_fidelity.metric_fid.fid_features_to_statistics) and
  torch-fidelity's Frechet formula. The network runs in full fp32 (TF32 off) on every device. The
  training split's statistics are computed once per dataset, image size and weights file and cached
  in --stats-dir. This is common.py's FID, the same that the scripts' --fid-every measures during
  training (their cache: {data_dir}/fid_stats, this default).
- guidance_sweep (--guidance-sweep w1,w2,...; class-conditional CDRL checkpoints): the FID above
  once per classifier-free guidance weight w, each from the same --seed (the same noise, only w
  differs), with its mean sample energy and a picture eval_samples_w{w}.png; it replaces the
  single FID at the checkpoint's own --guidance. The official code's sweep (main_cond.py,
  mode 'fid_vs_w') uses w = 0, 0.1, ..., 1, 2, 3.
- ood: AUROC of the score -energy(x) at the clean level for telling the in-distribution test split
  (positives) from each OOD set; 0.5 = chance, 1 = every in-distribution image scores higher. Ties
  count one half (the Mann-Whitney statistic). Sets: any image dataset name or folder:PATH
  (converted to the model's channels and size), interp (the pixel mean of two random in-distribution
  test images), uniform (i.i.d. uniform pixels), constant (one random colour per image). ood_mean is
  the average AUROC over the sets.
- inpaint (--inpaint center|right|bottom; methods with an `inpaint` function: cdrl.py): --n-inpaint
  images of the test split (a seeded subset) with the central square of half the side, or the
  right or bottom half, missing; the method fills them in given the rest. mse: mean squared error
  over the missing pixels against the held-out truth, on the [0, 1] scale; mse_known_mean: the same
  for filling each image's missing pixels with its known pixels' per-channel mean (a floor any
  model should beat); picture eval_inpaint_<region>.png (rows: truth, masked input, inpainted). A
  folder:PATH set has no test split: its "test split" here and in ood is the folder itself (the
  "split" entry says so).
2D
- nll: mean -log p_θ of --n-test fresh points of the toy, with p_θ = exp(-energy) normalised exactly
  on a --grid-resolution² grid over the data box (logsumexp over the cells); true_nll: the same
  points under the toy's own density where it has a closed form (rings, 8gaussians, checkerboard);
  eval_density.png: the model density beside a histogram of 200,000 fresh points. A points:PATH
  data set has no fresh points: they are drawn with replacement from its file, the training data.
Long run (--long-run N)
- The method's sampler run with 1, 10, 100, ... and N times its configured steps (each method's
  `sample` says what one step is). Images: FID of --long-run-samples samples (fewer than
  --fid-samples, so not comparable with `fid`) and their mean energy. 2D: the samples'
  total-variation distance to fresh data and to the model's own exact grid density, on a 40x40
  histogram over the data box (plus one bin for points outside it), with the distance that the same
  number of exact draws has (the noise floor).

Samples only (--save-samples N)
- N samples of the method's own sampler in samples.npz (key 'samples': images in [-1, 1] or 2D
  points) and a picture, samples.png; nothing else is computed and no data are read (the 2D
  picture's box comes from the checkpoint).

Several processes (torchrun --nproc_per_node N eval_fid_ood.py ...)
- Each phase's batches (sampler calls, Inception passes, energy and grid chunks) are dealt round
  robin over the processes and gathered back in their order; sample batch i starts from a seed
  drawn from (--seed, i), so the samples and every number are those of one process (up to the
  float arithmetic of different devices). Rank 0 writes the results and pictures. FID statistics
  and the Frechet distance are computed from the gathered features on every rank.

Any failure (bad input, missing data, a sampler that gives up, Ctrl-C) still writes the results
computed so far, with an "error" entry, before the one-line message and non-zero exit.
"""
import importlib
import json
import math
import os
from dataclasses import dataclass
from typing import Literal, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
import torch_fidelity
import tyro

import common

SCRIPTS = {"daebm": "pcd_diffusion_ebm", "cdrl": "cdrl", "dcd": "dcd"}
SYNTHETIC_OOD = ("interp", "uniform", "constant")
# histogram bins per side for the 2D long-run distances (their noise floor is reported too)
DRIFT_BINS = 40


@dataclass
class EvalArgs:
    ckpt: str
    """checkpoint written by one of the method scripts, or a run folder (its ckpt.pt)"""
    device: str = "auto"
    """auto | cpu | cuda | cuda:N"""
    out: Optional[str] = None
    """JSON output path (default: eval.json next to the checkpoint); pictures go to the same
    folder"""
    seed: int = 12345
    """seed of the samples, fresh test points and OOD subsets (distinct from training seeds)"""
    data_dir: Optional[str] = None
    """image datasets (default: the checkpoint's --data-dir)"""
    batch_size: int = 250
    """samples per sampler call (images and 2D), Inception batch and energy batch"""
    fid_samples: int = 50_000
    """images: samples for the FID; 0 = no FID"""
    inception_weights: Optional[str] = None
    """torch-fidelity's weights-inception-2015-12-05-6726825d.pth for machines without internet
    (default: torch-fidelity downloads it into the torch hub cache)"""
    stats_dir: Optional[str] = None
    """cache of the training sets' Inception statistics (default: {data_dir}/fid_stats)"""
    ood: Tuple[str, ...] = ("svhn", "cifar100", "celeba", "interp", "uniform", "constant")
    """images: OOD sets (a dataset name, folder:PATH, interp, uniform, constant; the training set
    itself is skipped); 'none' = no OOD detection"""
    n_ood: int = 10_000
    """images: at most this many images of the in-distribution test split and of each OOD set"""
    n_test: int = 20_000
    """2D: fresh test points for the NLL"""
    grid_resolution: int = 1000
    """2D: cells per side of the density grid"""
    long_run: int = 0
    """N > 0: also run the sampler with 1, 10, 100, ..., N times its steps (FID or 2D drift against
    steps)"""
    long_run_samples: int = 10_000
    """samples per step count of the long-run check"""
    inpaint: Optional[Literal["center", "right", "bottom"]] = None
    """images, methods that inpaint (cdrl.py): fill in this region of --n-inpaint test images and
    report the mean squared error there (see the docstring)"""
    n_inpaint: int = 1000
    """images inpainted for --inpaint"""
    guidance_sweep: Optional[str] = None
    """conditional CDRL checkpoints: FID at each classifier-free guidance weight of a comma list,
    e.g. 0,0.5,1,2 (instead of the single FID at the checkpoint's --guidance)"""
    save_samples: int = 0
    """N > 0: only draw N samples with the method's own sampler and write them as samples.npz (key
    'samples') and samples.png beside the JSON; no metrics, no training data needed"""

    def __post_init__(self):
        for key in ("batch_size", "n_ood", "n_test", "grid_resolution", "long_run_samples",
                    "n_inpaint"):
            if getattr(self, key) <= 0:
                raise common.UserError(f"--{key.replace('_', '-')} must be positive, got "
                                       f"{getattr(self, key)}")
        if self.fid_samples < 0 or self.long_run < 0 or self.save_samples < 0:
            raise common.UserError("--fid-samples, --long-run and --save-samples must be >= 0")
        if self.fid_samples == 1 or self.long_run_samples == 1:
            raise common.UserError("a covariance needs at least 2 samples: --fid-samples / "
                                   "--long-run-samples >= 2")
        self.ood = () if tuple(self.ood) == ("none",) else tuple(self.ood)
        if self.guidance_sweep is not None:
            try:
                self.guidance_sweep = tuple(float(w) for w in self.guidance_sweep.split(","))
            except ValueError:
                raise common.UserError("--guidance-sweep takes numbers separated by commas, e.g. "
                                       f"0,0.5,1; got {self.guidance_sweep!r}") from None
            if not self.fid_samples:
                raise common.UserError("--guidance-sweep measures FID: --fid-samples must be > 0")
        for name in self.ood:
            known = name in SYNTHETIC_OOD or name in common.IMAGE_SETS or name.startswith("folder:")
            if not known:
                raise common.UserError(f"unknown OOD set {name!r}; choose from "
                                       f"{', '.join(common.IMAGE_SETS)}, folder:PATH, "
                                       f"{', '.join(SYNTHETIC_OOD)} (or 'none')")


# --------------------------------------------------------------------------------------------------
# Loading a checkpoint through the public API
# --------------------------------------------------------------------------------------------------
def load_method(ckpt: dict, device, ckpt_path: str = "the checkpoint"):
    """Import the script named by the checkpoint, rebuild Args and the model (EMA weights when
    present)."""
    if ckpt["method"] not in SCRIPTS:
        raise common.UserError(f"checkpoint method {ckpt['method']!r} is unknown; known: "
                               f"{', '.join(SCRIPTS)}")
    module = importlib.import_module(SCRIPTS[ckpt["method"]])
    args = common.args_from_checkpoint(module.Args, ckpt["args"], ckpt_path)
    model = module.build_model(args)
    model.load_state_dict(ckpt["ema"] if ckpt.get("ema") is not None else ckpt["model"])
    return module, args, model.to(device).eval()


def sample_batches(module, model, args, n: int, batch_size: int, device, step_multiplier: int,
                   seed: int, label: str):
    """This process's batches of the method's samples, seeded per batch (common.sample_batches)."""
    return common.sample_batches(
        lambda rows: module.sample(model, rows, args, device, step_multiplier=step_multiplier), n,
        batch_size, seed, label)


def gathered_samples(module, model, args, n: int, batch_size: int, device, step_multiplier: int,
                     seed: int, label: str) -> torch.Tensor:
    """All n samples of sample_batches, from every process, in order, on the CPU."""
    return common.gather_batches([batch.cpu() for batch in sample_batches(
        module, model, args, n, batch_size, device, step_multiplier, seed, label)], n, batch_size)


def energies(module, model, args, images_uint8: torch.Tensor, batch_size: int, device, label: str):
    """energy(x) of uint8 images (converted to [-1, 1]) in batches dealt over the processes, float64
    on the CPU."""
    mine = common.batches_of_this_rank(len(images_uint8), batch_size)
    progress, out = common.Progress(label, sum(rows for _, _, rows in mine)), []
    for _, first, rows in mine:
        batch = common.to_unit_range(images_uint8[first:first + rows]).to(device)
        out.append(module.energy(model, batch, args).double().cpu())
        progress.update(rows)
    return common.gather_batches(out, len(images_uint8), batch_size)


# --------------------------------------------------------------------------------------------------
# FID (common.py: torch-fidelity's Inception, statistics and Frechet formula)
# --------------------------------------------------------------------------------------------------
def fid_of_samples(module, model, args, ea: EvalArgs, network, reference: dict, n: int, device,
                   step_multiplier, label: str):
    """FID of n fresh samples against the reference statistics -> (FID, mean energy of the samples,
    the first samples for a picture: rank 0's, None on the other ranks)."""
    sample_energies, first = [], []

    def batches():
        for batch in sample_batches(module, model, args, n, ea.batch_size, device, step_multiplier,
                                    ea.seed, label):
            sample_energies.append(module.energy(model, batch, args).double().cpu())
            if not first:
                first.append(batch[:64].cpu())
            yield common.to_uint8_rgb(batch)
    stats = common.feature_statistics(common.inception_features(network, batches(), device, n,
                                                                ea.batch_size))
    mean_energy = common.gather_batches(sample_energies, n, ea.batch_size).mean().item()
    return common.frechet_distance(stats, reference), mean_energy, first[0] if first else None


# --------------------------------------------------------------------------------------------------
# OOD detection
# --------------------------------------------------------------------------------------------------
def auroc(scores_in: torch.Tensor, scores_out: torch.Tensor) -> float:
    """P(score_in > score_out) + P(tie) / 2 over all (in, out) pairs: the Mann-Whitney U statistic /
    (n_in n_out), from average ranks (tied scores share the mean of their ranks)."""
    scores = torch.cat([scores_in, scores_out]).double()
    if not torch.isfinite(scores).all():
        raise common.UserError("the model gave non-finite energies; AUROC is undefined")
    _, inverse, counts = torch.unique(scores, return_inverse=True, return_counts=True)
    mean_rank = counts.cumsum(0).double() - (counts.double() - 1) / 2  # ranks start at 1
    rank_sum_in = mean_rank[inverse[:len(scores_in)]].sum().item()
    n_in, n_out = len(scores_in), len(scores_out)
    return (rank_sum_in - n_in * (n_in + 1) / 2) / (n_in * n_out)


def match_shape(images_uint8: torch.Tensor, shape) -> torch.Tensor:
    """uint8 images -> the model's (C, H, W): grey from RGB by the channel mean, RGB from grey by
    repetition, bilinear (antialiased) resizing."""
    channels, height, width = shape
    x = images_uint8.float()
    if x.shape[1] != channels:
        if {x.shape[1], channels} != {1, 3}:
            raise common.UserError(f"cannot convert {x.shape[1]}-channel images to {channels} "
                                   "channels")
        x = x.mean(1, keepdim=True).expand(-1, channels, -1, -1)
    if x.shape[2:] != (height, width):
        x = F.interpolate(x, size=(height, width), mode="bilinear", antialias=True,
                          align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8)


def ood_images(name: str, in_test: torch.Tensor, shape, data_dir: str, n: int,
               generator) -> torch.Tensor:
    """At most n uint8 images of the named OOD set in the model's shape (on the CPU, as data)."""
    if name == "interp":
        i, j = torch.randint(len(in_test), (2, n), generator=generator, device="cpu")
        return ((in_test[i].float() + in_test[j].float()) / 2).round().to(torch.uint8)
    if name == "uniform":
        return torch.randint(0, 256, (n,) + tuple(shape), generator=generator, dtype=torch.uint8,
                             device="cpu")
    if name == "constant":
        colours = torch.randint(0, 256, (n, shape[0], 1, 1), generator=generator, dtype=torch.uint8,
                                device="cpu")
        return colours.expand(-1, -1, shape[1], shape[2]).contiguous()
    images = common.load_images(name, data_dir, train=False)
    keep = torch.randperm(len(images), generator=generator, device="cpu")[:n]
    return match_shape(images[keep], shape)


def test_split_name(dataset: str) -> str:
    """What the evaluator's 'test split' of an image set is."""
    return ("training images (folder datasets have no test split)" if dataset.startswith("folder:")
            else "test")


def evaluate_ood(module, model, args, ea: EvalArgs, data_dir: str, device, results: dict, save):
    shape = (args.image_channels, args.image_size, args.image_size)
    generator = torch.Generator().manual_seed(ea.seed)
    in_test = common.load_images(args.dataset, data_dir, train=False, image_size=args.image_size)
    in_test = in_test[torch.randperm(len(in_test), generator=generator, device="cpu")[:ea.n_ood]]
    scores_in = -energies(module, model, args, in_test, ea.batch_size, device,
                          "energies, test split")
    results["ood_in_distribution"] = {
        "set": args.dataset, "n": len(in_test), "mean_score": scores_in.mean().item(),
        "split": test_split_name(args.dataset)}
    results["ood"] = {}
    for name in ea.ood:
        if name == args.dataset:
            continue
        images = ood_images(name, in_test, shape, data_dir, ea.n_ood, generator)
        scores_out = -energies(module, model, args, images, ea.batch_size, device,
                               f"energies, {name}")
        results["ood"][name] = {"auroc": auroc(scores_in, scores_out), "n": len(images),
                                "mean_score": scores_out.mean().item()}
        print(f"  OOD {name}: AUROC {results['ood'][name]['auroc']:.4f}", flush=True)
        save()
    if results["ood"]:
        results["ood_mean"] = sum(r["auroc"] for r in results["ood"].values()) / len(results["ood"])


# --------------------------------------------------------------------------------------------------
# Inpainting
# --------------------------------------------------------------------------------------------------
def known_mask(region: str, shape) -> torch.Tensor:
    """Bool (C, H, W), False on the missing region: the central square of half the side, or the
    right or bottom half."""
    known = torch.ones(shape, dtype=torch.bool, device="cpu")
    height, width = shape[1:]
    if region == "center":
        top, left = height // 4, width // 4
        known[:, top: top + height // 2, left: left + width // 2] = False
    elif region == "right":
        known[:, :, width // 2:] = False
    else:
        known[:, height // 2:, :] = False
    return known


def evaluate_inpainting(module, model, args, ea: EvalArgs, data_dir: str, device, results: dict,
                        out_dir: str):
    if not hasattr(module, "inpaint"):
        raise common.UserError(f"--inpaint: {module.__name__}.py has no inpainting (cdrl.py has)")
    generator = torch.Generator().manual_seed(ea.seed)
    test = common.load_images(args.dataset, data_dir, train=False, image_size=args.image_size)
    test = test[torch.randperm(len(test), generator=generator, device="cpu")[:ea.n_inpaint]]
    known = known_mask(ea.inpaint, test.shape[1:])
    mine = common.batches_of_this_rank(len(test), ea.batch_size)
    progress, filled = common.Progress("inpainting", sum(rows for _, _, rows in mine)), []
    for index, first, rows in mine:
        torch.manual_seed(common.batch_seed(ea.seed, index))
        x = common.to_unit_range(test[first:first + rows])
        filled.append(module.inpaint(model, x, known.expand_as(x), args, device).float().cpu())
        progress.update(rows)
    filled = common.gather_batches(filled, len(test), ea.batch_size)
    truth = common.to_unit_range(test)
    missing = ~known.expand_as(truth)
    # baseline: each image's missing pixels set to its known pixels' per-channel mean
    known_mean = (truth * ~missing).sum((2, 3), keepdim=True) / (~missing).sum((2, 3), keepdim=True)

    def mse(estimate):  # over the missing pixels, on the [0, 1] scale
        return ((estimate - truth) / 2).pow(2)[missing].mean().item()
    results["inpaint"] = {"region": ea.inpaint, "n": len(test),
                          "split": test_split_name(args.dataset), "mse": mse(filled),
                          "mse_known_mean": mse(known_mean.expand_as(truth))}
    print(f"  inpainting ({ea.inpaint}): MSE {results['inpaint']['mse']:.5f} (known-mean fill "
          f"{results['inpaint']['mse_known_mean']:.5f})", flush=True)
    if common.is_main():
        rows = min(8, len(test))
        common.save_image_grid(torch.cat([truth[:rows], torch.where(missing[:rows], 0.0,
                                                                    truth[:rows]), filled[:rows]]),
                               os.path.join(out_dir, f"eval_inpaint_{ea.inpaint}.png"),
                               nrow=rows)


# --------------------------------------------------------------------------------------------------
# 2D: the toys' true density, the model's exact density on a grid, and the long-run drift
# --------------------------------------------------------------------------------------------------
def toy_log_density(name: str, points: torch.Tensor):
    """log p(x) of the toys whose density has a closed form (rings, 8gaussians, checkerboard),
    float64 (n,); None for the others (swissroll, pinwheel, 2spirals: their density is an integral
    over the generator's latent). Written from common.draw_2d's generators; tests check both
    against each other."""
    x = points.double()
    # radius ~ N(k, 0.01²) with k uniform on 1..4, angle uniform: p = p(r) / (2π r)
    if name == "rings":
        r = x.norm(dim=1)
        radii = torch.arange(1, 5, dtype=torch.float64)
        log_p_r = torch.logsumexp(torch.distributions.Normal(radii, 0.01).log_prob(r[:, None]), 1)
        log_p_r = log_p_r - math.log(4)
        return log_p_r - torch.log(2 * math.pi * r)
    if name == "8gaussians":  # equal mixture of N(4 (cos, sin)(2πk/8) / 1.414, (0.5 / 1.414)² I)
        angle = 2 * math.pi * torch.arange(8, dtype=torch.float64) / 8
        centers = 4 * torch.stack([angle.cos(), angle.sin()], 1) / 1.414
        log_n = torch.distributions.Normal(centers, 0.5 / 1.414).log_prob(x[:, None, :]).sum(2)
        return torch.logsumexp(log_n, 1) - math.log(8)
    # uniform on the 8 black 2x2 squares of [-4, 4)²: 1/32 there, 0 elsewhere
    if name == "checkerboard":
        cell = torch.floor(x / 2)
        inside = (x.abs() < 4).all(1) & ((cell[:, 0] + cell[:, 1]) % 2 == 0)
        return torch.where(inside, -math.log(32), -math.inf)
    return None


def grid_log_density(energy_fn, lo: float, hi: float, resolution: int, chunk: int = 65536):
    """log p on the cell centres of a resolution^2 grid over [lo, hi]^2 (row = y, as
    common.grid_2d), normalised so that Σ p Δ = 1 with Δ the cell area. energy_fn maps (n, 2)
    float32 -> (n,) energies; the chunks are dealt over the processes."""
    points = common.grid_2d(lo, hi, resolution)
    mine = common.batches_of_this_rank(len(points), chunk)
    progress = common.Progress("grid energies", sum(rows for _, _, rows in mine), interval=30,
                               quiet=True)
    parts = []
    with torch.no_grad():
        for _, first, rows in mine:
            parts.append(energy_fn(points[first: first + rows].float()).double().cpu())
            progress.update(rows)
    energies_ = common.gather_batches(parts, len(points), chunk)
    cell_area = ((hi - lo) / resolution) ** 2
    log_p = -energies_ - torch.logsumexp(-energies_, 0) - math.log(cell_area)
    return log_p.view(resolution, resolution)


def grid_nll(log_p_grid: torch.Tensor, lo: float, hi: float, points: torch.Tensor) -> float:
    """Mean -log p of points under the piecewise-constant grid density (points outside the box are
    clamped to the border cell, so the box must cover the data)."""
    resolution = log_p_grid.shape[0]
    idx = ((points.double() - lo) / (hi - lo) * resolution).floor().long().clamp(0, resolution - 1)
    return -log_p_grid[idx[:, 1], idx[:, 0]].mean().item()


def bin_mass(points: torch.Tensor, lo: float, hi: float, bins: int = DRIFT_BINS) -> torch.Tensor:
    """Fraction of the points in each of bins² cells over the box, plus a last entry for those
    outside it."""
    counts = common.histogram_2d(points, lo, hi, bins).reshape(-1)
    return torch.cat([counts, (len(points) - counts.sum()).reshape(1)]) / len(points)


def grid_bin_mass(log_p_grid: torch.Tensor, lo: float, hi: float,
                  bins: int = DRIFT_BINS) -> torch.Tensor:
    """The grid density's mass in the same cells as bin_mass (each fine cell goes to the cell of its
    centre)."""
    resolution = log_p_grid.shape[0]
    weights = (log_p_grid.reshape(-1) - torch.logsumexp(log_p_grid.reshape(-1), 0)).exp()
    cells = (common.grid_2d(lo, hi, resolution) - lo) / (hi - lo) * bins
    idx = cells.floor().long().clamp(0, bins - 1)
    mass = torch.zeros(bins * bins + 1, dtype=torch.float64)
    mass.index_add_(0, idx[:, 1] * bins + idx[:, 0], weights)
    return mass


def grid_draws(log_p_grid: torch.Tensor, lo: float, hi: float, n: int, generator) -> torch.Tensor:
    """n exact draws from the piecewise-constant grid density: a cell by its mass, then uniform
    inside it."""
    resolution = log_p_grid.shape[0]
    cells = torch.multinomial(log_p_grid.reshape(-1).exp(), n, replacement=True,
                              generator=generator)
    edge = (hi - lo) / resolution
    corner = torch.stack([cells % resolution, cells // resolution], 1).double() * edge + lo
    return corner + edge * torch.rand(n, 2, generator=generator, dtype=torch.float64,
                                      device="cpu")


def total_variation(p: torch.Tensor, q: torch.Tensor) -> float:
    return 0.5 * (p - q).abs().sum().item()


def save_samples(module, model, args, ea: EvalArgs, device, results: dict, out_dir: str, box):
    """The sample-only path: --save-samples N samples -> samples.npz (key 'samples') and a
    picture."""
    samples = gathered_samples(module, model, args, ea.save_samples, ea.batch_size, device, 1,
                               ea.seed, "samples")
    path = os.path.join(out_dir, "samples.npz")
    results.update({"samples": path, "n_samples": ea.save_samples,
                    "picture": os.path.join(out_dir, "samples.png")})
    if not common.is_main():
        return
    np.savez(path + ".tmp.npz", samples=samples.numpy())
    os.replace(path + ".tmp.npz", path)
    if common.is_2d(args.dataset):
        common.save_panels([common.histogram_2d(samples, *box, 200)], results["picture"])
    else:
        common.save_image_grid(samples[:64], results["picture"])


def evaluate_2d(module, model, args, ea: EvalArgs, device, results: dict, out_dir: str, save, box):
    lo, hi = box
    energy_fn = lambda x: module.energy(model, x.to(device), args)  # noqa: E731
    log_p = grid_log_density(energy_fn, lo, hi, ea.grid_resolution)
    test = common.draw_2d(args.dataset, ea.n_test, seed=ea.seed)
    results.update({"nll": grid_nll(log_p, lo, hi, test), "box": [lo, hi],
                    "grid_resolution": ea.grid_resolution,
                    "n_test": ea.n_test})
    if args.dataset.startswith("points:"):
        results["test_points"] = "drawn with replacement from the training file (no test split)"
    true_log_p = toy_log_density(args.dataset, test)
    if true_log_p is not None:
        results["true_nll"] = -true_log_p.mean().item()
    save()
    picture_density = grid_log_density(energy_fn, lo, hi, 200).exp()
    if common.is_main():
        common.save_panels([picture_density,
                            common.histogram_2d(common.draw_2d(args.dataset, 200_000,
                                                              seed=ea.seed + 1), lo, hi, 200)],
                           os.path.join(out_dir, "eval_density.png"))

    if ea.long_run:
        generator = torch.Generator().manual_seed(ea.seed)
        n = ea.long_run_samples
        data_mass = bin_mass(common.draw_2d(args.dataset, n, seed=ea.seed + 2), lo, hi)
        model_mass = grid_bin_mass(log_p, lo, hi)
        results["long_run"] = {
            "n_samples": n, "bins": DRIFT_BINS,
            "tv_floor_data": total_variation(
                bin_mass(common.draw_2d(args.dataset, n, seed=ea.seed + 3), lo, hi), data_mass),
            "tv_floor_model": total_variation(
                bin_mass(grid_draws(log_p, lo, hi, n, generator), lo, hi), model_mass),
            "records": []}
        panels = []
        for multiplier in long_run_multipliers(ea.long_run):
            x = gathered_samples(module, model, args, n, ea.batch_size, device, multiplier,
                                 ea.seed, f"long run x{multiplier}")
            mass = bin_mass(x, lo, hi)
            results["long_run"]["records"].append({
                "step_multiplier": multiplier, "tv_to_data": total_variation(mass, data_mass),
                "tv_to_model": total_variation(mass, model_mass),
                "mean_energy": module.energy(model, x.to(device), args).mean().item()})
            panels.append(common.histogram_2d(x, lo, hi, 200))
            save()
        if common.is_main():
            common.save_panels(panels, os.path.join(out_dir, "eval_long_run.png"))


def long_run_multipliers(n: int):
    """1, 10, 100, ... below n, and n."""
    marks = [1]
    while marks[-1] * 10 < n:
        marks.append(marks[-1] * 10)
    return marks + ([n] if n > 1 else [])


# --------------------------------------------------------------------------------------------------
# Images: OOD, FID, long run
# --------------------------------------------------------------------------------------------------
def evaluate_images(module, model, args, ea: EvalArgs, device, results: dict, out_dir: str, save):
    data_dir = ea.data_dir or args.data_dir
    if ea.inpaint:
        evaluate_inpainting(module, model, args, ea, data_dir, device, results, out_dir)
        save()
    if ea.ood:
        evaluate_ood(module, model, args, ea, data_dir, device, results, save)
        save()
    if not (ea.fid_samples or ea.long_run):
        return
    network, weights_tag = common.load_inception(ea.inception_weights, device)
    reference, stats_path = common.reference_statistics(
        args.dataset, args.image_size,
        lambda: common.load_images(args.dataset, data_dir, train=True, image_size=args.image_size),
        network, weights_tag, ea.stats_dir or os.path.join(data_dir, "fid_stats"), ea.batch_size,
        device)
    results["fid_protocol"] = {"library": f"torch-fidelity {torch_fidelity.__version__}",
                               "features": "inception-v3-compat pool3 2048",
                               "inception_weights_sha256_prefix": weights_tag,
                               "reference": f"{args.dataset} training split",
                               "reference_stats": stats_path}
    if ea.guidance_sweep:
        results["guidance_sweep"] = []
        for weight in ea.guidance_sweep:
            args.guidance = weight
            fid, mean_energy, first = fid_of_samples(module, model, args, ea, network, reference,
                                                     ea.fid_samples, device, 1,
                                                     f"FID samples, guidance {weight:g}")
            results["guidance_sweep"].append({"guidance": weight, "fid": fid,
                                              "sample_mean_energy": mean_energy})
            print(f"  guidance {weight:g}: FID {fid:.4f}", flush=True)
            if common.is_main():
                common.save_image_grid(first, os.path.join(out_dir,
                                                           f"eval_samples_w{weight:g}.png"))
            save()
        results["fid_samples"] = ea.fid_samples
    elif ea.fid_samples:
        fid, mean_energy, first = fid_of_samples(module, model, args, ea, network, reference,
                                                 ea.fid_samples, device, 1, "FID samples")
        results.update({"fid": fid, "fid_samples": ea.fid_samples,
                        "sample_mean_energy": mean_energy})
        if common.is_main():
            common.save_image_grid(first, os.path.join(out_dir, "eval_samples.png"))
        save()
    if ea.long_run:
        results["long_run"] = {"n_samples": ea.long_run_samples, "records": []}
        for multiplier in long_run_multipliers(ea.long_run):
            fid, mean_energy, first = fid_of_samples(module, model, args, ea, network, reference,
                                                     ea.long_run_samples, device, multiplier,
                                                     f"long run x{multiplier}")
            results["long_run"]["records"].append({"step_multiplier": multiplier, "fid": fid,
                                                   "mean_energy": mean_energy})
            if common.is_main():
                common.save_image_grid(first,
                                       os.path.join(out_dir, f"eval_long_run_x{multiplier}.png"))
            save()


# --------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------
def print_table(results: dict):
    for key, value in results.items():
        if key == "ood":
            for name, row in value.items():
                print(f"{'ood ' + name:>24}: AUROC {row['auroc']:.4f} (n {row['n']}, "
                      f"mean score {row['mean_score']:.4g})")
        elif key == "guidance_sweep":
            for row in value:
                print(f"{'guidance ' + format(row['guidance'], 'g'):>24}: FID {row['fid']:.4f}")
        elif key == "long_run":
            print(f"{'long run':>24}: "
                  + ", ".join(f"{k} {v:.4g}" for k, v in value.items() if k != "records"))
            for row in value["records"]:
                print(f"{'long run x' + str(row['step_multiplier']):>24}: " +
                      ", ".join(f"{k} {v:.4g}" for k, v in row.items() if k != "step_multiplier"))
        else:
            print(f"{key:>24}: {value}")


def evaluate(ea: EvalArgs) -> dict:
    device = common.start_processes(ea.device)
    ckpt = common.load_checkpoint(ea.ckpt)
    module, args, model = load_method(ckpt, device, ea.ckpt)
    if ea.inpaint and (common.is_2d(args.dataset) or ea.save_samples):
        raise common.UserError(f"--inpaint fills in images; {ea.ckpt} is a 2D checkpoint"
                               if common.is_2d(args.dataset) else
                               "--inpaint and --save-samples do not go together")
    if ea.guidance_sweep and (common.is_2d(args.dataset) or ea.save_samples
                              or not getattr(args, "conditional", False)):
        raise common.UserError("--guidance-sweep measures FID of a class-conditional image "
                               f"checkpoint (cdrl.py --conditional); {ea.ckpt} is not one")
    run_dir = ea.ckpt if os.path.isdir(ea.ckpt) else os.path.dirname(os.path.abspath(ea.ckpt))
    out = ea.out or os.path.join(run_dir, "eval.json")
    out_dir = os.path.dirname(os.path.abspath(out))
    os.makedirs(out_dir, exist_ok=True)
    results = {"ckpt": ea.ckpt, "method": ckpt["method"], "dataset": args.dataset,
               "step": ckpt["step"],
               "weights": "ema" if ckpt.get("ema") is not None else "model"}

    def save():  # every rank holds the same results (common.gather_batches); rank 0 writes
        if not common.is_main():
            return
        tmp = out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(results, f, indent=2)
        os.replace(tmp, out)
    try:
        if ea.save_samples:
            save_samples(module, model, args, ea, device, results, out_dir, ckpt["box"])
        elif common.is_2d(args.dataset):
            evaluate_2d(module, model, args, ea, device, results, out_dir, save, ckpt["box"])
        else:
            evaluate_images(module, model, args, ea, device, results, out_dir, save)
    except BaseException as error:  # keep what was computed, then fail as usual
        results["error"] = f"{type(error).__name__}: {error}"
        save()
        raise
    save()
    if common.end_processes():
        print_table(results)
        print(f"written to {out}")
    return results


if __name__ == "__main__":
    common.run_cli(lambda: evaluate(tyro.cli(EvalArgs)))
