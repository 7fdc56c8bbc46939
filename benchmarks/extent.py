"""Where a run's maps sit on the fine-grained world's objects: on the head (the part that tells the class), on the
body, or off the object. The failure the WSOL papers describe is a map that collapses onto the discriminative part.

    python benchmarks/extent.py TS-CAM=runs/val20/tscam__s26 A0=runs/val20/bb0__s26 --split val
    python benchmarks/extent.py A=runs/fine/A__s27,runs/fine/A__s28 --split test    # mean ± std over two seeds

Each row is `TITLE=RUN_FOLDER[,RUN_FOLDER...]` as in benchmarks/figure.py (a training run or an --eval-only run, on
--data synthetic-fine, whose sets write the head masks under parts/); several folders (e.g. seeds) are averaged.
Per image, on the run's normalised GT-class map (wsolevaluation's: bicubic to the image, min-max): `on object` = the
map's mass on the object / its total mass; `head share` = its mass on the head / its mass on the object (a map spread
evenly over the object scores the head's area share, printed as `uniform`; a map on the head alone scores 100);
`box / GT` = the area of the box the metric scores at the run's val-chosen τ over the GT box's area (below 1: the box
misses part of the object). Means over the split's images, in %.
"""

from __future__ import annotations

import argparse
import inspect
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
import common  # noqa: E402
import data  # noqa: E402
from figure import load_run  # noqa: E402


def head_mask(path: Path, root: Path, size: int) -> np.ndarray:
    """The head mask (S, S) bool of an image of the fine world, from parts/ (same relative path as the image)."""
    folder = next(p for p in (root / "images", root / "CUBV2") if Path(path).is_relative_to(p))
    mask = np.asarray(Image.open(root / "parts" / Path(path).relative_to(folder))) > 0
    return common.resize_mask_nearest(mask, (size, size)) > 0


@torch.inference_mode()
def measure(module, args, model, tau: float, split: str, batch_size: int = 100) -> dict[str, float]:
    if args.data != "synthetic-fine":
        raise SystemExit(f"error: the run was trained on --data {args.data}; the head masks exist for synthetic-fine")
    ds = data.get_dataset(args.data, split, args.img_size, args.data_root, args.metadata_root,
                          getattr(args, "test_crop", False))
    root, rows = Path(args.data_root), []
    maps_flag = "need_maps" in inspect.signature(model.forward).parameters
    for start in range(0, len(ds), batch_size):
        items = [ds[i] for i in range(start, min(start + batch_size, len(ds)))]
        images, labels = torch.stack([it["image"] for it in items]), torch.tensor([it["label"] for it in items])
        out = model(images, need_maps=True) if maps_flag else model(images)
        extra = (args.topk_test,) if args.map == "bas" else ()
        maps = module.localization_map(model, out, images, args.map, *extra).float()  # (B, C or 1, h, w)
        gt_maps = maps[torch.arange(len(labels)), labels] if maps.shape[1] > 1 else maps[:, 0]
        scoremaps = common.resize_scoremap(gt_maps, args.img_size).reshape(-1, args.img_size, args.img_size)
        for k, (item, s) in enumerate(zip(items, scoremaps, strict=True)):
            whole = item["mask"].numpy() == 1
            head = head_mask(ds.records[start + k].path, root, args.img_size) & whole
            gt = np.asarray(item["boxes"], dtype=np.int64).reshape(-1, 4)
            boxes = common.scoremap_boxes(s, tau)
            box = boxes[common.box_iou(boxes, gt).max(1).argmax()]
            area = lambda b: float((b[2] - b[0] + 1) * (b[3] - b[1] + 1))  # noqa: E731 (inclusive pixels)
            total, on = s.sum(), (s * whole).sum()
            rows.append((on / max(total, 1e-12), (s * head).sum() / max(on, 1e-12), head.sum() / whole.sum(),
                         area(box) / area(gt[0])))
    on, share, uniform, ratio = (100 * np.mean(c) for c in zip(*rows, strict=True))
    return {"on object": on, "head share": share, "uniform": uniform, "box / GT": ratio}


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("columns", nargs="+", metavar="TITLE=RUN_FOLDER[,RUN_FOLDER...]",
                        help="one row per title; several comma-separated folders are averaged (mean ± std)")
    parser.add_argument("--split", choices=["val", "test"], default="val", help="the split measured (default val)")
    opts = parser.parse_args(argv)
    results = {}
    print(f"| run ({opts.split}) | runs | on object % | head share % | uniform % | box / GT % |")
    print("|---|---|---|---|---|---|")
    for item in opts.columns:
        title, sep, folders = item.partition("=")
        if not sep or not all(folders.split(",")):
            parser.error(f"{item!r}: expected TITLE=RUN_FOLDER[,RUN_FOLDER...]")
        each = [measure(*load_run(Path(folder)), opts.split) for folder in folders.split(",")]
        results[title] = r = {key: float(np.mean([e[key] for e in each])) for key in each[0]}
        r.update({f"{key} std": float(np.std([e[key] for e in each], ddof=1)) if len(each) > 1 else 0.0
                  for key in each[0]})
        cells = [f"{r[key]:.1f}" + (f" ± {r[key + ' std']:.1f}" if len(each) > 1 else "") for key in each[0]]
        print(f"| {title} | {len(each)} | " + " | ".join(cells) + " |", flush=True)
    return results


if __name__ == "__main__":
    main()
