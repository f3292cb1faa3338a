"""Train methods on the 2D toys for several seeds, score each run's exact NLL, print the table.

    python benchmarks/toys.py dcd-vs-cd          # DCD's estimators against CD, equal cost
    python benchmarks/toys.py methods            # each script's 2D default command on every toy
    python benchmarks/toys.py methods --table    # only the table of the runs recorded so far
    python benchmarks/toys.py dcd-vs-cd --table --per-seed   # each seed's NLL, not mean ± sd

Each run is `python <script> --dataset TOY --seed S --device cpu --run-dir R <flags>` followed by
`python eval_fid_ood.py --ckpt R --device cpu` (exact NLL of 20,000 fresh points under the model
normalised on a 1000² grid, and the toy's true NLL where it is analytic). Each finished run leaves
one record, benchmarks/toys/<suite>/<config>__<toy>__<seed>.json (kept in git): the command, the
machine (CPU model, cores, torch version: another CPU rounds differently, so the same run lands on
another NLL), its wall time, the NLL, or the last error line of a run that failed (e.g. stopped by
the divergence check). Runs with a record are skipped, so the same command continues an interrupted
sweep; run folders go to --runs and are deleted after scoring unless --keep-runs.

Suites (every flag not given is the script's 2D preset):
- dcd-vs-cd: CD, DCD-Langevin and DCD-importance at the same cost, 7 energy-gradient evaluations per
  example per iteration (CD-K and unadjusted Langevin-K: K in the chain + 2 in the loss; MALA-K one
  more for the chain's start; importance with M proposals: M + 1), each 20,000 iterations at batch
  256, pictures only at the end; the chain methods with the energy penalty each did best with in
  dcd-tune.
- methods: `python pcd_diffusion_ebm.py`, `python cdrl.py`, `python dcd.py` and `python dcd.py
  --kernel cd` exactly as the quick starts run (their own iterations, pictures and end-of-run
  sampling included in the wall time), on every toy.
- dcd-tune: the settings tried on checkerboard, seed 0, before the dcd-vs-cd suite (RESULTS.md).
"""
import argparse
import json
import math
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import common  # noqa: E402

# pictures (5,000 points by 500 Langevin steps each) only at the end: drawn every 1,000 iterations
# as in the preset they cost more than the 20,000 training iterations themselves
EQUAL_COST = ["--steps", "20000", "--batch-size", "256", "--log-every", "1000",
              "--sample-every", "20000", "--save-every", "5000"]
# dcd-tune ran before that change, with the preset's pictures every 1,000 iterations
TUNE_COST = ["--steps", "20000", "--batch-size", "256", "--log-every", "1000"]
# the energy penalty of each chain method: its best in dcd-tune (CD-5: 0.3, ED's CD baseline too;
# DCD-Langevin-5: 0.1)
CD_PENALTY, LANGEVIN_PENALTY = ["--energy-reg", "0.3"], ["--energy-reg", "0.1"]
SUITES = {
    "dcd-vs-cd": {
        "cd-5": ["dcd.py", *EQUAL_COST, "--kernel", "cd", "--langevin-steps", "5",
                 "--cd-step-size", "0.03", *CD_PENALTY],
        "dcd-langevin-5": ["dcd.py", *EQUAL_COST, "--estimator", "langevin", "--langevin-steps",
                           "5", "--sigma", "0.3", "--step-ratio", "0.3", "--chain-start",
                           "positive", *LANGEVIN_PENALTY],
        "dcd-mala-4": ["dcd.py", *EQUAL_COST, "--estimator", "langevin", "--langevin-steps", "4",
                       "--sigma", "0.3", "--step-ratio", "0.3", "--chain-start", "positive",
                       "--metropolis", *LANGEVIN_PENALTY],
        "dcd-importance-6-sigma-0.1": ["dcd.py", *EQUAL_COST, "--estimator", "importance",
                                       "--num-proposals", "6", "--sigma", "0.1"],
        "dcd-importance-6-sigma-0.3": ["dcd.py", *EQUAL_COST, "--estimator", "importance",
                                       "--num-proposals", "6", "--sigma", "0.3"],
        "dcd-importance-6-sigma-1": ["dcd.py", *EQUAL_COST, "--estimator", "importance",
                                     "--num-proposals", "6", "--sigma", "1.0"],
    },
    "methods": {
        "daebm": ["pcd_diffusion_ebm.py"],
        "cdrl": ["cdrl.py"],
        "dcd": ["dcd.py"],
        "cd": ["dcd.py", "--kernel", "cd"],
    },
    "dcd-tune": {
        **{f"cd-5-penalty-{alpha}": ["dcd.py", *TUNE_COST, "--kernel", "cd", "--langevin-steps",
                                     "5", "--cd-step-size", "0.03", "--energy-reg", alpha]
           for alpha in ("0", "0.01", "0.1", "0.3")},
        **{f"dcd-langevin-5-penalty-{alpha}": [
            "dcd.py", *TUNE_COST, "--estimator", "langevin", "--langevin-steps", "5", "--sigma",
            "0.3", "--step-ratio", "0.3", "--chain-start", "positive", "--energy-reg", alpha]
           for alpha in ("0", "0.1", "0.3")},
    },
}
DEFAULT_TOYS = {"dcd-tune": ["checkerboard"]}
DEFAULT_SEEDS = {"dcd-tune": [0]}


