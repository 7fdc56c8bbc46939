"""scm.py: the CLI end to end, gradients (lambda, theta, the detached Newton-Schulz seed), the calibration layer
against hand-computed cases, the flat-map guard, and SCM's absence from the eval path."""

import json
import math

import pytest
import torch

import common
import scm
from conftest import (
    assert_beats_trivial_baselines,
    assert_cli_outputs,
    assert_eval_only_matches,
    read_rows,
    run_cli,
    tiny_args,
)

ALPHA = 0.002


def test_cli_end_to_end(tiny_synthetic, tmp_path):
    result = run_cli("scm.py", tiny_synthetic, tmp_path, "--run-name", "cli")
    run = tmp_path / "cli"
    rows = read_rows(run)
    assert rows[0]["epoch"] == 1 and math.isfinite(rows[0]["train/cls"])
    assert all(math.isfinite(rows[0][f"scm/{s}{i}"]) for s in ("lambda", "theta") for i in range(4))
    assert_cli_outputs(run, rows[-1])
    args = json.loads((run / "args.json").read_text())
    assert args["embed_dim"] == 32 and args["scm_iterations"] == [16, 4, 4, 4] and args["map"] == "scm"
    assert "wsolevaluation" in result.stdout  # every printed number names its protocol


def test_every_parameter_gets_a_finite_gradient(tiny_synthetic, tmp_path):
    args = tiny_args(scm, tiny_synthetic, tmp_path)
    model = scm.SCM(args, num_classes=10).train()
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    loss, parts = scm.compute_loss(model(images), labels, args)
    loss.backward()
    assert parts["cls"] == pytest.approx(loss.item())
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    for i, layer in enumerate(model.calibration.layers):  # the 8 SCM scalars learn (spec §3.2)
        assert layer.lam.grad.abs().item() > 0 and layer.theta.grad.abs().item() > 0, i
    # the loss also depends on the attention: SCM passes gradient back to a_0 = minmax(A) (spec §3.2)
    attention = torch.rand(2, 16, requires_grad=True)
    model.calibration(torch.randn(2, 10, 4, 4), scm.minmax(attention)).sum().backward()
    assert torch.isfinite(attention.grad).all() and attention.grad.abs().sum() > 0


def test_grid_laplacian_by_hand():
    # 1 x 3 grid, a path 0 - 1 - 2
    torch.testing.assert_close(scm.grid_laplacian(1, 3), torch.tensor([[1., -1, 0], [-1, 2, -1], [0, -1, 1]]))
    # 2 x 2 grid, index r * 2 + c: a 4-cycle 0 - 1 - 3 - 2 - 0, every degree 2, 0 and 3 not linked (diagonal)
    torch.testing.assert_close(scm.grid_laplacian(2, 2), torch.tensor([[2., -1, -1, 0], [-1, 2, 0, -1],
                                                                       [-1, 0, 2, -1], [0, -1, -1, 2]]))
    # 2 x 3 grid (not square): patch 1 = (0, 1) touches 0, 2 and 4 = (1, 1); 3 = (1, 0) touches 0 and 4, not 2
    lap = scm.grid_laplacian(2, 3)
    assert lap[1].tolist() == [-1, 3, -1, 0, -1, 0] and lap[3].tolist() == [-1, 0, 0, 2, -1, 0]
    # ViT-S/16's 14 x 14 grid: 728 links (spec §3.2), degrees 2 (4 corners), 3 (48 edge patches), 4 (144 inside)
    lap = scm.grid_laplacian(14, 14)
    assert int((lap - torch.diag(lap.diag()) != 0).sum()) == 728
    assert torch.equal(lap, lap.T) and lap.sum(dim=1).abs().max() == 0
    assert sorted(torch.bincount(lap.diag().long()).tolist()) == [0, 0, 4, 48, 144]


