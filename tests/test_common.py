"""common.py: toy data, the epoch loader's exact resume, folders of images, checkpoint errors,
pictures, the split over processes, downsampled ImageNet, the FID measurement during training."""
import datetime
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import common
from conftest import write_imagenet32


@pytest.mark.parametrize("name", common.TOY_2D)
def test_toys_are_reproducible_2d_point_clouds(name):
    a, b = common.draw_2d(name, 5000, seed=3), common.draw_2d(name, 5000, seed=3)
    assert a.shape == (5000, 2) and torch.isfinite(a).all() and torch.equal(a, b)
    assert not torch.equal(a, common.draw_2d(name, 5000, seed=4))
    assert a.std(0).min() > 0.3  # a spread-out cloud, not a collapsed one


def test_rings_radii_and_width():
    radius = common.draw_2d("rings", 40_000, seed=0).norm(dim=1)
    ring = radius.round()
    assert set(ring.unique().tolist()) == {1.0, 2.0, 3.0, 4.0}
    assert abs((radius - ring).std().item() - 0.01) < 5e-4
    counts = torch.bincount(ring.long())[1:].float() / len(radius)
    assert torch.allclose(counts, torch.full((4,), 0.25), atol=0.01)  # equal weight per ring


def test_points_files_round_trip(tmp_path):
    array = np.random.default_rng(0).normal(size=(50, 2)).astype(np.float32)
    np.save(tmp_path / "p.npy", array)
    np.savetxt(tmp_path / "p.csv", array, delimiter=",")
    np.savetxt(tmp_path / "header.csv", array, delimiter=",", header="x,y", comments="")
    for name in ("p.npy", "p.csv", "header.csv"):
        dataset = f"points:{tmp_path / name}"
        assert common.is_2d(dataset)
        common.check_dataset_name(dataset)
        assert torch.equal(common.load_points(dataset), torch.from_numpy(array)), name
    drawn = common.draw_2d(dataset, 500, seed=1)
    assert torch.equal(drawn, common.draw_2d(dataset, 500, seed=1))
    # every draw is one of the file's points, and most of them turn up
    matches = (drawn[:, None, :] == torch.from_numpy(array)[None]).all(2)
    assert matches.any(1).all() and matches.any(0).float().mean() > 0.9


@pytest.mark.parametrize("name, content, message", [
    ("absent.npy", None, "no such file"),
    ("p.txt", "1,2\n3,4\n", "expected a .npy or .csv file"),
    ("wide.npy", np.zeros((10, 3)), r"has shape \(10, 3\)"),
    ("flat.npy", np.zeros(10), r"has shape \(10,\)"),
    ("one.npy", np.zeros((1, 2)), r"has shape \(1, 2\)"),
    ("nan.npy", np.array([[0.0, 1.0], [np.nan, 2.0]]), "not finite numbers"),
    ("objects.npy", np.array([[0, "a"], [1, "b"]], dtype=object), "could not be read"),
    ("words.csv", "a,b\nc,d\ne,f\n", "could not be read"),
])
def test_bad_points_files_are_one_clear_line(tmp_path, name, content, message):
    path = tmp_path / name
    if isinstance(content, str):
        path.write_text(content)
    elif content is not None:
        np.save(path, content, allow_pickle=True)
    with pytest.raises(common.UserError, match=message):
        common.load_points(f"points:{path}")


def test_epoch_loader_covers_each_epoch_and_resumes_exactly():
    data = torch.arange(10)
    loader = common.EpochLoader(data, 3, seed=0)
    first_epoch = torch.cat([loader.next() for _ in range(3)])
    # 3 batches of 3 without repeats; the ragged end is dropped
    assert len(set(first_epoch.tolist())) == 9
    state = loader.state_dict()
    ahead = [loader.next() for _ in range(5)]
    other = common.EpochLoader(data, 3, seed=99)
    other.load_state_dict(state)
    assert all(torch.equal(x, y) for x, y in zip(ahead, [other.next() for _ in range(5)]))


def test_folder_dataset(image_folder):
    images = common.load_images(f"folder:{image_folder}", "unused")
    assert images.shape == (40, 3, 8, 8) and images.dtype == torch.uint8
    resized = common.load_images(f"folder:{image_folder}", "unused", image_size=4)
    assert resized.shape == (40, 3, 4, 4)
    x = common.to_unit_range(images)
    assert x.min() >= -1 and x.max() <= 1


@pytest.mark.parametrize("content", [b"", b"not an image at all", b"\x89PNG\r\n\x1a\n truncated"])
def test_a_corrupt_image_in_a_folder_is_named(image_folder, content):
    bad = f"{image_folder}/017.png"
    open(bad, "wb").write(content)
    with pytest.raises(common.UserError, match=f"cannot read image {bad}"):
        common.load_images(f"folder:{image_folder}", "unused")


