"""benchmarks/bench.py: the FLOP counter against closed forms, and one command end to end."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import bench  # noqa: E402


def test_flop_counter_matches_closed_forms_through_an_input_gradient():
    # the samplers' pattern: forward, then torch.autograd.grad with respect to the input
    b, d_in, d_out = 8, 64, 32
    weight, x = torch.randn(d_out, d_in), torch.randn(b, d_in, requires_grad=True)
    image = torch.randn(2, 3, 16, 16, requires_grad=True)
    kernel = torch.randn(5, 3, 3, 3)
    with bench.CountFlops() as counter:
        (grad,) = torch.autograd.grad(F.linear(x, weight).sum(), x)
    # forward b x d_in x d_out multiply-adds, input gradient the same again; 2 FLOPs each
    assert counter.total == 2 * (2 * b * d_in * d_out)
    with bench.CountFlops() as counter:
        (grad,) = torch.autograd.grad(F.conv2d(image, kernel, padding=1).sum(), image)
    per_pass = 2 * 2 * 16 * 16 * 5 * 3 * 3 * 3  # outputs x input channels x kernel taps, 2 FLOPs
    assert counter.total == 2 * per_pass and grad.shape == image.shape


def test_paper_iteration_flops_scale_with_the_batch():
    # counted on the meta device: twice the batch is twice the FLOPs (DCD CelebA, 15 Langevin steps)
    args = bench.method_args("dcd", "paper")
    half = bench.method_args("dcd", "paper")
    half.batch_size = args.batch_size // 2
    assert bench.count_flops("dcd", args) == 2 * bench.count_flops("dcd", half)


@pytest.mark.slow
def test_one_command_writes_the_table_and_json(tmp_path):
    out = tmp_path / "bench.json"
    script = os.path.join(ROOT, "benchmarks", "bench.py")
    argv = ["--device", "cpu", "--methods", "dcd", "--configs", "2d", "--variants", "eager fp32",
            "--seconds", "0.2", "--out", str(out)]
    proc = subprocess.run([sys.executable, script, *argv], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.load(open(out))
    (row,) = result["rows"]
    assert row["method"] == "dcd" and row["config"] == "2d" and row["it_per_s"] > 0
    achieved = row["flops_per_iteration"] * row["it_per_s"]
    assert row["floor_fraction"] == pytest.approx(achieved / (result["matmul_tflops_fp32"] * 1e12))
    assert row["sampler_unit"] == "samples/s" and "TFLOP/it" in proc.stdout
    assert row["minutes_for_50k_samples"] == pytest.approx(50_000 / row["sampler"] / 60)


def test_pass_recorder_counts_each_kind_of_pass():
    net = torch.nn.Linear(4, 1)
    x = torch.randn(5, 4)
    with bench.RecordPasses([net]) as recorder:
        for _ in range(3):  # a sampler: forward, then the input gradient
            x_var = x.clone().requires_grad_(True)
            torch.autograd.grad(net(x_var).sum(), x_var)
        net(x).sum().backward()  # a loss
        with torch.no_grad():
            net(torch.randn(7, 4))  # an evaluation at another batch size
    assert recorder.counts == {(0, ((5, 4),), "input-grad", True): 3,
                               (0, ((5, 4),), "param-grad", True): 1,
                               (0, ((7, 4),), "none", True): 1}
    for key, inputs in recorder.inputs.items():
        bench.isolated_pass(net, inputs, key[2])()  # each replays


def test_a_failing_row_is_recorded_and_the_others_go_on(tmp_path, monkeypatch, capsys):
    """One row that fails (e.g. no C compiler for --compile on the GPU host) is a row with its
    error, printed as it happens; the rows after it still run and every row is in the JSON as it
    finishes (issue 32, item 4)."""
    def measure(method, config, variant, device, rates, min_seconds):
        if variant == "compiled fp32":
            raise RuntimeError("no working C++ compiler found")
        return {"method": method, "config": config, "variant": variant, "dataset": "x",
                "batch": 1, "flops_per_iteration": 1e9, "timed": "stub"}
    monkeypatch.setattr(bench, "measure", measure)
    monkeypatch.setattr(bench, "matmul_rate", lambda device, dtype: 1e12)
    # main() sets it for its own process; this test's process gets it back
    monkeypatch.setattr(torch._dynamo.config, "fail_on_recompile_limit_hit", False)
    monkeypatch.setattr(torch._dynamo, "reset", lambda: None)
    out = tmp_path / "bench.json"
    bench.main(["--device", "cpu", "--methods", "dcd", "--configs", "2d", "--variants",
                "eager fp32", "compiled fp32", "eager bf16", "--out", str(out)])
    rows = json.load(open(out))["rows"]
    assert [row["variant"] for row in rows] == ["eager fp32", "compiled fp32", "eager bf16"]
    assert rows[1]["error"] == "RuntimeError: no working C++ compiler found"
    assert "error" not in rows[0] and "error" not in rows[2]
    printed = capsys.readouterr().out
    assert printed.count("failed: RuntimeError: no working C++ compiler found") == 2  # row, table


@pytest.mark.slow
@pytest.mark.xdist_group("compile")
def test_gpu_check_runs_every_check_on_a_cpu(tmp_path):
    """benchmarks/gpu_check.py --device cpu --tiny (one method here, for the suite's time): every
    check runs and passes, each result is in the JSON (issue 30)."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import gpu_check

    out = tmp_path / "check.json"
    code = gpu_check.main(["--device", "cpu", "--tiny", "--methods", "dcd", "--seconds", "0.2",
                           "--fid-samples", "40", "--out", str(out)])
    result = json.load(open(out))
    assert code == 0 and result["tiny"] and result["device"] == "cpu"
    assert [row["variant"] for row in result["speed"]] == gpu_check.SPEED_VARIANTS
    assert all(row["it_per_s"] > 0 and "error" not in row for row in result["speed"])
    assert result["syncs"] == [{"method": "dcd", "ok": True, "host_reads": []}]
    (run,) = result["torchrun"]
    assert run["ok"] and run["method"] == "dcd"
    assert result["fid"]["ok"] and result["fid"]["seconds"] > 0 and result["fid"]["fid"] > 0


def test_peak_bytes_counts_live_storages_once():
    # 100 x 20 float32 outputs are 8,000 bytes each; a view adds no storage, a deleted tensor
    # gives its bytes back
    x, w = torch.randn(100, 50, device="meta"), torch.randn(50, 20, device="meta")
    with bench.PeakBytes() as counter:
        y = x @ w
        z = y.relu()
        del y
        u = z * 2
        u.view(-1)
    assert counter.peak == 16_000 and counter.live == 16_000
    # DCD's CelebA iteration (batch 128, 15 posterior Langevin steps): 1.82 GiB counted
    # (2026-12-04), 8.99M parameters
    counted = bench.peak_bytes("dcd", bench.method_args("dcd", "paper"))
    assert 1.0 < counted["activations_gib"] < 3.0
    assert counted["parameters_gib"] == pytest.approx(8.99e6 * 4 / 2 ** 30, rel=0.01)
