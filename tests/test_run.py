"""The run machinery every method shares (common.Run, common.cli, data.load_splits): bad input fails early with one
line naming the flag or file, faults lose nothing, and nothing non-finite is ever reported (the bad-input issue's
numbered cases, each reproduced here)."""

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import common
import data
import scm
import tscam
from conftest import ROOT, TINY_ARGS, read_rows, tiny_args


def cli(script: str, *flags: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, script, *flags], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def tiny(root, out, *extra: str) -> list[str]:
    return [*TINY_ARGS, "--data-root", str(root), "--out-dir", str(out), *extra]


def one_line_error(result: subprocess.CompletedProcess, *needles: str) -> str:
    """A clean failure: exit != 0, no traceback, the message on stderr naming what it must name."""
    assert result.returncode not in (0, None), result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    for needle in needles:
        assert needle in result.stderr, (needle, result.stderr)
    return result.stderr


# 1. divergence
def test_diverged_run_stops_with_the_last_good_checkpoint(tiny_synthetic, tmp_path):
    result = cli("tscam.py", *tiny(tiny_synthetic, tmp_path, "--lr", "1e6", "--epochs", "3", "--run-name", "nan"))
    err = one_line_error(result, "diverged at epoch", "step", "cls")
    run = tmp_path / "nan"
    assert not (run / "metrics.json").exists()  # nothing reported as a result
    for line in (run / "metrics.jsonl").read_text().splitlines() if (run / "metrics.jsonl").exists() else []:
        row = json.loads(line)  # valid JSON, finite numbers only
        assert all(math.isfinite(v) for v in row.values() if isinstance(v, float)), row
    if (run / "last.pt").exists():  # an epoch finished before the NaN: its weights are finite and kept
        state = torch.load(run / "last.pt", weights_only=False)
        assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
        assert "last good checkpoint" in err


def test_json_files_are_valid_json_with_nan(tmp_path):
    common.write_json(tmp_path / "a.json", {"x": float("nan"), "y": [1.0, float("inf")]})
    common.append_jsonl(tmp_path / "b.jsonl", {"x": float("nan")})
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": None, "y": [1.0, None]}
    assert json.loads((tmp_path / "b.jsonl").read_text()) == {"x": None}


def test_check_finite_names_epoch_step_and_terms():
    with pytest.raises(SystemExit, match=r"epoch 2 step 5: loss nan \(cls nan, area 0.5\)"):
        common.check_finite(torch.tensor(float("nan")), {"cls": float("nan"), "area": 0.5}, 1, 4)
    with pytest.raises(SystemExit, match="grad norm inf"):
        common.check_finite(torch.tensor(1.0), {"cls": 1.0}, 0, 0, torch.tensor(float("inf")))
    common.check_finite(torch.tensor(1.0), {"cls": 1.0}, 0, 0, torch.tensor(3.0))  # finite: nothing happens


# 2. run folders are exclusive
def test_run_folders_never_collide(tmp_path):
    a = common.make_run_dir(str(tmp_path), "synthetic", "tscam", 26)
    b = common.make_run_dir(str(tmp_path), "synthetic", "tscam", 26)  # same second, same seed
    assert a != b and a.is_dir() and b.is_dir()
    common.make_run_dir(str(tmp_path), "synthetic", "tscam", 26, "named")
    with pytest.raises(SystemExit, match="exists; choose another --run-name"):
        common.make_run_dir(str(tmp_path), "synthetic", "tscam", 26, "named")


def test_two_runs_started_together_get_two_folders(tiny_synthetic, tmp_path):
    flags = tiny(tiny_synthetic, tmp_path, "--epochs", "1")
    procs = [subprocess.Popen([sys.executable, "tscam.py", *flags], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1] for o in outs]
    runs = sorted(p for p in tmp_path.iterdir() if p.is_dir())
    assert len(runs) == 2
    for run in runs:
        assert len(read_rows(run)) == 2 and (run / "metrics.json").is_file()  # one epoch row + the final row each


