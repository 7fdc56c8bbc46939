"""benchmarks/figure.py: the README's grid of maps from run folders (a training run and an --eval-only run)."""

import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import dawsol
import tscam
from conftest import ROOT, tiny_args

sys.path.insert(0, str(ROOT / "benchmarks"))
import figure  # noqa: E402


def test_figure_draws_one_column_per_run(tiny_synthetic, tmp_path):
    tscam.main(tiny_args(tscam, tiny_synthetic, tmp_path, "--run-name", "t"))
    tscam.main(tiny_args(tscam, tiny_synthetic, tmp_path, "--run-name", "s", "--eval-only", "--checkpoint",
                         str(tmp_path / "t" / "last.pt"), "--map", "semantic"))
    dawsol.main(tiny_args(dawsol, tiny_synthetic, tmp_path, "--run-name", "d"))
    out = figure.main([f"TS-CAM={tmp_path / 't'}", f"S={tmp_path / 's'}", f"DA-WSOL={tmp_path / 'd'}",
                       "--indices", "0", "3", "5", "--out", str(tmp_path / "fig.png")])
    sheet = np.asarray(Image.open(out).convert("RGB"))
    cell = figure.CELL + 2
    assert sheet.shape == (16 + 3 * cell, 4 * cell, 3)  # 3 images x (GT + 3 runs)
    first = sheet[16:16 + figure.CELL, :figure.CELL]  # the GT column: the image and a green box, no heat map
    assert ((first == [0, 255, 0]).all(-1)).any()
    runs = sheet[16:, cell:]
    assert ((runs == [255, 0, 0]).all(-1)).any()  # a scored box on some map
    assert out.stat().st_size < 300_000


def test_figure_needs_finished_runs(tmp_path):
    with pytest.raises(SystemExit, match="not a finished run folder"):
        figure.main([f"X={tmp_path}", "--out", str(tmp_path / "f.png")])
    assert not Path(tmp_path / "f.png").exists()
