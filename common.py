"""Method-agnostic plumbing shared by the method scripts and the evaluator.

Datasets (2D toys and image sets), seeding and devices, the run folder and metric log, checkpoint I/O,
image grids and 2D pictures. Nothing here knows about energies, noise schedules, samplers or losses:
those live in each method script so that one script plus this file can be copied alone.
"""
import dataclasses
import gzip
import json
import math
import os
import sys
import time

import numpy as np
import torch

TOY_2D = ("rings", "8gaussians", "checkerboard", "swissroll", "pinwheel", "2spirals")
IMAGE_SETS = ("mnist", "fashionmnist", "cifar10", "cifar100", "svhn", "celeba")
CHECKPOINT_FORMAT = 1


class UserError(Exception):
    """Bad input from the user (dataset, flag, file). Scripts print it as one line and exit non-zero."""


def run_cli(entry):
    """Run `entry()` (argument parsing included), turning a UserError into one line on stderr and exit 2."""
    try:
        entry()
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


# ---------------------------------------------------------------------------------------------------
# 2D toy data
# ---------------------------------------------------------------------------------------------------
def toy_2d(name: str, n: int, seed: int) -> torch.Tensor:
    """Draw n points (n, 2) of the named 2D toy, reproducibly from `seed`.

    rings: the DA-EBM paper's four concentric thin rings, radii 1, 2, 3, 4, radial sd 0.01, equal weight
    per ring (the official `ToyDataset("rings", 4, 0.01, 1)`; its radius is a normal truncated at 0,
    which at sd 0.01 never matters). The other five are the usual benchmark toys of the FFJORD family.
    """
    g = torch.Generator().manual_seed(seed)
    if name == "rings":
        ring = torch.randint(0, 4, (n,), generator=g)
        radius = (ring + 1).float() + 0.01 * torch.randn(n, generator=g)
        angle = 2 * math.pi * torch.rand(n, generator=g)
        return torch.stack([radius * angle.cos(), radius * angle.sin()], 1)
    if name == "8gaussians":
        angle = 2 * math.pi * torch.randint(0, 8, (n,), generator=g).float() / 8
        centers = 4 * torch.stack([angle.cos(), angle.sin()], 1)
        return (centers + 0.5 * torch.randn(n, 2, generator=g)) / 1.414
    if name == "checkerboard":
        x1 = 4 * torch.rand(n, generator=g) - 2
        x2 = torch.rand(n, generator=g) - torch.randint(0, 2, (n,), generator=g).float() * 2
        x2 = x2 + torch.floor(x1) % 2
        return 2 * torch.stack([x1, x2], 1)
    if name == "swissroll":
        turn = 1.5 * math.pi * (1 + 2 * torch.rand(n, generator=g))
        points = torch.stack([turn * turn.cos(), turn * turn.sin()], 1)
        return (points + torch.randn(n, 2, generator=g)) / 5
    if name == "pinwheel":
        arms, radial_sd, tangential_sd, rate = 5, 0.3, 0.1, 0.25
        arm = torch.randint(0, arms, (n,), generator=g).float()
        feats = torch.randn(n, 2, generator=g) * torch.tensor([radial_sd, tangential_sd])
        feats[:, 0] += 1
        angle = 2 * math.pi * arm / arms + rate * feats[:, 0].exp()
        rot = torch.stack([angle.cos(), -angle.sin(), angle.sin(), angle.cos()], 1).view(n, 2, 2)
        return 2 * torch.einsum("nij,nj->ni", rot, feats)
    if name == "2spirals":
        turn = torch.sqrt(torch.rand(n, generator=g)) * 540 * (2 * math.pi) / 360
        x = torch.stack([-turn.cos() * turn, turn.sin() * turn], 1)
        sign = torch.where(torch.rand(n, generator=g) < 0.5, 1.0, -1.0)[:, None]
        return sign * x / 3 + 0.1 * torch.randn(n, 2, generator=g)
    raise UserError(f"unknown 2D toy {name!r}; choose one of {', '.join(TOY_2D)}")


