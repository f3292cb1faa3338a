"""eval_fid_ood.py: AUROC, Frechet distance and grid NLL against references; the FID pipeline
offline with a randomly initialised Inception; every method's tiny checkpoint scored end to end; bad
inputs."""
import dataclasses
import json
import math
import os
import subprocess
import sys
from types import SimpleNamespace
from unittest import mock

import numpy as np
import pytest
import torch

import cdrl
import common
import eval_fid_ood
from conftest import METHODS, ROOT, first_images, tiny_args


# --------------------------------------------------------------------------------------------------
# AUROC and the Frechet distance against references
# --------------------------------------------------------------------------------------------------
def brute_force_auroc(scores_in, scores_out):
    """Every (in, out) pair: 1 if the in-distribution score is higher, 1/2 if tied."""
    a, b = scores_in[:, None], scores_out[None, :]
    return ((a > b).double() + 0.5 * (a == b).double()).mean().item()


@pytest.mark.parametrize("seed", range(3))
def test_auroc_equals_pairwise_count_with_ties(seed):
    g = torch.Generator().manual_seed(seed)
    scores_in = torch.randint(0, 12, (301,), generator=g).double()  # few distinct values: many ties
    scores_out = torch.randint(0, 9, (157,), generator=g).double() - 1.5 * (seed == 2)
    expected = brute_force_auroc(scores_in, scores_out)
    assert abs(eval_fid_ood.auroc(scores_in, scores_out) - expected) < 1e-12
    assert abs(eval_fid_ood.auroc(scores_out, scores_in) - (1 - expected)) < 1e-12


def test_auroc_edge_cases():
    assert eval_fid_ood.auroc(torch.ones(5), torch.ones(7)) == 0.5
    assert eval_fid_ood.auroc(torch.arange(5.0) + 10, torch.arange(7.0)) == 1.0
    assert eval_fid_ood.auroc(torch.arange(5.0), torch.arange(7.0) + 10) == 0.0
    continuous = torch.randn(400), torch.randn(300) + 1
    assert abs(eval_fid_ood.auroc(*continuous) - brute_force_auroc(*continuous)) < 1e-12
    with pytest.raises(common.UserError, match="non-finite"):
        eval_fid_ood.auroc(torch.tensor([0.0, math.nan]), torch.zeros(3))


def random_spd(d, g):
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    return a @ a.T / d + 0.1 * torch.eye(d, dtype=torch.float64)


def reference_frechet(mu_a, cov_a, mu_b, cov_b):
    """Float64, through the symmetric form tr (Σa^½ Σb Σa^½)^½ with eigh (not the evaluator's
    route)."""
    w, v = torch.linalg.eigh(cov_a)
    root_a = v @ torch.diag(w.sqrt()) @ v.T
    inner = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp_min(0)
    trace_term = cov_a.trace() + cov_b.trace() - 2 * inner.sqrt().sum()
    return ((mu_a - mu_b).pow(2).sum() + trace_term).item()


def stats(mu, cov):
    return {"mu": mu.numpy(), "sigma": cov.numpy()}


@pytest.mark.parametrize("d", [3, 64])
def test_frechet_distance_against_float64_reference(d):
    g = torch.Generator().manual_seed(d)
    mu_a, mu_b = torch.randn(d, generator=g, dtype=torch.float64), torch.randn(d, generator=g,
                                                                               dtype=torch.float64)
    cov_a, cov_b = random_spd(d, g), random_spd(d, g)
    expected = reference_frechet(mu_a, cov_a, mu_b, cov_b)
    distance = common.frechet_distance(stats(mu_a, cov_a), stats(mu_b, cov_b))
    assert abs(distance - expected) < 1e-8 * (1 + expected)
    assert abs(common.frechet_distance(stats(mu_a, cov_a), stats(mu_a, cov_a))) < 1e-8
    # diagonal covariances: ||Δμ||² + Σ (sqrt(a_i) - sqrt(b_i))²
    var_a = torch.rand(d, generator=g, dtype=torch.float64) + 0.1
    var_b = torch.rand(d, generator=g, dtype=torch.float64)
    closed = ((mu_a - mu_b).pow(2).sum() + (var_a.sqrt() - var_b.sqrt()).pow(2).sum()).item()
    got = common.frechet_distance(stats(mu_a, torch.diag(var_a)),
                                        stats(mu_b, torch.diag(var_b)))
    assert abs(got - closed) < 1e-10 * (1 + closed)


