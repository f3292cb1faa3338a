"""Score a checkpoint of any method script through its public API (build_model, sample, energy).

Built so far: the exact density of 2D checkpoints. The energy is evaluated on a fine grid over a box, and
normalised by logsumexp over the cells, log p(x) = -U(x) - log Σ_cells exp(-U) Δ, which is exact up to the
grid's resolution; the test NLL is the mean of -log p over fresh points of the toy. FID and OOD detection
are not built yet.

    python eval_fid_ood.py --ckpt runs/.../ckpt.pt [--device cpu]
"""
import importlib
import json
import math
import os
from dataclasses import dataclass
from typing import Optional

import torch
import tyro

import common


@dataclass
class EvalArgs:
    ckpt: str
    """checkpoint written by one of the method scripts"""
    device: str = "auto"
    """auto | cpu | cuda"""
    out: Optional[str] = None
    """JSON output path (default: eval.json next to the checkpoint)"""
    n_test: int = 20_000
    """2D: fresh test points for the NLL"""
    grid_resolution: int = 1000
    """2D: cells per side of the density grid"""
    seed: int = 12345
    """seed of the fresh test points (distinct from training seeds)"""


# ---------------------------------------------------------------------------------------------------
# 2D: exact density on a grid
# ---------------------------------------------------------------------------------------------------
def grid_log_density(energy_fn, lo: float, hi: float, resolution: int, chunk: int = 65536):
    """log p on the cell centres of a resolution^2 grid over [lo, hi]^2 (row = y, as common.grid_2d),
    normalised so that Σ p Δ = 1 with Δ the cell area. energy_fn maps (n, 2) float32 -> (n,) energies."""
    points = common.grid_2d(lo, hi, resolution)
    with torch.no_grad():
        energies = torch.cat([energy_fn(points[i: i + chunk].float()).double().cpu()
                              for i in range(0, len(points), chunk)])
    cell_area = ((hi - lo) / resolution) ** 2
    log_p = -energies - torch.logsumexp(-energies, 0) - math.log(cell_area)
    return log_p.view(resolution, resolution)


def grid_nll(log_p_grid: torch.Tensor, lo: float, hi: float, points: torch.Tensor) -> float:
    """Mean -log p of points under the piecewise-constant grid density (points outside the box are
    clamped to the border cell, so the box must cover the data)."""
    resolution = log_p_grid.shape[0]
    idx = ((points.double() - lo) / (hi - lo) * resolution).floor().long().clamp(0, resolution - 1)
    return -log_p_grid[idx[:, 1], idx[:, 0]].mean().item()


def load_method(ckpt: dict, device):
    """Import the script named by the checkpoint, rebuild Args and the model (EMA weights when present)."""
    scripts = {"daebm": "pcd_diffusion_ebm", "cdrl": "cdrl", "dcd": "dcd"}
    if ckpt["method"] not in scripts:
        raise common.UserError(f"checkpoint method {ckpt['method']!r} is unknown; known: {', '.join(scripts)}")
    module = importlib.import_module(scripts[ckpt["method"]])
    args = module.Args(**{k: tuple(v) if isinstance(v, list) else v for k, v in ckpt["args"].items()})
    model = module.build_model(args)
    model.load_state_dict(ckpt["ema"] if ckpt.get("ema") is not None else ckpt["model"])
    return module, args, model.to(device).eval()


def evaluate(eval_args: EvalArgs) -> dict:
    device = common.pick_device(eval_args.device)
    ckpt = common.load_checkpoint(eval_args.ckpt)
    module, args, model = load_method(ckpt, device)
    results = {"ckpt": eval_args.ckpt, "method": ckpt["method"], "dataset": args.dataset, "step": ckpt["step"]}
    if common.is_toy(args.dataset):
        lo, hi = common.data_box(common.toy_2d(args.dataset, 50_000, seed=args.seed))
        log_p = grid_log_density(lambda x: module.energy(model, x.to(device), args), lo, hi,
                                 eval_args.grid_resolution)
        test = common.toy_2d(args.dataset, eval_args.n_test, seed=eval_args.seed)
        results.update({"nll": grid_nll(log_p, lo, hi, test), "box": [lo, hi],
                        "grid_resolution": eval_args.grid_resolution, "n_test": eval_args.n_test})
    else:
        raise common.UserError("image checkpoints: FID and OOD scoring are not built yet")
    out = eval_args.out or os.path.join(os.path.dirname(os.path.abspath(eval_args.ckpt)), "eval.json")
    with open(out, "w") as f:
        json.dump(results, f, indent=2)
    for key, value in results.items():
        print(f"{key:>16}: {value}")
    return results


if __name__ == "__main__":
    common.run_cli(lambda: evaluate(tyro.cli(EvalArgs)))
