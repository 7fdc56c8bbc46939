"""Tests for common.py sections 1-2: wsolevaluation's metrics and the repos' own protocols.

The oracle for boxes is a slow, plain re-statement of the spec (../shared/specs/metrics_data.md §2-3): breadth-first
flood fill per cut, 8-connected foreground, 4-connected background in a padded frame, contour area by the 2x2-window
formula. The fast all-cuts implementation must give exactly the same boxes and best IoUs at every cut.
"""

from collections import deque

import numpy as np
import pytest
import torch

import common

# %% reference implementation (slow, obviously correct)
EIGHT = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx]
FOUR = [(-1, 0), (0, -1), (0, 1), (1, 0)]


def flood_labels(mask: np.ndarray, steps) -> list[list[tuple[int, int]]]:
    """Components of a boolean mask as pixel lists, numbered in raster order of their first pixel."""
    H, W = mask.shape
    seen = np.zeros_like(mask, bool)
    components = []
    for y in range(H):
        for x in range(W):
            if mask[y, x] and not seen[y, x]:
                seen[y, x] = True
                queue, pixels = deque([(y, x)]), []
                while queue:
                    cy, cx = queue.popleft()
                    pixels.append((cy, cx))
                    for dy, dx in steps:
                        ny, nx = cy + dy, cx + dx
                        if 0 <= ny < H and 0 <= nx < W and mask[ny, nx] and not seen[ny, nx]:
                            seen[ny, nx] = True
                            queue.append((ny, nx))
                components.append(pixels)
    return components


def pixel_box(pixels) -> tuple[int, int, int, int]:
    ys, xs = zip(*pixels, strict=True)
    return min(xs), min(ys), max(xs), max(ys)


def window_area(filled: np.ndarray) -> float:
    """Spec §3.3 on a filled set Fbar: #2x2 windows fully inside + half the windows with exactly 3 pixels inside."""
    ys, xs = np.nonzero(filled)
    c = np.pad(filled[ys.min():ys.max() + 1, xs.min():xs.max() + 1], 1).astype(int)
    inside = c[:-1, :-1] + c[:-1, 1:] + c[1:, :-1] + c[1:, 1:]
    return float((inside == 4).sum() + 0.5 * (inside == 3).sum())


def contour_area(component: np.ndarray) -> float:
    """OpenCV's contourArea of a component's outer contour: window_area of the component together with every pixel
    that cannot reach the padded outside through a 4-connected path avoiding it."""
    outside = flood_labels(np.pad(~component, 1, constant_values=True), FOUR)[0]
    filled = np.ones(np.add(component.shape, 2), bool)
    filled[tuple(zip(*outside, strict=True))] = False
    return window_area(filled)


def reference_contours(q: np.ndarray, cut: int, multi: bool) -> list[tuple[int, int, int, int]]:
    """Pixel boxes of OpenCV's contours of {q > cut} (spec §3.1-3.4); holes grown by one pixel."""
    fg = q > cut
    if not fg.any():
        return []
    background = flood_labels(np.pad(~fg, 1, constant_values=True), FOUR)  # the frame's component comes first
    if multi:
        boxes = [pixel_box(c) for c in flood_labels(fg, EIGHT)]
        for hole in background[1:]:
            x0, y0, x1, y1 = pixel_box(hole)  # padded frame: -1 gives image coordinates, then grow by one pixel
            boxes.append((x0 - 2, y0 - 2, x1, y1))
        return boxes
    outside = np.zeros(np.add(fg.shape, 2), bool)
    outside[tuple(zip(*background[0], strict=True))] = True
    filled = flood_labels(~outside[1:-1, 1:-1], EIGHT)
    areas = []
    for pixels in filled:
        region = np.zeros_like(fg)
        region[tuple(zip(*pixels, strict=True))] = True
        areas.append(window_area(region))  # components of Fbar are filled
    winner = max(i for i, a in enumerate(areas) if a == max(areas))  # ties: the last in raster order
    return [pixel_box(filled[winner])]


def wsol_box(box, H: int, W: int) -> tuple[int, int, int, int]:
    x0, y0, x1, y1 = box
    return x0, y0, min(x1 + 1, W - 1), min(y1 + 1, H - 1)


