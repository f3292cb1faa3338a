"""DCD (dcd.py): the objective's gradient in a Gaussian case where everything is closed-form (each
estimator, VE and VP, the score-matching and maximum-likelihood limits), the ladder, the samplers
and the denoiser, smoke runs of every kernel and estimator, resume and failures."""
import json
import math

import pytest
import torch
import torch.nn as nn

import common
import dcd
import eval_fid_ood
from conftest import run_command_line



# --------------------------------------------------------------------------------------------------
# the Gaussian case: data N(μ_d, s_d I), model E(x) = ||x - m||² / (2v), θ = (m, log v), d = 2
# --------------------------------------------------------------------------------------------------
DATA_MEAN, DATA_VAR = torch.tensor([0.5, -0.3], dtype=torch.float64), 0.8
MODEL_MEAN, MODEL_LOG_VAR = [1.2, 0.4], math.log(1.5)


class QuadraticEnergy(nn.Module):
    def __init__(self, mean=MODEL_MEAN, log_var=MODEL_LOG_VAR):
        super().__init__()
        self.m = nn.Parameter(torch.tensor(mean, dtype=torch.float64))
        self.log_v = nn.Parameter(torch.tensor(log_var, dtype=torch.float64))

    def forward(self, x, level):
        return (x - self.m).pow(2).sum(1) / (2 * self.log_v.exp())


TRUTH = (DATA_MEAN.tolist(), math.log(DATA_VAR))  # θ with p_θ = p_data


def gaussian_model(kernel="ve", sigma=0.5, theta=(MODEL_MEAN, MODEL_LOG_VAR), **overrides):
    # the estimators alone: no energy penalty unless a test asks for one
    args = dcd.Args(dataset="8gaussians", kernel=kernel, sigma=sigma,
                    **{"energy_reg": 0.0, **overrides})
    model = dcd.DCD(QuadraticEnergy(*theta), dcd.level_tables(args)).double()
    return model, args


def kl_isotropic(mean_p, var_p, mean_q, var_q, d=2):
    """KL(N(mean_p, var_p I) || N(mean_q, var_q I)) in d dimensions."""
    return (0.5 * d * (var_p / var_q - 1 - torch.log(var_p / var_q))
            + (mean_p - mean_q).pow(2).sum() / (2 * var_q))


def closed_form_dcd(m, log_v, kernel, sigma):
    """KL(p_data || p_θ) - KL(Q p_data || Q p_θ) with Q the kernel itself, written in y space (no
    VE/VP equivalence assumed): VE y = x + σε, VP y = sqrt(1 - σ²) x + σε."""
    v = log_v.exp()
    a = math.sqrt(1 - sigma ** 2) if kernel == "vp" else 1.0
    data_var = torch.tensor(DATA_VAR, dtype=torch.float64)
    return kl_isotropic(DATA_MEAN, data_var, m, v) - \
        kl_isotropic(a * DATA_MEAN, a ** 2 * data_var + sigma ** 2, a * m, a ** 2 * v + sigma ** 2)


def analytic_gradient(objective):
    """∇_(m, log v) of a closed-form objective at the test's θ, (3,) float64."""
    m = torch.tensor(MODEL_MEAN, dtype=torch.float64, requires_grad=True)
    log_v = torch.tensor(MODEL_LOG_VAR, dtype=torch.float64, requires_grad=True)
    grad_m, grad_log_v = torch.autograd.grad(objective(m, log_v), (m, log_v))
    return torch.cat([grad_m, grad_log_v[None]])


def gradient_of_moments(mean, var_per_coord, model_mean=MODEL_MEAN, model_log_var=MODEL_LOG_VAR):
    """E_z ∇_θ E(z) for z with the given mean and per-coordinate variance: ∂m = -(E z - m)/v,
    ∂log v = -E||z - m||² / (2v)."""
    m, v = torch.tensor(model_mean, dtype=torch.float64), math.exp(model_log_var)
    return torch.cat([-(mean - m) / v,
                      (-(2 * var_per_coord + (mean - m).pow(2).sum()) / (2 * v))[None]])