# 3. bad images are found before training
def _copy_set(src: Path, dst: Path) -> Path:
    import shutil
    shutil.copytree(src, dst)
    return dst


def test_missing_train_image_named_before_training(tiny_synthetic, tmp_path):
    root = _copy_set(tiny_synthetic, tmp_path / "set")
    first = next((root / "images").rglob("train_*.png"))
    first.unlink()
    result = cli("tscam.py", *tiny(root, tmp_path / "runs"))
    one_line_error(result, str(first), "missing")
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())  # nothing written


def test_truncated_test_image_named_before_training(tiny_synthetic, tmp_path):
    root = _copy_set(tiny_synthetic, tmp_path / "set")
    bad = next((root / "images").rglob("test_*.png"))
    bad.write_bytes(bad.read_bytes()[:60])
    result = cli("tscam.py", *tiny(root, tmp_path / "runs"))
    one_line_error(result, str(bad))
    assert "epoch 1" not in result.stdout  # found before any training


def test_truncated_jpeg_found_by_check_images(tmp_path):
    from PIL import Image
    path = tmp_path / "a.jpg"
    Image.new("RGB", (300, 200), (10, 200, 30)).save(path, quality=90)
    path.write_bytes(path.read_bytes()[:400])
    rec = data.Record(path=path, label=0, boxes=[], masks=[], ignore=None, size=None)
    ds = data.WSOLDataset("cub", "test", [rec], ["a"], 32)
    with pytest.raises(data.DataError, match="a.jpg does not decode"):
        data.check_images({"train": None, "val": None, "test": ds})


# 4. arguments are checked before any data loads
@pytest.mark.parametrize("flags, needle", [
    (["--cam-curve-interval", "0"], "--cam-curve-interval"),
    (["--cam-curve-interval", "-0.1"], "--cam-curve-interval"),
    (["--cam-curve-interval", "nan"], "--cam-curve-interval"),
    (["--cam-curve-interval", "2"], "--cam-curve-interval"),
    (["--epochs", "-1"], "--epochs"),
    (["--batch-size", "0"], "--batch-size"),
    (["--log-every", "0"], "--log-every"),
    (["--heads", "3", "--embed-dim", "32"], "not divisible by --heads"),
    (["--img-size", "4", "--patch-size", "8"], "--img-size 4"),
    (["--img-size", "30", "--patch-size", "8"], "multiple of --patch-size"),
    (["--device", "tpu"], "--device tpu"),
    (["--lr", "abc"], "invalid float value: 'abc'"),
    (["--drop-path", "-0.5"], "--drop-path"),
])
def test_bad_arguments_fail_before_data(flags, needle, tmp_path):
    root = tmp_path / "never-built"  # a data load would build the synthetic set here
    result = cli("tscam.py", *tiny(root, tmp_path / "runs", *flags), timeout=60)
    one_line_error(result, needle)
    assert not root.exists() and not (tmp_path / "runs").exists()


def test_help_shows_presets_not_none():
    out = cli("tscam.py", "--help").stdout
    assert "(default: None)" not in out and "None}" not in out and "preset: synthetic 3, cub 60, ilsvrc 20" in out
    assert out.count("(default:") >= 5


# 5. --resume restores the saved arguments, continues in its own folder
def test_resume_uses_saved_args_and_its_own_folder(tiny_synthetic, tmp_path):
    first = tscam.main(tiny_args(tscam, tiny_synthetic, tmp_path, "--epochs", "2", "--run-name", "straight",
                                 "--schedule", "step"))
    tscam.main(tiny_args(tscam, tiny_synthetic, tmp_path, "--epochs", "1", "--run-name", "r", "--schedule", "step"))
    ckpt = tmp_path / "r" / "last.pt"
    result = cli("tscam.py", "--resume", str(ckpt), "--epochs", "2", "--device", "cpu")  # no other flag repeated
    assert result.returncode == 0, result.stderr
    rows = read_rows(tmp_path / "r")
    assert [r["epoch"] for r in rows] == [1, 2, 2]  # two epoch rows and the final row: nothing duplicated
    assert json.loads((tmp_path / "r" / "metrics.json").read_text())["test/MaxBoxAccV2"] == pytest.approx(
        first["test/MaxBoxAccV2"], abs=1e-9)
    assert len([p for p in tmp_path.iterdir() if p.is_dir()]) == 2  # no new run folder
    changed = cli("tscam.py", "--resume", str(ckpt), "--seed", "3", "--embed-dim", "64")
    one_line_error(changed, "--seed: saved 26, given 3", "--embed-dim: saved 32, given 64")


