"""benchmarks/figure.py: the README's grid of maps from run folders (a training run and an --eval-only run)."""

import json
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


def test_extent_measures_maps_against_the_head_and_the_object(tiny_synthetic, tmp_path):
    """benchmarks/extent.py on a tiny fine-world run and on the backbone before fine-tuning (--epochs 0): shares in
    [0, 100], the head's area share equal to the masks' own; a coarse-world run is refused (it has no head masks)."""
    import data
    import extent

    root = data.ensure_synthetic(tmp_path / "fine", world="fine", n_train=32, n_val=8, n_test=8, size=32)
    tscam.main(tiny_args(tscam, root, tmp_path, "--data", "synthetic-fine", "--run-name", "t"))
    tscam.main(tiny_args(tscam, root, tmp_path, "--data", "synthetic-fine", "--run-name", "z", "--epochs", "0",
                         "--map", "attention"))
    results = extent.main([f"T={tmp_path / 't'}", f"Z={tmp_path / 'z'}", f"TT={tmp_path / 't'},{tmp_path / 't'}",
                           "--split", "test"])
    assert json.loads((tmp_path / "z" / "metrics.json").read_text())["method"] == "tscam"  # how figure.py loads it
    assert results.pop("TT") == results["T"]  # the same run twice: its own numbers, with a spread of 0
    heads, wholes = [], []
    for path in sorted((root / "parts").glob("*/test_*.png")):
        heads.append((np.asarray(Image.open(path)) > 0).sum())
        wholes.append((np.asarray(Image.open(root / "segmentations" / path.relative_to(root / "parts"))) > 0).sum())
    assert len(heads) == 8 and set(results) == {"T", "Z"}
    for r in results.values():
        assert 0 <= r["on object"] <= 100 and 0 <= r["head share"] <= 100 and r["box / GT"] > 0
        assert r["uniform"] == pytest.approx(100 * np.mean(np.array(heads) / np.array(wholes)))
    tscam.main(tiny_args(tscam, tiny_synthetic, tmp_path, "--run-name", "c"))
    with pytest.raises(SystemExit, match="synthetic-fine"):
        extent.main([f"C={tmp_path / 'c'}"])
