"""Images per second of each input-pipeline path, beside the model's own training images per second at 224 px.

Run   python benchmarks/bench_data.py                  # CPU; add --device cuda on a GPU machine
What  a CUB-layout tree of 200 photo-like JPEGs (300-500 px a side, ~CUB's sizes) written to a temporary folder; the
      train split as training reads it (Resize 256 -> RandomCrop 224 -> flip -> normalise, batches of 64, a new
      data.make_loader per epoch as in main()): PIL decoding with 0, 1 and 2 worker processes (--cache off), and the
      decoded-pixel cache (--cache on: built once, timed separately, then memory-mapped; on CUDA the crops, flips and
      normalisation run on the GPU; on CPU a last row times the host's share of that path alone). The model:
      bench_model.bench("tscam") at the CUB preset (ViT-S/16, 224 px, random weights, AdamW), whose train images/s
      each path must exceed to keep the model fed (the last column).
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_model  # noqa: E402

import data  # noqa: E402


def write_tree(root: Path, n: int, seed: int = 0) -> float:
    """CUB layout, all images in the train split: a smooth colour field, an object rectangle and pixel grain (so the
    JPEGs are about as large as CUB's). Returns the mean file size in KB."""
    rng, lines = np.random.default_rng(seed), {k: [] for k in ("images", "image_class_labels", "train_test_split",
                                                                "bounding_boxes")}
    for i in range(1, n + 1):
        w, h = (int(v) for v in rng.integers(300, 501, 2))
        field = np.asarray(Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize((w, h),
                                                                                                  Image.BILINEAR))
        image = field.astype(np.int16) + rng.integers(-12, 13, (h, w, 3), dtype=np.int16)
        image[h // 4:3 * h // 4, w // 4:3 * w // 4] += 60
        rel = f"{1 + i % 2:03d}.Bird/{i:04d}.jpg"
        (root / "images" / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(root / "images" / rel, quality=90)
        box = f"{i} {w / 4} {h / 4} {w / 2} {h / 2}"  # x y w h
        for key, line in zip(lines, (f"{i} {rel}", f"{i} {1 + i % 2}", f"{i} 1", box), strict=True):
            lines[key].append(line)
    for key, rows in lines.items():
        (root / f"{key}.txt").write_text("\n".join(rows) + "\n")
    (root / "classes.txt").write_text("1 001.Bird\n2 002.Bird\n")
    return float(np.mean([p.stat().st_size for p in (root / "images").rglob("*.jpg")])) / 1024


def rate(ds, workers, device: torch.device, batch_size: int, min_seconds: float) -> float:
    """Train images/s over whole epochs (at least two, and at least min_seconds), worker start-up included."""
    images, epoch, start = 0, 0, time.perf_counter()
    while epoch < 2 or time.perf_counter() - start < min_seconds:
        for batch in data.make_loader(ds, batch_size, True, workers, 0, epoch, False, device):
            images += len(batch["label"])
        epoch += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    return images / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200, help="JPEGs in the tree")
    parser.add_argument("--batch-size", type=int, default=64, help="loader batch size")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--model-batch", type=int, default=4, help="batch of the model timing (CPU: small)")
    parser.add_argument("--model-steps", type=int, default=2, help="timed model steps")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    opts = parser.parse_args()
    if opts.threads:
        torch.set_num_threads(opts.threads)
    device = torch.device(opts.device)
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)  # data/cache/ goes here, and is removed with it
        root = Path(tmp) / "CUB"
        kb = write_tree(root, opts.images)
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        print(f"{opts.images} JPEGs, 300-500 px, {kb:.0f} KB on average | train split at 224 (R = 256) | batch "
              f"{opts.batch_size} | device {device} | {cpus} CPUs, torch {torch.get_num_threads()} threads\n")
        files = data.get_dataset("cub", "train", 224, str(root))
        rows = [(f"PIL, {w} worker{'s' * (w != 1)} (--cache off)", rate(files, w, device, opts.batch_size, 3.0))
                for w in (0, 1, 2)]
        start = time.perf_counter()
        cached = data.get_dataset("cub", "train", 224, str(root), cache="on")
        build = opts.images / (time.perf_counter() - start)
        where = "GPU" if device.type == "cuda" else "CPU"
        rows.append((f"cached (--cache on; crops, flips, normalise on the {where})",
                     rate(cached, "auto", device, opts.batch_size, 3.0)))
        if device.type == "cpu":  # what a CUDA run asks of the CPU: uint8 batches, finished on the GPU
            rows.append(("cached, host side of the CUDA path (uint8 batches only)",
                         rate(data.RawPixels(cached), 0, device, opts.batch_size, 3.0)))
    model = argparse.Namespace(data="cub", batch_size=opts.model_batch, steps=opts.model_steps, device=opts.device,
                               precision="auto")
    model_rate, _ = bench_model.bench("tscam", model)
    base = rows[0][1]
    print(f"cache build: {build:.0f} img/s (once per split; worker processes)\n")
    print("| input path | train img/s | vs PIL, 0 workers | vs the model's train img/s |")
    print("|---|---|---|---|")
    for name, value in rows:
        print(f"| {name} | {value:.0f} | {value / base:.1f}× | {value / model_rate:.1f}× |")
    print(f"| model: TS-CAM ViT-S/16 train step, batch {opts.model_batch} ({bench_model.__name__}.py) | "
          f"{model_rate:.1f} | | 1.0× |")


if __name__ == "__main__":
    main()
