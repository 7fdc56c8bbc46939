"""benchmarks/seeds.py: the statistics over seeds (hand-computed) and its table."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import seeds  # noqa: E402


def test_stats_mean_std_and_t_interval():
    mean, std, half = seeds.stats([1.0, 2.0, 3.0])
    assert mean == 2.0 and std == 1.0 and half == pytest.approx(4.303 / math.sqrt(3))
    assert math.isnan(seeds.stats([5.0])[1])


def test_table_pairs_by_seed():
    def run(gt):  # one run's metrics.json, as read by the script
        return {key: gt for key in seeds.METRICS.values()} | {"wall_s": 60.0}
    results = {"base": {1: run(50.0), 2: run(60.0)}, "new": {1: run(53.0), 2: run(61.0)}}
    text = seeds.table(results, "base")
    assert "| base | 55.0 ± 7.1" in text
    row = next(line for line in text.splitlines() if line.startswith("| new |") and "+2.0 [" in line)
    assert row.endswith("+3.0 +1.0 |")  # the per-seed paired differences
    lo, hi = 2.0 - 12.706 * math.sqrt(2) / math.sqrt(2), 2.0 + 12.706  # std of (3, 1) is sqrt(2): half = 12.706
    assert f"[{lo:+.1f}, {hi:+.1f}]" in row


def test_val_table_reads_the_val_keys():
    """--split val: the table reads each metric at its best threshold on val (the split presets are chosen on)."""
    runs = {s: {key: 10.0 * s for key in seeds.SPLITS["val"].values()} | {"wall_s": 60.0} for s in (1, 2, 3)}
    text = seeds.table({"a": runs}, None, split="val")
    assert "val split" in text and "| a | 20.0 ± 10.0 [±24.8]" in text  # std 10, t(2) 4.303 * 10 / sqrt(3)
    with pytest.raises(KeyError):  # a test-split table of val-only runs is an error, not a silent blank
        seeds.table({"a": runs}, None, split="test")


def test_parallel_jobs_keep_each_seeds_own_result(tmp_path, monkeypatch):
    """--jobs 2 runs two configurations at a time; every (config, seed) gets its own metrics, in table order."""
    calls = []

    def fake_run(cmd, cwd, env, stdout, stderr):
        calls.append(env["OMP_NUM_THREADS"])
        assert "b.py" not in cmd[1] or cmd[cmd.index("--checkpoint") + 1] == f"run{cmd[cmd.index('--seed') + 1]}.pt"
        run = Path(cmd[cmd.index("--out-dir") + 1]) / cmd[cmd.index("--run-name") + 1]
        run.mkdir(parents=True)
        seed = int(cmd[cmd.index("--seed") + 1])
        values = {key: seed + (5.0 if "b.py" in cmd[1] else 0.0) for key in seeds.METRICS.values()}
        (run / "metrics.json").write_text(json.dumps(values | {"val/GT-known Loc": 0}))
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(seeds.subprocess, "run", fake_run)
    text = seeds.main(["--config", "a=a.py", "--config", "b=b.py --checkpoint run{seed}.pt", "--seeds", "1", "2",
                       "--baseline", "a",
                       "--jobs", "2", "--out-dir", str(tmp_path)])
    assert calls == ["1"] * 4  # each of two parallel runs gets one thread
    assert "| a | 1.5 ± 0.7" in text and "| b | 6.5 ± 0.7" in text and "+5.0 +5.0 |" in text
