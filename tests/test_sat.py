"""sat.py: the CLI end to end, gradients (spatial token included), the gated attention and both spatial losses against
hand-computed values, the Gaussian kernel, the official-behaviour flags, resume and eval-only."""

import json
import math

import pytest
import torch

import common
import sat
from conftest import (
    assert_beats_trivial_baselines,
    assert_cli_outputs,
    assert_eval_only_matches,
    assert_resume_reproduces,
    read_rows,
    run_cli,
    tiny_args,
)

SPEC_KERNEL = {"corner": 0.002628, "edge": 0.046012, "centre": 0.805440}  # spec A1.3, from the official get_kernel


def sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


def identity_attention(cls, dim: int, heads: int):
    """An attention whose q, k, v and output projection are all the identity, so q = k = v = x."""
    attn = cls(dim=dim, num_heads=heads)
    with torch.no_grad():
        attn.qkv.weight.copy_(torch.cat([torch.eye(dim)] * 3))
        attn.qkv.bias.zero_()
        attn.proj.weight.copy_(torch.eye(dim))
        attn.proj.bias.zero_()
    return attn


def test_cli_end_to_end(tiny_synthetic, tmp_path):
    result = run_cli("sat.py", tiny_synthetic, tmp_path, "--run-name", "cli")
    run = tmp_path / "cli"
    rows = read_rows(run)
    assert rows[0]["epoch"] == 1
    for key in ("train/cls", "train/batch_area", "train/norm", "train/area"):
        assert math.isfinite(rows[0][key]), key
    assert 0.0 < rows[0]["train/area"] < 1.0
    final = rows[-1]
    assert_cli_outputs(run, final, "test/sat-repo/GT-known Loc", "test/sat-repo/Top-1 Loc")  # official protocol
    args = json.loads((run / "args.json").read_text())
    assert args["embed_dim"] == 32 and args["test_crop"] is False
    assert args["area_threshold"] == sat.PRESETS["synthetic"]["area_threshold"]
    assert final["test/sat-repo/threshold"] == sat.PRESETS["synthetic"]["repo_threshold"]
    assert "img/s" in result.stdout and "wsolevaluation" in result.stdout and "SAT repo protocol" in result.stdout


def test_every_parameter_gets_a_gradient(tiny_synthetic, tmp_path):
    args = tiny_args(sat, tiny_synthetic, tmp_path)
    model = sat.SAT(args, num_classes=10)
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    loss, parts = sat.compute_loss(model(images), labels, args)
    loss.backward()
    assert loss.item() == pytest.approx(parts["cls"] + parts["batch_area"] + parts["norm"], rel=1e-5)
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    for name in ("spatial_token", "spatial_pos_embed"):
        assert getattr(model, name).grad.abs().sum() > 0, name
    assert "smoothing" not in " ".join(n for n, _ in model.named_parameters())  # the fixed kernel is not trained


def test_map_losses_alone_reach_the_spatial_token(tiny_synthetic, tmp_path):
    # L_ba + L_norm depend on the image only through M, so their gradient must flow through the spatial query
    args = tiny_args(sat, tiny_synthetic, tmp_path)
    model = sat.SAT(args, num_classes=10)
    out = model(torch.randn(4, 3, 32, 32))
    _, parts = sat.compute_loss(out, torch.zeros(4, dtype=torch.long), args)
    out["loc_map"].mean().backward()
    assert model.spatial_token.grad.abs().sum() > 0 and model.spatial_pos_embed.grad.abs().sum() > 0
    assert model.head.weight.grad is None  # the map does not go through the classifier head


def test_gating_one_head_by_hand():
    # 1 head, width 2 (scale 1/sqrt 2), q = k = v = x; tokens x0 = (1, 0), x1 = (0, 1), spatial x2 = (1, 1)
    attn = identity_attention(sat.SpatialAwareAttention, dim=2, heads=1)
    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]])
    s = 1 / math.sqrt(2)
    logits = [[s, 0.0, s], [0.0, s, s], [s, s, 2 * s]]  # x_i . x_j * s
    m = [sigmoid(s), sigmoid(s), sigmoid(2 * s)]  # the spatial token's row (the last), sigmoid of the RAW logits
    softmax = [[math.exp(v) / sum(math.exp(u) for u in row) for v in row] for row in logits]
    gated = [[softmax[i][j] * m[j] for j in range(3)] for i in range(3)]  # column j times m_j, no renormalisation
    out, weights = attn(x, need_weights=True)
    torch.testing.assert_close(attn.foreground, torch.tensor([m]))
    torch.testing.assert_close(weights, torch.tensor([[gated]]))
    expected_out = [[sum(gated[i][j] * x[0, j, c].item() for j in range(3)) for c in range(2)] for i in range(3)]
    torch.testing.assert_close(out, torch.tensor([expected_out]))
    assert m[0] == pytest.approx(0.669761, abs=1e-6) and m[2] == pytest.approx(0.804429, abs=1e-6)
    assert (weights.sum(-1) < 1).all()  # rows no longer sum to 1


