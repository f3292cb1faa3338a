"""DA-EBM (pcd_diffusion_ebm.py): schedule, sampler and loss mathematics, smoke runs, resume,
failures."""
import dataclasses
import json
import math

import pytest
import torch
import torch.nn as nn

import pcd_diffusion_ebm as daebm
from conftest import run_command_line


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------
def tiny_2d_args(run_dir, **overrides):
    fields = dict(dataset="rings", run_dir=str(run_dir), device="cpu", steps=20, batch_size=32,
                  n_chains=64,
                  langevin_steps=3, mlp_width=16, log_every=5, sample_every=10, save_every=10,
                  mh_start=5,
                  adapt_every=5, warmup_steps=5, long_run_steps=5, visits_to_keep=1,
                  sample_chains=16, n_grid=8)
    fields.update(overrides)
    return daebm.Args(**fields)


def tiny_image_args(run_dir, folder, **overrides):
    fields = dict(dataset=f"folder:{folder}", run_dir=str(run_dir), device="cpu", steps=6,
                  batch_size=8,
                  n_chains=16, num_levels=3, langevin_steps=2, channels=8, channel_mult=(1, 2),
                  log_every=2,
                  sample_every=3, save_every=3, mh_start=2, adapt_every=2, warmup_steps=2,
                  long_run_steps=3, visits_to_keep=1, sample_chains=4, n_grid=4)
    fields.update(overrides)
    return daebm.Args(**fields)


class QuadraticNet(nn.Module):
    """f(x, t) = -(x - mean)ᵀ P (x - mean) / 2 at every level: a Gaussian target N(mean, P⁻¹)."""

    def __init__(self, mean, precision):
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("precision", precision)

    def level_table(self):
        return []

    def forward(self, x, t, table=None):
        d = x - self.mean
        return -0.5 * ((d @ self.precision) * d).sum(1)


class LinearLevelNet(nn.Module):
    """f(x, t) = c_t · x: a net whose Gibbs conditional over t is a known softmax."""

    def __init__(self, coefs):
        super().__init__()
        self.coefs = nn.Parameter(coefs)

    def level_table(self):
        return [self.coefs]

    def features(self, x):
        return (x,)

    def forward(self, x, t, table=None):
        return self.from_features(self.features(x), t, table)

    def from_features(self, features, t, table=None):
        coefs = (self.level_table() if table is None else table)[0]
        return daebm.per_level(torch.mul, features[0], coefs[t]).sum(1)


def gaussian_model(step, mean, cov):
    model = daebm.DAEBM(QuadraticNet(mean, torch.linalg.inv(cov)), 1, 1e-2, 3e-1,
                        torch.full((2,), step))
    return model


# --------------------------------------------------------------------------------------------------
# schedule
# --------------------------------------------------------------------------------------------------
def test_schedule_constants_2d():
    betas, sqrt_ab = daebm.sqrtcumlinear_schedule(6, 1e-2, 3e-1)
    expected = [1.0, 0.9999, 0.997, 0.976, 0.900, 0.699, 0.257]  # ../shared/methods/daebm.md
    assert torch.allclose(sqrt_ab, torch.tensor(expected, dtype=torch.float64), atol=6e-4)
    assert betas[0] == 0
    assert torch.allclose(betas[1:],
                          torch.cumsum(torch.linspace(1e-2, 3e-1, 6, dtype=torch.float64), 0) ** 2)


def test_schedule_constants_images():
    betas, sqrt_ab = daebm.sqrtcumlinear_schedule(50, 2e-4, 2e-2)
    assert len(sqrt_ab) == 51 and sqrt_ab[0] == 1
    assert abs(sqrt_ab[-1].item() - 0.234) < 1e-3  # the top level is not pure noise
    assert torch.all(sqrt_ab[1:] < sqrt_ab[:-1])


