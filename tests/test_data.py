"""data.py on tiny trees in the exact CUB, ILSVRC and OpenImages (wsolevaluation) layouts: labels, the GT box and
mask rules (spec metrics_data.md §2.1, §4), transforms, loaders, the synthetic generator and its cache, errors."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import common
import data
import tscam
from conftest import TINY_ARGS

SMALL = {"n_train": 20, "n_val": 10, "n_test": 10, "size": 32}  # a synthetic set that builds in a fraction of a second


def save(path: Path, image: Image.Image, **kwargs) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)


def write_lines(path: Path, lines: list[str], end: str = "\n") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + end)


def solid(mode: str, size: tuple[int, int], colour) -> Image.Image:
    return Image.new(mode, size, colour)


def palette_image(size: tuple[int, int]) -> Image.Image:
    image = Image.new("P", size, 1)
    image.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)  # index 1 -> (10, 200, 30)
    return image


@pytest.fixture
def cub(tmp_path: Path) -> Path:
    """Six images in the raw CUB layout: one per image mode (RGB, L, RGBA, CMYK, P) in test, one RGB in train.
    The first is the spec's example: 500 x 335 with box 60 27 325 304."""
    root = tmp_path / "CUB_200_2011"
    a, b = "001.Black_footed_Albatross", "002.Laysan_Albatross"
    files = [  # path, image, class id (1-based), is_train, box x y w h
        (f"{a}/a.jpg", solid("RGB", (500, 335), (120, 60, 30)), 1, 0, "60.0 27.0 325.0 304.0"),
        (f"{a}/b.png", solid("L", (40, 30), 90), 1, 0, "2.0 3.0 20.0 10.0"),
        (f"{b}/c.png", solid("RGBA", (30, 30), (200, 10, 10, 0)), 2, 0, "0.0 0.0 29.0 29.0"),
        (f"{b}/d.jpg", solid("CMYK", (30, 20), (0, 255, 0, 0)), 2, 0, "5.0 5.0 10.0 10.0"),
        (f"{b}/e.png", palette_image((20, 20)), 2, 0, "1.0 1.0 5.0 5.0"),
        (f"{b}/f.jpg", solid("RGB", (50, 40), (1, 2, 3)), 2, 1, "1.0 1.0 5.0 5.0"),
    ]
    for rel, image, *_ in files:
        save(root / "images" / rel, image)
        seg = np.zeros((image.height, image.width), np.uint8)
        seg[:, : image.width // 2] = 200  # left half: foreground
        seg[:, image.width // 2 : 3 * image.width // 4] = 100  # grey <= 127: background under the > 127 rule
        save(root / "segmentations" / Path(rel).with_suffix(".png"), Image.fromarray(seg))
    write_lines(root / "classes.txt", [f"1 {a}", f"2 {b}"])
    write_lines(root / "images.txt", [f"{i} {f[0]}" for i, f in enumerate(files, 1)])
    write_lines(root / "image_class_labels.txt", [f"{i} {f[2]}" for i, f in enumerate(files, 1)])
    write_lines(root / "train_test_split.txt", [f"{i} {f[3]}" for i, f in enumerate(files, 1)])
    write_lines(root / "bounding_boxes.txt", [f"{i} {f[4]}" for i, f in enumerate(files, 1)])
    return root


@pytest.fixture
def synthetic(tmp_path: Path) -> Path:
    return data.build_synthetic(tmp_path / "synthetic", seed=1, **SMALL)


# %% GT box rules
def test_wsoleval_rescale_rule():
    # wsolevaluation's unit test: (1, 2, 4, 3) in a 10 (w) x 20 (h) image, rescaled to 35 x 10
    np.testing.assert_array_equal(data.rescale_boxes(np.array([[1, 2, 4, 3]]), (10, 20), (35, 10)), [[3, 1, 14, 1]])
    # multiply first, then divide: 61 * 224 / 112 = 122 exactly, while 61 / 112 * 224 = 121.999...
    assert data.rescale_boxes(np.array([[61, 0, 61, 0]]), (112, 112), (224, 224))[0, 0] == 122


def test_sat_crop_rule():
    # Resize 256 + CenterCrop 224 (offset 16): x0 = trunc(max(x / W * 256 - 16, 0)), x1 = trunc(min(.., 223))
    boxes = np.array([[60, 27, 385, 331], [0, 0, 10, 10]])
    # the second box falls left of the crop: x0, y0 clip to 0 but x1, y1 keep their negative values (no lower clip)
    np.testing.assert_array_equal(data.crop_boxes(boxes, (500, 335), 256, 224), [[14, 4, 181, 223], [0, 0, -10, -8]])
    assert data.crop_offset(256, 224) == 16 and data.crop_offset(73, 64) == 4  # torchvision's round-half-even


def test_tscam_scm_repo_box_rule():
    # TS-CAM / SCM (lib/datasets/cub.py, imagenet.py): divide first, clip x1, y1 at S - 1, then trunc. A 112 x 112
    # image to 224: 61 / 112 * 224 = 121.999.. -> 121 (wsolevaluation: 61 * 224 / 112 = 122), and the right / bottom
    # edge 112 -> min(224, 223) = 223 (wsolevaluation: 224): 1 px apart on three coordinates
    box = np.array([[61, 0, 112, 112]])
    np.testing.assert_array_equal(data.rescale_boxes(box, (112, 112), (224, 224)), [[122, 0, 224, 224]])
    np.testing.assert_array_equal(data.repo_boxes_tscam(box, (112, 112), (224, 224)), [[121, 0, 223, 223]])
    # CUB: the raw x y w h are truncated one by one first: 10.7 3.5 20.6 7.6 -> 10 3 20 7 -> (10, 3, 30, 10), x 2
    raw = np.array([[10.7, 3.5, 10.7 + 20.6, 3.5 + 7.6]])  # parse_cub's (x, y, x + w, y + h)
    np.testing.assert_array_equal(data.repo_boxes_tscam(raw, (112, 112), (224, 224), from_cub_xywh=True),
                                  [[20, 6, 60, 20]])
    np.testing.assert_array_equal(data.repo_boxes_tscam(raw, (112, 112), (224, 224)), [[21, 7, 62, 22]])  # ILSVRC
    np.testing.assert_array_equal(data.rescale_boxes(raw, (112, 112), (224, 224)), [[21, 7, 62, 22]])
    # x0, y0 are clipped below at 0, x1, y1 only above (as in the repos); several boxes keep their order
    two = np.array([[-5, -5, 300, 300], [1, 1, 2, 2]])
    np.testing.assert_array_equal(data.repo_boxes_tscam(two, (224, 224), (224, 224)), [[0, 0, 223, 223], [1, 1, 2, 2]])


def test_items_carry_repo_boxes_by_their_own_rule(cub: Path):
    # the first test box touches the image's right and bottom edges, and its x, w are fractional
    lines = (cub / "bounding_boxes.txt").read_text().splitlines()
    write_lines(cub / "bounding_boxes.txt", ["1 60.7 27.0 439.3 308.0", *lines[1:]])
    ds = data.get_dataset("cub", "test", 32, root=str(cub))
    item = ds[0]
    # wsolevaluation: trunc(60.7 * 32 / 500) = 3, trunc(27 * 32 / 335) = 2, 500 * 32 / 500 = 32, 335 * 32 / 335 = 32
    assert item["boxes"].tolist() == [[3, 2, 32, 32]]
    # TS-CAM / SCM: int(60.7) = 60 -> 3, 2; x1 = 60 + int(439.3) = 499 -> 31.9 -> 31; y1 = min(32, 31) = 31
    assert item["repo_boxes"].tolist() == [[3, 2, 31, 31]] and item["repo_boxes"].dtype == torch.int64
    batch = data.collate([ds[0], ds[1]])
    assert [b.tolist() for b in batch["repo_boxes"]] == [[[3, 2, 31, 31]], ds[1]["repo_boxes"].tolist()]
    assert [b.tolist() for b in batch["boxes"]] == [[[3, 2, 32, 32]], ds[1]["boxes"].tolist()]
    crop = data.get_dataset("cub", "test", 32, root=str(cub), test_crop=True)  # SAT / BAS geometry: their own rule
    assert "repo_boxes" not in crop[0] and data.collate([crop[0]])["repo_boxes"] is None

def test_cub_labels_and_box_rule(cub: Path):
    records, names = data.parse_cub(cub, "test", None)
    assert names == ["Black_footed_Albatross", "Laysan_Albatross"]
    assert [r.label for r in records] == [0, 0, 1, 1, 1]  # 1-based class ids -> 0-based
    np.testing.assert_array_equal(records[0].boxes, [[60, 27, 385, 331]])  # (x, y, x + w, y + h), inclusive
    train, _ = data.parse_cub(cub, "train", None)
    assert [r.path.name for r in train] == ["f.jpg"]

    ds = data.get_dataset("cub", "test", 32, root=str(cub))
    assert (ds.num_classes, len(ds), ds.has_boxes, ds.has_masks) == (2, 5, True, True)
    item = ds[0]
    assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32 and item["label"] == 0
    # trunc(60 * 32 / 500) = 3, trunc(27 * 32 / 335) = 2, trunc(385 * 32 / 500) = 24, trunc(331 * 32 / 335) = 31
    assert item["boxes"].tolist() == [[3, 2, 24, 31]] and item["boxes"].dtype == torch.int64
    # SAT / BAS geometry at S = 32: R = round(32 * 256 / 224) = 37, offset 2
    assert data.get_dataset("cub", "test", 32, root=str(cub), test_crop=True)[0]["boxes"].tolist() == [[2, 0, 26, 31]]


def test_image_modes_become_rgb(cub: Path):
    ds = data.get_dataset("cub", "test", 16, root=str(cub))
    colours = [ds.display_image(i)[8, 8].tolist() for i in range(len(ds))]
    assert np.abs(np.array(colours[0]) - [120, 60, 30]).max() <= 2  # through JPEG
    assert colours[1] == [90, 90, 90]  # grayscale -> equal channels
    assert colours[2] == [200, 10, 10]  # RGBA: alpha dropped, not composited (as cv2.imread)
    assert np.abs(np.array(colours[3]) - [255, 0, 255]).max() <= 3  # CMYK (0, 255, 0, 0), through JPEG
    assert colours[4] == [10, 200, 30]  # palette
    assert ds.display_image(0).shape == (16, 16, 3) and ds.display_image(0).dtype == np.uint8
    for i in range(len(ds)):  # the normalised tensor is the same eval view
        np.testing.assert_array_equal(data.denormalize(ds[i]["image"]), ds.display_image(i))


def test_cub_segmentation_masks(cub: Path):
    # image b is 40 x 30: columns 0-19 are 200 (foreground), 20-29 are 100 (background under > 127), the rest 0;
    # at S = 20 the OpenCV nearest rule takes source column floor(d * 2): foreground is d < 10
    mask = data.get_dataset("cub", "test", 20, root=str(cub))[1]["mask"]
    assert mask.dtype == torch.uint8 and mask.shape == (20, 20)
    assert (mask[:, :10] == 1).all() and (mask[:, 10:] == 0).all()


# %% Masks
def test_label_map_nearest_rule_and_ignore():
    mask = np.zeros((5, 7), np.uint8)
    mask[1:3, 2:5] = 255
    ignore = np.zeros((5, 7), np.uint8)
    ignore[0:4, 1:6] = 255  # overlaps the foreground: ignore minus foreground -> 255
    out = data.label_map([mask], ignore, 0, 8)
    rows = np.minimum(np.floor(np.arange(8) * (1.0 / (8 / 5))), 4).astype(int)  # OpenCV INTER_NEAREST indices
    cols = np.minimum(np.floor(np.arange(8) * (1.0 / (8 / 7))), 6).astype(int)
    fg, ig = mask[np.ix_(rows, cols)] > 0, ignore[np.ix_(rows, cols)] > 0
    np.testing.assert_array_equal(out, np.where(fg, 1, np.where(ig, 255, 0)))
    assert set(np.unique(out)) == {0, 1, 255}
    # resize to R then centre crop S, like the images of the SAT / BAS geometry
    full = data.label_map([mask], ignore, 0, 10)
    np.testing.assert_array_equal(data.label_map([mask], ignore, 0, 8, resize=10), full[1:9, 1:9])


def write_openimages(root: Path) -> None:
    """wsolevaluation's OpenImages layout: two classes, test split; image one has two instance masks (one 1-bit,
    one RGBA that reads as empty: RGB 0 with alpha 255) and an RGB ignore mask."""
    for i, cls in enumerate(["0bt_c3", "0bt9lr"]):
        save(root / "train" / cls / f"t{i}.jpg", solid("RGB", (8, 8), (50, 50, 50)))
        save(root / "test" / cls / f"x{i}.jpg", solid("RGB", (8, 6), (60, 70, 80)))
    m1 = np.zeros((6, 8), bool)
    m1[1:3, 1:4] = True
    save(root / "test/0bt_c3/x0_m0bt_c3_a.png", Image.fromarray(m1).convert("1"))
    save(root / "test/0bt_c3/x0_m0bt_c3_b.png", solid("RGBA", (8, 6), (0, 0, 0, 255)))
    ig = np.zeros((6, 8, 3), np.uint8)
    ig[0:4, 0:6] = (255, 0, 0)  # red reads as luma 76 > 0
    save(root / "test/0bt_c3/x0_ignore.png", Image.fromarray(ig))
    m2 = np.zeros((6, 8), np.uint8)
    m2[4:, 6:] = 255
    save(root / "test/0bt9lr/x1_m0bt9lr_a.png", Image.fromarray(m2))
    save(root / "test/0bt9lr/x1_ignore.png", Image.fromarray(np.zeros((6, 8), np.uint8)))
    meta = root / "metadata" / "OpenImages"
    write_lines(meta / "train/image_ids.txt", ["train/0bt_c3/t0.jpg", "train/0bt9lr/t1.jpg"], "")
    write_lines(meta / "train/class_labels.txt", ["train/0bt_c3/t0.jpg,0", "train/0bt9lr/t1.jpg,1"], "")
    write_lines(meta / "test/image_ids.txt", ["test/0bt_c3/x0.jpg", "test/0bt9lr/x1.jpg"], "")
    write_lines(meta / "test/class_labels.txt", ["test/0bt_c3/x0.jpg,0", "test/0bt9lr/x1.jpg,1"], "")
    write_lines(meta / "test/image_sizes.txt", [], "")  # empty for OpenImages
    write_lines(meta / "test/localization.txt", [
        "test/0bt_c3/x0.jpg,test/0bt_c3/x0_m0bt_c3_a.png,test/0bt_c3/x0_ignore.png",
        "test/0bt_c3/x0.jpg,test/0bt_c3/x0_m0bt_c3_b.png,",  # later lines of an image leave the ignore field empty
        "test/0bt9lr/x1.jpg,test/0bt9lr/x1_m0bt9lr_a.png,test/0bt9lr/x1_ignore.png"], "")


def test_openimages_masks(tmp_path: Path):
    root = tmp_path / "OpenImages"
    write_openimages(root)
    ds = data.get_dataset("openimages", "test", 8, root=str(root))
    assert (ds.has_boxes, ds.has_masks, ds.class_names) == (False, True, ["0bt_c3", "0bt9lr"])
    # 8 x 6 -> 8 x 8 with the nearest rule: source rows [0, 0, 1, 2, 3, 3, 4, 5]
    rows = np.array([0, 0, 1, 2, 3, 3, 4, 5])
    fg = np.zeros((6, 8), np.uint8)
    fg[1:3, 1:4] = 1
    expected = np.where(fg == 1, 1, 0)
    expected[0:4, 0:6][fg[0:4, 0:6] == 0] = 255
    batch = data.collate([ds[0], ds[1]])
    assert batch["boxes"] is None and batch["mask"].shape == (2, 8, 8) and batch["label"].tolist() == [0, 1]
    np.testing.assert_array_equal(batch["mask"][0].numpy(), expected[rows])
    assert batch["mask"][1].sum().item() == 4 and batch["mask"][1][6:, 6:].eq(1).all()
    assert "boxes" not in ds[0]


# %% ILSVRC
def test_ilsvrc_metadata_layout(tmp_path: Path):
    root, meta = tmp_path / "ILSVRC", tmp_path / "wsoleval_metadata" / "ILSVRC"  # metadata kept elsewhere
    for wnid in ("n01440764", "n01443537"):
        save(root / "train" / wnid / f"{wnid}_1.JPEG", solid("RGB", (12, 12), (1, 1, 1)))
    save(root / "val" / "ILSVRC2012_val_00000001.JPEG", solid("L", (50, 40), 128))
    save(root / "val" / "ILSVRC2012_val_00000002.JPEG", solid("RGB", (50, 40), (9, 9, 9)))
    save(root / "val2" / "1" / "0.jpeg", solid("RGB", (20, 10), (9, 9, 9)))
    train = ["train/n01440764/n01440764_1.JPEG", "train/n01443537/n01443537_1.JPEG"]
    write_lines(meta / "train/image_ids.txt", train, "")
    write_lines(meta / "train/class_labels.txt", [f"{train[0]},0", f"{train[1]},1"], "")
    test = ["val/ILSVRC2012_val_00000001.JPEG", "val/ILSVRC2012_val_00000002.JPEG"]
    write_lines(meta / "test/image_ids.txt", test, "")
    write_lines(meta / "test/class_labels.txt", [f"{test[0]},1", f"{test[1]},0"], "")
    write_lines(meta / "test/image_sizes.txt", [f"{test[0]},50,40", f"{test[1]},50,40"], "")
    write_lines(meta / "test/localization.txt", [f"{test[0]},11,10,44,19", f"{test[1]},4,4,49,16",
                                                 f"{test[1]},0,6,43,20"], "")  # repeated id: two boxes
    write_lines(meta / "val/image_ids.txt", ["val2/1/0.jpeg"], "")
    write_lines(meta / "val/class_labels.txt", ["val2/1/0.jpeg,1"], "")
    write_lines(meta / "val/image_sizes.txt", ["val2/1/0.jpeg,20,10"], "")
    write_lines(meta / "val/localization.txt", ["val2/1/0.jpeg,2,1,17,8"], "")

    ds = data.get_dataset("ilsvrc", "test", 20, root=str(root), metadata_root=str(tmp_path / "wsoleval_metadata"))
    assert ds.class_names == ["n01440764", "n01443537"] and [ds[i]["label"] for i in range(2)] == [1, 0]
    # trunc(x * 20 / 50) and trunc(y * 20 / 40)
    assert ds[0]["boxes"].tolist() == [[4, 5, 17, 9]]
    assert ds[1]["boxes"].tolist() == [[1, 2, 19, 8], [0, 3, 17, 10]]
    assert "mask" not in ds[0] and ds.has_masks is False
    val = data.get_dataset("ilsvrc", "val", 20, root=str(root), metadata_root=str(tmp_path / "wsoleval_metadata"))
    assert val[0]["boxes"].tolist() == [[2, 2, 17, 16]] and val[0]["label"] == 1
    train_ds = data.get_dataset("ilsvrc", "train", 8, root=str(root), metadata_root=str(meta))
    assert set(train_ds[0]) == {"image", "label", "index"} and train_ds[0]["image"].shape == (3, 8, 8)


# %% Transforms and loaders
def test_train_transform_crops_and_flips(synthetic: Path, cub: Path):
    ds = data.get_dataset("synthetic", "train", 32, root=str(synthetic))
    assert ds.resize == 37 and ds.cache.shape == (20, 3, 37, 37)
    base = data.normalize(ds.cache[0])  # (3, 37, 37): the deterministic Resize((R, R)) of the first image
    torch.manual_seed(0)
    seen = set()
    for _ in range(60):
        out = ds[0]["image"]
        match = [(top, left, flip) for top in range(6) for left in range(6) for flip in (0, 1)
                 if torch.equal((base.flip(-1) if flip else base)[:, top:top + 32, left:left + 32], out)]
        assert match, "the output is not a crop (optionally flipped) of the resized image"
        seen.add(match[0])
    assert len({(top, left) for top, left, _ in seen}) > 5 and {flip for *_, flip in seen} == {0, 1}
    # disk path (torchvision v2 on PIL): shape, and the random crop / flip changes the output
    pil_ds = data.get_dataset("cub", "train", 16, root=str(cub))
    x = pil_ds[0]["image"]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and set(pil_ds[0]) == {"image", "label", "index"}
    no_aug = data.get_dataset("synthetic", "train", 32, root=str(synthetic), train_augment=False)
    assert torch.equal(no_aug[0]["image"], data.normalize(torch.from_numpy(no_aug.display_image(0)).permute(2, 0, 1)))


def test_loaders(synthetic: Path):
    ds = data.get_dataset("synthetic", "train", 32, root=str(synthetic))
    order = [torch.cat([b["index"] for b in data.make_loader(ds, 8, train=True, seed=3, epoch=e)]) for e in (0, 0, 1)]
    assert sorted(order[0].tolist()) == list(range(20))  # 20 images: the last partial batch is kept (official rule)
    assert torch.equal(order[0], order[1]) and not torch.equal(order[0], order[2])
    dropped = [len(b["label"]) for b in data.make_loader(ds, 8, train=True, seed=3, drop_last=True)]
    assert dropped == [8, 8]  # SAT's ILSVRC rule
    assert [common.steps_per_epoch(20, 8, d) for d in (False, True)] == [3, 2]
    test = data.get_dataset("synthetic", "test", 32, root=str(synthetic))
    batches = list(data.make_loader(test, 4, train=False))
    assert [len(b["label"]) for b in batches] == [4, 4, 2]
    assert torch.cat([b["index"] for b in batches]).tolist() == list(range(10))
    b = batches[0]
    assert b["image"].shape == (4, 3, 32, 32) and b["label"].dtype == torch.int64 and b["mask"].shape == (4, 32, 32)
    assert len(b["boxes"]) == 4 and b["boxes"][0].shape == (1, 4)


def test_denormalize_roundtrip():
    x = torch.randint(0, 256, (2, 3, 5, 4), dtype=torch.uint8)
    out = data.denormalize(torch.stack([data.normalize(im) for im in x]))
    np.testing.assert_array_equal(out, x.permute(0, 2, 3, 1).numpy())


# %% Synthetic set
def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_synthetic_layout_and_determinism(tmp_path: Path):
    a = files(data.build_synthetic(tmp_path / "a", seed=1, **SMALL))
    b = files(data.build_synthetic(tmp_path / "b", seed=1, **SMALL))
    c = files(data.build_synthetic(tmp_path / "c", seed=2, **SMALL))
    assert a == b
    images = [k for k in a if k.endswith(".png") and not k.startswith("segmentations")]
    assert len(images) == 40 and sum(a[k] != c.get(k) for k in images) == len(images)
    for name in ("images.txt", "image_class_labels.txt", "train_test_split.txt", "bounding_boxes.txt", "classes.txt",
                 "metadata/val/image_ids.txt", "metadata/val/class_labels.txt", "metadata/val/image_sizes.txt",
                 "metadata/val/localization.txt", "synthetic.json"):
        assert name in a
    assert json.loads(a["synthetic.json"]) == {"version": data.SYNTH_VERSION, "seed": 1, **SMALL}
    # written CUB boxes: (x, y, x + w, y + h) is the tight inclusive box of the segmentation mask
    root = tmp_path / "a"
    for r in data.parse_cub(root, "test", None)[0]:
        mask = np.asarray(Image.open(r.masks[0])) > 127
        assert tuple(r.boxes[0]) == data.tight_box(mask)
    for r in data.parse_cub(root, "val", None)[0]:  # val: wsolevaluation metadata, images under CUBV2/
        assert "CUBV2" in r.path.parts and tuple(r.boxes[0]) == data.tight_box(np.asarray(Image.open(r.masks[0])))


def test_synthetic_splits(synthetic: Path):
    for split, n in (("train", 20), ("val", 10), ("test", 10)):
        ds = data.get_dataset("synthetic", split, 32, root=str(synthetic))
        assert (len(ds), ds.num_classes, ds.has_boxes, ds.has_masks) == (n, 10, True, True)
        assert all(0 <= r.label < 10 for r in ds.records)
    item = ds[3]  # test split at its native size: the box is the tight box of the mask
    assert tuple(item["boxes"][0].tolist()) == data.tight_box(item["mask"].numpy() == 1)


def test_synthetic_cache_invalidation(synthetic: Path, monkeypatch: pytest.MonkeyPatch):
    marker = synthetic / "synthetic.json"
    stamp = marker.stat().st_mtime_ns
    data.ensure_synthetic(synthetic, seed=1, **SMALL)
    data.get_dataset("synthetic", "test", 32, root=str(synthetic))  # any recorded seed / size is accepted
    assert marker.stat().st_mtime_ns == stamp
    data.ensure_synthetic(synthetic, seed=2, **SMALL)  # seed differs -> rebuilt
    assert json.loads(marker.read_text())["seed"] == 2
    monkeypatch.setattr(data, "SYNTH_VERSION", data.SYNTH_VERSION + 1)  # generator changed -> rebuilt
    data.ensure_synthetic(synthetic, **SMALL)
    assert json.loads(marker.read_text())["version"] == data.SYNTH_VERSION
    marker.unlink()  # no marker: a half-written set -> rebuilt
    data.ensure_synthetic(synthetic, **SMALL)
    assert marker.is_file() and sorted(p.name for p in synthetic.parent.iterdir()) == ["synthetic"]
    other = synthetic.parent / "other"
    write_lines(other / "notes.txt", ["not ours"])  # a folder that is not a synthetic set is never replaced
    with pytest.raises(data.DataError, match="not a synthetic set"):
        data.ensure_synthetic(other, **SMALL)
    assert (other / "notes.txt").is_file()


def test_failed_build_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    calls, real_save = [], data.save_png

    def failing_save(array: np.ndarray, path: Path) -> None:
        calls.append(path)
        if len(calls) > 15:
            raise OSError("disk full")
        real_save(array, path)

    monkeypatch.setattr(data, "save_png", failing_save)
    with pytest.raises(data.DataError, match="cannot build the synthetic set at .*synthetic: disk full"):
        data.build_synthetic(tmp_path / "synthetic", **SMALL)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(data, "save_png", real_save)
    data.build_synthetic(tmp_path / "synthetic", seed=1, **SMALL)
    calls.clear()
    monkeypatch.setattr(data, "save_png", failing_save)
    with pytest.raises(data.DataError):  # a failed rebuild keeps the previous complete set
        data.build_synthetic(tmp_path / "synthetic", seed=2, **SMALL)
    assert json.loads((tmp_path / "synthetic" / "synthetic.json").read_text())["seed"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["synthetic"]


def test_synthetic_baselines(synthetic: Path):
    result = data.synthetic_baselines(synthetic)
    assert set(result) == {"whole_image", "centred_mean_box", "best_centred_square", "best_square_side"}
    # the whole image contains every GT box, so its IoU is the GT area fraction
    boxes = np.array([[float(v) for v in line.split()[1:]] for line in (synthetic / "bounding_boxes.txt").read_text()
                      .splitlines()])[-10:]  # the last 10 ids are the test split
    area = (boxes[:, 2] + 1) * (boxes[:, 3] + 1) / 32**2
    assert result["whole_image"] == pytest.approx(100 * np.mean(area >= 0.5))
    assert 1 <= result["best_square_side"] <= 32 and result["best_centred_square"] >= result["whole_image"]


# %% Errors
def test_missing_root_message(tmp_path: Path):
    with pytest.raises(data.DataError) as e:
        data.get_dataset("cub", "test", 32, root=str(tmp_path / "nowhere"))
    message = str(e.value)
    assert str(tmp_path / "nowhere") in message and "https://data.caltech.edu" in message and "synthetic" in message
    with pytest.raises(data.DataError, match="image-net.org"):
        data.get_dataset("ilsvrc", "test", 32, root=str(tmp_path / "nowhere"))
    with pytest.raises(data.DataError, match="drive.google.com"):
        data.get_dataset("openimages", "test", 32, root=str(tmp_path / "nowhere"))
    assert issubclass(data.DataError, ValueError)


def test_malformed_lines_name_file_and_line(cub: Path, tmp_path: Path):
    lines = (cub / "images.txt").read_text().splitlines()
    lines[2] = "3"
    write_lines(cub / "images.txt", lines)
    with pytest.raises(data.DataError, match=r"images\.txt:3"):
        data.get_dataset("cub", "test", 32, root=str(cub))
    root = tmp_path / "OpenImages"
    write_openimages(root)
    write_lines(root / "metadata/OpenImages/test/class_labels.txt", ["test/0bt_c3/x0.jpg,0", "test/0bt9lr/x1.jpg,x"])
    with pytest.raises(data.DataError, match=r"class_labels\.txt:2"):
        data.get_dataset("openimages", "test", 8, root=str(root))


def test_unreadable_image_names_the_file(cub: Path):
    (cub / "images" / "001.Black_footed_Albatross" / "a.jpg").write_bytes(b"not an image")
    ds = data.get_dataset("cub", "test", 32, root=str(cub))
    with pytest.raises(data.DataError, match="a.jpg"):
        ds[0]


def test_cub_without_its_val_split_chooses_thresholds_on_test_and_says_so(tiny_synthetic, tmp_path, capsys):
    root = tmp_path / "cub"  # the synthetic set is in CUB's layout; without CUBV2 and its metadata it is raw CUB
    shutil.copytree(tiny_synthetic, root)
    shutil.rmtree(root / "metadata")
    shutil.rmtree(root / "CUBV2")
    with pytest.raises(data.MissingSplit, match="no CUB val metadata"):
        data.get_dataset("cub", "val", 32, str(root))
    splits = data.get_splits("cub", 32, str(root))
    assert splits["val"] is None and len(splits["train"]) == 64 and len(splits["test"]) == 16
    argv = [*TINY_ARGS, "--data", "cub", "--data-root", str(root), "--out-dir", str(tmp_path / "runs")]
    final = tscam.main(common.parse_args(tscam.Args, argv))
    out = capsys.readouterr().out
    assert "no val split, so CAM thresholds will be chosen on the test split itself" in out
    assert "swept with Δ=0.01 on test itself" in out and "[val]" not in out
    assert 0.0 <= final["test/MaxBoxAccV2"] <= 100.0
    assert not any(k.startswith("val/") or k.endswith("@val-τ") for k in final)
    (root / "train_test_split.txt").write_text("1 x\n")  # a malformed file is still an error, not a fallback
    with pytest.raises(data.DataError, match="train_test_split.txt:1"):
        data.get_splits("cub", 32, str(root))


# %% Metadata that would silently corrupt a benchmark: non-finite coordinates, repeated ids
def write_ilsvrc(root: Path) -> Path:
    """A minimal ILSVRC tree (wsolevaluation metadata under root/metadata): two test images of 50 x 40, the second
    with two boxes (a repeated id in localization.txt). Returns the test metadata folder."""
    meta = root / "metadata" / "ILSVRC"
    test = ["val/ILSVRC2012_val_00000001.JPEG", "val/ILSVRC2012_val_00000002.JPEG"]
    for rel in test:
        save(root / rel, solid("RGB", (50, 40), (9, 9, 9)))
    write_lines(meta / "train/image_ids.txt", ["train/n01440764/a.JPEG", "train/n01443537/b.JPEG"])
    write_lines(meta / "train/class_labels.txt", ["train/n01440764/a.JPEG,0", "train/n01443537/b.JPEG,1"])
    write_lines(meta / "test/image_ids.txt", test)
    write_lines(meta / "test/class_labels.txt", [f"{test[0]},1", f"{test[1]},0"])
    write_lines(meta / "test/image_sizes.txt", [f"{test[0]},50,40", f"{test[1]},50,40"])
    write_lines(meta / "test/localization.txt", [f"{test[0]},11,10,44,19", f"{test[1]},4,4,49,16",
                                                 f"{test[1]},0,6,43,20"])
    return meta / "test"


def replace_line(path: Path, n: int, line: str) -> None:
    lines = path.read_text().splitlines()
    lines[n - 1] = line
    write_lines(path, lines)


@pytest.mark.parametrize("value", ["nan", "NaN", "inf", "-inf", "1e999", "x"])
def test_cub_box_must_be_finite(cub: Path, value: str):
    # float("nan") parses; the box would later become INT64_MIN and count as a hit
    replace_line(cub / "bounding_boxes.txt", 2, f"2 2.0 {value} 20.0 10.0")
    with pytest.raises(data.DataError, match=r"bounding_boxes\.txt:2: malformed line") as e:
        data.get_dataset("cub", "test", 32, root=str(cub))
    assert str(cub / "bounding_boxes.txt") in str(e.value)
    assert ("is not a finite number" in str(e.value)) == (value != "x")


def test_cubv2_val_box_must_be_finite(synthetic: Path):
    loc = synthetic / "metadata" / "val" / "localization.txt"
    replace_line(loc, 3, loc.read_text().splitlines()[2].rsplit(",", 1)[0] + ",nan")
    with pytest.raises(data.DataError, match=r"localization\.txt:3: malformed line .*'nan' is not a finite number"):
        data.get_dataset("cub", "val", 32, root=str(synthetic))


def test_ilsvrc_box_must_be_finite(tmp_path: Path):
    meta = write_ilsvrc(tmp_path / "ILSVRC")
    replace_line(meta / "localization.txt", 2, "val/ILSVRC2012_val_00000002.JPEG,4,inf,49,16")
    with pytest.raises(data.DataError, match=r"localization\.txt:2: malformed line .*'inf' is not a finite number"):
        data.get_dataset("ilsvrc", "test", 32, root=str(tmp_path / "ILSVRC"))


def test_image_size_must_be_a_number(tmp_path: Path):
    meta = write_ilsvrc(tmp_path / "ILSVRC")
    replace_line(meta / "image_sizes.txt", 2, "val/ILSVRC2012_val_00000002.JPEG,nan,40")
    with pytest.raises(data.DataError, match=r"image_sizes\.txt:2: malformed line"):
        data.get_dataset("ilsvrc", "test", 32, root=str(tmp_path / "ILSVRC"))


@pytest.mark.parametrize("name", ["images.txt", "image_class_labels.txt", "train_test_split.txt",
                                  "bounding_boxes.txt", "classes.txt"])
def test_cub_repeated_id_names_both_lines(cub: Path, name: str):
    # e.g. in images.txt a second "1 ..." line would silently win and move image 1 to the other split
    lines = (cub / name).read_text().splitlines()
    write_lines(cub / name, [*lines, lines[0].split()[0] + " " + lines[-1].split(maxsplit=1)[1]])
    n = len(lines) + 1
    with pytest.raises(data.DataError) as e:
        data.get_dataset("cub", "test", 32, root=str(cub))
    assert f"{cub / name}:{n}: id 1 is listed twice, on lines 1 and {n}" in str(e.value)


@pytest.mark.parametrize("name", ["image_ids.txt", "class_labels.txt", "image_sizes.txt"])
def test_wsoleval_repeated_id_names_both_lines(tmp_path: Path, name: str):
    meta = write_ilsvrc(tmp_path / "ILSVRC")
    lines = (meta / name).read_text().splitlines()
    write_lines(meta / name, [*lines, lines[0]])
    with pytest.raises(data.DataError) as e:
        data.get_dataset("ilsvrc", "test", 32, root=str(tmp_path / "ILSVRC"))
    assert f"{meta / name}:3: id 'val/ILSVRC2012_val_00000001.JPEG' is listed twice, on lines 1 and 3" in str(e.value)


def test_odd_boxes_are_still_accepted(cub: Path, tmp_path: Path):
    # zero width, zero height and partly outside the image: the official code takes them as they are, and so do we
    replace_line(cub / "bounding_boxes.txt", 1, "1 60.0 27.0 0.0 304.0")  # a is 500 x 335: x1 = x0
    replace_line(cub / "bounding_boxes.txt", 2, "2 30.0 20.0 25.0 0.0")  # b is 40 x 30: y1 = y0, x1 past the edge
    ds = data.get_dataset("cub", "test", 32, root=str(cub))
    # trunc(60 * 32 / 500) = 3, trunc(27 * 32 / 335) = 2, trunc(331 * 32 / 335) = 31
    assert ds[0]["boxes"].tolist() == [[3, 2, 3, 31]]
    assert ds[1]["boxes"].tolist() == [[24, 21, 44, 21]]  # 30 * 32 / 40 = 24, 20 * 32 / 30 = 21.3, 55 * 32 / 40 = 44
    meta = write_ilsvrc(tmp_path / "ILSVRC")
    test = "val/ILSVRC2012_val_00000002.JPEG"
    write_lines(meta / "localization.txt", ["val/ILSVRC2012_val_00000001.JPEG,-5,-4,60,50", f"{test},4,4,4,4",
                                            f"{test},0,6,43,20"])  # whole image and beyond; a single point
    ds = data.get_dataset("ilsvrc", "test", 20, root=str(tmp_path / "ILSVRC"))
    assert ds[0]["boxes"].tolist() == [[-2, -2, 24, 25]] and ds[1]["boxes"].tolist() == [[1, 2, 1, 2], [0, 3, 17, 10]]


def test_cli_nan_box_is_one_error_line(tiny_synthetic: Path, tmp_path: Path):
    root = tmp_path / "cub"
    shutil.copytree(tiny_synthetic, root)
    replace_line(root / "bounding_boxes.txt", 3, "3 nan 1.0 5.0 5.0")
    script = Path(__file__).resolve().parent.parent / "tscam.py"
    cmd = [sys.executable, str(script), *TINY_ARGS, "--data", "cub", "--data-root", str(root), "--out-dir", "runs"]
    result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert lines[-1].startswith(f"error: {root / 'bounding_boxes.txt'}:3: malformed line")
    assert sum(line.startswith("error:") for line in lines) == 1 and "not a finite number" in lines[-1]


def test_fine_world_layout_parts_and_statistics(tmp_path: Path):
    """--data synthetic-fine: its own world in the CUB layout, head masks under parts/ inside the object masks, a coarse
    set at its root is rebuilt as a fine one; 1,000 generated objects have CUB test's box sizes (real_benchmarks §1)."""
    root = data.ensure_synthetic(tmp_path / "fine", world="fine", **SMALL)
    assert json.loads((root / "synthetic.json").read_text())["world"] == "fine" and data.is_synthetic(root)
    test = data.get_dataset("synthetic-fine", "test", 32, root=str(root))
    assert test.in_memory and len(test) == 10 and test.class_names[0] == "head_stripes"
    for rel in sorted((root / "parts").rglob("*.png"))[:8]:
        head = np.asarray(Image.open(rel)) > 0
        whole = np.asarray(Image.open(root / "segmentations" / rel.relative_to(root / "parts"))) > 0
        assert head.any() and not (head & ~whole).any() and head.sum() < whole.sum()
    coarse = data.build_synthetic(tmp_path / "coarse", **SMALL)
    data.ensure_synthetic(coarse, world="fine", **SMALL)  # another world at this root: rebuilt
    assert (coarse / "parts").is_dir()
    _, labels, masks, heads = data.generate_fine(1000, 64, np.random.default_rng(1))
    boxes = np.array([data.tight_box(m) for m in masks])
    area = (boxes[:, 2:] - boxes[:, :2] + 1).prod(1) / 64**2
    assert 0.27 <= np.median(area) <= 0.34 and 0.17 <= np.percentile(area, 25) <= 0.24  # CUB: 0.313, 0.204
    assert 0.2 <= (heads.sum((1, 2)) / masks.sum((1, 2))).mean() <= 0.4 and np.bincount(labels).min() == 100


def test_synthetic_statistics_by_hand(synthetic: Path):
    stats = data.synthetic_statistics(synthetic)
    boxes = np.array([[float(v) for v in line.split()[1:]] for line in (synthetic / "bounding_boxes.txt").read_text()
                      .splitlines()])[-10:]  # x y w h, inclusive: the box is w + 1 pixels wide
    area = (boxes[:, 2] + 1) * (boxes[:, 3] + 1) / 32**2
    assert stats["box area mean"] == pytest.approx(area.mean()) and stats["box area p50"] == pytest.approx(
        np.median(area))
    assert stats["centre x mean"] == pytest.approx(np.mean((boxes[:, 0] + (boxes[:, 2] + 1) / 2) / 32))
    assert "head / object" not in stats and 0 < stats["mask area mean"] < stats["box area mean"]