def test_gating_averages_logits_over_heads_before_the_sigmoid():
    # 2 heads of width 1 (scale 1): head 0 sees coordinate 0, head 1 coordinate 1; spatial token x2 = (1, 2)
    attn = identity_attention(sat.SpatialAwareAttention, dim=2, heads=2)
    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 2.0]]])
    attn(x, need_weights=True)
    # spatial row: head 0 = 1 * (1, 0, 1), head 1 = 2 * (0, 1, 2); head mean (0.5, 1, 2.5)
    expected = torch.tensor([[sigmoid(0.5), sigmoid(1.0), sigmoid(2.5)]])
    torch.testing.assert_close(attn.foreground, expected)
    mean_of_sigmoids = torch.tensor([[(sigmoid(1) + sigmoid(0)) / 2, (sigmoid(0) + sigmoid(2)) / 2,
                                      (sigmoid(1) + sigmoid(4)) / 2]])
    assert not torch.allclose(attn.foreground, mean_of_sigmoids, atol=1e-3)


def test_gated_block_matches_a_plain_block_with_that_gate():
    torch.manual_seed(0)
    plain = sat.Block(8, 2, drop_path=0.0)
    gated = sat.SpatialAwareBlock(8, 2, drop_path=0.0)
    gated.load_state_dict(plain.state_dict())
    x = torch.randn(2, 5, 8)
    y, foreground = gated(x)
    assert foreground.shape == (2, 5) and ((foreground > 0) & (foreground < 1)).all()
    y_plain, _ = plain(x, key_gate=foreground)  # the shared key_gate hook with the same gate gives the same block
    torch.testing.assert_close(y, y_plain)
    assert gated.attn.foreground is None  # the map is handed over, not kept on the module


def test_batch_area_loss_by_hand():
    args = sat.Args(area_threshold=0.2)
    # image 0: M = 0.5 everywhere (area 0.5); image 1: M = 0 (area 0); batch mean 0.25 -> |0.25 - 0.2| = 0.05
    # (a per-image loss would give (|0.5 - 0.2| + |0 - 0.2|) / 2 = 0.25)
    loc_map = torch.stack([torch.full((2, 2), 0.5), torch.zeros(2, 2)])
    out = {"logits": torch.zeros(2, 4), "loc_map": loc_map}
    loss, parts = sat.compute_loss(out, torch.tensor([0, 3]), args)
    assert parts["area"] == pytest.approx(0.25) and parts["batch_area"] == pytest.approx(0.05)
    assert parts["cls"] == pytest.approx(math.log(4))
    assert loss.item() == pytest.approx(math.log(4) + 0.05 + parts["norm"], rel=1e-6)


def test_normalization_loss_by_hand():
    args = sat.Args(area_threshold=0.25)
    c, e, k = SPEC_KERNEL["centre"], SPEC_KERNEL["edge"], SPEC_KERNEL["corner"]
    # a 3x3 map with a single 1 in the middle: M_f is the kernel itself
    delta = torch.zeros(1, 3, 3)
    delta[0, 1, 1] = 1.0
    _, parts = sat.compute_loss({"logits": torch.zeros(1, 2), "loc_map": delta}, torch.tensor([0]), args)
    expected = (c * (1 - c) + 4 * e * (1 - e) + 4 * k * (1 - k)) / 9
    assert parts["norm"] == pytest.approx(expected, abs=1e-5)
    # M = 0.5 on a 2x2 grid: with zero padding each pixel keeps centre + 2 edges + 1 corner of the kernel
    half = torch.full((1, 2, 2), 0.5)
    _, parts = sat.compute_loss({"logits": torch.zeros(1, 2), "loc_map": half}, torch.tensor([0]), args)
    smoothed = 0.5 * (c + 2 * e + k)  # 0.450046: the border pulls it below 0.5
    assert parts["norm"] == pytest.approx(smoothed * (1 - smoothed), abs=1e-5)
    assert parts["batch_area"] == pytest.approx(0.25)  # L_ba uses the unsmoothed map


