"""Golden fixtures for SAT and BAS: the project replayed against numbers the official code wrote
(tests/fixtures/sat_bas.pt: wpy1999/SAT @702290d, wpy1999/BAS-Extension @bd1bfa8; see its `meta` and `note`s).

Every case the file holds is replayed: the tiny SAT model (train outputs, both map losses, gradients, eval maps), the
Gaussian kernel, BAS's losses / gradients / top-k maps from the official intermediate tensors, the 12 box-protocol
cases and the CUB test crops and boxes. Test and field names say which quantity is off (these double as autograders).
Tolerances: 1e-10 relative in float64; 1e-6 for float32 fields and where the project computes in fp32 on purpose
(SAT's two map losses, BAS's ratio and area terms)."""

import dataclasses
import functools

import pytest
import torch
import torch.nn.functional as F

import bas
import common
import data
import sat
from conftest import assert_matches, load_fixture

F64, F32 = 1e-10, 1e-6  # relative tolerances (assert_matches: relative to the largest official magnitude)


def f64(value: float) -> torch.Tensor:
    """A logged Python float as a float64 tensor (torch.as_tensor, inside assert_matches, would round it to fp32)."""
    return torch.tensor(value, dtype=torch.float64)


@functools.cache
def fixture() -> dict:
    return load_fixture("sat_bas.pt")


# %% SAT: the tiny model at SAT's hard-coded geometry (14 x 14 grid, 12 blocks, the last 3 gated), width 16
@functools.cache
def sat_model() -> sat.SAT:
    """sat.py's own constructor with Args matching the fixture's config (drop_path 0), the official state dict loaded
    through the fixture's key map, in float64 (the official run was float64)."""
    case = fixture()["sat_tiny"]
    cfg = case["config"]
    model = sat.SAT(sat_args(), cfg["num_classes"])  # its random init is overwritten below, every key
    key_map = case["key_map_official_to_ours"]
    state = {key_map[k]: v for k, v in case["official_state_dict"].items() if key_map[k] is not None}
    own = model.state_dict()
    assert sorted(state) == sorted(own), f"key map does not cover the model: {sorted(set(state) ^ set(own))}"
    model.load_state_dict(state)
    return model.double()


def sat_args() -> sat.Args:
    cfg = fixture()["sat_tiny"]["config"]
    return sat.Args(img_size=cfg["img_size"], patch_size=cfg["patch_size"], embed_dim=cfg["embed_dim"],
                    depth=cfg["depth"], heads=cfg["heads"], drop_path=0.0, num_sa_blocks=cfg["num_sa_blocks"],
                    area_threshold=cfg["area_threshold"], lambda_ba=1.0, lambda_norm=1.0, gauss_kernel_size=3,
                    gauss_nsig=6.0, map_loss_warmup=0)


def sat_train_step(loss_name: str):
    """(out, loss, parts, grads by official key) of one train-mode forward and backward of `loss_name`: "cls" (CE
    alone) or "total" (sat.compute_loss)."""
    case = fixture()["sat_tiny"]
    model = sat_model().train()
    model.zero_grad(set_to_none=True)
    out = model(case["x"].double())
    loss, parts = sat.compute_loss(out, case["y"], sat_args())
    (F.cross_entropy(out["logits"], case["y"]) if loss_name == "cls" else loss).backward()
    inverse = {v: k for k, v in case["key_map_official_to_ours"].items() if v is not None}
    grads = {inverse[n]: p.grad for n, p in model.named_parameters()}
    return out, loss, parts, grads


@functools.cache
def sat_train_total():
    return sat_train_step("total")


def test_sat_config_matches_the_official_geometry():
    cfg, model = fixture()["sat_tiny"]["config"], sat_model()
    assert model.vit.grid == (14, 14) and len(model.vit.blocks) == cfg["depth"] == 12
    gated = [i for i, b in enumerate(model.vit.blocks) if isinstance(b, sat.SpatialAwareBlock)]
    assert gated == [9, 10, 11], f"gated blocks {gated}, official: cur_depth >= 9"
    assert all(b.drop_path.p == 0.0 for b in model.vit.blocks)


def test_sat_train_logits():
    out, *_ = sat_train_total()
    assert_matches("sat/train logits", out["logits"], fixture()["sat_tiny"]["train"]["logits"], rtol=F64)


@pytest.mark.parametrize("ours, official", [("cls", "loss_cls"), ("area", "area_mean"), ("norm", "norm"),
                                            ("batch_area", "loss_batch_area")])
