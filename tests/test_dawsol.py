"""dawsol.py: the CLI end to end, gradients, maps, and DA-WSOL's own pieces against hand-computed values: the MMD,
the k-means (with sklearn's empty-cluster relocation), the TSA memory, the NaN guards, the DAL switch-on epoch."""

import json
import math

import pytest
import torch

import common
import dawsol
import tscam
from conftest import (
    TINY_ARGS,
    assert_beats_trivial_baselines,
    assert_cli_outputs,
    assert_resume_reproduces,
    read_rows,
    run_cli,
    tiny_args,
)

# 32 px / patch 8 = 16 positions: n = 3 needs 5 of them; L_u on (the synthetic preset switches it off)
DAL_NOW = ("--dal-start-epoch", "0", "--n-samples", "3", "--lambda-universum", "0.2")


def test_cli_end_to_end(tiny_synthetic, tmp_path):
    result = run_cli("dawsol.py", tiny_synthetic, tmp_path, "--run-name", "cli", "--epochs", "2",
                     "--dal-start-epoch", "1", "--n-samples", "3")
    run = tmp_path / "cli"
    first, second, final = read_rows(run)
    assert "train/dal_mmd" not in first and math.isfinite(first["train/cls"])  # plain CAM before the switch-on
    for key in ("train/cls", "train/dal_mmd", "train/universum", "train/tsa_valid_frac"):
        assert math.isfinite(second[key]), key
    assert second["train/dal_skipped"] in range(5) and second["train/universum_skipped"] in range(5)  # 4 batches
    assert_cli_outputs(run, final)
    assert json.loads((run / "args.json").read_text())["embed_dim"] == 32
    memory = torch.load(run / "last.pt", weights_only=False)["model"]
    assert memory["tsa.universum_count"] == 4 * 16  # one epoch of DAL: 4 batches of 16 images
    assert "img/s" in result.stdout and "wsolevaluation" in result.stdout


def test_every_parameter_gets_a_gradient(tiny_synthetic, tmp_path):
    args = tiny_args(dawsol, tiny_synthetic, tmp_path, *DAL_NOW)
    torch.manual_seed(0)
    model = dawsol.DAWSOL(args, num_classes=10)
    images, labels = torch.randn(8, 3, 32, 32), torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    out = model(images)
    loss, parts = dawsol.compute_loss(out, labels, args, model.tsa)
    assert parts["tsa_valid_frac"] > 0 and parts["tsa_frac_u"] > 0  # L_d and L_u both took part
    expected = parts["cls"] + args.lambda_dal * parts["dal_mmd"] + args.lambda_universum * parts["universum"]
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    # the DAL terms reach the features (nothing but the clustering and the memory is detached) ...
    model.zero_grad()
    out = model(images)
    S, T, U, _, _ = model.tsa.split(out["image_feature"], out["features"], labels, 3)
    assert len(S) > 0 and len(U) > 0
    (dawsol.domain_loss(S, T) + dawsol.universum_loss(U, absolute=False)).backward()
    assert model.neck[0].weight.grad.abs().sum() > 0 and model.vit.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert model.head.weight.grad is None  # the classifier is not in L_d / L_u
    # ... while the memory is plain state
    assert all(not b.requires_grad for b in model.tsa.buffers())


def test_maps_shapes_and_logits_are_cam_means(tiny_synthetic, tmp_path):
    args = tiny_args(dawsol, tiny_synthetic, tmp_path)
    model = dawsol.DAWSOL(args, num_classes=10).eval()
    images = torch.randn(3, 3, 32, 32)
    out = model(images, need_maps=True)
    assert out["logits"].shape == (3, 10) and out["features"].shape == (3, 16, 32) and out["cam"].shape == (3, 10, 4, 4)
    assert (out["features"] >= 0).all()  # the ReLU neck: non-negative as L_u and the zero universum seed assume
    torch.testing.assert_close(out["image_feature"], out["features"].mean(1))  # z = GAP(X)
    torch.testing.assert_close(out["logits"], out["cam"].mean(dim=(2, 3)))  # logit = mean of the CAM (spec §1.3)
    cam = dawsol.localization_map(model, out, images, "cam")
    gt = cam[torch.arange(3), torch.tensor([1, 5, 9])]  # (3, 4, 4)
    low, high = gt.amin((1, 2), keepdim=True), gt.amax((1, 2), keepdim=True)
    scaled = (gt - low) / (high - low)
    assert torch.isfinite(cam).all() and scaled.min() == 0 and scaled.max() == 1
    eigen = dawsol.localization_map(model, out, images, "eigencam")
    assert eigen.shape == (3, 1, 4, 4) and torch.isfinite(eigen).all() and (eigen >= 0).all()