def test_newton_schulz_by_hand():
    # 1 x 2 grid, lambda = 1, orthogonal class scores: M = L * (Sim - 1) = [[0, 1], [1, 0]] =: J, and J^2 = I.
    # X_0 = a J, X_1 = a J (2I - a J^2) = a(2 - a) J, X_2 = X_1 (2I - J X_1) = c1 (2 - c1) J: 1 - c_{k+1} = (1 - c_k)^2
    J = torch.tensor([[[0.0, 1.0], [1.0, 0.0]]], dtype=torch.float64)
    c1 = ALPHA * (2 - ALPHA)  # 0.003996
    c2 = c1 * (2 - c1)  # 0.007976032...
    assert c1 == pytest.approx(0.003996) and c2 == pytest.approx(0.00797603, rel=1e-6)
    torch.testing.assert_close(scm.newton_schulz(J, 1, ALPHA), c1 * J)
    torch.testing.assert_close(scm.newton_schulz(J, 2, ALPHA), c2 * J)
    for n in (4, 16):
        torch.testing.assert_close(scm.newton_schulz(J, n, ALPHA), (1 - (1 - ALPHA) ** 2**n) * J)
    # 4 iterations are far from J^{-1} = J (about 0.032 J, spec §3.2), 16 are at it
    assert scm.newton_schulz(J, 4, ALPHA)[0, 0, 1].item() == pytest.approx(0.0315, abs=1e-3)
    assert scm.newton_schulz(J, 16, ALPHA)[0, 0, 1].item() == pytest.approx(1.0, abs=1e-12)

    # general lambda and similarity s on 1 x 2: M = p I + q J with p = lambda - 1, q = 1 - lambda s. On M's
    # eigenvectors (1, +-1)/sqrt 2, eigenvalues mu = p +- q, the iteration is scalar: x_0 = alpha mu and
    # x_{k+1} = x_k (2 - mu x_k), so 1 - mu x_{k+1} = (1 - mu x_k)^2 and x_n = (1 - (1 - alpha mu^2)^(2^n)) / mu
    lam, s, n = 1.5, 0.96, 4
    p, q = lam - 1, 1 - lam * s
    x_plus, x_minus = ((1 - (1 - ALPHA * mu**2) ** 2**n) / mu for mu in (p + q, p - q))
    expected = torch.tensor([[x_plus + x_minus, x_plus - x_minus], [x_plus - x_minus, x_plus + x_minus]],
                            dtype=torch.float64) / 2
    M = torch.tensor([[[p, q], [q, p]]], dtype=torch.float64)  # L = [[1, -1], [-1, 1]], Sim = [[1, s], [s, 1]]
    torch.testing.assert_close(scm.newton_schulz(M, n, ALPHA)[0], expected)


def test_newton_schulz_seed_carries_no_gradient():
    m = torch.tensor([[[3.0]]], dtype=torch.float64, requires_grad=True)
    assert not scm.newton_schulz(m, 0, ALPHA).requires_grad  # X_0 alone: detached (spec §3.2 step 4)
    # 1 x 1, one iteration: X_1 = c (2 - m c) with the seed c = alpha m held constant, so dX_1/dm = -c^2
    # (with a live seed X_1 = 2 alpha m - alpha^2 m^3 and the derivative would be 2 alpha - 3 alpha^2 m^2)
    (grad,) = torch.autograd.grad(scm.newton_schulz(m, 1, ALPHA).sum(), m)
    assert grad.item() == pytest.approx(-((ALPHA * 3.0) ** 2), rel=1e-12)  # -3.6e-5, where a live seed gives +3.9e-3


def two_by_two_case():
    """2 x 2 grid, C = 2: class-score vectors at angles 0, 90, 60 and 150 degrees (lengths 2, 1, 1, 3)."""
    angles = torch.tensor([0.0, 90.0, 60.0, 150.0], dtype=torch.float64).deg2rad()
    lengths = torch.tensor([2.0, 1.0, 1.0, 3.0], dtype=torch.float64)
    z = lengths[:, None] * torch.stack([angles.cos(), angles.sin()], dim=1)  # (P, C)
    x = z.T.reshape(1, 2, 2, 2)  # (B, C, h, w), x[0, :, r, c] = z[r * 2 + c]
    a = torch.tensor([[1.0, 0.0, 0.5, 0.25]], dtype=torch.float64)  # a_0: min 0, max 1
    return x, a