def test_warmup_scales_with_the_run_length():
    # the paper's warm-up at its run length, in proportion to --steps; the MH start and the
    # step-size adaptation interval stay the paper's (scaled, short runs diverged: docstring
    # item 4); given values are kept, and so are a checkpoint's (they are set then)
    fields = ("mh_start", "adapt_every", "warmup_steps")
    quick = daebm.Args()
    assert quick.steps == 20_000 and [getattr(quick, f) for f in fields] == [500, 500, 100]
    paper = daebm.Args(steps=100_000)
    assert [getattr(paper, f) for f in fields] == [500, 500, 500]
    images = daebm.Args(dataset="mnist")
    assert images.steps == 120_000 and [getattr(images, f) for f in fields] == [6000, 100, 6000]
    short = daebm.Args(dataset="mnist", steps=12_000)
    assert [getattr(short, f) for f in fields] == [6000, 100, 600]
    given = daebm.Args(steps=1000, warmup_steps=7, mh_start=3)
    assert (given.warmup_steps, given.mh_start) == (7, 3)
    assert daebm.Args(steps=10).warmup_steps == 1  # never 0
    saved = {f.name: getattr(quick, f.name) for f in dataclasses.fields(quick)}
    assert daebm.Args(**dict(saved, steps=40_000)).warmup_steps == 100  # a longer resume keeps it


def test_initial_step_sizes():
    args = daebm.Args(dataset="rings")
    betas, _ = daebm.sqrtcumlinear_schedule(6, 1e-2, 3e-1)
    sizes = daebm.initial_step_sizes(args, betas)
    assert torch.allclose(sizes[1:], 0.1 * betas[1:].sqrt()) and sizes[0] == sizes[1]
    image_args = daebm.Args(dataset="mnist")
    assert torch.all(daebm.initial_step_sizes(image_args, torch.zeros(51)) == 0.1)


def test_diffuse_moments():
    model = daebm.build_model(tiny_2d_args("unused"))
    x0 = torch.tensor([[1.5, -2.0]]).repeat(200_000, 1)
    t = torch.full((200_000,), 5, dtype=torch.long)
    xt = daebm.diffuse(model, x0, t, torch.randn_like(x0))
    a, s = model.sqrt_alpha_bar[5], model.sqrt_one_minus_alpha_bar[5]
    assert torch.allclose(xt.mean(0), a * x0[0], atol=4 * s / math.sqrt(200_000) * 1.5)
    assert torch.allclose(xt.var(0), (s ** 2).expand(2), rtol=0.02)
    clean = daebm.diffuse(model, x0[:3], torch.zeros(3, dtype=torch.long), torch.randn(3, 2))
    assert torch.equal(clean, x0[:3])


def test_lr_schedule():
    args = daebm.Args(dataset="mnist")  # 120k steps, warm-up 6k, linear decay from 72k
    assert daebm.lr_factor(0, args) == pytest.approx(1 / 6000)
    assert daebm.lr_factor(5999, args) == pytest.approx(1.0)
    assert daebm.lr_factor(71_999, args) == 1.0
    assert daebm.lr_factor(96_000, args) == pytest.approx(0.5, abs=1e-4)
    toy = daebm.Args(dataset="rings", steps=1000)
    factors = [daebm.lr_factor(s, toy) for s in (600, 700, 800, 900)]
    assert factors == pytest.approx([1, 0.1, 0.01, 0.001])


# --------------------------------------------------------------------------------------------------
# sampler
# --------------------------------------------------------------------------------------------------
MEAN = torch.tensor([1.0, -2.0])
COV = torch.tensor([[1.0, 0.5], [0.5, 0.5]])


def run_chains(model, metropolis, official=False, n=4000, steps=300, seed=0):
    torch.manual_seed(seed)
    x0 = torch.randn(n, 2)
    t = torch.zeros(n, dtype=torch.long)
    stats = (torch.zeros(2), torch.zeros(2))
    x = daebm.langevin(model, x0, t, steps, metropolis, official_ratio=official, stats=stats)
    return x, (stats[0] / stats[1])[0].item()