def test_coupled_maps_use_tscams_attention(tiny_synthetic, tmp_path):
    """NOTE(ours) 11: A is TS-CAM's attention map on the same ViT weights; coupled = A x (CAM - its per-map min), so
    non-negative and zero where A is; tscam = A x the raw CAM; attention: A alone, class-agnostic."""
    args = tiny_args(dawsol, tiny_synthetic, tmp_path)
    torch.manual_seed(0)
    model, reference = dawsol.DAWSOL(args, 10).eval(), tscam.TSCAM(tiny_args(tscam, tiny_synthetic, tmp_path), 10)
    reference.vit.load_state_dict(model.vit.state_dict())
    images = torch.randn(3, 3, 32, 32)
    out = model(images, need_maps=True)
    torch.testing.assert_close(out["attention"], reference.eval()(images, need_maps=True)["attention"])
    cam, attention = out["cam"], out["attention"][:, None]
    coupled = dawsol.localization_map(model, out, images, "coupled")
    torch.testing.assert_close(coupled, attention * (cam - cam.amin(dim=(2, 3), keepdim=True)))
    assert coupled.shape == (3, 10, 4, 4) and (coupled >= 0).all()
    assert (coupled.flatten(2).amin(2) == 0).all()  # each class map's CAM minimum is where the shift puts zero
    torch.testing.assert_close(dawsol.localization_map(model, out, images, "tscam"), attention * cam)
    assert torch.equal(dawsol.localization_map(model, out, images, "attention"), attention)
    assert dawsol.Args().map == "coupled"


def kernel_sum(d: float, bandwidth: float) -> float:
    return sum(math.exp(-d / (bandwidth / 4 * 2**q)) for q in range(5))  # sigmas = bandwidth x {1/4, ..., 4}


def test_mmd_by_hand():
    # S = {0, 1}, T = {2, 4} in 1-D. Pairwise squared distances 1, 4, 16, 1, 9, 4: their ordered sum 70 over
    # 4 * 4 - 4 = 12 ordered pairs gives the bandwidth 35/6. With n = 2 and indices mod 2 the estimate is
    # 1/2 * 2 * [k(s0,s1) + k(t0,t1) - k(s0,t1) - k(s1,t0)] = k(1) + k(4) - k(16) - k(1) = k(4) - k(16).
    S, T = torch.tensor([[[0.0], [1.0]]]), torch.tensor([[[2.0], [4.0]]])
    expected = kernel_sum(4, 35 / 6) - kernel_sum(16, 35 / 6)
    assert dawsol.mmd_linear(S, T).item() == pytest.approx(expected, rel=1e-6)
    assert dawsol.domain_loss(S, T).item() == pytest.approx(expected, rel=1e-6)
    # the same samples in both domains give 0; so do all-equal samples (bandwidth 0 would be 0/0 without the floor)
    X = torch.randn(2, 5, 7)
    torch.testing.assert_close(dawsol.mmd_linear(X, X.clone()), torch.zeros(2))
    same = torch.ones(1, 4, 3)
    assert dawsol.mmd_linear(same, same.clone()).item() == 0.0


def official_mmd(S: torch.Tensor, T: torch.Tensor) -> torch.Tensor:
    """mmd_rbf_accelerate as spec §1.6 writes it: the full (2n, 2n) kernel matrix, then the linear-time sum."""
    n, W = len(S), torch.cat([S, T])
    distances = ((W[None] - W[:, None]) ** 2).sum(-1)  # (2n, 2n)
    bandwidth = distances.detach().sum() / (4 * n * n - 2 * n) / 4
    kernels = sum(torch.exp(-distances / (bandwidth * 2**q)) for q in range(5))
    return sum(kernels[i, (i + 1) % n] + kernels[n + i, n + (i + 1) % n] - kernels[i, n + (i + 1) % n]
               - kernels[(i + 1) % n, n + i] for i in range(n)) / n


