"""Supervised pretraining of the synthetic-size ViT: the synthetic world's DeiT-on-ImageNet.

Every paper fine-tunes ImageNet-pretrained DeiT weights on the WSOL set; the synthetic presets do the same with the
checkpoint this script writes. It trains the synthetic ViT (64 px, patch 8, width 128, depth 4, 4 heads: the
synthetic presets' model) as a DeiT classifier (final-normed cls token -> Linear head) on a separate, larger
synthetic classification set: the 90 shape x texture pairs of data.py that are NOT the WSOL set's 10 classes, so
the WSOL classes are never seen in pretraining (no boxes, no masks are used). The result is a DeiT-format checkpoint
({"model": state dict with DeiT key names plus head.*}) that every method loads through its own load_deit_weights.

Run     python pretrain.py            # about 12 min on 2 CPU cores; rewrites weights/synthetic_deit.pth
        python tscam.py --pretrained weights/synthetic_deit.pth   # what the synthetic presets do by default
Recipe  DeiT's, scaled down: AdamW (wd 0.05, no decay on norms / biases / tokens), linear warmup + cosine, label
        smoothing 0.1, stochastic depth 0.1, the methods' Resize(R) + RandomCrop(S) + flip. NOTE(ours) no RandAugment,
        mixup, cutmix, random erasing or repeated augmentation (a 4-block model on 64 px images does not need them),
        and gradient clipping 1.0 (the synthetic presets' value). One recipe was run (10 epochs, 12 min: val top-1
        still rising, 48.5 -> 54.0 % over the last 3 epochs); the README lists it under "Configurations tried".
Output  weights/synthetic_deit.pth: {"model": ..., "args": ..., "val_top1": ...}; overwritten atomically.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.transforms import v2

import common
import data

ROOT = Path(__file__).resolve().parent
DEFAULT_OUT = ROOT / "weights" / "synthetic_deit.pth"
# the pretraining classes: every shape x texture pair that is not one of the WSOL set's (shape, texture) classes
PRETRAIN_CLASSES = tuple((s, t) for s in data.SHAPES for t in data.TEXTURES if (s, t) not in data.SYNTH_CLASSES)


# %% 1. Arguments
@dataclass
class Args:
    out: str = field(default=str(DEFAULT_OUT.relative_to(ROOT)), metadata={"help": "checkpoint to write"})
    n_train: int = field(default=20_000, metadata={"help": "training images (balanced over the 90 classes)"})
    n_val: int = field(default=2_000, metadata={"help": "held-out images for the top-1 accuracy"})
    img_size: int = field(default=64, metadata={"help": "input side (the synthetic presets' 64)"})
    patch_size: int = field(default=8, metadata={"help": "patch side (the synthetic presets' 8)"})
    embed_dim: int = field(default=128, metadata={"help": "token width D"})
    depth: int = field(default=4, metadata={"help": "number of blocks"})
    heads: int = field(default=4, metadata={"help": "attention heads"})
    drop_path: float = field(default=0.1, metadata={"help": "stochastic depth of the last block (DeiT-S: 0.1)"})
    epochs: int = field(default=10, metadata={"help": "training epochs"})
    batch_size: int = field(default=128, metadata={"help": "batch size"})
    lr: float = field(default=1e-3, metadata={"help": "AdamW peak learning rate"})
    weight_decay: float = field(default=0.05, metadata={"help": "AdamW weight decay (DeiT's)"})
    warmup_steps: int = field(default=200, metadata={"help": "linear warmup steps before the cosine decay"})
    label_smoothing: float = field(default=0.1, metadata={"help": "label smoothing (DeiT's)"})
    grad_clip: float = field(default=1.0, metadata={"help": "gradient-norm clip; 0 = off"})
    seed: int = field(default=0, metadata={"help": "seed of the data generator and of the training"})
    device: str = field(default="auto", metadata={"help": "auto (CUDA when present), cpu or cuda"})
    log_every: int = field(default=50, metadata={"help": "print progress every this many steps"})



# %% 2. ViT backbone (identical to the method files' region; tests/test_vit_sync.py)
# >>> vit-s begin
# DeiT/16 (Touvron et al., ICML 2021; ViT-S by default) as TS-CAM's vision_transformer.py builds it: pre-norm blocks,
# LayerNorm eps 1e-6, qkv bias, exact GELU, stochastic depth rising linearly, cls token + learned position embedding.
# Module names equal the official checkpoints' keys, so they load by name. --arch: (width D, depth, heads, weights).
DEIT_ARCHS = {
    "deit_tiny": (192, 12, 3, "https://dl.fbaipublicfiles.com/deit/deit_tiny_patch16_224-a1311bcf.pth"),
    "deit_small": (384, 12, 6, "https://dl.fbaipublicfiles.com/deit/deit_small_patch16_224-cd65a155.pth"),
    "deit_base": (768, 12, 12, "https://dl.fbaipublicfiles.com/deit/deit_base_patch16_224-b5f2ef4d.pth"),
}


class PatchEmbed(nn.Module):
    def __init__(self, img_size: int, patch_size: int, dim: int):
        super().__init__()
        self.grid = (img_size // patch_size, img_size // patch_size)  # (h, w)
        self.proj = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.proj(images).flatten(2).transpose(1, 2)  # (B, 3, S, S) -> (B, D, h, w) -> (B, P, D)


class Attention(nn.Module):
    """Multi-head self-attention. `key_gate` (B, N) multiplies each key's column of the softmax weights (no
    renormalisation), the hook SAT and BAS gate attention through; `need_weights` returns the (B, H, N, N) weights."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads, self.scale = num_heads, (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, need_weights: bool = False, key_gate: torch.Tensor | None = None):
        B, N, D = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)  # (B,H,N,d)
        if need_weights or key_gate is not None:
            weights = self.attention_weights(q, k)  # (B, H, N, N), rows sum to 1
            if key_gate is not None:
                weights = weights * key_gate[:, None, None, :]
            out = weights @ v  # (B, H, N, d)
        else:  # fused kernel when nobody needs the matrix
            weights, out = None, F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(B, N, D)), weights

    def attention_weights(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        return F.softmax(q @ k.transpose(-2, -1) * self.scale, dim=-1)  # (B, H, N, N)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch of a sample with probability p, scale the kept ones."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = x.new_empty(x.shape[0], *([1] * (x.ndim - 1))).bernoulli_(1.0 - self.p)
        return x * keep / (1.0 - self.p)


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, drop_path: float, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim, eps=1e-6), Attention(dim, num_heads)
        self.norm2, self.mlp = nn.LayerNorm(dim, eps=1e-6), Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, need_weights: bool = False, key_gate: torch.Tensor | None = None):
        y, weights = self.attn(self.norm1(x), need_weights, key_gate)
        x = x + self.drop_path(y)
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x, weights  # (B, N, D), (B, H, N, N) or None