def posterior_moments(sigma_eff, steps=None, step_ratio=None, start="y", mean=MODEL_MEAN,
                      log_var=MODEL_LOG_VAR):
    """Mean and per-coordinate variance of the negatives x̃ (marginally over data and y,
    VE-equivalent noise sigma_eff, y = x + σ ε): exact posterior draws (steps None) or `steps`
    unadjusted Langevin steps with step η = step_ratio sigma_eff² from y or from the positive x.
    Posterior precision P = 1/v + 1/σ², mean μ(y) = (m/v + y/σ²)/P; a step maps x - μ to c (x - μ)
    + sqrt(η) ξ with c = 1 - ηP/2, so x_K = (1 - c^K) μ(y) + c^K x_start + noise."""
    m, v = torch.tensor(mean, dtype=torch.float64), math.exp(log_var)
    s2 = sigma_eff ** 2
    precision = 1 / v + 1 / s2
    if steps is None:
        gain, noise_var = 1 / (s2 * precision), 1 / precision
        return (m / v + DATA_MEAN / s2) / precision, gain ** 2 * (DATA_VAR + s2) + noise_var
    eta = step_ratio * s2
    c = 1 - eta * precision / 2
    # x_K = const + gain_x x + gain_noise σ ε + chain noise
    gain_x = (1 - c ** steps) / (s2 * precision) + c ** steps
    gain_noise = gain_x if start == "y" else (1 - c ** steps) / (s2 * precision)
    mean = (1 - c ** steps) * (m / v) / precision + gain_x * DATA_MEAN
    return mean, (gain_x ** 2 * DATA_VAR + gain_noise ** 2 * s2
                  + eta * (1 - c ** (2 * steps)) / (1 - c ** 2))


def estimator_gradients(model, args, groups=40, per_group=2000, seed=0, loss_fn=None):
    """The estimator's parameter gradient on `groups` independent batches of data -> (mean, standard
    error)."""
    torch.manual_seed(seed)
    grads = []
    for _ in range(groups):
        x0 = DATA_MEAN + math.sqrt(DATA_VAR) * torch.randn(per_group, 2, dtype=torch.float64)
        model.zero_grad()
        loss = loss_fn(x0) if loss_fn else dcd.dcd_loss(model, x0, args)[0]
        loss.backward()
        grads.append(torch.cat([model.net.m.grad, model.net.log_v.grad[None]]))
    grads = torch.stack(grads)
    return grads.mean(0), grads.std(0) / math.sqrt(groups)


def exact_posterior_loss(model, sigma_eff):
    """The estimator with exact posterior draws (closed-form Gaussian posterior), for comparison."""
    def loss(x0):
        m, v = model.net.m.detach(), model.net.log_v.detach().exp()
        y = x0 + sigma_eff * torch.randn_like(x0)
        precision = 1 / v + 1 / sigma_eff ** 2
        x_neg = (m / v + y / sigma_eff ** 2) / precision + precision.rsqrt() * torch.randn_like(x0)
        level = torch.zeros(len(x0), dtype=torch.long)
        return model.energy(x0, level).mean() - model.energy(x_neg, level).mean()
    return loss


def assert_within(estimate, standard_error, expected, n_se=4.0):
    """|estimate - expected| <= n_se standard errors, per component (4 SE: a 6e-5 two-sided
    false-alarm rate)."""
    assert ((estimate - expected).abs() <= n_se * standard_error).all(), (estimate, expected,
                                                                          standard_error)


# --------------------------------------------------------------------------------------------------
# the mathematics of the objective
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kernel", ["ve", "vp"])
def test_gradient_formula_is_the_gradient_of_the_closed_form_dcd(kernel):
    # E_data ∇E(x) - E ∇E(x̃ ~ exact posterior) equals ∇ [KL(p||p_θ) - KL(Qp||Qp_θ)] (log Z
    # cancels); VP at σ is VE at σ / sqrt(1 - σ²) because the posterior given y is the posterior
    # given y / a
    sigma = 0.5
    sigma_eff = sigma / math.sqrt(1 - sigma ** 2) if kernel == "vp" else sigma
    formula = (gradient_of_moments(DATA_MEAN, DATA_VAR)
               - gradient_of_moments(*posterior_moments(sigma_eff)))
    closed = analytic_gradient(lambda m, lv: closed_form_dcd(m, lv, kernel, sigma))
    assert torch.allclose(formula, closed, rtol=1e-10, atol=1e-12)
    assert closed.abs().min() > 0.03  # every component is informative at this θ


