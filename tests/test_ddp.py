"""torchrun on CPU (gloo, 2 processes, started as a user would): one DDP step equals one process on the same global
batch for every method (SAT's area group and DA-WSOL's memory included), sharded evaluation equals one process
exactly, and a torchrun run writes one run folder and resumes."""

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, TINY_ARGS, read_rows

ENV = os.environ | {"OMP_NUM_THREADS": "1"}


def torchrun(*args: str, processes: int = 2) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", *args]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=ENV)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def python(*args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300, env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.parametrize("spec", ["tscam", "scm", "sat --map-loss-warmup 0 --area-group 0",
                                  "sat --map-loss-warmup 0 --area-group 2", "bas",
                                  "dawsol --lambda-dal 0 --lambda-universum 0.5"])
def test_ddp_step_equals_one_process(spec, tmp_path):
    """Two SGD steps with momentum on a fixed batch of 8 (drop-path 0): the weights and buffers (DA-WSOL's assigner
    memory) after 2 processes x 4 images equal 1 process x 8 images. DA-WSOL runs with L_d off here: its per-image
    sample draw is random per process (as crops are), the clustering and memory it feeds are checked."""
    method, *flags = spec.split()
    python("tests/ddp_step.py", method, str(tmp_path / "one.pt"), *flags)
    torchrun("tests/ddp_step.py", method, str(tmp_path / "two.pt"), *flags)
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert not torch.equal(one["before"]["vit.blocks.0.attn.qkv.weight"], one["after"]["vit.blocks.0.attn.qkv.weight"])
    one, two = one["after"], two["after"]
    assert one.keys() == two.keys()
    for k in one:
        assert torch.allclose(one[k].double(), two[k].double(), rtol=1e-5, atol=1e-5), (
            k, (one[k].double() - two[k].double()).abs().max().item())
    if method == "dawsol":
        assert one["tsa.universum_count"] == 16 and one["tsa.class_counts"].sum() > 0  # the memory saw 2 x 8 images


def test_sharded_evaluation_equals_one_process_exactly(tiny_synthetic, tmp_path):
    flags = [*TINY_ARGS, "--data-root", str(tiny_synthetic), "--out-dir", str(tmp_path)]
    python("scm.py", *flags, "--run-name", "train")
    ckpt = str(tmp_path / "train" / "last.pt")
    python("scm.py", *flags, "--run-name", "one", "--eval-only", "--checkpoint", ckpt)
    torchrun("scm.py", *flags, "--run-name", "two", "--eval-only", "--checkpoint", ckpt)
    one = json.loads((tmp_path / "one" / "metrics.json").read_text())
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert len(one) > 40 and one == two  # every metric of every protocol, PxAP included, bit for bit
    assert sorted(p.name for p in (tmp_path / "two" / "overlays").iterdir()) == sorted(
        p.name for p in (tmp_path / "one" / "overlays").iterdir())


def test_torchrun_run_writes_one_folder_and_resumes(tiny_synthetic, tmp_path):
    flags = [*TINY_ARGS, "--data-root", str(tiny_synthetic), "--out-dir", str(tmp_path)]
    out = torchrun("tscam.py", *flags, "--run-name", "d").stdout
    assert out.count("result [test") == 1  # rank 0 alone prints the report
    run = tmp_path / "d"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]
    assert {"args.json", "metrics.jsonl", "metrics.json", "last.pt", "overlays"} <= {p.name for p in run.iterdir()}
    state = torch.load(run / "last.pt", weights_only=False)
    assert len(state["rng_ranks"]) == 2
    torchrun("tscam.py", "--resume", str(run / "last.pt"), "--epochs", "2")
    assert [r["epoch"] for r in read_rows(run)] == [1, 2, 2] and sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_uneven_global_batch_is_an_error(tmp_path):
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "tscam.py", *TINY_ARGS, "--batch-size", "15", "--data-root", str(tmp_path / "none")],
                            cwd=ROOT, capture_output=True, text=True, timeout=300, env=ENV)
    assert result.returncode != 0 and "--batch-size 15 does not split evenly over 2 processes" in result.stderr
