"""Shared test helpers: the three method scripts, tiny configurations of each, generated image
folders, command lines, checkpoint comparison. Test modules import these from here, never from each
other."""
import os
import shutil
import subprocess
import sys
from types import SimpleNamespace
from unittest import mock

# Under pytest-xdist (`-n auto`: one worker per core) each worker and the scripts it starts use one
# torch thread: two threads per worker on as many cores as workers oversubscribe them (the fast
# part took 342 s with -n 2 and two threads, 94 s with one; 2 cores, 2026-12-02, load beside).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import cdrl  # noqa: E402
import common  # noqa: E402
import dcd  # noqa: E402
import pcd_diffusion_ebm as daebm  # noqa: E402

METHODS = {"daebm": daebm, "cdrl": cdrl, "dcd": dcd}
SCRIPTS = {"daebm": "pcd_diffusion_ebm.py", "cdrl": "cdrl.py", "dcd": "dcd.py"}

# Tiny configurations (seconds on a CPU) with every lifecycle setting in reach: logs, pictures,
# saves.
TINY_2D = {
    "daebm": dict(dataset="8gaussians", device="cpu", steps=20, batch_size=32, n_chains=64,
                  langevin_steps=3, mlp_width=16, log_every=5, sample_every=10, save_every=10,
                  mh_start=5,
                  adapt_every=5, warmup_steps=5, long_run_steps=5, visits_to_keep=1,
                  sample_chains=16),
    "cdrl": dict(dataset="8gaussians", device="cpu", steps=20, batch_size=32, langevin_steps=3,
                 ebm_channels=8, init_channels=8, warmup_steps=4, log_every=5, sample_every=10,
                 save_every=10, n_points=64),
    "dcd": dict(dataset="8gaussians", device="cpu", steps=20, batch_size=32, mlp_width=16,
                log_every=5, sample_every=10, save_every=10, n_points=64, sample_langevin_steps=5),
}
TINY_IMAGES = {
    "daebm": dict(device="cpu", steps=6, batch_size=8, n_chains=16, num_levels=3, langevin_steps=2,
                  channels=8, channel_mult=(1, 2), log_every=2, sample_every=3, save_every=3,
                  mh_start=2,
                  adapt_every=2, warmup_steps=2, long_run_steps=3, visits_to_keep=1,
                  sample_chains=4, n_grid=4),
    "cdrl": dict(device="cpu", steps=6, batch_size=8, langevin_steps=2, ebm_channels=8,
                 ebm_channel_mult=(1, 2), ebm_blocks=1, init_channels=8, init_channel_mult=(1, 1),
                 init_blocks=1, warmup_steps=2, log_every=2, sample_every=3, save_every=3,
                 n_grid=4),
    "dcd": dict(device="cpu", steps=6, batch_size=8, langevin_steps=2, num_levels=2, ebm_channels=8,
                ebm_channel_mult=(1, 2), ebm_blocks=1, log_every=2, sample_every=3, save_every=3,
                n_grid=4),
}


def tiny_fields(method: str, run_dir, folder=None, **overrides) -> dict:
    """The tiny 2D configuration of a method (or the tiny image one on `folder`), with overrides."""
    if folder:
        fields = dict(TINY_IMAGES[method], dataset=f"folder:{folder}")
    else:
        fields = dict(TINY_2D[method])
    fields.update(run_dir=str(run_dir), **overrides)
    return fields


def tiny_args(method: str, run_dir, folder=None, **overrides):
    return METHODS[method].Args(**tiny_fields(method, run_dir, folder, **overrides))


def as_argv(fields: dict) -> list:
    """Args fields -> command-line flags as a user would type them."""
    argv = []
    for key, value in fields.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + key.replace("_", "-"))
        elif isinstance(value, (tuple, list)):
            argv += [flag, *map(str, value)]
        else:
            argv += [flag, str(value)]
    return argv


def run_command_line(method: str, argv, capsys):
    """main() through the script's command-line path (tyro, --resume resolution, one-line errors) in
    this process, for a command that exits: (exit code, stderr)."""
    module = METHODS[method]
    with pytest.raises(SystemExit) as exit_info:
        common.run_cli(lambda: module.main(common.parse_args(module.Args, method, argv)))
    return exit_info.value.code, capsys.readouterr().err


def run_script(method: str, *argv, **popen):
    """The method script as a separate process (stdout and stderr captured as text)."""
    return subprocess.run([sys.executable, os.path.join(ROOT, SCRIPTS[method]), *argv],
                          capture_output=True, text=True, cwd=ROOT, timeout=300, **popen)


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_ranks(argv, world: int = 2):
    """`python argv...` in `world` processes joined as torchrun joins them (RANK, WORLD_SIZE,
    LOCAL_RANK, MASTER_ADDR/PORT; one thread each), without torchrun's agent process (seconds less
    per launch): the running processes, rank order."""
    port = free_port()
    procs = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                   LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    return procs


def launch_ranks(argv, world: int = 2, timeout: float = 300):
    """start_ranks, waited for: each rank's CompletedProcess (returncode, stdout, stderr)."""
    procs = start_ranks(argv, world)
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=timeout)
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return results


def one_training_step(method: str, model, x0, args, chains=None, lr: float = 0.0):
    """One iteration of the method's step function on the batch x0 with plain SGD at `lr` (0: the
    weights stay, the gradients stay in .grad); DA-EBM's chains (x, t) are updated in place."""
    module = METHODS[method]
    if method == "cdrl":
        optimizers = (torch.optim.SGD(model.ebm.parameters(), lr=lr),
                      torch.optim.SGD(model.initializer.parameters(), lr=lr))
        module.cdrl_step(model, x0, None, args, optimizers)
    elif method == "dcd":
        module.dcd_step(model, x0, args, torch.optim.SGD(model.parameters(), lr=lr))
    else:
        stats = (torch.zeros(args.num_levels + 1, device=x0.device),
                 torch.zeros(args.num_levels + 1, device=x0.device))
        module.daebm_step(model, x0, chains, args, torch.optim.SGD(model.parameters(), lr=lr),
                          stats, metropolis=True)


