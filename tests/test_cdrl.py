"""CDRL (cdrl.py): schedule constants, network sizes, recovery Langevin, Tweedie, guidance, the
cooperative update's gradients, smoke runs, resume and failures."""
import copy
import math

import pytest
import torch
import torch.nn as nn
from torch.nn.utils import parametrize

import cdrl
import common
import eval_fid_ood
from conftest import run_command_line, write_imagenet32


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------
def tiny_2d_args(run_dir, **overrides):
    fields = dict(dataset="8gaussians", run_dir=str(run_dir), device="cpu", steps=8, batch_size=32,
                  langevin_steps=3, ebm_channels=8, init_channels=8, warmup_steps=4, log_every=2,
                  sample_every=4, save_every=4, n_points=64)
    fields.update(overrides)
    return cdrl.Args(**fields)


def tiny_image_args(run_dir, folder, **overrides):
    fields = dict(dataset=f"folder:{folder}", run_dir=str(run_dir), device="cpu", steps=6,
                  batch_size=8,
                  langevin_steps=2, ebm_channels=8, ebm_channel_mult=(1, 2), ebm_blocks=1,
                  init_channels=8,
                  init_channel_mult=(1, 1), init_blocks=1, warmup_steps=2, log_every=2,
                  sample_every=3, save_every=3, n_grid=4)
    fields.update(overrides)
    return cdrl.Args(**fields)


class QuadraticEBM(nn.Module):
    """f(y) = -a ||y - m||² / 2 at every level (embed ignores the level)."""

    def __init__(self, a, m):
        super().__init__()
        self.a = a
        self.register_buffer("m", m)

    def embed(self, logsnr, labels):
        return torch.zeros(len(logsnr), 1)

    def forward(self, y, temb):
        return -0.5 * self.a * (y - self.m).pow(2).sum(1)


def quadratic_model(a, m, **arg_overrides):
    args = cdrl.Args(dataset="cifar10", **arg_overrides)
    return cdrl.CDRL(QuadraticEBM(a, m), nn.Identity(), cdrl.level_tables(args)), args


# --------------------------------------------------------------------------------------------------
# schedule (constants of ../shared/methods/cdrl.md)
# --------------------------------------------------------------------------------------------------
def test_schedule_constants():
    tables = cdrl.level_tables(cdrl.Args(dataset="cifar10"))
    logsnr = [9.8, 2.689, 1.197, 0.141, -0.876, -2.172, -5.1]
    sqrt_alpha_bar = [1.0, .968, .876, .732, .542, .320, .078]
    sigma = [.252, .424, .551, .671, .808, .970]
    weight = [1, .595, .458, .376, .312, .260]
    assert torch.allclose(tables["logsnr"], torch.tensor(logsnr, dtype=torch.float64), atol=5e-4)
    assert torch.allclose(tables["alpha_bar"].sqrt(),
                          torch.tensor(sqrt_alpha_bar, dtype=torch.float64), atol=5e-4)
    assert torch.allclose(tables["sigma"][1:], torch.tensor(sigma, dtype=torch.float64), atol=5e-4)
    assert torch.allclose(tables["loss_weight"][1:], torch.tensor(weight, dtype=torch.float64),
                          atol=5e-4)


def test_step_sizes_and_multipliers():
    tables = cdrl.level_tables(cdrl.Args(dataset="cifar10"))
    ab = tables["alpha_bar"].tolist()
    for i in range(1, 7):
        c_sq = math.sqrt(1 - ab[i - 1]) / math.sqrt(1 - ab[0])
        sigma_sq = 1 - ab[i] / ab[i - 1]
        assert tables["step_sq"][i].item() == pytest.approx(4e-4 * c_sq * sigma_sq, rel=1e-9)
        assert tables["quad_coef"][i].item() == pytest.approx(0.0 if i == 6 else 2e-4 * c_sq,
                                                              rel=1e-9, abs=0)
        assert tables["alpha_mul"][i].item() == pytest.approx(1.0 if i == 6
                                                              else math.sqrt(ab[i] / ab[i - 1]))
        beta_tilde = (1 - ab[i - 1]) / (1 - ab[i]) * sigma_sq
        assert tables["proposal_std"][i].item() == pytest.approx(math.sqrt(beta_tilde)
                                                                 * tables["alpha_mul"][i].item())
    # level 1: c_1 = 1, so s_1² = 4e-4 σ_1²
    assert tables["step_sq"][1].item() == pytest.approx(4e-4 * 0.2522 ** 2, rel=1e-3)
    # 2D (official toy): c² is the constant 1 / sqrt(1 - ᾱ_0) and the step scale 2e-3
    toy = cdrl.level_tables(cdrl.Args(dataset="checkerboard"))
    c_sq = 1 / math.sqrt(1 - toy["alpha_bar"][0].item())
    assert toy["step_sq"][4].item() == pytest.approx(2e-3 * c_sq * toy["sigma"][4].item() ** 2,
                                                     rel=1e-9)