def test_sat_train_loss_terms(ours, official):
    _, _, parts, _ = sat_train_total()
    rtol = F64 if ours == "cls" else F32  # the two map losses run in fp32 on purpose (sat.compute_loss)
    assert_matches(f"sat/train {official} (ours parts[{ours!r}])", f64(parts[ours]),
                   fixture()["sat_tiny"]["train"][official], rtol=rtol)


def test_sat_train_total_loss():
    _, loss, _, _ = sat_train_total()
    assert_matches("sat/train total loss L = CE + L_ba + L_norm", loss, fixture()["sat_tiny"]["train"]["loss"],
                   rtol=F32)


def check_grads(kind: str, grads: dict, official: dict, rtol: float) -> None:
    """Each of the 154 parameters' gradient, relative to its own largest official entry (stricter than the official
    check's max over all tensors: the smallest gradients here are ~3e-4 of the largest)."""
    assert sorted(grads) == sorted(official), f"sat/{kind}: parameters {sorted(set(grads) ^ set(official))}"
    for name, g in official.items():
        assert grads[name] is not None, f"sat/{kind} {name}: no gradient in ours"
        assert_matches(f"sat/{kind} {name}", grads[name], g, rtol=rtol)


def test_sat_grads_of_ce_only():
    *_, grads = sat_train_step("cls")
    check_grads("grad of CE only", grads, fixture()["sat_tiny"]["train"]["grads_ce_only"], F64)


def test_sat_grads_of_the_total_loss():
    *_, grads = sat_train_total()
    check_grads("grad of the total loss", grads, fixture()["sat_tiny"]["train"]["grads"], F32)


@functools.cache
def sat_eval():
    with torch.inference_mode():
        return sat_model().eval()(fixture()["sat_tiny"]["x"].double())


def test_sat_eval_logits():
    assert_matches("sat/eval logits", sat_eval()["logits"], fixture()["sat_tiny"]["eval"]["logits"], rtol=F64)


def test_sat_eval_maps_per_block():
    assert_matches("sat/eval per-block maps m^l (last 3 blocks)", sat_eval()["maps"],
                   fixture()["sat_tiny"]["eval"]["maps_per_block"], rtol=F64)


def test_sat_eval_localization_map():
    out = sat_eval()
    ours = sat.localization_map(sat_model(), out, fixture()["sat_tiny"]["x"].double(), "sat")[:, 0]  # (B, h, w)
    assert_matches("sat/eval localization map M (mean of the 3)", ours, fixture()["sat_tiny"]["eval"]["loc_map"],
                   rtol=F64)


# %% SAT parts: the Gaussian kernel of L_norm
def test_sat_gaussian_kernel_3_6():
    ours = sat.gaussian_kernel(3, 6.0)[0, 0]  # float32 on purpose (the map losses run in fp32)
    assert_matches("sat/gaussian kernel (3, 6.0)", ours, fixture()["sat_parts"]["kernel_3_6"], rtol=F32)
    # the official model stores the kernel as a float32 `weight`: ours equals it bit for bit
    assert_matches("sat/gaussian kernel vs the official float32 `weight`", ours,
                   fixture()["sat_tiny"]["official_state_dict"]["weight"][0, 0], rtol=0.0)


# %% BAS: the loss terms, gradients and top-k maps from the official intermediate tensors
def bas_out(A: torch.Tensor, Mall: torch.Tensor, A_bg: torch.Tensor, labels: torch.Tensor) -> dict:
    """bas.BAS.forward's dict from BAS-Ext ResNetCam's tensors: A (B, C, 14, 14) class maps, Mall (B, C, 28, 28)
    generator maps, A_bg (B, C, 14, 14) class maps of the erased pass. The CNN's generator grid is twice the class-map
    grid, so the FRG mask is pooled 2x2 as BAS-Ext does (ours has one grid, spec D2, so bas.py never pools)."""
    fg = Mall[torch.arange(len(labels)), labels]  # (B, 28, 28): M_fg, the GT channel
    return {"logits": A.mean(dim=(2, 3)), "cams": A, "maps": Mall, "fg_map": fg,
            "fg_logits": (A * F.avg_pool2d(fg[:, None], 2)).mean(dim=(2, 3)),  # GAP(A * AvgPool2(M_fg)) (B, C)
            "bg_logits": A_bg.mean(dim=(2, 3))}  # (B, C)