def reference_best_ious(s: np.ndarray, gt: np.ndarray, thresholds: np.ndarray, multi: bool) -> np.ndarray:
    """(T,) best IoU over wsolevaluation's boxes x GT boxes at each threshold, straight from the spec."""
    q = (s * 255).astype(np.uint8)
    best = {}  # cut -> best IoU
    for cut in {int(tau * q.max()) for tau in thresholds}:
        boxes = [wsol_box(b, *q.shape) for b in reference_contours(q, cut, multi)] or [(0, 0, 0, 0)]
        best[cut] = common.box_iou(np.array(boxes), gt).max()
    return np.array([best[int(tau * q.max())] for tau in thresholds])


def fast_boxes(s: np.ndarray, multi: bool) -> dict[int, list]:
    """cut -> sorted wsolevaluation boxes of one map, from the all-cuts implementation."""
    s = common.check_scoremaps(s)
    boxes, image, cut = common._contours((s * 255).astype(np.uint8), common._fine_order(s), multi)
    boxes = common._wsol_convention(boxes, *s.shape[1:])
    return {t: sorted(map(tuple, boxes[cut == t].tolist())) for t in np.unique(cut)}


def random_map(rng: np.random.Generator, kind: str, H: int, W: int) -> np.ndarray:
    if kind == "smooth":  # CAM-like: a coarse random grid, bicubic-upsampled
        coarse = torch.rand(1, 1, max(1, H // 3), max(1, W // 3), generator=torch.Generator().manual_seed(int(
            rng.integers(1 << 30))), dtype=torch.float64)
        return common.resize_scoremap(coarse[0, 0], (H, W))
    if kind == "noise":
        return rng.random((H, W))
    if kind == "levels":  # few distinct values: many ties, plateaus, equal areas
        return rng.integers(0, 4, (H, W)) / 3
    if kind == "rings":  # concentric square rings: holes at many cuts
        y, x = np.mgrid[:H, :W]
        return (np.maximum(abs(y - H // 2), abs(x - W // 2)) % 3 == 1) * rng.random((H, W)) ** 0.2
    if kind == "diagonal":  # checkerboard-like diagonals: 8- vs 4-connectivity everywhere
        y, x = np.mgrid[:H, :W]
        return ((x + y) % 2 == 0) * rng.random((H, W))
    return (rng.random((H, W)) > 0.5) * 1.0  # "binary"


# %% score maps, IoU, masks
def test_normalize_scoremap_minmax_flat_and_nan():
    assert np.allclose(common.normalize_scoremap(np.array([[2.0, 4.0], [3.0, 6.0]])), [[0, 0.5], [0.25, 1]])
    assert (common.normalize_scoremap(np.full((3, 3), 7.0)) == 0).all()
    nan = np.ones((2, 3, 3))
    nan[1, 0, 0] = np.nan
    nan[0, 1, 1] = 5
    out = common.normalize_scoremap(nan)
    assert out[0].max() == 1 and (out[1] == 0).all()  # maps are normalised one by one
    resized = common.resize_scoremap(torch.full((2, 4, 4), float("nan")), 16)
    assert resized.shape == (2, 16, 16) and resized.dtype == np.float64 and (resized == 0).all()


def test_resize_scoremap_is_float64_bicubic_then_minmax():
    cam = torch.rand(3, 7, 7, dtype=torch.float64)
    out = common.resize_scoremap(cam, 224)
    up = torch.nn.functional.interpolate(cam[:, None], size=(224, 224), mode="bicubic", align_corners=False)[:, 0]
    assert np.allclose(out, common.normalize_scoremap(up), atol=0, rtol=0)
    assert np.array_equal(common.resize_scoremap(cam[1].numpy(), 224), out[1])  # 2-D numpy in, same answer
    assert out.min() == 0 and out.max() == 1


def test_box_iou_hand_computed():
    assert common.box_iou(np.array([[1, 2, 5, 6]]), np.array([[3, 1, 4, 5]]))[0, 0] == pytest.approx(8 / 27, abs=1e-15)
    assert common.box_iou(np.array([[0, 0, 0, 0]]), np.array([[0, 0, 0, 0]]))[0, 0] == 1
    iou = common.box_iou(np.array([[0, 0, 9, 9], [20, 20, 29, 29]]), np.array([[0, 0, 9, 9], [5, 0, 14, 9]]))
    assert iou.shape == (2, 2)
    assert np.allclose(iou, [[1, 50 / 150], [0, 0]])


def test_resize_mask_nearest_uses_opencv_formula():
    mask = np.arange(3)[:, None] * 10 + np.arange(5)
    up = common.resize_mask_nearest(mask, (7, 4))  # rows floor(d * (1 / (7/3))); columns floor(d * (1 / (4/5)))
    assert up[:, 0].tolist() == [0, 0, 0, 10, 10, 20, 20]
    assert up[0].tolist() == [0, 1, 2, 3]
    big = np.arange(500)[:, None] * np.ones((1, 3), int)
    rows = common.resize_mask_nearest(big, (224, 3))[:, 0]
    assert rows.tolist() == [min(int(np.floor(d * (1.0 / (224 / 500)))), 499) for d in range(224)]


# %% wsolevaluation boxes
UNIMODAL = np.array([[0, 0, 0, 0, 0], [0, .4, .4, .4, .6], [0, .4, 1, .8, .6], [0, .4, .4, .4, .6]])
MULTIMODAL = np.array([[.4, 0, .2, .2, .2], [.4, .4, 0, .4, 0], [0, 0, 0, .4, 0], [1, .6, .8, .2, .2]])


@pytest.mark.parametrize("scoremap, expected", [
    (UNIMODAL, [(1, 1, 4, 3), (1, 1, 4, 3), (2, 1, 4, 3), (2, 2, 4, 3), (2, 2, 3, 3)]),
    (MULTIMODAL, [(0, 0, 4, 3), (0, 0, 2, 2), (0, 3, 3, 3), (2, 3, 3, 3), (0, 3, 1, 3)]),
    (np.zeros((4, 5)), [(0, 0, 0, 0)] * 5),
])
def test_official_unit_test_boxes(scoremap, expected):
    """clovaai/wsolevaluation:evaluation_test.py, Delta = 0.2, single contour (spec §2.8)."""
    got = [tuple(common.scoremap_boxes(scoremap, tau, multi_contour=False)[0]) for tau in np.arange(0, 1, 0.2)]
    assert got == expected


def test_hole_boxes_are_candidates_in_multi_contour_mode():
    s = np.zeros((12, 12))
    s[1:7, 1:9] = 1.0
    s[3:5, 2:4] = 0.0  # a 2 x 2 hole at columns 2-3, rows 3-4
    assert sorted(map(tuple, common.scoremap_boxes(s, 0.5).tolist())) == [(1, 1, 9, 7), (1, 2, 5, 6)]
    assert common.scoremap_boxes(s, 0.5, multi_contour=False).tolist() == [[1, 1, 9, 7]]
    ev = common.BoxEvaluator(0.5)
    ev.accumulate(s, [np.array([[1, 2, 5, 6]])])
    assert ev.best_ious.tolist() == [[1.0, 1.0]]


def test_foreground_is_8_connected_background_4_connected():
    diamond = np.zeros((5, 5))
    diamond[[1, 2, 2, 3], [2, 1, 3, 2]] = 1.0  # 8-connected ring; its centre touches the outside only diagonally
    assert sorted(map(tuple, common.scoremap_boxes(diamond, 0.5).tolist())) == [(1, 1, 4, 4), (1, 1, 4, 4)]
    diagonal = np.zeros((6, 6))
    diagonal[[0, 1, 2], [0, 1, 2]] = 1.0
    assert common.scoremap_boxes(diagonal, 0.5).tolist() == [[0, 0, 3, 3]]


def test_border_blobs_are_clipped_to_w_minus_1():
    s = np.zeros((6, 8))
    s[2:, 5:] = 1.0  # touches the right and bottom borders
    s[0, 0] = 1.0
    assert sorted(map(tuple, common.scoremap_boxes(s, 0.5).tolist())) == [(0, 0, 1, 1), (5, 2, 7, 5)]


def test_quantisation_truncates_and_the_cut_is_strict():
    s = np.zeros((3, 8))
    s[1, 1], s[1, 4], s[1, 6] = 0.999, 0.5, 0.502  # q = 254, 127, 128
    # tau = 0.5: cut trunc(0.5 * 254) = 127, and q > 127 keeps 254 and 128 only
    assert sorted(map(tuple, common.scoremap_boxes(s, 0.5).tolist())) == [(1, 1, 2, 2), (6, 1, 7, 2)]
    # tau = 0: pixels with q = 0 (s < 1/255) are background
    s[0, 7] = 0.003
    assert (0, 0, 7, 2) not in map(tuple, common.scoremap_boxes(s, 0.0).tolist())


def test_reference_contour_area_formula():
    for L in range(1, 6):
        assert contour_area(np.ones((L, L), bool)) == (L - 1) ** 2
    ring = np.ones((3, 3), bool)
    ring[1, 1] = False
    assert contour_area(ring) == 4  # the polygon through the ring's outer pixel centres encloses 2 x 2
    assert contour_area(np.ones((1, 7), bool)) == 0
    corner = np.array([[1, 1], [1, 0]], bool)
    assert contour_area(corner) == 0.5


def test_single_contour_picks_polygon_area_then_the_last_in_raster_order():
    s = np.zeros((9, 14))
    s[1, 0:8] = 1.0  # a line: 8 pixels, area 0
    s[4:6, 10:12] = 1.0  # 2 x 2 square: 4 pixels, area 1
    assert common.scoremap_boxes(s, 0.5, multi_contour=False).tolist() == [[10, 4, 12, 6]]
    s = np.zeros((9, 14))
    s[0:3, 8:11] = 1.0
    s[1, 9] = 0.0  # 3 x 3 ring at the top right: area 4 (filled), 8 pixels
    s[5:8, 1:4] = 1.0  # 3 x 3 square at the bottom left: area 4, 9 pixels; its first pixel comes later in raster
    assert common.scoremap_boxes(s, 0.5, multi_contour=False).tolist() == [[1, 5, 4, 8]]
    s[5:8, 1:4] = 0.0
    s[5:7, 1:4] = 1.0  # now 2 x 3: area 2 < 4, so the ring wins although it comes first
    assert common.scoremap_boxes(s, 0.5, multi_contour=False).tolist() == [[8, 0, 11, 3]]


KINDS = ["smooth", "noise", "levels", "rings", "diagonal", "binary"]


@pytest.mark.parametrize("multi", [True, False])
def test_all_cuts_match_the_reference_exactly(multi):
    """Every box at every cut, on 60 random maps of sizes 1..12 and a few larger ones."""
    rng = np.random.default_rng(0)
    cases = [(KINDS[i % len(KINDS)], *rng.integers(1, 13, 2)) for i in range(60)] + [("smooth", 40, 33),
                                                                                       ("rings", 25, 30)]
    for kind, H, W in cases:
        s = random_map(rng, kind, H, W)
        q = (s * 255).astype(np.uint8)
        fast = fast_boxes(s, multi)
        values = np.unique(q)
        for cut in range(255):
            if cut in values or cut == 0 or cut - 1 in values:  # the sets {q > cut} change only at these cuts
                want = sorted(wsol_box(b, H, W) for b in reference_contours(q, cut, multi))
                assert fast.get(cut, []) == want, (kind, H, W, cut)
            else:
                assert fast.get(cut, []) == fast.get(cut - 1, [])


@pytest.mark.parametrize("multi", [True, False])
def test_sorted_and_dense_region_contacts_agree(multi, monkeypatch):
    """_LevelTree finds each region pair's strongest contact in an R x R table when R is small, else by sorting."""
    rng = np.random.default_rng(3)
    maps = np.stack([random_map(rng, kind, 30, 26) for kind in KINDS])
    q, fine = (maps * 255).astype(np.uint8), common._fine_order(maps)
    dense = common._contours(q, fine, multi)
    monkeypatch.setattr(common, "_DENSE_REGIONS", 0)
    for a, b in zip(dense, common._contours(q, fine, multi), strict=True):
        assert np.array_equal(a, b)


@pytest.mark.parametrize("multi", [True, False])
def test_best_ious_per_image_and_threshold_match_the_reference(multi):
    rng = np.random.default_rng(1)
    maps = np.stack([random_map(rng, kind, 14, 11) for kind in KINDS * 2])  # (12, 14, 11)
    gts = [np.array([[rng.integers(0, 5), rng.integers(0, 5), rng.integers(5, 11), rng.integers(5, 14)]
                     for _ in range(1 + i % 3)]) for i in range(len(maps))]
    ev = common.BoxEvaluator(0.01, multi_contour_eval=multi)
    ev.accumulate(maps[:5], gts[:5])
    ev.accumulate(torch.from_numpy(maps[5:]), gts[5:])
    want = np.stack([reference_best_ious(s, g, ev.thresholds, multi) for s, g in zip(maps, gts, strict=True)])
    assert ev.best_ious.shape == (12, 100)
    assert np.array_equal(ev.best_ious, want)


def test_box_evaluator_numbers_and_thresholds_chosen_elsewhere():
    s = np.zeros((2, 10, 10))
    s[0, 2:6, 2:6] = np.linspace(0.3, 1.0, 16).reshape(4, 4)
    s[1, 5:9, 1:9] = 0.6
    gt = [np.array([[2, 2, 6, 6]]), np.array([[1, 5, 9, 9]])]
    ev = common.BoxEvaluator(0.1)
    ev.accumulate(s, gt, top1_correct=np.array([True, False]), top5_correct=np.array([True, True]))
    res = ev.compute()
    iou = ev.best_ious
    for d in (30, 50, 70):
        assert res[f"MaxBoxAcc@{d}"] == pytest.approx(100 * (iou >= d / 100).mean(0).max())
    assert res["MaxBoxAccV2"] == pytest.approx(np.mean([res[f"MaxBoxAcc@{d}"] for d in (30, 50, 70)]))
    assert res["GT-known Loc"] == res["MaxBoxAcc@50"]
    assert res["Top-1 Loc"] == pytest.approx(100 * ((iou >= 0.5) & [[True], [False]]).mean(0).max())
    assert res["thresholds"]["GT-known Loc"] == pytest.approx(ev.thresholds[(iou >= 0.5).mean(0).argmax()])
    # scored at thresholds chosen on another split: exactly the accuracy at that tau, not the maximum
    at = {k: 0.9 for k in res["thresholds"]}
    fixed = ev.compute(at=at)
    k = 9  # np.arange(0, 1, 0.1)[9] = 0.9
    assert fixed["GT-known Loc@val-τ"] == pytest.approx(100 * (iou[:, k] >= 0.5).mean())
    assert fixed["BoxAcc@70@val-τ"] == pytest.approx(100 * (iou[:, k] >= 0.7).mean())
    at_tau = [100 * (iou[:, k] >= d / 100).mean() for d in (30, 50, 70)]
    assert fixed["BoxAccV2@val-τ"] == pytest.approx(np.mean(at_tau))
    with pytest.raises(ValueError):
        ev.compute(at={"GT-known Loc": 0.05})


def test_flat_and_empty_maps_give_the_origin_box():
    ev = common.BoxEvaluator(0.25)
    flat = common.normalize_scoremap(np.full((8, 8), 3.0))
    ev.accumulate(flat, [np.array([[0, 0, 1, 1]])])
    assert ev.best_ious.tolist() == [[0.25] * 4]  # (0, 0, 0, 0) vs a 2 x 2 box at the origin
    with pytest.raises(ValueError):
        ev.accumulate(np.full((1, 4, 4), np.nan), [np.array([[0, 0, 1, 1]])])


# %% PxAP
def independent_pxap(scores_fg: np.ndarray, scores_bg: np.ndarray, interval: float) -> tuple[float, float]:
    """Straight from the definition: thresholds 2, 1, then the grid from the top; score >= threshold is positive."""
    levels = [2.0, 1.0] + list(np.arange(0, 1, interval)[::-1])
    tp = np.array([(scores_fg >= t).sum() for t in levels])
    fp = np.array([(scores_bg >= t).sum() for t in levels])
    ap = sum(tp[j] / (tp[j] + fp[j]) * (tp[j] - tp[j - 1]) / len(scores_fg)
             for j in range(1, len(levels)) if tp[j] + fp[j])
    return 100 * ap, 100 * max(tp / (fp + len(scores_fg)))


def test_pxap_hand_computed():
    ev = common.MaskEvaluator(0.5)  # thresholds 0, 0.5 -> bins [0, .5), [.5, 1), [1, 2), [2, 3]
    scores = np.array([[0.9, 0.7, 0.2, 0.6, 0.1, 0.05, 1.0]])
    labels = np.array([[1, 1, 1, 0, 0, 0, 255]])  # the 1.0 pixel is ignored
    ev.accumulate(scores[None], labels[None])
    # from the top: >= 0.5 -> tp 2, fp 1 (P 2/3, R 2/3); >= 0 -> tp 3, fp 3 (P 1/2, R 1)
    res = ev.compute()
    assert res["PxAP"] == pytest.approx(100 * (2 / 3 * 2 / 3 + 1 / 2 * 1 / 3))
    assert res["pIoU"] == pytest.approx(100 * max(2 / (1 + 3), 3 / (3 + 3)))
    with pytest.raises(RuntimeError):
        empty = common.MaskEvaluator()
        empty.accumulate(np.ones((1, 2, 2)), np.zeros((1, 2, 2), np.uint8))
        empty.compute()


@pytest.mark.parametrize("interval", [0.01, 0.001])
def test_pxap_matches_an_independent_implementation(interval):
    rng = np.random.default_rng(2)
    maps = np.round(rng.random((3, 20, 20)), 3)  # many scores exactly on grid values
    maps[0, 0, :3] = 1.0
    labels = (rng.random((3, 20, 20)) > 0.6).astype(np.uint8)
    ignore = rng.random((3, 20, 20)) > 0.9
    ev = common.MaskEvaluator(interval)
    ev.accumulate(maps, labels, ignore)
    fg = labels == 1
    bg = ~fg & ~ignore
    res = ev.compute()
    assert (res["PxAP"], res["pIoU"]) == pytest.approx(independent_pxap(maps[fg], maps[bg], interval), abs=1e-9)


# %% the repos' own protocols
def single_class_call(protocol, threshold, lowres, gt_box, correct=True, size=16):
    """One image, two classes; GT class 0, predicted class 0 (correct) or 1."""
    ev = common.RepoProtocolEvaluator(protocol, threshold, size)
    maps = torch.stack([lowres, torch.zeros_like(lowres)])[None]  # (1, 2, h, w)
    logits = torch.tensor([[1.0, 0.0]] if correct else [[0.0, 1.0]])
    ev.accumulate(maps, logits, torch.tensor([0]), [np.array([gt_box])])
    return ev.compute()


def test_tscam_protocol_strict_top1_but_not_strict_gt_known():
    block = torch.zeros(16, 16, dtype=torch.float64)
    block[0:4, 0:4] = 1.0  # box (0, 0, 4, 4), unclipped x + w: 25 pixels with the +1 convention
    res = single_class_call("tscam", 0.1, block, [0, 0, 4, 9])  # GT of 50: IoU exactly 0.5
    assert res["tscam-repo/GT-known Loc"] == 100 and res["tscam-repo/Top-1 Loc"] == 0
    assert res["tscam-repo/Top-5 Loc"] == 0 and res["tscam-repo/Cls@1"] == 100
    sat = single_class_call("sat", 0.5, block, [0, 0, 4, 9])  # same box, but >= 0.5 counts
    assert sat["sat-repo/Top-1 Loc"] == 100 and sat["sat-repo/GT-known Loc"] == 100
    flat = single_class_call("tscam", 0.1, torch.ones(16, 16), [0, 0, 1, 1])  # flat: zeros, box (0, 0, 1, 1)
    assert flat["tscam-repo/GT-known Loc"] == 100


def test_sat_counts_pixels_where_tscam_measures_contour_area():
    s = torch.zeros(16, 16, dtype=torch.float64)
    s[1, 0:12] = 1.0  # a line: 12 pixels, contour area 0
    s[5:8, 5:8] = 1.0  # a 3 x 3 square: 9 pixels, contour area 4
    line, square = [0, 1, 12, 2], [5, 5, 8, 8]  # (x, y, x + w, y + h) of each
    for gt in (line, square):
        tscam = single_class_call("tscam", 0.1, s, gt)["tscam-repo/GT-known Loc"]
        sat = single_class_call("sat", 0.5, s, gt)["sat-repo/GT-known Loc"]
        assert (tscam, sat) == ((0, 100) if gt == line else (100, 0))
    # ties: SAT keeps the first component in raster order; nothing above the threshold: the whole image
    two = torch.zeros(16, 16, dtype=torch.float64)
    two[1:3, 10:12] = two[8:10, 2:4] = 1.0
    assert single_class_call("bas", 0.5, two, [10, 1, 12, 3])["bas-repo/GT-known Loc"] == 100
    assert single_class_call("sat", 0.99999, torch.rand(4, 4), [0, 0, 15, 15])["sat-repo/GT-known Loc"] == 100


def test_scm_gt_known_uses_the_predicted_class_map():
    good = torch.zeros(16, 16, dtype=torch.float64)
    good[4:10, 4:10] = 1.0
    ev = common.RepoProtocolEvaluator("scm", None, 16)
    maps = torch.stack([good, good.flip(0).flip(1)])[None]  # class 1's map points elsewhere
    ev.accumulate(maps, torch.tensor([[0.0, 1.0]]), torch.tensor([0]), [np.array([[4, 4, 10, 10]])])
    res = ev.compute()
    assert res["scm-repo/GT-known Loc"] == 0 and res["scm-repo/Top-5 Loc"] == 100 and res["scm-repo/Top-1 Loc"] == 0
    assert 0 <= res["scm-repo/threshold Top-5 Loc"] < 1


def test_scm_protocol_reports_every_iou_and_top5():
    """SCM's evaluator (tscam_scm §3.5): det and loc at IoU 30 / 50 / 70 for top-1 and top-5, GT-known top-5 from
    any top-5 class's map."""
    good = torch.zeros(16, 16, dtype=torch.float64)
    good[4:10, 4:10] = 1.0  # box (4, 4, 10, 10): 49 px with +1
    ev = common.RepoProtocolEvaluator("scm", None, 16)
    far = torch.zeros(16, 16, dtype=torch.float64)
    far[12:16, 0:3] = 1.0  # box (0, 12, 3, 15): no overlap with the GT
    maps = torch.stack([good, far])[None]  # the predicted class 1's map points elsewhere
    gt = np.array([[4, 4, 12, 10]])  # 63 px, contains class 0's box: IoU 49 / 63 = 0.78
    ev.accumulate(maps, torch.tensor([[0.0, 1.0]]), torch.tensor([0]), [gt])
    res = {k.removeprefix("scm-repo/"): v for k, v in ev.compute().items()}
    assert res["MaxBoxAcc@30 top-1"] == res["GT-known Loc"] == res["MaxBoxAcc@70 top-1"] == 0  # rank 1: wrong map
    assert res["MaxBoxAcc@30 top-5"] == res["GT-known Loc top-5"] == res["MaxBoxAcc@70 top-5"] == 100  # rank 2
    assert res["Top-5 Loc@30"] == res["Top-5 Loc"] == res["Top-5 Loc@70"] == 100
    assert res["Top-1 Loc@30"] == res["Top-1 Loc"] == res["Top-1 Loc@70"] == 0 and res["Cls@5"] == 100
    assert all(0 <= res[f"threshold {k}"] < 1 for k in ("MaxBoxAcc@70 top-5", "Top-5 Loc@30", "GT-known Loc top-5"))


@pytest.mark.parametrize("protocol, threshold", [("tscam", 0.1), ("scm", None)])
def test_repo_boxes_reach_only_the_repo_protocol(protocol, threshold):
    """LocalizationMeter.update(..., repo_boxes): the repo protocol scores those boxes (its own GT rule), every
    wsolevaluation number stays what gt_boxes give."""
    block = torch.zeros(2, 16, 16, dtype=torch.float64)
    block[:, 2:10, 2:10] = 1.0  # box (2, 2, 10, 10) at every threshold
    maps, logits, labels = block[:, None].repeat(1, 2, 1, 1), torch.tensor([[1.0, 0.0]] * 2), torch.tensor([0, 0])
    gt, repo = [torch.tensor([[2, 2, 9, 9]])] * 2, [torch.tensor([[2, 2, 15, 15]])] * 2  # IoU 64 / 81, 81 / 196
    results = []
    for repo_boxes in (None, repo):
        meter = common.LocalizationMeter(16, protocol, threshold, cam_curve_interval=0.01)
        meter.update(maps[:, 0], maps, logits, labels, gt, repo_boxes=repo_boxes)
        results.append(meter.compute())
    plain, with_repo = results
    wsol = [k for k in plain if "-repo/" not in k]
    assert wsol and all(plain[k] == with_repo[k] for k in wsol)
    assert plain["GT-known Loc"] == 100 and plain[f"{protocol}-repo/GT-known Loc"] == 100
    assert with_repo[f"{protocol}-repo/GT-known Loc"] == 0  # IoU of (2, 2, 10, 10) with (2, 2, 15, 15): 81 / 196

# %% the meter the method files call
def test_localization_meter_keys_thresholds_and_examples():
    torch.manual_seed(0)
    meter = common.LocalizationMeter(32, "tscam", 0.1, cam_curve_interval=0.01, has_masks=True)
    for _ in range(2):
        maps = torch.rand(5, 3, 4, 4)
        labels = torch.randint(0, 3, (5,))
        masks = torch.zeros(5, 32, 32, dtype=torch.uint8)
        masks[:, 8:20, 8:24] = 1
        masks[:, 0, :] = 255
        meter.update(maps[torch.arange(5), labels], maps, torch.randn(5, 3), labels,
                     [torch.tensor([[8, 8, 23, 19]])] * 5, masks)
    val = meter.compute()
    for key in ("MaxBoxAccV2", "MaxBoxAcc@30", "MaxBoxAcc@50", "MaxBoxAcc@70", "GT-known Loc", "Top-1 Loc",
                "Top-5 Loc", "Cls@1", "Cls@5", "PxAP", "pIoU", "tscam-repo/Top-1 Loc", "tscam-repo/GT-known Loc"):
        assert 0 <= val[key] <= 100, key
    test = meter.compute(at=val["thresholds"])
    assert "GT-known Loc@val-τ" in test and "BoxAccV2@val-τ" in test and "Top-1 Loc@val-τ" in test
    report = common.format_report(test, "test")
    assert "wsolevaluation" in report and "TS-CAM repo protocol" in report and "[test]" in report
    examples = meter.examples()
    assert [e[0] for e in examples] == list(range(8))
    index, scoremap, boxes = examples[3]
    assert scoremap.shape == (32, 32) and boxes.shape[1] == 4
    assert boxes.tolist() == common.scoremap_boxes(scoremap, val["thresholds"]["GT-known Loc"]).tolist()


def test_gt_boxes_rescale_like_wsolevaluation():
    """§2.1 official check: box (1, 2, 4, 3) of a 10 (w) x 20 (h) image in a 35 x 10 frame is (3, 1, 14, 1)."""
    data = pytest.importorskip("data")
    assert data.rescale_boxes(np.array([[1, 2, 4, 3]]), (10, 20), (35, 10)).tolist() == [[3, 1, 14, 1]]


def test_save_overlay_draws_both_panels_and_boxes_where_they_are(tmp_path):
    from PIL import Image

    image = np.zeros((64, 64, 3), np.uint8)
    scoremap = np.zeros((64, 64))
    path = tmp_path / "o.png"
    common.save_overlay(image, scoremap, np.array([[10, 20, 29, 39]]), np.array([[0, 0, 63, 63]]), path)
    out = np.asarray(Image.open(path))
    assert out.shape == (256, 512, 3)  # image | heat map, each 64 px shown 4x
    s = 4
    for dx in (0, 64):  # GT box (inclusive 10..29, 20..39) drawn green on both panels, on its outer pixels
        assert (out[20 * s, (10 + dx) * s] == (0, 255, 0)).all()  # top-left corner
        assert (out[40 * s - 1, (30 + dx) * s - 1] == (0, 255, 0)).all()  # bottom-right corner
        assert (out[0, dx * s + 100] == (255, 0, 0)).all()  # the whole-image prediction in red along the top row
    assert not (out[30 * s, 20 * s] == (0, 255, 0)).all()  # the box is an outline, not filled
    assert (out[30 * s, 20 * s] == 0).all()  # the left panel is the image itself (black)
    common.save_overlay(image, scoremap, np.zeros((0, 4)), np.zeros((0, 4)), path, scale=1)
    assert np.asarray(Image.open(path)).shape == (64, 128, 3)


def test_parse_args_keeps_none_where_it_is_a_value():
    import dawsol
    import tscam

    args = common.parse_args(tscam.Args, ["--pretrained", "none", "--lr", "none", "--data", "cub"])
    common.apply_preset(args, tscam.PRESETS)
    assert args.pretrained == "none" and args.lr == 5e-5  # from scratch on CUB; the word none = CUB's preset lr
    args = common.parse_args(dawsol.Args, ["--neck", "none", "--optimizer", "none"])
    assert args.neck == "none" and args.optimizer is None  # "none" is a neck; an optimizer falls back to the preset
