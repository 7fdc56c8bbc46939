"""Golden fixture: tscam.py, scm.py and the TS-CAM / SCM repo protocols replayed against numbers that the official
code wrote (tests/fixtures/tscam_scm.pt: TS-CAM @ 25aece4, SCM @ be5bdfa, float64; its README string documents every
field). Each test and each assert_matches field names the quantity, so a failure says which one is off.

Tolerance: 1e-10 relative to the largest official magnitude of the field (conftest.assert_matches); the protocol
counts are integers and must be equal. The fixture holds no float32 outputs, so no field needs the looser 1e-6.
"""

import pytest
import torch
import torch.nn.functional as F

import common
import scm
import tscam
from conftest import assert_matches, load_fixture

RTOL = 1e-10
FIX = load_fixture("tscam_scm.pt")
CFG = FIX["config"]  # img 224, patch 16, dim 48, depth 2, heads 2, K 5, B 2 (drop_path 0)
SCM_SCALARS = {"fuse._loss_rate": ("lambda", "lam"), "thred": ("theta", "theta")}  # official -> (fixture, ours)


def our_key(official: str) -> str:
    """An official parameter name -> ours: the ViT lives under `vit.`, the conv head keeps `head.*`, and SCM's
    per-layer scalars `layers.{l}.fuse._loss_rate` (lambda_l) / `layers.{l}.thred` (theta_l) are
    `calibration.layers.{l}.lam` / `.theta` (the fixture README's own mapping)."""
    if official.startswith("layers."):
        _, layer, name = official.split(".", 2)
        return f"calibration.layers.{layer}.{SCM_SCALARS[name][1]}"
    return official if official.startswith("head.") else f"vit.{official}"


def official_weights() -> dict[str, torch.Tensor]:
    """The fixture's weights decoded exactly: offset + int8 code * 2^-9, float64, under our key names."""
    state = {our_key(k): w["offset"] + w["codes"].double() * 2.0**-9 for k, w in FIX["weights"].items()}
    for name, (fixture_name, _) in SCM_SCALARS.items():
        for layer, value in enumerate(FIX["scm_scalars"][fixture_name]):
            state[our_key(f"layers.{layer}.{name}")] = value.reshape(1)
    return state


def build(module, model_cls):
    """The project's own constructor at the fixture's config, in float64, with every weight loaded by key."""
    args = module.Args(img_size=CFG["img"], patch_size=CFG["patch"], embed_dim=CFG["dim"], depth=CFG["depth"],
                       heads=CFG["heads"], drop_path=0.0)
    model = model_cls(args, CFG["K"]).double()
    state = {k: v for k, v in official_weights().items() if model_cls is scm.SCM or not k.startswith("calibration.")}
    model.load_state_dict(state, strict=True)  # every one of our parameters comes from the fixture, and only those
    return model


def official_input() -> torch.Tensor:
    """(2, 3, 224, 224): 56 x 56 int8 codes, each repeated over a 4 x 4 block, / 32."""
    return FIX["x_codes"].double().repeat_interleave(4, 2).repeat_interleave(4, 3) / 32


def eval_outputs(module, model_cls, kind: str) -> dict[str, torch.Tensor]:
    model = build(module, model_cls).eval()
    images = official_input()
    with torch.no_grad():
        out = model(images, need_maps=True)
        maps = module.localization_map(model, out, images, kind)  # (B, K, h, w)
    return {"logits": out["logits"], "A": out["attention"], "S": out["semantic"], "maps": maps,
            "A01": scm.minmax(out["attention"].flatten(1)).reshape_as(out["attention"])}


def train_outputs(module, model_cls) -> dict:
    model = build(module, model_cls).train()  # drop_path 0: training mode is deterministic
    out = model(official_input())
    loss = F.cross_entropy(out["logits"], FIX["y"])
    loss.backward()
    return {"logits": out["logits"].detach(), "loss": loss.detach(),
            "grads": {k: p.grad for k, p in model.named_parameters()}}


@pytest.fixture(scope="module")
def tscam_eval():
    return eval_outputs(tscam, tscam.TSCAM, "tscam")


@pytest.fixture(scope="module")
def scm_eval():
    return eval_outputs(scm, scm.SCM, "scm")


@pytest.fixture(scope="module")
def tscam_train():
    return train_outputs(tscam, tscam.TSCAM)


@pytest.fixture(scope="module")
def scm_train():
    return train_outputs(scm, scm.SCM)


def test_fixture_weights_cover_every_parameter():
    """The key map is complete both ways: every official weight lands on one of our parameters, and vice versa."""
    ours = set(official_weights())
    for module, model_cls in ((tscam, tscam.TSCAM), (scm, scm.SCM)):
        own = set(build(module, model_cls).state_dict())
        assert own <= ours, f"{model_cls.__name__}: no fixture weight for {sorted(own - ours)}"
    assert ours == set(build(scm, scm.SCM).state_dict()), "fixture weights that SCM does not have"