def test_gaussian_kernel_is_the_official_one():
    kernel = sat.gaussian_kernel(3, 6.0)
    assert kernel.shape == (1, 1, 3, 3) and kernel.sum().item() == pytest.approx(1.0)
    expected = torch.tensor([[SPEC_KERNEL["corner"], SPEC_KERNEL["edge"], SPEC_KERNEL["corner"]],
                             [SPEC_KERNEL["edge"], SPEC_KERNEL["centre"], SPEC_KERNEL["edge"]],
                             [SPEC_KERNEL["corner"], SPEC_KERNEL["edge"], SPEC_KERNEL["corner"]]])
    torch.testing.assert_close(kernel[0, 0], expected, atol=2e-6, rtol=0)
    # the same construction with math.erf: Phi at linspace(-a, a, 4), a = 6 + r/2, r = 13/3: -a, -a/3, a/3, a
    a = 6 + 13 / 6
    phi = [0.5 * (1 + math.erf(v / math.sqrt(2))) for v in (-a, -a / 3)]
    side, mid = phi[1] - phi[0], 1 - 2 * phi[1]  # the 1-D weights: (side, mid, side), symmetric
    total = mid + 4 * math.sqrt(side * mid) + 4 * side  # sqrt of the outer product, summed
    assert kernel[0, 0, 1, 1].item() == pytest.approx(mid / total, abs=1e-6)
    assert kernel[0, 0, 0, 1].item() == pytest.approx(math.sqrt(side * mid) / total, abs=1e-6)
    assert kernel[0, 0, 0, 0].item() == pytest.approx(side / total, abs=1e-6)
    assert sat.gaussian_kernel(5, 6.0).shape == (1, 1, 5, 5)


def test_maps_shapes_and_ranges(tiny_synthetic, tmp_path):
    args = tiny_args(sat, tiny_synthetic, tmp_path, "--depth", "3", "--num-sa-blocks", "2")
    model = sat.SAT(args, num_classes=10).eval()
    assert [type(b).__name__ for b in model.vit.blocks] == ["Block", "SpatialAwareBlock", "SpatialAwareBlock"]
    images = torch.randn(3, 3, 32, 32)
    out = model(images)
    assert out["logits"].shape == (3, 10) and out["semantic"].shape == (3, 10, 4, 4)
    assert out["maps"].shape == (3, 2, 4, 4) and out["loc_map"].shape == (3, 4, 4)
    torch.testing.assert_close(out["loc_map"], out["maps"].mean(dim=1))
    assert ((out["loc_map"] > 0) & (out["loc_map"] < 1)).all()
    m = sat.localization_map(model, out, images, "sat")
    assert m.shape == (3, 1, 4, 4)
    assert sat.localization_map(model, out, images, "semantic").shape == (3, 10, 4, 4)
    eig = sat.localization_map(model, out, images, "eigencam")
    assert eig.shape == (3, 1, 4, 4) and torch.isfinite(eig).all() and (eig >= 0).all()


def test_map_reads_the_spatial_token_as_the_last_query(tiny_synthetic, tmp_path):
    # the map of the single gated block, written out from its own qkv weights
    args = tiny_args(sat, tiny_synthetic, tmp_path, "--depth", "1", "--drop-path", "0")
    model = sat.SAT(args, num_classes=10).eval()
    images = torch.randn(2, 3, 32, 32)
    block = model.vit.blocks[0]
    x = block.norm1(model.tokens(images))  # (2, 18, 32): cls, 16 patches, spatial
    q, k, _ = block.attn.qkv(x).chunk(3, dim=-1)
    heads, d = args.heads, args.embed_dim // args.heads
    q_s = q[:, -1].reshape(2, heads, d)  # the spatial token's query, per head
    k = k.reshape(2, 18, heads, d)
    logits = torch.einsum("bhd,bnhd->bhn", q_s, k) / math.sqrt(d)  # (2, heads, 18)
    expected = torch.sigmoid(logits.mean(1))[:, 1:-1].reshape(2, 4, 4)
    torch.testing.assert_close(model(images)["loc_map"], expected)