def ula_stationary_cov(step, cov):
    """Unadjusted Langevin on a Gaussian: C = A C Aᵀ + s² I, A = I - (s²/2) P, solved by
    vectorisation."""
    a = torch.eye(2, dtype=torch.float64) - step ** 2 / 2 * torch.linalg.inv(cov.double())
    lhs = torch.eye(4, dtype=torch.float64) - torch.kron(a, a)
    rhs = (step ** 2 * torch.eye(2, dtype=torch.float64)).reshape(4)
    return torch.linalg.solve(lhs, rhs).reshape(2, 2)


def cov_standard_errors(cov, n):
    var = torch.diagonal(cov)
    return torch.sqrt((var[:, None] * var[None, :] + cov ** 2) / n)


def test_mala_samples_gaussian_where_ula_is_biased():
    step = 0.8
    model = gaussian_model(step, MEAN, COV)
    x, accept = run_chains(model, metropolis=True)
    n = len(x)
    se_mean = torch.sqrt(torch.diagonal(COV) / n)
    assert torch.all((x.mean(0) - MEAN).abs() < 4 * se_mean)
    se_cov = cov_standard_errors(COV, n)
    assert torch.all((torch.cov(x.T) - COV).abs() < 4 * se_cov), torch.cov(x.T)
    assert 0.3 < accept < 0.95
    # the same step without the MH correction lands on the analytically biased covariance instead
    biased = ula_stationary_cov(step, COV).float()
    assert torch.all((biased - COV).abs()[0, 0] > 10 * se_cov[0, 0])
    x_ula, _ = run_chains(model, metropolis=False)
    assert torch.all((torch.cov(x_ula.T) - biased).abs() < 4 * cov_standard_errors(biased, n))


def test_official_mh_ratio_differs_from_correct():
    step = 0.3  # s/2 = 0.15 against the official s²/2 = 0.045 (the two agree only at s = 1)
    model = gaussian_model(step, MEAN, COV)
    x_correct, acc_correct = run_chains(model, metropolis=True, seed=3)
    x_official, acc_official = run_chains(model, metropolis=True, official=True, seed=3)
    assert not torch.equal(x_correct, x_official)
    assert abs(acc_correct - acc_official) > 0.02
    # its ratio is not the MH ratio of its proposal: the chain does not target N(MEAN, COV)
    n = len(x_official)
    err_official = ((torch.cov(x_official.T) - COV).abs() / cov_standard_errors(COV, n)).max()
    assert err_official > 8
    err_correct = ((torch.cov(x_correct.T) - COV).abs() / cov_standard_errors(COV, n)).max()
    assert err_correct < 4


def test_step_size_buffer_is_used_per_level():
    model = gaussian_model(0.8, MEAN, COV)
    model.step_size[1] = 0.0  # level 1 frozen: its chains must not move
    x0 = torch.randn(10, 2)
    t = torch.tensor([0, 1] * 5)
    x = daebm.langevin(model, x0, t, 5, metropolis=True)
    assert torch.equal(x[t == 1], x0[t == 1]) and not torch.equal(x[t == 0], x0[t == 0])


def test_gibbs_draw_matches_brute_force_softmax():
    coefs = torch.tensor([[0.0, 0.0], [0.5, -0.3], [1.0, 0.2], [-0.4, 0.9]])
    model = daebm.DAEBM(LinearLevelNet(coefs), 3, 1e-2, 3e-1, torch.full((4,), 0.1))
    x = torch.tensor([[0.7, 1.1]])
    brute = torch.softmax(torch.stack([model.net(x, torch.tensor([t]))[0] for t in range(4)]), 0)
    n = 40_000
    draws = daebm.gibbs_level(model, x.repeat(n, 1))
    freq = torch.bincount(draws, minlength=4).float() / n
    se = torch.sqrt(brute * (1 - brute) / n)
    assert torch.all((freq - brute).abs() < 4 * se), (freq, brute)
    assert brute.min() > 0.05  # the test is not degenerate