def test_mmd_matches_the_quadratic_form_and_detaches_the_bandwidth():
    torch.manual_seed(0)
    S, T = torch.rand(3, 6, 5).requires_grad_(), torch.rand(3, 6, 5).requires_grad_()
    ours = dawsol.mmd_linear(S, T)
    reference = torch.stack([official_mmd(S[i], T[i]) for i in range(3)])
    torch.testing.assert_close(ours, reference)
    grad_ours = torch.autograd.grad(ours.sum(), S)[0]
    grad_reference = torch.autograd.grad(reference.sum(), S)[0]
    torch.testing.assert_close(grad_ours, grad_reference)


def points(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)[None, :, None]  # (1, P, 1)


def test_kmeans_recovers_known_clusters():
    # three tight groups in 2-D, seeds near (but not at) the groups: one step labels them, the next confirms
    groups = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    offsets = torch.tensor([[0.5, 0.0], [-0.5, 0.0], [0.0, 1.0], [0.0, -1.0]])
    X = (groups[:, None] + offsets[None]).reshape(1, 12, 2)  # group g holds points 4g .. 4g + 3
    init = (groups + torch.tensor([[1.0, 1.0], [-2.0, 1.0], [1.0, -2.0]]))[None]
    centres, labels = dawsol.kmeans(X, init, max_iter=300, tol=1e-4)
    assert labels.tolist() == [[0] * 4 + [1] * 4 + [2] * 4]
    torch.testing.assert_close(centres[0], groups)  # the offsets cancel within each group


def test_kmeans_moves_an_empty_cluster_to_the_farthest_point():
    # X = 0, 1, 3, 10 with seeds -100, 1, 9. Step 1: 0, 1, 3 -> seed 1 and 10 -> seed 9; cluster 0 is empty, so it
    # takes the point farthest from its own centre (3, at squared distance 4), which leaves cluster 1 (0 + 1) / 2.
    # Step 2: labels 1 1 0 2 with centres 3, 0.5, 10, which do not move. (sklearn 1.9.1's k_means: the same.)
    # Without the relocation the seed -100 would stay empty and 3 would stay with 0 and 1.
    centres, labels = dawsol.kmeans(points(0, 1, 3, 10), points(-100, 1, 9), max_iter=300, tol=1e-4)
    assert labels.tolist() == [[1, 1, 0, 2]]
    torch.testing.assert_close(centres, points(3, 0.5, 10))
    # two empty clusters: equal seeds 2, 2 send every point to cluster 1; the farthest point (10) goes to the first
    # empty cluster (0), the second farthest (0) to the next (2); cluster 1 keeps (1.2 + 3) / 2 = 2.1
    centres, labels = dawsol.kmeans(points(0, 1.2, 3, 10), points(-100, 2, 2), max_iter=300, tol=1e-4)
    assert labels.tolist() == [[2, 1, 1, 0]]
    torch.testing.assert_close(centres, points(10, 2.1, 0))
    # a batch clusters each image on its own
    centres, labels = dawsol.kmeans(torch.cat([points(0, 1, 3, 10), points(0, 1.2, 3, 10)]),
                                    torch.cat([points(-100, 1, 9), points(-100, 2, 2)]), max_iter=300, tol=1e-4)
    assert labels.tolist() == [[1, 1, 0, 2], [2, 1, 1, 0]]


