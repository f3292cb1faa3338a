"""torchrun: several processes with the gloo backend on the CPU (2 ranks, started as torchrun
starts them). The averaged gradient of one step equals the single-process one on the same global
batch; the ranks' parameters stay identical; DA-EBM's chains are sharded and gathered back in order;
each script trains under 2 processes and resumes exactly; a checkpoint of 2 processes resumes in 1
(DA-EBM, whose chains are re-split); a SIGTERM that reaches one rank stops both at the same step
with a checkpoint; the command line under torchrun itself. The evaluator split over 2 processes
gives the one-process results, and so does --fid-every during a 2-process training run."""
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import (METHODS, ROOT, SCRIPTS, as_argv, assert_same_state, distributed_case,
                      first_images, flatten, free_port, launch_ranks, one_training_step,
                      start_ranks, tiny_args, tiny_fields)

import common
import eval_fid_ood

THREADS = torch.get_num_threads()
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
        # StopGuard.save_due: one all-reduce per AGREE_EVERY iterations, both ranks stop together
        agree = common.StopGuard.AGREE_EVERY
        assert rank["stop_guard"] == ([False] * (agree - 1) + [True], True, 1)
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


def test_batches_are_dealt_round_robin_and_gathered_in_order(worker_out):
    ranks = [load(worker_out / f"rank{r}.pt") for r in range(2)]
    assert ranks[0]["batches_of_this_rank"] == [(0, 0, 3), (2, 6, 3)]
    assert ranks[1]["batches_of_this_rank"] == [(1, 3, 3), (3, 9, 1)]
    for rank in ranks:
        expected = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 3.0])[:, None].expand(-1, 2)
        assert torch.equal(rank["gather_batches"][(10, 3)], expected)
        # one batch: rank 1 has none and still takes part
        assert torch.equal(rank["gather_batches"][(3, 4)], torch.zeros(3, 2))


def evaluations_agree(ckpt, tmp_path, **fields):
    """eval_fid_ood.py in 2 processes and evaluate() here in one, each with its own output and
    statistics cache: the same results (the JSON) -> both results."""
    two, one = tmp_path / "two", tmp_path / "one"
    for folder in (two, one):
        folder.mkdir(parents=True)
    shared = dict(ckpt=str(ckpt), device="cpu", **fields)
    procs = launch_ranks([os.path.join(ROOT, "eval_fid_ood.py"),
                          *as_argv(dict(shared, out=str(two / "eval.json"),
                                        stats_dir=str(two / "stats")))])
    assert [p.returncode for p in procs] == [0, 0], procs[0].stderr + procs[1].stderr
    assert "written to" in procs[0].stdout and procs[1].stdout == ""  # rank 0 speaks
    torch.set_num_threads(1)  # as each rank: the same float arithmetic
    try:
        results = eval_fid_ood.evaluate(eval_fid_ood.EvalArgs(
            **shared, out=str(one / "eval.json"), stats_dir=str(one / "stats")))
    finally:
        torch.set_num_threads(THREADS)
    got = flatten(json.loads((two / "eval.json").read_text()))
    expected = flatten(json.loads(json.dumps(results).replace(str(one), str(two))))
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        # the Frechet distance's eigenvalues come from numpy's BLAS, whose threads differ here
        same = pytest.approx(value, rel=1e-9) if key.endswith("fid.") else value
        assert got[key] == same, key
    return json.loads((two / "eval.json").read_text()), two, one


def test_evaluator_in_two_processes_gives_the_one_process_results(tmp_path, image_folder,
                                                                  random_inception):
    """Samples, Inception features, energies and grid chunks split over 2 processes: the same
    samples (in order), statistics, FID, OOD and 2D numbers as one process."""
    small = first_images(image_folder, 12, tmp_path / "small")
    run = tmp_path / "image_run"
    METHODS["dcd"].main(tiny_args("dcd", run, small))
    got, two, one = evaluations_agree(
        run / "ckpt.pt", tmp_path / "eval_images", batch_size=4, fid_samples=6,
        inception_weights=random_inception.weights, n_ood=10, ood=("interp", "uniform"))
    assert math.isfinite(got["fid"]) and got["ood"]["uniform"]["n"] == 10
    (stats_two,), (stats_one,) = (os.listdir(folder / "stats") for folder in (two, one))
    assert_same_state(load(two / "stats" / stats_two), load(one / "stats" / stats_one),
                      ["mu", "sigma", "n"])
    run = tmp_path / "points"
    METHODS["dcd"].main(tiny_args("dcd", run, steps=4))
    got, _, _ = evaluations_agree(run / "ckpt.pt", tmp_path / "eval_2d", n_test=500,
                                  grid_resolution=300, batch_size=64, long_run=2,
                                  long_run_samples=150)
    assert math.isfinite(got["nll"]) and len(got["long_run"]["records"]) == 2
    _, two, one = evaluations_agree(run / "ckpt.pt", tmp_path / "samples", batch_size=64,
                                    save_samples=150)
    assert torch.equal(*(torch.from_numpy(np.load(folder / "samples.npz")["samples"])
                         for folder in (two, one)))


def test_fid_during_training_in_two_processes(tmp_path, image_folder, random_inception):
    """--fid-every under 2 processes: each rank draws its share of the samples, every rank joins
    the gathers, rank 0 logs and writes best.pt; the FID is the one-process evaluator's."""
    small = first_images(image_folder, 12, tmp_path / "small")
    run, data_dir = tmp_path / "run", tmp_path / "data"
    fields = tiny_fields("dcd", run, small, fid_every=3, fid_samples=6, data_dir=str(data_dir),
                         inception_weights=random_inception.weights)
    procs = launch_ranks([os.path.join(ROOT, SCRIPTS["dcd"]), *as_argv(fields)])
    assert [p.returncode for p in procs] == [0, 0], procs[0].stderr + procs[1].stderr
    with open(run / "metrics.jsonl") as f:
        curve = {r["step"]: r["fid"] for r in map(json.loads, f) if "fid" in r}
    assert sorted(curve) == [3, 6]
    assert load(run / "best.pt")["step"] == min(curve, key=curve.get)
    torch.set_num_threads(1)  # as each rank: the same float arithmetic
    try:
        results = eval_fid_ood.evaluate(eval_fid_ood.EvalArgs(
            ckpt=str(run / "ckpt_00000006.pt"), device="cpu", seed=load(run / "ckpt.pt")["args"][
                "seed"], fid_samples=6, batch_size=fields["batch_size"], ood=("none",),
            inception_weights=random_inception.weights, out=str(tmp_path / "eval.json")))
    finally:
        torch.set_num_threads(THREADS)
    assert results["fid"] == pytest.approx(curve[6], rel=1e-9)


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
