"""The input pipeline (decoded-pixel cache, device-side crops, --num-workers auto), --arch and gpu_check's CPU exit."""

import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.transforms import v2

import bas
import common
import data
import dawsol
import sat
import scm
import tscam

ROOT = Path(__file__).resolve().parent.parent
METHODS = (tscam, scm, sat, bas, dawsol)


@pytest.fixture
def cub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A CUB tree of 6 JPEGs of odd sizes in RGB, L and CMYK; the working directory (data/cache/) is tmp_path."""
    monkeypatch.chdir(tmp_path)
    root, rng = tmp_path / "CUB", np.random.default_rng(1)
    lines = {k: [] for k in ("images", "image_class_labels", "train_test_split", "bounding_boxes")}
    for i in range(1, 7):
        w, h = int(rng.integers(41, 97)), int(rng.integers(41, 97))
        rel = f"001.A/a_{i}.jpg"
        (root / "images" / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(("RGB", "L", "CMYK")[i % 3]).save(
            root / "images" / rel, quality=85)
        for key, line in zip(lines, (f"{i} {rel}", f"{i} 1", f"{i} {i % 2}", f"{i} 3.0 4.0 {w // 2}.0 {h // 3}.0"),
                             strict=True):
            lines[key].append(line)
    for key, rows in lines.items():
        (root / f"{key}.txt").write_text("\n".join(rows) + "\n")
    (root / "classes.txt").write_text("1 001.A\n")
    return root


def same_items(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k]
                                        for k in a)


@pytest.mark.parametrize("test_crop", [False, True])
def test_cached_eval_items_equal_uncached(cub, test_crop):
    plain = data.get_dataset("cub", "test", 32, str(cub), test_crop=test_crop)
    cached = data.get_dataset("cub", "test", 32, str(cub), test_crop=test_crop, cache="on")
    assert plain.cache is None and cached.cache is not None and cached.cache.dtype == torch.uint8
    assert all(same_items(plain[i], cached[i]) for i in range(len(plain)))


def test_cached_train_pixels_are_the_pil_resize_and_crops_match(cub):
    ds = data.get_dataset("cub", "train", 32, str(cub), cache="on")
    assert ds.cache.shape == (len(ds), 3, 37, 37)  # R = round(32 * 256 / 224)
    for i, rec in enumerate(ds.records):  # exactly the PIL path's Resize((R, R)), through the same v2 code
        assert torch.equal(ds.cache[i], v2.Compose([v2.Resize((37, 37)), v2.ToImage()])(data.load_rgb(rec.path)))
    torch.manual_seed(5)
    item = ds[1]
    torch.manual_seed(5)  # the same draws: top, left, flip
    top, left, flip = torch.randint(0, 6, (1,)).item(), torch.randint(0, 6, (1,)).item(), torch.rand(1).item() < 0.5
    crop = ds.cache[1][:, top:top + 32, left:left + 32]
    assert torch.equal(item["image"], data.normalize(crop.flip(-1) if flip else crop))


def test_cache_is_keyed_atomic_and_reused(cub, monkeypatch, capsys):
    data.get_dataset("cub", "test", 32, str(cub), cache="on")
    assert "img/s" in capsys.readouterr().out  # the build's progress line
    files = sorted(p.name for p in (Path("data") / "cache").iterdir())
    assert len(files) == 2 and files[0].endswith(".json") and files[1].endswith(".npy")  # no temporary left
    monkeypatch.setattr(data, "build_pixel_cache", lambda *a: pytest.fail("rebuilt an up-to-date cache"))
    assert data.get_dataset("cub", "test", 32, str(cub), cache="auto").cache is not None
    monkeypatch.undo()
    monkeypatch.chdir(cub.parent)
    lines = (cub / "train_test_split.txt").read_text().replace("1 1\n", "1 0\n")  # image 1 moves to test
    (cub / "train_test_split.txt").write_text(lines)
    data.get_dataset("cub", "test", 32, str(cub), cache="on")
    assert len(list((Path("data") / "cache").glob("*.npy"))) == 2  # another image list: another key


def test_cache_auto_respects_the_budget(cub, monkeypatch, capsys):
    monkeypatch.setattr(data, "CACHE_BUDGET", 1000)
    assert data.get_dataset("cub", "test", 32, str(cub), cache="auto").cache is None
    assert "not caching" in capsys.readouterr().out and not (Path("data") / "cache").exists()
    assert data.get_dataset("cub", "test", 32, str(cub), cache="on").cache is not None  # on ignores the budget


def test_device_batches_equal_the_host_path(cub):
    """DeviceBatches (what CUDA gets) finishes the same uint8 pixels with the same draws: equal batches (on CPU)."""
    ds = data.get_dataset("cub", "train", 32, str(cub), cache="on")
    torch.manual_seed(0)
    host = list(data.make_loader(ds, 2, True, "auto", seed=1))
    torch.manual_seed(0)
    raw = DataLoader(data.RawPixels(ds), batch_size=2, shuffle=True, collate_fn=data.collate,
                     generator=torch.Generator().manual_seed(int(np.random.SeedSequence([1, 0]).generate_state(1)[0])))
    device = list(data.DeviceBatches(raw, ds, torch.device("cpu")))
    assert len(host) == len(device) == 2
    assert all(torch.equal(a["image"], b["image"]) and torch.equal(a["index"], b["index"])
               for a, b in zip(host, device, strict=True))


@pytest.mark.gpu
def test_cuda_loader_finishes_on_the_device(cub):
    ds = data.get_dataset("cub", "test", 32, str(cub), cache="on")
    cuda = next(iter(data.make_loader(ds, 4, False, device="cuda")))
    host = next(iter(data.make_loader(ds, 4, False)))
    assert cuda["image"].is_cuda and torch.equal(cuda["image"].cpu(), host["image"])


def test_num_workers_auto(cub, monkeypatch):
    monkeypatch.setattr(data.os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    files = data.get_dataset("cub", "train", 32, str(cub))
    cached = data.get_dataset("cub", "train", 32, str(cub), cache="on")
    assert (data.worker_count("auto", files), data.worker_count("auto", cached), data.worker_count("3", files)) == (
        8, 0, 3)
    loader = data.make_loader(files, 2, True, 0)
    assert loader.loader.num_workers == 0 and not loader.loader.pin_memory
    for value, ok in (("auto", True), ("0", True), (2, True), ("-1", False), ("many", False)):
        args = dataclasses.replace(tscam.Args(), num_workers=value)
        common.apply_preset(args, tscam.PRESETS)
        if ok:
            common.check_args(args)
        else:
            with pytest.raises(SystemExit, match="--num-workers"):
                common.check_args(args)


# %% --arch
@pytest.mark.parametrize("module", METHODS, ids=lambda m: m.__name__)
def test_arch_sets_sizes_unless_given(module):
    def sizes(*argv):
        args = common.parse_args(module.Args, list(argv))
        common.apply_preset(args, module.PRESETS)
        return args.arch, args.embed_dim, args.depth, args.heads

    assert sizes("--data", "cub") == ("deit_small", 384, 12, 6)  # the default: DeiT-S
    assert sizes("--data", "ilsvrc", "--arch", "deit_tiny") == ("deit_tiny", 192, 12, 3)
    assert sizes("--data", "cub", "--arch", "deit_base", "--depth", "6") == ("deit_base", 768, 6, 12)
    assert sizes("--data", "synthetic") == (None, 128, 4, 4)  # the tiny synthetic ViT stays
    assert sizes("--data", "synthetic", "--arch", "deit_tiny") == ("deit_tiny", 192, 12, 3)


@pytest.mark.parametrize("arch", ["deit_tiny", "deit_small", "deit_base"])
def test_each_deit_size_loads(arch, tmp_path, monkeypatch):
    """A DeiT-format state dict of each size loads by exact key match, from a file and as --pretrained deit (the
    arch's own URL, torch.hub mocked: CI is offline)."""
    width, depth, heads, url = tscam.DEIT_ARCHS[arch]
    with monkeypatch.context() as m:  # skip the random init: the weights are written below
        m.setattr(torch.nn.init, "trunc_normal_", lambda t, **kw: t)
        vit = tscam.VisionTransformer(224, 16, width, depth, heads)
    torch.manual_seed(0)
    state = {k: torch.randn_like(v) for k, v in vit.state_dict().items()}
    torch.save({"model": state | {"head.weight": torch.zeros(1000, width), "head.bias": torch.zeros(1000)}},
               tmp_path / "deit.pth")
    tscam.load_deit_weights(vit, str(tmp_path / "deit.pth"))
    assert all(torch.equal(v, state[k]) for k, v in vit.state_dict().items())
    fetched = []
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url",
                        lambda u, **kw: fetched.append(u) or torch.load(tmp_path / "deit.pth", weights_only=True))
    tscam.load_deit_weights(vit, "deit")
    assert fetched == [url] and url.startswith("https://dl.fbaipublicfiles.com/deit/")


def test_pretrained_deit_needs_an_official_size():
    vit = tscam.VisionTransformer(32, 16, 384, 2, 6)
    with pytest.raises(SystemExit, match="no official DeiT"):
        tscam.load_deit_weights(vit, "deit")


# %% benchmarks/gpu_check.py
def test_gpu_check_without_cuda_says_so_and_exits_0():
    result = subprocess.run([sys.executable, "benchmarks/gpu_check.py"], cwd=ROOT, capture_output=True, text=True,
                            timeout=120, env={"CUDA_VISIBLE_DEVICES": "", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    assert "no CUDA device" in result.stdout
