"""Seed statistics: run configurations x seeds, then mean ± std, a 95 % interval and paired differences.

    python benchmarks/seeds.py --config tscam="tscam.py" --config scm="scm.py" --seeds 26 27 28 --baseline tscam
    python benchmarks/seeds.py --config batched="dawsol.py --tsa-mode batched" \
        --config sequential="dawsol.py --tsa-mode sequential" --baseline batched
    python benchmarks/seeds.py --config S="tscam.py --eval-only --checkpoint runs/seeds/tscam__s{seed}/last.pt \
        --map semantic" --seeds 27 28 29      # {seed} in a configuration is replaced by each seed

Each configuration is `name="<method>.py [flags]"`; each (name, seed) runs once as
`python <method>.py <flags> --seed S --out-dir OUT --run-name <name>__s<S>`. A finished run (its metrics.json exists)
is not run again, so an interrupted sweep continues where it stopped; it is refused when it was made by another
command (the command is kept in its seeds_wall.json). A failed run is reported with its log's end
and the sweep goes on; the table then holds the configurations whose every seed finished, and the exit status is 1.
The runs start in the repository root (paths inside a configuration are relative to it); --out-dir is relative to
the current folder. --jobs 2 runs two at a time with --threads each (on 2 cores, two 1-thread runs finish sooner
than one 2-thread run after another; the wall column is then not a timing). The table reads the test split with
thresholds chosen on val (wsolevaluation): GT-known Loc, BoxAccV2 (MaxBoxAccV2 at val-τ), BoxAcc@70 at val-τ, PxAP,
Cls@1. `--split val` reads the val split instead (each metric at its best threshold on val itself): the split presets
and designs are chosen on. Intervals: Student t with n - 1 degrees of freedom over seeds (not over images); paired
differences are per seed.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SPLITS = {  # the columns of the table, per split
    "test": {"GT-known": "test/GT-known Loc@val-τ", "BoxAccV2": "test/BoxAccV2@val-τ",
             "BoxAcc@70": "test/BoxAcc@70@val-τ", "PxAP": "test/PxAP", "Cls@1": "test/Cls@1"},
    "val": {"GT-known": "val/GT-known Loc", "BoxAccV2": "val/MaxBoxAccV2", "BoxAcc@70": "val/MaxBoxAcc@70",
            "PxAP": "val/PxAP", "Cls@1": "val/Cls@1"},
}
METRICS = SPLITS["test"]
T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086]  # two-sided 95 % Student t quantiles for 1..20 degrees of freedom


def stats(values: list[float]) -> tuple[float, float, float]:
    """mean, sample std, 95 % half-width over seeds (nan where n < 2)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, math.nan, math.nan
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, std, T975[min(n - 1, len(T975)) - 1] * std / math.sqrt(n)


class RunFailed(Exception):
    """One (configuration, seed) run did not finish; the message says which and ends with its log's tail."""


def run_one(name: str, command: str, seed: int, out: Path, threads: int | None = None) -> dict:
    run, command = out / f"{name}__s{seed}", command.replace("{seed}", str(seed))  # {seed}: e.g. a seed's checkpoint
    wall = run / "seeds_wall.json"
    if not (run / "metrics.json").is_file():
        script, *flags = shlex.split(command)
        cmd = [sys.executable, script, *flags, "--seed", str(seed), "--out-dir", str(out), "--run-name", run.name]
        print(f"$ {shlex.join(cmd[1:])}", flush=True)
        t0 = time.perf_counter()
        if run.exists():  # an interrupted run: continue it from its last complete epoch when it has one
            cmd = [sys.executable, script, "--resume", str(run / "last.pt")] if (run / "last.pt").is_file() else None
            if cmd is None:
                raise RunFailed(f"{run} exists without last.pt or metrics.json; move it away to rerun it")
        env = os.environ | ({"OMP_NUM_THREADS": str(threads)} if threads else {})
        log = out / f"{run.name}.log"  # the run's own output; a failing run's error is at its end
        out.mkdir(parents=True, exist_ok=True)
        with log.open("a") as f:
            result = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
        if result.returncode:
            tail = "".join(log.read_text().splitlines(True)[-5:])
            raise RunFailed(f"{name} seed {seed} failed (exit {result.returncode}); end of {log}:\n{tail}")
        metrics = json.loads((run / "metrics.json").read_text())
        metrics["wall_s"] = time.perf_counter() - t0
        print(f"  {run.name}: val GT-known {metrics.get('val/GT-known Loc', math.nan):.1f}, "
              f"{metrics['wall_s'] / 60:.1f} min", flush=True)
        wall.write_text(json.dumps({"wall_s": metrics["wall_s"], "command": command}))
        return metrics
    metrics = json.loads((run / "metrics.json").read_text())
    saved = json.loads(wall.read_text()) if wall.is_file() else {}  # runs of older sweeps kept no command
    if saved.get("command", command) != command:  # the same name, other flags: never mix the two in one table
        raise RunFailed(f"{run} was made by `{saved['command']}`, not `{command}`; use another name or --out-dir")
    metrics["wall_s"] = saved.get("wall_s", math.nan)
    return metrics