def test_resume_after_a_failed_epoch_drops_its_rows(tiny_synthetic, tmp_path):
    tscam.main(tiny_args(tscam, tiny_synthetic, tmp_path, "--epochs", "1", "--run-name", "r"))
    run = tmp_path / "r"
    with open(run / "metrics.jsonl", "a") as f:  # a row of an epoch whose checkpoint never landed
        f.write(json.dumps({"epoch": 2, "train/cls": 1.0}) + "\n")
    args = common.parse_args(tscam.Args, ["--resume", str(run / "last.pt"), "--epochs", "2"])
    tscam.main(args)
    assert [r["epoch"] for r in read_rows(run)] == [1, 2, 2]


# 6. a checkpoint of another method or size
def test_wrong_method_or_size_checkpoint(tiny_synthetic, tmp_path):
    tscam.main(tiny_args(tscam, tiny_synthetic, tmp_path, "--run-name", "t"))
    ckpt = str(tmp_path / "t" / "last.pt")
    one_line_error(cli("scm.py", "--resume", ckpt), "tscam checkpoint", "tscam.py --resume")
    err = one_line_error(cli("scm.py", *tiny(tiny_synthetic, tmp_path, "--eval-only", "--checkpoint", ckpt)),
                         "holds a tscam model", "asks for a scm model")
    assert "width 32" in err
    wider = one_line_error(cli("tscam.py", *tiny(tiny_synthetic, tmp_path, "--eval-only", "--checkpoint", ckpt,
                                                 "--embed-dim", "64")), "width 32", "width 64")
    assert "Traceback" not in wider
    for bad in (torch.zeros(3), [1, 2]):
        torch.save(bad, tmp_path / "bad.pth")
        with pytest.raises(SystemExit, match="bad.pth"):
            tscam.load_deit_weights(tscam.VisionTransformer(32, 8, 32, 2, 2), str(tmp_path / "bad.pth"))


def test_eval_only_reports_the_checkpoint_epoch(tiny_synthetic, tmp_path):
    tscam.main(tiny_args(tscam, tiny_synthetic, tmp_path, "--epochs", "2", "--run-name", "t"))
    again = tscam.main(tiny_args(tscam, tiny_synthetic, tmp_path, "--run-name", "e", "--eval-only", "--checkpoint",
                                 str(tmp_path / "t" / "last.pt")))
    assert again["epoch"] == 2


# 7. forgetting --data on a real dataset folder
def test_real_layout_without_data_flag(tmp_path):
    root = tmp_path / "CUB_200_2011"
    root.mkdir()
    for name in ("images.txt", "bounding_boxes.txt", "classes.txt"):
        (root / name).write_text("1 x\n")
    result = cli("tscam.py", "--data-root", str(root), "--out-dir", str(tmp_path / "runs"), "--device", "cpu")
    err = one_line_error(result, "--data cub")
    assert "building" not in result.stdout and "remove" not in err
    assert sorted(p.name for p in root.iterdir()) == ["bounding_boxes.txt", "classes.txt", "images.txt"]


# 8. Ctrl-C
@pytest.mark.parametrize(("sig", "code", "word"), [(signal.SIGINT, 130, "interrupted"),
                                                    (signal.SIGTERM, 143, "terminated (SIGTERM)")])
