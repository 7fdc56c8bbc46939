"""The second round of faults (issue: same seed, same numbers, whatever the cache, the folder or the signal). Each
numbered case of that issue is reproduced here on tiny data; the RNG and torchrun cases compare final numbers and
weights, not only exit codes. Metadata (case 9) is in test_data.py, seeds.py's folder and partial table in
test_seeds.py."""

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import common
import data
import tscam
from conftest import ROOT, TINY_ARGS, tiny_args

ENV = os.environ | {"OMP_NUM_THREADS": "1"}


def run(cwd: Path, *args: str, limit_bytes: int | None = None, timeout: int = 240) -> subprocess.CompletedProcess:
    """`python <args>` from `cwd` (data/cache/ and runs/ land there); limit_bytes caps every file this process
    writes (RLIMIT_FSIZE, SIGXFSZ ignored: a write past it fails with EFBIG, as a full disk fails with ENOSPC)."""
    def cap():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=ENV,
                          preexec_fn=cap if limit_bytes else None)


def one_line_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode not in (0, None), result.stdout[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    for needle in needles:
        assert needle in result.stderr, (needle, result.stderr)


def temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if ".tmp" in p.name) if folder.exists() else []


def weights(run_dir: Path) -> dict:
    return torch.load(run_dir / "last.pt", weights_only=False)["model"]


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def cub_copy(tiny_synthetic, tmp_path) -> Path:
    """The tiny synthetic set, a CUB-layout tree, as a --data cub root of its own (files the test may damage)."""
    root = tmp_path / "cub"
    shutil.copytree(tiny_synthetic, root)
    (root / "synthetic.json").unlink()
    return root


