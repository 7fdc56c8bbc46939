"""How much bf16 autocast moves the maps and the metrics against fp32, on the same trained checkpoint.

    python benchmarks/bench_precision.py runs/seeds/tscam__s26/last.pt runs/seeds/scm__s26/last.pt ...

Each checkpoint is evaluated twice with its own saved arguments (`--eval-only`), `--precision fp32` and
`--precision bf16` (CPU bf16 autocast here; CUDA's bf16 kernels round differently, so treat these as an estimate of
the size of the effect, not as CUDA's exact numbers). Maps: the GT-class low-resolution maps the evaluation scores,
each min-max normalised to [0, 1], compared pixel by pixel on the test split.
"""

from __future__ import annotations

import dataclasses
import importlib
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import common  # noqa: E402

KEYS = {"GT-known": "test/GT-known Loc@val-τ", "BoxAccV2": "test/BoxAccV2@val-τ", "PxAP": "test/PxAP",
        "Cls@1": "test/Cls@1"}


def evaluate(module, saved: dict, checkpoint: str, precision: str, out: str) -> tuple[dict, np.ndarray]:
    """The checkpoint's final metrics under one precision, and its test maps (N, h, w), each min-max normalised."""
    maps: dict = {}  # meter -> its maps; one LocalizationMeter per split, the last one scores test (the keys keep
    # every meter alive, so two splits never share an id)
    original = common.LocalizationMeter.update

    def spy(self, gt_class_maps, *rest, **kw):
        maps.setdefault(self, []).append(np.stack([common.normalize_scoremap(m)
                                                       for m in gt_class_maps.float().numpy()]))
        return original(self, gt_class_maps, *rest, **kw)

    fields = {f.name for f in dataclasses.fields(module.Args)}
    args = module.Args(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved.items() if k in fields})
    args = dataclasses.replace(args, eval_only=True, checkpoint=checkpoint, resume=None, precision=precision,
                               out_dir=out, run_name=precision, num_overlays=0, device="cpu")
    common.LocalizationMeter.update = spy
    try:
        final = module.main(args)
    finally:
        common.LocalizationMeter.update = original
    return final, np.concatenate(list(maps.values())[-1])


def main(paths: list[str]) -> None:
    rows = ["| method | checkpoint | " + " | ".join(f"Δ {k}" for k in KEYS) + " | map mean abs Δ | map max abs Δ |",
            "|---" * (len(KEYS) + 4) + "|"]
    for path in paths:
        state = torch.load(path, map_location="cpu", weights_only=False)
        method = state.get("method")
        if method is None:
            raise SystemExit(f"error: {path} records no method (written before checkpoints did)")
        module = importlib.import_module(method)
        with tempfile.TemporaryDirectory() as out:
            fp32, maps32 = evaluate(module, state["args"], path, "fp32", out)
            bf16, maps16 = evaluate(module, state["args"], path, "bf16", out)
        d = np.abs(maps16 - maps32)
        deltas = [f"{bf16[k] - fp32[k]:+.2f}" if fp32.get(k) is not None else "-" for k in KEYS.values()]
        rows.append(f"| {method} | {path} | " + " | ".join(deltas) + f" | {d.mean():.4f} | {d.max():.3f} |")
        print(rows[-1], flush=True)
    print("\n".join(rows))


if __name__ == "__main__":
    main(sys.argv[1:])