def test_ctrl_c_and_sigterm_exit_with_the_resume_command(tiny_synthetic, tmp_path, sig, code, word):
    proc = subprocess.Popen([sys.executable, "tscam.py", *tiny(tiny_synthetic, tmp_path, "--epochs", "500",
                                                                "--run-name", "c", "--log-every", "1000")],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as in a terminal
    deadline = time.time() + 120  # (a suite started as a background job passes SIGINT on as ignored: no Ctrl-C)
    while not (tmp_path / "c" / "metrics.jsonl").exists() and time.time() < deadline:  # an epoch is complete
        time.sleep(0.2)
    time.sleep(0.5)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert "Traceback" not in err, err
    assert err.strip().splitlines()[-1].startswith(f"{word}: epoch ")
    assert f"--resume {tmp_path / 'c' / 'last.pt'}" in err.strip().splitlines()[-1], err
    assert [p.name for p in (tmp_path / "c").iterdir() if ".tmp" in p.name] == []


def test_ctrl_c_inside_a_checkpoint_write_lands_after_it(tmp_path):
    """Ctrl-C while torch.save writes (its C++ writer calls the file's write) surfaced as a RuntimeError, i.e. "cannot
    write last.pt" and exit 1 (3 of 20 interrupts in a stress run); now it waits for the write and rename, then acts."""
    state, calls = {"model": {"w": torch.arange(100_000.0)}}, []

    def write(f):
        class Interrupted:  # the file torch.save writes to; Ctrl-C arrives during its third write
            def write(self, b):
                calls.append(len(b))
                if len(calls) == 3:
                    signal.raise_signal(signal.SIGINT)
                return f.write(b)

            def flush(self):
                f.flush()

        torch.save(state, Interrupted())

    with pytest.raises(KeyboardInterrupt):
        common._atomic_write(tmp_path / "last.pt", write)
    assert len(calls) > 3 and torch.equal(torch.load(tmp_path / "last.pt")["model"]["w"], state["model"]["w"])
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the usual handler is back


# 9. write faults
def test_write_fault_is_one_line_and_keeps_the_previous_checkpoint(tiny_synthetic, tmp_path, monkeypatch):
    tscam.main(tiny_args(tscam, tiny_synthetic, tmp_path, "--epochs", "1", "--run-name", "w"))
    ckpt = tmp_path / "w" / "last.pt"
    before = ckpt.read_bytes()

    def disk_full(*_args, **_kw):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")
    monkeypatch.setattr(torch, "save", disk_full)
    args = common.parse_args(tscam.Args, ["--resume", str(ckpt), "--epochs", "2"])
    with pytest.raises(SystemExit, match=f"cannot write {ckpt}"):
        tscam.main(args)
    assert ckpt.read_bytes() == before and not list(ckpt.parent.glob(".last.pt.*"))
    monkeypatch.undo()

    def enospc(_fd):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "fsync", enospc)
    with pytest.raises(SystemExit, match="No space left on device"):
        common.write_json(tmp_path / "w" / "metrics.json", {"a": 1.0})


# 10. no orphan run folders
@pytest.mark.parametrize("flags", [["--pretrained", "missing.pth"], ["--eval-only"],
                                   ["--eval-only", "--checkpoint", "nope.pt"], ["--resume", "nope.pt"]])
def test_failed_starts_leave_no_folder(tiny_synthetic, tmp_path, flags):
    result = cli("tscam.py", *tiny(tiny_synthetic, tmp_path / "runs", *flags))
    one_line_error(result, "error:")
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


# 11. file modes follow the umask
def test_outputs_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        common.write_json(tmp_path / "a.json", {})
        common.save_checkpoint({"model": {}}, tmp_path / "last.pt")
        data.build_synthetic(tmp_path / "syn", n_train=4, n_val=2, n_test=2, size=16)
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "last.pt").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "syn").stat().st_mode & 0o777 == 0o755


# the report a newcomer reads
def test_report_leads_with_a_headline_and_ends_with_the_files(tiny_synthetic, tmp_path):
    result = cli("tscam.py", *tiny(tiny_synthetic, tmp_path, "--run-name", "r", "--map", "attention"))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("result [test, wsolevaluation, τ from val"))
    assert "class-agnostic attention map" in lines[head] and "GT-known" in lines[head] and len(lines[head]) < 160
    assert all("wsolevaluation (GT-class" not in line for line in lines[head:])
    assert lines[-1].startswith("wrote ") and "metrics.json" in lines[-1] and "overlays" in lines[-1]