def test_softplus_is_torchs_softplus():
    x = torch.cat([torch.linspace(-100, 100, 20001), torch.tensor([0.0, 20.0, 20.0001])])
    x.requires_grad_(True)
    value = daebm.softplus(x)
    (grad,) = torch.autograd.grad(value.sum(), x)
    reference = torch.nn.functional.softplus(x.detach())
    assert torch.all((value - reference).abs() <= 1e-6 * reference.clamp_min(1))
    assert torch.allclose(grad, torch.sigmoid(x.detach()), rtol=1e-6, atol=1e-7)
    assert torch.isfinite(grad).all()


def test_all_levels_logits_match_per_level_calls(image_folder):
    for args in (tiny_2d_args("unused"),
                 tiny_image_args("unused", image_folder, image_channels=3, image_size=8)):
        model = daebm.build_model(args)
        x = torch.randn((5,) + daebm.sample_shape(args))
        # 2 levels per pass: the chunking is exercised
        batched = model.all_levels_logits(x, max_rows=10)
        levels = range(args.num_levels + 1)
        looped = torch.stack([model.net(x, torch.full((5,), t)) for t in levels], 1)
        assert torch.allclose(batched, looped, atol=1e-5)


def test_mgms_sampler_keeps_chains_at_their_mth_visit():
    # a model whose Gibbs draw always returns t = 0 (level 0 has all the mass): a chain visits t = 0
    # on every transition, so it is kept after exactly M transitions of K steps
    coefs = torch.zeros(3, 2)
    model = daebm.DAEBM(LinearLevelNet(coefs), 2, 1e-2, 3e-1, torch.full((3,), 0.1))
    logits = torch.tensor([0.0, -1e9, -1e9])
    model.all_levels_logits = lambda x, table=None: logits.expand(len(x), 3)
    args = tiny_2d_args("unused", num_levels=2, visits_to_keep=3, langevin_steps=4, sample_chains=5)
    samples, steps = daebm.generate(model, 12, args, "cpu")
    assert samples.shape == (12, 2) and torch.all(steps == 12)


def test_mgms_chains_persist_across_calls_until_the_weights_change():
    # every chain visits t = 0 on every transition (as above) and is kept at its 3rd visit
    model = daebm.DAEBM(LinearLevelNet(torch.zeros(3, 2)), 2, 1e-2, 3e-1, torch.full((3,), 0.1))
    logits = torch.tensor([0.0, -1e9, -1e9])
    model.all_levels_logits = lambda x: logits.expand(len(x), 3)
    args = tiny_2d_args("unused", num_levels=2, visits_to_keep=3, langevin_steps=4, sample_chains=5)
    samples, _ = daebm.generate(model, 5, args, "cpu", max_transitions=2)
    assert len(samples) == 0  # two visits each so far
    samples, steps = daebm.generate(model, 5, args, "cpu", max_transitions=1)
    assert len(samples) == 5 and torch.all(steps == 12)  # the chains went on where they were
    daebm.generate(model, 5, args, "cpu", max_transitions=2)
    with torch.no_grad():
        model.net.coefs.add_(0.0)  # any in-place change of the weights starts a fresh pool
    samples, _ = daebm.generate(model, 5, args, "cpu", max_transitions=1)
    assert len(samples) == 0