@pytest.mark.parametrize("mode", ["batched", "sequential"])
def test_memory_is_a_cumulative_mean(mode):
    tsa = dawsol.TargetSampleAssigner(num_classes=2, dim=1, max_iter=300, tol=1e-4)
    # image A, class 0 (first visit: M_0 = z = 4, r_0 = 1), seeds [M_u, z, M_0] = [0, 4, 4]: 1 -> 0 and 5, 9 -> 4;
    # cluster 2 is empty and takes a 9, after which the centres settle at 1, 5, 9 (sklearn agrees)
    S, T, U, clusters, _ = tsa.split(torch.tensor([[4.0]]), points(1, 1, 5, 5, 9, 9), torch.tensor([0]), 2, mode)
    assert clusters.tolist() == [[0, 0, 1, 1, 2, 2]]
    assert tsa.class_anchors.tolist() == [[4.5], [0.0]] and tsa.class_counts.tolist() == [2, 0]  # 4/2 + 5/2
    assert tsa.universum_anchor.tolist() == [1.0] and tsa.universum_count == 1
    assert U.tolist() == [[1.0], [1.0]] and T.tolist() == [[[9.0], [9.0]]] and S.tolist() == [[[4.0], [5.0]]]
    # a batch of B (class 0, z = 6, seeds [1, 6, 4.5] -> centres 2, 6, 10) and C (class 1, first visit M_1 = 3,
    # seeds [1 or 1.5, 3, 3] -> centres 0, 4, 8): r_0 = 3, M_0 = (2 * 4.5 + 6) / 3 = 5; r_1 = 2, M_1 = (3 + 4) / 2;
    # r_u = 3, M_u = (1 * 1 + 2 + 0) / 3 = 1. The order of the images does not change cumulative means.
    X = torch.cat([points(2, 2, 6, 6, 10, 10), points(0, 0, 4, 4, 8, 8)])
    _, _, _, clusters, stats = tsa.split(torch.tensor([[6.0], [3.0]]), X, torch.tensor([0, 1]), 2, mode)
    assert clusters.tolist() == [[0, 0, 1, 1, 2, 2]] * 2 and stats["tsa_valid_frac"] == 1.0
    torch.testing.assert_close(tsa.class_anchors, torch.tensor([[5.0], [3.5]], dtype=torch.float64))
    assert tsa.class_counts.tolist() == [3, 2] and tsa.universum_count == 3
    torch.testing.assert_close(tsa.universum_anchor, torch.tensor([1.0], dtype=torch.float64))


def test_nan_cases_give_zero_and_are_counted(tiny_synthetic, tmp_path):
    empty = torch.zeros(0, 4, 8, requires_grad=True)
    assert torch.zeros(0, 8).mean().isnan()  # what the official mean over an empty set gives
    assert dawsol.domain_loss(empty, empty).item() == 0.0
    assert dawsol.universum_loss(torch.zeros(0, 8), absolute=False).item() == 0.0
    # a whole step where no image has enough samples: n = 9 needs 17 of the 16 positions
    args = tiny_args(dawsol, tiny_synthetic, tmp_path, "--dal-start-epoch", "0", "--n-samples", "9")
    model = dawsol.DAWSOL(args, num_classes=10)
    loss, parts = dawsol.compute_loss(model(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 3]), args, model.tsa)
    assert torch.isfinite(loss) and parts["dal_mmd"] == 0.0 and parts["dal_skipped"] == 1
    assert parts["tsa_valid_frac"] == 0.0 and parts["universum_skipped"] == 0

    class NoUniversum(dawsol.TargetSampleAssigner):  # k-means that puts nothing into T^u
        def split(self, image_feature, features, labels, n, mode="batched"):
            S, T, U, clusters, stats = super().split(image_feature, features, labels, n, mode)
            return S, T, U[:0], clusters, stats

    tsa = NoUniversum(10, 32, 300, 1e-4)
    loss, parts = dawsol.compute_loss(model(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 3]), args, tsa)
    assert torch.isfinite(loss) and parts["universum"] == 0.0 and parts["universum_skipped"] == 1
    loss.backward()  # still a usable loss: L_c alone
    assert torch.isfinite(model.head.weight.grad).all()