def test_feature_statistics_are_mean_and_unbiased_covariance():
    x = torch.randn(50, 6) * torch.arange(1.0, 7.0) + 3
    result = common.feature_statistics(x)
    centred = x.double() - x.double().mean(0)
    assert np.allclose(result["mu"], x.double().mean(0).numpy(), atol=1e-6)
    assert np.allclose(result["sigma"], (centred.T @ centred / 49).numpy(), atol=1e-9)


# --------------------------------------------------------------------------------------------------
# 2D: the grid density, the toys' true densities, the long-run distances
# --------------------------------------------------------------------------------------------------
def gaussian_energy(mean, cov):
    precision = torch.linalg.inv(cov)

    def energy_fn(x):
        d = x.double() - mean
        return 0.5 * ((d @ precision) * d).sum(1) + 123.0  # any constant offset is normalised away
    return energy_fn


GAUSS_MEAN = torch.tensor([0.3, -0.2], dtype=torch.float64)
GAUSS_COV = torch.tensor([[0.5, 0.2], [0.2, 0.3]], dtype=torch.float64)


def test_grid_nll_of_gaussian_equals_analytic():
    lo, hi = -4.0, 4.0
    log_p = eval_fid_ood.grid_log_density(gaussian_energy(GAUSS_MEAN, GAUSS_COV), lo, hi, 800)
    cell = ((hi - lo) / 800) ** 2
    assert abs(log_p.exp().sum().item() * cell - 1) < 1e-9
    points = torch.distributions.MultivariateNormal(GAUSS_MEAN, GAUSS_COV).sample((100_000,))
    gauss = torch.distributions.MultivariateNormal(GAUSS_MEAN, GAUSS_COV)
    analytic = -gauss.log_prob(points).mean().item()
    assert abs(eval_fid_ood.grid_nll(log_p, lo, hi, points) - analytic) < 5e-3
    # the expected NLL of a Gaussian is its entropy, 1 + log 2π + log|Σ|/2
    entropy = 1 + math.log(2 * math.pi) + 0.5 * math.log(torch.det(GAUSS_COV).item())
    assert abs(analytic - entropy) < 0.02


def test_grid_layout_matches_points():
    # log p at the cell that holds a point must be the energy at that point: a lopsided energy
    # catches a transposed grid
    energy_fn = lambda x: 3.0 * x[:, 0].double()  # noqa: E731
    log_p = eval_fid_ood.grid_log_density(energy_fn, -1.0, 1.0, 100)
    right, up = torch.tensor([[0.9, 0.0]]), torch.tensor([[0.0, 0.9]])
    nll_right = eval_fid_ood.grid_nll(log_p, -1.0, 1.0, right)
    assert nll_right > eval_fid_ood.grid_nll(log_p, -1.0, 1.0, up)


# entropies: rings = H(N(0, 0.01²)) + log 4 + log 2π + mean log radius (thin rings, E log r = log k
# per ring); 8gaussians = log 8 + log(2πe σ²) with σ = 0.5 / 1.414 (the components overlap by <
# 1e-8); checkerboard = log 32
TOY_ENTROPY = {"rings": 0.5 * math.log(2 * math.pi * math.e * 1e-4) + math.log(4)
               + math.log(2 * math.pi)
               + math.log(24) / 4,
               "8gaussians": math.log(8) + math.log(2 * math.pi * math.e * (0.5 / 1.414) ** 2),
               "checkerboard": math.log(32)}