def test_small_sigma_is_score_matching_and_large_sigma_maximum_likelihood():
    def fisher(m, log_v):  # E_data ||∇log p_data - ∇log p_θ||², the score-matching objective
        v = log_v.exp()
        # difference of scores = slope x + offset
        slope, offset = 1 / v - 1 / DATA_VAR, -m / v + DATA_MEAN / DATA_VAR
        return (slope * DATA_MEAN + offset).pow(2).sum() + 2 * slope ** 2 * DATA_VAR

    half_fisher = analytic_gradient(fisher) / 2
    for sigma, tolerance in ((1e-2, 1e-3), (1e-3, 1e-5)):
        dcd = analytic_gradient(lambda m, lv: closed_form_dcd(m, lv, "ve", sigma))
        dcd_over_var = dcd / sigma ** 2
        assert torch.allclose(dcd_over_var, half_fisher, rtol=tolerance)
    assert not torch.allclose(analytic_gradient(lambda m, lv: closed_form_dcd(m, lv, "ve", 1.0)),
                              half_fisher, rtol=0.1)
    max_likelihood = analytic_gradient(lambda m,
                                       lv: kl_isotropic(DATA_MEAN, torch.tensor(DATA_VAR), m,
                                                        lv.exp()))
    large = analytic_gradient(lambda m, lv: closed_form_dcd(m, lv, "ve", 1e3))
    assert torch.allclose(large, max_likelihood, rtol=1e-5)


# --------------------------------------------------------------------------------------------------
# each estimator's mean gradient (tolerance: standard errors over independent batches)
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kernel", ["ve", "vp"])
def test_importance_and_exact_posterior_estimators_match_the_analytic_gradient(kernel):
    sigma = 0.5
    sigma_eff = sigma / math.sqrt(1 - sigma ** 2) if kernel == "vp" else sigma
    expected = analytic_gradient(lambda m, lv: closed_form_dcd(m, lv, kernel, sigma))
    model, args = gaussian_model(kernel, sigma, estimator="importance", num_proposals=64,
                                 importance_w=0.0)
    importance, importance_se = estimator_gradients(model, args)
    assert_within(importance, importance_se, expected)
    exact, exact_se = estimator_gradients(model, args,
                                          loss_fn=exact_posterior_loss(model, sigma_eff), seed=1)
    assert_within(exact, exact_se, expected)
    assert_within(importance, (importance_se ** 2 + exact_se ** 2).sqrt(), exact)
    # power: ignoring the importance weights (negatives = the proposals, y + σ ξ) is far off
    widened = gradient_of_moments(DATA_MEAN, DATA_VAR + 2 * sigma_eff ** 2)
    unweighted = gradient_of_moments(DATA_MEAN, DATA_VAR) - widened
    assert ((importance - unweighted).abs() > 10 * importance_se).any()


@pytest.mark.parametrize("kernel", ["ve", "vp"])
def test_w_stabilised_importance_has_the_exact_fixed_point_for_small_m(kernel):
    # at p_θ = p_data the analytic DCD gradient is 0; with w = 1 the positive and the M = 2
    # proposals form one importance-resampling step, which leaves the posterior invariant, so the
    # estimator's mean gradient is 0 too; without w (plain self-normalised weights) it is not
    for w in (1.0, 0.0):
        model, args = gaussian_model(kernel, 0.5, TRUTH, estimator="importance", num_proposals=2,
                                     importance_w=w)
        estimate, se = estimator_gradients(model, args)
        if w:
            assert_within(estimate, se, torch.zeros(3, dtype=torch.float64))
        else:
            assert (estimate.abs() > 10 * se).any(), (estimate, se)