def test_precision_flag_bf16_on_cpu(tiny_synthetic, tmp_path):
    final = tscam.main(tiny_args(tscam, tiny_synthetic, tmp_path, "--precision", "bf16", "--run-name", "b"))
    assert math.isfinite(final["test/MaxBoxAccV2"])
    assert isinstance(common.autocast(torch.device("cpu"), "bf16"), torch.autocast)
    assert not isinstance(common.autocast(torch.device("cpu"), "auto"), torch.autocast)
    assert not isinstance(common.autocast(torch.device("cuda"), "fp32"), torch.autocast)
    with common.autocast(torch.device("cpu"), "bf16"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16


def test_checkpoints_record_method_and_arch(tiny_synthetic, tmp_path):
    tscam.main(tiny_args(tscam, tiny_synthetic, tmp_path, "--run-name", "t"))
    state = torch.load(tmp_path / "t" / "last.pt", weights_only=False)
    assert state["method"] == "tscam"
    assert state["arch"] == {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "heads": 2,
                             "num_classes": 10}
    assert dataclasses.asdict(tiny_args(tscam, tiny_synthetic, tmp_path))["drop_last"] is False
    assert isinstance(scm.PRESETS["cub"]["drop_last"], bool)


@pytest.mark.parametrize("module, dataset, steps", [
    ("tscam", "cub", 47), ("scm", "cub", 375), ("sat", "cub", 24), ("bas", "cub", 24), ("dawsol", "cub", 188),
    ("sat", "ilsvrc", 1_281_167 // 512), ("bas", "ilsvrc", -(-1_281_167 // 512)), ("tscam", "ilsvrc", 5005)])
def test_steps_per_epoch_follow_the_official_loaders(module, dataset, steps):
    """CUB trains on 5,994 images, ILSVRC on 1,281,167; every official loader keeps the last partial batch except
    SAT's ILSVRC one (DistributedSampler + drop_last)."""
    preset = __import__(module).PRESETS[dataset]
    n = 5994 if dataset == "cub" else 1_281_167
    assert common.steps_per_epoch(n, preset["batch_size"], preset["drop_last"]) == steps


@pytest.mark.parametrize("script, flags, needle", [
    ("sat.py", ["--num-sa-blocks", "0"], "--num-sa-blocks 0: must be >= 1"),
    ("bas.py", ["--beta", "-1"], "--beta -1.0: must be >= 0"),
    ("dawsol.py", ["--n-samples", "-3"], "--n-samples -3: must be >= 0"),
    ("scm.py", ["--scm-alpha", "inf"], "--scm-alpha inf: must be a finite number"),
])
def test_method_knobs_checked_before_data(script, flags, needle, tmp_path):
    root = tmp_path / "never-built"
    one_line_error(cli(script, *tiny(root, tmp_path / "runs", *flags), timeout=60), needle)
    assert not root.exists()


def test_overlay_caption_and_scored_box(tmp_path):
    from PIL import Image
    image, scoremap = np.zeros((32, 32, 3), np.uint8), np.zeros((32, 32))
    common.save_overlay(image, scoremap, [[4, 4, 20, 20]], [[0, 0, 31, 31], [4, 4, 19, 19]], tmp_path / "a.png",
                        caption="true a | predicted b\ntau 0.100 | IoU 0.88", scored=1)
    out = np.asarray(Image.open(tmp_path / "a.png"))
    assert out.shape[0] > 256 and out.shape[1] == 512  # the caption strip under the two 256-px panels
    assert (out[0, 100] == (255, 165, 0)).all()  # the unscored candidate (whole image) in orange
    assert (out[4 * 8, 4 * 8 + 20] == (255, 0, 0)).all() and (out[4 * 8 + 1, 4 * 8 + 20] == (255, 0, 0)).all()
    assert (out[260:, :200] < 128).any()  # text
