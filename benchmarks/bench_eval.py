"""Milliseconds per score map for common.BoxEvaluator.accumulate (and MaskEvaluator) on CAM-like maps.

Run   python benchmarks/bench_eval.py [--n 50] [--threads 1] [--size 224]
Maps  smooth random 14 x 14 grids, bicubic-upsampled to size x size and min-max normalised (what a ViT-S/16 CAM
      looks like after wsolevaluation's resize), one GT box each. Prints numbers only; nothing is asserted.
Reference point: wsolevaluation's OpenCV BoxEvaluator.accumulate takes about 36 ms per such map on one core
(Delta = 0.001, multi-contour), per the project's issue; OpenCV is not a dependency here, so it is not re-measured.
"""

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402


def cam_like_maps(n: int, size: int, seed: int = 0) -> np.ndarray:
    grid = torch.rand(n, 14, 14, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return common.resize_scoremap(grid, size)  # (n, size, size)


def ms_per_map(fn, n: int, repeats: int) -> tuple[float, float]:
    """(wall, CPU) ms per map, best of `repeats` runs. On a shared machine the process's CPU time is the fairer
    "one core" figure: wall time also counts the time other processes held the core."""
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return 1e3 * min(wall) / n, 1e3 * min(cpu) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=50, help="maps per run")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (the evaluator is numpy)")
    parser.add_argument("--size", type=int, default=224, help="score map side")
    parser.add_argument("--repeats", type=int, default=3, help="runs per setting; the best is printed")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    maps = cam_like_maps(args.n, args.size)
    third = args.size // 3
    boxes = [np.array([[third, third, 2 * third, 2 * third]])] * args.n
    masks = np.zeros_like(maps, np.uint8)
    masks[:, third:2 * third, third:2 * third] = 1
    print(f"{args.n} CAM-like maps {args.size}x{args.size}, torch threads {args.threads}, best of {args.repeats}; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"  {'':59s} {'wall':>8s} {'CPU':>8s}  ms/map")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        inputs = torch.from_numpy(maps).to(device)  # the evaluator takes numpy or torch; it computes on the CPU
        for interval in (0.01, 0.001):
            for multi in (True, False):
                def box_run(interval=interval, multi=multi, inputs=inputs):
                    common.BoxEvaluator(interval, multi_contour_eval=multi).accumulate(inputs, boxes)

                wall, cpu = ms_per_map(box_run, args.n, args.repeats)
                print(f"  {device:4s} BoxEvaluator  Δ={interval:<6} multi_contour={multi!s:5s} {wall:8.2f} {cpu:8.2f}")

            def mask_run(interval=interval, inputs=inputs):
                common.MaskEvaluator(interval).accumulate(inputs, masks)

            wall, cpu = ms_per_map(mask_run, args.n, args.repeats)
            print(f"  {device:4s} MaskEvaluator Δ={interval:<6}                     {wall:8.2f} {cpu:8.2f}")
    if "cuda" in devices:
        print("  (cuda rows: the maps start on the GPU and are copied to the CPU, where the evaluator runs)")


if __name__ == "__main__":
    main()
