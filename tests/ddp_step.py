"""One training step of a method on a fixed global batch, in one process or under torchrun; rank 0 saves the
updated state (weights and buffers) to OUT. tests/test_ddp.py compares the two.

    python tests/ddp_step.py METHOD OUT [FLAG ...]
    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/ddp_step.py METHOD OUT [FLAG ...]
"""

import importlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import common  # noqa: E402

FLAGS = ["--img-size", "32", "--patch-size", "8", "--embed-dim", "32", "--depth", "2", "--heads", "2",
         "--drop-path", "0", "--batch-size", "8", "--epochs", "2", "--device", "cpu", "--precision", "fp32"]


def main(method: str, out: str, extra: list[str]) -> None:
    module = importlib.import_module(method)
    args = common.parse_args(module.Args, [*FLAGS, *extra])
    common.apply_preset(args, module.PRESETS)
    device = common.init_distributed(args.device)
    rank, size = common.world()
    torch.manual_seed(0)
    model = getattr(module, method.upper())(args, 10).to(device)  # TSCAM, SCM, SAT, BAS, DAWSOL
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD([{"params": list(model.parameters()), "lr_mult": 1.0}], lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    images, labels = torch.randn(8, 3, 32, 32, generator=g), torch.arange(8) % 3  # a fixed global batch
    part = common.shard(8, rank, size)
    loader = [{"image": images[part], "label": labels[part]}] * 2  # two steps: momentum and the memory carry over
    progress = common.Progress(2, 1000, quiet=True)
    module.train_one_epoch(model, loader, optimizer, args, 1, device, progress)  # epoch 1: DA-WSOL's DAL is on
    if rank == 0:
        torch.save({"before": before, "after": model.state_dict()}, out)
    common.close_distributed()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