def machine() -> str:
    """CPU model, core count and torch version, e.g. 'AMD EPYC, 2 cores, torch 2.14.1+cu130'."""
    model = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as cpuinfo:
            names = [line.split(":", 1)[1].strip() for line in cpuinfo
                     if line.startswith("model name")]
        model = names[0] if names else model
    return f"{model}, {os.cpu_count()} cores, torch {torch.__version__}"


def record_path(records: str, suite: str, config: str, toy: str, seed: int) -> str:
    return os.path.join(records, suite, f"{config}__{toy}__{seed}.json")


def run_one(suite: str, config: str, toy: str, seed: int, ns) -> dict:
    """Train and score one run -> its record (written to disk)."""
    run_dir = os.path.join(ns.runs, suite, config, f"{toy}__{seed}")
    shutil.rmtree(run_dir, ignore_errors=True)  # a run cut off earlier starts again
    script, *flags = SUITES[suite][config]
    command = [sys.executable, script, "--dataset", toy, "--seed", str(seed), "--device", "cpu",
               "--run-dir", run_dir, *flags, *ns.extra]
    env = dict(os.environ, OMP_NUM_THREADS=str(ns.threads))
    record = {"suite": suite, "config": config, "toy": toy, "seed": seed,
              "command": " ".join(command[1:]), "machine": machine(), "threads": ns.threads,
              "jobs": ns.jobs, "date": time.strftime("%Y-%m-%d")}
    start = time.time()
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    record["train_wall_s"] = round(time.time() - start, 1)
    if proc.returncode != 0:
        record["error"] = (proc.stderr.strip().splitlines() or ["(no message)"])[-1]
    else:
        out = os.path.join(run_dir, "eval.json")
        start = time.time()
        scored = subprocess.run([sys.executable, "eval_fid_ood.py", "--ckpt", run_dir, "--device",
                                 "cpu", "--out", out, *ns.eval_extra], cwd=ROOT, env=env,
                                capture_output=True, text=True)
        record["eval_wall_s"] = round(time.time() - start, 1)
        if scored.returncode != 0:
            record["error"] = "eval: " + (scored.stderr.strip().splitlines() or ["?"])[-1]
        else:
            results = json.load(open(out))
            record.update({key: results[key] for key in ("nll", "true_nll", "step")
                           if key in results})
    path = record_path(ns.records, suite, config, toy, seed)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(record, f, indent=1)
    os.replace(path + ".tmp", path)
    if not ns.keep_runs:
        shutil.rmtree(run_dir, ignore_errors=True)
    return record


def describe(record: dict) -> str:
    run = f"{record['config']} {record['toy']} seed {record['seed']}"
    if "error" in record:
        return f"{run}: failed ({record['error']})"
    return f"{run}: NLL {record['nll']:.3f} in {record['train_wall_s']:.0f} s"


