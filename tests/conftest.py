"""Shared test fixtures: a tiny synthetic dataset on disk and the CLI flags of a tiny run."""

import dataclasses

import pytest

import common
import data

# A tiny ViT, one short epoch, a coarse threshold sweep: every method's CLI runs in seconds on one CPU core.
TINY_ARGS = ["--data", "synthetic", "--img-size", "32", "--patch-size", "8", "--embed-dim", "32", "--depth", "2",
             "--heads", "2", "--epochs", "1", "--batch-size", "16", "--pretrained", "none", "--device", "cpu",
             "--log-every", "1", "--cam-curve-interval", "0.01", "--num-overlays", "2"]


@pytest.fixture(scope="session")
def tiny_synthetic(tmp_path_factory):
    """A synthetic set in the CUB layout with 64 train / 16 val / 16 test images of 32 px."""
    root = tmp_path_factory.mktemp("synthetic")
    data.build_synthetic(root, seed=0, n_train=64, n_val=16, n_test=16, size=32)
    return root


def tiny_args(module, root, out_dir, *extra: str, **overrides):
    """The in-process Args of a tiny run of `module` (tscam, scm, ...), with its preset applied."""
    args = common.parse_args(module.Args, [*TINY_ARGS, "--data-root", str(root), "--out-dir", str(out_dir), *extra])
    args = dataclasses.replace(args, **overrides)
    common.apply_preset(args, module.PRESETS)
    return args


def assert_beats_trivial_baselines(final: dict) -> None:
    """A default synthetic run's test numbers (thresholds chosen on val) against image-independent boxes: GT-known
    30 points above the best centred square (side chosen on test itself), MaxBoxAccV2 30 above the whole image."""
    baselines = data.synthetic_baselines()  # GT-known % of trivial boxes on the synthetic test split
    assert final["test/GT-known Loc@val-τ"] >= baselines["best_centred_square"] + 30.0
    assert final["test/BoxAccV2@val-τ"] >= baselines["whole_image"] + 30.0