def table(results: dict[str, dict[int, dict]], baseline: str | None, split: str = "test") -> str:
    seeds, metrics = sorted(next(iter(results.values()))), SPLITS[split]
    where = "test split, τ chosen on val" if split == "test" else "val split, each metric at its best τ on val"
    lines = [f"seeds {' '.join(map(str, seeds))} (n = {len(seeds)}); {where}; mean ± std [95 % interval half-width]",
             "", "| config | " + " | ".join(metrics) + " | wall (min) |", "|---" * (len(metrics) + 2) + "|"]
    for name, runs in results.items():
        cells = []
        for key in metrics.values():
            mean, std, half = stats([runs[s][key] for s in seeds])
            cells.append(f"{mean:.1f} ± {std:.1f} [±{half:.1f}]")
        walls = [runs[s]["wall_s"] / 60 for s in seeds if math.isfinite(runs[s]["wall_s"])]
        cells.append(f"{sum(walls) / len(walls):.1f}" if walls else "-")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if baseline:
        lines += ["", f"paired differences vs {baseline} (same seeds): mean [95 % interval]", "",
                  "| config | " + " | ".join(metrics) + " | per-seed GT-known differences |",
                  "|---" * (len(metrics) + 2) + "|"]
        for name, runs in results.items():
            if name == baseline:
                continue
            cells = []
            for key in metrics.values():
                diffs = [runs[s][key] - results[baseline][s][key] for s in seeds]
                mean, _, half = stats(diffs)
                cells.append(f"{mean:+.1f} [{mean - half:+.1f}, {mean + half:+.1f}]")
            per_seed = [runs[s][metrics["GT-known"]] - results[baseline][s][metrics["GT-known"]] for s in seeds]
            lines.append(f"| {name} | " + " | ".join(cells) + " | " + " ".join(f"{d:+.1f}" for d in per_seed) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", action="append", required=True, metavar='NAME="METHOD.py FLAGS"',
                        help="a configuration to run (repeat the flag for several)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[26, 27, 28], help="seeds (default: 26 27 28)")
    parser.add_argument("--baseline", default=None, help="the configuration the paired differences are taken against")
    parser.add_argument("--out-dir", default="runs/seeds", help="where the runs go, relative to the current folder "
                        "unless absolute (default: runs/seeds)")
    parser.add_argument("--split", choices=list(SPLITS), default="test",
                        help="test (τ chosen on val; the reported numbers) or val (for choosing presets)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (default 1: time one thing at a time)")
    parser.add_argument("--threads", type=int, default=None,
                        help="OMP_NUM_THREADS of each run (default: torch's choice; with --jobs 2 on 2 cores, 1)")
    args = parser.parse_args(argv)
    if args.jobs < 1 or (args.threads is not None and args.threads < 1):
        parser.error("--jobs and --threads must be >= 1")
    configs = {}
    for item in args.config:
        name, sep, command = item.partition("=")
        if not sep or not command.split() or not command.split()[0].endswith(".py"):
            parser.error(f'--config {item!r}: expected NAME="METHOD.py FLAGS"')
        configs[name] = command
    if args.baseline and args.baseline not in configs:
        parser.error(f"--baseline {args.baseline!r} is not one of the configurations {list(configs)}")
    out = Path(args.out_dir).resolve()  # the runs start in ROOT: both sides must mean the caller's folder
    threads = args.threads or (1 if args.jobs > 1 else None)
    results, failed = {}, {}  # failed: name -> the seeds that did not finish
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:  # threads only wait on the subprocesses
        futures = {(name, s): pool.submit(run_one, name, command, s, out, threads)
                   for name, command in configs.items() for s in args.seeds}
        for (name, s), future in futures.items():  # a failed run is reported, and the sweep goes on
            try:
                results.setdefault(name, {})[s] = future.result()
            except RunFailed as e:
                print(f"error: {e}", file=sys.stderr, flush=True)
                failed.setdefault(name, []).append(s)
            except (OSError, ValueError) as e:  # e.g. an unreadable metrics.json
                print(f"error: {name} seed {s}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
                failed.setdefault(name, []).append(s)
    results = {name: runs for name, runs in results.items() if name not in failed}
    left_out = [f"{name} (seed{'s' * (len(s) > 1)} {' '.join(map(str, s))} failed)" for name, s in failed.items()]
    baseline = args.baseline if args.baseline in results else None
    text = table(results, baseline, args.split) if results else "no configuration finished all its seeds"
    if left_out:
        text += "\n\nleft out (a configuration is in the table only when every seed finished): " + ", ".join(left_out)
        if args.baseline and not baseline:
            text += f"; no paired differences, as the baseline {args.baseline} is left out"
    print(text, flush=True)
    if failed:
        runs = sum(map(len, failed.values()))
        raise SystemExit(f"error: {runs} of {len(configs) * len(args.seeds)} runs failed (see the errors above)")
    return text


if __name__ == "__main__":
    main()