def test_calibration_layer_by_hand():
    x, a = two_by_two_case()
    # neighbour similarities: cos(0-1) = cos 90 = 0, cos(0-2) = cos 60 = 0.5, cos(1-3) = cos 60 = 0.5,
    # cos(2-3) = cos 90 = 0. With lambda = 1, M = L * (Sim - 1) has a zero diagonal and neighbour weights 1 - Sim:
    M = torch.tensor([[0, 1, .5, 0], [1, 0, 0, .5], [.5, 0, 0, 1], [0, .5, 1, 0]], dtype=torch.float64)
    M3 = torch.tensor([[0, 1.75, 1.625, 0], [1.75, 0, 0, 1.625], [1.625, 0, 0, 1.75], [0, 1.625, 1.75, 0]],
                      dtype=torch.float64)  # M^3, multiplied out by hand
    torch.testing.assert_close(M @ M @ M, M3)
    # one Newton-Schulz step: X_1 = X_0 (2I - M X_0), X_0 = alpha M  ->  2 alpha M - alpha^2 M^3 (symmetric)
    X1 = 2 * ALPHA * M - ALPHA**2 * M3
    # diffusion d = X_1^T a: M a = (0.25, 1.125, 0.75, 0.5) and M^3 a = (0.8125, 2.15625, 2.0625, 0.875)
    d = torch.tensor([0.004 * 0.25 - 4e-6 * 0.8125, 0.004 * 1.125 - 4e-6 * 2.15625,
                      0.004 * 0.75 - 4e-6 * 2.0625, 0.004 * 0.5 - 4e-6 * 0.875], dtype=torch.float64)
    torch.testing.assert_close(X1.T @ a[0], d)
    u = d / (0.5 * 1.0)  # theta = 0.5 times max(a) = 1
    shrunk = torch.tensor([v - math.tanh(v) for v in u.tolist()], dtype=torch.float64)  # tanhshrink
    d = (shrunk - shrunk.min()) / (shrunk.max() - shrunk.min())  # min-max: patch 0 -> 0, patch 1 -> 1
    assert d[0] == 0 and d[1] == 1 and 0 < d[3] < d[2] < 1

    layer = scm.CalibrationLayer(iterations=1, alpha=ALPHA, lam=1.0, theta=0.5).double()
    x_out, a_out = layer(x, a, scm.grid_laplacian(2, 2).double())
    torch.testing.assert_close(a_out, a + d)  # a <- a + d, not renormalised
    torch.testing.assert_close(x_out, x * (1 + d.reshape(1, 1, 2, 2)))  # x <- x + x * d, every class alike

    # theta divides by the max of the *incoming* a, so scaling a scales P a and its reference alike: same d
    _, a_twice = layer(x, 2 * a, scm.grid_laplacian(2, 2).double())
    torch.testing.assert_close(a_twice[0] - 2 * a[0], d)


def test_calibration_layer_uses_lambda_and_theta():
    x, a = two_by_two_case()
    lap = scm.grid_laplacian(2, 2).double()
    layer = scm.CalibrationLayer(iterations=4, alpha=ALPHA, lam=1.25, theta=0.375).double()  # exact in fp32
    _, a_out = layer(x, a, lap)
    # the same layer written out: M = L * (lambda Sim - 1) with Sim from the unit vectors, 4 steps, theta * max a
    z = x.flatten(2).transpose(1, 2)[0]
    unit = z / z.norm(dim=1, keepdim=True)
    M = lap * (1.25 * unit @ unit.T - 1)
    X = ALPHA * M.T
    for _ in range(4):
        X = X @ (2 * torch.eye(4, dtype=torch.float64) - M @ X)
    u = (X.T @ a[0]) / (0.375 * a.max())
    shrunk = u - torch.tanh(u)
    torch.testing.assert_close(a_out[0] - a[0], (shrunk - shrunk.min()) / (shrunk.max() - shrunk.min()))
    assert M[0, 0] == 2 * 0.25  # deg * (lambda - 1): the diagonal is live once lambda != 1
    a_out.sum().backward()
    assert torch.isfinite(layer.lam.grad).all() and torch.isfinite(layer.theta.grad).all()
    assert layer.lam.grad.abs().item() > 0 and layer.theta.grad.abs().item() > 0