def toy_log_density(name: str, points: torch.Tensor):
    """log p(x) of the toys whose density has a closed form (rings, 8gaussians, checkerboard), float64 (n,);
    None for the others (swissroll, pinwheel, 2spirals: their density is an integral over the generator's
    latent). Written from toy_2d's generators above; tests check both against each other."""
    x = points.double()
    if name == "rings":  # radius ~ N(k, 0.01²) with k uniform on 1..4, angle uniform: p = p(r) / (2π r)
        r = x.norm(dim=1)
        radii = torch.arange(1, 5, dtype=torch.float64)
        log_p_r = torch.logsumexp(torch.distributions.Normal(radii, 0.01).log_prob(r[:, None]), 1) - math.log(4)
        return log_p_r - torch.log(2 * math.pi * r)
    if name == "8gaussians":  # equal mixture of N(4 (cos, sin)(2πk/8) / 1.414, (0.5 / 1.414)² I)
        angle = 2 * math.pi * torch.arange(8, dtype=torch.float64) / 8
        centers = 4 * torch.stack([angle.cos(), angle.sin()], 1) / 1.414
        log_n = torch.distributions.Normal(centers, 0.5 / 1.414).log_prob(x[:, None, :]).sum(2)
        return torch.logsumexp(log_n, 1) - math.log(8)
    if name == "checkerboard":  # uniform on the 8 black 2x2 squares of [-4, 4)²: 1/32 there, 0 elsewhere
        cell = torch.floor(x / 2)
        inside = (x.abs() < 4).all(1) & ((cell[:, 0] + cell[:, 1]) % 2 == 0)
        return torch.where(inside, -math.log(32), -math.inf)
    return None


def is_toy(dataset: str) -> bool:
    return dataset in TOY_2D


def check_dataset_name(dataset: str):
    if dataset in TOY_2D or dataset in IMAGE_SETS or dataset.startswith("folder:"):
        return
    raise UserError(f"unknown dataset {dataset!r}; choose one of {', '.join(TOY_2D + IMAGE_SETS)} "
                    "or folder:PATH")


def data_box(points: torch.Tensor, margin: float = 0.1):
    """A square box around 2D points with a relative margin: (lo, hi), used for grids and plots."""
    lo, hi = points.min().item(), points.max().item()
    pad = margin * (hi - lo)
    return lo - pad, hi + pad


def grid_2d(lo: float, hi: float, resolution: int) -> torch.Tensor:
    """Cell centres of a resolution x resolution grid over [lo, hi]^2, (resolution**2, 2), row = y."""
    edge = (hi - lo) / resolution
    axis = lo + edge * (torch.arange(resolution, dtype=torch.float64) + 0.5)
    yy, xx = torch.meshgrid(axis, axis, indexing="ij")
    return torch.stack([xx.reshape(-1), yy.reshape(-1)], 1)


# ---------------------------------------------------------------------------------------------------
# Image data
# ---------------------------------------------------------------------------------------------------
def image_shape(dataset: str):
    """(C, H, W) of a named image dataset without loading it (folder: datasets are known once loaded)."""
    if dataset in ("mnist", "fashionmnist"):
        return (1, 28, 28)
    if dataset in ("cifar10", "cifar100", "svhn", "celeba"):
        return (3, 32, 32)
    raise UserError(f"no fixed image shape for {dataset!r}")


def _read_idx(path):
    with gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _missing(dataset, where, files, how):
    return UserError(f"{dataset} data not found: missing {', '.join(files)} in {where}; {how}")


def _mnist_file(dataset, data_dir, stem, train):
    """Path of one raw IDX file of (Fashion)MNIST (plain or .gz), downloading the set when it is missing."""
    import torchvision

    raw = os.path.join(data_dir, "MNIST" if dataset == "mnist" else "FashionMNIST", "raw")
    candidates = (os.path.join(raw, stem), os.path.join(raw, stem + ".gz"))
    if not any(os.path.exists(p) for p in candidates):
        cls = torchvision.datasets.MNIST if dataset == "mnist" else torchvision.datasets.FashionMNIST
        try:
            cls(data_dir, train=train, download=True)
        except Exception as error:  # offline: urllib raises various errors
            raise _missing(dataset, raw, [stem + ".gz"],
                           f"download failed ({type(error).__name__}); copy torchvision's raw files "
                           "there or run once on a connected machine") from None
    return next(p for p in candidates if os.path.exists(p))