def test_metropolis_chain_from_the_positive_has_the_exact_fixed_point():
    # at p_θ = p_data the positive is a draw of the posterior and MALA keeps it: zero mean gradient
    # for any K and step; the unadjusted chains' closed forms at the same θ and step are far from
    # 0 (from y: not a posterior draw; from the positive: the discretisation bias)
    sigma, steps, ratio = 0.5, 3, 1.0
    model, args = gaussian_model("ve", sigma, TRUTH, estimator="langevin", langevin_steps=steps,
                                 step_ratio=ratio, metropolis=True)
    estimate, se = estimator_gradients(model, args, groups=30)
    assert_within(estimate, se, torch.zeros(3, dtype=torch.float64))
    for start in ("y", "positive"):
        unadjusted = gradient_of_moments(DATA_MEAN, DATA_VAR, *TRUTH) - gradient_of_moments(
            *posterior_moments(sigma, steps, ratio, start, *TRUTH), *TRUTH)
        assert (unadjusted.abs() > 10 * se).any(), start
    acceptance = dcd.dcd_loss(model, DATA_MEAN + torch.randn(2000, 2, dtype=torch.float64),
                              args)[3]
    assert 0.3 < acceptance < 0.99  # the step is large enough for MH to reject


@pytest.mark.parametrize("estimator", ["langevin", "cd"])
def test_energy_penalty_gradient(estimator, monkeypatch):
    # α (mean E(pos)² + mean E(neg)²) adds α (2 mean E ∇E (pos) + 2 mean E ∇E (neg)); the negatives
    # are fixed here (the samplers patched) so that the two losses share them
    x0 = DATA_MEAN + torch.randn(64, 2, dtype=torch.float64)
    x_neg = torch.randn(64, 2, dtype=torch.float64)
    monkeypatch.setattr(dcd, "model_langevin", lambda *a, **k: x_neg)
    monkeypatch.setattr(dcd, "posterior_langevin", lambda *a, **k: (x_neg, x_neg, None))
    kernel = "cd" if estimator == "cd" else "ve"
    grads = []
    for alpha in (0.0, 0.3):
        model, args = gaussian_model(kernel, estimator="langevin", energy_reg=alpha)
        dcd.dcd_loss(model, x0, args)[0].backward()
        grads.append(torch.cat([model.net.m.grad, model.net.log_v.grad[None]]))
    m, v = torch.tensor(MODEL_MEAN, dtype=torch.float64), math.exp(MODEL_LOG_VAR)

    def mean_e_grad_e(x):  # mean E ∇E for E = ||x - m||² / (2v): ∇m E = -(x - m)/v, ∇log v E = -E
        e = (x - m).pow(2).sum(1) / (2 * v)
        return torch.cat([(e[:, None] * -(x - m) / v).mean(0), (-e * e).mean()[None]])
    expected = 0.3 * 2 * (mean_e_grad_e(x0) + mean_e_grad_e(x_neg))
    # DCD.energy returns float32 energies (the net's output cast back after autocast)
    assert torch.allclose(grads[1] - grads[0], expected, rtol=1e-6, atol=1e-9)


def test_2d_energy_penalty_default_is_each_methods_tuned_value():
    # dcd.py docstring item 11: CD 0.3 and DCD-Langevin 0.1 (without a penalty both diverged on the
    # checkerboard), importance none; images 1e-2 whatever the method; a given value is kept
    def alpha(**fields):
        return dcd.Args(**{"dataset": "checkerboard", **fields}).energy_reg
    assert alpha() == 0.0 and alpha(estimator="importance", kernel="vp") == 0.0
    assert alpha(kernel="cd") == 0.3 and alpha(kernel="cd", estimator="langevin") == 0.3
    assert alpha(estimator="langevin") == 0.1 and alpha(estimator="langevin", kernel="vp") == 0.1
    assert alpha(kernel="cd", energy_reg=0.0) == 0.0 and alpha(energy_reg=0.2) == 0.2
    assert alpha(dataset="mnist") == 0.01
    assert alpha(dataset="mnist", kernel="cd", task="denoise") == 0.01


@pytest.mark.slow
@pytest.mark.parametrize("kernel, steps, step_ratio, start",
                         [("ve", 1, 1.0, "y"), ("ve", 5, 0.5, "y"), ("ve", 5, 0.5, "positive"),
                          ("vp", 3, 0.3, "y"), ("vp", 3, 0.3, "positive"), ("ve", 600, 0.03, "y")])
