"""benchmarks/seeds.py: the statistics over seeds (hand-computed) and its table."""

import math
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