def test_warmups_match_official():
    ebm, init = cdrl.warmup_factors(cdrl.Args(dataset="cifar10"))
    assert ebm(0) == 0 and ebm(5000) == 0.5 and ebm(20000) == 1
    assert init(0) == 0.05 and init(9500) == 1
    ebm, init = cdrl.warmup_factors(cdrl.Args(dataset="cifar10", warmup_steps=0))
    assert ebm(0) == init(0) == 1


# --------------------------------------------------------------------------------------------------
# networks
# --------------------------------------------------------------------------------------------------
def test_cifar10_network_sizes():
    model = cdrl.build_model(cdrl.Args(dataset="cifar10"))
    n_ebm = sum(p.numel() for p in model.ebm.parameters())
    n_init = sum(p.numel() for p in model.initializer.parameters())
    assert n_ebm == 34_833_152  # the spec's "about 34.8M"
    assert n_init == 3_769_795  # the spec's "about 3.8M"
    assert len(model.ebm.stages) == 4 and all(len(s) == 8 for s in model.ebm.stages)


def test_initializer_starts_as_identity():
    for args in (cdrl.Args(dataset="cifar10"), cdrl.Args(dataset="cifar10", conditional=True),
                 cdrl.Args(dataset="checkerboard")):
        model = cdrl.build_model(args)
        x = torch.randn((3,) + cdrl.sample_shape(args))
        level = torch.tensor([1, 3, 6])
        labels = torch.tensor([0, 4, 10]) if args.conditional else None
        with torch.no_grad():
            assert torch.equal(model.initializer(x, model.logsnr[level], labels), x)