# %% model outputs (tscam_scm §2.1, §3.1)
@pytest.mark.parametrize("field", ["logits", "A", "S", "maps"])
def test_tscam_eval(tscam_eval, field):
    """Eval mode: logits = GAP(S), A = head-mean cls attention summed over blocks, S = conv head, maps = A * S."""
    assert_matches(f"tscam.eval.{field}", tscam_eval[field], FIX["tscam"]["eval"][field], rtol=RTOL)


@pytest.mark.parametrize("field", ["logits", "A01", "maps", "S"])
def test_scm_eval(scm_eval, field):
    """Eval mode: SCM is dropped; logits = GAP(S), A01 = minmax(A), maps = A01 * S (S is TS-CAM's: same weights)."""
    official = FIX["tscam"]["eval"]["S"] if field == "S" else FIX["scm"]["eval"][field]
    assert_matches(f"scm.eval.{field}", scm_eval[field], official, rtol=RTOL)


def sampled_grad_checks(prefix: str, ours: torch.Tensor, official: dict) -> None:
    """A grad as the fixture stores it: in full (numel <= 192), or 96 evenly spaced entries plus sum and sum of
    squares. The sum's tolerance is relative to the grad's L2 norm, since a sum can cancel to near zero."""
    assert ours is not None, f"{prefix}: no gradient reached this parameter (official: one)"
    flat = ours.flatten()
    if "full" in official:
        assert_matches(prefix, flat, official["full"], rtol=RTOL)
        return
    index = torch.linspace(0, flat.numel() - 1, 96, dtype=torch.float64).round().long()
    assert_matches(f"{prefix}.values", flat[index], official["values"], rtol=RTOL)
    assert_matches(f"{prefix}.sum", flat.sum(), official["sum"], rtol=RTOL, atol=RTOL * official["sumsq"].sqrt())
    assert_matches(f"{prefix}.sumsq", flat.pow(2).sum(), official["sumsq"], rtol=RTOL)


@pytest.mark.parametrize("field", ["logits", "loss"])
def test_tscam_train(tscam_train, field):
    """Training mode: logits = GAP(S), loss = cross-entropy (tscam_scm §2.2)."""
    assert_matches(f"tscam.train_{field}", tscam_train[field], FIX["tscam"][f"train_{field}"], rtol=RTOL)


@pytest.mark.parametrize("name", list(FIX["tscam"]["train_grads"]))
def test_tscam_train_grad(tscam_train, name):
    sampled_grad_checks(f"tscam.train_grads[{name} = ours {our_key(name)}]", tscam_train["grads"][our_key(name)],
                        FIX["tscam"]["train_grads"][name])


@pytest.mark.parametrize("field", ["logits", "loss"])
def test_scm_train(scm_train, field):
    """Training mode: logits = GAP of the 4 calibration layers' output, loss = cross-entropy (tscam_scm §3.1-§3.3)."""
    assert_matches(f"scm.train_{field}", scm_train[field], FIX["scm"][f"train_{field}"], rtol=RTOL)


@pytest.mark.parametrize("name", list(FIX["scm"]["train_grads"]))
def test_scm_train_grad(scm_train, name):
    """Backbone, head and the 8 learnable scalars (lambda_l = fuse._loss_rate, theta_l = thred)."""
    sampled_grad_checks(f"scm.train_grads[{name} = ours {our_key(name)}]", scm_train["grads"][our_key(name)],
                        FIX["scm"]["train_grads"][name])


# %% one calibration layer (tscam_scm §3.2)
@pytest.mark.parametrize("case", ["n16", "n4"])
def test_scm_layer(case):
    """Encoder(iteration n) on fixed inputs: a_out, x_out and the grads of sum(x_out * wx) + sum(a_out * wa) with
    respect to x, a = minmax(a_raw), lambda and theta."""
    ref, inputs = FIX["scm_layer"][case], {k: v.double() for k, v in FIX["scm_layer"]["inputs"].items()}
    n = int(case[1:])
    layer = scm.CalibrationLayer(n, scm.Args.scm_alpha, ref["lam"], ref["theta"]).double()
    x = inputs["x"].clone().requires_grad_()
    a = scm.minmax(inputs["a_raw"]).requires_grad_()
    x_out, a_out = layer(x, a, scm.grid_laplacian(*x.shape[-2:]).double())
    ((x_out * inputs["wx"]).sum() + (a_out * inputs["wa"]).sum()).backward()
    B, _, h, w = x.shape
    assert_matches(f"scm_layer.{case}.a_out", a_out, ref["a_out"], rtol=RTOL)
    assert_matches(f"scm_layer.{case}.x_out", x_out, inputs["x"] * (1 + (ref["a_out"] - a).reshape(B, 1, h, w)),
                   rtol=RTOL)
    for field, grad in (("grad_x", x.grad), ("grad_a", a.grad), ("grad_lam", layer.lam.grad),
                        ("grad_theta", layer.theta.grad)):
        assert_matches(f"scm_layer.{case}.{field}", grad, ref[field], rtol=RTOL)