class VisionTransformer(nn.Module):
    """ViT without a classifier. `embed` and `blocks` can be used one by one (methods insert tokens or gates);
    `forward(x)` returns the final-normed tokens (B, 1 + P, D), plus the per-block attention weights if asked."""

    def __init__(self, img_size: int = 224, patch_size: int = 16, embed_dim: int = 384, depth: int = 12,
                 num_heads: int = 6, drop_path: float = 0.1):
        super().__init__()
        self.patch_embed = PatchEmbed(img_size, patch_size, embed_dim)
        self.grid = self.patch_embed.grid
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid[0] * self.grid[1], embed_dim))
        rates = [drop_path * i / max(depth - 1, 1) for i in range(depth)]  # 0 at block 0 ... drop_path at the last
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, r) for r in rates)
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(images)  # (B, P, D)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # (B, N, D)
        return x + self.pos_embed

    def forward(self, images: torch.Tensor, return_attention: bool = False):
        x, attentions = self.embed(images), []
        for block in self.blocks:
            x, weights = block(x, need_weights=return_attention)
            attentions.append(weights)
        x = self.norm(x)  # (B, N, D)
        return (x, attentions) if return_attention else x


def resize_pos_embed(pos_embed: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(1, 1 + g*g, D) -> (1, 1 + h*w, D): bicubic over the patch grid; the cls position is kept."""
    cls_pos, patch_pos = pos_embed[:, :1], pos_embed[:, 1:]
    g = int(math.isqrt(patch_pos.shape[1]))
    patch_pos = patch_pos.reshape(1, g, g, -1).permute(0, 3, 1, 2)  # (1, D, g, g)
    patch_pos = F.interpolate(patch_pos.float(), size=grid, mode="bicubic", align_corners=False)
    return torch.cat([cls_pos, patch_pos.flatten(2).transpose(1, 2)], dim=1)  # (1, 1 + h*w, D)


def load_deit_weights(vit: VisionTransformer, path: str) -> None:
    """Load an official DeiT checkpoint (state dict under "model", or bare) into `vit`, by exact key match.

    `path` is a file or "deit": the official URL (through torch.hub's cache) of the DEIT_ARCHS entry with this ViT's
    width, depth and heads, i.e. --arch's. Only `head.*` / `head_dist.*` (the ImageNet classifier) are skipped; any
    other missing, unexpected or mis-shaped key is an error listing them all.
    """
    size = (vit.cls_token.shape[-1], len(vit.blocks), vit.blocks[0].attn.num_heads)  # (D, depth, heads)
    url = next((u for *arch, u in DEIT_ARCHS.values() if tuple(arch) == size), None)
    if path == "deit" and url is None:
        raise SystemExit(f"error: --pretrained deit: no official DeiT has width, depth, heads {size} (see --arch)")
    if path == "deit":
        try:
            state = torch.hub.load_state_dict_from_url(url, map_location="cpu", check_hash=True)
        except Exception as e:  # offline, proxy, hash mismatch: all end the same way
            raise SystemExit(f"error: cannot fetch the DeiT weights from {url} ({type(e).__name__}: {e})."
                             " Download that file and pass --pretrained PATH, or use --pretrained none") from None
    elif not Path(path).is_file():
        raise SystemExit(f"error: --pretrained {path}: no such file. DeiT weights: "
                         f"{url or DEIT_ARCHS['deit_small'][3]}")
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise SystemExit(f"error: --pretrained {path} is not a readable torch checkpoint: {e}") from None
    state = state.get("model", state) if isinstance(state, dict) else state
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise SystemExit(f"error: --pretrained {path} holds a {type(state).__name__}, not a DeiT state dict "
                         "(name -> tensor, optionally under 'model')")
    state = {k: v for k, v in state.items() if not k.startswith(("head.", "head_dist."))}
    own = vit.state_dict()
    if "pos_embed" in state and state["pos_embed"].shape[1] != own["pos_embed"].shape[1]:
        state["pos_embed"] = resize_pos_embed(state["pos_embed"], vit.grid)
    problems = [f"missing: {k}" for k in own if k not in state]
    problems += [f"unexpected: {k}" for k in state if k not in own]
    problems += [f"shape {k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                 for k, v in state.items() if k in own and v.shape != own[k].shape]
    if problems:
        raise SystemExit(f"error: {path} does not fit this ViT ({len(problems)} problems):\n  " + "\n  ".join(problems))
    vit.load_state_dict(state)
# <<< vit-s end


# %% 3. Data: the pretraining set, generated in memory (data.generate with the 90 pretraining classes)
def make_set(n: int, size: int, seed: int, split: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, 3, S, S) uint8 images and (n,) int64 labels; the random stream is seeded by (seed, 100 + split), never
    the WSOL set's (seed, 0..2)."""
    images, labels, _ = data.generate(n, size, np.random.default_rng([seed, 100 + split]), PRETRAIN_CLASSES)
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels).long()


# %% 4. Model: a DeiT classifier, so the checkpoint has DeiT's key names (the ViT's plus head.*)
class DeiT(nn.Module):
    def __init__(self, args: Args, num_classes: int):
        super().__init__()
        self.vit = VisionTransformer(args.img_size, args.patch_size, args.embed_dim, args.depth, args.heads,
                                     args.drop_path)
        self.head = nn.Linear(args.embed_dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.vit(images)[:, 0])  # (B, C) from the final-normed cls token

    def deit_state(self) -> dict[str, torch.Tensor]:
        """DeiT key names: the ViT's own (patch_embed.*, cls_token, pos_embed, blocks.*, norm.*) plus head.*"""
        return {**self.vit.state_dict(), **{f"head.{k}": v for k, v in self.head.state_dict().items()}}


# %% 5. Loops
def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []  # DeiT's rule: no decay for 1-D params, biases, pos_embed and cls_token
    for name, p in model.named_parameters():
        skip = p.ndim <= 1 or name.endswith(".bias") or name.endswith(("pos_embed", "cls_token"))
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def learning_rate(args: Args, step: int, total: int) -> float:
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    return args.lr * 0.5 * (1.0 + math.cos(math.pi * (step - args.warmup_steps) / max(total - args.warmup_steps, 1)))


@torch.inference_mode()
def accuracy(model: DeiT, images: torch.Tensor, labels: torch.Tensor, device, batch_size: int = 500) -> float:
    model.eval()
    correct = sum((model(data.normalize(images[i:i + batch_size].to(device))).argmax(1).cpu()
                   == labels[i:i + batch_size]).sum().item() for i in range(0, len(labels), batch_size))
    model.train()
    return 100.0 * correct / max(len(labels), 1)


def train(args: Args) -> dict:
    common.seed_everything(args.seed)
    device = common.pick_device(args.device)
    t0 = time.perf_counter()
    train_x, train_y = make_set(args.n_train, args.img_size, args.seed, 0)
    val_x, val_y = make_set(args.n_val, args.img_size, args.seed, 1)
    resize = round(args.img_size * 256 / 224)  # R: the methods' train-time resize, then a random S crop and flip
    train_x = v2.Resize((resize, resize))(train_x)  # (N, 3, R, R) uint8, resized once
    print(f"pretraining set: {len(PRETRAIN_CLASSES)} classes, {args.n_train} train / {args.n_val} val images of "
          f"{args.img_size} px, generated in {time.perf_counter() - t0:.0f} s")
    model = DeiT(args, len(PRETRAIN_CLASSES)).to(device)
    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr)
    steps = math.ceil(args.n_train / args.batch_size)
    progress = common.Progress(args.epochs * steps, args.log_every)
    generator = torch.Generator().manual_seed(args.seed)
    for epoch in range(args.epochs):
        order, seen, loss_sum, correct = torch.randperm(args.n_train, generator=generator), 0, 0.0, 0
        for i in range(steps):
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(args, epoch * steps + i, args.epochs * steps)
            idx = order[i * args.batch_size:(i + 1) * args.batch_size]
            images = data.normalize(data.random_crops_flips(train_x[idx], args.img_size, torch.float32)).to(device)
            labels = train_y[idx].to(device)
            logits = model(images)  # (B, C)
            loss = F.cross_entropy(logits, labels, label_smoothing=args.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip or math.inf)
            common.check_finite(loss, {}, epoch, i, grad_norm)
            optimizer.step()
            seen, loss_sum = seen + len(idx), loss_sum + loss.item() * len(idx)
            correct += (logits.argmax(1) == labels).sum().item()
            progress.update(len(idx), f"epoch {epoch + 1}", loss=loss.item(), lr=optimizer.param_groups[0]["lr"])
        top1 = accuracy(model, val_x, val_y, device)
        print(f"epoch {epoch + 1}: train loss {loss_sum / seen:.3f}, train top-1 {100 * correct / seen:.1f} %, "
              f"val top-1 {top1:.1f} %", flush=True)
    common.save_checkpoint({"model": model.deit_state(), "args": dataclasses.asdict(args), "val_top1": top1,
                            "classes": [f"{s}_{t}" for s, t in PRETRAIN_CLASSES]}, args.out)
    minutes = (time.perf_counter() - t0) / 60
    print(f"wrote {args.out} (val top-1 {top1:.1f} % on {len(PRETRAIN_CLASSES)} classes, {minutes:.1f} min)")
    return {"val_top1": top1, "minutes": minutes}


# %% 6. Main
if __name__ == "__main__":
    train(common.parse_args(Args))