def test_optimizer_groups_and_official_schedule():
    args = dawsol.Args(data="cub", img_size=32, patch_size=8, embed_dim=32, depth=1, heads=2)
    common.apply_preset(args, dawsol.PRESETS)
    model = dawsol.DAWSOL(args, num_classes=3)
    backbone, head = dawsol.param_groups(model, args)
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in head["params"]} == {"neck.0.weight", "neck.0.bias", "head.weight", "head.bias"}
    assert len(backbone["params"]) + len(head["params"]) == len(names)
    assert (backbone["lr_mult"], head["lr_mult"]) == (1.0, 10.0)
    assert (args.lambda_dal, args.lambda_universum, args.dal_start_epoch, args.n_samples) == (0.3, 2.0, 1, 32)
    lr = [dawsol.learning_rate(args, e * 10, 10) for e in range(50)]  # x0.1 at the start of 1-based epoch 30
    assert lr[0] == lr[28] == 1e-3 and lr[29] == pytest.approx(1e-4) and lr[49] == pytest.approx(1e-4)
    openimages = dawsol.Args(data="openimages")
    common.apply_preset(openimages, dawsol.PRESETS)
    assert (openimages.lambda_dal, openimages.lambda_universum, openimages.lr_steps) == (0.2, 3.0, (3,))
    lr = [dawsol.learning_rate(openimages, e, 1) for e in range(10)]  # epochs 1-2, 3-5, 6-8, 9-10
    assert [round(v / 1e-3, 6) for v in (lr[1], lr[2], lr[4], lr[5], lr[8])] == [1, 0.1, 0.1, 0.01, 0.001]


def test_resume_continues_weights_and_memory(tiny_synthetic, tmp_path):
    flags = ("--schedule", "step", "--lr-steps", "2", *DAL_NOW)
    straight = assert_resume_reproduces(dawsol, tiny_synthetic, tmp_path, *flags)  # the TSA memory is in the state
    assert straight["tsa.universum_count"] == 2 * 4 * 16


def test_eval_only_takes_the_checkpoints_settings(tiny_synthetic, tmp_path):
    """--eval-only without the training flags scores the model that was trained (its neck, its recipe), not the
    defaults'; a flag given explicitly (here the map) stays the command's."""
    trained = dawsol.main(tiny_args(dawsol, tiny_synthetic, tmp_path, "--neck", "linear_relu", "--lambda-dal", "0",
                                    "--run-name", "t"))
    evaluate = [*TINY_ARGS, "--data-root", str(tiny_synthetic), "--out-dir", str(tmp_path), "--eval-only",
                "--checkpoint", str(tmp_path / "t" / "last.pt")]  # as the CLI parses them: no preset applied yet
    again = dawsol.main(common.parse_args(dawsol.Args, [*evaluate, "--run-name", "e"]))
    assert {k: v for k, v in again.items() if k != "epoch"} == {k: v for k, v in trained.items() if k != "epoch"}
    assert json.loads((tmp_path / "e" / "args.json").read_text())["neck"] == "linear_relu"
    cam = dawsol.main(common.parse_args(dawsol.Args, [*evaluate, "--run-name", "c", "--map", "cam"]))
    assert cam["test/Cls@1"] == trained["test/Cls@1"] and cam["test/PxAP"] != trained["test/PxAP"]


def test_small_grid_warns(tiny_synthetic, tmp_path):
    args = tiny_args(dawsol, tiny_synthetic, tmp_path, "--n-samples", "9", "--epochs", "0")
    with pytest.warns(UserWarning, match="L_d will be 0"):
        dawsol.main(args)


@pytest.mark.slow
def test_default_synthetic_run_beats_the_trivial_baselines(tmp_path):
    """`python dawsol.py` as a student types it: from the synthetic backbone, scored with the coupled map (NOTE(ours)
    11; the bare CAM's default did not localize there, README "Claims")."""
    final = dawsol.main(common.parse_args(dawsol.Args, ["--out-dir", str(tmp_path)]))
    assert_beats_trivial_baselines(final)


def test_synthetic_presets_are_the_ones_val_chose():
    """NOTE(ours) 8: backbone at 3e-5 on both worlds; the new layers x3 on the coarse world (three val seeds), x10 on the
    fine one; L_d on, the universum term off."""
    coarse, fine = dawsol.Args(data="synthetic"), dawsol.Args(data="synthetic-fine")
    common.apply_preset(coarse, dawsol.PRESETS), common.apply_preset(fine, dawsol.PRESETS)
    assert (coarse.lr, coarse.head_lr_mult, fine.head_lr_mult) == (3e-5, 3.0, 10.0)
    assert (coarse.lambda_dal, coarse.lambda_universum, coarse.neck) == (0.3, 0.0, "centred")
    assert vars(fine) | {"data": "synthetic", "head_lr_mult": 3.0} == vars(coarse)