def test_energy_net_is_spectrally_normalised_and_per_row():
    args = cdrl.Args(dataset="cifar10", image_size=8, ebm_channels=8, ebm_blocks=2,
                     ebm_channel_mult=(1, 2))
    model = cdrl.build_model(args).eval()
    conv = model.ebm.stages[0][0].conv1
    sigma_max = torch.linalg.matrix_norm(conv.weight.flatten(1), ord=2)
    assert sigma_max.item() == pytest.approx(1.0, abs=0.05)
    y, level = torch.randn(4, 3, 8, 8), torch.tensor([1, 2, 5, 6])
    with torch.no_grad():
        batched = model.f(y, level)
        single = torch.cat([model.f(y[i:i + 1], level[i:i + 1]) for i in range(4)])
    assert torch.allclose(batched, single, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# sampler
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("level_index", [3, 6])
def test_recovery_langevin_samples_the_gaussian_posterior(level_index):
    """f(y) = -a||y - m||²/2: the recovery density f/s² - ||y - x||²/(2σ²) is Gaussian with
    precision P = a/s² + 1/σ² (a/s² at the top level) and mean (a m/s² + x/σ²)/P. Langevin with step
    h = s² is exact in the mean; its stationary variance is h / (1 - (1 - hP/2)²) = (1/P) / (1 -
    hP/4), tested to 4 SE."""
    torch.manual_seed(0)
    a, m, x = 0.05, torch.tensor([-1.0, 2.0]), torch.tensor([1.0, -0.5])
    model, _ = quadratic_model(a, m)
    s_sq = model.step_sq[level_index].double().item()
    inv_sigma_sq = 0.0 if level_index == 6 else 1 / model.sigma[level_index].double().item() ** 2
    precision = a / s_sq + inv_sigma_sq
    mean = (a * m.double() / s_sq + x.double() * inv_sigma_sq) / precision
    var_ula = (1 / precision) / (1 - s_sq * precision / 4)
    n = 20_000
    level = torch.full((n,), level_index, dtype=torch.long)
    y0 = torch.zeros(n, 2)
    y = cdrl.recovery_langevin(model, y0, x.expand(n, 2), level, None, n_steps=600).double()
    assert torch.allclose(y.mean(0), mean, atol=4 * math.sqrt(var_ula / n))
    var_se = var_ula * math.sqrt(2 / (n - 1))
    assert torch.allclose(y.var(0), torch.full((2,), var_ula, dtype=torch.float64), atol=4 * var_se)
    # the quadratic term matters here: the posterior mean is far from the EBM's own mean m
    if level_index == 3:
        assert (mean - m.double()).abs().min() > 0.5


def test_tweedie_step_official_half_scale_and_exact():
    a, m = 0.05, torch.tensor([0.3, -0.2])
    model, _ = quadratic_model(a, m)
    x = torch.randn(5, 2)
    am, ab0, s1 = model.alpha_mul[1], model.alpha_bar[0], model.step_sq[1]
    score_exact = -a * am * (am * x - m) / s1  # ∇_x f(α_mul x) / s_1²
    for exact, score in ((True, score_exact), (False, 2 * score_exact)):
        out = cdrl.tweedie_step(model, x, None, 0.0, exact)
        assert torch.allclose(out, (x + (1 - ab0) * score) / ab0.sqrt(), atol=1e-5)


def tiny_conditional_model(seed=0):
    torch.manual_seed(seed)
    args = cdrl.Args(dataset="cifar10", conditional=True, image_size=8, ebm_channels=8,
                     ebm_blocks=1,
                     ebm_channel_mult=(1, 2), init_channels=8, init_blocks=1,
                     init_channel_mult=(1, 1), langevin_steps=3)
    model = cdrl.build_model(args).eval()
    # give the initializer's residual some weight so that its guidance matters too
    with torch.no_grad():
        model.initializer.conv_out.weight.normal_(0, 0.1)
    return model, args


def as_rows(per_row, like):
    return per_row.view(-1, *[1] * (like.dim() - 1))


def test_guidance_zero_ignores_the_null_class_and_nonzero_uses_it():
    model, args = tiny_conditional_model()
    labels = torch.tensor([1, 2, 3, 10])

    def draw(m, w):
        torch.manual_seed(1)  # the same noise for every draw
        guided_args = copy.copy(args)
        guided_args.sample_langevin_steps, guided_args.guidance = 3, w
        return cdrl.generate(m, 4, guided_args, "cpu", labels=labels)

    # a copy whose networks answer differently for the null class (label 0) only, in both networks
    scrambled = copy.deepcopy(model)
    embed, initializer = scrambled.ebm.embed, scrambled.initializer.forward
    scrambled.ebm.embed = lambda logsnr, lab: [c + 5.0 * as_rows(lab == 0, c)
                                               for c in embed(logsnr, lab)]
    scrambled.initializer.forward = lambda x, logsnr, lab: initializer(x, logsnr, lab) + \
        (lab == 0).float().view(-1, 1, 1, 1)
    assert torch.equal(draw(model, 0.0), draw(scrambled, 0.0))
    assert not torch.allclose(draw(model, 1.0), draw(scrambled, 1.0), atol=1e-3)


def test_guided_langevin_drift():
    """One step: y + ½[(1+w)∇f(y, c) - w∇f(y, ∅)] - q (y - x) + s ε, computed independently."""
    model, _ = tiny_conditional_model()
    w, level_index = 0.7, 2
    labels = torch.tensor([3, 5])
    y, x = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    level = torch.full((2,), level_index, dtype=torch.long)

    def grad_f(lab):
        y_var = y.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(model.f(y_var, level, lab).sum(), y_var)
        return g

    drift = 0.5 * ((1 + w) * grad_f(labels) - w * grad_f(torch.zeros_like(labels)))
    torch.manual_seed(3)
    noise = model.step_sq[level_index].sqrt() * torch.randn_like(y)
    expected = y + drift - model.quad_coef[level_index] * (y - x) + noise
    torch.manual_seed(3)
    out = cdrl.recovery_langevin(model, y, x, level, labels, 1, guidance=w)
    assert torch.allclose(out, expected, atol=1e-5)


def test_sample_uses_sample_langevin_steps():
    class CountingEBM(QuadraticEBM):
        calls = 0

        def forward(self, y, temb):
            CountingEBM.calls += 1
            return super().forward(y, temb)

    args = cdrl.Args(dataset="checkerboard", langevin_steps=15, sample_langevin_steps=4)
    model = cdrl.CDRL(CountingEBM(0.1, torch.zeros(2)), cdrl.MLPInitializer(8, 1, None),
                      cdrl.level_tables(args))
    out = cdrl.sample(model, 7, args, "cpu")
    assert out.shape == (7, 2) and torch.isfinite(out).all()
    assert CountingEBM.calls == 6 * 4 + 1  # 4 steps at each of 6 levels + the Tweedie step


# --------------------------------------------------------------------------------------------------
# the cooperative update
# --------------------------------------------------------------------------------------------------
class LinearEBM(nn.Module):
    """f(y) = θ · y; records every input it sees (positives first, then Langevin, then
    negatives)."""

    def __init__(self):
        super().__init__()
        self.theta = nn.Parameter(torch.tensor([0.3, -0.2]))
        self.inputs = []

    def embed(self, logsnr, labels):
        return torch.zeros(len(logsnr), 1)

    def forward(self, y, temb):
        self.inputs.append(y.detach().clone())
        return (y * self.theta).sum(1)


class ShiftInitializer(nn.Module):
    """g(x) = x + b."""

    def __init__(self):
        super().__init__()
        self.b = nn.Parameter(torch.tensor([0.1, 0.4]))

    def forward(self, x, logsnr, labels=None):
        return x + self.b


def test_cdrl_step_gradients_closed_form():
    """EBM: ∇_θ mean_b w_b (f(neg_b) - f(pos_b)) = mean_b w_b (neg_b - pos_b) for f = θ·y;
    initializer: ∇_b mean_b ||refined_b - proposal_b||² = -2 mean_b (refined_b - proposal_b). With
    SGD at lr 1 and no clipping the update is minus these gradients."""
    args = cdrl.Args(dataset="checkerboard", langevin_steps=4, grad_clip=1e9)
    model = cdrl.CDRL(LinearEBM(), ShiftInitializer(), cdrl.level_tables(args))
    theta0, b0 = model.ebm.theta.detach().clone(), model.initializer.b.detach().clone()
    opts = (torch.optim.SGD(model.ebm.parameters(), lr=1.0),
            torch.optim.SGD(model.initializer.parameters(), lr=1.0))
    torch.manual_seed(5)
    x0 = torch.randn(64, 2)
    torch.manual_seed(6)
    level = torch.randint(1, 7, (64,))  # the first draw cdrl_step makes
    torch.manual_seed(6)
    ebm_loss, init_loss, energy_pos, energy_neg, _, _ = cdrl.cdrl_step(model, x0, None, args, opts)
    inputs = model.ebm.inputs
    assert len(inputs) == 1 + args.langevin_steps + 1
    pos, proposal, neg = inputs[0], inputs[1], inputs[-1]
    weight = model.loss_weight[level][:, None]
    ebm_grad = (weight * (neg - pos)).mean(0)
    assert torch.allclose(model.ebm.theta.detach(), theta0 - ebm_grad, atol=1e-5)
    assert ebm_loss.item() == pytest.approx((weight[:, 0] * ((neg - pos) @ theta0)).mean().item(),
                                            abs=1e-5)
    init_grad = -2 * (neg - proposal).mean(0)
    assert torch.allclose(model.initializer.b.detach(), b0 - init_grad, atol=1e-5)
    assert init_loss.item() == pytest.approx((neg - proposal).pow(2).sum(1).mean().item(), rel=1e-5)
    assert energy_pos.item() == pytest.approx(-(pos @ theta0).mean().item(), abs=1e-5)


class ClassQuadraticEBM(nn.Module):
    """f(y, c) = -a ||y - m_c||² / 2 at every level: the embedding carries the class."""

    def __init__(self, a, means):
        super().__init__()
        self.a = a
        self.register_buffer("means", means)

    def embed(self, logsnr, labels):
        return labels

    def forward(self, y, labels):
        return -0.5 * self.a * (y - self.means[labels]).pow(2).sum(1)


def test_composing_one_class_is_conditional_sampling():
    model, args = tiny_conditional_model()
    args.guidance, labels = 0.5, torch.tensor([1, 2, 3, 10])
    torch.manual_seed(2)
    conditional = cdrl.generate(model, 4, args, "cpu", labels=labels)
    torch.manual_seed(2)
    composed = cdrl.generate(model, 4, args, "cpu", labels=labels[:, None])
    assert torch.equal(conditional, composed)


@pytest.mark.slow  # 20,000 chains x 600 steps
def test_composed_classes_sample_the_product_of_their_densities():
    """Two Gaussian classes m_1 = (-1, 0), m_2 = (1, 1) at the top level (no quadratic term): the
    sum of their energies is the Gaussian with mean (m_1 + m_2) / 2 and precision 2a / s², where
    both conditional densities are high; Langevin with step h = s² has stationary variance (1/P) /
    (1 - hP/4). Guided with w = 1 (null class at the origin) the energy is 2 f_1 + 2 f_2 - 2 f_∅:
    the same precision, mean (2 m_1 + 2 m_2 - 2 m_∅) / 2 = m_1 + m_2."""
    torch.manual_seed(0)
    a = 0.05
    means = torch.tensor([[0.0, 0.0], [-1.0, 0.0], [1.0, 1.0]])  # row 0: the null class
    model = cdrl.CDRL(ClassQuadraticEBM(a, means), nn.Identity(),
                      cdrl.level_tables(cdrl.Args(dataset="cifar10")))
    n, top = 20_000, 6
    s_sq = model.step_sq[top].double().item()
    level = torch.full((n,), top, dtype=torch.long)
    labels = torch.tensor([1, 2]).expand(n, 2)
    precision = 2 * a / s_sq
    var = (1 / precision) / (1 - s_sq * precision / 4)
    for guidance, mean in ((0.0, (means[1] + means[2]) / 2), (1.0, means[1] + means[2])):
        y = cdrl.recovery_langevin(model, torch.zeros(n, 2), torch.zeros(n, 2), level, labels,
                                   600, guidance).double()
        assert torch.allclose(y.mean(0), mean.double(), atol=4 * math.sqrt(var / n))
        assert torch.allclose(y.var(0), torch.full((2,), var, dtype=torch.float64),
                              atol=4 * var * math.sqrt(2 / (n - 1)))
    # one class alone: its own mean (precision a / s², about twice the variance)
    one = cdrl.recovery_langevin(model, torch.zeros(n, 2), torch.zeros(n, 2), level,
                                 labels[:, :1], 600).double()
    assert torch.allclose(one.mean(0), means[1].double(), atol=4 * math.sqrt(2 * var / n))


def test_compose_is_checked():
    args = cdrl.Args(dataset="cifar10", conditional=True, compose=[1, 3])
    assert args.compose == (1, 3)
    assert cdrl.sample_labels(2, args, "cpu").tolist() == [[2, 4], [2, 4]]  # 0 = the null class
    with pytest.raises(common.UserError, match="--compose needs a --conditional model"):
        cdrl.Args(dataset="cifar10", compose=(1,))
    with pytest.raises(common.UserError, match=r"--compose takes classes 0..9, got \[10\]"):
        cdrl.Args(dataset="cifar10", conditional=True, compose=(10,))


class CorrelatedQuadraticEBM(nn.Module):
    """f(y) = -yᵀ A y / 2 at every level, A = a [[1, ρ], [ρ, 1]]."""

    def __init__(self, a, rho):
        super().__init__()
        self.register_buffer("A", a * torch.tensor([[1.0, rho], [rho, 1.0]]))

    def embed(self, logsnr, labels):
        return torch.zeros(len(logsnr), 1)

    def forward(self, y, temb):
        return -0.5 * ((y @ self.A) * y).sum(1)


@pytest.mark.slow  # 20,000 chains x 600 steps
def test_held_entries_make_langevin_sample_the_conditional():
    """At the top level the density is exp(f/s²): holding y_1 = 2, y_2 is Gaussian with mean
    -ρ·2 and precision P = a/s² (ULA variance (1/P) / (1 - hP/4), h = s²)."""
    torch.manual_seed(0)
    a, rho, n, top = 0.05, 0.6, 20_000, 6
    model = cdrl.CDRL(CorrelatedQuadraticEBM(a, rho), nn.Identity(),
                      cdrl.level_tables(cdrl.Args(dataset="cifar10")))
    s_sq = model.step_sq[top].double().item()
    precision = a / s_sq
    var = (1 / precision) / (1 - s_sq * precision / 4)
    mask = torch.tensor([True, False]).expand(n, 2)
    values = torch.tensor([2.0, 0.0]).expand(n, 2)
    y = cdrl.recovery_langevin(model, torch.zeros(n, 2), torch.zeros(n, 2),
                               torch.full((n,), top, dtype=torch.long), None, 600,
                               known=(mask, values)).double()
    assert torch.all(y[:, 0] == 2.0)
    assert y[:, 1].mean().item() == pytest.approx(-rho * 2, abs=4 * math.sqrt(var / n))
    assert y[:, 1].var().item() == pytest.approx(var, abs=4 * var * math.sqrt(2 / (n - 1)))


def test_inpainting_keeps_the_known_pixels():
    model, args = tiny_conditional_model()
    args.guidance = 0.5
    x = torch.rand((5,) + cdrl.sample_shape(args)) * 2 - 1
    known = torch.zeros_like(x, dtype=torch.bool)
    known[..., :x.shape[-1] // 2] = True  # the right half is missing
    torch.manual_seed(0)
    out = cdrl.inpaint(model, x, known, args, "cpu")
    assert torch.equal(out[known], x[known])
    assert out.shape == x.shape and out[~known].abs().max() <= 1
    assert (out[~known] - x[~known]).abs().mean() > 0.1  # the missing pixels are drawn anew


# --------------------------------------------------------------------------------------------------
# smoke, resume, failures
# --------------------------------------------------------------------------------------------------
def test_smoke_conditional_and_guided_resample(tmp_path, class_folder):
    run = tmp_path / "run"
    cdrl.main(tiny_image_args(run, class_folder, conditional=True))
    ckpt = torch.load(run / "ckpt.pt", weights_only=True)
    assert ckpt["args"]["num_classes"] == 2 and ckpt["args"]["conditional"]
    # resuming a finished run only draws samples, here with other sampling options, given on the
    # command line as the README says (they are checked against the run's own settings:
    # --guidance and --compose need its --conditional)
    for flags in (["--guidance", "1"], ["--compose", "0", "1"]):
        cdrl.main(common.parse_args(cdrl.Args, "cdrl", ["--resume", f"--run-dir={run}",
                                                        "--sample-langevin-steps", "1", *flags]))
    assert (run / "samples_00000006_K1_w1.png").exists()
    assert (run / "samples_00000006_K1_w0_c0+1.png").exists()
    with pytest.raises(common.UserError, match=r"--compose takes classes 0..1, got \[0, 2\]"):
        cdrl.main(tiny_image_args(run, class_folder, conditional=True, resume=True,
                                  compose=(0, 2)))
    # a new run: the classes are known once the folder is read, before the run folder is written
    fresh = tmp_path / "fresh"
    with pytest.raises(common.UserError, match=r"--compose takes classes 0..1, got \[2\]"):
        cdrl.main(tiny_image_args(fresh, class_folder, conditional=True, compose=(2,)))
    assert not fresh.exists()
    module, loaded_args, model = eval_fid_ood.load_method(ckpt, "cpu")
    assert module.sample(model, 4, loaded_args, "cpu").shape == (4, 3, 8, 8)


@pytest.mark.slow  # a 32x32 training run
def test_imagenet32_trains_the_official_conditional_configuration(tmp_path):
    # the preset is main_cond.py's: 1M iterations, initializer U-Net with 2 blocks per level,
    # class-conditional over 1,000 classes with label dropout 0.1, guidance 1 for its samples; the
    # rest as CIFAR-10
    preset = cdrl.Args(dataset="imagenet32")
    assert (preset.steps, preset.init_blocks, preset.conditional, preset.num_classes,
            preset.label_dropout, preset.guidance) == (1_000_000, 2, True, 1000, 0.1, 1.0)
    cifar = cdrl.Args(dataset="cifar10")
    assert (cifar.init_blocks, cifar.conditional, cifar.guidance, cifar.steps) == (3, False, 0.0,
                                                                                  500_000)
    same = ("batch_size", "lr", "initializer_lr", "warmup_steps", "ema_decay", "ebm_channels",
            "ebm_blocks", "init_dropout", "step_scale", "hflip")
    assert [getattr(preset, f) for f in same] == [getattr(cifar, f) for f in same]
    write_imagenet32(tmp_path / "data" / "imagenet32", per_file=2)
    run = tmp_path / "run"
    cdrl.main(cdrl.Args(dataset="imagenet32", data_dir=str(tmp_path / "data"), run_dir=str(run),
                        device="cpu", steps=2, batch_size=4, langevin_steps=1, ebm_channels=8,
                        ebm_channel_mult=(1, 2), ebm_blocks=1, init_channels=8,
                        init_channel_mult=(1, 1), init_blocks=1, warmup_steps=1, log_every=1,
                        sample_every=2, save_every=2, n_grid=4, sample_batch=4))
    ckpt = torch.load(run / "ckpt.pt", weights_only=True)
    assert ckpt["args"]["num_classes"] == 1000 and ckpt["args"]["guidance"] == 1.0
    assert (run / "samples_00000002.png").exists()


def test_folder_labels_follow_subfolders(class_folder):
    labels = common.load_labels(f"folder:{class_folder}", "unused")
    images = common.load_images(f"folder:{class_folder}", "unused")
    assert labels.tolist() == [0] * 12 + [1] * 12
    # class a: top-left square
    assert images[:12, :, 0, 0].float().mean() > images[12:, :, 0, 0].float().mean()


@pytest.mark.parametrize("argv, message", [
    (("--conditional",), "--conditional needs class labels, and checkerboard has none"),
    (("--guidance", "2"), "--guidance needs a --conditional model"),
    (("--dataset", "mnist", "--data-dir", "/nonexistent/nodata", "--device", "cpu"),
     "mnist data not found"),
])
def test_cli_bad_input_is_one_line(tmp_path, capsys, argv, message):
    code, err = run_command_line("cdrl", [*argv, "--run-dir", str(tmp_path / "run")], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0]


def test_bf16_energy_blocks_stay_bf16():
    """--amp bf16: every convolution of the EBM after the input one sees bf16 activations (the fp32
    level biases and scales used to promote each block back to fp32, issue 32 item 6), and the
    output stays fp32."""
    args = cdrl.Args(dataset="mnist", preset="cpu", amp="bf16")
    model = cdrl.build_model(args).eval()
    seen = {}
    for name, module in model.ebm.named_modules():
        if isinstance(module, nn.Conv2d):
            module.register_forward_hook(
                lambda module, inputs, output, name=name: seen.update({name: inputs[0].dtype}))
    level = torch.full((4,), 2, dtype=torch.long)
    with torch.no_grad():
        out = model.f(torch.randn(4, 1, 28, 28), level)
    assert out.dtype == torch.float32 and seen.pop("conv_in") == torch.float32
    assert len(seen) >= 6 and set(seen.values()) == {torch.bfloat16}


def test_bf16_spectral_norm_runs_outside_autocast():
    """--amp bf16: the spectral-norm parametrisation (power iteration, weight / σ) of every EBM
    layer runs before autocast, so on CUDA its mv stays fp32 (CUDA's autocast casts mv to bf16,
    the CPU's does not: checked here by the autocast state inside the parametrisation; issue 32,
    item 9), once per pass, in the training passes as in the Langevin steps."""
    args = cdrl.Args(dataset="mnist", preset="cpu", amp="bf16")
    model = cdrl.build_model(args).train()
    states = []
    for module in model.ebm.modules():
        if parametrize.is_parametrized(module, "weight"):
            module.parametrizations.weight[0].register_forward_hook(
                lambda *_: states.append(torch.is_autocast_enabled("cpu")))
    level = torch.full((4,), 2, dtype=torch.long)
    model.f(torch.randn(4, 1, 28, 28), level).sum().backward()
    layers = sum(parametrize.is_parametrized(m, "weight") for m in model.ebm.modules())
    assert len(states) == layers and not any(states)
    # the precomputed weights still carry the gradient to the raw parameters
    assert model.ebm.conv_in.parametrizations.weight.original.grad.abs().sum() > 0
