"""dawsol.py and common.eigen_cam replayed against golden numbers from the official code: zh460045050/DA-WSOL_CVPR2022
@ d60e8ea (MMD, TSA, solver loss, CAM), sklearn.cluster.k_means and pytorch-grad-cam 1.5.7 (Eigen-CAM), stored in
tests/fixtures/dawsol_eigencam.pt (its meta["schema"] documents every field). Each field name in a failure message
is "<case>.<official quantity>", so it says which quantity is off."""

import torch
import torch.nn as nn

import common
import dawsol
from conftest import assert_matches, load_fixture

FIXTURE = load_fixture("dawsol_eigencam.pt")
F32 = 1e-6  # every official value here is float32 (features, k-means, MMD, CAM), and the project's TSA/MMD run in fp32
EXACT = dict(rtol=0.0)  # labels, counts, positions
# L_d is a small difference of kernel sums, each up to kernel_num = 5: fp32 rounding scales with those sums
MMD_TOL = dict(rtol=F32, atol=F32 * 5)
MAX_ITER, TOL = 300, 1e-4  # sklearn's k_means defaults, as the official TSA calls it (and dawsol.Args' defaults)


class FeaturesAsTokens(nn.Module):
    """Stands in for the ViT: its input is the official pixel features X (B, P, D), returned behind a zero cls token,
    so that DAWSOL.forward sees X as its patch features (with an Identity neck, as the official CNN has none)."""

    def __init__(self, grid: int):
        super().__init__()
        self.grid = (grid, grid)

    def forward(self, features: torch.Tensor, return_attention: bool = False):
        tokens = torch.cat([features.new_zeros(len(features), 1, features.shape[2]), features], dim=1)  # (B, 1 + P, D)
        if not return_attention:
            return tokens
        n = tokens.shape[1]  # one block, one head of uniform attention: the coupled maps' A is constant
        return tokens, [tokens.new_full((len(tokens), 1, n, n), 1 / n)]


def official_model(num_classes: int, dim: int, grid: int, weight: torch.Tensor, bias: torch.Tensor) -> dawsol.DAWSOL:
    """A DAWSOL whose patch features are its input and whose CAM classifier holds the official weights."""
    args = dawsol.Args(img_size=grid, patch_size=1, embed_dim=dim, depth=1, heads=1, neck="none")
    model = dawsol.DAWSOL(args, num_classes)
    model.vit, model.neck = FeaturesAsTokens(grid), nn.Identity()
    with torch.no_grad():
        model.head.weight.copy_(weight)
        model.head.bias.copy_(bias)
    return model


def load_memory(tsa: dawsol.TargetSampleAssigner, state: dict) -> None:
    tsa.class_anchors.copy_(state["M"])
    tsa.class_counts.copy_(state["r"])
    tsa.universum_anchor.copy_(state["Mu"])
    tsa.universum_count.fill_(state["ru"])


def assert_memory(prefix: str, tsa: dawsol.TargetSampleAssigner, state: dict) -> None:
    """M and M_u come from fp32 k-means centres (float64 cumulative means, as the official numpy); r, r_u are counts."""
    assert_matches(f"{prefix}.M", tsa.class_anchors, state["M"], rtol=F32)
    assert_matches(f"{prefix}.r", tsa.class_counts, state["r"], **EXACT)
    assert_matches(f"{prefix}.Mu", tsa.universum_anchor, state["Mu"], rtol=F32)
    assert_matches(f"{prefix}.ru", tsa.universum_count, state["ru"], **EXACT)


