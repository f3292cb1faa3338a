"""Method-agnostic plumbing shared by the method scripts and the evaluator.

In banner sections, in about the order a run meets them: data (2D toys, images); settings;
before training (run folder, seeds, device); during training (schedule, metrics, signals);
checkpoints; several processes under torchrun; speed flags; pictures; FID (the evaluator's and
--fid-every's). Nothing here knows about energies, noise schedules, samplers or losses: those live
in each method script so that one script plus this file can be copied alone.
"""
import contextlib
import copy
import dataclasses
import datetime
import gzip
import hashlib
import json
import math
import os
import signal
import sys
import tempfile
import threading
import time
from typing import Literal, Optional

import numpy as np
import torch
import torch.distributed as dist

TOY_2D = ("rings", "8gaussians", "checkerboard", "swissroll", "pinwheel", "2spirals")
IMAGE_SETS = ("mnist", "fashionmnist", "cifar10", "cifar100", "svhn", "celeba", "imagenet32")
CHECKPOINT_FORMAT = 1


class UserError(Exception):
    """Bad input from the user (dataset, flag, file). Scripts print it as one line and exit
    non-zero."""


def run_cli(entry):
    """Run `entry()` (argument parsing included), turning a UserError into one line on stderr and
    exit 2."""
    try:
        entry()
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


# --------------------------------------------------------------------------------------------------
# Data: 2D toys
# --------------------------------------------------------------------------------------------------
# What a script or the evaluator draws 2D data from: the six toys (draw_2d) and points:PATH files;
# the box and grid of every 2D picture and density.
def draw_2d(name: str, n: int, seed: int) -> torch.Tensor:
    """Draw n points (n, 2) of the named 2D toy, reproducibly from `seed`; for a `points:PATH` data
    set, n of the file's points drawn with replacement (the file is the whole distribution).

    rings: the DA-EBM paper's four concentric thin rings, radii 1, 2, 3, 4, radial sd 0.01, equal
    weight per ring (the official `ToyDataset("rings", 4, 0.01, 1)`; its radius is a normal
    truncated at 0, which at sd 0.01 never matters). The other five are the usual benchmark toys of
    the FFJORD family.
    """
    with torch.device("cpu"):  # the points are the same whatever the default device
        g = torch.Generator().manual_seed(seed)
        if name.startswith("points:"):
            points = load_points(name)
            return points[torch.randint(0, len(points), (n,), generator=g)]
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
            rot = torch.stack([angle.cos(), -angle.sin(), angle.sin(), angle.cos()], 1)
            rot = rot.view(n, 2, 2)
            return 2 * torch.einsum("nij,nj->ni", rot, feats)
        if name == "2spirals":
            turn = torch.sqrt(torch.rand(n, generator=g)) * 540 * (2 * math.pi) / 360
            x = torch.stack([-turn.cos() * turn, turn.sin() * turn], 1)
            sign = torch.where(torch.rand(n, generator=g) < 0.5, 1.0, -1.0)[:, None]
            return sign * x / 3 + 0.1 * torch.randn(n, 2, generator=g)
        raise UserError(f"unknown 2D toy {name!r}; choose one of {', '.join(TOY_2D)}")


def load_points(dataset: str) -> torch.Tensor:
    """The (n, 2) float32 points of a `points:PATH` data set: a .npy array, or a .csv table of two
    comma-separated columns with an optional header line. One clear line for a bad file."""
    path = dataset[len("points:"):]
    if not os.path.isfile(path):
        raise UserError(f"{dataset}: no such file")
    if not path.endswith((".npy", ".csv")):
        raise UserError(f"{dataset}: expected a .npy or .csv file of shape (n, 2)")
    try:
        if path.endswith(".npy"):
            array = np.load(path, allow_pickle=False)
        else:
            try:
                array = np.loadtxt(path, delimiter=",", ndmin=2)
            except ValueError:  # a header line
                array = np.loadtxt(path, delimiter=",", ndmin=2, skiprows=1)
    except Exception as error:
        raise UserError(f"{dataset} could not be read ({type(error).__name__}: "
                        f"{str(error).splitlines()[0][:120]})") from None
    if array.ndim != 2 or array.shape[1] != 2 or len(array) < 2:
        raise UserError(f"{dataset} has shape {array.shape}; expected (n, 2) with n >= 2")
    if not np.issubdtype(array.dtype, np.number) or not np.isfinite(array).all():
        raise UserError(f"{dataset} holds values that are not finite numbers")
    return torch.from_numpy(array.astype(np.float32))


def is_2d(dataset: str) -> bool:
    """A 2D data set: a named toy or points:PATH."""
    return dataset in TOY_2D or dataset.startswith("points:")


def check_dataset_name(dataset: str):
    if is_2d(dataset) or dataset in IMAGE_SETS or dataset.startswith("folder:"):
        return
    raise UserError(f"unknown dataset {dataset!r}; choose one of "
                    f"{', '.join(TOY_2D + IMAGE_SETS)}, folder:PATH (images) or points:PATH (2D "
                    "points, .npy or .csv)")


def data_box(points: torch.Tensor, margin: float = 0.1):
    """A square box around 2D points with a relative margin: (lo, hi), used for grids and plots."""
    lo, hi = points.min().item(), points.max().item()
    pad = margin * (hi - lo)
    return lo - pad, hi + pad


def grid_2d(lo: float, hi: float, resolution: int) -> torch.Tensor:
    """Cell centres of a resolution x resolution grid over [lo, hi]^2, (resolution**2, 2), row =
    y."""
    edge = (hi - lo) / resolution
    axis = lo + edge * (torch.arange(resolution, dtype=torch.float64, device="cpu") + 0.5)
    yy, xx = torch.meshgrid(axis, axis, indexing="ij")
    return torch.stack([xx.reshape(-1), yy.reshape(-1)], 1)


# --------------------------------------------------------------------------------------------------
# Data: images
# --------------------------------------------------------------------------------------------------
# Every image set as one uint8 tensor in memory (load_images, load_labels; one clear line for
# missing files) and what a script trains on: training_data, EpochLoader (shuffled epochs that
# resume exactly), to_model_space.
def image_shape(dataset: str):
    """(C, H, W) of a named image dataset without loading it (folder: datasets are known once
    loaded)."""
    if dataset in ("mnist", "fashionmnist"):
        return (1, 28, 28)
    if dataset in ("cifar10", "cifar100", "svhn", "celeba", "imagenet32"):
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
    """Path of one raw IDX file of (Fashion)MNIST (plain or .gz), downloading the set when it is
    missing."""
    import torchvision

    raw = os.path.join(data_dir, "MNIST" if dataset == "mnist" else "FashionMNIST", "raw")
    candidates = (os.path.join(raw, stem), os.path.join(raw, stem + ".gz"))
    if not any(os.path.exists(p) for p in candidates):
        cls = (torchvision.datasets.MNIST if dataset == "mnist"
               else torchvision.datasets.FashionMNIST)
        try:
            cls(data_dir, train=train, download=True)
        except Exception as error:  # offline: urllib raises various errors
            raise _missing(dataset, raw, [stem + ".gz"],
                           f"download failed ({type(error).__name__}); copy torchvision's raw "
                           "files there or run once on a connected machine") from None
    return next(p for p in candidates if os.path.exists(p))


IMAGENET32_FILES = {True: [f"train_data_batch_{i}.npz" for i in range(1, 11)],
                    False: ["val_data.npz"]}