def test_gated_blocks_keep_deit_names_and_load_a_checkpoint(tmp_path):
    args = sat.Args(img_size=32, patch_size=8, embed_dim=32, depth=2, heads=2)
    common.apply_preset(args, sat.PRESETS)
    vit = sat.VisionTransformer(32, 8, 32, 2, 2)
    state = {**vit.state_dict(), "head.weight": torch.randn(1000, 32), "head.bias": torch.randn(1000)}
    torch.save({"model": state}, tmp_path / "deit.pth")
    model = sat.SAT(args, num_classes=5)
    assert set(model.vit.state_dict()) == set(vit.state_dict())
    spatial_before = model.spatial_token.detach().clone()
    sat.load_deit_weights(model.vit, str(tmp_path / "deit.pth"))
    torch.testing.assert_close(model.vit.blocks[1].attn.qkv.weight, state["blocks.1.attn.qkv.weight"])
    torch.testing.assert_close(model.spatial_token, spatial_before)  # new parameters keep their init
    with pytest.raises(SystemExit, match="num-sa-blocks"):
        sat.SAT(sat.Args(**{**vars(args), "num_sa_blocks": 0}), num_classes=5)


def test_weight_decay_groups_official_and_ours():
    model = sat.SAT(sat.Args(img_size=32, patch_size=8, embed_dim=32, depth=1, heads=2), num_classes=3)
    names = {id(p): n for n, p in model.named_parameters()}
    tokens = {"spatial_token", "spatial_pos_embed", "vit.pos_embed", "vit.cls_token"}
    decay, no_decay = sat.param_groups(model, 0.05)
    assert tokens <= {names[id(p)] for p in no_decay["params"]}
    assert {"head.bias", "vit.norm.weight"} <= {names[id(p)] for p in no_decay["params"]}
    decay, no_decay = sat.param_groups(model, 0.05, decay_tokens=True)  # what the official DataParallel run did
    assert tokens <= {names[id(p)] for p in decay["params"]}
    assert not tokens & {names[id(p)] for p in no_decay["params"]}


def test_schedules_constant_official_and_cosine():
    args = sat.Args(data="cub")
    common.apply_preset(args, sat.PRESETS)
    assert (args.area_threshold, args.repo_threshold, args.test_crop) == (0.25, 0.4, True)
    lr = [sat.learning_rate(args, s, 10) for s in range(args.epochs * 10)]
    assert lr[0] == pytest.approx(1e-4) and lr[-1] == pytest.approx(1e-6, abs=1e-7)
    assert all(a >= b for a, b in zip(lr[:-1], lr[1:], strict=True))
    args.schedule = "constant"
    assert {sat.learning_rate(args, s, 10) for s in range(args.epochs * 10)} == {1e-4}
    ilsvrc = sat.Args(data="ilsvrc")
    common.apply_preset(ilsvrc, sat.PRESETS)
    assert (ilsvrc.area_threshold, ilsvrc.lr, ilsvrc.epochs, ilsvrc.repo_threshold) == (0.35, 1.5e-5, 5, 0.3)


def test_map_losses_ramp_in_on_the_synthetic_preset_only():
    args = sat.Args()
    common.apply_preset(args, sat.PRESETS)
    warmup = args.map_loss_warmup
    assert [sat.map_loss_ramp(args, s) for s in (0, warmup // 2, warmup, 10 * warmup)] == [0.0, 0.5, 1.0, 1.0]
    cub = sat.Args(data="cub")
    common.apply_preset(cub, sat.PRESETS)
    assert sat.map_loss_ramp(cub, 0) == 1.0  # official: the map losses act from the first step
    out = {"logits": torch.zeros(2, 4), "loc_map": torch.full((2, 3, 3), 0.7)}
    full, parts = sat.compute_loss(out, torch.tensor([0, 1]), args)
    half, _ = sat.compute_loss(out, torch.tensor([0, 1]), args, ramp=0.5)
    assert half.item() == pytest.approx(parts["cls"] + 0.5 * (parts["batch_area"] + parts["norm"]), rel=1e-6)
    assert full.item() == pytest.approx(parts["cls"] + parts["batch_area"] + parts["norm"], rel=1e-6)


def test_resume_reproduces_the_uninterrupted_run(tiny_synthetic, tmp_path):
    flags = ("--schedule", "constant", "--lr", "1e-3")  # a constant LR does not depend on the total epochs
    assert_resume_reproduces(sat, tiny_synthetic, tmp_path, *flags)


def test_eval_only_matches_the_training_run(tiny_synthetic, tmp_path):
    assert_eval_only_matches(sat, tiny_synthetic, tmp_path)


@pytest.mark.slow
def test_default_synthetic_run_beats_the_trivial_baselines(tmp_path):
    final = sat.main(common.parse_args(sat.Args, ["--out-dir", str(tmp_path)]))
    assert_beats_trivial_baselines(final)