def test_flat_maps_give_zeros_not_nan(tiny_synthetic, tmp_path):
    flat = torch.full((2, 5), 0.3, requires_grad=True)
    official = (flat - flat.min(1, keepdim=True)[0]) / (flat - flat.min(1, keepdim=True)[0]).max(1, keepdim=True)[0]
    assert torch.isnan(official).all()  # the code's norm_cam on a flat map
    guarded = scm.minmax(flat)
    assert torch.equal(guarded, torch.zeros(2, 5))
    guarded.sum().backward()
    assert torch.equal(flat.grad, torch.zeros(2, 5))
    v = torch.randn(3, 7, dtype=torch.float64)  # not flat: bit for bit the code's formula
    assert torch.equal(scm.minmax(v), (v - v.min(1, keepdim=True)[0]) / (v - v.min(1, keepdim=True)[0]).max(1,
                       keepdim=True)[0])

    # a whole model with uniform attention (q = k = 0): A is flat, a_0 = 0, every layer passes x through
    args = tiny_args(scm, tiny_synthetic, tmp_path, drop_path=0.0)
    model = scm.SCM(args, num_classes=10)
    with torch.no_grad():
        for block in model.vit.blocks:
            block.attn.qkv.weight[: 2 * args.embed_dim].zero_()
            block.attn.qkv.bias[: 2 * args.embed_dim].zero_()
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    out = model.train()(images)
    loss, _ = scm.compute_loss(out, labels, args)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    torch.testing.assert_close(out["logits"], out["semantic"].mean(dim=(2, 3)))
    maps = scm.localization_map(model, model.eval()(images, need_maps=True), images, "scm")
    assert torch.equal(maps, torch.zeros_like(maps))


def test_module_is_absent_from_the_eval_path(tiny_synthetic, tmp_path):
    args = tiny_args(scm, tiny_synthetic, tmp_path, drop_path=0.0)
    model = scm.SCM(args, num_classes=10).eval()
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        before = model(images, need_maps=True)
        maps_before = scm.localization_map(model, before, images, "scm")
        for layer in model.calibration.layers:  # new lambda and theta change nothing at test time
            layer.lam.fill_(2.0)
            layer.theta.fill_(-0.3)
        after = model(images, need_maps=True)
        del model.calibration  # nor does removing the module
        removed = model(images, need_maps=True)
    for out in (after, removed):
        assert torch.equal(out["logits"], before["logits"])
        assert torch.equal(scm.localization_map(model, out, images, "scm"), maps_before)
    # the train-mode logits (GAP of the calibrated maps) differ from the test logits GAP(S)
    model = scm.SCM(args, num_classes=10).eval()
    with torch.no_grad():
        test_logits = model(images)["logits"]
        train_out = model.train()(images)
    torch.testing.assert_close(test_logits, train_out["semantic"].mean(dim=(2, 3)))
    assert not torch.allclose(train_out["logits"], test_logits, atol=1e-4)


def test_maps_shapes_and_ranges(tiny_synthetic, tmp_path):
    args = tiny_args(scm, tiny_synthetic, tmp_path)
    model = scm.SCM(args, num_classes=10).eval()
    images = torch.randn(3, 3, 32, 32)
    out = model(images, need_maps=True)
    assert out["logits"].shape == (3, 10) and out["semantic"].shape == (3, 10, 4, 4)
    assert out["attention"].shape == (3, 4, 4)
    a0 = scm.minmax(out["attention"].flatten(1))  # (B, P) in [0, 1], min exactly 0 and max exactly 1
    assert a0.shape == (3, 16) and (a0.amin(1) == 0).all() and (a0.amax(1) == 1).all()
    maps = scm.localization_map(model, out, images, "scm")
    assert maps.shape == (3, 10, 4, 4) and torch.isfinite(maps).all()
    torch.testing.assert_close(maps, a0.reshape(3, 1, 4, 4) * out["semantic"])
    assert (maps.flatten(2).gather(2, a0.argmin(1)[:, None, None].expand(3, 10, 1)) == 0).all()  # least-attended
    torch.testing.assert_close(scm.localization_map(model, out, images, "tscam"), out["attention"][:, None]
                               * out["semantic"])
    for kind in ("attention", "eigencam"):
        assert scm.localization_map(model, out, images, kind).shape == (3, 1, 4, 4)


