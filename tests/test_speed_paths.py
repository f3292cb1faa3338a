"""Speed paths against the fp32 path: --amp bf16 gives the fp32 input gradients to bf16 precision,
and MALA under bf16 still samples its Gaussian target."""
import math

import pytest
import torch
import torch.nn as nn
from conftest import METHODS, tiny_args

import pcd_diffusion_ebm as daebm


def input_gradient(method, model, x):
    """∇_x of the method's energy at its lowest level, through the sampler's own energy_and_grad."""
    module = METHODS[method]
    if method == "daebm":
        t = torch.zeros(len(x), dtype=torch.long)
        with torch.no_grad():
            table = model.net.level_table()
        return module.energy_and_grad(model, x, t, table)[1]
    if method == "cdrl":
        level = torch.ones(len(x), dtype=torch.long)
        with torch.no_grad():
            cond = model.ebm.embed(model.logsnr[level - 1], None)
        return module.energy_and_grad(model, x, cond)[1]
    return module.energy_and_grad(model, x, torch.zeros(len(x), dtype=torch.long))[1]


@pytest.mark.parametrize("method", sorted(METHODS))
def test_bf16_input_gradient_matches_fp32(method, image_folder):
    fp32 = METHODS[method].build_model(tiny_args(method, "unused", image_folder, image_size=8,
                                                 image_channels=3)).eval()
    bf16 = METHODS[method].build_model(tiny_args(method, "unused", image_folder, image_size=8,
                                                 image_channels=3, amp="bf16")).eval()
    bf16.load_state_dict(fp32.state_dict())
    assert bf16.amp and not fp32.amp
    x = torch.rand(16, 3, 8, 8) * 2 - 1  # fresh random inputs in the data range
    g32, g16 = input_gradient(method, fp32, x), input_gradient(method, bf16, x)
    assert g16.dtype == torch.float32 and not torch.equal(g16, g32)  # autocast really ran
    # bf16 keeps 8 bits of mantissa. Measured over 8 seeds (2026-11-23): relative error 0.4-0.7%
    # (DA-EBM), 0.4-1.3% (DCD), 2.4-7.3% (CDRL's deeper spectral-normalised convs). A wrong gradient
    # (another level, a sign, a bf16 output) fails these bounds or the checks above.
    relative = ((g16 - g32).norm() / g32.norm()).item()
    assert relative < 0.15, relative
    cosine = torch.nn.functional.cosine_similarity(g16.flatten(), g32.flatten(), dim=0)
    assert cosine > 0.99, cosine


class LinearGaussianNet(nn.Module):
    """f(x, t) = -||L (x - m)||² / 2 with L a Linear layer (so that autocast applies to it): the
    Gaussian N(m, (LᵀL)⁻¹) at every level."""

    def __init__(self, mean, cov):
        super().__init__()
        self.mean = mean
        self.root = nn.Linear(2, 2, bias=False)
        with torch.no_grad():
            self.root.weight.copy_(torch.linalg.cholesky(torch.linalg.inv(cov)).T)

    def level_table(self):
        return []

    def forward(self, x, t, table=None):
        return -0.5 * self.root(x - self.mean).pow(2).sum(1)


def test_mala_under_bf16_samples_the_gaussian_target():
    mean, cov = torch.tensor([1.0, -2.0]), torch.tensor([[1.0, 0.5], [0.5, 0.5]])
    n, step = 4000, 0.8
    results = {}
    for amp in (False, True):
        model = daebm.DAEBM(LinearGaussianNet(mean, cov), 1, 1e-2, 3e-1, torch.full((2,), step),
                            amp=amp)
        torch.manual_seed(0)
        stats = (torch.zeros(2), torch.zeros(2))
        x = daebm.langevin(model, torch.randn(n, 2), torch.zeros(n, dtype=torch.long), 300,
                           metropolis=True, stats=stats)
        results[amp] = x, (stats[0] / stats[1])[0].item()
    x, accept = results[True]
    assert not torch.equal(x, results[False][0])  # the bf16 chain is a different chain
    se_mean = torch.sqrt(torch.diagonal(cov) / n)
    assert torch.all((x.mean(0) - mean).abs() < 4 * se_mean)
    var = torch.diagonal(cov)
    se_cov = torch.sqrt((var[:, None] * var[None, :] + cov ** 2) / n)
    assert torch.all((torch.cov(x.T) - cov).abs() < 4 * se_cov), torch.cov(x.T)
    # the acceptance rate moves by less than its own sampling noise (~1 / sqrt(n * steps))
    assert abs(accept - results[False][1]) < 10 / math.sqrt(n * 300) + 0.01