@functools.cache
def bas_train():
    case = fixture()["bas"]
    A, Mall, A_bg = (case[k].clone().requires_grad_() for k in ("A", "Mall", "A_bg"))
    out = bas_out(A, Mall, A_bg, case["labels"])
    args = dataclasses.replace(bas.Args(), alpha=case["alpha"], beta=case["beta"])
    loss, parts = bas.compute_loss(out, case["labels"], args)
    loss.backward()
    return out, loss, parts, {"A": A.grad, "Mall_frg_area": Mall.grad, "A_bg": A_bg.grad}


def test_bas_replay_inputs_match_the_official_scores():
    """The replay's own inputs (not bas.py): if these fail, the fixture is read wrongly, not bas.py."""
    out, *_ = bas_train()
    official, labels = fixture()["bas"]["official"], fixture()["bas"]["labels"]
    assert_matches("bas/replay logits GAP(A) vs score_1", out["logits"], official["score_1"], rtol=F64)
    assert_matches("bas/replay FRG logits vs score_2", out["fg_logits"], official["score_2"], rtol=F64)
    assert_matches("bas/replay M_fg", out["fg_map"][:, None], official["M_fg"], rtol=F64)
    assert_matches("bas/replay S_bg", out["bg_logits"].gather(1, labels[:, None])[:, 0], official["S_bg"], rtol=F64)


def test_bas_background_ratio_per_sample():
    out, *_ = bas_train()
    labels, official = fixture()["bas"]["labels"], fixture()["bas"]["official"]
    S, S_bg = (out[k].detach().gather(1, labels[:, None])[:, 0] for k in ("logits", "bg_logits"))
    assert_matches("bas/S (GT-class activation)", S, official["S"], rtol=F64)
    assert_matches("bas/L_bas per sample (background ratio)", bas.background_ratio(S, S_bg),
                   official["bas_per_sample"], rtol=F64)


def test_bas_area_per_sample():
    out, *_ = bas_train()
    assert_matches("bas/L_ac per sample (mean of M_fg)", out["fg_map"].detach().mean(dim=(1, 2)),
                   fixture()["bas"]["official"]["area_per_sample"], rtol=F64)


@pytest.mark.parametrize("ours, official, rtol", [("cls", "loss_cls", F64), ("frg", "loss_frg", F64),
                                                  ("bas", "loss_bas", F32), ("area", "loss_area", F32)])
def test_bas_loss_terms(ours, official, rtol):
    _, _, parts, _ = bas_train()  # L_bas and L_ac run in fp32 on purpose (bas.compute_loss)
    assert_matches(f"bas/{official} (ours parts[{ours!r}])", f64(parts[ours]), fixture()["bas"]["official"][official],
                   rtol=rtol)


def test_bas_total_loss():
    _, loss, _, _ = bas_train()
    assert_matches("bas/total loss L = L_cls + alpha L_frg + L_bas + beta L_ac", loss,
                   fixture()["bas"]["official"]["loss"], rtol=F32)


@pytest.mark.parametrize("name, rtol", [("A", F64), ("Mall_frg_area", F32), ("A_bg", F32)])
def test_bas_grads(name, rtol):
    """A: L_cls + alpha L_frg (S is detached in L_bas); Mall: alpha L_frg + beta L_ac; A_bg: L_bas."""
    *_, grads = bas_train()
    assert_matches(f"bas/grad of the total loss wrt {name}", grads[name], fixture()["bas"]["grads"][name], rtol=rtol)


@pytest.mark.parametrize("k", [1, 3, "all"])
def test_bas_topk_maps(k):
    case = fixture()["bas"]
    out = {"maps": case["topk_eval"]["Mall"], "logits": case["topk_eval"]["score_1"]}
    C = out["maps"].shape[1]
    official = case["topk_maps"][C if k == "all" else k]
    for topk in ([0, C] if k == "all" else [k]):  # 0 is bas.py's "all classes"
        maps = bas.localization_map(None, out, None, "bas", topk)
        if topk == 1:  # every class's map; BAS-Ext evaluates the GT class's (the label is passed in)
            maps = maps[torch.arange(len(case["labels"])), case["labels"]]
        else:
            maps = maps[:, 0]
        assert_matches(f"bas/top-k map k={k} (topk_test={topk})", maps, official, rtol=F64)


# %% The box protocols: SAT / BAS evaluators x CUB / ILSVRC x map sizes x dtypes, official counts exactly
BOX_CASES = [(name, dtype) for name in ("sat_CUB_200_2011_14", "sat_ILSVRC_14", "bas_CUB_200_2011_28",
                                        "bas_CUB_200_2011_14", "bas_ILSVRC_28", "bas_ILSVRC_14")
             for dtype in ("float64", "float32")]
