"""benchmarks/toys.py: runs recorded with their NLL, failures recorded, a second call trains
nothing, the table from the records (mean ± sd or per seed)."""
import json
import math
import os
import sys

import pytest
from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import toys  # noqa: E402


@pytest.mark.slow  # each run starts two processes
def test_runs_are_recorded_resumed_and_tabulated(tmp_path, capsys):
    where = ["--records", str(tmp_path / "rec"), "--runs", str(tmp_path / "runs"), "--toys",
             "8gaussians", "--seeds", "1", "--eval-extra=--n-test 300 --grid-resolution 60"]
    fast = [*where, "--extra=--steps 6 --log-every 3 --n-points 50 --sample-langevin-steps 5"]
    toys.main(["dcd-vs-cd", "--configs", "cd-5", "dcd-importance-6-sigma-0.1", *fast])
    out = capsys.readouterr().out
    assert "2 run(s) to do" in out
    record = json.load(open(tmp_path / "rec" / "dcd-vs-cd" / "cd-5__8gaussians__1.json"))
    assert math.isfinite(record["nll"]) and record["step"] == 6 and record["train_wall_s"] > 0
    assert "--kernel cd" in record["command"] and "--seed 1" in record["command"]
    assert record["machine"].endswith(f"{os.cpu_count()} cores, torch {toys.torch.__version__}")
    assert record["true_nll"] == pytest.approx(2.83, abs=0.05)
    assert not os.listdir(tmp_path / "runs" / "dcd-vs-cd" / "cd-5")  # scored, then removed
    # a second call trains nothing; a failing run is recorded as such
    toys.main(["dcd-vs-cd", "--configs", "cd-5", *fast])
    assert "0 run(s) to do" in capsys.readouterr().out
    toys.main(["dcd-vs-cd", "--configs", "dcd-mala-4", *where, "--extra=--steps 6 --lr -1"])
    out = capsys.readouterr().out
    assert "dcd-mala-4 8gaussians seed 1: failed (error: --lr must be positive" in out
    rows = {line.split(" | ")[0][2:]: line for line in out.splitlines() if line.startswith("| ")}
    assert f"{record['nll']:.3f} |" in rows["cd-5"]
    assert "failed 1" in rows["dcd-mala-4"] and "not run" in rows["dcd-langevin-5"]
    assert "2.8" in rows["true density"]


def test_table_mean_and_per_seed_cells(tmp_path, capsys):
    """The table from hand-written records: mean ± sample sd over the seeds that finished, the
    count and failures named; --per-seed lists each seed's NLL in seed order."""
    folder = tmp_path / "dcd-vs-cd"
    folder.mkdir()
    results = {("cd-5", 1): 1.0, ("cd-5", 2): 2.0, ("cd-5", 3): 4.0, ("dcd-mala-4", 1): 3.25,
               ("dcd-mala-4", 3): None}
    for (config, seed), nll in results.items():
        record = {"config": config, "toy": "rings", "seed": seed, "train_wall_s": 10.0 * seed,
                  **({"error": "diverged"} if nll is None else {"nll": nll, "true_nll": 0.844})}
        json.dump(record, open(folder / f"{config}__rings__{seed}.json", "w"))
    where = ["--table", "--records", str(tmp_path), "--toys", "rings"]

    def rows(extra):
        toys.main(["dcd-vs-cd", *where, *extra])
        return {line.split(" | ")[0][2:]: line.split(" | ")[1:]
                for line in capsys.readouterr().out.splitlines() if line.startswith("| ")}
    table = rows([])
    assert table["cd-5"] == [f"2.333 ± {math.sqrt(7 / 3):.3f}", "20 s |"]
    assert table["dcd-mala-4"][0] == "3.250 (n 1), failed 1"
    assert table["dcd-langevin-5"][0] == "not run" and table["true density"][0] == "0.844"
    table = rows(["--per-seed"])
    assert table["cd-5"][0] == "1.000 / 2.000 / 4.000"
    assert table["dcd-mala-4"][0] == "3.250 / - / failed"