def load_images(dataset: str, data_dir: str, train: bool = True, image_size=None) -> torch.Tensor:
    """The whole split as a uint8 tensor (N, C, H, W). Convert batches with `to_unit_range`.

    MNIST / FashionMNIST are read from torchvision's raw IDX files ({data_dir}/MNIST/raw/...), so the four
    files are enough; other sets go through torchvision. Missing data is downloaded when the machine is
    online; offline, a UserError names the missing files and where to put them.
    """
    import torchvision

    if dataset.startswith("folder:"):
        return _load_folder(dataset[len("folder:"):], image_size)
    if dataset in ("mnist", "fashionmnist"):
        path = _mnist_file(dataset, data_dir, f"{'train' if train else 't10k'}-images-idx3-ubyte", train)
        return torch.from_numpy(_read_idx(path).copy()).unsqueeze(1)
    if dataset not in IMAGE_SETS:
        check_dataset_name(dataset)
        raise UserError(f"{dataset!r} is not an image dataset")
    try:
        if dataset == "cifar10":
            ds = torchvision.datasets.CIFAR10(data_dir, train=train, download=True)
            return torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
        if dataset == "cifar100":
            ds = torchvision.datasets.CIFAR100(data_dir, train=train, download=True)
            return torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
        if dataset == "svhn":
            ds = torchvision.datasets.SVHN(os.path.join(data_dir, "svhn"), split="train" if train else "test",
                                           download=True)
            return torch.from_numpy(ds.data)
        ds = torchvision.datasets.CelebA(data_dir, split="train" if train else "test", download=True)
        return _resize_pil_list([ds[i][0] for i in range(len(ds))], 32)
    except UserError:
        raise
    except Exception as error:
        raise UserError(f"{dataset} data not found in {data_dir} and could not be downloaded "
                        f"({type(error).__name__}: {str(error)[:120]}); run once on a connected machine "
                        f"with --data-dir {data_dir}, or copy the torchvision files there") from None


def _resize_pil_list(images, size):
    from PIL import Image

    out = []
    for img in images:
        img = img.convert("RGB") if img.mode not in ("L", "RGB") else img
        if size is not None and img.size != (size, size):
            side = min(img.size)  # centre crop to a square, then resize
            left, top = (img.size[0] - side) // 2, (img.size[1] - side) // 2
            img = img.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)
        arr = np.asarray(img, dtype=np.uint8)
        out.append(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1))
    if len({a.shape for a in out}) != 1:
        raise UserError("images of different sizes or modes; pass --image-size to resize them")
    return torch.from_numpy(np.stack(out))


def _folder_files(path):
    """The image files under a folder, recursively, in sorted order (the order of images and labels)."""
    if not os.path.isdir(path):
        raise UserError(f"folder:{path} is not a directory")
    exts = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
    files = sorted(os.path.join(root, f) for root, _, names in os.walk(path) for f in names
                   if f.lower().endswith(exts))
    if not files:
        raise UserError(f"folder:{path} holds no images ({', '.join(exts)})")
    return files


def _load_folder(path, image_size):
    from PIL import Image

    files = _folder_files(path)
    first_mode = Image.open(files[0]).mode
    images = []
    for f in files:
        img = Image.open(f)
        images.append(img.convert("L" if first_mode == "L" else "RGB"))
    return _resize_pil_list(images, image_size)


