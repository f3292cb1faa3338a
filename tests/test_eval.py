"""eval_fid_ood.py: the exact 2D grid density against analytic values, and a DA-EBM checkpoint scored."""
import json
import math

import torch

import common
import eval_fid_ood
import pcd_diffusion_ebm as daebm
from test_daebm import tiny_2d_args


def gaussian_energy(mean, cov):
    precision = torch.linalg.inv(cov)

    def energy_fn(x):
        d = x.double() - mean
        return 0.5 * ((d @ precision) * d).sum(1) + 123.0  # any constant offset is normalised away
    return energy_fn


def test_grid_nll_of_gaussian_equals_analytic():
    mean, cov = torch.tensor([0.3, -0.2], dtype=torch.float64), torch.tensor([[0.5, 0.2], [0.2, 0.3]],
                                                                              dtype=torch.float64)
    lo, hi = -4.0, 4.0
    log_p = eval_fid_ood.grid_log_density(gaussian_energy(mean, cov), lo, hi, 800)
    cell = ((hi - lo) / 800) ** 2
    assert abs(log_p.exp().sum().item() * cell - 1) < 1e-9
    points = torch.distributions.MultivariateNormal(mean, cov).sample((100_000,))
    analytic = -torch.distributions.MultivariateNormal(mean, cov).log_prob(points).mean().item()
    assert abs(eval_fid_ood.grid_nll(log_p, lo, hi, points) - analytic) < 5e-3
    # the expected NLL of a Gaussian is its entropy, 1 + log 2π + log|Σ|/2
    entropy = 1 + math.log(2 * math.pi) + 0.5 * math.log(torch.det(cov).item())
    assert abs(analytic - entropy) < 0.02


def test_grid_layout_matches_points():
    # log p at the cell that holds a point must be the energy at that point: a lopsided energy catches a
    # transposed grid
    energy_fn = lambda x: 3.0 * x[:, 0].double()  # noqa: E731
    log_p = eval_fid_ood.grid_log_density(energy_fn, -1.0, 1.0, 100)
    right, up = torch.tensor([[0.9, 0.0]]), torch.tensor([[0.0, 0.9]])
    assert eval_fid_ood.grid_nll(log_p, -1.0, 1.0, right) > eval_fid_ood.grid_nll(log_p, -1.0, 1.0, up)


def test_eval_daebm_2d_checkpoint(tmp_path):
    daebm.main(tiny_2d_args(tmp_path, steps=10))
    results = eval_fid_ood.evaluate(eval_fid_ood.EvalArgs(ckpt=str(tmp_path / "ckpt.pt"), device="cpu",
                                                          n_test=2000, grid_resolution=200))
    saved = json.load(open(tmp_path / "eval.json"))
    assert saved["nll"] == results["nll"] and math.isfinite(results["nll"])
    # the same NLL computed independently: the model's energy at the test points themselves, normalised by a
    # grid twice as fine (a smooth, barely trained energy: the two agree to the discretisation error)
    ckpt = common.load_checkpoint(str(tmp_path / "ckpt.pt"))
    module, args, model = eval_fid_ood.load_method(ckpt, "cpu")
    lo, hi = results["box"]
    fine = common.grid_2d(lo, hi, 400).float()
    with torch.no_grad():
        log_z = torch.logsumexp(-module.energy(model, fine, args).double(), 0) + 2 * math.log((hi - lo) / 400)
        test = common.toy_2d(args.dataset, 2000, seed=12345)
        direct = (module.energy(model, test, args).double() + log_z).mean().item()
    assert abs(results["nll"] - direct) < 0.02


def test_eval_rejects_foreign_checkpoint(tmp_path):
    path = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, path)
    try:
        eval_fid_ood.evaluate(eval_fid_ood.EvalArgs(ckpt=str(path), device="cpu"))
    except common.UserError as error:
        assert "not one of this project's checkpoints" in str(error)
    else:
        raise AssertionError("a foreign checkpoint was accepted")