@pytest.mark.parametrize("name", sorted(TOY_ENTROPY))
def test_true_toy_densities_integrate_to_one_and_match_their_samplers(name):
    lo, hi, resolution = -5.0, 5.0, 2000  # cells of 0.005, finer than the rings' width
    mass = eval_fid_ood.toy_log_density(name, common.grid_2d(lo, hi, resolution)).exp().sum().item()
    assert abs(mass * ((hi - lo) / resolution) ** 2 - 1) < 1e-4
    # the samples' mean NLL is the entropy: a density that disagrees with the sampler (moved
    # centres, wrong width, the other checkerboard colour) misses by far more than the Monte Carlo
    # error (~0.003)
    nll = -eval_fid_ood.toy_log_density(name, common.draw_2d(name, 200_000, seed=1)).mean().item()
    assert abs(nll - TOY_ENTROPY[name]) < 0.01


def test_toys_without_closed_form_have_no_true_density():
    for name in ("swissroll", "pinwheel", "2spirals"):
        assert eval_fid_ood.toy_log_density(name, torch.zeros(3, 2)) is None


def test_grid_draws_follow_the_grid_density_and_bin_mass_adds_up():
    lo, hi = -4.0, 4.0
    log_p = eval_fid_ood.grid_log_density(gaussian_energy(GAUSS_MEAN, GAUSS_COV), lo, hi, 400)
    draws = eval_fid_ood.grid_draws(log_p, lo, hi, 200_000, torch.Generator().manual_seed(0))
    assert torch.allclose(draws.mean(0), GAUSS_MEAN, atol=0.01)
    assert torch.allclose(torch.cov(draws.T), GAUSS_COV, atol=0.01)
    model_mass = eval_fid_ood.grid_bin_mass(log_p, lo, hi)
    assert abs(model_mass.sum().item() - 1) < 1e-9 and model_mass[-1] == 0
    assert eval_fid_ood.total_variation(eval_fid_ood.bin_mass(draws, lo, hi), model_mass) < 0.03
    # a shifted set is far from it, and points outside the box land in the last bin
    shifted = eval_fid_ood.bin_mass(draws + 1.0, lo, hi)
    assert eval_fid_ood.total_variation(shifted, model_mass) > 0.5
    assert eval_fid_ood.bin_mass(torch.tensor([[9.0, 0.0], [0.0, 0.0]]), lo, hi)[-1] == 0.5


def test_long_run_multipliers():
    assert eval_fid_ood.long_run_multipliers(1) == [1]
    assert eval_fid_ood.long_run_multipliers(10) == [1, 10]
    assert eval_fid_ood.long_run_multipliers(20) == [1, 10, 20]
    assert eval_fid_ood.long_run_multipliers(1000) == [1, 10, 100, 1000]