def official_shuffles(clusters: torch.Tensor, shuffle_f: list, shuffle_t: list):
    """A torch.rand for TargetSampleAssigner.split that replays the official random.shuffle permutations (schema):
    its draw(1, n - 1), then draw(2, n), sort members by key: the j-th of m in a permutation gets (j + 0.5) / (m + 1).
    """
    calls = iter([(1, shuffle_f), (2, shuffle_t)])

    def rand(*shape, **kwargs):
        cluster, permutations = next(calls)
        assert tuple(shape) == tuple(clusters.shape), f"split drew {shape}, expected one key per position"
        keys = torch.full(clusters.shape, 0.5)  # non-members: any key in [0, 1) (split adds 1 to theirs)
        for b, permutation in enumerate(permutations):
            members = (clusters[b] == cluster).nonzero()[:, 0]  # (m,) positions in the official row order
            assert len(members) == len(permutation), f"image {b}: cluster {cluster} has {len(members)} members"
            keys[b, members[permutation]] = (torch.arange(len(permutation)) + 0.5) / (len(permutation) + 1)
        return keys

    return rand


def rows_in(rows: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """The index in table (P, D) of each of rows (m, D), exact copies the project gathered from it -> (m,)."""
    hits = (rows[:, None] == table[None]).all(-1)  # (m, P)
    assert (hits.sum(1) == 1).all(), "a sampled row is not exactly one row of the features"
    return hits.int().argmax(1)


def test_mmd_rbf_accelerate_values_gradients_and_cal_mmd():
    case = FIXTURE["mmd"]
    official = case["official"]
    S, T = case["S"].clone().requires_grad_(), case["T"].clone().requires_grad_()  # (c, n, D) float32
    mmd = dawsol.mmd_linear(S, T)  # (c,)
    assert_matches("mmd.mmd_rbf_accelerate", mmd, official["mmd"], **MMD_TOL)
    mmd.sum().backward()
    assert_matches("mmd.grad_S", S.grad, official["grad_S"], rtol=F32)
    assert_matches("mmd.grad_T", T.grad, official["grad_T"], rtol=F32)
    count = case["count"]
    assert_matches("mmd.cal_mmd", dawsol.domain_loss(S[:count], T[:count]), official["cal_mmd"], **MMD_TOL)


def test_kmeans_from_fixed_inits():
    case = FIXTURE["kmeans"]
    centres, labels = dawsol.kmeans(case["X"], case["init"], MAX_ITER, TOL)  # every image at once
    assert_matches("kmeans.labels", labels, case["official"]["labels"], **EXACT)
    assert_matches("kmeans.centres", centres, case["official"]["centres"], rtol=F32)


def test_tsa_three_chained_batches_sequential(monkeypatch):
    case = FIXTURE["tsa"]
    tsa = dawsol.TargetSampleAssigner(case["K"], case["D"], MAX_ITER, TOL)
    load_memory(tsa, case["steps"][0]["state_before"])  # then our own memory carries over from batch to batch
    for t, step in enumerate(case["steps"]):
        official, name = step["official"], f"tsa.step{t}"
        assert_memory(f"{name}.memory_before", tsa, step["state_before"])
        monkeypatch.setattr(torch, "rand", official_shuffles(official["clusters"], step["shuffle_f"],
                                                             step["shuffle_t"]))
        S, T, U, clusters, _ = tsa.split(step["z"], step["X"], step["labels"], case["n"], mode="sequential")
        monkeypatch.undo()
        assert_matches(f"{name}.clusters", clusters, official["clusters"], **EXACT)
        assert_memory(f"{name}.memory_after", tsa, official["state_after"])
        assert_matches(f"{name}.count", len(S), official["count"], **EXACT)
        valid = rows_in(S[:, 0], step["z"])  # (c,): row 0 of S is the image feature z
        assert_matches(f"{name}.valid", valid, official["valid"], **EXACT)
        S_pos = torch.stack([rows_in(S[i, 1:], step["X"][b]) for i, b in enumerate(valid)])  # (c, n - 1)
        T_pos = torch.stack([rows_in(T[i], step["X"][b]) for i, b in enumerate(valid)])  # (c, n)
        assert_matches(f"{name}.S_pos", S_pos, official["S_pos"], **EXACT)
        assert_matches(f"{name}.T_pos", T_pos, official["T_pos"], **EXACT)
        assert_matches(f"{name}.L_d", dawsol.domain_loss(S, T), official["L_d"], **MMD_TOL)
        assert_matches(f"{name}.L_u", dawsol.universum_loss(U, absolute=False), official["L_u"], rtol=F32)


def test_solver_loss_batch_and_gradient(monkeypatch):
    case = FIXTURE["loss"]
    official = case["official"]
    model = official_model(case["K"], case["D"], case["grid"], case["head_W"], case["head_b"])
    load_memory(model.tsa, case["state_before"])
    args = dawsol.Args(n_samples=case["n"], lambda_dal=case["lambda1"], lambda_universum=case["lambda2"],
                       neck="linear_relu", tsa_mode="sequential")  # L_u on the features themselves (no |.|)
    split, seen = model.tsa.split, {}

    def recording_split(*a, **k):
        seen["S"], seen["T"], seen["U"], seen["clusters"], stats = split(*a, **k)
        return seen["S"], seen["T"], seen["U"], seen["clusters"], stats

    model.tsa.split = recording_split
    monkeypatch.setattr(torch, "rand", official_shuffles(case["clusters"], case["shuffle_f"], case["shuffle_t"]))
    X = case["X"].clone().requires_grad_()  # (B, P, D) float32
    total, parts = dawsol.compute_loss(model(X), case["labels"], args, model.tsa)
    monkeypatch.undo()
    assert_matches("loss.clusters", seen["clusters"], case["clusters"], **EXACT)
    assert_matches("loss.count", len(seen["S"]), official["count"], **EXACT)
    assert_matches("loss.cls", parts["cls"], official["cls"], rtol=F32)
    assert_matches("loss.L_d", parts["dal_mmd"], official["L_d"], **MMD_TOL)
    assert_matches("loss.L_u", parts["universum"], official["L_u"], rtol=F32)
    assert_matches("loss.total", total, official["total"], rtol=F32)
    total.backward()
    assert_matches("loss.grad_X", X.grad, official["grad_X"], rtol=F32)


def test_cam_lowres_scoremap_224_and_predicts():
    case = FIXTURE["cam"]
    official = case["official"]
    features, labels = case["features"], case["labels"]
    model = official_model(len(case["head_b"]), features.shape[2], case["grid"], case["head_W"], case["head_b"])
    with torch.no_grad():
        out = model(features, need_maps=True)
        maps = dawsol.localization_map(model, out, features, "cam")  # (B, C, h, w)
    gt_maps = maps[torch.arange(len(labels)), labels]  # (B, h, w), as evaluate() picks them
    assert_matches("cam.cam_lowres", common.normalize_scoremap(gt_maps), official["cam_lowres"], rtol=F32)
    scoremaps = common.resize_scoremap(gt_maps, 224)  # (B, 224, 224): what LocalizationMeter thresholds
    # official: cv2 INTER_CUBIC on the float32 CAM, so the stored float64 map carries fp32 rounding
    assert_matches("cam.scoremap_224_every3", scoremaps[:, ::3, ::3], official["scoremap_224_every3"], rtol=F32)
    assert_matches("cam.predicts", out["logits"].argmax(1), official["predicts"], **EXACT)


def test_eigencam_projection():
    case = FIXTURE["eigencam"]
    official = case["official"]
    ours = common.eigen_cam(case["features"])  # (B, P), sign="maxabs"
    expected = official["get_2d_projection_with_sign_correction"].clamp(min=0)  # BaseCAM's ReLU
    assert_matches("eigencam.get_2d_projection_with_sign_correction", ours, expected, rtol=F32)
    ours = common.eigen_cam(case["features"], sign="none")  # torch's SVD sign, which need not be LAPACK's
    lapack = official["get_2d_projection"]
    sign = torch.where((ours * lapack).sum(1) >= 0, 1.0, -1.0)  # (B,): +1 where torch agreed with LAPACK
    assert_matches("eigencam.get_2d_projection_up_to_sign", ours, (sign[:, None] * lapack).clamp(min=0), rtol=F32)