# --------------------------------------------------------------------------------------------------
# loss
# --------------------------------------------------------------------------------------------------
def test_loss_gradient_closed_form():
    """U(x, t) = a_t |x|²/2: dL/da_k = Σ_{i: t_i = k} |x_i|²/(2B) - Σ_{j: s_j = k} |y_j|²/(2B)."""

    class ScaledNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Parameter(torch.tensor([0.5, 1.0, 2.0]))

        def level_table(self):
            return [self.a]

        def forward(self, x, t, table=None):
            return -0.5 * self.a[t] * x.pow(2).sum(1)

    model = daebm.DAEBM(ScaledNorm(), 2, 1e-2, 3e-1, torch.full((3,), 0.1))
    x_pos, y_neg = torch.randn(64, 2), 2 * torch.randn(64, 2)
    t_pos, t_neg = torch.randint(0, 3, (64,)), torch.randint(0, 3, (64,))
    loss, _, _ = daebm.daebm_loss(model, x_pos, t_pos, y_neg, t_neg)
    loss.backward()
    expected = torch.stack([(x_pos[t_pos == k].pow(2).sum() - y_neg[t_neg == k].pow(2).sum()) / 128
                            for k in range(3)])
    assert torch.allclose(model.net.a.grad, expected, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# networks and public API
# --------------------------------------------------------------------------------------------------
def test_mnist_network_size():
    model = daebm.build_model(daebm.Args(dataset="mnist"))
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == 4_756_864  # "about 4.8M" in the spec; counted by hand in the README
    x = torch.randn(2, 1, 28, 28)
    assert model.energy(x, torch.tensor([0, 50])).shape == (2,)


def test_level_table_equals_per_row_embedding():
    # the net computes t-only terms once per level; per-row computation must give the same function
    model = daebm.build_model(tiny_2d_args("unused"))
    net = model.net
    x, t = torch.randn(7, 2), torch.arange(7)
    time_features = daebm.sinusoidal_embedding(t, net.width)
    temb_act = torch.nn.functional.softplus(net.temb_dense(time_features))
    h = torch.nn.functional.softplus(net.lin1(x) * net.gate1(temb_act))
    h = torch.nn.functional.softplus(net.lin2(h)) * net.gate2(temb_act)
    h = torch.nn.functional.softplus(net.lin3(h)) * net.gate3(temb_act)
    assert torch.allclose(net(x, t), net.out(h).squeeze(1), atol=1e-6)


# --------------------------------------------------------------------------------------------------
# after training: the MGMS sampler is bounded by the run's length and can be skipped
# --------------------------------------------------------------------------------------------------
def count_transitions(monkeypatch):
    calls = {"n": 0}
    original = daebm.mgms_transition

    def counted(*args, **kwargs):
        calls["n"] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(daebm, "mgms_transition", counted)
    return calls


def test_final_samples_cost_at_most_the_run(tmp_path, image_folder, monkeypatch, capsys):
    # the paper's M = 50 visits cannot be reached in 20 transitions: the run ends with a warning,
    # not a sampler that runs for 100,000 transitions
    calls = count_transitions(monkeypatch)
    daebm.main(tiny_2d_args(tmp_path / "run", steps=20, visits_to_keep=50, long_run_steps=0))
    assert calls["n"] == 20 + 20
    assert "kept 0 of 16 chains within 20 transitions" in capsys.readouterr().err
    calls["n"] = 0
    daebm.main(tiny_2d_args(tmp_path / "skip", steps=20, final_samples=False, long_run_steps=0))
    assert calls["n"] == 20 and not (tmp_path / "skip" / "samples_mgms.png").exists()


def test_final_samples_use_the_configured_sampler(tmp_path, image_folder, monkeypatch):
    # --sampler annealed (the CPU preset's): the final picture comes from the annealed sweep,
    # no MGMS transition is made after training
    calls = count_transitions(monkeypatch)
    daebm.main(tiny_image_args(tmp_path / "run", image_folder, steps=4, sampler="annealed",
                               long_run_steps=0))
    assert calls["n"] == 4
    assert (tmp_path / "run" / "samples_annealed.png").exists()
    assert not (tmp_path / "run" / "samples_mgms.png").exists()


def test_long_run_check_costs_at_most_the_runs_langevin_steps(tmp_path, capsys):
    # the image preset's 100,000 MALA steps after a 4-step run with K = 3: 12 steps
    daebm.main(tiny_2d_args(tmp_path, steps=4, long_run_steps=100_000, final_samples=False))
    assert "shortened to 12 MALA steps" in capsys.readouterr().out
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["long_run_mala_steps"] for r in records if "long_run_mala_steps" in r] == [10, 12]
    # after training nothing is timed: no it/s of 0 among the training speeds
    assert all("it_per_s" not in r for r in records if "long_run_mala_steps" in r)