@pytest.mark.parametrize("method", sorted(METHODS))
def test_step_multiplier_runs_the_sampler_that_much_longer(method):
    """sample(..., step_multiplier=m) must equal the configured sampler with m times the steps."""
    module = METHODS[method]
    args = tiny_args(method, "unused")
    model = module.build_model(args).eval()
    if method == "daebm":
        longer = dict(visits_to_keep=3 * args.visits_to_keep,
                      max_transitions=3 * args.max_transitions)
    else:
        longer = dict(sample_langevin_steps=3 * args.sample_langevin_steps)
    torch.manual_seed(5)
    multiplied = module.sample(model, 16, args, "cpu", step_multiplier=3)
    torch.manual_seed(5)
    configured = module.sample(model, 16, dataclasses.replace(args, **longer), "cpu")
    torch.manual_seed(5)
    once = module.sample(model, 16, args, "cpu")
    assert torch.equal(multiplied, configured) and not torch.equal(multiplied, once)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_eval_2d_checkpoint_of_every_method(tmp_path, method):
    module = METHODS[method]
    module.main(tiny_args(method, tmp_path, steps=8, save_every=4))
    results = eval_fid_ood.evaluate(eval_fid_ood.EvalArgs(ckpt=str(tmp_path / "ckpt.pt"),
                                                          device="cpu", n_test=2000,
                                                          grid_resolution=200, long_run=2,
                                                          long_run_samples=300))
    saved = json.load(open(tmp_path / "eval.json"))
    assert saved["nll"] == results["nll"] and math.isfinite(results["nll"])
    assert saved["method"] == method
    fresh = common.draw_2d(results["dataset"], 2000, seed=12345)
    true = -eval_fid_ood.toy_log_density(results["dataset"], fresh).mean()
    assert results["true_nll"] == pytest.approx(true.item())
    # the same NLL computed independently: the model's energy at the test points themselves,
    # normalised by a grid twice as fine (a smooth, barely trained energy: the two agree to the
    # discretisation error)
    ckpt = common.load_checkpoint(str(tmp_path / "ckpt.pt"))
    module, args, model = eval_fid_ood.load_method(ckpt, "cpu")
    lo, hi = results["box"]
    fine = common.grid_2d(lo, hi, 400).float()
    with torch.no_grad():
        log_z = (torch.logsumexp(-module.energy(model, fine, args).double(), 0)
                 + 2 * math.log((hi - lo) / 400))
        test = common.draw_2d(args.dataset, 2000, seed=12345)
        direct = (module.energy(model, test, args).double() + log_z).mean().item()
    assert abs(results["nll"] - direct) < 0.02
    long_run = saved["long_run"]
    assert [r["step_multiplier"] for r in long_run["records"]] == [1, 2]
    for record in long_run["records"]:
        assert 0 <= record["tv_to_model"] <= 1 and 0 <= record["tv_to_data"] <= 1
    assert 0 < long_run["tv_floor_model"] < 1 and 0 < long_run["tv_floor_data"] < 1
    assert (tmp_path / "eval_density.png").exists() and (tmp_path / "eval_long_run.png").exists()


# --------------------------------------------------------------------------------------------------
# FID plumbing with a randomly initialised Inception (offline)
# --------------------------------------------------------------------------------------------------
def noisy(images, sd, seed=0):
    g = torch.Generator().manual_seed(seed)
    noisy = images.float() + sd * torch.randn(images.shape, generator=g)
    return noisy.round().clamp(0, 255).to(torch.uint8)


class Uint8Images(torch.utils.data.Dataset):
    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i]


@pytest.mark.slow
def test_fid_pipeline_self_zero_rising_with_noise_and_equal_to_torch_fidelity(tmp_path,
                                                                              image_folder,
                                                                             random_inception):
    small = first_images(image_folder, 16, tmp_path / "small")
    network, tag = common.load_inception(random_inception.weights, "cpu")
    dataset = f"folder:{small}"
    images = common.load_images(dataset, "unused")
    reference, path = common.reference_statistics(dataset, 8, lambda: images, network, tag,
                                                  random_inception.stats_dir, 16, "cpu")
    assert path.endswith(f"-train-8x8-inception-{tag}-pool2048.pt")

    def not_read():
        raise AssertionError("the cached statistics are used without reading the images")
    cached, _ = common.reference_statistics(dataset, 8, not_read, network, tag,
                                            random_inception.stats_dir, 16, "cpu")
    assert np.array_equal(cached["mu"], reference["mu"]) and np.array_equal(cached["sigma"],
                                                                            reference["sigma"])

    def fid(batch):
        uint8 = common.to_uint8_rgb(common.to_unit_range(batch))
        features = common.inception_features(network, [uint8], "cpu", len(batch), len(batch))
        return common.frechet_distance(common.feature_statistics(features), reference)
    scale = reference["sigma"].trace()
    fids = [fid(images), fid(noisy(images, 15)), fid(noisy(images, 60))]
    # the set against its own cached statistics (eigvals rounding)
    assert abs(fids[0]) < 1e-5 * scale
    assert 0.01 * scale < fids[1] < fids[2]
    # torch-fidelity's own pipeline (its data loader, feature extraction and statistics) gives the
    # same number
    import torch_fidelity

    theirs = torch_fidelity.calculate_metrics(input1=Uint8Images(noisy(images, 60)),
                                              input2=Uint8Images(images),
                                              fid=True,
                                              feature_extractor_weights_path=random_inception.weights,
                                              cuda=False, batch_size=16, save_cpu_ram=True,
                                              verbose=False,
                                              cache=False)["frechet_inception_distance"]
    assert theirs == pytest.approx(fids[2], rel=1e-4)