def test_celeba_download_goes_through_gdown(tmp_path, monkeypatch):
    # torchvision fetches CelebA from Google Drive with gdown (a requirement): without it the error
    # would say "gdown is required"; with it, an offline machine gets the download failure
    import gdown

    def offline(*args, **kwargs):
        raise ConnectionError("no network in this test")

    monkeypatch.setattr(gdown, "download", offline)
    with pytest.raises(common.UserError, match="celeba data not found.*ConnectionError"):
        common.load_images("celeba", str(tmp_path))


def test_bad_inputs_raise_user_errors(tmp_path):
    with pytest.raises(common.UserError, match="unknown dataset"):
        common.check_dataset_name("imagenet")
    with pytest.raises(common.UserError, match="does not exist"):
        common.load_checkpoint(str(tmp_path / "missing.pt"))
    torch.save({"method": "daebm", "format": 1}, tmp_path / "ok.pt")
    with pytest.raises(common.UserError, match="written by method 'daebm', not 'cdrl'"):
        common.load_checkpoint(str(tmp_path / "ok.pt"), method="cdrl")
    with pytest.raises(common.UserError, match="not a directory"):
        common.load_images(f"folder:{tmp_path / 'nothing'}", "unused")


def test_atomic_save_leaves_no_temp_file(tmp_path):
    common.save_checkpoint({"method": "x", "format": 1, "step": 3}, str(tmp_path), snapshot_step=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt", "ckpt_00000003.pt"]
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"] == 3


def test_histogram_and_grid_share_a_layout():
    grid = common.grid_2d(-1.0, 1.0, 4)
    counts = common.histogram_2d(grid, -1.0, 1.0, 4)
    assert torch.equal(counts, torch.ones(4, 4))  # every cell centre falls in its own cell
    corner = common.histogram_2d(torch.tensor([[0.9, -0.9]]), -1.0, 1.0, 4)
    assert corner[0, 3] == 1  # row = y (low y first), column = x


def test_update_ema_is_the_exponential_moving_average():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    ema = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4)).requires_grad_(False)
    with torch.no_grad():
        model[1].running_mean.fill_(2.0)
    expected = [0.9 * e + 0.1 * p for e, p in zip(ema.parameters(), model.parameters())]
    common.update_ema(ema, model, 0.9, copy_buffers=False)
    assert all(torch.allclose(e, x, atol=1e-7) for e, x in zip(ema.parameters(), expected))
    assert torch.equal(ema[1].running_mean, torch.zeros(4))
    common.update_ema(ema, model, 0.9, copy_buffers=True)
    assert torch.equal(ema[1].running_mean, model[1].running_mean)


def test_an_uneven_split_over_processes_is_one_clear_line(monkeypatch):
    common.check_divisible(batch_size=33)  # one process: anything splits
    monkeypatch.setattr(common, "rank_and_world", lambda: (0, 2))
    common.check_divisible(batch_size=32, n_chains=64)
    with pytest.raises(common.UserError, match="--n-chains 63 does not split over 2 processes"):
        common.check_divisible(batch_size=32, n_chains=63)


def test_shard_and_gather_are_identities_in_one_process():
    rows = torch.arange(12.0).view(6, 2)
    assert common.shard(rows) is rows and common.gather_shards(rows) is rows


def test_imagenet32_reads_the_official_layout(tmp_path):
    hwc, labels = write_imagenet32(tmp_path / "imagenet32")
    train = common.load_images("imagenet32", str(tmp_path))
    assert train.shape == (30, 3, 32, 32) and train.dtype == torch.uint8
    # pixel (row 5, column 7) of image 4 in every channel: the planes are read as planes
    assert train[4, :, 5, 7].tolist() == hwc[4, 5, 7].tolist()
    assert torch.equal(train.permute(0, 2, 3, 1), torch.from_numpy(hwc[:30]))
    assert common.load_labels("imagenet32", str(tmp_path)).tolist() == (labels[:30] - 1).tolist()
    val = common.load_images("imagenet32", str(tmp_path), train=False)
    assert torch.equal(val.permute(0, 2, 3, 1), torch.from_numpy(hwc[30:]))
    assert common.load_labels("imagenet32", str(tmp_path), train=False).tolist() == \
        (labels[30:] - 1).tolist()
    assert common.image_shape("imagenet32") == (3, 32, 32) and common.flips_by_default("imagenet32")


def test_imagenet32_missing_or_foreign_files_are_named(tmp_path):
    folder = tmp_path / "imagenet32"
    with pytest.raises(common.UserError, match=r"imagenet32 data not found: missing "
                       r"train_data_batch_1.npz, .*train_data_batch_10.npz in .*imagenet32"):
        common.load_images("imagenet32", str(tmp_path))
    write_imagenet32(folder)
    os.remove(folder / "val_data.npz")
    with pytest.raises(common.UserError, match="missing val_data.npz"):
        common.load_labels("imagenet32", str(tmp_path), train=False)
    np.savez(folder / "train_data_batch_3.npz", data=np.zeros((2, 32, 32, 3), np.uint8))
    with pytest.raises(common.UserError, match=r"train_data_batch_3.npz: 'data' is uint8 \(2, 32, "
                       r"32, 3\), expected uint8 \(n, 3072\)"):
        common.load_images("imagenet32", str(tmp_path))
    with pytest.raises(common.UserError, match="cannot read .*train_data_batch_3.npz .*KeyError"):
        common.load_labels("imagenet32", str(tmp_path))
    open(folder / "train_data_batch_2.npz", "wb").write(b"not a zip file")
    with pytest.raises(common.UserError, match="cannot read .*train_data_batch_2.npz"):
        common.load_images("imagenet32", str(tmp_path))


