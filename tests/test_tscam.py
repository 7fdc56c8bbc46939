"""tscam.py: the CLI end to end, gradients, maps, the DeiT loader, exact resume, schedule and Eigen-CAM."""

import json
import math
import subprocess
import sys

import pytest
import torch

import common
import sat
import scm
import tscam
from conftest import (
    ROOT,
    assert_beats_trivial_baselines,
    assert_cli_outputs,
    assert_eval_only_matches,
    assert_resume_reproduces,
    read_rows,
    run_cli,
    tiny_args,
)


def test_cli_end_to_end(tiny_synthetic, tmp_path):
    result = run_cli("tscam.py", tiny_synthetic, tmp_path, "--run-name", "cli")
    run = tmp_path / "cli"
    rows = read_rows(run)
    assert rows[0]["epoch"] == 1 and math.isfinite(rows[0]["train/cls"])
    assert_cli_outputs(run, rows[-1])
    assert json.loads((run / "args.json").read_text())["embed_dim"] == 32
    assert "img/s" in result.stdout and "ETA" in result.stdout
    assert "wsolevaluation" in result.stdout  # every printed number names its protocol


def test_every_parameter_gets_a_gradient(tiny_synthetic, tmp_path):
    args = tiny_args(tscam, tiny_synthetic, tmp_path)
    model = tscam.TSCAM(args, num_classes=10)
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    loss, parts = tscam.compute_loss(model(images), labels, args)
    loss.backward()
    assert parts["cls"] == pytest.approx(loss.item())
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_maps_shapes_and_coupling(tiny_synthetic, tmp_path):
    args = tiny_args(tscam, tiny_synthetic, tmp_path)
    model = tscam.TSCAM(args, num_classes=10).eval()
    images = torch.randn(3, 3, 32, 32)
    out = model(images, need_maps=True)
    assert out["logits"].shape == (3, 10) and out["semantic"].shape == (3, 10, 4, 4)
    torch.testing.assert_close(out["logits"], out["semantic"].mean(dim=(2, 3)))
    # A by hand: head-mean of each block's softmax weights, summed over blocks, cls row, patch columns
    _, weights = model.vit(images, return_attention=True)
    by_hand = sum(w.mean(dim=1) for w in weights)[:, 0, 1:].reshape(3, 4, 4)
    torch.testing.assert_close(out["attention"], by_hand)
    assert (out["attention"] > 0).all() and (out["attention"] < args.depth).all()  # sums of softmax entries
    coupled = tscam.localization_map(model, out, images, "tscam")
    torch.testing.assert_close(coupled, out["attention"][:, None] * out["semantic"])
    assert tscam.localization_map(model, out, images, "semantic").shape == (3, 10, 4, 4)
    for kind in ("attention", "eigencam"):
        m = tscam.localization_map(model, out, images, kind)
        assert m.shape == (3, 1, 4, 4) and torch.isfinite(m).all() and (m >= 0).all()


def test_fused_and_explicit_attention_agree():
    vit = tscam.VisionTransformer(32, 8, 32, 2, 2, drop_path=0.0).eval()
    images = torch.randn(2, 3, 32, 32)
    fused = vit(images)
    explicit, weights = vit(images, return_attention=True)
    torch.testing.assert_close(fused, explicit, atol=1e-5, rtol=1e-5)
    assert len(weights) == 2 and weights[0].shape == (2, 2, 17, 17)
    torch.testing.assert_close(weights[0].sum(-1), torch.ones(2, 2, 17))


def test_key_gate_scales_columns_without_renormalising():
    attn = tscam.Attention(dim=4, num_heads=1)
    x = torch.randn(1, 3, 4)
    gate = torch.tensor([[1.0, 0.5, 0.0]])
    _, plain = attn(x, need_weights=True)
    _, gated = attn(x, need_weights=True, key_gate=gate)
    torch.testing.assert_close(gated, plain * gate[:, None, None, :])


def deit_style_checkpoint(grid_side: int, dim: int = 32, depth: int = 2, heads: int = 2) -> dict:
    """A checkpoint with the official DeiT key layout ("model" dict with a 1000-way head), at a given grid."""
    vit = tscam.VisionTransformer(grid_side * 8, 8, dim, depth, heads)
    state = dict(vit.state_dict())
    state["head.weight"], state["head.bias"] = torch.randn(1000, dim), torch.randn(1000)
    return {"model": state}