@pytest.mark.slow
def test_fid_during_training_is_the_evaluators_fid(tmp_path, image_folder, random_inception):
    """--fid-every's curve: each FID in metrics.jsonl is what the evaluator gives that step's
    checkpoint with the run's seed, sample count and batch size (and the cached statistics the run
    computed); best.pt is the lower one's."""
    small = first_images(image_folder, 16, tmp_path / "small")
    run, data_dir = tmp_path / "run", tmp_path / "data"
    args = tiny_args("cdrl", run, small, steps=6, save_every=3, fid_every=3, fid_samples=4,
                     inception_weights=random_inception.weights, data_dir=str(data_dir))
    cdrl.main(args)
    with open(run / "metrics.jsonl") as f:
        curve = {r["step"]: r["fid"] for r in map(json.loads, f) if "fid" in r}
    assert sorted(curve) == [3, 6] and len(os.listdir(data_dir / "fid_stats")) == 1
    for step, fid in curve.items():
        ea = eval_fid_ood.EvalArgs(ckpt=str(run / f"ckpt_{step:08d}.pt"), device="cpu",
                                   seed=args.seed, fid_samples=4, batch_size=args.batch_size,
                                   inception_weights=random_inception.weights, ood=("none",),
                                   out=str(tmp_path / f"eval_{step}.json"))
        assert eval_fid_ood.evaluate(ea)["fid"] == pytest.approx(fid, rel=1e-9, abs=0)
    best_step = min(curve, key=curve.get)
    assert torch.load(run / "best.pt", weights_only=True)["step"] == best_step


def test_to_uint8_rgb_inverts_the_training_conversion():
    images = torch.randint(0, 256, (5, 3, 4, 4), dtype=torch.uint8)
    assert torch.equal(common.to_uint8_rgb(common.to_unit_range(images)), images)
    grey = torch.randint(0, 256, (5, 1, 4, 4), dtype=torch.uint8)
    assert torch.equal(common.to_uint8_rgb(common.to_unit_range(grey)),
                       grey.expand(-1, 3, -1, -1))


def test_ood_sets_take_the_model_shape():
    g = torch.Generator().manual_seed(0)
    in_test = torch.randint(0, 256, (10, 1, 6, 6), dtype=torch.uint8, generator=g)
    for name in ("interp", "uniform", "constant"):
        images = eval_fid_ood.ood_images(name, in_test, (1, 6, 6), "unused", 7, g)
        assert images.shape == (7, 1, 6, 6) and images.dtype == torch.uint8
    constant = eval_fid_ood.ood_images("constant", in_test, (1, 6, 6), "unused", 7, g)
    assert (constant == constant[:, :, :1, :1]).all()
    rgb = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8, generator=g)
    grey = eval_fid_ood.match_shape(rgb, (1, 8, 8))
    # the channel mean, rounded
    assert (grey.float() - rgb.float().mean(1, keepdim=True)).abs().max() <= 0.5
    assert torch.equal(eval_fid_ood.match_shape(grey, (3, 8, 8)), grey.expand(-1, 3, -1, -1))
    # resizing keeps a constant image constant
    flat = eval_fid_ood.match_shape(constant, (3, 20, 20))
    assert flat.shape == (7, 3, 20, 20)
    assert torch.equal(flat, constant[:, :, :1, :1].expand(-1, 3, 20, 20))
    with pytest.raises(common.UserError, match="cannot convert 2-channel"):
        eval_fid_ood.match_shape(rgb[:, :2], (3, 8, 8))