def test_graph_follows_the_patch_grid(tiny_synthetic, tmp_path):
    for img_size, side in ((32, 4), (48, 6), (64, 8)):
        args = tiny_args(scm, tiny_synthetic, tmp_path, img_size=img_size)
        model = scm.SCM(args, num_classes=3)
        assert torch.equal(model.calibration.laplacian, scm.grid_laplacian(side, side))
        assert model.train()(torch.randn(2, 3, img_size, img_size))["logits"].shape == (2, 3)
    assert not any("laplacian" in k for k in model.state_dict())  # a fixed graph, rebuilt, never loaded
    assert [layer.iterations for layer in model.calibration.layers] == [16, 4, 4, 4]


def test_calibration_runs_in_fp32_under_bf16_autocast():
    x, a = two_by_two_case()
    module = scm.SpatialCalibration((2, 2), (16, 4, 4, 4), ALPHA, 1.0, 0.5)
    semantic = x.float().to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = module(semantic, a.float())
    outside = module(semantic.float(), a.float())
    assert inside.dtype == torch.float32 and torch.equal(inside, outside)
    # the whole training step under bf16 autocast (what common.autocast does on CUDA), here on the CPU
    model = scm.SCM(scm.Args(img_size=32, patch_size=8, embed_dim=32, depth=2, heads=2), num_classes=5).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(4, 3, 32, 32))
        loss = torch.nn.functional.cross_entropy(out["logits"], torch.tensor([0, 1, 2, 3]))
    loss.backward()
    assert out["semantic"].dtype == torch.bfloat16 and out["logits"].dtype == torch.float32
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert all(layer.lam.grad.abs().item() > 0 for layer in model.calibration.layers)


def test_presets_follow_the_scm_recipe():
    cub = scm.Args(data="cub")
    common.apply_preset(cub, scm.PRESETS)
    assert (cub.epochs, cub.batch_size, cub.lr, cub.lr_steps) == (30, 16, 5e-5, (30,))
    lr = [scm.learning_rate(cub, e, 1) for e in range(30)]  # one step per epoch: x 0.1 only at epoch 30
    assert lr[0] == lr[28] == 5e-5 and lr[29] == pytest.approx(5e-6)
    ilsvrc = scm.Args(data="ilsvrc")
    common.apply_preset(ilsvrc, scm.PRESETS)
    assert (ilsvrc.epochs, ilsvrc.batch_size, ilsvrc.lr, ilsvrc.lr_steps) == (20, 512, 1e-6, (10, 12))
    args = common.parse_args(scm.Args, ["--data", "cub", "--batch-size", "256", "--scm-iterations", "8", "2"])
    common.apply_preset(args, scm.PRESETS)
    assert args.batch_size == 256 and args.scm_iterations == (8, 2) and args.map == "scm"
    model = scm.SCM(scm.Args(img_size=32, patch_size=8, embed_dim=32, depth=1, heads=2), num_classes=3)
    decay, no_decay = scm.param_groups(model, 0.05)
    scalars = {id(p) for layer in model.calibration.layers for p in (layer.lam, layer.theta)}
    assert scalars <= {id(p) for p in no_decay["params"]} and not scalars & {id(p) for p in decay["params"]}


def test_eval_only_matches_the_training_run(tiny_synthetic, tmp_path):
    checkpoint = assert_eval_only_matches(scm, tiny_synthetic, tmp_path)
    state = torch.load(checkpoint, weights_only=False)["model"]
    assert "calibration.layers.0.lam" in state and state["calibration.layers.0.lam"].item() != 1.0  # it learned


@pytest.mark.slow
def test_default_synthetic_run_beats_the_trivial_baselines(tmp_path):
    final = scm.main(common.parse_args(scm.Args, ["--out-dir", str(tmp_path)]))
    assert_beats_trivial_baselines(final)