def test_deit_loader_exact_keys_and_pos_embed_resize(tmp_path):
    ckpt = deit_style_checkpoint(grid_side=4)
    path = tmp_path / "deit_tiny.pth"
    torch.save(ckpt, path)
    same = tscam.VisionTransformer(32, 8, 32, 2, 2)
    tscam.load_deit_weights(same, str(path))
    for k, v in same.state_dict().items():
        torch.testing.assert_close(v, ckpt["model"][k])
    bigger = tscam.VisionTransformer(48, 8, 32, 2, 2)  # 6x6 grid: pos_embed resized bicubically from 4x4
    tscam.load_deit_weights(bigger, str(path))
    assert bigger.pos_embed.shape == (1, 37, 32)
    torch.testing.assert_close(bigger.pos_embed[:, :1], ckpt["model"]["pos_embed"][:, :1])
    torch.testing.assert_close(bigger.blocks[1].mlp.fc2.weight, ckpt["model"]["blocks.1.mlp.fc2.weight"])
    bare = tmp_path / "bare.pth"  # a state dict saved without the "model" wrapper loads too
    torch.save(ckpt["model"], bare)
    tscam.load_deit_weights(tscam.VisionTransformer(32, 8, 32, 2, 2), str(bare))


def test_deit_loader_refuses_partial_loads(tmp_path):
    state = deit_style_checkpoint(grid_side=4)["model"]
    del state["blocks.0.attn.qkv.bias"]
    state["blocks.1.mlp.fc1.weight"] = torch.randn(7, 32)
    state["dist_token"] = torch.randn(1, 1, 32)
    path = tmp_path / "broken.pth"
    torch.save({"model": state}, path)
    vit = tscam.VisionTransformer(32, 8, 32, 2, 2)
    before = {k: v.clone() for k, v in vit.state_dict().items()}
    with pytest.raises(SystemExit) as err:
        tscam.load_deit_weights(vit, str(path))
    message = str(err.value)
    assert "missing: blocks.0.attn.qkv.bias" in message and "unexpected: dist_token" in message
    assert "shape blocks.1.mlp.fc1.weight" in message and "3 problems" in message
    for k, v in vit.state_dict().items():  # nothing was loaded
        torch.testing.assert_close(v, before[k])
    with pytest.raises(SystemExit, match="dl.fbaipublicfiles.com"):
        tscam.load_deit_weights(vit, str(tmp_path / "nowhere.pth"))


def test_step_schedule_matches_the_official_rule():
    args = tscam.Args(data="cub")
    common.apply_preset(args, tscam.PRESETS)
    steps = 10  # per epoch; the rule fires at the start of 1-based epochs 30 and 60
    lr = [tscam.learning_rate(args, e * steps, steps) for e in range(60)]
    assert lr[0] == lr[28] == 5e-5
    assert lr[29] == pytest.approx(5e-6) and lr[58] == pytest.approx(5e-6)
    assert lr[59] == pytest.approx(5e-7)
    ilsvrc = tscam.Args(data="ilsvrc")
    common.apply_preset(ilsvrc, tscam.PRESETS)
    lr = [tscam.learning_rate(ilsvrc, e, 1) for e in range(20)]
    assert [round(v / 5e-4, 6) for v in (lr[8], lr[9], lr[10], lr[11], lr[18], lr[19])] == [1, 0.1, 0.1, 0.01, 0.01,
                                                                                             0.001]


def test_cosine_schedule_warms_up_then_decays():
    args = tscam.Args()
    common.apply_preset(args, tscam.PRESETS)
    total = args.epochs * 100
    lr = [tscam.learning_rate(args, s, 100) for s in range(total)]
    assert lr[0] == pytest.approx(args.lr / args.warmup_steps) and lr[args.warmup_steps - 1] == pytest.approx(args.lr)
    assert lr[args.warmup_steps] == pytest.approx(args.lr) and lr[-1] < 1e-3 * args.lr
    assert all(a >= b for a, b in zip(lr[args.warmup_steps:-1], lr[args.warmup_steps + 1:], strict=True))


def test_no_weight_decay_on_vectors_and_tokens():
    model = tscam.TSCAM(tscam.Args(img_size=32, patch_size=8, embed_dim=32, depth=1, heads=2), num_classes=3)
    decay, no_decay = tscam.param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    skipped = {names[id(p)] for p in no_decay["params"]}
    assert {"vit.pos_embed", "vit.cls_token", "head.bias", "vit.norm.weight", "vit.blocks.0.attn.qkv.bias"} <= skipped
    assert {names[id(p)] for p in decay["params"]} == {"vit.patch_embed.proj.weight", "vit.blocks.0.attn.qkv.weight",
                                                       "vit.blocks.0.attn.proj.weight", "vit.blocks.0.mlp.fc1.weight",
                                                       "vit.blocks.0.mlp.fc2.weight", "head.weight"}
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0