def image_checkpoint(tmp_path, method, folder):
    module = METHODS[method]
    run = tmp_path / "run"
    module.main(tiny_args(method, run, folder))
    return run


@pytest.fixture
def other_folder(tmp_path):
    """20 8x8 RGB PNGs unlike image_folder's: horizontal stripes."""
    from PIL import Image

    folder = tmp_path / "stripes"
    folder.mkdir()
    for i in range(20):
        img = np.zeros((8, 8, 3), dtype=np.uint8)
        img[::2] = 40 + 10 * i
        Image.fromarray(img).save(folder / f"{i:03d}.png")
    return str(folder)


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(METHODS))
def test_eval_image_checkpoint_of_every_method(tmp_path, method, image_folder, other_folder,
                                               random_inception):
    small = first_images(image_folder, 16, tmp_path / "small")
    run = image_checkpoint(tmp_path, method, small)
    # one method also takes the image long-run path (each FID costs ~5 s here)
    long_run = method == "dcd"
    ea = eval_fid_ood.EvalArgs(ckpt=str(run / "ckpt.pt"), device="cpu", fid_samples=6,
                               batch_size=4, inception_weights=random_inception.weights,
                               stats_dir=random_inception.stats_dir,
                               ood=("interp", "uniform", "constant", f"folder:{other_folder}",
                                    f"folder:{small}"),
                               n_ood=16, long_run=2 if long_run else 0, long_run_samples=4)
    results = eval_fid_ood.evaluate(ea)
    assert json.load(open(run / "eval.json")) == json.loads(json.dumps(results))
    assert math.isfinite(results["fid"]) and results["fid"] > 0 and results["fid_samples"] == 6
    assert (run / "eval_samples.png").exists()
    if long_run:
        assert [r["step_multiplier"] for r in results["long_run"]["records"]] == [1, 2]
        assert all(math.isfinite(r["fid"]) and r["fid"] > 0 for r in results["long_run"]["records"])
        assert (run / "eval_long_run_x2.png").exists()
    # itself skipped
    assert set(results["ood"]) == {"interp", "uniform", "constant", f"folder:{other_folder}"}
    mean_auroc = sum(r["auroc"] for r in results["ood"].values()) / 4
    assert results["ood_mean"] == pytest.approx(mean_auroc)
    # one set recomputed by hand: the same subsets (seeded) scored by the method's energy
    module, args, model = eval_fid_ood.load_method(common.load_checkpoint(ea.ckpt), "cpu")
    g = torch.Generator().manual_seed(ea.seed)
    in_test = common.load_images(args.dataset, "unused")
    in_test = in_test[torch.randperm(len(in_test), generator=g)[:16]]
    for name in ("interp", "uniform", "constant"):  # drawn in this order from the same generator
        out = eval_fid_ood.ood_images(name, in_test, (3, 8, 8), "unused", 16, g)
    score = lambda x: -module.energy(model, common.to_unit_range(x), args)  # noqa: E731
    expected = brute_force_auroc(score(in_test), score(out))
    assert results["ood"]["constant"]["auroc"] == pytest.approx(expected)