# 1. the cache is a speed switch: a cold cache, a warm cache and no cache train the same model from one seed
def test_cold_warm_and_no_cache_give_the_same_run(cub_copy, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # data/cache/ under tmp_path
    flags = ("--data", "cub", "--num-workers", "auto")
    cold = tscam.main(tiny_args(tscam, cub_copy, tmp_path, *flags, "--cache", "on", "--run-name", "cold"))
    assert len(list((tmp_path / "data" / "cache").glob("*.npy"))) == 3
    warm = tscam.main(tiny_args(tscam, cub_copy, tmp_path, *flags, "--cache", "on", "--run-name", "warm"))
    off = tscam.main(tiny_args(tscam, cub_copy, tmp_path, *flags, "--cache", "off", "--run-name", "off"))
    assert cold == warm == off
    assert same_weights(weights(tmp_path / "cold"), weights(tmp_path / "warm"))
    assert same_weights(weights(tmp_path / "cold"), weights(tmp_path / "off"))


# 2. torchrun on a cold cache: every rank starts from rank 0's weights, so last.pt reproduces the reported numbers
def test_torchrun_on_a_cold_cache_trains_one_model(cub_copy, tmp_path):
    flags = [*TINY_ARGS, "--data", "cub", "--data-root", str(cub_copy), "--out-dir", str(tmp_path / "runs"),
             "--cache", "on", "--drop-path", "0"]
    result = run(tmp_path, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                 str(ROOT / "tscam.py"), *flags, "--run-name", "ddp")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "cache: cub train" in result.stdout  # rank 0 built the cache while rank 1 waited
    reported = json.loads((tmp_path / "runs" / "ddp" / "metrics.json").read_text())
    again = run(tmp_path, str(ROOT / "tscam.py"), *flags, "--run-name", "eval", "--eval-only",
                "--checkpoint", str(tmp_path / "runs" / "ddp" / "last.pt"))
    assert again.returncode == 0, again.stderr[-3000:]
    evaluated = json.loads((tmp_path / "runs" / "eval" / "metrics.json").read_text())
    assert {k: v for k, v in evaluated.items() if k != "epoch"} == {k: v for k, v in reported.items() if k != "epoch"}


def test_ranks_start_from_rank_0s_weights(tmp_path):
    """Two processes seeded differently build different models; after broadcast_model (Run.start) both hold rank 0's
    parameters and buffers."""
    script = tmp_path / "start.py"
    script.write_text(f"""import sys, torch
sys.path.insert(0, {str(ROOT)!r})
import common, tscam
args = common.parse_args(tscam.Args, {TINY_ARGS!r})
common.apply_preset(args, tscam.PRESETS)
common.init_distributed("cpu")
rank = common.world()[0]
torch.manual_seed(100 + rank)
model = tscam.TSCAM(args, 5)
model.register_buffer("counts", torch.arange(3) + rank)
common.broadcast_model(model)
torch.save(model.state_dict(), {str(tmp_path)!r} + f"/rank{{rank}}.pt")
common.close_distributed()
""")
    result = run(tmp_path, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    a, b = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    torch.manual_seed(100)
    assert same_weights(a, b) and torch.equal(a["counts"], torch.arange(3))
    assert torch.equal(a["head.weight"], tscam.TSCAM(tiny_args(tscam, "x", "y"), 5).head.weight)


# 3. a damaged cache file is rebuilt, with one line saying so
@pytest.mark.parametrize("damage", ["truncate npy", "garbage json", "empty json"])
def test_damaged_cache_is_rebuilt(cub_copy, tmp_path, monkeypatch, capsys, damage):
    monkeypatch.chdir(tmp_path)
    first = data.get_dataset("cub", "test", 32, str(cub_copy), cache="on").cache.clone()
    npy = next((tmp_path / "data" / "cache").glob("*.npy"))
    if damage == "truncate npy":
        npy.write_bytes(npy.read_bytes()[:1000])
    else:
        npy.with_suffix(".json").write_text("{not json" if damage == "garbage json" else "")
    capsys.readouterr()
    again = data.get_dataset("cub", "test", 32, str(cub_copy), cache="on")
    assert "is damaged" in capsys.readouterr().out and torch.equal(again.cache, first)


# 4. a cache that cannot be written: one line (--cache on) or the image files instead (--cache auto); nothing left
def test_full_disk_while_writing_the_cache(cub_copy, tmp_path):
    flags = [str(ROOT / "tscam.py"), *TINY_ARGS, "--data", "cub", "--data-root", str(cub_copy),
             "--out-dir", str(tmp_path / "runs"), "--epochs", "0"]
    on = run(tmp_path, *flags, "--cache", "on", limit_bytes=100_000)  # the train split's array is 263 kB
    one_line_error(on, "cannot write the pixel cache", "File too large", "--cache off")
    assert temporaries(tmp_path / "data") == [] and list((tmp_path / "data" / "cache").glob("*train*")) == []
    auto = run(tmp_path, *flags, "--cache", "auto", limit_bytes=100_000)
    assert auto.returncode == 0, auto.stderr[-3000:]
    assert "reading the image files instead" in auto.stdout and temporaries(tmp_path / "data") == []
    assert len(list((tmp_path / "runs").glob("*/metrics.json"))) == 1


def test_unwritable_cache_folder(cub_copy, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").write_text("a file where data/cache/ should go")
    with pytest.raises(data.DataError, match=r"cannot write the pixel cache data/cache.*use --cache off"):
        data.get_dataset("cub", "test", 32, str(cub_copy), cache="on")
    assert data.get_dataset("cub", "test", 32, str(cub_copy), cache="auto").cache is None
    assert "reading the image files instead" in capsys.readouterr().out


# 5. a warm cache still finds a missing or changed image before training; overlays come from the cached pixels
def test_warm_cache_checks_the_image_files_first(cub_copy, tmp_path):
    flags = [str(ROOT / "tscam.py"), *TINY_ARGS, "--data", "cub", "--data-root", str(cub_copy),
             "--out-dir", str(tmp_path / "runs"), "--cache", "on"]
    assert run(tmp_path, *flags, "--epochs", "0").returncode == 0  # builds the cache
    images = sorted((cub_copy / "images").rglob("test_*.png"))
    images[3].unlink()
    one_line_error(run(tmp_path, *flags), f"test image {images[3]} is listed but cannot be read")
    images[3].write_bytes(images[4].read_bytes()[:100])  # back, truncated
    result = run(tmp_path, *flags)
    one_line_error(result, str(images[3]), "does not decode" if "does not decode" in result.stderr else "cannot read")
    assert "epoch 1" not in result.stdout  # found before training


def test_overlays_of_a_cached_split_come_from_its_pixels(cub_copy, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ds = data.get_dataset("cub", "test", 32, str(cub_copy), cache="on")
    expected = ds.display_image(2).copy()
    monkeypatch.setattr(data, "load_rgb", lambda path: pytest.fail("read an image file for an overlay"))
    assert np.array_equal(ds.display_image(2), expected)


def test_an_image_replaced_after_the_cache_was_built_is_used(cub_copy, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    ds = data.get_dataset("cub", "test", 32, str(cub_copy), cache="on")
    path = ds.records[0].path
    Image.new("RGB", (32, 32), (255, 0, 0)).save(path)
    capsys.readouterr()
    again = data.get_dataset("cub", "test", 32, str(cub_copy), cache="on")
    assert "image files changed" in capsys.readouterr().out
    assert again.display_image(0)[5, 5].tolist() == [255, 0, 0]


# 6. SIGTERM: exit 143, one line, no temporary file, during a set build and a cache build
def wait_for(check, proc: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.time() + seconds
    while not check():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)


def test_sigterm_during_the_synthetic_set_build(tmp_path):
    proc = subprocess.Popen([sys.executable, str(ROOT / "tscam.py"), "--data-root", str(tmp_path / "set"),
                             "--device", "cpu"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=ENV)
    wait_for(lambda: any(tmp_path.glob(".set.tmp-*/images/*")), proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143 and "Traceback" not in err, err
    assert err.strip().splitlines() == ["terminated (SIGTERM) before the first epoch was saved; nothing to resume"]
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_sigterm_during_a_cache_build(cub_copy, tmp_path):
    marker, script = tmp_path / "decoding", tmp_path / "slow.py"
    script.write_text(f"""import pathlib, sys, time
sys.path.insert(0, {str(ROOT)!r})
sys.argv = ["tscam.py", *{[*TINY_ARGS, "--data", "cub", "--data-root", str(cub_copy), "--cache", "on"]!r}]
import common, data, tscam
real = data.load_rgb
def slow(path):  # a slow disk: the build takes long enough to be stopped in the middle
    pathlib.Path({str(marker)!r}).touch()
    time.sleep(0.1)
    return real(path)
data.load_rgb = slow
common.cli(tscam.main, tscam.Args)
""")
    proc = subprocess.Popen([sys.executable, str(script)], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV)
    wait_for(marker.exists, proc)
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1].startswith("terminated (SIGTERM)"), err
    assert (tmp_path / "data" / "cache").is_dir() and list((tmp_path / "data" / "cache").iterdir()) == []


def test_stale_temporaries_of_a_killed_build_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)  # a process that has exited
    (tmp_path / f".set.tmp-{pid}-abc" / "images").mkdir(parents=True)
    (tmp_path / f".set.tmp-{os.getppid()}-abc").mkdir()  # a live process's build is left alone
    data.build_synthetic(tmp_path / "set", n_train=4, n_val=2, n_test=2, size=16)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".set.tmp-{os.getppid()}-abc", "set"]


# 7. --resume of a checkpoint copied next to another run's files: those files are not touched
def test_resume_of_a_copied_checkpoint_leaves_that_folder_alone(tiny_synthetic, tmp_path, monkeypatch):
    tscam.main(tiny_args(tscam, tiny_synthetic, tmp_path, "--run-name", "r"))
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(tmp_path / "r" / "last.pt", other / "last.pt")
    (other / "args.json").write_text('{"a": "another run"}\n')
    (other / "metrics.json").write_text('{"test/GT-known Loc": 99.0}\n')
    before = {p.name: p.read_bytes() for p in other.iterdir()}
    monkeypatch.chdir(tmp_path)
    final = tscam.main(common.parse_args(tscam.Args, ["--resume", str(other / "last.pt"), "--epochs", "2"]))
    assert {p.name: p.read_bytes() for p in other.iterdir()} == before
    (new,) = (tmp_path / "runs").iterdir()
    assert json.loads((new / "metrics.json").read_text()) == json.loads(json.dumps(final))


# 8. relative paths: a resume from another folder trains on the run's own data, or stops
def test_resume_from_another_folder_uses_the_runs_data(tiny_synthetic, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(tiny_synthetic, a / "set")
    b.mkdir()
    flags = [*TINY_ARGS, "--data-root", "set", "--out-dir", "runs", "--run-name", "r", "--schedule", "step"]
    assert run(a, str(ROOT / "tscam.py"), *flags).returncode == 0
    assert json.loads((a / "runs" / "r" / "args.json").read_text())["data_root"] == str(a / "set")
    resumed = run(b, str(ROOT / "tscam.py"), "--resume", str(a / "runs" / "r" / "last.pt"), "--epochs", "2")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "building" not in resumed.stdout and "| 4 steps/epoch" in resumed.stdout
    assert list(b.iterdir()) == []
    data.build_synthetic(b / "set", seed=0, n_train=32, n_val=16, n_test=16, size=32)  # another set
    wrong = run(b, str(ROOT / "tscam.py"), "--resume", str(a / "runs" / "r" / "last.pt"), "--epochs", "3",
                "--data-root", "set")
    one_line_error(wrong, f"trained on {a / 'set'} (64 train, 16 val, 16 test images)", "give --data-root")
    shutil.rmtree(a / "set")
    gone = run(b, str(ROOT / "tscam.py"), "--resume", str(a / "runs" / "r" / "last.pt"), "--epochs", "3")
    one_line_error(gone, f"its synthetic set {a / 'set'} is not there")


# 10. write failures while building the synthetic set
def test_synthetic_set_write_failures(tmp_path, monkeypatch):
    (tmp_path / "afile").write_text("x")
    one_line_error(run(tmp_path, str(ROOT / "tscam.py"), "--data-root", "afile"),
                   "cannot build the synthetic set at", "afile: it is a file")
    full = run(tmp_path, str(ROOT / "tscam.py"), "--data-root", "set", limit_bytes=3000)  # a PNG
    one_line_error(full, "cannot build the synthetic set at", "File too large")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path))
    monkeypatch.setattr(data.tempfile, "mkdtemp", refuse)
    with pytest.raises(data.DataError, match="cannot build the synthetic set at .*Permission denied"):
        data.build_synthetic(tmp_path / "set2", n_train=4, n_val=2, n_test=2, size=16)


# 11. messages
def test_checkpoint_messages(tmp_path):
    one_line_error(run(tmp_path, str(ROOT / "tscam.py"), "--eval-only", "--checkpoint", str(tmp_path)),
                   f"checkpoint {tmp_path} is a folder")
    deit = run(tmp_path, str(ROOT / "tscam.py"), "--eval-only", "--checkpoint", common.SYNTHETIC_DEIT)
    one_line_error(deit, "is a DeiT backbone", f"--pretrained {common.SYNTHETIC_DEIT}")
    assert len(deit.stderr) < 400