def _imagenet32(data_dir: str, train: bool, key: str) -> torch.Tensor:
    """One array of downsampled ImageNet 32x32 (Chrabaszcz, Loshchilov, Hutter 2017) over its .npz
    batch files in {data_dir}/imagenet32, read without the other (an .npz member is read on
    access): key "data" -> images uint8 (N, 3, 32, 32) (each row of the files' (n, 3072) holds
    the R, G and B planes in row-major order), "labels" -> classes 0..999 int64 (1..1000 in the
    files)."""
    where = os.path.join(data_dir, "imagenet32")
    files = IMAGENET32_FILES[train]
    missing = [f for f in files if not os.path.exists(os.path.join(where, f))]
    if missing:
        raise _missing("imagenet32", where, missing,
                       "download Imagenet32_train_npz.zip and Imagenet32_val_npz.zip "
                       "(image-net.org, 'Downsampled ImageNet', login needed) and put the "
                       ".npz files they hold there")
    parts = []
    for name in files:
        path = os.path.join(where, name)
        try:
            with np.load(path) as batch:
                array = batch[key]
        except (OSError, ValueError, KeyError) as error:
            raise UserError(f"cannot read {path} ({type(error).__name__}: {str(error)[:80]}); "
                            "expected an .npz with 'data' (n, 3072) uint8 and 'labels' "
                            "1..1000") from None
        if key == "data":
            if array.dtype != np.uint8 or array.ndim != 2 or array.shape[1] != 3 * 32 * 32:
                raise UserError(f"{path}: 'data' is {array.dtype} {array.shape}, expected uint8 "
                                "(n, 3072)")
            parts.append(torch.from_numpy(array.reshape(-1, 3, 32, 32)))
        else:
            parts.append(torch.from_numpy(np.asarray(array, dtype=np.int64).reshape(-1) - 1))
    return torch.cat(parts)


def load_images(dataset: str, data_dir: str, train: bool = True, image_size=None) -> torch.Tensor:
    """The whole split as a uint8 tensor (N, C, H, W). Convert batches with `to_unit_range`.

    MNIST / FashionMNIST are read from torchvision's raw IDX files ({data_dir}/MNIST/raw/...), so
    the four files are enough; other sets go through torchvision. Missing data is downloaded when
    the machine is online; offline, a UserError names the missing files and where to put them.
    """
    import torchvision

    if dataset.startswith("folder:"):
        return _load_folder(dataset[len("folder:"):], image_size)
    if dataset in ("mnist", "fashionmnist"):
        path = _mnist_file(dataset, data_dir, f"{'train' if train else 't10k'}-images-idx3-ubyte",
                           train)
        return torch.from_numpy(_read_idx(path).copy()).unsqueeze(1)
    if dataset == "imagenet32":
        return _imagenet32(data_dir, train, "data")
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
            ds = torchvision.datasets.SVHN(os.path.join(data_dir, "svhn"), split="train" if train
                                           else "test", download=True)
            return torch.from_numpy(ds.data)
        ds = torchvision.datasets.CelebA(data_dir, split="train" if train else "test",
                                         download=True)
        return _resize_pil_list((ds[i][0] for i in range(len(ds))), 32, len(ds),
                                f"reading {dataset} into memory")
    except UserError:
        raise
    except Exception as error:
        raise UserError(f"{dataset} data not found in {data_dir} and could not be downloaded "
                        f"({type(error).__name__}: {str(error)[:120]}); run once on a connected "
                        f"machine with --data-dir {data_dir}, or copy the torchvision files "
                        "there") from None


def _resize_pil_list(images, size, count: int, label: str):
    """`count` PIL images (any iterable) -> uint8 (N, C, H, W), centre-cropped to a square and
    resized to `size` where they differ, with a progress line every 30 s (large sets take
    minutes)."""
    from PIL import Image

    out, progress = [], Progress(label, count, interval=30, quiet=True)
    for img in images:
        img = img.convert("RGB") if img.mode not in ("L", "RGB") else img
        if size is not None and img.size != (size, size):
            side = min(img.size)  # centre crop to a square, then resize
            left, top = (img.size[0] - side) // 2, (img.size[1] - side) // 2
            img = img.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)
        arr = np.asarray(img, dtype=np.uint8)
        out.append(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1))
        progress.update(1)
    if len({a.shape for a in out}) != 1:
        raise UserError("images of different sizes or modes; pass --image-size to resize them")
    return torch.from_numpy(np.stack(out))


def _folder_files(path):
    """The image files under a folder, recursively, in sorted order (the order of images and
    labels)."""
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

    def read():
        mode = None
        for f in files:
            try:
                with Image.open(f) as img:
                    mode = mode or ("L" if img.mode == "L" else "RGB")  # the first image decides
                    yield img.convert(mode)
            # PIL's errors for truncated or foreign files
            except (OSError, SyntaxError, ValueError) as error:
                raise UserError(f"cannot read image {f} ({type(error).__name__}: {error}); remove "
                                "or replace it") from None

    return _resize_pil_list(read(), image_size, len(files), f"reading folder:{path}")


def load_labels(dataset: str, data_dir: str, train: bool = True) -> torch.Tensor:
    """Class labels 0..K-1 (int64) of the split, in the order of `load_images`.

    folder:PATH takes each image's first-level subfolder as its class (classes numbered in sorted
    name order, as torchvision's ImageFolder does). CelebA and the 2D toys have no classes.
    """
    import torchvision

    if dataset.startswith("folder:"):
        path = dataset[len("folder:"):]
        relative = [os.path.relpath(f, path) for f in _folder_files(path)]
        tops = [r.split(os.sep)[0] for r in relative]
        if any(os.sep not in r for r in relative):
            raise UserError(f"folder:{path} has images outside class subfolders; class-conditional "
                            "training needs one subfolder per class")
        classes = sorted(set(tops))
        return torch.tensor([classes.index(t) for t in tops], dtype=torch.long)
    if dataset in ("mnist", "fashionmnist"):
        path = _mnist_file(dataset, data_dir, f"{'train' if train else 't10k'}-labels-idx1-ubyte",
                           train)
        return torch.from_numpy(_read_idx(path).astype(np.int64))
    if dataset == "imagenet32":
        return _imagenet32(data_dir, train, "labels")
    if dataset not in ("cifar10", "cifar100", "svhn"):
        raise UserError(f"{dataset} has no class labels; class-conditional training needs mnist, "
                        "fashionmnist, cifar10, cifar100, svhn, imagenet32 or folder:PATH with "
                        "class subfolders")
    try:
        if dataset == "svhn":
            ds = torchvision.datasets.SVHN(os.path.join(data_dir, "svhn"), split="train" if train
                                           else "test", download=True)
            return torch.from_numpy(ds.labels.astype(np.int64))
        cls = (torchvision.datasets.CIFAR10 if dataset == "cifar10"
               else torchvision.datasets.CIFAR100)
        return torch.tensor(cls(data_dir, train=train, download=True).targets, dtype=torch.long)
    except Exception as error:
        raise UserError(f"{dataset} labels not found in {data_dir} and could not be downloaded "
                        f"({type(error).__name__}: {str(error)[:120]}); run once on a connected "
                        f"machine with --data-dir {data_dir}") from None


def to_unit_range(batch_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1]."""
    return batch_uint8.float() / 127.5 - 1.0


class EpochLoader:
    """Shuffled epochs over an in-memory tensor, drawn with a torch generator; its state resumes
    exactly."""

    def __init__(self, data: torch.Tensor, batch_size: int, seed: int):
        if len(data) < batch_size:
            raise UserError(f"dataset has {len(data)} items, fewer than --batch-size {batch_size}")
        self.data, self.batch_size = data, batch_size
        self.generator = torch.Generator().manual_seed(seed)  # on the CPU: the same order anywhere
        self.order = self.shuffled()
        self.position = 0

    def shuffled(self) -> torch.Tensor:
        """A new epoch's order, moved to the data's device once per epoch (not once per batch)."""
        return torch.randperm(len(self.data), generator=self.generator,
                              device="cpu").to(self.data.device)

    def next(self) -> torch.Tensor:
        """This rank's share (`shard`) of the next global batch; every rank keeps the same order."""
        # drop the ragged end, as drop_last does
        if self.position + self.batch_size > len(self.order):
            self.order = self.shuffled()
            self.position = 0
        idx = self.order[self.position: self.position + self.batch_size]
        self.position += self.batch_size
        return self.data[shard(idx)]

    def state_dict(self):
        return {"generator": self.generator.get_state(), "order": self.order,
                "position": self.position}

    def load_state_dict(self, state):
        self.generator.set_state(state["generator"])
        self.order, self.position = state["order"].to(self.data.device), state["position"]


def training_data(args):
    """The training split as one tensor, and the 2D plot box (None for images): 50,000 toy points
    drawn once from --seed, the points of a points:PATH file, or the images as uint8, which also
    sets args.image_channels / image_size."""
    if is_2d(args.dataset):
        points = load_points(args.dataset) if args.dataset.startswith("points:") \
            else draw_2d(args.dataset, 50_000, seed=args.seed)
        return points, data_box(points)
    images = load_images(args.dataset, args.data_dir, train=True, image_size=args.image_size)
    args.image_channels, args.image_size = images.shape[1], images.shape[2]
    return images, None