@pytest.mark.slow
def test_inpainting_mse_against_a_reference_computation(tmp_path, image_folder, monkeypatch):
    run = image_checkpoint(tmp_path, "cdrl", image_folder)
    calls = []

    def recorded(model, x, known, args, device):  # the method's inpainting, its calls recorded
        calls.append((x.clone(), known.clone(), torch.get_rng_state()))
        calls[-1] += (inpaint(model, x, known, args, device),)
        return calls[-1][-1]
    inpaint = cdrl.inpaint
    monkeypatch.setattr(cdrl, "inpaint", recorded)
    ea = eval_fid_ood.EvalArgs(ckpt=str(run), device="cpu", inpaint="center", n_inpaint=6,
                               batch_size=4, fid_samples=0, ood=("none",))
    results = eval_fid_ood.evaluate(ea)["inpaint"]
    assert results["region"] == "center" and results["n"] == 6
    assert results["split"] == "training images (folder datasets have no test split)"
    # one picture per region: two inpainting runs of one checkpoint keep both
    assert [p.name for p in run.glob("eval_inpaint*.png")] == ["eval_inpaint_center.png"]
    # by hand: the seeded subset of the test split (here the folder) in batches of 4, each seeded
    # by batch_seed, with the central 4x4 of the 8x8 images missing
    test = common.load_images(f"folder:{image_folder}", "unused", train=False)
    test = test[torch.randperm(len(test), generator=torch.Generator().manual_seed(ea.seed))[:6]]
    truth = common.to_unit_range(test)
    known = torch.ones_like(truth, dtype=torch.bool)
    known[:, :, 2:6, 2:6] = False
    assert len(calls) == 2
    for index, (first, (x, mask, rng_state, _)) in enumerate(zip((0, 4), calls)):
        assert torch.equal(x, truth[first:first + 4]) and torch.equal(mask, known[first:first + 4])
        torch.manual_seed(common.batch_seed(ea.seed, index))
        assert torch.equal(rng_state, torch.get_rng_state())
    filled = torch.cat([call[-1] for call in calls])
    assert torch.equal(filled[known], truth[known])
    expected = ((filled - truth)[~known] / 2).pow(2).mean().item()
    assert results["mse"] == pytest.approx(expected, rel=1e-6)
    fill = torch.stack([truth[i][:, known[i, 0]].mean(1) for i in range(6)])  # (6, 3)
    baseline = ((fill[:, :, None, None] - truth)[:, :, 2:6, 2:6] / 2).pow(2).mean().item()
    assert results["mse_known_mean"] == pytest.approx(baseline, rel=1e-5)
    assert results["mse"] != results["mse_known_mean"]
    # an unconditional checkpoint has no guidance to sweep
    with pytest.raises(common.UserError, match="FID of a class-conditional image checkpoint"):
        eval_fid_ood.evaluate(eval_fid_ood.EvalArgs(ckpt=str(run), device="cpu",
                                                    guidance_sweep="0,1"))


@pytest.mark.slow
def test_guidance_sweep_gives_one_fid_per_weight(tmp_path, class_folder, random_inception):
    run = tmp_path / "run"
    cdrl.main(tiny_args("cdrl", run, class_folder, conditional=True))
    where = dict(device="cpu", fid_samples=6, batch_size=4, ood=("none",),
                 inception_weights=random_inception.weights, stats_dir=random_inception.stats_dir)
    swept = eval_fid_ood.evaluate(eval_fid_ood.EvalArgs(ckpt=str(run), guidance_sweep="0,2.5",
                                                        out=str(tmp_path / "sweep.json"), **where))
    assert [row["guidance"] for row in swept["guidance_sweep"]] == [0.0, 2.5]
    assert "fid" not in swept and swept["fid_samples"] == 6
    assert all((tmp_path / f"eval_samples_w{w}.png").exists() for w in ("0", "2.5"))
    # w = 0 is the checkpoint's own setting (--guidance 0): the same samples, the same FID as the
    # plain evaluation; guidance changes the samples
    plain = eval_fid_ood.evaluate(eval_fid_ood.EvalArgs(ckpt=str(run), out=str(tmp_path / "p.json"),
                                                        **where))
    zero, strong = swept["guidance_sweep"]
    assert zero["fid"] == plain["fid"] and zero["sample_mean_energy"] == plain["sample_mean_energy"]
    assert math.isfinite(strong["fid"]) and strong["fid"] != zero["fid"]


