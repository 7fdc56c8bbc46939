"""One CUDA GPU, every method at 224 px (ViT-S/16), bf16 and fp32: what the official CUB recipes will cost.

Run   python benchmarks/gpu_check.py                # needs no dataset: 224-px images are made in memory
      python benchmarks/gpu_check.py --data cub     # the input pipeline on data/CUB_200_2011 as training reads it
What  per method and precision, at the method's official CUB batch size (PRESETS["cub"]): train images/s (each file's
      own train_one_epoch on random batches, bench_model.bench: warm-up steps, then synchronised timing), eval images/s
      (forward with maps + localization_map), peak GPU memory over both, the input pipeline's images/s at that batch
      (data.make_loader on a cached set: uint8 batches cropped, flipped and normalised on the GPU), and the projected
      wall time of the recipe: epochs x common.steps_per_epoch(5994, batch, drop_last) training steps plus one pass
      over CUB's 5794 test + 1000 val images, at the slower of model and pipeline. A row that runs out of memory
      says OOM. About 2-4 minutes on an H200; rows stop after --budget-s. Without CUDA it says so and exits 0.
"""

import argparse
import importlib
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_model  # noqa: E402

import common  # noqa: E402
import data  # noqa: E402

CUB_TRAIN, CUB_EVAL = 5994, 5794 + 1000  # CUB-200-2011 train; test + CUBV2 val


def pipeline_rate(opts, batch_size: int, device: torch.device, seconds: float = 3.0) -> float:
    """Images/s of the training input pipeline into the GPU: finished batches, synchronised."""
    if opts.data == "cub":
        ds = data.get_dataset("cub", "train", 224, opts.data_root, cache=opts.cache)
    else:  # a cached set made in memory: 1024 random 256 x 256 images, as data/cache would hold CUB's train split
        ds = data.WSOLDataset("cub", "train", [data.Record(Path("in-memory"), 0)], ["bird"], 224)
        ds.records = ds.records * 1024
        ds.cache, ds.sizes = torch.randint(0, 256, (1024, 3, 256, 256), dtype=torch.uint8), [(256, 256)] * 1024
    images, start, epoch = 0, None, 0
    while start is None or time.perf_counter() - start < seconds:
        for batch in data.make_loader(ds, batch_size, True, "auto", 0, epoch, True, device):
            batch["image"].to(device, non_blocking=True).sum()  # the tensor as train_one_epoch gets it
            if start is None:  # the first batch (worker start-up, page faults) is warm-up
                torch.cuda.synchronize()
                start = time.perf_counter()
                continue
            images += len(batch["label"])
            if time.perf_counter() - start > seconds:
                break
        epoch += 1
    torch.cuda.synchronize()
    return images / (time.perf_counter() - start)


def row(name: str, precision: str, opts, pipelines: dict) -> list[str]:
    module = importlib.import_module(name)
    preset = module.PRESETS["cub"]
    batch, epochs, drop_last = preset["batch_size"], preset["epochs"], preset.get("drop_last") or False
    steps = common.steps_per_epoch(CUB_TRAIN, batch, drop_last)
    recipe = f"{epochs} ep × {steps} steps"
    cells = [name, precision, str(batch)]
    try:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        run = argparse.Namespace(data="cub", batch_size=None, steps=opts.steps, device="cuda", precision=precision)
        train_rate, eval_rate = bench_model.bench(name, run)
        peak = torch.cuda.max_memory_allocated() / 2**30
        if batch not in pipelines:
            pipelines[batch] = pipeline_rate(opts, batch, torch.device("cuda"))
        pipe = pipelines[batch]
        hours = (epochs * steps * batch / min(train_rate, pipe) + CUB_EVAL / eval_rate) / 3600
        return cells + [f"{train_rate:.0f}", f"{eval_rate:.0f}", f"{peak:.1f}", f"{pipe:.0f}", recipe,
                        f"{hours:.2f} h"]
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return cells + ["OOM"] * 4 + [recipe, "—"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="memory", choices=["memory", "cub"], help="input pipeline source")
    parser.add_argument("--data-root", default=None, help="CUB folder (default data/CUB_200_2011)")
    parser.add_argument("--cache", default="auto", choices=["auto", "on", "off"], help="as the scripts' --cache")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per row (after 2 warm-up steps)")
    parser.add_argument("--budget-s", type=float, default=480, help="stop starting rows after this many seconds")
    parser.add_argument("--methods", nargs="+", default=list(bench_model.MODELS), choices=list(bench_model.MODELS))
    opts = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible to torch; nothing to measure (run it on a GPU machine)")
        return
    start, pipelines = time.perf_counter(), {}
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | ViT-S/16 at 224 | {opts.steps} timed "
          f"steps per row | input pipeline: {opts.data}\n")
    print("| method | precision | batch | train img/s | eval img/s | peak GiB | pipeline img/s | CUB recipe | "
          "projected |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in opts.methods:
        for precision in ("bf16", "fp32"):
            if time.perf_counter() - start > opts.budget_s:
                print(f"| {name} | {precision} | skipped: past --budget-s {opts.budget_s:.0f} |||||||")
                continue
            print("| " + " | ".join(row(name, precision, opts, pipelines)) + " |", flush=True)
    print(f"\n{time.perf_counter() - start:.0f} s in all")


if __name__ == "__main__":
    main()