def to_model_space(batch: torch.Tensor) -> torch.Tensor:
    """A training batch as the model sees it: uint8 images -> [-1, 1], 2D points unchanged."""
    return to_unit_range(batch) if batch.dtype == torch.uint8 else batch


# --------------------------------------------------------------------------------------------------
# Settings: the command line, presets, resuming from a checkpoint's settings, --help defaults
# --------------------------------------------------------------------------------------------------
# Each script's Args extends RunArgs; parse_args reads the command line (with --resume, over the
# checkpoint's settings); Args.__post_init__ fills the PRESETS values (apply_presets) and checks
# them (require, check_positive).
@dataclasses.dataclass
class RunArgs:
    """The settings every method script shares, with the same names, order and meaning
    (DESIGN.md). Each script's Args extends it with its method's fields and gives exp_name,
    dataset (and where it differs ema_decay) its own default; a field left None takes the
    script's PRESETS value for the dataset in the script's __post_init__."""
    exp_name: str = "run"
    """name used in the run folder"""
    seed: int = 1
    """random seed (weights, data order, noise)"""
    dataset: str = "checkerboard"
    """a 2D toy, an image set, folder:PATH or points:PATH (each script lists its own)"""
    preset: Optional[Literal["cpu"]] = None
    """cpu: the reduced image configuration of PRESETS["cpu"] (small nets; about 2 hours of
    training on one CPU core) in place of the image defaults, for every field not given"""
    data_dir: str = "data"
    """where image datasets are read from (and downloaded to when online)"""
    run_dir: Optional[str] = None
    """output folder; default runs/{exp_name}__{dataset}__{seed}__{time}"""
    steps: Optional[int] = None
    """training iterations"""
    batch_size: Optional[int] = None
    """data examples per iteration (over all processes under torchrun)"""
    lr: Optional[float] = None
    """Adam learning rate of the energy network"""
    ema_decay: Optional[float] = None
    """EMA decay of the weights for sampling and evaluation"""
    device: str = "auto"
    """auto | cpu | cuda | cuda:N"""
    log_every: int = 100
    """iterations between progress lines / metrics.jsonl records"""
    sample_every: Optional[int] = None
    """iterations between sample pictures"""
    save_every: Optional[int] = None
    """iterations between checkpoints (ckpt.pt and a numbered snapshot)"""
    resume: bool = False
    """continue the run in --run-dir from its ckpt.pt with its own settings, exactly"""
    save_minutes: float = 15.0
    """also write ckpt.pt after this many minutes of wall clock since the last save (0 = off)"""
    amp: Literal["none", "bf16"] = "none"
    """bf16: autocast the energy network's passes (samplers and loss) to bfloat16, its output back
    to fp32 (MH arithmetic, reductions, the Gibbs softmax and the EMA stay fp32); none: fp32"""
    compile: bool = False
    """torch.compile the samplers' energy-and-input-gradient pass (forward, input gradient and the
    arithmetic around them in one fused, shape-generic graph; the first call compiles) and
    DA-EBM's pass over all levels"""
    channels_last: bool = False
    """keep the image network's convolution weights (and so its activations) channels-last (NHWC),
    the layout GPU tensor cores convolve without transposing; 2D networks have no convolutions"""
    fid_every: int = 0
    """images: iterations between FIDs of --fid-samples EMA samples against the training split
    (the evaluator's protocol), logged to metrics.jsonl; the checkpoint with the lowest is kept as
    best.pt (0 = off)"""
    fid_samples: int = 5000
    """samples per FID of --fid-every (the official CDRL code: 5,000 every 20,000 iterations)"""
    inception_weights: Optional[str] = None
    """torch-fidelity's Inception weights file for --fid-every on machines without internet
    (default: downloaded)"""


def show_preset_defaults(args_class, presets: dict):
    """Make --help print real defaults instead of 'None': each preset field's per-dataset values
    from the script's PRESETS table (the one place those numbers live); the other fields left at
    None say their default in their own text (derived from the data or from another flag), so
    tyro's hint is dropped."""
    import typing

    import tyro

    def as_text(value):
        return " ".join(map(str, value)) if isinstance(value, tuple) else value

    for field in dataclasses.fields(args_class):
        if field.default is not None:
            continue
        # a field of RunArgs is shared by the three scripts' Args: annotate this class's copy
        field = args_class.__dataclass_fields__[field.name] = copy.copy(field)
        if any(field.name in table for table in presets.values()):
            values = ", ".join(f"{kind} {as_text(table[field.name])}"
                               for kind, table in presets.items() if field.name in table)
            hint = f"(default: {values})"
        else:
            hint = ""
        inner = [t for t in typing.get_args(field.type) if t is not type(None)][0]
        metavar = {int: "INT", float: "FLOAT", bool: "{True,False}", str: "STR"}.get(inner, "VALUE")
        if typing.get_origin(inner) is typing.Literal:
            metavar = "{" + ",".join(typing.get_args(inner)) + "}"
        elif typing.get_origin(inner) is tuple:
            metavar = "INT [INT ...]"
        shown = tyro.conf.arg(help_behavior_hint=hint, metavar=metavar)
        field.type = typing.Annotated[field.type, shown]
        args_class.__annotations__[field.name] = field.type


def resume_target(argv):
    """(--resume given, the --run-dir value) from raw command-line tokens (--run-dir / --run_dir,
    'R' as the next token or after '=', --resume / --no-resume: the last one counts)."""
    resume, run_dir = False, None
    for index, token in enumerate(argv):
        key, has_value, value = token.partition("=")
        key = key.replace("_", "-")
        if key in ("--resume", "--no-resume"):
            resume = key == "--resume"
        elif key == "--run-dir":
            run_dir = value if has_value else (argv[index + 1] if index + 1 < len(argv) else None)
    return resume, run_dir


def args_from_checkpoint(args_class, saved: dict, path: str, overrides=None):
    """Rebuild Args from a checkpoint's saved settings (lists back to tuples), with `overrides` on
    top.

    Settings that today's Args does not know, or that the checkpoint lacks, are named in one
    UserError: the checkpoint comes from an older or edited version of the script."""
    names = [field.name for field in dataclasses.fields(args_class)]
    unknown = sorted(set(saved) - set(names))
    missing = [name for name in names if name not in saved]
    if unknown or missing:
        parts = ([f"unknown settings {', '.join(unknown)}"] if unknown else []) + \
                ([f"missing settings {', '.join(missing)}"] if missing else [])
        raise UserError(f"checkpoint {path} does not fit this version of the script "
                        f"({'; '.join(parts)}); use the script version that wrote it")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()}
    return args_class(**{**values, **(overrides or {})})


def parse_args(args_class, method: str, argv=None):
    """tyro.cli(Args). With --resume, every setting comes from {run_dir}/ckpt.pt and the flags given
    on the command line are laid over it (main then refuses the ones that may not change)."""
    import tyro

    argv = sys.argv[1:] if argv is None else list(argv)
    resume, run_dir = resume_target(argv)
    if not resume or "-h" in argv or "--help" in argv:
        return tyro.cli(args_class, args=argv)
    if not run_dir:
        raise UserError("--resume needs --run-dir pointing at the run to continue")
    # the checkpoint's settings are the defaults the flags are parsed over, so that a flag is
    # checked together with the run's own settings (e.g. --guidance with a conditional run)
    path = os.path.join(run_dir, "ckpt.pt")
    saved = args_from_checkpoint(args_class, load_checkpoint(path, method)["args"], path)
    return tyro.cli(args_class, args=argv, default=saved)


def check_resume_args(args, saved: dict, resumable: set, path: str):
    """Refuse a resume whose method settings differ from the checkpoint's, naming every mismatch."""
    mismatches = []
    for key, value in saved.items():
        mine = getattr(args, key, None)
        mine = list(mine) if isinstance(mine, tuple) else mine
        if key not in resumable and mine != value:
            mismatches.append(f"{key} is {mine!r}, the checkpoint has {value!r}")
    if mismatches:
        raise UserError(f"--resume of {path}: {'; '.join(mismatches)}. Only run length, logging, "
                        "sampling, device and data-dir settings may change; drop the others to "
                        "take the run's own")