COUNTED = ("Cls@1", "Cls@5", "GT-known Loc", "Top-1 Loc", "Top-5 Loc")  # IoU50 == GT-known Loc in both repos


def test_box_protocol_cases_are_all_replayed():
    assert sorted(fixture()["box_protocol"]) == sorted({name for name, _ in BOX_CASES})


@pytest.mark.parametrize("name, dtype", BOX_CASES)
def test_box_protocol_counts(name, dtype):
    case = fixture()["box_protocol"][name]
    protocol = name.split("_")[0]
    maps = case["maps"].to(getattr(torch, dtype))[:, None]  # (B, 1, h, w): one class-agnostic map per image
    assert case["official_counts"]["IoU50"] == case["official_counts"]["GT-known Loc"]
    for i, threshold in enumerate(case["thresholds"]):
        ev = common.RepoProtocolEvaluator(protocol, threshold, 224)
        ev.accumulate(maps, case["logits"], case["labels"], case["boxes"])
        n, result = ev.num_images, ev.compute()
        for key in COUNTED:
            ours = round(result[f"{protocol}-repo/{key}"] * n / 100)
            official = case["official_counts"][key][i]
            assert ours == official, f"box/{name} {dtype} tau={threshold} {key}: ours {ours}, official {official} " \
                                     f"of {n} images"


# %% Data: the official CUB test crops (Resize(256, 256) + CenterCrop(224)) and boxes through data.py
@pytest.fixture(scope="module")
def cub_test_set(tmp_path_factory):
    """The fixture's JPEGs (RGB, grayscale, CMYK) in the CUB-200-2011 layout, every image in the test split, read the
    way sat.py's eval split is (data.get_splits -> get_dataset(..., test_crop=True))."""
    d = fixture()["data"]
    root = tmp_path_factory.mktemp("cub")
    names = list(d["jpegs"])
    classes = sorted({n.split("/")[0] for n in names})
    for n in names:
        (root / "images" / n).parent.mkdir(parents=True, exist_ok=True)
        (root / "images" / n).write_bytes(d["jpegs"][n])
    lines = {"images.txt": [f"{i} {n}" for i, n in enumerate(names, 1)],
             "image_class_labels.txt": [f"{i} {classes.index(n.split('/')[0]) + 1}" for i, n in enumerate(names, 1)],
             "train_test_split.txt": [f"{i} 0" for i in range(1, len(names) + 1)],
             "bounding_boxes.txt": [f"{i} " + " ".join(map(str, b)) for i, b in enumerate(d["xywh"], 1)],
             "classes.txt": [f"{i} {c}" for i, c in enumerate(classes, 1)]}
    for file, rows in lines.items():
        (root / file).write_text("\n".join(rows) + "\n")
    ds = data.get_dataset("cub", "test", 224, str(root), test_crop=True)
    return ds, [r.path.relative_to(root / "images").as_posix() for r in ds.records]


def test_data_cub_test_sizes_and_labels(cub_test_set):
    ds, names = cub_test_set
    d = fixture()["data"]
    assert names == list(d["jpegs"])
    for i, n in enumerate(names):
        assert data.load_rgb(ds.records[i].path).size == tuple(d["sizes"][n]), f"data/{n}: image size"
        assert ds[i]["label"] == d["official_labels"][n], f"data/{n}: label"


def test_data_cub_test_boxes(cub_test_set):
    ds, names = cub_test_set
    for i, n in enumerate(names):
        assert_matches(f"data/CUB test GT box in the crop frame {n}", ds[i]["boxes"],
                       fixture()["data"]["official_boxes"][n][None], rtol=0.0)


def test_data_cub_test_crops(cub_test_set):
    ds, names = cub_test_set
    crops = fixture()["data"]["official_uint8_crop"]
    assert crops, "no official crops in the fixture"
    mean, std = torch.tensor(data.IMAGENET_MEAN).view(3, 1, 1), torch.tensor(data.IMAGENET_STD).view(3, 1, 1)
    for i, n in enumerate(names):
        if n not in crops:
            continue
        official = crops[n]  # (224, 224, 3) uint8
        assert_matches(f"data/CUB test crop uint8 pixels {n}", torch.from_numpy(ds.display_image(i)), official,
                       rtol=0.0)
        normalised = (official.permute(2, 0, 1).float() / 255 - mean) / std  # ToTensor + Normalize, float32
        assert_matches(f"data/CUB test crop normalised tensor {n}", ds[i]["image"], normalised, rtol=F32)
