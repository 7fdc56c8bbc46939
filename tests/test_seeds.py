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


def fake_runs(calls: list, fail: tuple[str, int] | None = None):
    """A stand-in for subprocess.run: writes each run's metrics.json (GT-known = seed, + 5 for b.py), or for the
    (script, seed) `fail` writes a traceback to the run's log and exits 1."""
    def run(cmd, cwd, env, stdout, stderr):
        calls.append((cmd, cwd))
        seed = int(cmd[cmd.index("--seed") + 1])
        if fail == (cmd[1], seed):
            stdout.write("Traceback (most recent call last):\nRuntimeError: boom\n")
            return subprocess.CompletedProcess(cmd, 1)
        run_dir = Path(cmd[cmd.index("--out-dir") + 1]) / cmd[cmd.index("--run-name") + 1]
        run_dir.mkdir(parents=True)
        values = {key: seed + (5.0 if cmd[1] == "b.py" else 0.0) for key in seeds.METRICS.values()}
        (run_dir / "metrics.json").write_text(json.dumps(values))
        return subprocess.CompletedProcess(cmd, 0)
    return run


def test_relative_out_dir_is_the_callers_folder(tmp_path, monkeypatch):
    """Run from outside the repository: the runs (started in ROOT) and the table read the same absolute folder."""
    calls = []
    monkeypatch.setattr(seeds.subprocess, "run", fake_runs(calls))
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    text = seeds.main(["--config", "a=a.py", "--seeds", "1", "2", "--out-dir", "sweep/out"])
    out = tmp_path / "elsewhere" / "sweep" / "out"
    assert [c[c.index("--out-dir") + 1] for c, _ in calls] == [str(out)] * 2
    assert {cwd for _, cwd in calls} == {seeds.ROOT}
    assert (out / "a__s1" / "metrics.json").is_file() and (out / "a__s1.log").is_file()
    assert "| a | 1.5 ± 0.7" in text
    assert not (seeds.ROOT / "sweep").exists()


def test_failed_run_still_prints_the_others_table(tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(seeds.subprocess, "run", fake_runs(calls, fail=("b.py", 2)))
    argv = ["--config", "a=a.py", "--config", "b=b.py", "--config", "c=c.py", "--seeds", "1", "2",
            "--baseline", "a", "--out-dir", str(tmp_path)]
    with pytest.raises(SystemExit) as e:
        seeds.main(argv)
    assert e.value.code != 0 and "1 of 6 runs failed" in str(e.value.code)
    assert len(calls) == 6  # every run after the failure still ran
    captured = capsys.readouterr()
    assert "b seed 2 failed (exit 1)" in captured.err and "RuntimeError: boom" in captured.err
    assert str(tmp_path / "b__s2.log") in captured.err
    assert "| a | 1.5 ± 0.7" in captured.out and "| c | 1.5 ± 0.7" in captured.out  # c: paired with a
    assert "| b |" not in captured.out and "left out" in captured.out and "b (seed 2 failed)" in captured.out
    assert "paired differences vs a" in captured.out
    # the finished runs are kept: once b's failure is fixed, only b seed 2 runs again
    calls.clear()
    monkeypatch.setattr(seeds.subprocess, "run", fake_runs(calls))
    assert "| b | 6.5 ± 0.7" in seeds.main(argv) and [c[1] for c, _ in calls] == ["b.py"]


def test_a_finished_run_of_another_command_is_refused(tmp_path, monkeypatch, capsys):
    """A finished run is reused only for the command that made it: the same name with other flags is an error that
    names the folder and both commands, not a silent row of the old configuration."""
    calls = []
    monkeypatch.setattr(seeds.subprocess, "run", fake_runs(calls))
    seeds.main(["--config", "a=a.py --lr 1", "--seeds", "1", "--out-dir", str(tmp_path)])
    assert json.loads((tmp_path / "a__s1" / "seeds_wall.json").read_text())["command"] == "a.py --lr 1"
    assert "| a | 1.0" in seeds.main(["--config", "a=a.py --lr 1", "--seeds", "1", "--out-dir", str(tmp_path)])
    assert len(calls) == 1  # reused, not run again
    with pytest.raises(SystemExit):
        seeds.main(["--config", "a=a.py --lr 2", "--seeds", "1", "--out-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert str(tmp_path / "a__s1") in err and "`a.py --lr 1`" in err and "`a.py --lr 2`" in err
    assert len(calls) == 1