def apply_presets(args, presets: dict):
    """Fill the Args fields left at None from the script's PRESETS table ("2d" for the toys,
    "images" for every image set, overridden by a table named after the dataset where the script
    has one, e.g. cdrl.py's "imagenet32", and with --preset cpu by the "cpu" table, the reduced
    image configuration), then check the shared fields."""
    if args.preset == "cpu" and is_2d(args.dataset):
        raise UserError("--preset cpu is the reduced configuration of image sets; the 2D toys' "
                        "defaults are CPU quick starts already")
    table = {**presets["2d" if is_2d(args.dataset) else "images"], **presets.get(args.dataset, {}),
             **(presets["cpu"] if args.preset == "cpu" else {})}
    for key, value in table.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    check_positive(args, ["steps", "batch_size", "log_every", "sample_every", "save_every"])
    if not args.lr > 0:
        raise UserError(f"--lr must be positive, got {args.lr}")
    if not 0 <= args.ema_decay < 1:
        raise UserError(f"--ema-decay must be in [0, 1), got {args.ema_decay}")
    if not args.save_minutes >= 0:
        raise UserError(f"--save-minutes must be >= 0, got {args.save_minutes}")
    if args.fid_every < 0 or args.fid_samples < 2:
        raise UserError(f"--fid-every must be >= 0 and --fid-samples >= 2 (a covariance), got "
                        f"{args.fid_every} and {args.fid_samples}")
    if args.fid_every and is_2d(args.dataset):
        raise UserError("--fid-every scores images; a 2D run is scored by eval_fid_ood.py's exact "
                        "NLL")


def require(*checks):
    """(condition, message) pairs: the first false condition raises its message as a UserError."""
    for ok, message in checks:
        if not ok:
            raise UserError(message)


def check_positive(args, names):
    for key in names:
        if getattr(args, key) <= 0:
            raise UserError(f"--{key.replace('_', '-')} must be positive, got {getattr(args, key)}")


def flips_by_default(dataset: str) -> bool:
    """Random horizontal flips suit natural images (CIFAR, CelebA, ImageNet, folders), not digits or
    house numbers."""
    return (dataset in ("cifar10", "cifar100", "celeba", "imagenet32")
            or dataset.startswith("folder:"))


def set_image_shape(args):
    """Named image sets have a known shape; folder: sets learn theirs when loaded
    (training_data)."""
    named_set = not is_2d(args.dataset) and not args.dataset.startswith("folder:")
    if named_set and args.image_channels is None:
        args.image_channels, args.image_size, _ = image_shape(args.dataset)


# --------------------------------------------------------------------------------------------------
# Before training: the run folder, seeds, the device
# --------------------------------------------------------------------------------------------------
# open_run checks the folder (a new run refuses one that holds a checkpoint) and returns the
# checkpoint to resume; prepare_run_dir writes args.json; seed_everything, pick_device; own_rng
# gives pictures their own random numbers.
# Args fields that may change on --resume in every script: run length, logging, saving, device,
# precision and memory layout, where the data are (their shape is re-read from the data); each
# script adds its sampling options.
RESUMABLE = {"exp_name", "data_dir", "run_dir", "steps", "device", "log_every", "sample_every",
             "save_every", "resume", "save_minutes", "amp", "compile", "channels_last",
             "fid_every", "fid_samples", "inception_weights", "image_size", "image_channels"}


def run_dir_of(args) -> str:
    dataset = args.dataset.replace("/", "_").replace(":", "_")
    return args.run_dir or os.path.join(
        "runs", f"{args.exp_name}__{dataset}__{args.seed}__{int(time.time())}")


def open_run(args, method: str, resumable: set):
    """Before any data are read: check the run folder and return the checkpoint to resume (or None).

    A new run refuses a folder that holds a checkpoint; --resume loads it and refuses changed method
    settings. Either way the folder (or its nearest existing parent) must be writable."""
    args.run_dir = run_dir_of(args)
    path = os.path.join(args.run_dir, "ckpt.pt")
    ckpt = None
    if args.resume:
        ckpt = load_checkpoint(path, method)
        check_resume_args(args, ckpt["args"], resumable, path)
    elif os.path.exists(path):
        raise UserError(f"{args.run_dir} already holds a run (ckpt.pt); continue it with --resume "
                        f"--run-dir {args.run_dir}, or choose another --run-dir")
    probe_dir = args.run_dir
    while not os.path.isdir(probe_dir):
        parent = os.path.dirname(os.path.abspath(probe_dir))
        if os.path.exists(probe_dir) or parent == probe_dir:
            raise UserError(f"cannot create run folder {args.run_dir}: {probe_dir} is not a "
                            "directory")
        probe_dir = parent
    try:
        with tempfile.TemporaryFile(dir=probe_dir):
            pass
    except OSError as error:
        raise UserError(f"cannot write to run folder {args.run_dir} ({error.strerror}); choose "
                        "another --run-dir") from None
    return ckpt


def prepare_run_dir(args, step: int):
    """Create the run folder, remove temp files left by a killed save, cut metrics.jsonl back to
    `step` (the checkpoint's, so a resumed run has no duplicate records) and write args.json (the
    resolved settings). Rank 0 does it while the other ranks wait."""
    if is_main():
        _write_run_dir(args, step)
    if rank_and_world()[1] > 1:
        dist.barrier()


def _write_run_dir(args, step: int):
    os.makedirs(args.run_dir, exist_ok=True)
    for name in os.listdir(args.run_dir):
        if name.endswith(".tmp"):
            os.remove(os.path.join(args.run_dir, name))
    metrics = os.path.join(args.run_dir, "metrics.jsonl")
    if os.path.exists(metrics):
        kept = []
        with open(metrics) as f:
            for line in f:
                try:
                    record = json.loads(line)
                except ValueError:  # a line cut short by a kill, or blank
                    continue
                if 0 < record["step"] <= step:
                    kept.append(line if line.endswith("\n") else line + "\n")
        with open(metrics + ".tmp", "w") as f:
            f.writelines(kept)
        os.replace(metrics + ".tmp", metrics)
    with open(os.path.join(args.run_dir, "args.json.tmp"), "w") as f:
        json.dump(args_to_dict(args), f, indent=2)
    os.replace(os.path.join(args.run_dir, "args.json.tmp"), os.path.join(args.run_dir, "args.json"))


def args_to_dict(args) -> dict:
    """Dataclass -> dict of primitives (tuples become lists), safe for weights_only loading and
    JSON."""
    out = {}
    for field in dataclasses.fields(args):
        value = getattr(args, field.name)
        out[field.name] = list(value) if isinstance(value, tuple) else value
    return out


def print_start(args, description: str):
    print(f"{description}, run dir {args.run_dir}")
    print("args: " + ", ".join(f"{k}={v}" for k, v in args_to_dict(args).items()))


def seed_everything(seed: int):
    """Seed the global generators; under torchrun rank r uses seed + r (rank 0 draws what one
    process draws), so that the ranks' noise is independent."""
    seed += rank_and_world()[0]
    torch.manual_seed(seed)
    np.random.seed(seed)


@contextlib.contextmanager
def own_rng(seed: int):
    """Run a block (pictures, evaluations during training) on its own random numbers: the global CPU
    and CUDA generators are saved, seeded with `seed`, and restored afterwards, so that drawing
    pictures never changes what training draws next."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def pick_device(name: str) -> torch.device:
    """'auto' -> cuda when available, else cpu. On CUDA, TF32 matmuls and convolutions are on."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name != "cpu" and not name.startswith("cuda"):
        raise UserError(f"--device {name} is not supported: use auto, cpu, cuda or cuda:N")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"--device {name} asked for but CUDA is not available; use --device "
                            "cpu")
        try:
            device = torch.device(name)
        except RuntimeError:
            raise UserError(f"--device {name} is not a device name; use cuda or cuda:N") from None
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s)")
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
        return device
    return torch.device("cpu")


# --------------------------------------------------------------------------------------------------
# During training: the loop's schedule, metrics, progress, signals, divergence
# --------------------------------------------------------------------------------------------------
# StopGuard.due says what is due after an iteration and turns SIGINT / SIGTERM into a save and a
# clean exit; MetricLog writes metrics.jsonl and the progress line; Progress reports long phases;
# stop_if_diverged stops on non-finite values before they reach a checkpoint.
def every(done: int, interval: int, total: int) -> bool:
    """True at iterations that are a multiple of `interval` and at the last one (done counts from
    1); never for interval 0 (an option that is off)."""
    return interval > 0 and (done % interval == 0 or done == total)