def test_langevin_estimator_matches_its_closed_form(kernel, steps, step_ratio, start):
    # K unadjusted steps from y or from the positive: the expected gradient is that of the K-step
    # chain's Gaussian law; with many small steps it is the DCD gradient itself
    sigma = 0.5
    sigma_eff = sigma / math.sqrt(1 - sigma ** 2) if kernel == "vp" else sigma
    model, args = gaussian_model(kernel, sigma, estimator="langevin", langevin_steps=steps,
                                 step_ratio=step_ratio, chain_start=start)
    estimate, se = estimator_gradients(model, args, groups=30)
    expected = gradient_of_moments(DATA_MEAN, DATA_VAR) - \
        gradient_of_moments(*posterior_moments(sigma_eff, steps, step_ratio, start))
    assert_within(estimate, se, expected)
    if steps == 600:  # converged: c^K = 3e-5, ULA variance bias 0.9% of the posterior variance
        assert_within(estimate, se,
                      analytic_gradient(lambda m, lv: closed_form_dcd(m, lv, kernel, sigma)))


def test_cd_estimator_matches_its_closed_form():
    # CD: K unadjusted steps on p_θ = N(m, v) from data: x_K = m + c^K (x - m) + noise, c = 1 - η /
    # (2v)
    steps, eta = 5, 0.2
    model, args = gaussian_model("cd", langevin_steps=steps, cd_step_size=eta)
    estimate, se = estimator_gradients(model, args, groups=30)
    m, v = torch.tensor(MODEL_MEAN, dtype=torch.float64), math.exp(MODEL_LOG_VAR)
    c = 1 - eta / (2 * v)
    mean = m + c ** steps * (DATA_MEAN - m)
    var = c ** (2 * steps) * DATA_VAR + eta * (1 - c ** (2 * steps)) / (1 - c ** 2)
    assert_within(estimate, se, gradient_of_moments(DATA_MEAN, DATA_VAR)
                  - gradient_of_moments(mean, var))


# --------------------------------------------------------------------------------------------------
# ladder, samplers, denoiser
# --------------------------------------------------------------------------------------------------
def test_ladder_tables():
    vp = dcd.level_tables(dcd.Args(dataset="celeba", kernel="vp"))
    ve = dcd.level_tables(dcd.Args(dataset="celeba", kernel="ve"))
    logsnr = torch.log(vp["signal"] ** 2 / vp["noise"] ** 2)
    assert len(logsnr) == 7
    assert logsnr[0].item() == pytest.approx(9.8) and logsnr[-1].item() == pytest.approx(-5.1)
    assert torch.allclose(vp["signal"] ** 2 + vp["noise"] ** 2, torch.ones(7, dtype=torch.float64))
    assert torch.allclose(vp["kernel_a"] ** 2 + vp["kernel_b"] ** 2,
                          torch.ones(6, dtype=torch.float64))
    assert torch.allclose(vp["energy_scale"], vp["kernel_b"] ** -2)
    assert torch.allclose(vp["input_scale"], torch.ones(6, dtype=torch.float64))
    # VE levels are the VP levels divided by the signal scale
    assert torch.all(ve["signal"] == 1) and torch.allclose(ve["noise"], vp["noise"] / vp["signal"])
    assert torch.all(ve["kernel_a"] == 1)
    assert torch.allclose(ve["kernel_b"] ** 2, ve["noise"][1:] ** 2 - ve["noise"][:-1] ** 2)
    assert torch.allclose(ve["input_scale"], (1 + ve["noise"][:-1] ** 2).rsqrt())
    one = dcd.level_tables(dcd.Args(dataset="8gaussians", kernel="vp", sigma=0.6))
    assert one["kernel_a"].tolist() == pytest.approx([0.8])
    assert one["kernel_b"].tolist() == pytest.approx([0.6])
    assert one["energy_scale"].tolist() == [1.0]


class ZeroEnergy(nn.Module):
    def forward(self, x, level):
        return x.flatten(1).sum(1) * 0.0


