"""Training and evaluation images/s of each method, and each method's step time relative to TS-CAM's.

Run   python benchmarks/bench_model.py                       # the synthetic preset (64 px tiny ViT), CPU
      python benchmarks/bench_model.py --data cub --batch-size 16 --device cuda    # ViT-S/16 at 224 (CUB recipe)
What  one training step = each file's own train_one_epoch on random batches (forward, loss, backward, clipping,
      an AdamW step for every method; DA-WSOL with its domain-adaptation losses on); one evaluation batch = the
      forward with attention maps plus localization_map (bench_eval.py times the metrics). Weights are random
      (from scratch): speed does not depend on them. Prints numbers only; nothing is asserted.
"""

import argparse
import importlib
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402

MODELS = {"tscam": "TSCAM", "scm": "SCM", "sat": "SAT", "bas": "BAS", "dawsol": "DAWSOL"}


def param_groups(name, module, model, args) -> list[dict]:
    """Each file's own parameter groups (some carry per-group LR multipliers that train_one_epoch reads)."""
    if name == "sat":
        return module.param_groups(model, args.weight_decay, args.decay_tokens)
    if name == "bas":
        return module.param_groups(model, args.weight_decay, args.head_lr_mult)
    if name == "dawsol":
        return module.param_groups(model, args)
    return module.param_groups(model, args.weight_decay)


def eval_maps(name, module, model, images, args):
    """What each file's evaluate() computes before the metrics."""
    if name == "bas":
        return module.localization_map(model, model(images), images, args.map, args.topk_test)
    out = model(images) if name == "sat" else model(images, need_maps=True)
    return module.localization_map(model, out, images, args.map)


def bench(name: str, opts) -> tuple[float, float]:
    module = importlib.import_module(name)
    args = common.parse_args(module.Args, ["--data", opts.data, "--pretrained", "none", "--device", opts.device,
                                           "--precision", getattr(opts, "precision", "auto")])
    common.apply_preset(args, module.PRESETS)
    if opts.batch_size:
        args.batch_size = opts.batch_size
    args.log_every = 10**9
    device = common.pick_device(opts.device)
    torch.manual_seed(0)
    num_classes = 10 if opts.data == "synthetic" else {"cub": 200, "ilsvrc": 1000, "openimages": 100}[opts.data]
    model = getattr(module, MODELS[name])(args, num_classes).to(device)
    optimizer = torch.optim.AdamW(param_groups(name, module, model, args), lr=1e-4)  # AdamW for all
    size, batch = args.img_size, args.batch_size
    batches = [{"image": torch.randn(batch, 3, size, size), "label": torch.randint(0, num_classes, (batch,))}
               for _ in range(opts.steps)]
    epoch = getattr(args, "dal_start_epoch", 0)  # DA-WSOL: time the step with its DA losses on
    progress = common.Progress(10**9, 10**9)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    module.train_one_epoch(model, batches[:2], optimizer, args, epoch, device, progress)  # warm-up
    sync()
    start = time.perf_counter()
    module.train_one_epoch(model, batches, optimizer, args, epoch, device, progress)
    sync()
    train_rate = opts.steps * batch / (time.perf_counter() - start)

    model.eval()
    with torch.inference_mode(), common.autocast(device, args.precision):
        images = batches[0]["image"].to(device)
        eval_maps(name, module, model, images, args)
        sync()
        start = time.perf_counter()
        for _ in range(opts.steps):
            eval_maps(name, module, model, images, args)
        sync()
    eval_rate = opts.steps * batch / (time.perf_counter() - start)
    return train_rate, eval_rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="synthetic", help="whose preset sizes the model (synthetic = tiny ViT)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the preset's")
    parser.add_argument("--steps", type=int, default=10, help="timed training steps / evaluation batches")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"], help="as the scripts' flag")
    parser.add_argument("--methods", nargs="+", default=list(MODELS), choices=list(MODELS))
    opts = parser.parse_args()
    if opts.threads:
        torch.set_num_threads(opts.threads)
    print(f"data preset {opts.data} | device {opts.device} | threads {torch.get_num_threads()} | steps {opts.steps}")
    base = None
    for name in opts.methods:
        train_rate, eval_rate = bench(name, opts)
        base = base or (train_rate if name == "tscam" else None)
        ratio = f" | step time {base / train_rate:.2f}x TS-CAM's" if base else ""
        print(f"{name:7s} train {train_rate:7.1f} img/s | eval (maps) {eval_rate:7.1f} img/s{ratio}", flush=True)


if __name__ == "__main__":
    main()