def stop_if_diverged(step: int, loss: torch.Tensor, energy_pos, energy_neg, run_dir: str,
                     advice: str, also_finite=None):
    """Stop (exit 1) on a non-finite or exploding loss (|loss| > 1e8, the DA-EBM official test), or
    a non-finite `also_finite` tensor (persistent chains), before it is logged or saved, saying
    whether a good checkpoint exists."""
    state_ok = also_finite is None or torch.isfinite(also_finite).all().item()
    if not any_rank(not (state_ok and torch.isfinite(loss).item() and loss.abs().item() <= 1e8)):
        return
    if not is_main():
        sys.exit(1)
    path = os.path.join(run_dir, "ckpt.pt")
    kept = "no checkpoint was written before it"
    if os.path.exists(path):
        last = torch.load(path, map_location="cpu", weights_only=True)["step"]
        kept = f"the last good checkpoint {path} (step {last}) is kept"
    print(f"error: training diverged by step {step} (loss {loss.item():.4g}, mean energy of "
          f"positives {float(energy_pos):.4g}, negatives {float(energy_neg):.4g}); {kept}. "
          f"{advice}", file=sys.stderr)
    sys.exit(1)


class MetricLog:
    """Appends one JSON line per record to {run_dir}/metrics.jsonl and prints a progress line."""

    def __init__(self, run_dir: str, total_steps: int, start_step: int):
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.total, self.last_step, self.last_time = total_steps, start_step, time.time()
        self.tb = None
        if not is_main():  # one log per run: rank 0's
            return
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(run_dir)
        except Exception:  # TensorBoard is optional
            self.tb = None

    def log(self, step: int, metrics: dict, echo: bool = True):
        if not is_main():
            return
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
            parts = [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k,
                     v in metrics.items()]
            print(f"step {step}/{self.total} | " + " | ".join(parts) +
                  f" | {rate:.2f} it/s | ETA {format_seconds(eta)}", flush=True)


    def note(self, step: int, metrics: dict):
        """A record of an evaluation, during or after training (no it/s): its time is left out of
        the next record's it/s."""
        if not is_main():
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.tb is not None:
            for key, value in metrics.items():
                self.tb.add_scalar(key, value, step)
        print(f"step {step}/{self.total} | " + " | ".join(f"{k} {v:.4g}" for k, v in
                                                          metrics.items()), flush=True)
        self.last_time = time.time()


def format_seconds(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class Progress:
    """A progress line (done/total, rate, ETA) at most every `interval` seconds and at the end, for
    every long phase that is not the training loop (sampling, evaluation, statistics). `quiet`: no
    closing line for a phase too short to have printed one before (samplers called once per
    batch)."""

    def __init__(self, label: str, total: int, interval: float = 10.0, quiet: bool = False):
        self.label, self.total, self.done, self.interval = label, total, 0, interval
        self.start = self.last = time.time()
        self.speak_at_end = not quiet

    def update(self, count: int):
        self.done += count
        now = time.time()
        due = now - self.last >= self.interval
        if due or (self.done >= self.total and self.speak_at_end):
            rate = self.done / max(now - self.start, 1e-9)
            eta = format_seconds((self.total - self.done) / max(rate, 1e-9))
            print(f"  {self.label}: {self.done}/{self.total} ({rate:.1f}/s, ETA {eta})", flush=True)
            self.last, self.speak_at_end = now, True


class StopGuard:
    """While training: SIGINT / SIGTERM (Ctrl-C, cluster preemption) ask the loop to finish the
    iteration, save and exit; a second signal stops at once. `save_due()` is also true every
    `save_minutes` of wall clock. Under torchrun the ranks agree every AGREE_EVERY iterations
    (one all-reduce of both flags, the only host sync it adds) so that all save and stop at the
    same step, whichever rank saw the signal."""
    AGREE_EVERY = 10

    def __init__(self, save_minutes: float):
        self.signal_name, self.interval, self.stopping = None, save_minutes * 60, False
        self.last_save = time.time()
        self.previous, self.calls = {}, 0

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        return False

    def _handle(self, signum, frame):
        if self.signal_name is not None:
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name
        print(f"\n{self.signal_name}: finishing this iteration, then saving (again to stop at "
              "once)",
              file=sys.stderr, flush=True)

    def save_due(self) -> bool:
        """Once per iteration: whether to save now (a signal, or the wall-clock interval); sets
        `stopping`. Under torchrun only every AGREE_EVERY-th call asks the other ranks (False in
        between), so a signal is acted on within AGREE_EVERY iterations."""
        due = self.interval > 0 and time.time() - self.last_save >= self.interval
        stop = self.signal_name is not None
        if rank_and_world()[1] > 1:
            self.calls += 1
            if self.calls % self.AGREE_EVERY:
                return False
            flags = torch.tensor([float(stop), float(due)], device=_collective_device())
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            stop, due = (bool(flag) for flag in flags.tolist())
        self.stopping = stop
        return stop or due

    def due(self, done: int, args) -> tuple:
        """After `done` iterations: (log, sample, FID, save) due, each every its --*-every and at
        the end; a save also with each FID measurement and when save_due() asks (once per
        iteration)."""
        log, sample, fid = (every(done, interval, args.steps)
                            for interval in (args.log_every, args.sample_every, args.fid_every))
        return log, sample, fid, self.save_due() or every(done, args.save_every, args.steps) or fid

    def saved(self, run_dir: str, step: int, script: str):
        """After each save: restart the wall-clock interval; if stopping, tell how to resume and
        exit non-zero (130 for SIGINT, 143 for SIGTERM)."""
        self.last_save = time.time()
        if not self.stopping:
            return
        name = self.signal_name or "SIGTERM"  # a rank the signal did not reach: another rank's
        if is_main():
            print(f"stopped by {name} at step {step}; checkpoint saved. Continue with:\n"
                  f"  python {script} --resume --run-dir {run_dir}", file=sys.stderr, flush=True)
        sys.exit(130 if name == "SIGINT" else 143)


# --------------------------------------------------------------------------------------------------
# Checkpoints: the EMA, atomic saves, exact resume
# --------------------------------------------------------------------------------------------------
# checkpoint_state gathers a run's state (weights, EMA, random generators, loader) into one dict;
# save_checkpoint writes it atomically; load_checkpoint and restore bring a run back exactly.
def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if rank_and_world()[1] > 1:  # one GPU per process: only its own generator
        if torch.cuda.is_initialized():
            state["cuda_device"] = torch.cuda.get_rng_state()
    elif torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict):
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        # a machine with fewer GPUs than the one that saved: the generators it has (a plain run
        # draws from its one device only)
        for index, device_state in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(device_state, index)
    if "cuda_device" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda_device"])


def update_ema(ema, model, decay: float, copy_buffers: bool):
    """ema <- decay ema + (1 - decay) model for every parameter in one fused (foreach) call; buffers
    (spectral-norm vectors, adapted step sizes) copied when asked."""
    with torch.no_grad():
        torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - decay)
        if copy_buffers:
            torch._foreach_copy_(list(ema.buffers()), list(model.buffers()))


def checkpoint_state(method: str, args, step: int, model, ema, rank_state=None,
                     **method_state) -> dict:
    """The checkpoint dict: the part every method has, then the method's own entries (optimizer,
    scheduler, loader, chains, ...), all global (the same on every rank, or gathered). Under
    torchrun also "ranks": each rank's random state and `rank_state` (its own statistics), for an
    exact resume with the same number of processes (a collective: every rank calls it)."""
    state = {"method": method, "format": CHECKPOINT_FORMAT, "args": args_to_dict(args),
             "step": step, "model": model.state_dict(),
             "ema": ema.state_dict() if ema is not None else None, "rng": rng_state(),
             **method_state}
    if rank_and_world()[1] > 1:
        own = {"rng": rng_state(), **{key: value.cpu() for key, value in
                                      (rank_state or {}).items()}}
        state["ranks"] = gather_objects(own)
    return state