def load_labels(dataset: str, data_dir: str, train: bool = True) -> torch.Tensor:
    """Class labels 0..K-1 (int64) of the split, in the order of `load_images`.

    folder:PATH takes each image's first-level subfolder as its class (classes numbered in sorted name order,
    as torchvision's ImageFolder does). CelebA and the 2D toys have no classes.
    """
    import torchvision

    if dataset.startswith("folder:"):
        path = dataset[len("folder:"):]
        relative = [os.path.relpath(f, path) for f in _folder_files(path)]
        tops = [r.split(os.sep)[0] for r in relative]
        if any(os.sep not in r for r in relative):
            raise UserError(f"folder:{path} has images outside class subfolders; class-conditional training "
                            "needs one subfolder per class")
        classes = sorted(set(tops))
        return torch.tensor([classes.index(t) for t in tops], dtype=torch.long)
    if dataset in ("mnist", "fashionmnist"):
        path = _mnist_file(dataset, data_dir, f"{'train' if train else 't10k'}-labels-idx1-ubyte", train)
        return torch.from_numpy(_read_idx(path).astype(np.int64))
    if dataset not in ("cifar10", "cifar100", "svhn"):
        raise UserError(f"{dataset} has no class labels; class-conditional training needs mnist, "
                        "fashionmnist, cifar10, cifar100, svhn or folder:PATH with class subfolders")
    try:
        if dataset == "svhn":
            ds = torchvision.datasets.SVHN(os.path.join(data_dir, "svhn"), split="train" if train else "test",
                                           download=True)
            return torch.from_numpy(ds.labels.astype(np.int64))
        cls = torchvision.datasets.CIFAR10 if dataset == "cifar10" else torchvision.datasets.CIFAR100
        return torch.tensor(cls(data_dir, train=train, download=True).targets, dtype=torch.long)
    except Exception as error:
        raise UserError(f"{dataset} labels not found in {data_dir} and could not be downloaded "
                        f"({type(error).__name__}: {str(error)[:120]}); run once on a connected machine "
                        f"with --data-dir {data_dir}") from None


def to_unit_range(batch_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1]."""
    return batch_uint8.float() / 127.5 - 1.0


class EpochLoader:
    """Shuffled epochs over an in-memory tensor, drawn with a torch generator; its state resumes exactly."""

    def __init__(self, data: torch.Tensor, batch_size: int, seed: int):
        if len(data) < batch_size:
            raise UserError(f"dataset has {len(data)} items, fewer than --batch-size {batch_size}")
        self.data, self.batch_size = data, batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.order = torch.randperm(len(data), generator=self.generator)
        self.position = 0

    def next(self) -> torch.Tensor:
        if self.position + self.batch_size > len(self.order):  # drop the ragged end, as drop_last does
            self.order = torch.randperm(len(self.data), generator=self.generator)
            self.position = 0
        idx = self.order[self.position: self.position + self.batch_size]
        self.position += self.batch_size
        return self.data[idx.to(self.data.device)]

    def state_dict(self):
        return {"generator": self.generator.get_state(), "order": self.order, "position": self.position}

    def load_state_dict(self, state):
        self.generator.set_state(state["generator"])
        self.order, self.position = state["order"], state["position"]


# ---------------------------------------------------------------------------------------------------
# Seeding, devices, run folder, logging
# ---------------------------------------------------------------------------------------------------
def seed_everything(seed: int):
    torch.manual_seed(seed)
    np.random.seed(seed)


def pick_device(name: str) -> torch.device:
    """'auto' -> cuda when available, else cpu. On CUDA, TF32 matmuls and convolutions are on."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name} asked for but CUDA is not available; use --device cpu")
    device = torch.device(name)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    return device


def make_run_dir(args) -> str:
    run_dir = args.run_dir or os.path.join(
        "runs", f"{args.exp_name}__{args.dataset.replace('/', '_').replace(':', '_')}__{args.seed}__"
                f"{int(time.time())}")
    os.makedirs(run_dir, exist_ok=True)
    return run_dir


def args_to_dict(args) -> dict:
    """Dataclass -> dict of primitives (tuples become lists), safe for weights_only loading and JSON."""
    out = {}
    for field in dataclasses.fields(args):
        value = getattr(args, field.name)
        out[field.name] = list(value) if isinstance(value, tuple) else value
    return out


class MetricLog:
    """Appends one JSON line per record to {run_dir}/metrics.jsonl and prints a progress line."""

    def __init__(self, run_dir: str, total_steps: int, start_step: int):
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.total, self.last_step, self.last_time = total_steps, start_step, time.time()
        self.tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(run_dir)
        except Exception:  # TensorBoard is optional
            self.tb = None

    def log(self, step: int, metrics: dict, echo: bool = True):
        now = time.time()
        rate = (step - self.last_step) / max(now - self.last_time, 1e-9)
        self.last_step, self.last_time = step, now
        record = {"step": step, **metrics, "it_per_s": rate}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, step)
        if echo:
            eta = (self.total - step) / max(rate, 1e-9)
            parts = [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()]
            print(f"step {step}/{self.total} | " + " | ".join(parts) +
                  f" | {rate:.2f} it/s | ETA {format_seconds(eta)}", flush=True)