@pytest.mark.parametrize("kernel", ["ve", "vp"])
def test_ladder_sampler_walks_down_every_level(kernel):
    # with E = 0 and step ratio 1, one posterior step is the exact draw x_t = x_{t+1} / a_t + (b_t /
    # a_t) ξ, so Var x_t = (Var x_{t+1} + b_t²) / a_t² from Var x_L = noise_L² + signal_L²; the
    # output is x_0 / signal_0
    args = dcd.Args(dataset="celeba", kernel=kernel, step_ratio=1.0, sample_langevin_steps=1,
                    num_levels=3)
    model = dcd.DCD(ZeroEnergy(), dcd.level_tables(args)).double()
    torch.manual_seed(0)
    args.image_channels, args.image_size = 1, 1  # one pixel: 40,000 scalar draws
    out = dcd.generate(model, 40_000, args, "cpu").double()
    var = model.noise[-1] ** 2 + model.signal[-1] ** 2
    for t in reversed(range(3)):
        var = (var + model.kernel_b[t] ** 2) / model.kernel_a[t] ** 2
    var = var / model.signal[0] ** 2
    # sample variance of 40,000 Gaussian draws: relative standard error sqrt(2 / n) = 0.7%
    assert out.var().item() == pytest.approx(var.item(), rel=4 * math.sqrt(2 / 40_000))


def test_denoiser_returns_the_posterior_mean():
    # quadratic energy: p(x | y) = N(μ(y), 1/P); MALA leaves it exactly invariant, so the last
    # state is an exact posterior draw (RMS error 1/sqrt(P)) and the average of the second half
    # estimates μ(y) without bias
    model, _ = gaussian_model()
    sigma = 0.5
    torch.manual_seed(0)
    clean = DATA_MEAN + math.sqrt(DATA_VAR) * torch.randn(4000, 2, dtype=torch.float64)
    y = clean + sigma * torch.randn_like(clean)
    mean, last, acceptance = dcd.denoise(model, y, sigma, n_steps=400, step_ratio=0.1)
    m, v = model.net.m.detach(), math.exp(MODEL_LOG_VAR)
    precision = 1 / v + 1 / sigma ** 2
    truth = (m / v + y / sigma ** 2) / precision
    # the signed mean error over 4,000 rows per coordinate has sd below 0.003; returning y would
    # be 0.1 off
    assert (mean - truth).mean(0).abs().max() < 0.01
    # RMS over 8,000 independent coordinates: relative standard error 0.8%
    assert (last - truth).pow(2).mean().sqrt().item() == pytest.approx(precision ** -0.5,
                                                                       rel=0.04)
    # 200 correlated draws average far below one draw's error
    assert (mean - truth).pow(2).mean().sqrt().item() < 0.3 * precision ** -0.5
    # the step adapted toward MALA's optimal acceptance
    assert 0.5 < acceptance.mean().item() < 0.75


def test_denoiser_of_a_sharp_posterior_adapts_its_step():
    # digits are sharp: in most pixels the posterior is far narrower than the noise σ. Prior N(0,
    # s²) per coordinate with s = σ / 6 in 784 dimensions: at the initial step 0.3 σ² the posterior
    # curvature times the step is 0.3 (1 + 36) = 11 > 4, where unadjusted Langevin diverges (the
    # denoiser before adaptation returned NaN here); MALA with the adapted step recovers the
    # closed-form posterior mean (shrinkage s² / (s² + σ²) = 1/37 of y)
    sigma, s = 0.3, 0.05

    class Prior(nn.Module):
        def forward(self, x, level):
            return x.pow(2).flatten(1).sum(1) / (2 * s ** 2)
    args = dcd.Args(dataset="mnist", task="denoise", sigma=sigma)
    model = dcd.DCD(Prior(), dcd.level_tables(args)).double()
    torch.manual_seed(0)
    clean = s * torch.randn(200, 1, 28, 28, dtype=torch.float64)
    y = clean + sigma * torch.randn_like(clean)
    mean, last, acceptance = dcd.denoise(model, y, sigma, n_steps=100, step_ratio=0.3)
    truth = y * s ** 2 / (s ** 2 + sigma ** 2)
    posterior_sd = s * sigma / math.sqrt(s ** 2 + sigma ** 2)
    assert torch.isfinite(mean).all() and torch.isfinite(last).all()
    # an exact posterior draw is posterior_sd off (the average of 50 correlated ones 0.62 of it
    # here); the noisy input y is 0.3 off
    assert (last - truth).pow(2).mean().sqrt().item() == pytest.approx(posterior_sd, rel=0.05)
    assert (mean - truth).pow(2).mean().sqrt().item() < 0.75 * posterior_sd
    assert 0.3 < acceptance.mean().item() < 0.75  # over all steps: the first ones mostly rejected