@pytest.mark.parametrize("training", [True, False])
def test_training_fid_keeps_the_mode_the_random_state_and_its_seeds(training):
    """--fid-every's measurement: the model's train / eval mode and training's random state come
    back as they were, and every measurement draws the same samples (the same FID twice, the second
    not an improvement)."""
    args = SimpleNamespace(fid_every=0, steps=1, fid_samples=8, batch_size=3, seed=4)
    fid = common.TrainingFid(args, None, "cpu", None, 0)  # fid_every 0: no Inception loaded
    fid.network = lambda batch: [batch.float().flatten(1)[:, :4]]
    fid.reference = common.feature_statistics(torch.randn(50, 4, generator=torch.Generator()
                                                          .manual_seed(0)) * 60 + 128)

    def sample(model, rows, args, device):
        model.eval()  # as the scripts' samplers do
        return torch.rand(rows, 1, 2, 2) * 2 - 1

    class Log:
        records = []

        def note(self, step, record):
            self.records.append((step, record))

    model, log = torch.nn.Linear(1, 1).train(training), Log()
    torch.manual_seed(9)
    state = torch.get_rng_state()
    assert fid.measure(sample, model, 1, log, stopping=False)
    assert model.training == training and torch.equal(torch.get_rng_state(), state)
    assert not fid.measure(sample, model, 2, log, stopping=False)
    (_, first), (_, second) = log.records
    assert first["fid"] == second["fid"] == fid.best and first["fid"] > 0


def test_training_fid_of_a_sampler_that_gives_up_is_logged_and_training_goes_on():
    """A post-training sampler that gives up (DA-EBM's MGMS chains that never reach t = 0 early in
    a run raise RuntimeError) must not end the run: the failure is a metrics record, the model's
    mode is restored, and a later measurement still counts."""
    args = SimpleNamespace(fid_every=0, steps=1, fid_samples=8, batch_size=3, seed=4)
    fid = common.TrainingFid(args, None, "cpu", None, 0)
    fid.network = lambda batch: [batch.float().flatten(1)[:, :4]]
    fid.reference = common.feature_statistics(torch.randn(50, 4) * 60 + 128)

    def gives_up(model, rows, args, device):
        model.eval()
        raise RuntimeError("post-training sampler kept 0/3 chains in 10 transitions")

    def works(model, rows, args, device):
        return torch.rand(rows, 1, 2, 2) * 2 - 1

    class Log:
        records = []

        def note(self, step, record):
            self.records.append((step, record))

    model, log = torch.nn.Linear(1, 1).train(), Log()
    assert not fid.measure(gives_up, model, 1, log, stopping=False)
    assert model.training and fid.best is None
    (step, record), = log.records
    assert step == 1 and "kept 0/3 chains" in record["fid_error"] and "fid" not in record
    assert fid.measure(works, model, 2, log, stopping=False) and fid.best > 0


def test_inception_features_draw_samples_with_the_callers_precision():
    """The sample batches are drawn outside the Inception network's full-fp32 context: a sampler
    on CUDA keeps TF32 matmuls and autograd as training set them (issue 32, item 5); the network
    itself runs with TF32 off and without autograd."""
    seen = []

    def network(batch):
        seen.append(("network", torch.backends.cuda.matmul.allow_tf32, torch.is_grad_enabled()))
        return [batch.float().flatten(1)]

    def batches():
        for _ in range(2):
            seen.append(("sampler", torch.backends.cuda.matmul.allow_tf32,
                         torch.is_grad_enabled()))
            yield torch.zeros(3, 3, 2, 2, dtype=torch.uint8)
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        features = common.inception_features(network, batches(), "cpu", 6, 3)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
    assert features.shape == (6, 12)
    assert seen == [("sampler", True, True), ("network", False, False)] * 2


def test_process_group_waits_long_enough_for_an_uneven_sampling_phase(monkeypatch):
    """Under torchrun the group's collectives wait COLLECTIVE_TIMEOUT (2 h), not the 10-minute
    default: the rank with one more FID batch can be a whole batch behind (issue 32, item 1)."""
    joined = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(common.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(common.dist, "get_rank", lambda: 0)
    monkeypatch.setattr(common.dist, "init_process_group",
                        lambda backend, **kwargs: joined.update(backend=backend, **kwargs))
    monkeypatch.setitem(common._PROCESS_GROUP, "ours", False)
    assert common.start_processes("cpu") == torch.device("cpu")
    assert joined["backend"] == "gloo" and joined["timeout"] >= datetime.timedelta(hours=1)