def table(suite: str, ns) -> str:
    """Markdown: one row per config, one column per toy (mean ± sd over the seeds recorded, n when
    fewer than asked; 'failed k' when k seeds failed; with --per-seed each seed's NLL in seed order,
    'failed' or '-' where there is none), then the true NLL and the mean wall time."""
    folder = os.path.join(ns.records, suite)
    records = [json.load(open(os.path.join(folder, name))) for name in sorted(os.listdir(folder))
               if name.endswith(".json")] if os.path.isdir(folder) else []
    lines = ["| config | " + " | ".join(ns.toys) + " | mean train wall |",
             "|---" * (len(ns.toys) + 2) + "|"]
    true_nll = {}
    for config in SUITES[suite]:
        cells, walls = [], []
        for toy in ns.toys:
            mine = [r for r in records if r["config"] == config and r["toy"] == toy
                    and r["seed"] in ns.seeds]
            done = [r["nll"] for r in mine if "nll" in r]
            walls += [r["train_wall_s"] for r in mine]
            true_nll.update({toy: r["true_nll"] for r in mine if "true_nll" in r})
            cell = ""
            if ns.per_seed and mine:
                by_seed = {r["seed"]: f"{r['nll']:.3f}" if "nll" in r else "failed" for r in mine}
                cells.append(" / ".join(by_seed.get(seed, "-") for seed in ns.seeds))
                continue
            if done:
                mean = sum(done) / len(done)
                sd = math.sqrt(sum((v - mean) ** 2 for v in done) / max(len(done) - 1, 1))
                cell = f"{mean:.3f} ± {sd:.3f}" if len(done) > 1 else f"{mean:.3f}"
                if len(done) < len(ns.seeds):
                    cell += f" (n {len(done)})"
            failed = len(mine) - len(done)
            if failed:
                cell = (cell + ", " if cell else "") + f"failed {failed}"
            cells.append(cell or "not run")
        wall = f"{sum(walls) / len(walls):.0f} s" if walls else "-"
        lines.append(f"| {config} | " + " | ".join(cells) + f" | {wall} |")
    lines.append("| true density | " + " | ".join(
        f"{true_nll[toy]:.3f}" if toy in true_nll else "no closed form" for toy in ns.toys)
        + " | |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("suite", choices=sorted(SUITES))
    parser.add_argument("--configs", nargs="+", help="a subset of the suite's configurations")
    parser.add_argument("--toys", nargs="+", choices=common.TOY_2D)
    parser.add_argument("--seeds", nargs="+", type=int)
    parser.add_argument("--jobs", type=int, default=1, help="runs at once")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--table", action="store_true", help="print the table only, train nothing")
    parser.add_argument("--per-seed", action="store_true",
                        help="the table's cells: each seed's NLL instead of mean ± sd")
    parser.add_argument("--records", default=os.path.join(ROOT, "benchmarks", "toys"))
    parser.add_argument("--runs", default=os.path.join(ROOT, "runs", "toys"))
    parser.add_argument("--keep-runs", action="store_true")
    parser.add_argument("--extra", default="", help="flags added to every training command "
                        "(after the suite's), one string: --extra='--steps 100'")
    parser.add_argument("--eval-extra", default="", help="flags added to every eval_fid_ood.py "
                        "command, one string")
    ns = parser.parse_args(argv)
    ns.extra, ns.eval_extra = shlex.split(ns.extra), shlex.split(ns.eval_extra)
    ns.toys = ns.toys or DEFAULT_TOYS.get(ns.suite, list(common.TOY_2D))
    ns.seeds = ns.seeds or DEFAULT_SEEDS.get(ns.suite, [1, 2, 3])
    configs = ns.configs or list(SUITES[ns.suite])
    unknown = set(configs) - set(SUITES[ns.suite])
    if unknown:
        parser.error(f"unknown configs {sorted(unknown)}; {ns.suite} has {list(SUITES[ns.suite])}")
    if not ns.table:
        todo = [(config, toy, seed) for seed in ns.seeds for toy in ns.toys for config in configs
                if not os.path.exists(record_path(ns.records, ns.suite, config, toy, seed))]
        print(f"{len(todo)} run(s) to do, {ns.jobs} at a time", flush=True)
        with ThreadPoolExecutor(ns.jobs) as pool:
            for record in pool.map(lambda job: run_one(ns.suite, *job, ns), todo):
                print(describe(record), flush=True)
    print(table(ns.suite, ns))


if __name__ == "__main__":
    main()