def test_long_phases_print_progress(tmp_path, monkeypatch, capsys):
    # every clock reading 40 s after the last: each progress line is due
    monkeypatch.setattr(daebm.common.time, "time", iter(range(0, 10**6, 40)).__next__)
    daebm.main(tiny_2d_args(tmp_path, steps=10, langevin_steps=100, long_run_steps=1000,
                            visits_to_keep=2))
    out = capsys.readouterr().out
    assert "MGMS sampler, chains kept of 16:" in out
    assert "long-run MALA steps: 100/1000" in out and "long-run MALA steps: 1000/1000" in out
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    after = [r for r in records if "post_sampling_mean_langevin_steps" in r]
    assert len(after) == 1 and "it_per_s" not in after[0]


def test_long_run_in_pieces_is_one_mala_run():
    model = daebm.build_model(tiny_2d_args("unused"))
    x0 = torch.randn(16, 2)
    torch.manual_seed(3)
    records, pieces = daebm.long_run(model, x0, 1500, [10, 100, 1000, 1500])
    torch.manual_seed(3)
    whole = daebm.langevin(model, x0, torch.zeros(16, dtype=torch.long), 1500, metropolis=True)
    assert torch.equal(pieces, whole)
    assert [r["mala_steps"] for r in records] == [10, 100, 1000, 1500]


def test_cpu_preset_schedule_follows_the_papers_at_every_fifth_level():
    # --preset cpu: T = 10 levels standing for the paper's 50; level t plays the paper's level 5t
    _, paper = daebm.sqrtcumlinear_schedule(50, 2e-4, 2e-2)
    cpu = daebm.Args(dataset="mnist", preset="cpu")
    _, ours = daebm.sqrtcumlinear_schedule(cpu.num_levels, cpu.beta_start, cpu.beta_end)
    assert cpu.num_levels == 10
    assert (ours - paper[::5]).abs().max().item() < 0.071
    assert ours[-1].item() == pytest.approx(paper[-1].item(), abs=0.035)  # the top: 0.265, 0.234


def test_bf16_blocks_stay_bf16_with_the_level_table():
    """--amp bf16 with the level table computed outside autocast (as the Langevin loop does): every
    convolution after the input one sees bf16 activations (the fp32 table used to promote block 0
    back to fp32, issue 32 item 6)."""
    args = daebm.Args(dataset="mnist", preset="cpu", amp="bf16")
    model = daebm.build_model(args)
    seen = {}
    for name, module in model.net.named_modules():
        if isinstance(module, nn.Conv2d):
            module.register_forward_hook(
                lambda module, inputs, output, name=name: seen.update({name: inputs[0].dtype}))
    t = torch.arange(4)
    with torch.no_grad():
        table = model.net.level_table()
        out = model.energy(torch.randn(4, 1, 28, 28), t, table)
    assert out.dtype == torch.float32 and seen.pop("conv_in") == torch.float32
    assert len(seen) >= 5 and set(seen.values()) == {torch.bfloat16}


@pytest.mark.parametrize("argv, message", [
    (("--init-step-size", "0"), "--init-step-size must be positive, got 0.0"),
    (("--n-chains", "10"), "--n-chains 10 is smaller than --batch-size 100"),
])
def test_cli_bad_input_is_one_line(tmp_path, capsys, argv, message):
    code, err = run_command_line("daebm", [*argv, "--run-dir", str(tmp_path / "run")], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0]