@pytest.mark.parametrize("module", [tscam, scm, sat], ids=["tscam", "scm", "sat"])
def test_head_lr_mult_gives_the_new_layers_their_own_lr(module, tiny_synthetic, tmp_path):
    """--head-lr-mult: the layers outside vit. (head; SCM's calibration; SAT's spatial token) train at lr x mult, the
    backbone at lr; at 1 (every real-data preset) the groups are the official two."""
    args = tiny_args(module, tiny_synthetic, tmp_path, "--lr", "1e-3", "--schedule", "cosine", "--warmup-steps", "0")
    model = getattr(module, module.__name__.upper())(args, num_classes=3)
    official = module.param_groups(model, 0.05)
    assert [(g["weight_decay"], g["lr_mult"]) for g in official] == [(0.05, 1.0), (0.0, 1.0)]
    names = {id(p): n for n, p in model.named_parameters()}
    groups = module.param_groups(model, 0.05, head_lr_mult=10.0)
    by_name = {names[id(p)]: g["lr_mult"] for g in groups for p in g["params"]}
    assert len(by_name) == len(names) and by_name["head.weight"] == 10.0
    assert by_name["vit.blocks.0.attn.qkv.weight"] == 1.0
    assert {n for n, m in by_name.items() if m == 10.0} == {n for n in names.values() if not n.startswith("vit.")}
    final = module.main(tiny_args(module, tiny_synthetic, tmp_path, "--lr", "1e-3", "--schedule", "cosine",
                                  "--warmup-steps", "0", "--head-lr-mult", "10", "--run-name", "h"))
    saved = torch.load(tmp_path / "h" / "last.pt", weights_only=False)["optimizer"]["param_groups"]
    lrs = {g["lr_mult"]: g["lr"] for g in saved}  # the last step's LR of each group
    assert set(lrs) == {1.0, 10.0} and lrs[10.0] == pytest.approx(10 * lrs[1.0]) and lrs[1.0] > 0
    assert math.isfinite(final["test/GT-known Loc"])


def test_resume_reproduces_the_uninterrupted_run(tiny_synthetic, tmp_path):
    # the step schedule does not depend on the total epochs, so a 1-epoch run is the 2-epoch run cut short
    flags = ("--schedule", "step", "--lr-steps", "2", "--lr", "1e-3")
    assert_resume_reproduces(tscam, tiny_synthetic, tmp_path, *flags)


def test_eval_only_matches_the_training_run(tiny_synthetic, tmp_path):
    assert_eval_only_matches(tscam, tiny_synthetic, tmp_path)


def test_eigen_cam_finds_the_principal_direction():
    # 6 positions, 3 channels, rank one: position i holds weights[i] * u with |u| = 1 and mean(weights) = 0,
    # so the centred features are X = weights u^T, v1 = +-u and p = X v1 = +-weights
    u = torch.tensor([1.0, 2.0, 2.0]) / 3
    weights = torch.tensor([5.0, 1.0, 0.0, -1.0, -2.0, -3.0])
    features = (weights[:, None] * u)[None] + torch.tensor([0.5, -1.0, 2.0])  # (1, 6, 3); the offset is centred away
    p = common.eigen_cam(features)
    torch.testing.assert_close(p[0], weights.clamp(min=0), atol=1e-5, rtol=1e-5)  # maxabs: |5| > |-3| keeps +
    assert common.eigen_cam(features, sign="none").shape == (1, 6)
    flipped = common.eigen_cam(torch.cat([features, -features]), sign="maxabs")
    assert flipped.shape == (2, 6) and (flipped >= 0).all()


def test_bad_data_root_is_a_clear_error(tmp_path):
    missing = tmp_path / "no_cub_here"
    cmd = [sys.executable, "tscam.py", "--data", "cub", "--data-root", str(missing), "--out-dir", str(tmp_path)]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert str(missing) in result.stderr and "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == [], "a run that cannot load its data must write nothing"


def test_parse_args_understands_the_field_types():
    args = common.parse_args(tscam.Args, ["--no-deterministic", "--lr-steps", "3", "7", "--map", "eigencam",
                                          "--lr", "none", "--grad-clip", "0.5"])
    assert args.lr_steps == (3, 7) and args.map == "eigencam" and args.lr is None and args.grad_clip == 0.5
    with pytest.raises(SystemExit):
        common.parse_args(tscam.Args, ["--map", "gradcam"])


@pytest.mark.slow
def test_default_synthetic_run_beats_the_trivial_baselines(tmp_path):
    final = tscam.main(common.parse_args(tscam.Args, ["--out-dir", str(tmp_path)]))
    assert_beats_trivial_baselines(final)
