"""The README's figure: the same test images in rows; the image with its GT box, then one column per run folder: that
run's map on the image and the box its metric scores at the run's own τ chosen on val.

    python benchmarks/figure.py TS-CAM=runs/seeds/tscam__s27 S=runs/seeds/S__s27 A=runs/seeds/A__s27 \
        SCM=runs/seeds/scm__s27 SAT=runs/seeds/sat__s27 BAS=runs/seeds/bas__s27 DA-WSOL=runs/seeds/dawsol__s27 \
        --indices 0 1 2 3 4 5 --out docs/figure_synthetic.png

Each COLUMN is `TITLE=RUN_FOLDER`: a training run (its last.pt), an --eval-only run (the checkpoint and --map it
evaluated: TS-CAM's S or A alone on the same weights) or an --epochs 0 run (the backbone before fine-tuning). The map, the test geometry and τ (the run's val-chosen
GT-known threshold, val/thresholds in metrics.json) are the run's own, so each panel shows what that run's numbers
count: the box drawn is wsolevaluation's, the one of the map's boxes at τ with the best IoU with a GT box. Rows are
chosen by index, never by result. PIL only; a 256-colour PNG (about 160 kB for 6 x 9 panels).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import common  # noqa: E402
import data  # noqa: E402

CELL = 128  # pixels per panel side


def load_run(folder: Path):
    """(module, args, model, τ) of a run folder; the model holds the checkpoint the run reported."""
    try:
        saved = json.loads((folder / "args.json").read_text())
        metrics = json.loads((folder / "metrics.json").read_text())
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {folder} is not a finished run folder (args.json, metrics.json): {e}") from None
    checkpoint = Path(saved["checkpoint"]) if saved.get("eval_only") else folder / "last.pt"
    if saved.get("epochs") == 0 and not saved.get("eval_only"):  # the backbone before fine-tuning (class-agnostic maps)
        if "method" not in metrics:
            raise SystemExit(f"error: {folder}/metrics.json does not name its method: a run older than this script")
        module, state = importlib.import_module(metrics["method"]), None
    else:
        state = common.load_checkpoint(checkpoint)
        module = importlib.import_module(state["method"])
    fields = {f.name for f in dataclasses.fields(module.Args)}
    args = module.Args(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved.items() if k in fields})
    if state is None:
        classes = len((Path(args.data_root) / "classes.txt").read_text().splitlines())
        common.seed_everything(args.seed)  # the run's own initial weights (the head; the ViT too with --pretrained none)
        model = getattr(module, module.__name__.upper())(args, classes)
        if args.pretrained != "none":
            module.load_deit_weights(model.vit, args.pretrained)
    else:
        model = getattr(module, state["method"].upper())(args, state["arch"]["num_classes"])
        model.load_state_dict(state["model"])
    tau = (metrics.get("val/thresholds") or {}).get("GT-known Loc")
    if tau is None:
        raise SystemExit(f"error: {folder}/metrics.json has no val/thresholds: a run without a val split")
    return module, args, model.eval(), tau


@torch.inference_mode()
def panels(module, args, model, tau: float, indices: list[int]) -> tuple[list[np.ndarray], object]:
    """One (S, S, 3) uint8 picture per image: the run's GT-class map over the image, GT box green, scored box red."""
    ds = data.get_dataset(args.data, "test", args.img_size, args.data_root, args.metadata_root,
                          getattr(args, "test_crop", False))
    items = [ds[i] for i in indices]
    images, labels = torch.stack([it["image"] for it in items]), torch.tensor([it["label"] for it in items])
    maps_flag = "need_maps" in inspect.signature(model.forward).parameters  # SAT and BAS always return their maps
    out = model(images, need_maps=True) if maps_flag else model(images)
    extra = (args.topk_test,) if args.map == "bas" else ()  # BAS's map takes its top-k
    maps = module.localization_map(model, out, images, args.map, *extra).float()  # (B, C or 1, h, w)
    gt_maps = maps[torch.arange(len(labels)), labels] if maps.shape[1] > 1 else maps[:, 0]  # (B, h, w)
    scoremaps = common.resize_scoremap(gt_maps, args.img_size).reshape(-1, args.img_size, args.img_size)
    pictures = []
    for i, item, s in zip(indices, items, scoremaps, strict=True):
        gt = np.asarray(item["boxes"], dtype=np.int64).reshape(-1, 4)
        boxes = common.scoremap_boxes(s, tau)
        scored = boxes[common.box_iou(boxes, gt).max(1).argmax()][None] if len(boxes) else np.zeros((0, 4))
        heat = (0.5 * common._jet(s) + 0.5 * ds.display_image(i)).astype(np.uint8)
        pictures.append(draw_boxes(heat, gt, scored))
    return pictures, ds


def draw_boxes(image: np.ndarray, gt: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """(S, S, 3) -> (CELL, CELL, 3): enlarged (nearest), GT boxes green, the scored box red (inclusive pixel boxes)."""
    scale = CELL / image.shape[0]
    canvas = Image.fromarray(image).resize((CELL, CELL), Image.NEAREST)
    draw = ImageDraw.Draw(canvas)
    for boxes, colour in ((gt, (0, 255, 0)), (pred, (255, 0, 0))):
        for x0, y0, x1, y1 in np.asarray(boxes).reshape(-1, 4).tolist():
            draw.rectangle([x0 * scale, y0 * scale, (x1 + 1) * scale - 1, (y1 + 1) * scale - 1], outline=colour,
                           width=2)
    return np.asarray(canvas)


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("columns", nargs="+", metavar="TITLE=RUN_FOLDER", help="one column per run folder")
    parser.add_argument("--indices", type=int, nargs="+", default=[0, 1, 2, 3, 4, 5], help="test images (rows)")
    parser.add_argument("--out", default="docs/figure.png", help="the PNG to write (default: docs/figure.png)")
    opts = parser.parse_args(argv)
    columns = []
    for item in opts.columns:
        title, sep, folder = item.partition("=")
        if not sep or not folder:
            parser.error(f"{item!r}: expected TITLE=RUN_FOLDER")
        module, args, model, tau = load_run(Path(folder))
        pictures, ds = panels(module, args, model, tau, opts.indices)
        columns.append((f"{title} (tau {tau:.2f})", pictures))
    first = columns[0][1]
    gt_column = [draw_boxes(ds.display_image(i), np.asarray(ds[i]["boxes"]), np.zeros((0, 4)))
                 for i in opts.indices]
    columns.insert(0, ("image, GT box", gt_column))
    header, gap = 16, 2
    width, height = len(columns) * (CELL + gap), header + len(first) * (CELL + gap)
    sheet = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for c, (title, pictures) in enumerate(columns):
        draw.text((c * (CELL + gap) + 3, 2), title, fill=(0, 0, 0))
        for r, picture in enumerate(pictures):
            sheet.paste(Image.fromarray(picture), (c * (CELL + gap), header + r * (CELL + gap)))
    out = Path(opts.out)
    sheet = sheet.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)  # 3x smaller
    common._atomic_write(out, lambda f: sheet.save(f, format="PNG", optimize=True))
    print(f"wrote {out} ({out.stat().st_size / 1024:.0f} kB, {len(first)} images x {len(columns)} columns)")
    return out


if __name__ == "__main__":
    main()