# each method's flags without gradient clipping (DA-EBM has none), for tests that compare gradients
NO_CLIP = {"daebm": {}, "cdrl": {"grad_clip": 1e9}, "dcd": {"grad_clip": 0.0}}


def distributed_case(method: str):
    """(args, global batch, global chains or None) of the gradient test in test_distributed.py,
    the same in every rank and in the single-process reference. No gradient clipping: clipping the
    averaged gradient is not the mean of clipped shard gradients."""
    args = tiny_args(method, "unused", **NO_CLIP[method])
    x0 = common.draw_2d(args.dataset, 32, seed=1)
    generator = torch.Generator().manual_seed(2)
    chains = (torch.randn(64, 2, generator=generator),
              torch.randint(0, args.num_levels + 1, (64,), generator=generator)) \
        if method == "daebm" else None
    return args, x0, chains


def flatten(tree, prefix=""):
    """Nested dicts / lists of a state dict -> {dotted name: leaf}."""
    out = {}
    if isinstance(tree, dict):
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}{k}."))
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            out.update(flatten(v, f"{prefix}{i}."))
    else:
        out[prefix] = tree
    return out


def assert_same_state(a: dict, b: dict, keys):
    """Bitwise equality of the named entries of two checkpoints."""
    for key in keys:
        flat_a, flat_b = flatten(a[key]), flatten(b[key])
        assert flat_a.keys() == flat_b.keys(), key
        for name, value in flat_a.items():
            if torch.is_tensor(value):
                same = torch.equal(value, flat_b[name])
            else:
                same = value == flat_b[name]
            assert same, (key, name)


def pytest_collection_modifyitems(items):
    """Slow tests first (a stable sort): under -n auto the long ones start at once and the short
    ones fill the gaps, instead of one long test ending the run while the other workers idle."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def random_inception(tmp_path_factory):
    """A weights file for torch-fidelity's InceptionV3 with Kaiming-normal weights
    (variance-preserving, so the 2048 features neither vanish nor blow up) and a shared statistics
    cache."""
    import torch_fidelity.feature_extractor_inceptionv3 as inception

    with mock.patch.object(inception, "load_state_dict_from_url", lambda *a, **k: None), \
            mock.patch.object(inception.FeatureExtractorInceptionV3, "load_state_dict",
                              lambda self, state: None):
        network = inception.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    g = torch.Generator().manual_seed(0)
    for layer in network.modules():
        if isinstance(layer, (torch.nn.Conv2d, torch.nn.Linear)):
            torch.nn.init.kaiming_normal_(layer.weight, generator=g)
    folder = tmp_path_factory.mktemp("inception")
    torch.save(network.state_dict(), folder / "inception.pth")
    return SimpleNamespace(weights=str(folder / "inception.pth"), stats_dir=str(folder / "stats"))


@pytest.fixture
def image_folder(tmp_path):
    """40 tiny 8x8 RGB PNGs with some structure (a bright square at a random place)."""
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(40):
        img = np.full((8, 8, 3), 30, dtype=np.uint8)
        r, c = rng.integers(0, 5, size=2)
        img[r:r + 3, c:c + 3] = rng.integers(150, 255, size=3)
        Image.fromarray(img).save(folder / f"{i:03d}.png")
    return str(folder)


def first_images(image_folder, n: int, folder):
    """The first n of image_folder's PNGs copied into folder (made here), for tests that run the
    CPU Inception (~0.15 s an image) -> folder."""
    os.makedirs(folder)
    for name in sorted(os.listdir(image_folder))[:n]:
        shutil.copy(os.path.join(image_folder, name), os.path.join(folder, name))
    return folder


@pytest.fixture
def class_folder(tmp_path):
    """Two classes of 8x8 RGB PNGs in subfolders: a bright square top-left (class a) or bottom-right
    (b)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for name, corner in (("a", 0), ("b", 5)):
        (tmp_path / "classes" / name).mkdir(parents=True)
        for i in range(12):
            img = np.full((8, 8, 3), 20, dtype=np.uint8)
            img[corner:corner + 3, corner:corner + 3] = rng.integers(150, 255, size=3)
            Image.fromarray(img).save(tmp_path / "classes" / name / f"{i:02d}.png")
    return str(tmp_path / "classes")


def write_imagenet32(folder, per_file=3, seed=0):
    """Synthetic downsampled-ImageNet files in the official layout: rows of 3,072 bytes, the R, G
    and B planes of a 32x32 image in turn; labels 1..1000. Returns the images as (N, 32, 32, 3)
    and the 1-based labels, in file order (train batches 1..10, then val)."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    pictures, classes = [], []
    for name in [f"train_data_batch_{i}.npz" for i in range(1, 11)] + ["val_data.npz"]:
        hwc = rng.integers(0, 256, (per_file, 32, 32, 3), dtype=np.uint8)
        labels = rng.integers(1, 1001, per_file)
        rows = hwc.transpose(0, 3, 1, 2).reshape(per_file, 3072)  # R plane, G plane, B plane
        np.savez(os.path.join(folder, name), data=rows, labels=list(labels), mean=rows.mean(0))
        pictures.append(hwc)
        classes.append(labels)
    return np.concatenate(pictures), np.concatenate(classes)