def test_guidance_sweep_refuses_bad_input():
    with pytest.raises(common.UserError, match="numbers separated by commas"):
        eval_fid_ood.EvalArgs(ckpt="x", guidance_sweep="0;1")
    with pytest.raises(common.UserError, match="--fid-samples must be > 0"):
        eval_fid_ood.EvalArgs(ckpt="x", guidance_sweep="0,1", fid_samples=0)


# --------------------------------------------------------------------------------------------------
# Bad inputs: one line, non-zero exit, partial results kept
# --------------------------------------------------------------------------------------------------
def test_eval_rejects_missing_corrupt_foreign_and_unknown_checkpoints(tmp_path):
    (tmp_path / "corrupt.pt").write_bytes(b"not a checkpoint at all")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "foreign.pt")
    torch.save({"method": "vae", "format": common.CHECKPOINT_FORMAT, "args": {}},
               tmp_path / "unknown.pt")
    for name, message in (("missing.pt", "does not exist"), ("corrupt.pt", "corrupt"),
                          ("foreign.pt", "not one of this project's checkpoints"),
                          ("unknown.pt", "'vae' is unknown")):
        with pytest.raises(common.UserError, match=message):
            eval_fid_ood.evaluate(eval_fid_ood.EvalArgs(ckpt=str(tmp_path / name), device="cpu"))
    with pytest.raises(common.UserError, match="unknown OOD set 'imagenet'"):
        eval_fid_ood.EvalArgs(ckpt="x", ood=("imagenet",))


@pytest.mark.slow
def test_unavailable_ood_set_fails_with_one_line_and_keeps_partial_results(tmp_path, image_folder):
    run = image_checkpoint(tmp_path, "dcd", image_folder)
    ckpt = str(run / "ckpt.pt")
    offline = mock.patch("torchvision.datasets.SVHN", side_effect=OSError("no network"))
    with offline, pytest.raises(common.UserError, match="svhn data not found"):
        eval_fid_ood.evaluate(eval_fid_ood.EvalArgs(ckpt=ckpt, device="cpu",
                                                    ood=("uniform", "svhn"), n_ood=8,
                                                    data_dir=str(tmp_path / "empty")))
    partial = json.load(open(run / "eval.json"))
    assert 0 <= partial["ood"]["uniform"]["auroc"] <= 1
    assert "svhn data not found" in partial["error"]
    assert "fid" not in partial
    # through the command line: one line on stderr, exit status 2 (a missing weights file, checked
    # before any sampling; the OOD results are computed first and kept)
    proc = subprocess.run([sys.executable, "eval_fid_ood.py", "--ckpt", ckpt, "--device", "cpu",
                           "--ood", "constant",
                           "--n-ood", "8", "--inception-weights", str(tmp_path / "absent.pth")],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2
    absent = tmp_path / "absent.pth"
    expected = f"error: --inception-weights {absent} does not exist"
    assert proc.stderr.strip().splitlines() == [expected]
    partial = json.load(open(run / "eval.json"))
    assert "constant" in partial["ood"] and "does not exist" in partial["error"]


def test_inception_weights_that_need_unpickling_are_refused(tmp_path):
    torch.save({"layer": SimpleNamespace(a=1)}, tmp_path / "pickled.pth")
    with pytest.raises(common.UserError, match="not a state dict of tensors"):
        common.load_inception(str(tmp_path / "pickled.pth"), "cpu")
    torch.save({"conv.weight": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(common.UserError, match="does not hold torch-fidelity's InceptionV3"):
        common.load_inception(str(tmp_path / "other.pth"), "cpu")