def format_seconds(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


# ---------------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------------
def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict):
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(state: dict, run_dir: str, snapshot_step=None):
    """Write {run_dir}/ckpt.pt atomically (temp file + os.replace); optionally also ckpt_{step}.pt."""
    path = os.path.join(run_dir, "ckpt.pt")
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)
    if snapshot_step is not None:
        snap = os.path.join(run_dir, f"ckpt_{snapshot_step:08d}.pt")
        tmp = snap + ".tmp"
        torch.save(state, tmp)
        os.replace(tmp, snap)


def load_checkpoint(path: str, method=None) -> dict:
    """torch.load(weights_only=True) with one clear UserError for missing, corrupt or foreign files."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise UserError(f"checkpoint {path} is corrupt or not a torch checkpoint "
                        f"({type(error).__name__}: {str(error).splitlines()[0][:120]})") from None
    if not isinstance(ckpt, dict) or "method" not in ckpt or "format" not in ckpt:
        raise UserError(f"checkpoint {path} is not one of this project's checkpoints (no method/format keys)")
    if ckpt["format"] != CHECKPOINT_FORMAT:
        raise UserError(f"checkpoint {path} has format {ckpt['format']}, this code reads {CHECKPOINT_FORMAT}")
    if method is not None and ckpt["method"] != method:
        raise UserError(f"checkpoint {path} was written by method {ckpt['method']!r}, not {method!r}")
    return ckpt


# ---------------------------------------------------------------------------------------------------
# Pictures (no matplotlib: PNGs written through torchvision)
# ---------------------------------------------------------------------------------------------------
def save_image_grid(images: torch.Tensor, path: str, nrow=None):
    """Images in [-1, 1] (N, C, H, W) -> one PNG grid."""
    import torchvision

    nrow = nrow or max(1, int(math.sqrt(len(images))))
    torchvision.utils.save_image((images.detach().float().cpu().clamp(-1, 1) + 1) / 2, path, nrow=nrow,
                                 padding=1)


_MAGMA = torch.tensor([[0, 0, 4], [59, 15, 112], [140, 41, 129], [222, 73, 104], [254, 159, 109],
                       [252, 253, 191]], dtype=torch.float32) / 255


def colorize(values: torch.Tensor) -> torch.Tensor:
    """A 2D array -> RGB image (3, H, W) through a magma-like colour map, scaled to its own min/max."""
    v = values.float()
    v = (v - v.min()) / (v.max() - v.min()).clamp_min(1e-12)
    pos = v * (len(_MAGMA) - 1)
    low = pos.floor().long().clamp(max=len(_MAGMA) - 2)
    frac = (pos - low).unsqueeze(-1)
    rgb = _MAGMA[low] * (1 - frac) + _MAGMA[low + 1] * frac
    return rgb.permute(2, 0, 1)


def histogram_2d(points: torch.Tensor, lo: float, hi: float, resolution: int) -> torch.Tensor:
    """Counts of 2D points on a resolution^2 grid over [lo, hi]^2, row = y (same layout as grid_2d)."""
    idx = ((points.double() - lo) / (hi - lo) * resolution).floor().long()
    inside = ((idx >= 0) & (idx < resolution)).all(1)
    idx = idx[inside]
    counts = torch.zeros(resolution * resolution, dtype=torch.float64)
    counts.index_add_(0, idx[:, 1] * resolution + idx[:, 0], torch.ones(len(idx), dtype=torch.float64))
    return counts.view(resolution, resolution)


def save_panels(panels, path: str):
    """A row of 2D arrays (each resolution x resolution, row = y) -> one PNG, y axis pointing up."""
    import torchvision

    images = [colorize(p.flip(0)) for p in panels]
    torchvision.utils.save_image(torch.stack(images), path, nrow=len(images), padding=2, pad_value=1.0)
