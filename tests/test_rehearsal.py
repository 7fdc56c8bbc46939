"""Full-size rehearsal: every method at the real ViT-S/16 (224 px, width 384, depth 12, 6 heads) on real-size JPEGs
(300-500 px; RGB, L and CMYK) in the CUB layout, from a DeiT-format checkpoint, in fp32 and bf16; ILSVRC and
OpenImages30k layouts with one method each. One training step of 4 images and the evaluation per run, so what a GPU
run would first hit (shapes at 224, checkpoint keys, bf16 dtypes, odd image sizes and modes, the decoded-pixel cache,
worker processes, the run folder) fails here on CPU. The trees and the checkpoint are written once per session."""

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import bas
import common
import dawsol
import sat
import scm
import tscam

METHODS = {"tscam": tscam, "scm": scm, "sat": sat, "bas": bas, "dawsol": dawsol}
MODES = ("RGB", "L", "CMYK")  # CUB holds a few grayscale and CMYK JPEGs; load_rgb converts them


def photo(rng: np.random.Generator, size: tuple[int, int], mode: str) -> tuple[Image.Image, tuple[int, ...]]:
    """A smooth colour field (a 4 x 4 grid upsampled) with a brighter object rectangle: JPEG sizes like a photo's.
    Returns the image and its object box (x0, y0, x1, y1), inclusive pixels."""
    w, h = size
    grid = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8))
    image = np.asarray(grid.resize((w, h), Image.BILINEAR)).astype(np.int16)
    x0, y0 = int(rng.integers(0, w // 2)), int(rng.integers(0, h // 2))
    x1, y1 = int(rng.integers(x0 + w // 4, w)), int(rng.integers(y0 + h // 4, h))
    image[y0:y1 + 1, x0:x1 + 1] += 80
    return Image.fromarray(image.clip(0, 255).astype(np.uint8)).convert(mode), (x0, y0, x1, y1)


@pytest.fixture(scope="session")
def jpegs(tmp_path_factory) -> list[tuple[Image.Image, tuple[int, ...]]]:
    """16 photo-like images of odd sizes (300-500 px, both orientations), cycling through RGB, L and CMYK."""
    rng = np.random.default_rng(0)
    return [photo(rng, (int(rng.integers(300, 501)), int(rng.integers(300, 501))), MODES[i % 3]) for i in range(16)]


def save_jpeg(image: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="JPEG", quality=90)


def save_mask(size: tuple[int, int], box: tuple[int, ...], path: Path, value: int = 255) -> None:
    mask = np.zeros((size[1], size[0]), np.uint8)
    mask[box[1]:box[3] + 1, box[0]:box[2] + 1] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask).save(path)


def write_lines(path: Path, lines: list[str], end: str = "") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + end)  # wsolevaluation: no trailing newline; CUB: one


def write_cub(root: Path, jpegs, n_train: int) -> Path:
    """CUB-200-2011: 2 classes, n_train train + 4 test images, segmentations (PxAP); no CUBV2, so the val-split
    fallback (thresholds chosen on test, labelled) runs too."""
    cub = {k: [] for k in ("images", "image_class_labels", "train_test_split", "bounding_boxes")}
    for i, (image, (x0, y0, x1, y1)) in enumerate(jpegs[:n_train + 4], 1):
        rel = f"00{1 + i % 2}.Bird_{1 + i % 2}/Bird_{i:04d}.jpg"
        save_jpeg(image, root / "images" / rel)
        save_mask(image.size, (x0, y0, x1, y1), root / "segmentations" / Path(rel).with_suffix(".png"))
        for key, line in zip(cub, (f"{i} {rel}", f"{i} {1 + i % 2}", f"{i} {int(i <= n_train)}",
                                   f"{i} {x0}.0 {y0}.0 {x1 - x0}.0 {y1 - y0}.0"), strict=True):
            cub[key].append(line)
    for key, lines in cub.items():
        write_lines(root / f"{key}.txt", lines, "\n")
    write_lines(root / "classes.txt", ["1 001.Bird_1", "2 002.Bird_2"], "\n")
    return root


@pytest.fixture(scope="session")
def cub_root(tmp_path_factory, jpegs) -> Path:
    return write_cub(tmp_path_factory.mktemp("CUB_200_2011"), jpegs, 4)


@pytest.fixture(scope="session")
def cub_root_2(tmp_path_factory, jpegs) -> Path:
    """The same with 2 training images: the bf16 runs' one step is then 2 images (bf16 matmuls are slow on CPUs
    without bf16 units: a ViT-S backward of 4 images at 224 takes about 35 s on this one)."""
    return write_cub(tmp_path_factory.mktemp("CUB_200_2011"), jpegs, 2)


@pytest.fixture(scope="session")
def ilsvrc_root(tmp_path_factory, jpegs) -> Path:
    """ILSVRC with wsolevaluation metadata: train/<wnid>/, val/ (the test split), val2/ (ImageNetV2, val)."""
    root = tmp_path_factory.mktemp("ILSVRC")
    wnids = ("n01440764", "n01443537")
    splits = {"train": [f"train/{wnids[k % 2]}/{wnids[k % 2]}_{k}.JPEG" for k in range(4)],
              "test": [f"val/ILSVRC2012_val_{k + 1:08d}.JPEG" for k in range(4)],
              "val": [f"val2/{k % 2}/{k}.jpeg" for k in range(4)]}
    for offset, (split, ids) in zip((0, 4, 8), splits.items(), strict=True):
        meta, images = root / "metadata" / "ILSVRC" / split, jpegs[offset:offset + 4]
        for rel, (image, _) in zip(ids, images, strict=True):
            save_jpeg(image, root / rel)
        write_lines(meta / "image_ids.txt", ids)
        write_lines(meta / "class_labels.txt", [f"{rel},{k % 2}" for k, rel in enumerate(ids)])
        if split != "train":
            sizes = [f"{r},{im.size[0]},{im.size[1]}" for r, (im, _) in zip(ids, images, strict=True)]
            write_lines(meta / "image_sizes.txt", sizes)
            write_lines(meta / "localization.txt", [f"{r},{x0},{y0},{x1},{y1}" for r, (_, (x0, y0, x1, y1)) in
                                                    zip(ids, images, strict=True)])
    return root


@pytest.fixture(scope="session")
def openimages_root(tmp_path_factory, jpegs) -> Path:
    """OpenImages30k with wsolevaluation metadata: instance masks and ignore masks for val and test."""
    root = tmp_path_factory.mktemp("OpenImages")
    mids = ("0bt_c3", "0bt9lr")
    for offset, split in zip((4, 8, 12), ("train", "val", "test"), strict=True):
        meta, images = root / "metadata" / "OpenImages" / split, jpegs[offset:offset + 4]
        ids = [f"{split}/{mids[k % 2]}/{split}{k:02d}.jpg" for k in range(4)]
        for rel, (image, _) in zip(ids, images, strict=True):
            save_jpeg(image, root / rel)
        write_lines(meta / "image_ids.txt", ids)
        write_lines(meta / "class_labels.txt", [f"{rel},{k % 2}" for k, rel in enumerate(ids)])
        if split != "train":
            lines = []
            for k, (rel, (image, box)) in enumerate(zip(ids, images, strict=True)):
                stem = rel[:-len(".jpg")]
                save_mask(image.size, box, root / f"{stem}_m{mids[k % 2]}_a.png")
                save_mask(image.size, (0, 0, 20, 20), root / f"{stem}_ignore.png")
                lines.append(f"{rel},{stem}_m{mids[k % 2]}_a.png,{stem}_ignore.png")
            write_lines(meta / "image_sizes.txt", [])
            write_lines(meta / "localization.txt", lines)
    return root


@pytest.fixture(scope="session")
def deit_small(tmp_path_factory) -> Path:
    """A DeiT-S checkpoint in the official format, random weights: {"model": state dict} with the ImageNet head."""
    torch.manual_seed(0)
    vit = tscam.VisionTransformer(224, 16, 384, 12, 6)
    state = vit.state_dict() | {"head.weight": torch.randn(1000, 384) * 0.02, "head.bias": torch.zeros(1000)}
    path = tmp_path_factory.mktemp("deit") / "deit_small_patch16_224-random.pth"
    torch.save({"model": state}, path)
    return path


@pytest.fixture(autouse=True)
def fast_init(monkeypatch):
    """torch's trunc_normal_ (erfinv-based) takes 1-2 s for ViT-S's 22 M weights on this CPU, a tenth of a run; the
    checkpoint replaces them anyway, so the new modules get clamped normal draws instead (same range, same shapes)."""
    monkeypatch.setattr(torch.nn.init, "trunc_normal_",
                        lambda t, mean=0.0, std=1.0, a=-2.0, b=2.0: t.data.normal_(mean, std).clamp_(a, b))


@pytest.fixture
def cache_cwd(tmp_path_factory, monkeypatch) -> Path:
    """One working directory per session, so data/cache/ is built once and shared by the runs that use it."""
    cwd = Path(tmp_path_factory.getbasetemp()) / "rehearsal_cwd"
    cwd.mkdir(exist_ok=True)
    monkeypatch.chdir(cwd)
    return cwd


def finite_numbers(obj) -> list[float]:
    if isinstance(obj, dict):
        return [v for x in obj.values() for v in finite_numbers(x)]
    if isinstance(obj, list | tuple):
        return [v for x in obj for v in finite_numbers(x)]
    return [float(obj)] if isinstance(obj, int | float) and not isinstance(obj, bool) else []


def rehearse(module, data: str, root: Path, checkpoint: Path, out_dir: Path, precision: str, *flags: str) -> dict:
    """One full-size run through the CLI's parser and main(); checks the run folder and every logged number."""
    argv = ["--data", data, "--data-root", str(root), "--img-size", "224", "--patch-size", "16", "--pretrained",
            str(checkpoint), "--epochs", "1", "--batch-size", "4", "--cam-curve-interval", "0.01", "--device", "cpu",
            "--precision", precision, "--num-overlays", "2", "--log-every", "1", "--out-dir", str(out_dir),
            "--run-name", "run", *flags]
    args = common.parse_args(module.Args, argv)
    final = module.main(args)
    assert (args.arch, args.embed_dim, args.depth, args.heads) == ("deit_small", 384, 12, 6)  # the real ViT-S
    run = out_dir / "run"
    assert json.loads((run / "args.json").read_text())["precision"] == precision
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and rows[0]["epoch"] == 1 and rows[-1] == json.loads((run / "metrics.json").read_text())
    train = {k: v for k, v in rows[0].items() if k.startswith("train/")}
    assert train and all(math.isfinite(v) for v in train.values()), train  # the loss and its terms
    assert all(math.isfinite(v) for v in finite_numbers(final)), final  # maps are scored: a NaN map shows here
    scored = [k for k in final if k.startswith("test/") and ("BoxAcc" in k or "PxAP" in k or "Loc" in k)]
    assert scored and all(0.0 <= final[k] <= 100.0 for k in scored)
    state = torch.load(run / "last.pt", weights_only=False, mmap=True)  # mmap: the 260 MB are not read
    assert state["epoch"] == 1 and state["arch"]["embed_dim"] == 384
    overlays = list((run / "overlays").glob("*.png"))
    assert len(overlays) == 2 and all(p.stat().st_size > 0 for p in overlays)
    return final


# fp32 reads JPEGs through PIL in a worker process (--cache off, --num-workers auto); bf16 uses the default
# --cache auto, which memory-maps data/cache/ (built by the first run that needs it)
PRECISIONS = {"fp32": ("--cache", "off", "--num-workers", "auto"), "bf16": ()}


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("method", METHODS)
def test_cub_full_size(method, precision, cub_root, cub_root_2, deit_small, cache_cwd, tmp_path):
    root = cub_root_2 if precision == "bf16" else cub_root  # batch 4 of 2 images: one step of 2 (drop_last off)
    final = rehearse(METHODS[method], "cub", root, deit_small, tmp_path, precision, *PRECISIONS[precision])
    assert "test/PxAP" in final  # segmentations/ present
    if precision == "bf16":  # the train split cached at R = 256, the test split at 224 (resized, or crop: SAT, BAS)
        crop = "-crop" if METHODS[method].PRESETS["cub"].get("test_crop") else ""
        names = [p.name for p in (cache_cwd / "data" / "cache").iterdir()]
        for name in ("cub-train-256", f"cub-test-224{crop}"):
            assert sum(re.fullmatch(rf"{name}-[0-9a-f]{{16}}\.npy", n) is not None for n in names) == 1, (name, names)


def test_ilsvrc_full_size(ilsvrc_root, deit_small, cache_cwd, tmp_path):
    """SAT's ILSVRC preset: Resize(256) + CenterCrop(224) test geometry, drop_last, val2 as the val split."""
    final = rehearse(sat, "ilsvrc", ilsvrc_root, deit_small, tmp_path, "bf16")
    assert "val/MaxBoxAccV2" in final and "test/PxAP" not in final


def test_openimages_full_size(openimages_root, deit_small, cache_cwd, tmp_path):
    """BAS on OpenImages30k: masks with ignore regions, PxAP, thresholds on val; PIL path with a worker."""
    final = rehearse(bas, "openimages", openimages_root, deit_small, tmp_path, "fp32", "--cache", "off")
    assert "test/PxAP" in final and "val/PxAP" in final