def own_rank_state(ckpt: dict):
    """This rank's entry of a checkpoint's "ranks" when it was written by as many processes as run
    now; None otherwise (one process, or another number)."""
    rank, world = rank_and_world()
    saved = ckpt.get("ranks")
    return saved[rank] if saved is not None and len(saved) == world and world > 1 else None


def restore(ckpt: dict, model, ema, loader) -> int:
    """Load the part of a checkpoint every method has (weights, EMA, data order, random state);
    returns its step. The script loads its own entries (optimizers, schedulers, chains) after
    this."""
    model.load_state_dict(ckpt["model"])
    if ema is not None:
        ema.load_state_dict(ckpt["ema"])
    loader.load_state_dict(ckpt["loader"])
    rank, world = rank_and_world()
    saved_world = len(ckpt.get("ranks") or [None])
    own = own_rank_state(ckpt)
    if own is not None:
        set_rng_state(own["rng"])
    elif rank == 0:
        set_rng_state(ckpt["rng"])
    else:  # another number of processes: a new stream for this rank, reproducible from the step
        torch.manual_seed(ckpt["args"]["seed"] + rank + 100_003 * ckpt["step"])
    print(f"resuming at step {ckpt['step']}")
    if saved_world != world:
        print(f"note: the checkpoint was written by {saved_world} process(es) and {world} run now: "
              "chains and batches are re-split and the random streams of ranks other than 0 "
              "re-seeded, so the run goes on correctly but not bitwise as it would have")
    return ckpt["step"]


def count_parameters(module) -> str:
    return f"{sum(p.numel() for p in module.parameters()) / 1e6:.3f}M parameters"


def _atomic_save(state: dict, path: str):
    tmp = path + ".tmp"
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except OSError as error:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise UserError(f"could not write {path} ({error.strerror or error}); the previous "
                        "checkpoint is kept. Free space or choose another --run-dir, then "
                        "--resume") from None


def save_checkpoint(state: dict, run_dir: str, snapshot_step=None, best: bool = False):
    """Write {run_dir}/ckpt.pt atomically (temp file + os.replace); optionally also ckpt_{step}.pt
    and best.pt (the lowest FID of --fid-every so far). A failed write (full disk, ...) removes its
    temp file and leaves the previous checkpoint as it was. Rank 0 writes; the others return at
    once."""
    if not is_main():
        return
    _atomic_save(state, os.path.join(run_dir, "ckpt.pt"))
    if snapshot_step is not None:
        _atomic_save(state, os.path.join(run_dir, f"ckpt_{snapshot_step:08d}.pt"))
    if best:
        _atomic_save(state, os.path.join(run_dir, "best.pt"))


def load_checkpoint(path: str, method=None) -> dict:
    """torch.load(weights_only=True) with one clear UserError for missing, corrupt or foreign files.
    A run folder stands for its ckpt.pt."""
    if os.path.isdir(path):
        path = os.path.join(path, "ckpt.pt")
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise UserError(f"checkpoint {path} is corrupt or not a torch checkpoint "
                        f"({type(error).__name__}: {str(error).splitlines()[0][:120]})") from None
    if not isinstance(ckpt, dict) or "method" not in ckpt or "format" not in ckpt:
        raise UserError(f"checkpoint {path} is not one of this project's checkpoints (no "
                        "method/format keys)")
    if ckpt["format"] != CHECKPOINT_FORMAT:
        raise UserError(f"checkpoint {path} has format {ckpt['format']}, this code reads "
                        f"{CHECKPOINT_FORMAT}")
    if method is not None and ckpt["method"] != method:
        raise UserError(f"checkpoint {path} was written by method {ckpt['method']!r}, not "
                        f"{method!r}")
    return ckpt


# --------------------------------------------------------------------------------------------------
# Several processes (torchrun): data parallel, --batch-size is the global batch
# --------------------------------------------------------------------------------------------------
# start_processes / end_processes around main; shard and gather_shards for persistent chains; the
# collectives of a training step (average_gradients, sum / mean over ranks); batches_of_this_rank
# and gather_batches for sampling and scoring on every rank. One process: all of them no-ops.
def rank_and_world() -> tuple:
    """(this process's rank, number of processes); (0, 1) without torchrun."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    """Rank 0, the one process that prints, logs, draws pictures and writes checkpoints."""
    return rank_and_world()[0] == 0


# How long a collective waits for the slowest rank. Sample batches are dealt round robin, so in an
# FID phase one rank can draw a whole batch more than another before they gather: at DA-EBM's
# paper configuration one batch of 200 samples is about 15 minutes on an H100, past the 10-minute
# default, after which NCCL would abort the run.
COLLECTIVE_TIMEOUT = datetime.timedelta(hours=2)


def start_processes(device_name: str) -> torch.device:
    """This process's device. Under torchrun with several processes (WORLD_SIZE > 1): join the
    process group (NCCL on CUDA, one GPU per process by LOCAL_RANK; gloo on a CPU; collectives wait
    COLLECTIVE_TIMEOUT) unless the caller has joined one already, and silence stdout on every rank
    but 0 (errors still reach stderr). One process, with or without torchrun, is the plain
    single-device run."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = pick_device(device_name)
    if world == 1:
        return device
    if device.type == "cuda":
        if device.index is not None:
            raise UserError(f"--device {device_name} under torchrun: each process takes the GPU "
                            "of its LOCAL_RANK; use --device auto or cuda (choose GPUs with "
                            "CUDA_VISIBLE_DEVICES)")
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        _PROCESS_GROUP["ours"] = True
        if device.type == "cuda":
            dist.init_process_group("nccl", device_id=device, timeout=COLLECTIVE_TIMEOUT)
        else:
            dist.init_process_group("gloo", timeout=COLLECTIVE_TIMEOUT)
        if dist.get_rank() != 0:
            sys.stdout = open(os.devnull, "w")
    return device


_PROCESS_GROUP = {"ours": False}  # whether start_processes created the group (then it ends it)


def end_processes() -> bool:
    """After the training loop: the ranks wait for each other and leave the process group (unless
    the caller made it); what follows (final pictures and samples) is rank 0's alone. True on rank
    0 (and with one process)."""
    rank, world = rank_and_world()
    if world > 1:
        dist.barrier()
        if _PROCESS_GROUP["ours"]:
            dist.destroy_process_group()
    return rank == 0


def check_divisible(**sizes):
    """Global sizes (batch, chains) must split evenly over the processes: one clear line if not."""
    world = rank_and_world()[1]
    for name, value in sizes.items():
        if value % world:
            raise UserError(f"--{name.replace('_', '-')} {value} does not split over {world} "
                            f"processes; use a multiple of {world}")


def shard(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's rows of a global tensor, as its own tensor: rows rank, rank + world, ... (the
    tensor itself with one process)."""
    rank, world = rank_and_world()
    return tensor[rank::world].contiguous() if world > 1 else tensor


def gather_shards(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's `shard` back into the global tensor in its global row order (a collective: every
    rank calls it)."""
    world = rank_and_world()[1]
    if world == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world)]
    dist.all_gather(parts, tensor.contiguous())
    return torch.stack(parts, 1).flatten(0, 1)


def batches_of_this_rank(n: int, batch_size: int) -> list:
    """(index, first row, rows) of the batches of n rows that this process computes: the rows in
    batches of batch_size, in order, dealt round robin over the ranks (all of them with one
    process). Which rank computes a batch changes nothing else: see gather_batches."""
    rank, world = rank_and_world()
    firsts = list(range(0, n, batch_size))
    return [(index, firsts[index], min(batch_size, n - firsts[index]))
            for index in range(rank, len(firsts), world)]