# %% the repo protocols through common.RepoProtocolEvaluator (tscam_scm §2.4, §3.5)
def protocol_run(protocol: str, threshold: float | None) -> common.RepoProtocolEvaluator:
    m = FIX["metrics"]  # 24 images, 5 classes, 14 x 14 maps; boxes inclusive in the 224 frame, padded with -1
    boxes = [m["boxes"][i, : m["box_counts"][i]].long().numpy() for i in range(len(m["labels"]))]
    ev = common.RepoProtocolEvaluator(protocol, threshold, CFG["img"])
    ev.accumulate(m["maps"].double(), m["logits"].double(), m["labels"], boxes)
    return ev


@pytest.mark.parametrize("tau", [0.1, 0.12])
def test_tscam_protocol_counts(tau):
    """evaluate_cls_loc's image counts [Cls@1, Cls@5, Top-1 Loc, Top-5 Loc, GT-known Loc] at the fixed tau."""
    ev = protocol_run("tscam", tau)
    ours = [ev.counts[k] for k in ("Cls@1", "Cls@5", "Top-1 Loc", "Top-5 Loc", "GT-known Loc")]
    assert_matches(f"tscam protocol counts@tau{tau} [Cls@1, Cls@5, Top-1, Top-5, GT-known]", ours,
                   FIX["metrics"][f"tscam_counts_tau{tau}"], rtol=0.0)


@pytest.fixture(scope="module")
def scm_protocol():
    ev = protocol_run("scm", None)
    return ev, ev.compute()


@pytest.mark.parametrize("kind", ["det", "loc"])
@pytest.mark.parametrize("iou", [30, 50, 70])
def test_scm_protocol_counts_per_threshold(scm_protocol, kind, iou):
    """test_cam.count's images counted right at each tau of np.arange(0, 1, 0.01), rows top-1 and top-5: det = the
    rank's box has IoU >= iou, loc = det and the rank's class is the GT."""
    ev, _ = scm_protocol
    assert_matches(f"scm protocol {kind}@{iou} counts (top-1, top-5) per tau", ev.sweep[kind, iou],
                   FIX["metrics"]["scm"][kind][iou], rtol=0.0)
    assert_matches("scm protocol cls counts (top-1, top-5)", [ev.counts["Cls@1"], ev.counts["Cls@5"]],
                   FIX["metrics"]["scm"]["cls"], rtol=0.0)


def scm_result_key(official: str) -> str:
    """test_cam.evaluate's key -> ours in the scm-repo block (common.scm_key)."""
    if official.startswith("cls_acc_top-"):
        return f"scm-repo/Cls@{official[-1]}"
    if official.startswith("GT-Known_top-"):
        return f"scm-repo/{common.scm_key('det', 50, int(official[-1]))}"
    name, rest = official.split("_thr_")
    iou, k = int(float(rest.split("_")[0])), int(rest[-1])
    kind = "loc" if name.startswith("loc") else "det"
    return f"scm-repo/{'threshold ' if 'optThred' in name else ''}{common.scm_key(kind, iou, k)}"


@pytest.mark.parametrize("official", list(FIX["metrics"]["scm"]["results"]))
def test_scm_protocol_results(scm_protocol, official):
    """Every number test_cam.evaluate reports (IoU 30 / 50 / 70, top-1 / top-5, and each one's best tau)."""
    _, ours = scm_protocol
    assert_matches(f"scm protocol {official} (ours {scm_result_key(official)})", ours[scm_result_key(official)],
                   FIX["metrics"]["scm"]["results"][official], rtol=RTOL)


def test_scm_protocol_reports_no_unchecked_numbers(scm_protocol):
    """The scm-repo block holds the official numbers and nothing else."""
    _, ours = scm_protocol
    assert set(ours) == {scm_result_key(k) for k in FIX["metrics"]["scm"]["results"]}


def test_tscam_protocol_keys_are_unchanged():
    out = protocol_run("tscam", 0.1).compute()
    assert set(out) == {f"tscam-repo/{k}" for k in ("Top-1 Loc", "Top-5 Loc", "GT-known Loc", "Cls@1", "Cls@5",
                                                      "threshold")}