def test_training_chain_step_ratio_adapts_to_a_sharp_posterior():
    # --adapt-step-ratio: data and model N(μ, 0.0025 I), 100 times narrower than the kernel (σ²
    # = 0.25): at step ratio 0.3 the posterior's curvature times the step is 0.3 (1 + σ² / v) =
    # 30, almost every MALA proposal is rejected and the negatives stay at the positives; adapted
    # over the training chains, the ratio falls until the chain accepts about ADAPT_TARGET of its
    # moves (0.0242 here after 40 chains)
    model, args = gaussian_model(theta=(DATA_MEAN.tolist(), math.log(0.0025)),
                                 estimator="langevin", langevin_steps=4, step_ratio=0.3,
                                 metropolis=True, adapt_step_ratio=True)
    model.register_buffer("step_ratio", torch.full((1,), 0.3))
    torch.manual_seed(0)
    data = DATA_MEAN + 0.05 * torch.randn(256, 2, dtype=torch.float64)
    first = dcd.dcd_loss(model, data, args)[3].item()
    for _ in range(40):
        acceptance = dcd.dcd_loss(model, data, args)[3].item()
    assert first < 0.05 and model.step_ratio.item() < 0.05
    assert acceptance == pytest.approx(dcd.ADAPT_TARGET, abs=0.05)


def test_psnr_reference_values():
    clean = torch.zeros(2, 1, 4, 4)
    estimate = torch.stack([torch.full((1, 4, 4), 0.2), torch.full((1, 4, 4), 5.0)])
    # error 0.1 on the [0, 1] scale -> 20 dB; the second estimate is clamped to 1, error 0.5 -> 6.02
    # dB
    assert dcd.psnr(estimate, clean).tolist() == pytest.approx([20.0, 10 * math.log10(4)])


# --------------------------------------------------------------------------------------------------
# smoke runs, resume, failures
# --------------------------------------------------------------------------------------------------
def tiny_2d_args(run_dir, **overrides):
    fields = dict(dataset="8gaussians", run_dir=str(run_dir), device="cpu", steps=8, batch_size=32,
                  mlp_width=16,
                  log_every=2, sample_every=4, save_every=4, n_points=64, sample_langevin_steps=5)
    fields.update(overrides)
    return dcd.Args(**fields)


def tiny_image_args(run_dir, folder, **overrides):
    fields = dict(dataset=f"folder:{folder}", run_dir=str(run_dir), device="cpu", steps=6,
                  batch_size=8,
                  langevin_steps=2, num_levels=2, ebm_channels=8, ebm_channel_mult=(1, 2),
                  ebm_blocks=1, log_every=2, sample_every=3, save_every=3, n_grid=4)
    fields.update(overrides)
    return dcd.Args(**fields)


@pytest.mark.parametrize("overrides", [dict(kernel="ve", estimator="langevin"),
                                       dict(kernel="ve", estimator="langevin", metropolis=True,
                                            chain_start="y"),
                                       dict(kernel="vp", estimator="importance", sigma=0.5),
                                       dict(kernel="cd", langevin_steps=3)])
def test_smoke_2d_kernels_checkpoint_and_eval(tmp_path, overrides):
    run = tmp_path / "run"
    dcd.main(tiny_2d_args(run, **overrides))
    for name in ("ckpt.pt", "ckpt_00000004.pt", "metrics.jsonl", "density_samples_00000008.png"):
        assert (run / name).exists(), name
    records = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert records[-1]["step"] == 8
    assert ("ess_fraction" in records[-1]) == (overrides.get("estimator") == "importance")
    assert ("accept_rate" in records[-1]) == overrides.get("metropolis", False)
    ckpt = torch.load(run / "ckpt.pt", weights_only=True)
    assert ckpt["method"] == "dcd" and set(ckpt["ema"]) == set(ckpt["model"])
    results = eval_fid_ood.evaluate(eval_fid_ood.EvalArgs(ckpt=str(run / "ckpt.pt"), device="cpu",
                                                          n_test=500,
                                                           grid_resolution=100))
    assert results["method"] == "dcd" and math.isfinite(results["nll"])
    module, loaded_args, model = eval_fid_ood.load_method(ckpt, "cpu")
    assert module.sample(model, 5, loaded_args, "cpu").shape == (5, 2)