def gather_batches(outputs: list, n: int, batch_size: int) -> torch.Tensor:
    """Every rank's outputs for its batches_of_this_rank(n, batch_size) (CPU tensors, one per batch,
    rows first) as one CPU tensor in the global row order, on every rank (a collective: one padded
    all-gather)."""
    rank, world = rank_and_world()
    if world == 1:
        return torch.cat(outputs)
    # rank 0 always holds batch 0: its row shape and dtype are every rank's
    spec = [(tuple(outputs[0].shape[1:]), outputs[0].dtype) if rank == 0 else None]
    dist.broadcast_object_list(spec, 0)
    row_shape, dtype = spec[0]
    rows = [min(batch_size, n - first) for first in range(0, n, batch_size)]
    rounds = -(-len(rows) // world)
    local = torch.zeros(rounds, batch_size, *row_shape, dtype=dtype, device=_collective_device())
    for index, output in enumerate(outputs):
        local[index, :len(output)] = output
    parts = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(parts, local)
    by_batch = torch.stack(parts, 1).flatten(0, 1).cpu()  # batch index = round * world + rank
    return torch.cat([by_batch[index, :count] for index, count in enumerate(rows)])


def _collective_device() -> torch.device:
    """Where the process group's tensors live: this rank's GPU under NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def average_gradients(parameters):
    """Replace every rank's gradients by their mean over the ranks: one all-reduce of one flat
    buffer (each rank's loss is a mean over its equal share of the global batch, so the mean of
    the ranks' gradients is the gradient of the global batch's loss). Explicit rather than
    DistributedDataParallel: the samplers run the network many times for input gradients only,
    which DDP's one-forward-one-backward hooks do not expect; overlapping the all-reduce with the
    loss's backward could hide it only behind that one pass of the many per iteration."""
    if rank_and_world()[1] == 1:
        return
    grads = [p.grad for p in parameters if p.grad is not None]
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat)
    flat /= rank_and_world()[1]
    torch._foreach_copy_(grads, [part.view_as(g) for part, g in
                                 zip(flat.split([g.numel() for g in grads]), grads)])


def sum_over_ranks_(*tensors):
    """In place: each tensor becomes its sum over the ranks (a collective)."""
    if rank_and_world()[1] > 1:
        for tensor in tensors:
            dist.all_reduce(tensor)


def mean_over_ranks(*tensors) -> tuple:
    """Each tensor's mean over the ranks, as new tensors (for logged figures)."""
    if rank_and_world()[1] == 1:
        return tensors
    stacked = torch.stack([t.detach().float() for t in tensors])
    dist.all_reduce(stacked)
    return tuple(stacked / rank_and_world()[1])


def any_rank(flag: bool) -> bool:
    """True on every rank when it is true on any (a collective): decisions that must be the same
    everywhere (save, stop, diverged)."""
    if rank_and_world()[1] == 1:
        return flag
    value = torch.tensor([float(flag)], device=_collective_device())
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def broadcast_from_main(module):
    """Every parameter and buffer of `module` set to rank 0's (the ranks build their models from
    different random streams)."""
    if rank_and_world()[1] > 1:
        for tensor in module.state_dict().values():
            dense = tensor.contiguous()  # a channels-last weight travels as a dense copy
            dist.broadcast(dense, 0)
            tensor.copy_(dense)


def gather_objects(obj) -> list:
    """Every rank's `obj` (small: random states, statistics), in rank order, on every rank."""
    out = [None] * rank_and_world()[1]
    dist.all_gather_object(out, obj)
    return out


# --------------------------------------------------------------------------------------------------
# Speed flags: --amp bf16, --compile, --channels-last
# --------------------------------------------------------------------------------------------------
# What the scripts wrap their networks' passes in; the defaults (fp32, eager, contiguous) leave
# every number as it is.
def autocast_bf16(enabled: bool, device_type: str):
    """bfloat16 autocast for --amp bf16; otherwise a no-op context (also on devices autocast does
    not know, such as the meta device that benchmarks/bench.py counts FLOPs on)."""
    return torch.autocast(device_type, torch.bfloat16) if enabled else contextlib.nullcontext()


def compiled(function, enabled: bool):
    """torch.compile(function) for --compile, else function itself. Dynamo is allowed to trace
    torch.autograd.grad (otherwise the graph breaks there), so an energy-and-input-gradient function
    becomes one graph: forward, input gradient and the elementwise work fused. Shape-generic
    (dynamic=True), so one compilation serves the training batch, the sampler's batch and the
    pictures' sizes (about half the compile time of a static first graph plus a dynamic recompile:
    docs/RESULTS.md); torch.compile keeps its cache on the code object, so wrapping again is
    cheap."""
    if not enabled:
        return function
    torch._dynamo.config.trace_autograd_ops = True
    # no duck shaping: a batch equal to a width (CDRL: 256 rows, 256-wide embeddings) would share
    # one size symbol with it, which the weights then pin, and every other batch (the sampler's
    # 500) would recompile (tests/test_speed_paths.py)
    import torch.fx.experimental._config as fx_config

    fx_config.use_duck_shape = False
    return torch.compile(function, dynamic=True)


def memory_layout(model, channels_last: bool):
    """--channels-last: the model's 4D tensors (convolution weights) stored NHWC, so convolutions
    return NHWC activations and their input gradients; nn.Module.to changes no other tensor, so a 2D
    network is untouched. load_state_dict copies into these tensors and keeps their layout: a
    checkpoint does not depend on it."""
    return model.to(memory_format=torch.channels_last) if channels_last else model


# --------------------------------------------------------------------------------------------------
# Pictures (no matplotlib: PNGs written through torchvision)
# --------------------------------------------------------------------------------------------------
# Sample grids of images; 2D densities and histograms as colour panels side by side.
def save_image_grid(images: torch.Tensor, path: str, nrow=None):
    """Images in [-1, 1] (N, C, H, W) -> one PNG grid."""
    import torchvision

    nrow = nrow or max(1, int(math.sqrt(len(images))))
    torchvision.utils.save_image((images.detach().float().cpu().clamp(-1, 1) + 1) / 2, path,
                                 nrow=nrow, padding=1)


_MAGMA = torch.tensor([[0, 0, 4], [59, 15, 112], [140, 41, 129], [222, 73, 104], [254, 159, 109],
                       [252, 253, 191]], dtype=torch.float32) / 255


def colorize(values: torch.Tensor) -> torch.Tensor:
    """A 2D array -> RGB image (3, H, W) through a magma-like colour map, scaled to its own
    min/max."""
    v = values.float()
    v = (v - v.min()) / (v.max() - v.min()).clamp_min(1e-12)
    pos = v * (len(_MAGMA) - 1)
    low = pos.floor().long().clamp(max=len(_MAGMA) - 2)
    frac = (pos - low).unsqueeze(-1)
    rgb = _MAGMA[low] * (1 - frac) + _MAGMA[low + 1] * frac
    return rgb.permute(2, 0, 1)


def histogram_2d(points: torch.Tensor, lo: float, hi: float, resolution: int) -> torch.Tensor:
    """Counts of 2D points on a resolution^2 grid over [lo, hi]^2, row = y (same layout as
    grid_2d)."""
    idx = ((points.double() - lo) / (hi - lo) * resolution).floor().long()
    inside = ((idx >= 0) & (idx < resolution)).all(1)
    idx = idx[inside]
    counts = torch.zeros(resolution * resolution, dtype=torch.float64)
    counts.index_add_(0, idx[:, 1] * resolution + idx[:, 0],
                      torch.ones(len(idx), dtype=torch.float64))
    return counts.view(resolution, resolution)


def save_panels(panels, path: str):
    """A row of 2D arrays (each resolution x resolution, row = y) -> one PNG, y axis pointing up."""
    import torchvision

    images = [colorize(p.flip(0)) for p in panels]
    torchvision.utils.save_image(torch.stack(images), path, nrow=len(images), padding=2,
                                 pad_value=1.0)


