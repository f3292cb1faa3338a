"""Run by tests/test_distributed.py in each of several processes (gloo, as torchrun starts them):
for each method, one training step on this rank's share of a fixed global batch (gradients
averaged over the ranks), then a few steps with a learning rate; batches dealt over the ranks and
gathered back; then each script's main() on a
tiny 2D run of 4 iterations, straight and resumed from its iteration-2 checkpoint. Writes what the
test compares to OUT/rank<r>.pt and the runs to OUT/<method>_straight, OUT/<method>_resumed."""
import os
import shutil
import sys

import torch
import torch.distributed as dist
from conftest import METHODS, distributed_case, one_training_step, tiny_args

import common


def train_and_resume(method: str, out_dir: str):
    """4 iterations straight (a checkpoint at 2 and 4), then again from the one at 2."""
    module = METHODS[method]
    straight = os.path.join(out_dir, f"{method}_straight")
    resumed = os.path.join(out_dir, f"{method}_resumed")
    quiet = {"long_run_steps": 0, "final_samples": False} if method == "daebm" else {}
    module.main(tiny_args(method, straight, steps=4, log_every=2, save_every=2, sample_every=100,
                          **quiet))
    if common.is_main():
        os.makedirs(resumed)
        shutil.copy(os.path.join(straight, "ckpt_00000002.pt"), os.path.join(resumed, "ckpt.pt"))
    dist.barrier()
    saved = torch.load(os.path.join(resumed, "ckpt.pt"), weights_only=True)
    args = common.args_from_checkpoint(module.Args, saved["args"], resumed,
                                       {"resume": True, "run_dir": resumed})
    module.main(args)


def main(out_dir: str):
    dist.init_process_group("gloo")
    rank, _ = common.rank_and_world()
    out = {}
    for method, module in METHODS.items():
        args, x0, chains = distributed_case(method)
        torch.manual_seed(0)
        model = module.build_model(args)
        own_chains = tuple(map(common.shard, chains)) if chains else None
        torch.manual_seed(10 + rank)
        one_training_step(method, model, common.shard(x0), args, own_chains)
        result = {"grads": [p.grad.clone() for p in model.parameters()]}
        if chains:
            result["chains"] = tuple(map(common.gather_shards, own_chains))
        for _ in range(3):
            one_training_step(method, model, common.shard(x0), args, own_chains, lr=1e-2)
        flat = torch.cat([p.detach().flatten() for p in model.parameters()])
        result["params_by_rank"] = common.gather_objects(flat)
        out[method] = result
    rows = torch.arange(30.0).view(10, 3)
    out["shard_round_trip"] = torch.equal(common.gather_shards(common.shard(rows)), rows)
    # decisions every rank must share: true on all when true on one
    out["any_rank"] = (common.any_rank(rank == 1), common.any_rank(False))
    out["mean_over_ranks"] = common.mean_over_ranks(torch.tensor(float(rank)),
                                                    torch.tensor(2.0 * rank))
    # batches dealt round robin and gathered in order: every row of batch i holds i
    dealt = {(n, size): common.gather_batches(
        [torch.full((rows, 2), float(index)) for index, _, rows
         in common.batches_of_this_rank(n, size)], n, size) for n, size in ((10, 3), (3, 4))}
    out["gather_batches"] = dealt
    out["batches_of_this_rank"] = common.batches_of_this_rank(10, 3)
    # a signal seen by rank 1 only: every rank stops at the same call, after one all-reduce
    guard, reduces = common.StopGuard(0), []
    guard.signal_name = "SIGTERM" if rank == 1 else None
    all_reduce = dist.all_reduce
    dist.all_reduce = lambda *a, **k: (reduces.append(1), all_reduce(*a, **k))[1]
    due = [guard.save_due() for _ in range(common.StopGuard.AGREE_EVERY)]
    dist.all_reduce = all_reduce
    out["stop_guard"] = (due, guard.stopping, len(reduces))
    torch.save(out, f"{out_dir}/rank{rank}.pt")
    for method in METHODS:
        train_and_resume(method, out_dir)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