@pytest.mark.parametrize("toy", common.TOY_2D)
def test_every_toy_trains(tmp_path, toy):
    dcd.main(tiny_2d_args(tmp_path, dataset=toy, steps=3, sample_every=3, save_every=3))
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"] == 3


@pytest.mark.parametrize("overrides",
                         [dict(kernel="vp"),
                          dict(kernel="vp", metropolis=True),
                          dict(kernel="ve", metropolis=True, adapt_step_ratio=True),
                          dict(kernel="ve", estimator="importance", num_proposals=3)])
def test_smoke_tiny_images_ladder(tmp_path, image_folder, overrides):
    dcd.main(tiny_image_args(tmp_path / "run", image_folder, **overrides))
    ckpt = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)
    assert ckpt["args"]["image_size"] == 8 and ckpt["args"]["num_levels"] == 2
    assert (tmp_path / "run" / "samples_00000006.png").exists()
    module, loaded_args, model = eval_fid_ood.load_method(ckpt, "cpu")
    out = module.sample(model, 3, loaded_args, "cpu")
    assert out.shape == (3, 3, 8, 8) and out.abs().max() <= 1
    assert module.energy(model, out, loaded_args).shape == (3,)
    if overrides.get("adapt_step_ratio"):  # a buffer of the model, copied into the EMA
        assert torch.equal(ckpt["model"]["step_ratio"], ckpt["ema"]["step_ratio"])
        assert not torch.equal(ckpt["model"]["step_ratio"], torch.full((2,), 0.2))


@pytest.mark.parametrize("overrides", [dict(kernel="ve"), dict(kernel="cd"),
                                       dict(kernel="ve", metropolis=True, adapt_step_ratio=True)])
def test_smoke_denoise_task_logs_psnr(tmp_path, image_folder, overrides):
    run = tmp_path / "run"
    dcd.main(tiny_image_args(run, image_folder, task="denoise", num_levels=None, holdout=10,
                             denoise_steps=4, sample_langevin_steps=3, **overrides))
    records = [json.loads(line) for line in open(run / "metrics.jsonl")]
    scored = [r for r in records if "psnr_mean" in r]
    assert [r["step"] for r in scored] == [3, 6]
    assert all(math.isfinite(r["psnr_mean"]) and r["psnr_noisy"] > 0 for r in scored)
    assert all(0 <= r["denoise_accept"] <= 1 for r in scored)
    assert ("step_ratio_min" in records[-1]) == overrides.get("adapt_step_ratio", False)
    assert (run / "denoise_00000006.png").exists()


@pytest.mark.parametrize("argv, message", [
    (("--task", "denoise"), "--task denoise needs an image dataset"),
    (("--kernel", "vp", "--sigma", "1.5"),
     "--sigma must be positive (and below 1 for --kernel vp)"),
    (("--dataset", "celeba", "--kernel", "cd"), "--kernel cd is the one-level baseline"),
    (("--estimator", "langevin", "--adapt-step-ratio"), "--adapt-step-ratio adapts the posterior"),
    (("--num-levels", "3"), "2D toys train a time-independent EBM"),
    (("--dataset", "mnist", "--task", "denoise", "--num-levels", "3"),
     "--task denoise trains a one-level"),
    (("--dataset", "mnist", "--task", "denoise", "--denoise-sigma", "0"),
     "--denoise-sigma must be positive"),
    (("--step-ratio", "0",), "--step-ratio and --cd-step-size must be positive"),
    (("--logsnr-min", "10"), "--logsnr-min must be below --logsnr-max"),
    (("--dataset", "mnist", "--data-dir", "/nonexistent/nodata", "--device", "cpu"),
     "mnist data not found"),
])
def test_cli_bad_input_is_one_line(tmp_path, capsys, argv, message):
    code, err = run_command_line("dcd", [*argv, "--run-dir", str(tmp_path / "run")], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0]