# --------------------------------------------------------------------------------------------------
# FID: torch-fidelity's Inception, statistics and Frechet formula (eval_fid_ood.py and --fid-every)
# --------------------------------------------------------------------------------------------------
# The evaluator's FID and --fid-every's (TrainingFid) share every piece: sampling in seeded
# batches, the Inception network, cached reference statistics, the Frechet distance.
def batch_seed(seed: int, index: int) -> int:
    """The seed of sample batch `index`: its own stream, whichever process draws it."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def sample_batches(sample_fn, n: int, batch_size: int, seed: int, label: str):
    """Yield this process's batches of sample_fn(rows) (batches_of_this_rank: all of them, n rows
    in all, with one process); batch i starts from the random state seeded by batch_seed(seed, i),
    so the samples do not depend on the number of processes."""
    mine = batches_of_this_rank(n, batch_size)
    progress = Progress(label, sum(rows for _, _, rows in mine))
    for index, _, rows in mine:
        torch.manual_seed(batch_seed(seed, index))
        batch = sample_fn(rows)
        progress.update(rows)
        yield batch


@contextlib.contextmanager
def full_fp32():
    """TF32 off inside (pick_device turns it on for training): Inception features in full fp32."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def load_inception(weights_path, device):
    """torch-fidelity's InceptionV3 giving 2048-d features -> (network, weights tag for cache names:
    the first 8 hex digits of the weights file's sha256, which torch-fidelity's own file name
    carries). Its convolution weights are stored channels-last (NHWC): the same features to float
    rounding, about twice as fast on a CPU (docs/RESULTS.md). torch-fidelity is imported here: only
    FID needs it."""
    from torch_fidelity.feature_extractor_inceptionv3 import (URL_INCEPTION_V3,
                                                              FeatureExtractorInceptionV3)

    if weights_path is None:
        tag = URL_INCEPTION_V3.rsplit("-", 1)[1].split(".")[0]
        try:
            network = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
        except Exception as error:
            raise UserError("could not download torch-fidelity's Inception weights "
                            f"({type(error).__name__}); fetch {URL_INCEPTION_V3} on a connected "
                            "machine and pass --inception-weights PATH") from None
        return network.to(device, memory_format=torch.channels_last), tag
    if not os.path.isfile(weights_path):
        raise UserError(f"--inception-weights {weights_path} does not exist")
    # torch-fidelity opens the file with weights_only=False: refuse anything that needs more than
    # tensors first
    try:
        torch.load(weights_path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise UserError(f"--inception-weights {weights_path} is not a state dict of tensors "
                        f"({type(error).__name__}: {str(error).splitlines()[0][:120]})") from None
    try:
        network = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                              feature_extractor_weights_path=weights_path)
    except RuntimeError as error:
        raise UserError(f"--inception-weights {weights_path} does not hold torch-fidelity's "
                        f"InceptionV3 ({str(error).splitlines()[0][:120]})") from None
    with open(weights_path, "rb") as f:
        tag = hashlib.sha256(f.read()).hexdigest()[:8]
    return network.to(device, memory_format=torch.channels_last), tag


def to_uint8_rgb(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] -> uint8 with 3 channels (the exact inverse of to_unit_range on uint8
    data)."""
    x = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


def inception_features(network, uint8_batches, device, n: int, batch_size: int) -> torch.Tensor:
    """2048-d features of this process's uint8 (rows, 3, H, W) batches, those of
    batches_of_this_rank(n, batch_size), gathered from every process -> float32 (n, 2048) on the
    CPU in the global order."""
    out = []
    for batch in uint8_batches:  # drawn here, with the caller's autograd and precision settings
        with torch.no_grad(), full_fp32():  # only the Inception network in full fp32
            out.append(network(batch.to(device))[0].cpu())
    return gather_batches(out, n, batch_size)


def feature_statistics(features: torch.Tensor) -> dict:
    """torch-fidelity's FID statistics: float32 mean and float64 unbiased covariance (numpy)."""
    from torch_fidelity.metric_fid import fid_features_to_statistics

    return fid_features_to_statistics(features)


def frechet_distance(stats_a: dict, stats_b: dict) -> float:
    """||μa - μb||² + tr(Σa + Σb - 2 (Σa Σb)^½), torch-fidelity's formula (tr sqrt from eigvals of
    Σa Σb)."""
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

    return fid_statistics_to_metric(stats_a, stats_b, verbose=False)[KEY_METRIC_FID]


def dataset_tag(dataset: str) -> str:
    if dataset.startswith("folder:"):
        path = os.path.abspath(dataset[len("folder:"):])
        return f"folder-{os.path.basename(path)}-{hashlib.sha256(path.encode()).hexdigest()[:8]}"
    return dataset


def reference_statistics(dataset: str, image_size: int, load_train_images, network,
                         weights_tag: str, stats_dir: str, batch_size: int, device):
    """Inception statistics of the whole training split (uint8 images from load_train_images(),
    called only when the cache lacks them), cached in stats_dir (computed again by every process
    when any lacks the file, e.g. machines without a shared disk) -> (stats, cache path)."""
    path = os.path.join(stats_dir, f"{dataset_tag(dataset)}-train-{image_size}x{image_size}-"
                                   f"inception-{weights_tag}-pool2048.pt")
    if not any_rank(not os.path.isfile(path)):
        cached = torch.load(path, map_location="cpu", weights_only=True)
        return {"mu": cached["mu"].numpy(), "sigma": cached["sigma"].numpy()}, path
    images = load_train_images()
    mine = batches_of_this_rank(len(images), batch_size)
    progress = Progress(f"Inception statistics of the {dataset} training split",
                        sum(rows for _, _, rows in mine))

    def batches():
        for _, first, rows in mine:
            progress.update(rows)
            # the samples' conversion (exact on uint8 data)
            yield to_uint8_rgb(to_unit_range(images[first:first + rows]))
    stats = feature_statistics(inception_features(network, batches(), device, len(images),
                                                  batch_size))
    if not is_main():
        return stats, path
    os.makedirs(stats_dir, exist_ok=True)
    tmp = path + ".tmp"
    torch.save({"mu": torch.from_numpy(np.asarray(stats["mu"])),
                "sigma": torch.from_numpy(stats["sigma"]), "n": len(images)}, tmp)
    os.replace(tmp, path)
    return stats, path


class TrainingFid:
    """--fid-every N: every N iterations (and at the last) the FID of --fid-samples samples of the
    EMA model, drawn by the script's post-training sampler, against the training split's Inception
    statistics (the evaluator's protocol and cache, {data_dir}/fid_stats). Every measurement draws
    from the same seeds (--seed), so the curve's changes are the model's and not the noise's.
    `best` is the lowest FID so far (kept in the checkpoint, None before the first); measure says
    whether a measurement beat it, and then the script writes best.pt. A collective under torchrun:
    each rank draws its share of the batches."""

    def __init__(self, args, train_images: torch.Tensor, device, ckpt, start_step: int):
        self.args, self.device = args, device
        self.best = ckpt.get("best_fid") if ckpt else None
        if not args.fid_every or start_step >= args.steps:
            return
        self.network, tag = load_inception(args.inception_weights, device)
        self.reference, _ = reference_statistics(
            args.dataset, args.image_size, lambda: train_images, self.network, tag,
            os.path.join(args.data_dir, "fid_stats"), args.batch_size, device)

    def measure(self, sample, model, step: int, log, stopping: bool) -> bool:
        """FID of the samples of the script's sample(model, n, args, device), recorded in the
        metric log; True if it is the lowest so far. Training's random state and the model's
        train / eval mode are left as they were. Skipped when a SIGINT / SIGTERM is pending
        (`stopping`): the save comes first, and 5,000 samples can outlast a preemption's grace. A
        sampler that gives up (RuntimeError: DA-EBM's MGMS chains that never reached t = 0 within
        their budget, early in a run) is logged as `fid_error` and training goes on."""
        if stopping:
            if is_main():
                ckpt = os.path.join(self.args.run_dir, "ckpt.pt")
                print(f"FID at step {step} skipped: stopping (`python eval_fid_ood.py --ckpt "
                      f"{ckpt}` scores this step until a resume saves over it)", file=sys.stderr,
                      flush=True)
            return False
        start, n, batch_size = time.time(), self.args.fid_samples, self.args.batch_size
        was_training = model.training
        try:
            with own_rng(self.args.seed):
                uint8 = (to_uint8_rgb(batch) for batch in sample_batches(
                    lambda rows: sample(model, rows, self.args, self.device), n, batch_size,
                    self.args.seed, f"FID samples at step {step}"))
                features = inception_features(self.network, uint8, self.device, n, batch_size)
        except RuntimeError as error:  # a sampler that gave up (DA-EBM's MGMS budget): log it
            model.train(was_training)
            if is_main():
                print(f"FID at step {step} failed: {error}", file=sys.stderr, flush=True)
            log.note(step, {"fid_error": str(error)[:200], "fid_seconds": time.time() - start})
            return False
        model.train(was_training)
        fid = frechet_distance(feature_statistics(features), self.reference)
        improved = self.best is None or fid < self.best
        self.best = fid if improved else self.best
        log.note(step, {"fid": fid, "best_fid": self.best, "fid_samples": n,
                        "fid_seconds": time.time() - start})
        return improved
