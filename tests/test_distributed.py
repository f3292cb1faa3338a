"""torchrun: several processes with the gloo backend on the CPU (2 ranks, started as torchrun
starts them). The averaged gradient of one step equals the single-process one on the same global
batch; the ranks' parameters stay identical; DA-EBM's chains are sharded and gathered back in order;
each script trains under 2 processes and resumes exactly; a checkpoint of 2 processes resumes in 1
(DA-EBM, whose chains are re-split); a SIGTERM that reaches one rank stops both at the same step
with a checkpoint; the command line under torchrun itself."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import (METHODS, ROOT, SCRIPTS, as_argv, assert_same_state, distributed_case,
                      free_port, launch_ranks, one_training_step, start_ranks, tiny_fields)

import common

pytestmark = pytest.mark.slow  # each test starts processes (seconds each)


def load(path):
    return torch.load(path, weights_only=True)


@pytest.fixture(scope="module")
def worker_out(tmp_path_factory):
    """tests/distributed_worker.py run once in 2 processes."""
    out = tmp_path_factory.mktemp("ranks")
    for proc in launch_ranks([os.path.join(ROOT, "tests", "distributed_worker.py"), str(out)]):
        assert proc.returncode == 0, proc.stderr
    return out


def single_process_reference(method):
    """What rank r does, done here for r = 0, 1 in turn from the same start: the mean of the two
    shard gradients (each loss is a mean over its shard, so this is the gradient of the global
    batch's loss with the ranks' noise), the gradients of each shard, the chains after the step."""
    args, x0, chains = distributed_case(method)
    shard_grads, new_chains = [], None if chains is None else (chains[0].clone(),
                                                               chains[1].clone())
    for rank in range(2):
        torch.manual_seed(0)
        model = METHODS[method].build_model(args)
        own = None if chains is None else (chains[0][rank::2].clone(), chains[1][rank::2].clone())
        torch.manual_seed(10 + rank)
        one_training_step(method, model, x0[rank::2], args, own)
        shard_grads.append([p.grad.clone() for p in model.parameters()])
        if own is not None:
            new_chains[0][rank::2], new_chains[1][rank::2] = own
    mean = [(a + b) / 2 for a, b in zip(*shard_grads)]
    return mean, shard_grads, new_chains


def test_ranks_average_the_global_gradient_and_stay_identical(worker_out):
    ranks = [load(worker_out / f"rank{r}.pt") for r in range(2)]
    for rank in ranks:
        assert rank["shard_round_trip"] and rank["any_rank"] == (True, False)
        assert [t.item() for t in rank["mean_over_ranks"]] == [0.5, 1.0]
    for method in METHODS:
        mean, shard_grads, chains = single_process_reference(method)
        assert any(not torch.allclose(a, b) for a, b in zip(*shard_grads))  # shards differ
        for rank in ranks:
            for index, (got, expected) in enumerate(zip(rank[method]["grads"], mean)):
                assert torch.allclose(got, expected, rtol=1e-5, atol=1e-7), (method, index)
            if chains is not None:  # gathered back into the global order
                assert torch.allclose(rank[method]["chains"][0], chains[0], rtol=1e-5, atol=1e-6)
                assert torch.equal(rank[method]["chains"][1], chains[1])
            params = rank[method]["params_by_rank"]
            assert torch.equal(params[0], params[1]), method  # after 3 more steps
        assert all(torch.equal(a, b) for a, b in zip(ranks[0][method]["grads"],
                                                      ranks[1][method]["grads"]))


@pytest.mark.parametrize("method", sorted(METHODS))
def test_two_processes_train_and_resume_exactly(method, worker_out):
    straight, resumed = worker_out / f"{method}_straight", worker_out / f"{method}_resumed"
    with open(straight / "metrics.jsonl") as f:
        assert [json.loads(line)["step"] for line in f] == [2, 4]  # one writer
    a, b = load(straight / "ckpt_00000004.pt"), load(resumed / "ckpt.pt")
    assert len(a["ranks"]) == 2 and b["step"] == 4
    keys = {"daebm": ["chains_x", "chains_t", "accept_sum", "accept_count", "scheduler"],
            "cdrl": ["scheduler"], "dcd": []}[method]
    assert_same_state(a, b, ["model", "ema", "optimizer", "loader", "rng", "ranks", *keys])


def test_a_two_process_checkpoint_resumes_in_one_process(worker_out, tmp_path, capsys):
    run = tmp_path / "run"
    os.makedirs(run)
    shutil.copy(worker_out / "daebm_straight" / "ckpt_00000002.pt", run / "ckpt.pt")
    saved = load(run / "ckpt.pt")
    args = common.args_from_checkpoint(METHODS["daebm"].Args, saved["args"], str(run),
                                       {"resume": True, "run_dir": str(run)})
    METHODS["daebm"].main(args)
    out = capsys.readouterr().out
    assert "written by 2 process(es) and 1 run now" in out and "not bitwise" in out
    one = load(run / "ckpt.pt")
    assert one["step"] == 4 and "ranks" not in one and len(one["chains_x"]) == 64


def test_torchrun_command_line(tmp_path):
    run = tmp_path / "run"
    fields = tiny_fields("dcd", run, steps=4, log_every=2, save_every=4, sample_every=4)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(free_port()), SCRIPTS["dcd"], *as_argv(fields)],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("step 4/4") == 1  # rank 0 speaks
    assert load(run / "ckpt.pt")["step"] == 4
    assert os.path.exists(run / "density_samples_00000004.png")  # rank 0 draws


def test_sigterm_to_one_rank_stops_both_with_a_checkpoint(tmp_path):
    run = tmp_path / "run"
    fields = tiny_fields("dcd", run, steps=100_000, log_every=1, sample_every=100_000)
    procs = start_ranks([os.path.join(ROOT, SCRIPTS["dcd"]), *as_argv(fields)])
    deadline = time.time() + 120
    while not (run / "metrics.jsonl").exists() or not (run / "metrics.jsonl").read_text():
        assert time.time() < deadline and all(p.poll() is None for p in procs)
        time.sleep(0.2)
    procs[1].send_signal(signal.SIGTERM)  # rank 0 never sees the signal
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [143, 143], errors
    assert "--resume --run-dir" in errors[0]
    ckpt = load(run / "ckpt.pt")
    assert ckpt["step"] >= 1 and len(ckpt["ranks"]) == 2
