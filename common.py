"""Shared pieces of nanoWSOL: the WSOL metrics, exactly as wsolevaluation defines them, and small utilities.

Metrics  clovaai/wsolevaluation (Choe et al., CVPR 2020 / TPAMI): MaxBoxAcc, MaxBoxAccV2, GT-known / Top-1 / Top-5 Loc,
         PxAP, re-implemented without OpenCV (see ../shared/specs/metrics_data.md for every convention and its source).
Repos    the method repos' own fixed-threshold protocols, as a second, labelled report (spec §5).
Utils    seeding, device choice, atomic checkpoints and result files, the Args -> argparse helper and its checks,
         progress lines, overlay pictures, torchrun (DDP) helpers, and Run: the start / epoch / finish bookkeeping
         every method's main() shares.
Boxes are inclusive (x0, y0, x1, y1) pixels of the score map's frame everywhere.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import os
import random
import signal
import sys
import tempfile
import threading
import time
import types
import typing
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image, ImageDraw

# %% 1. Metrics: wsolevaluation (score maps, boxes, MaxBoxAccV2, PxAP)
# Spec: ../shared/specs/metrics_data.md (§ numbers below). Shapes: B maps, H x W map, K GT boxes, T thresholds,
# P candidate boxes, R regions, N tree nodes. A "cut" t is an integer: foreground = {q > t}, q = trunc(255 s).

_CUTS = 255  # cuts 0..254 can have foreground: t = trunc(tau * max q) <= 254 because tau < 1 (§2.3)
_INDEX = (1 << 32) - 1  # the low 32 bits of an order key hold the flat pixel index
_IDENTITY = {np.maximum: np.iinfo(np.int64).min, np.add: 0}
_DENSE_REGIONS = 512  # up to this many regions, _LevelTree finds the strongest contacts in an R x R table


def _numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


@functools.lru_cache(maxsize=8)
def _arange(n: int, step: int = 1) -> np.ndarray:
    """0, step, .. (n - 1) * step (int64), cached: flat pixel indices of the map sizes in use."""
    out = np.arange(0, n * step, step)
    out.flags.writeable = False
    return out


def normalize_scoremap(cam) -> np.ndarray:
    """Min-max to [0, 1] per map; a map with a NaN, or a flat one, becomes zeros (§1.1). (..., h, w) -> float64."""
    cam = _numpy(cam).astype(np.float64)
    flat = cam.reshape(-1, cam.shape[-2] * cam.shape[-1])  # (B, h*w)
    lo, hi = flat.min(1, keepdims=True), flat.max(1, keepdims=True)
    bad = np.isnan(flat).any(1, keepdims=True) | (hi == lo)
    out = np.where(bad, 0.0, (flat - lo) / np.where(bad, 1.0, hi - lo))
    return out.reshape(cam.shape)


def resize_scoremap(cam, size: int | tuple[int, int]) -> np.ndarray:
    """wsolevaluation's map: float64 bicubic upsampling (torch's = OpenCV INTER_CUBIC to ~1e-15 for integer factors),
    then normalize_scoremap (§1.1). (h, w) or (B, h, w), numpy or torch -> (S, S) or (B, S, S) float64 numpy."""
    cam = torch.as_tensor(_numpy(cam), dtype=torch.float64)
    size = (size, size) if isinstance(size, int) else tuple(size)
    up = torch.nn.functional.interpolate(cam.reshape(-1, 1, *cam.shape[-2:]), size=size, mode="bicubic",
                                         align_corners=False)  # (B, 1, S, S)
    return normalize_scoremap(up.reshape(*cam.shape[:-2], *size))


def resize_mask_nearest(mask: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """OpenCV INTER_NEAREST (§4.1): source index min(floor(d * (1 / (D / S))), S - 1) in float64. size = (H, W)."""
    mask = _numpy(mask)
    (oh, ow), (h, w) = (size, size) if isinstance(size, int) else size, mask.shape[:2]
    rows = np.minimum(np.floor(np.arange(oh) * (1.0 / (oh / h))).astype(np.int64), h - 1)
    cols = np.minimum(np.floor(np.arange(ow) * (1.0 / (ow / w))).astype(np.int64), w - 1)
    return mask[rows[:, None], cols]


def check_scoremaps(scoremaps) -> np.ndarray:
    """(H, W) or (B, H, W) -> (B, H, W) float64, after wsolevaluation's validity check (§1.1 step 5)."""
    s = np.ascontiguousarray(_numpy(scoremaps), dtype=np.float64)
    s = s[None] if s.ndim == 2 else s
    if s.ndim != 3 or not (s.min() >= 0 and s.max() <= 1):  # a NaN fails both comparisons
        raise ValueError(f"score maps must be (B, H, W) in [0, 1] without NaN; got shape {s.shape}")
    return s


def threshold_grid(cam_curve_interval: float) -> np.ndarray:
    """tau_k = np.arange(0, 1, Delta) in float64: includes 0, excludes 1 (§2.3)."""
    return np.arange(0, 1, cam_curve_interval)


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Inclusive (+1) IoU of broadcast box arrays (..., 4) -> (...); integer arithmetic, one division (§2.5)."""
    iw = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]) + 1, 0, None)
    ih = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]) + 1, 0, None)
    area_a, area_b = (a[..., 2] - a[..., 0] + 1) * (a[..., 3] - a[..., 1] + 1), (b[..., 2] - b[..., 0] + 1) * (
        b[..., 3] - b[..., 1] + 1)
    union = area_a + area_b - iw * ih
    return np.where(union > 0, iw * ih / np.maximum(union, 1), 0.0)


def box_iou(boxes_a, boxes_b) -> np.ndarray:
    """(A, 4) x (B, 4) inclusive boxes -> (A, B) IoU. Check: IoU((1,2,5,6), (3,1,4,5)) = 8/27."""
    return _iou(_numpy(boxes_a).astype(np.int64)[:, None], _numpy(boxes_b).astype(np.int64)[None])


class _LevelTree:
    """The connected components of {v > t} for every cut t at once, for a stack v (B, H, W) of uint8 levels (§3.5).

    They nest as t rises, so they form a tree, built in three vectorised steps and one short loop:
    1. Regions. Each pixel climbs to its neighbour with the largest key (_order_key: ordered like v, all different)
       until it reaches a local maximum. The pixels of a region that have v > t stay connected for every t (a climb
       never goes down), so no cut splits a region. To climb fast, rows are cut into unimodal pieces (a piece starts
       at each row-local minimum); only piece tops point to a neighbour, and the pointers are jumped (doubling)
       until they reach the regions' maxima.
    2. Touching regions a, b are connected for t < w(a, b) = max over touching pixel pairs of min(v_p, v_q).
    3. Kruskal in decreasing w: leaves are the R regions, node R + m is made by merge m. Node n is a component for
       lo[n] <= t < hi[n] (hi: its merge weight, or a leaf's peak; lo: its parent's merge weight, 0 at a root).
    With `outside`, the padded frame around each image is one more region (always present, every border pixel
    touches it); nodes holding it have image -1. Leaves are kept in depth-first order, so each node covers the
    leaves leaves[span[n, 0]:span[n, 1]].
    """

    def __init__(self, v: np.ndarray, key: np.ndarray, conn8: bool, outside: bool = False):
        B, H, W = v.shape
        n = v.size
        kf, vf = key.ravel(), v.ravel()
        # 1. pieces, their tops, one pointer per top, pointer jumping
        rising = key[:, :, 1:] > key[:, :, :-1]  # (B, H, W-1)
        start = np.zeros((B, H, W), bool)
        start[:, :, 0] = True
        start[:, :, 1:-1] = rising[:, :, 1:] > rising[:, :, :-1]  # rising after falling: a row-local minimum
        starts = np.flatnonzero(start)  # (P,)
        piece = np.cumsum(start.ravel(), dtype=np.int32) - 1  # (n,) piece of each pixel
        top = np.maximum.reduceat(kf, starts) & _INDEX  # (P,) flat index of each piece's largest pixel
        ty, tx = top // W % H, top % W
        steps = np.array([(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if conn8 or dy * dx == 0])  # (S, 2)
        inside = (ty + steps[:, :1] >= 0) & (ty + steps[:, :1] < H) & (tx + steps[:, 1:] >= 0) & (tx + steps[:, 1:] < W)
        nbr = np.where(inside, top + steps[:, :1] * W + steps[:, 1:], top)  # (S, P) neighbours (or the top itself)
        pointer = piece[np.where(inside, kf[nbr], -1).max(0) & _INDEX].astype(np.int64)  # (P,) its piece
        if outside:  # a top on the border may step into the frame, piece P
            pointer[(ty == 0) | (ty == H - 1) | (tx == 0) | (tx == W - 1)] = len(starts)
            pointer = np.append(pointer, len(starts))
        while not np.array_equal(jumped := pointer[pointer], pointer):
            pointer = jumped
        roots = np.flatnonzero(pointer == np.arange(len(pointer)))  # (R,) pieces holding a local maximum
        R = len(roots)
        region = np.empty(len(pointer), np.int32)
        region[roots] = np.arange(R)
        region = region[pointer]  # (P or P+1,) region of each piece
        label = region[piece]  # (n,)
        # 2. touching pixels in different regions (side by side only across a piece start), strongest per pair
        ia, ib = [starts[starts % W != 0] - 1], [starts[starts % W != 0]]
        for offset, bad_x in [(W, -1), (W + 1, W - 1), (W - 1, 0)][: 3 if conn8 else 1]:
            if 0 < offset < n:
                i = np.flatnonzero(label[:-offset] != label[offset:])
                i = i[(i // W % H != H - 1) & (i % W != bad_x)]  # not across the last row or a row's end
                ia.append(i)
                ib.append(i + offset)
        ia, ib = np.concatenate(ia), np.concatenate(ib)
        la, lb, w = label[ia], label[ib], np.minimum(vf[ia], vf[ib])
        if outside:
            border = np.zeros((B, H, W), bool)
            border[:, [0, -1]] = border[:, :, [0, -1]] = True
            ib = np.flatnonzero(border)
            la, lb, w = np.append(la, label[ib]), np.append(lb, np.full(len(ib), region[-1])), np.append(w, vf[ib])
        keep = (la != lb) & (w > 0)
        pair, w = np.minimum(la, lb)[keep].astype(np.int64) * R + np.maximum(la, lb)[keep], w[keep]
        if R <= _DENSE_REGIONS:  # the strongest contact per region pair: a dense R x R table beats sorting
            strongest = np.zeros(R * R, np.uint8)
            np.maximum.at(strongest, pair, w)
            code = np.flatnonzero(strongest) * 256 + strongest[strongest > 0]
        else:
            code = np.sort(pair * 256 + w)
            code = code[np.append(code[1:] // 256 != code[:-1] // 256, True)[: len(code)]]  # max w per pair
        code = code[np.argsort(-(code % 256), kind="stable")]
        # 3. Kruskal; each union-find root keeps its leaves as a linked list (first .. last, `after`)
        peak = np.append(top, n)[roots]  # (R,) each region's largest pixel; n for the frame
        uf, node, first, last, after = list(range(R)), list(range(R)), list(range(R)), list(range(R)), [-1] * R
        image = np.where(peak < n, peak // (H * W), -1).tolist()
        merges, spans = [], [(r, r) for r in range(R)]
        for c in code.tolist():
            a, b = divmod(c // 256, R)
            while uf[a] != a:
                uf[a] = a = uf[uf[a]]
            while uf[b] != b:
                uf[b] = b = uf[uf[b]]
            if a != b:
                merges.append((node[a], node[b], c % 256))
                image.append(min(image[node[a]], image[node[b]]))
                after[last[a]], last[a], uf[b], node[a] = first[b], last[b], a, R + len(merges) - 1
                spans.append((first[a], last[a]))
        leaves = []
        for leaf in (first[r] for r in range(R) if uf[r] == r):
            while leaf >= 0:
                leaves.append(leaf)
                leaf = after[leaf]
        position = np.empty(R, np.int64)
        position[leaves] = np.arange(R)
        merges = np.array(merges, np.int64).reshape(-1, 3)
        self.R, self.N, self.shape = R, R + len(merges), (B, H, W)
        self.children, self.image, self.leaves = merges[:, :2], np.array(image), np.array(leaves)
        self.span = position[np.array(spans)] + [0, 1]  # (N, 2)
        self.hi = np.concatenate([np.append(vf, 256)[peak], merges[:, 2]]).astype(np.int64)
        self.lo = np.zeros(self.N, np.int64)
        self.lo[merges[:, :2]] = merges[:, 2:]
        self.label, self.v, self.piece = label, vf, (region[: len(starts)], vf[top], top // W % H)

    def table(self, items: list[tuple[np.ndarray, np.ndarray]], op=np.maximum) -> np.ndarray:
        """Leaf table (C, 257 * R): channel c at column (255 - t) * R + r = op (max or add) of values_c over the items
        of region r whose level is > t, from items [(index, values_c)] with index = level * R + region (`index`)."""
        tab = np.full((len(items), 257, self.R), _IDENTITY[op], np.int64)
        for channel, (index, values) in zip(tab, items, strict=True):
            op.at(channel.reshape(-1), index, values)
        return op.accumulate(tab[:, ::-1], axis=1).reshape(len(items), -1)  # block k: levels 256 - k .. 256

    def index(self, level: np.ndarray, label: np.ndarray) -> np.ndarray:
        return np.multiply(level, self.R, dtype=np.int64) + label

    def pairs(self, nodes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(node, t) for each cut t at which each of `nodes` is a component."""
        count = np.maximum(self.hi[nodes] - self.lo[nodes], 0)
        node = np.repeat(nodes, count)
        return node, np.arange(len(node)) - np.repeat(np.cumsum(count) - count, count) + self.lo[node]

    def at(self, table: np.ndarray, node: np.ndarray, t: np.ndarray, op=np.maximum) -> np.ndarray:
        """Leaf table -> (P, C): for each (node, t) pair, op over the node's leaves."""
        if len(node) == 0:
            return np.zeros((0, len(table)), np.int64)
        count = self.span[node, 1] - self.span[node, 0]
        offset = np.cumsum(count) - count
        leaf = self.leaves[np.repeat(self.span[node, 0] - offset, count) + np.arange(count.sum())]
        return op.reduceat(table.take((255 - np.repeat(t, count)) * self.R + leaf, axis=1), offset, axis=1).T

    def boxes(self, node: np.ndarray, t: np.ndarray) -> np.ndarray:
        """(P, 4) inclusive bounding box of the node's pixels with v > t. A region has a pixel above t in column x
        iff its largest v there is > t, and in a row iff one of its pieces there (one row each) has its top > t."""
        W = self.shape[2]
        column_top = np.zeros((self.R, W), np.uint8)  # (R, W) a region's largest v in each column (0: none)
        np.maximum.at(column_top.reshape(-1), (np.multiply(self.label.reshape(-1, W), W, dtype=np.int64)
                                               + np.arange(W)).reshape(-1), self.v)
        present = np.flatnonzero(column_top)
        columns, x = self.index(column_top.reshape(-1)[present], present // W), present % W
        rows, y = self.index(*self.piece[1::-1]), self.piece[2]
        table = self.table([(columns, -x), (rows, -y), (columns, x), (rows, y)])  # max of -x is -min x
        return self.at(table, node, t) * [-1, -1, 1, 1]


def _contours(q: np.ndarray, fine: np.ndarray, multi_contour: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """OpenCV's findContours(RETR_TREE) on {q > t} for every cut t, as pixel bounding boxes of the contours (§3).

    q (B, H, W) uint8. Returns boxes (P, 4) inclusive, image (P,), cut (P,); cuts without foreground have no entry.
    multi_contour: every 8-connected component (§3.1) and every hole, a 4-connected background component away from
    the border, whose contour runs through the pixels around it: its box grown by 1 (§3.2). Otherwise one box per
    cut: the top-level component with the largest contour area, ties to the last in raster order (§3.3-3.4).
    """
    B, H, W = q.shape
    key = _order_key(q, fine)
    hole_key = _HOLE_KEY - key + _arange(q.size, 2).reshape(q.shape)  # = _order_key(255 - q, _FINE - fine)
    holes = _LevelTree(255 - q, hole_key, conn8=False, outside=True)  # {255 - q > 254 - t} = {q <= t}
    if multi_contour:
        comps = _LevelTree(q, key, conn8=True)
        node, cut = comps.pairs(np.arange(comps.N))
        hole_node, dual_cut = holes.pairs(np.flatnonzero(holes.image >= 0))  # nodes without the frame
        hole_boxes = holes.boxes(hole_node, dual_cut) + [-1, -1, 1, 1]
        return (np.concatenate([comps.boxes(node, cut), hole_boxes]),
                np.concatenate([comps.image[node], holes.image[hole_node]]), np.concatenate([cut, 254 - dual_cut]))
    # Single contour (§3.4): Fbar_t = pixels not in the frame's background component = {esc > t}, where esc is the cut
    # from which a pixel lies in that component: max(q, the cut at which its background region joins the frame).
    joins = np.zeros(holes.N, np.int64)  # dual weight at which the node's leaves join the frame (0: never)
    for n, (a, b) in reversed(list(enumerate(holes.children.tolist(), holes.R))):
        for c in (a, b):
            joins[c] = holes.hi[n] if holes.image[n] < 0 <= holes.image[c] else joins[n]
    escape = np.where(holes.image[: holes.R] < 0, 0, 255 - joins[: holes.R])  # (R,) the frame region joins at 0
    esc = np.maximum(q.ravel(), escape[holes.label]).astype(np.uint8).reshape(B, H, W)
    filled = _LevelTree(esc, _order_key(esc, fine), conn8=True)  # components: top-level ones with their holes
    # contour area = #2x2 windows inside Fbar + #windows with 3 pixels inside / 2 (§3.3): with m1 <= m2 the two
    # smallest esc of a window, it counts 1/2 for t < m2 and another 1/2 for t < m1
    a, b, c, d = esc[:, :-1, :-1], esc[:, :-1, 1:], esc[:, 1:, :-1], esc[:, 1:, 1:]  # (B, H-1, W-1) each
    low_ab, high_ab, low_cd, high_cd = np.minimum(a, b), np.maximum(a, b), np.minimum(c, d), np.maximum(c, d)
    m1 = np.minimum(low_ab, low_cd).ravel()
    m2 = np.minimum(np.maximum(low_ab, low_cd), np.minimum(high_ab, high_cd)).ravel()
    # a window's pixel with the largest esc lies in the component the window counts for
    offset = np.where(high_ab >= high_cd, np.where(a >= b, 0, 1), np.where(c >= d, W, W + 1))
    window = (_arange(esc.size).reshape(B, H, W)[:, :-1, :-1] + offset).ravel()
    wlabel = filled.label[window]
    node, cut = filled.pairs(np.arange(filled.N))
    windows = filled.index(np.concatenate([m1, m2]), np.concatenate([wlabel, wlabel]))
    area2 = filled.at(filled.table([(windows, np.ones(len(windows), np.int64))], np.add), node, cut, np.add)[:, 0]
    first = -filled.at(filled.table([(filled.index(filled.v, filled.label), -_arange(esc.size))]), node, cut)[:, 0]
    score = area2 * (esc.size + 1) + first  # largest area, then the latest raster-first pixel
    cell = filled.image[node] * _CUTS + cut
    best = np.full(B * _CUTS, -1)
    np.maximum.at(best, cell, score)
    win = score == best[cell]
    return filled.boxes(node[win], cut[win]), filled.image[node[win]], cut[win]


_FINE = ((1 << 23) - 1) << 32  # key bits 32-54
_HOLE_KEY = (255 << 55) | _FINE


def _order_key(v: np.ndarray, fine: np.ndarray) -> np.ndarray:
    """Distinct int64 keys ordered by (v, fine, flat index): v (<= 255) in bits 55-62, fine in bits 32-54."""
    return (v.astype(np.int64) << 55) | fine | _arange(v.size).reshape(v.shape)


def _fine_order(s: np.ndarray) -> np.ndarray:
    """Key bits 32-54 that order pixels of the same level by s (exponent and leading mantissa bits of s >= 0). Any
    tie-break is correct; one that follows s keeps regions few (a climb follows the map's own slope)."""
    return (np.ascontiguousarray(s, dtype=np.float64).view(np.int64) >> 7) & _FINE


def _wsol_convention(boxes: np.ndarray, H: int, W: int) -> np.ndarray:
    """Contour pixel box -> (x, y, min(x + w, W - 1), min(y + h, H - 1)) (§2.4)."""
    return np.minimum(boxes + [0, 0, 1, 1], [W, H, W - 1, H - 1])


def scoremap_boxes(scoremap, threshold: float, multi_contour: bool = True) -> np.ndarray:
    """wsolevaluation's boxes (K, 4) for one map (H, W) at one threshold tau (§2.2-2.4); (0, 0, 0, 0) if empty."""
    s = check_scoremaps(scoremap)
    q = (s * 255).astype(np.uint8)
    cut = int(np.trunc(threshold * q.max()))
    boxes, _, cuts = _contours(q, _fine_order(s), multi_contour)
    return _wsol_convention(boxes[cuts == cut], *s.shape[1:]) if (cuts == cut).any() else np.zeros((1, 4), np.int64)


def _best_iou_per_cut(s: np.ndarray, q: np.ndarray, gt_boxes: list, multi_contour: bool) -> np.ndarray:
    """(B, H, W) maps and their q, B lists of GT boxes -> (B, 255) best IoU over boxes x GT boxes at each cut (§2.6)."""
    B, H, W = s.shape
    boxes, image, cut = _contours(q, _fine_order(s), multi_contour)
    gt = np.full((B, max(len(g) for g in gt_boxes), 4), -2)  # padding boxes overlap nothing: IoU 0
    for i, g in enumerate(gt_boxes):
        gt[i, : len(g)] = g
    best = np.full((B, _CUTS), -1.0)
    np.maximum.at(best.reshape(-1), image * _CUTS + cut, _iou(_wsol_convention(boxes, H, W)[:, None], gt[image]).max(1))
    empty = _iou(np.zeros(4, np.int64), gt).max(1)  # (B,) IoU of the box (0, 0, 0, 0) of cuts without foreground
    return np.where(best < 0, empty[:, None], best)  # (B, 255)


def _chunks(q: np.ndarray, max_pixels: int = 1 << 18, max_pieces: int = 1 << 13) -> list[slice]:
    """Maps per _contours call: several, to amortise the Python overhead (about 4 CAM-like 224 x 224 maps), but few
    when the maps are rough (many row-local minima: many regions, large tables; one 224 x 224 noise map)."""
    rough = ((q[:, :, 1:-1] < q[:, :, :-2]) & (q[:, :, 1:-1] <= q[:, :, 2:])).sum((1, 2)) + 1  # (B,)
    chunks, start, pieces = [], 0, 0
    for i, r in enumerate(rough.tolist()):
        if i > start and (pieces + r > max_pieces or (i - start + 1) * q[0].size > max_pixels):
            chunks.append(slice(start, i))
            start, pieces = i, 0
        pieces += r
    return chunks + [slice(start, len(q))]


class BoxEvaluator:
    """wsolevaluation's BoxEvaluator (§2.6-2.7) on score maps (B, H, W) in [0, 1] and inclusive GT boxes in the same
    frame: BoxAcc at every threshold of the grid for each IoU threshold, maximised over thresholds separately
    (MaxBoxAcc@d), MaxBoxAccV2 = their mean (multi-contour), GT-known Loc = MaxBoxAcc@50, and, when class flags are
    given, DA-WSOL's Top-1 / Top-5 Loc (the same box test at IoU 0.5 AND the class correct), also maximised on their
    own. V1 (CVPR) is multi_contour_eval=False, iou_thresholds=(50,). compute(at=...) instead reports the accuracy
    at thresholds chosen on another split, so that the reported split is never tuned on."""

    def __init__(self, cam_curve_interval: float = 0.001, iou_thresholds: tuple[int, ...] = (30, 50, 70),
                 multi_contour_eval: bool = True):
        self.thresholds = threshold_grid(cam_curve_interval)  # (T,)
        self.iou_thresholds, self.multi_contour_eval = tuple(iou_thresholds), multi_contour_eval
        self.correct: dict[str, np.ndarray] = {}  # name -> (T,) number of images counted correct at each threshold
        self.flagged = {"Top-1 Loc": 0, "Top-5 Loc": 0}  # images that came with class flags
        self._per_cut, self._max_q = [], []  # (B, 255) best IoU at each cut, (B,) max q: enough for best_ious

    @property
    def num_images(self) -> int:
        return sum(len(m) for m in self._max_q)

    def _cuts(self, max_q: np.ndarray) -> np.ndarray:
        return np.trunc(self.thresholds[None] * max_q[:, None]).astype(np.int64)  # (B, T): trunc(tau * max q)

    def accumulate(self, scoremaps, gt_boxes: list, top1_correct=None, top5_correct=None) -> None:
        s = check_scoremaps(scoremaps)
        gt = [_numpy(g).astype(np.int64).reshape(-1, 4) for g in gt_boxes]
        if len(gt) != len(s) or min(len(g) for g in gt) == 0:
            raise ValueError("need one (K >= 1, 4) array of GT boxes per score map")
        q = (s * 255).astype(np.uint8)  # §2.2
        per_cut = np.concatenate([_best_iou_per_cut(s[c], q[c], gt[c], self.multi_contour_eval) for c in _chunks(q)])
        max_q = q.reshape(len(s), -1).max(1)
        best = np.take_along_axis(per_cut, self._cuts(max_q), 1)  # (B, T) best IoU per image and threshold
        hits = {f"MaxBoxAcc@{d}": best >= d / 100 for d in self.iou_thresholds} | {"GT-known Loc": best >= 0.5}
        for name, flags in (("Top-1 Loc", top1_correct), ("Top-5 Loc", top5_correct)):
            if flags is not None:
                hits[name] = (best >= 0.5) & _numpy(flags).astype(bool)[:, None]
                self.flagged[name] += len(s)
        for name, hit in hits.items():
            self.correct[name] = self.correct.get(name, 0) + hit.sum(0)
        self._per_cut.append(per_cut)
        self._max_q.append(max_q)

    def merge(self, other: BoxEvaluator) -> None:
        """Add another evaluator's images (another rank's shard, which comes after these)."""
        for name, count in other.correct.items():
            self.correct[name] = self.correct.get(name, 0) + count
        for name in self.flagged:
            self.flagged[name] += other.flagged[name]
        self._per_cut += other._per_cut
        self._max_q += other._max_q

    @property
    def best_ious(self) -> np.ndarray:
        """(N, T): per image and threshold, the best IoU over candidate boxes x GT boxes."""
        per_cut, max_q = np.concatenate(self._per_cut), np.concatenate(self._max_q)
        return np.take_along_axis(per_cut, self._cuts(max_q), 1)

    def compute(self, at: dict[str, float] | None = None) -> dict:
        """Accuracies in %, and "thresholds": name -> the tau that maximises it. With `at` (name -> tau, e.g. another
        split's "thresholds"), also "<name>@val-τ" (MaxBoxAcc@d -> BoxAcc@d@val-τ) and BoxAccV2@val-τ."""
        n = self.num_images
        acc = {k: 100 * c / n for k, c in self.correct.items() if k not in self.flagged or self.flagged[k] == n}
        out = {k: float(a.max()) for k, a in acc.items()}
        box_names = [f"MaxBoxAcc@{d}" for d in self.iou_thresholds]
        if self.multi_contour_eval:
            out["MaxBoxAccV2"] = float(np.mean([out[k] for k in box_names]))
        out["thresholds"] = {k: float(self.thresholds[a.argmax()]) for k, a in acc.items()}
        for k, tau in (at or {}).items():
            if k in acc:
                hit = np.flatnonzero(np.abs(self.thresholds - tau) < 1e-9)
                if len(hit) == 0:
                    raise ValueError(f"threshold {tau} of {k!r} is not on this grid (cam_curve_interval differs?)")
                out[f"{k.replace('MaxBoxAcc', 'BoxAcc')}@val-τ"] = float(acc[k][hit[0]])
        at_box = [out.get(f"BoxAcc@{d}@val-τ") for d in self.iou_thresholds]
        if self.multi_contour_eval and None not in at_box:
            out["BoxAccV2@val-τ"] = float(np.mean(at_box))
        return out


class MaskEvaluator:
    """wsolevaluation's MaskEvaluator (§4.1): PxAP, the area under the pixel precision-recall curve over the threshold
    grid, and BAS-Extension's pIoU (best pixel IoU over thresholds). GT: label maps 1 = foreground, 0 = background,
    255 = ignore (or 0/1 masks plus ignore masks; ignore never covers foreground)."""

    def __init__(self, cam_curve_interval: float = 0.001):
        self.edges = np.concatenate([threshold_grid(cam_curve_interval), [1.0, 2.0, 3.0]])  # numpy histogram bins
        self.fg_hist = np.zeros(len(self.edges) - 1, np.int64)
        self.bg_hist = np.zeros(len(self.edges) - 1, np.int64)

    def accumulate(self, scoremaps, gt_masks, ignore_masks=None) -> None:
        s = check_scoremaps(scoremaps)
        gt = _numpy(gt_masks).reshape(s.shape)
        fg = gt == 1
        ignore = gt == 255
        if ignore_masks is not None:
            ignore |= _numpy(ignore_masks).reshape(s.shape).astype(bool)
        bg = ~fg & ~ignore
        for hist, pixels in ((self.fg_hist, s[fg]), (self.bg_hist, s[bg])):  # bins [e_i, e_i+1), as np.histogram
            hist += np.bincount(np.searchsorted(self.edges, pixels, side="right") - 1, minlength=len(hist))

    def merge(self, other: MaskEvaluator) -> None:
        self.fg_hist += other.fg_hist
        self.bg_hist += other.bg_hist

    def compute(self) -> dict[str, float]:
        tp, fp = np.cumsum(self.fg_hist[::-1]), np.cumsum(self.bg_hist[::-1])  # predicted fg at decreasing thresholds
        positives = tp[-1]
        if positives == 0:
            raise RuntimeError("PxAP needs at least one foreground pixel")
        with np.errstate(invalid="ignore", divide="ignore"):
            precision = tp / (tp + fp)  # NaN where nothing is predicted: left out of the sum below
        recall = tp / positives
        pxap = (precision[1:] * np.diff(recall))[(tp + fp)[1:] != 0].sum()
        return {"PxAP": float(100 * pxap), "pIoU": float(100 * (tp / (fp + positives)).max())}


# %% 2. The method repos' own protocols (fixed threshold / test-split sweep), reported separately and labelled
# Spec: metrics_data.md §5, tscam_scm.md §2.4 / §3.5, sat_bas.md A4 / B4. These reproduce the numbers in the papers'
# tables; they are not comparable with wsolevaluation's (fixed or test-swept thresholds, other map processing).

REPO_PROTOCOLS = {
    "tscam": "TS-CAM repo protocol (GT-class map, bilinear + min-max, fixed τ, largest contour, box (x, y, x+w, y+h); "
             "Top-1/Top-5 need IoU > 0.5, GT-known IoU >= 0.5)",
    "scm": "SCM repo protocol (bilinear + min-max, largest contour, τ swept with Δ=0.01 ON THIS SPLIT per metric; "
           "GT-known from the predicted top-1 class's map, top-5 from any top-5 class's map; IoU >= 0.3 / 0.5 / 0.7)",
    "sat": "SAT repo protocol (low-res min-max +1e-5, bilinear, fixed τ on the float map, largest 8-connected "
           "component by pixel count, box (minc, minr, maxc+1, maxr+1); IoU >= 0.5)",
    "bas": "BAS-Extension repo protocol (as SAT's: low-res min-max +1e-5, bilinear, fixed τ, largest component by "
           "pixel count; IoU >= 0.5)",
}


def _bilinear(maps: torch.Tensor, size: int) -> np.ndarray:
    """(B, h, w) -> (B, size, size) float64, = OpenCV INTER_LINEAR to ~1e-15 (§1.1)."""
    return torch.nn.functional.interpolate(maps[:, None].double(), size=(size, size), mode="bilinear",
                                           align_corners=False)[:, 0].numpy()


def _largest_contour_boxes(u: np.ndarray, threshold: float) -> np.ndarray:
    """TS-CAM's get_bboxes (tscam_scm §2.4 step 3) on normalised maps (B, H, W): the largest contour of
    {trunc(255 u) > trunc(tau * max)} -> (B, 4) (x, y, x + w, y + h), not clipped; (0, 0, 1, 1) when empty."""
    q = (u * 255).astype(np.uint8)
    cut = np.trunc(threshold * q.reshape(len(q), -1).max(1)).astype(np.int64)
    foreground = (q > cut[:, None, None]).astype(np.uint8)  # cut 0 of this 0/1 stack is TS-CAM's binary map
    boxes, image, _ = _contours(foreground, _fine_order(u), multi_contour=False)  # (at most one per image)
    out = np.tile(np.array([0, 0, 1, 1]), (len(u), 1))
    out[image] = boxes + [0, 0, 1, 1]
    return out


def _largest_component_boxes(foreground: np.ndarray, fine: np.ndarray) -> np.ndarray:
    """SAT / BAS-Extension (sat_bas A4 step 3): per mask (B, H, W) the 8-connected component with the most pixels,
    ties to the first in raster order (skimage labels) -> (B, 4) (minc, minr, maxc + 1, maxr + 1), not clipped;
    (0, 0, W, H) when nothing is foreground."""
    B, H, W = foreground.shape
    tree = _LevelTree(foreground.astype(np.uint8), _order_key(foreground, fine), conn8=True)
    node, cut = tree.pairs(np.arange(tree.N))
    node, cut = node[cut == 0], cut[cut == 0]  # the components of {foreground > 0}
    pixels = tree.index(tree.v, tree.label)
    count = tree.at(tree.table([(pixels, np.ones(tree.v.size, np.int64))], np.add), node, cut, np.add)[:, 0]
    first = -tree.at(tree.table([(pixels, -np.arange(tree.v.size))]), node, cut)[:, 0]
    score = count * (tree.v.size + 1) - first
    best = np.full(B, np.iinfo(np.int64).min)
    np.maximum.at(best, tree.image[node], score)
    win = score == best[tree.image[node]]
    out = np.tile(np.array([0, 0, W, H]), (B, 1))
    out[tree.image[node[win]]] = tree.boxes(node[win], cut[win]) + [0, 0, 1, 1]
    return out


class RepoProtocolEvaluator:
    """An official repo's own box protocol, as a second, labelled report: keys "<protocol>-repo/<metric>" in %.

    accumulate(lowres_maps, logits, labels, gt_boxes): lowres_maps (B, C, h, w) holds every class's map (class-
    specific methods: the protocol picks the GT class's or the predicted class's) or (B, 1, h, w) one class-agnostic
    map used for every class; logits (B, C); gt_boxes B arrays (K_i, 4) inclusive in the image_size frame.
    NOTE(ours): a flat map becomes zeros where the repos would divide by zero (TS-CAM, SCM).
    """

    def __init__(self, protocol: Literal["tscam", "scm", "sat", "bas"], threshold: float | None, image_size: int):
        if protocol not in REPO_PROTOCOLS:
            raise ValueError(f"unknown repo protocol {protocol!r}: choose from {list(REPO_PROTOCOLS)}")
        if threshold is None and protocol != "scm":
            raise ValueError(f"the {protocol} protocol uses a fixed threshold; pass one")
        self.protocol, self.threshold, self.image_size = protocol, threshold, image_size
        self.counts = dict.fromkeys(("Top-1 Loc", "Top-5 Loc", "GT-known Loc", "Cls@1", "Cls@5"), 0)
        self.num_images = 0
        if protocol == "scm":  # test_cam.count (tscam_scm §3.5): images hit per (kind, IoU) x (top-1, top-5) x tau
            self.sweep_thresholds = threshold_grid(0.01)  # (T,) = np.arange(0, 1, 0.01)
            self.sweep = {(kind, d): np.zeros((2, len(self.sweep_thresholds)), np.int64)
                          for kind in ("det", "loc") for d in SCM_IOUS}

    def accumulate(self, lowres_maps, logits, labels, gt_boxes: list) -> None:
        maps = torch.as_tensor(_numpy(lowres_maps), dtype=torch.float64)  # (B, C or 1, h, w)
        labels = torch.as_tensor(_numpy(labels)).long()
        top5 = torch.as_tensor(_numpy(logits)).topk(min(5, _numpy(logits).shape[1]), 1).indices  # (B, 5)
        cls1, cls5 = (top5[:, 0] == labels).numpy(), (top5 == labels[:, None]).any(1).numpy()
        gt = [_numpy(g).astype(np.int64).reshape(-1, 4) for g in gt_boxes]
        self.counts["Cls@1"] += int(cls1.sum())
        self.counts["Cls@5"] += int(cls5.sum())
        self.num_images += len(labels)
        rows = torch.arange(len(labels))
        gt_map = maps[rows, labels] if maps.shape[1] > 1 else maps[:, 0]  # (B, h, w)
        if self.protocol == "scm":
            self._accumulate_scm(maps, top5, labels, gt)
            return
        if self.protocol == "tscam":
            boxes = _largest_contour_boxes(normalize_scoremap(_bilinear(gt_map, self.image_size)), self.threshold)
        else:
            low = gt_map.flatten(1)
            low = (gt_map - low.min(1).values[:, None, None]) / (low.max(1).values - low.min(1).values + 1e-5)[
                :, None, None]
            u = _bilinear(low, self.image_size)
            boxes = _largest_component_boxes(u > self.threshold, _fine_order(u))
        iou = np.array([box_iou(b[None], g).max() for b, g in zip(boxes, gt, strict=True)])  # (B,)
        box_ok = iou > 0.5 if self.protocol == "tscam" else iou >= 0.5
        self.counts["Top-1 Loc"] += int((box_ok & cls1).sum())
        self.counts["Top-5 Loc"] += int((box_ok & cls5).sum())
        self.counts["GT-known Loc"] += int((iou >= 0.5).sum())

    def merge(self, other: RepoProtocolEvaluator) -> None:
        for name in self.counts:
            self.counts[name] += other.counts[name]
        self.num_images += other.num_images
        for key in getattr(self, "sweep", {}):
            self.sweep[key] = self.sweep[key] + other.sweep[key]

    def _accumulate_scm(self, maps: torch.Tensor, top5: torch.Tensor, labels: torch.Tensor, gt: list) -> None:
        """SCM's count(): the maps of the top-k predicted classes (B, k, h, w), their single-contour boxes at every
        tau; det = IoU >= d, loc = det and that rank's class is the GT; top-5 = any rank (tscam_scm §3.5 step 3)."""
        B, k = top5.shape
        ranked = maps[torch.arange(B)[:, None], top5] if maps.shape[1] > 1 else maps[:, :1].expand(B, k, -1, -1)
        u = normalize_scoremap(_bilinear(ranked.flatten(0, 1), self.image_size))  # (B * k, S, S)
        boxes = BoxEvaluator(0.01, (50,), multi_contour_eval=False)  # wsolevaluation's code, as SCM copied it
        boxes.accumulate(u, [g for g in gt for _ in range(k)])
        best = boxes.best_ious.reshape(B, k, -1)  # (B, k, T) best IoU over GT boxes of each rank's box
        right_class = (top5 == labels[:, None]).numpy()[:, :, None]  # (B, k, 1)
        for d in SCM_IOUS:
            for kind, hit in (("det", best >= d / 100), ("loc", (best >= d / 100) & right_class)):
                self.sweep[kind, d] += np.stack([hit[:, 0].sum(0), hit.any(1).sum(0)])  # (2, T): top-1, top-5

    def compute(self) -> dict[str, float]:
        p, n = f"{self.protocol}-repo", self.num_images
        out = {f"{p}/{k}": 100 * v / n for k, v in self.counts.items()}
        if self.protocol != "scm":
            return out | {f"{p}/threshold": self.threshold}
        for (kind, d), counts in self.sweep.items():  # test_cam.evaluate: each number maximised over tau on its own
            for row, k in enumerate((1, 5)):
                acc = 100 * counts[row] / n  # (T,)
                out[f"{p}/{scm_key(kind, d, k)}"] = float(acc.max())
                out[f"{p}/threshold {scm_key(kind, d, k)}"] = float(self.sweep_thresholds[acc.argmax()])
        return out


SCM_IOUS = (30, 50, 70)  # SCM's iou_threshold_list


def scm_key(kind: str, iou: int, k: int) -> str:
    """Our name of an SCM number: det (official maxbox_acc_thr_{d}_top-{k}; at d = 50 its GT-Known_top-{k}) or loc
    (official loc_acc_thr_{d}_top-{k}; at d = 50 the README's Top-1 / Top-5 Loc)."""
    if kind == "det":
        return ("GT-known Loc" if k == 1 else "GT-known Loc top-5") if iou == 50 else f"MaxBoxAcc@{iou} top-{k}"
    return f"Top-{k} Loc" + ("" if iou == 50 else f"@{iou}")


class LocalizationMeter:
    """Everything a method file's evaluation loop needs, one update per batch; each key names its protocol.

    update(gt_class_maps (B, h, w) raw low-res maps of the GT class, maps (as RepoProtocolEvaluator takes them),
    logits (B, C), labels (B,), gt_boxes (B arrays (K_i, 4)) or None, masks (B, S, S) 0/1/255 or None, repo_boxes
    (B arrays (K_i, 4)) or None: the repo protocol's GT boxes by that repo's own rule (data.repo_boxes_tscam for
    TS-CAM / SCM), which only the repo protocol sees; None: it uses gt_boxes):
    wsolevaluation's protocol on resize_scoremap(gt_class_maps): MaxBoxAccV2, MaxBoxAcc@30/50/70, GT-known Loc,
    DA-WSOL's Top-1 / Top-5 Loc, Cls@1 / Cls@5, PxAP / pIoU; and "<repo>-repo/..." from the repo's own protocol.
    compute(at) -> those numbers, "thresholds" (chosen on this split), and with `at` (another split's "thresholds")
    the "...@val-τ" accuracies. examples() -> (index, normalised map, boxes at the GT-known threshold) of the first
    num_examples images.
    """

    def __init__(self, image_size: int, repo_protocol: str | None, repo_threshold: float | None,
                 cam_curve_interval: float = 0.001, has_masks: bool = False, num_examples: int = 8):
        self.image_size, self.cam_curve_interval, self.num_examples = image_size, cam_curve_interval, num_examples
        self.boxes = BoxEvaluator(cam_curve_interval)
        self.masks = MaskEvaluator(cam_curve_interval) if has_masks else None
        self.repo = RepoProtocolEvaluator(repo_protocol, repo_threshold, image_size) if repo_protocol else None
        self.cls_correct, self.num_images = np.zeros(2, np.int64), 0
        self._examples: list[tuple[int, np.ndarray]] = []
        self._example_classes: list[tuple[int, int]] = []
        self._example_threshold: float | None = None

    def update(self, gt_class_maps, maps, logits, labels, gt_boxes: list | None, masks=None,
               repo_boxes: list | None = None) -> None:
        scoremaps = resize_scoremap(gt_class_maps, self.image_size).reshape(-1, self.image_size, self.image_size)
        labels = torch.as_tensor(_numpy(labels)).long()
        top5 = torch.as_tensor(_numpy(logits)).topk(min(5, _numpy(logits).shape[1]), 1).indices  # (B, 5)
        cls1, cls5 = (top5[:, 0] == labels).numpy(), (top5 == labels[:, None]).any(1).numpy()
        self.cls_correct += [cls1.sum(), cls5.sum()]
        if gt_boxes is not None:
            self.boxes.accumulate(scoremaps, gt_boxes, cls1, cls5)
            if self.repo is not None:
                self.repo.accumulate(maps, logits, labels, gt_boxes if repo_boxes is None else repo_boxes)
        if masks is not None and self.masks is not None:
            self.masks.accumulate(scoremaps, masks)
        for i in range(min(len(scoremaps), self.num_examples - len(self._examples))):
            self._examples.append((self.num_images + i, scoremaps[i]))
            self._example_classes.append((int(labels[i]), int(top5[i, 0])))  # (true, predicted), for overlays
        self.num_images += len(scoremaps)

    def merge(self, other: LocalizationMeter) -> None:
        """Add another rank's shard of the split (it follows these images: its example indices are shifted)."""
        for mine, theirs in ((self.boxes, other.boxes), (self.masks, other.masks), (self.repo, other.repo)):
            if mine is not None:
                mine.merge(theirs)
        self.cls_correct = self.cls_correct + other.cls_correct
        room = self.num_examples - len(self._examples)
        self._examples += [(self.num_images + i, m) for i, m in other._examples[:room]]
        self._example_classes += other._example_classes[:room]
        self.num_images += other.num_images

    def compute(self, at: dict[str, float] | None = None) -> dict:
        if world()[1] > 1 and not getattr(self, "_merged", False):  # torchrun: every rank scored a shard
            first, *rest = gather_objects(self)
            for other in rest:
                first.merge(other)
            self.__dict__.update(first.__dict__)
            self._merged = True
        cls1, cls5 = 100 * self.cls_correct / self.num_images
        out = {"Cls@1": cls1, "Cls@5": cls5, "cam_curve_interval": self.cam_curve_interval}
        if self.boxes.num_images:
            out |= self.boxes.compute(at)
            self._example_threshold = (at or out["thresholds"])["GT-known Loc"]
        if self.masks is not None:
            out |= self.masks.compute()
        if self.repo is not None and self.repo.num_images:
            out |= self.repo.compute()
        return {k: v if isinstance(v, dict) else float(v) for k, v in out.items()}

    def examples(self) -> list[tuple[int, np.ndarray, np.ndarray]]:
        """(image index, (S, S) normalised map, (K, 4) wsolevaluation boxes at the GT-known threshold of the last
        compute(), i.e. the val-chosen one when `at` was given); no boxes when no GT boxes were seen."""
        tau = self._example_threshold
        if tau is None and self.boxes.num_images:
            tau = self.boxes.compute()["thresholds"]["GT-known Loc"]
        return [(i, s, scoremap_boxes(s, tau) if tau is not None else np.zeros((0, 4), np.int64))
                for i, s in self._examples]


def format_report(metrics: dict, split: str, maps: str = "GT-class map") -> str:
    """A few human lines; each says which protocol (and which map: `maps`) its numbers follow."""
    def join(keys, strip: str = "") -> str:
        return " | ".join(f"{k.removeprefix(strip)} {metrics[k]:.2f}" for k in keys if k in metrics)

    delta = metrics.get("cam_curve_interval")
    lines = [(f"wsolevaluation at the τ chosen on val ({maps})", join([k for k in metrics if k.endswith("@val-τ")])),
             (f"wsolevaluation ({maps}, multi-contour boxes, τ swept with Δ={delta} on {split} itself; Top-1/"
              "Top-5 Loc as DA-WSOL: that box test and the class right)",
              join(["MaxBoxAccV2", "MaxBoxAcc@30", "MaxBoxAcc@50", "MaxBoxAcc@70", "GT-known Loc", "Top-1 Loc",
                    "Top-5 Loc", "Cls@1", "Cls@5"])),
             (f"wsolevaluation pixel metrics (Δ={delta})", join(["PxAP", "pIoU"]))]
    for name, description in REPO_PROTOCOLS.items():
        lines.append((description, join([k for k in metrics if k.startswith(f"{name}-repo/")], f"{name}-repo/")))
    return "\n".join(f"[{split}] {head}: {body}" for head, body in lines if body)


def map_label(kind: str, class_agnostic: bool) -> str:
    """How the reports name the map every localization number was scored on."""
    return f"{'class-agnostic' if class_agnostic else 'GT-class'} {kind} map"


def headline(val: dict, test: dict, maps: str = "GT-class map") -> str:
    """One short line of the numbers a paper's table reports: wsolevaluation on test, τ chosen on val (or, with no
    val split, on test itself, and then it says so)."""
    suffix, where = ("@val-τ", "τ from val") if val else ("", "τ chosen ON TEST (no val split)")
    keys = {"GT-known": f"GT-known Loc{suffix}", "MaxBoxAccV2": "BoxAccV2@val-τ" if val else "MaxBoxAccV2",
            "Top-1 Loc": f"Top-1 Loc{suffix}", "PxAP": "PxAP", "Cls@1": "Cls@1"}
    shown = " | ".join(f"{name} {test[k]:.1f}" for name, k in keys.items() if isinstance(test.get(k), float))
    return f"result [test, wsolevaluation, {where}, {maps}]: {shown}"


# %% 3. Utilities: arguments, seeding, device, files, progress, pictures


class _Choices(list):
    """The choices of an `X | None` Literal flag: listed in --help without None, but accepting what `none` parses to."""

    def __contains__(self, item) -> bool:
        return item is None or list.__contains__(self, item)


def _none_or(base):
    """argparse type for `X | None` fields: the word `none` gives None; errors name the base type (`invalid float`)."""
    def convert(s: str):
        return None if s.lower() == "none" else base(s)
    convert.__name__ = base.__name__
    return convert


def _shown(value) -> str:
    return " ".join(map(str, value)) or "()" if isinstance(value, tuple) else str(value)


def parse_args(args_cls: type, argv: list[str] | None = None):
    """Turn a method file's `Args` dataclass into a CLI: one `--flag-name` per field, help text from metadata["help"].

    bool fields become `--flag/--no-flag`, Literal fields get `choices`, `X | None` fields (but strings) accept the
    word `none` for None (= the dataset preset), tuple fields take several values. --help shows each default, or
    for a preset field what each dataset's preset gives. Returns an `args_cls` instance.
    """
    hints = typing.get_type_hints(args_cls)
    module = sys.modules[args_cls.__module__]
    presets = getattr(module, "PRESETS", {})
    parser = argparse.ArgumentParser(description=(module.__doc__ or "").split("\n")[0])
    for f in dataclasses.fields(args_cls):
        if not f.init:
            continue
        kind, optional = hints[f.name], False
        if typing.get_origin(kind) in (typing.Union, types.UnionType):
            inner = [a for a in typing.get_args(kind) if a is not type(None)]
            kind, optional = inner[0], len(inner) < len(typing.get_args(kind))
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        opts: dict = {"default": default, "help": f.metadata.get("help", " ")}
        if default is None and any(f.name in p for p in presets.values()):
            opts["help"] += " (preset: " + ", ".join(f"{d} {_shown(p[f.name])}" for d, p in presets.items()
                                                     if f.name in p) + ")"
        elif default is not None and kind is not bool:
            opts["help"] += f" (default: {_shown(default)})"
        if kind is bool:
            opts["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(kind) is typing.Literal:
            opts["choices"] = list(typing.get_args(kind))
            opts["type"] = type(opts["choices"][0])
        elif typing.get_origin(kind) is tuple:
            opts["nargs"] = "*"
            opts["type"] = typing.get_args(kind)[0]
        else:
            opts["type"] = kind
        # `--lr none` restores "use the dataset preset"; where "none" is itself a value (`--pretrained none`, a
        # Literal listing it) the word is kept
        if optional and "type" in opts and kind is not str and "none" not in opts.get("choices", ()):
            opts["type"] = _none_or(opts["type"])
            if "choices" in opts:
                opts["choices"] = _Choices(opts["choices"])
        parser.add_argument("--" + f.name.replace("_", "-"), **opts)
    values = vars(parser.parse_args(argv))
    return args_cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def apply_preset(args, presets: dict[str, dict]) -> None:
    """Fill every field left at None from the preset of `args.data` (the table at the top of each method file).
    --arch (else the preset's arch) first gives the ViT width, depth and heads not set explicitly, from the method
    file's DEIT_ARCHS table; the synthetic presets name no arch and keep their own tiny sizes."""
    preset = presets[args.data]
    if arch := getattr(args, "arch", None) or preset.get("arch"):
        sizes = sys.modules[type(args).__module__].DEIT_ARCHS[arch][:3]  # (width D, depth, heads)
        for name, value in zip(("embed_dim", "depth", "heads"), sizes, strict=True):
            if getattr(args, name) is None:
                setattr(args, name, value)
    for name, value in preset.items():
        if getattr(args, name) is None:
            setattr(args, name, value)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_args(args) -> None:
    """Every numeric and structural constraint of the shared flags, checked before any data loads: a SystemExit
    naming the flag and the allowed range. Method files check their own knobs after calling this."""
    problems = []
    for f in dataclasses.fields(args):  # every method's own knobs too: finite, and no negative count or weight
        v = getattr(args, f.name)
        if isinstance(v, float) and not math.isfinite(v):
            problems.append(f"{_flag(f.name)} {v}: must be a finite number")
        elif isinstance(v, int | float) and not isinstance(v, bool) and v < 0 and f.name != "seed":
            problems.append(f"{_flag(f.name)} {v}: must be >= 0")
        elif f.name.startswith("num_") and f.name.endswith("_blocks") and isinstance(v, int) and v < 1:
            problems.append(f"{_flag(f.name)} {v}: must be >= 1 (more than --depth means every block)")

    def need(ok: bool, name: str, allowed: str) -> None:
        if not ok:
            problems.append(f"{_flag(name)} {_shown(getattr(args, name))}: must be {allowed}")

    g = lambda name: getattr(args, name, None)  # noqa: E731
    for name in ("batch_size", "log_every", "depth", "heads", "embed_dim", "patch_size", "img_size"):
        need(g(name) is None or g(name) >= 1, name, "an integer >= 1")
    for name in ("epochs", "num_overlays", "warmup_steps"):
        need(g(name) is None or g(name) >= 0, name, "an integer >= 0")
    need(str(g("num_workers")) == "auto" or str(g("num_workers")).isdigit(), "num_workers", "auto or an integer >= 0")
    need(g("lr") is None or g("lr") > 0, "lr", "> 0")
    for name in ("weight_decay", "grad_clip"):
        need(g(name) is None or g(name) >= 0, name, ">= 0")
    need(0 <= g("drop_path") < 1, "drop_path", "in [0, 1)")
    need(0 < g("cam_curve_interval") <= 0.1, "cam_curve_interval", "in (0, 0.1] (wsolevaluation uses 0.001-0.01)")
    need(g("repo_threshold") is None or 0 <= g("repo_threshold") <= 1, "repo_threshold", "in [0, 1]")
    need(all(s >= 1 for s in g("lr_steps") or ()), "lr_steps", "epochs >= 1")
    if g("embed_dim") and g("heads") and g("embed_dim") % g("heads"):
        problems.append(f"--embed-dim {args.embed_dim} is not divisible by --heads {args.heads}")
    if g("img_size") and g("patch_size") and (args.img_size < args.patch_size or args.img_size % args.patch_size):
        problems.append(f"--img-size {args.img_size} must be a multiple of --patch-size {args.patch_size} (the patch "
                        "grid must tile the image exactly, or maps and boxes are misaligned)")
    if not (args.device in ("auto", "cpu", "cuda") or args.device.startswith("cuda:") and args.device[5:].isdigit()):
        problems.append(f"--device {args.device}: choose auto, cpu, cuda or cuda:N")
    processes = int(os.environ.get("WORLD_SIZE", "1"))  # torchrun: --batch-size is the global batch
    if processes > 1 and g("batch_size") and args.batch_size % processes:
        problems.append(f"--batch-size {args.batch_size} does not split evenly over {processes} processes")
    elif processes > 1 and g("area_group") and (args.batch_size // processes) % args.area_group:
        problems.append(f"--area-group {args.area_group} must divide each process's {args.batch_size // processes} "
                        "images (or be 0: the global batch)")
    if processes > 1 and g("tsa_mode") == "sequential":
        problems.append("--tsa-mode sequential (the official image-by-image order) runs in one process only")
    if problems:
        raise SystemExit("error: " + "\nerror: ".join(problems))


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python, numpy and torch; `deterministic` also asks torch for deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.backends.cudnn.deterministic = deterministic
    torch.use_deterministic_algorithms(deterministic, warn_only=True)


def pick_device(name: str = "auto") -> torch.device:
    """`auto` takes CUDA when present, else CPU. Asking for CUDA on a machine without it is an error, not a fallback."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"error: --device {name} was asked for, but torch sees no CUDA device (use --device cpu)")
    return torch.device(name)


# Distributed data parallel (torchrun): a few functions, each a no-op in one process. `--batch-size` is the global
# batch; each step's global batch is cut into contiguous per-rank shards (rank order = batch order), gradients are
# summed over ranks with each rank's loss weighted by its share, and evaluation states are merged, so the numbers
# equal one process on the same global batch.
def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside torchrun."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def init_distributed(device_name: str) -> torch.device:
    """Under torchrun (WORLD_SIZE > 1): join the process group, NCCL on CUDA and gloo on CPU, and return this
    rank's device (cuda:LOCAL_RANK); else pick_device(device_name)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return pick_device(device_name)
    cuda = device_name != "cpu" and torch.cuda.is_available()
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if cuda else "gloo")
    if not cuda:
        return torch.device("cpu")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    torch.cuda.set_device(device)
    return device


def shard(n: int, rank: int, size: int) -> slice:
    """Rank `rank`'s contiguous part of n items split over `size` ranks, as even as possible (earlier ranks +1)."""
    base, extra = divmod(n, size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (rank < extra))


def barrier() -> None:
    if world()[1] > 1:
        torch.distributed.barrier()


def close_distributed() -> None:
    """Leave the process group once every rank is done (a rank exiting with its group alive can abort)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def gather_objects(obj) -> list:
    """Every rank's `obj`, in rank order, on every rank."""
    if world()[1] == 1:
        return [obj]
    out = [None] * world()[1]
    torch.distributed.all_gather_object(out, obj)
    return out


def all_reduce_sum(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Sums over ranks (no gradient): batch statistics that every rank must hold alike (DA-WSOL's memory)."""
    if world()[1] == 1:
        return list(tensors)
    out = [t.clone() for t in tensors]
    for t in out:
        torch.distributed.all_reduce(t)
    return out


def broadcast_model(model: torch.nn.Module) -> None:
    """Rank 0's parameters and buffers copied into every rank's model, in place: equal start states by
    construction, not by equal seeds alone."""
    if world()[1] > 1:
        with torch.no_grad():
            for t in model.state_dict().values():
                torch.distributed.broadcast(t, 0)


def gather_cat(t: torch.Tensor) -> torch.Tensor:
    """The global batch's rows of a per-rank tensor (rank order; shards may differ in length). No gradient."""
    if world()[1] == 1:
        return t
    return torch.cat([p.to(t.device) for p in gather_objects(t.detach().cpu())])


class _GlobalSum(torch.autograd.Function):
    """all_reduce(SUM) whose backward is all_reduce(SUM) of the incoming gradients: every rank's output depends on
    every rank's input."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        torch.distributed.all_reduce(t)
        return t

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        torch.distributed.all_reduce(grad)
        return grad


def global_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks WITH gradient (a batch statistic of the global batch, e.g. SAT's mean area). Each rank's loss
    is weighted by its share (backward), so the summed gradient is the one-process gradient of that statistic."""
    return t if world()[1] == 1 else _GlobalSum.apply(t)


def group_means(values: torch.Tensor, group: int) -> torch.Tensor:
    """Means of per-image `values` (B,) over groups of `group` consecutive images of the global batch; 0 = the whole
    global batch, summed over ranks with gradient under torchrun (global_sum). A group > 0 must divide each rank's
    share of the batch (checked at start), so groups never span ranks. -> (G,)"""
    if not group:  # 0 (or None: an Args built without a preset)
        total = global_sum(torch.stack([values.sum(), values.new_tensor(float(len(values)))]))
        return (total[0] / total[1])[None]
    return torch.stack([chunk.mean() for chunk in values.split(group)])


def backward(loss: torch.Tensor, model: torch.nn.Module, batch_size: int) -> None:
    """loss.backward(); under torchrun the gradient of the global batch's loss: each rank's loss times its share of
    the batch (n_r / N), then the gradients summed over ranks (an unused parameter counts as zero)."""
    rank, size = world()
    if size == 1:
        loss.backward()
        return
    n = torch.tensor([float(batch_size)], device=loss.device)
    torch.distributed.all_reduce(n)
    (loss * (batch_size / n.item())).backward()
    params = [p for p in model.parameters() if p.requires_grad]
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params])
    torch.distributed.all_reduce(flat)
    for p, g in zip(params, flat.split([p.numel() for p in params]), strict=True):
        p.grad = g.view_as(p).clone()


def autocast(device: torch.device, precision: str = "auto"):
    """--precision: bf16 autocast, or full fp32 (what every official repo trains and evaluates in). auto = bf16 on
    CUDA, fp32 on CPU (bf16 does not speed up small models on most CPUs); bf16 is honoured on CPU too, for tests."""
    if precision == "bf16" or precision == "auto" and device.type == "cuda":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def rng_state() -> dict:
    """Every random generator a run draws from, for checkpoints that resume exactly."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextlib.contextmanager
def preserved_rng():
    """Every random generator as it was before the block, whatever the block drew (data.load_splits: building a set
    or a cache must not move the run's seeds)."""
    state = rng_state()
    try:
        yield
    finally:
        set_rng_state(state)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def _signals_held():
    """Ctrl-C and SIGTERM wait until the block ends, then act as usual. Raised inside torch.save's C++ writer (it
    calls the file's write) an interrupt surfaces as a RuntimeError ("unexpected pos"), not as itself. Main thread only:
    Python runs signal handlers there and nowhere else."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    old = {s: signal.signal(s, lambda signum, frame: caught.append(signum)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        if caught:
            signal.raise_signal(caught[0])  # the restored handler: KeyboardInterrupt, Terminated, or ignored


def _atomic_write(path: str | Path, write) -> None:
    """Write through a temporary file in the same folder, then rename: a crash never leaves a half-written file, and
    the previous version stays intact. The file gets the umask's mode (mkstemp alone would make it 0600). A write
    fault (disk full, read-only folder) is one line naming the path and the OS error."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with _signals_held():  # an interrupt lands after the rename: the file is complete, the epoch saved
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            os.fchmod(fd, 0o666 & ~_umask())
            with os.fdopen(fd, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports OS errors as RuntimeError from its C++ writer
        if tmp:
            Path(tmp).unlink(missing_ok=True)
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0]
        raise SystemExit(f"error: cannot write {path}: {reason}; the previous version of the file, if any, is "
                         "unchanged") from None
    except BaseException:
        if tmp:
            Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(state: dict, path: str | Path) -> None:
    _atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path: str | Path, device: torch.device | str = "cpu") -> dict:
    """Load a checkpoint written by `save_checkpoint`; a missing, damaged or foreign file is a clear error naming it
    (a DeiT backbone says it belongs to --pretrained)."""
    path = Path(path)
    if path.is_dir():
        raise SystemExit(f"error: checkpoint {path} is a folder; give the file in it (a run folder holds last.pt)")
    if not path.is_file():
        raise SystemExit(f"error: checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=device, weights_only=False)
    except Exception as e:  # torch raises several types for truncated or foreign files
        raise SystemExit(f"error: cannot read checkpoint {path}: {type(e).__name__}: {e}") from None
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        raise SystemExit(f"error: {path} is not a nanoWSOL checkpoint (a dict with the model's state under 'model')")
    if "method" not in state and "patch_embed.proj.weight" in state["model"]:
        raise SystemExit(f"error: {path} is a DeiT backbone (ViT weights without a WSOL head), not a nanoWSOL run's "
                         f"checkpoint: start a run from it with --pretrained {path}")
    return state


def _finite(obj):
    """NaN and infinity -> None, so every JSON file is valid JSON (json.dumps would write a bare NaN)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def _json(obj, **kw) -> str:
    return json.dumps(_finite(obj), default=str, allow_nan=False, **kw)


def write_json(path: str | Path, obj) -> None:
    _atomic_write(path, lambda f: f.write((_json(obj, indent=2) + "\n").encode()))


def append_jsonl(path: str | Path, row: dict) -> None:
    """Append one JSON line with a single write call, so a reader never sees half a row."""
    try:
        with open(path, "a") as f:
            f.write(_json(row) + "\n")
    except OSError as e:
        raise SystemExit(f"error: cannot write {path}: {e.strerror}") from None


def make_run_dir(out_dir: str, data: str, method: str, seed: int, name: str | None = None) -> Path:
    """runs/<data>__<method>__<seed>__<time>/ (STYLE.md §3.9), or runs/<name>/ when a name is given. Creating it is
    exclusive: two runs never share a folder. A default name that is taken gets a suffix (-2, -3, ...); a given
    name that is taken is an error."""
    base = Path(out_dir) / (name or f"{data}__{method}__{seed}__{time.strftime('%Y%m%d-%H%M%S')}")
    try:
        base.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SystemExit(f"error: cannot create --out-dir {base.parent}: {e.strerror}") from None
    for k in range(1, 1000):
        run = base if k == 1 else base.with_name(f"{base.name}-{k}")
        try:
            run.mkdir()
            return run
        except FileExistsError:
            if name:
                raise SystemExit(f"error: run folder {run} exists; choose another --run-name, or continue that run "
                                 f"with --resume {run / 'last.pt'}") from None
        except OSError as e:
            raise SystemExit(f"error: cannot create run folder {run}: {e.strerror}") from None
    raise SystemExit(f"error: could not find a free run folder name next to {base}")


# Flags that may differ from the saved run on --resume without changing its numbers (or, for --epochs, on purpose:
# raising it extends the run; with the cosine schedule the LR curve then differs from a run started that long).
# --cache is a speed switch (the same batches either way); --data-root / --metadata-root may name the same data
# moved elsewhere: Run.start checks that it is the run's own (the same image lists).
RESUME_MAY_CHANGE = ("resume", "device", "num_workers", "log_every", "num_overlays", "epochs", "out_dir", "run_name",
                     "cache", "data_root", "metadata_root")
ARCH_FIELDS = ("img_size", "patch_size", "embed_dim", "depth", "heads")


def _describe(method: str, arch: dict) -> str:
    return (f"a {method} model (ViT {arch.get('img_size')} px / patch {arch.get('patch_size')}, width "
            f"{arch.get('embed_dim')}, depth {arch.get('depth')}, {arch.get('heads')} heads, "
            f"{arch.get('num_classes')} classes)")


def _check_fits(path, state: dict, method: str, arch: dict) -> None:
    """A checkpoint of another method or size is an error that says which one it is and which was asked for."""
    theirs = {"method": state.get("method"), **state.get("arch", {})}
    if theirs["method"] is None:
        return  # written before checkpoints recorded this; load_state_dict's check below still guards
    if theirs["method"] != method or any(theirs.get(k) != v for k, v in arch.items()):
        raise SystemExit(f"error: {path} holds {_describe(theirs['method'], theirs)}, but this run asks for "
                         f"{_describe(method, arch)}")


def _load_model(path, model: torch.nn.Module, weights: dict) -> None:
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        lines = [ln.strip() for ln in str(e).splitlines()[1:] if ln.strip()]
        raise SystemExit(f"error: {path} does not fit this model: " + "; ".join(lines[:4])) from None


def same(a, b) -> bool:
    """Equal flag values; tuples come back from JSON / pickle as lists."""
    return (list(a) if isinstance(a, tuple | list) else a) == (list(b) if isinstance(b, tuple | list) else b)


def resume_args(args, method: str) -> dict | None:
    """--resume: the saved run's arguments become this run's (the checkpoint records them); a flag given explicitly
    with another value is an error listing every difference, except RESUME_MAY_CHANGE. Returns the checkpoint."""
    if not args.resume:
        return None
    state = load_checkpoint(args.resume)
    if state.get("method", method) != method:
        raise SystemExit(f"error: --resume {args.resume} is a {state['method']} checkpoint; run "
                         f"{state['method']}.py --resume {args.resume}")
    saved = state.get("args")
    if not isinstance(saved, dict):
        raise SystemExit(f"error: --resume {args.resume} records no run arguments, so it cannot be continued")
    defaults = type(args)()
    differ = [f"{_flag(f.name)}: saved {_shown(saved[f.name])}, given {_shown(getattr(args, f.name))}"
              for f in dataclasses.fields(args) if f.name in saved and f.name not in RESUME_MAY_CHANGE
              and not same(getattr(args, f.name), getattr(defaults, f.name))
              and not same(getattr(args, f.name), saved[f.name])]
    if differ:
        raise SystemExit(f"error: --resume {args.resume} continues a run with other settings; drop these flags (or "
                         "start a new run):\n  " + "\n  ".join(differ))
    for f in dataclasses.fields(args):
        if f.name in saved and not (f.name in RESUME_MAY_CHANGE and not same(getattr(args, f.name),
                                                                             getattr(defaults, f.name))):
            value = saved[f.name]
            setattr(args, f.name, tuple(value) if isinstance(value, list) else value)
    return state


# --eval-only: the settings of the evaluation itself, which stay this command's; every other flag left at its default
# takes the checkpoint's value, so a checkpoint is scored with the model, data and test geometry it was trained with
EVAL_SETTINGS = ("eval_only", "checkpoint", "resume", "map", "seed", "device", "num_workers", "log_every",
                 "num_overlays", "out_dir", "run_name", "cache", "cam_curve_interval", "repo_threshold", "batch_size",
                 "precision")


def eval_args(args, state: dict, method: str) -> None:
    """--eval-only: flags left at their defaults take the checkpoint's run's values (its model, data and recipe), so
    e.g. a --neck linear_relu checkpoint is not scored as a centred one; explicit flags and EVAL_SETTINGS stay."""
    saved = state.get("args")
    if not isinstance(saved, dict) or state.get("method", method) != method:
        return  # another method's checkpoint: Run.start's check names it
    defaults = type(args)()
    for f in dataclasses.fields(args):
        if f.name in saved and f.name not in EVAL_SETTINGS and same(getattr(args, f.name), getattr(defaults, f.name)):
            value = saved[f.name]
            setattr(args, f.name, tuple(value) if isinstance(value, list) else value)


def steps_per_epoch(num_images: int, batch_size: int, drop_last: bool, processes: int = 1) -> int:
    """Optimizer steps of one epoch, by the method's official loader rule (drop_last or keep the partial batch).
    Under torchrun a last partial batch smaller than the number of processes is dropped (a rank would get none)."""
    full, rest = divmod(num_images, batch_size)
    return full + (not drop_last and rest >= processes)


# The synthetic presets' backbone: pretrain.py's DeiT-format checkpoint (committed; `python pretrain.py` rebuilds it)
SYNTHETIC_DEIT = str(Path(__file__).resolve().parent / "weights" / "synthetic_deit.pth")


def check_pretrained(path: str) -> None:
    """Before any data loads: the synthetic backbone or a --pretrained file must exist (load_deit_weights reads it)."""
    if path == SYNTHETIC_DEIT and not Path(path).is_file():
        raise SystemExit(f"error: the synthetic backbone {path} is missing: rebuild it with `python pretrain.py` "
                         "(about 12 min on 2 CPU cores), or train from scratch with --pretrained none")
    if path not in ("none", "deit") and not Path(path).is_file():
        raise SystemExit(f"error: --pretrained {path}: no such file (a DeiT checkpoint, 'deit' or 'none')")


def _own_folder(resume: str, saved: dict, out_dir: str) -> tuple[bool, str | None]:
    """Whether --resume may continue in the checkpoint's folder: only when that folder's args.json is this run's
    (a last.pt copied next to another run's files must not overwrite them). Else a note: a new folder is used."""
    folder = Path(resume).resolve().parent
    try:
        theirs = json.loads((folder / "args.json").read_text())
    except (OSError, ValueError):
        theirs = None
    if isinstance(theirs, dict) and all(same(theirs.get(k), v) for k, v in saved.items()
                                        if k not in RESUME_MAY_CHANGE):
        return True, None
    why = "has no readable args.json" if theirs is None else "holds another run's args.json"
    return False, (f"note: {folder} {why}, so it is not the folder of the run in {Path(resume).name}: nothing there "
                   f"is changed; the run continues in a new folder under {out_dir}")


def data_identity(args, splits: dict) -> dict:
    """What identifies the data a run trains and is scored on (recorded in every checkpoint): the absolute data root
    and, per split, the number of images and a digest of their paths (under the root) and labels."""
    root = str(args.data_root)
    out: dict = {"root": root}
    for name, ds in splits.items():
        if ds is None:
            out[name] = None
            continue
        h = hashlib.sha256()
        for r in ds.records:
            path = str(r.path)
            h.update(f"{path[len(root):] if path.startswith(root) else path}|{r.label};".encode())
        out[name] = {"images": len(ds), "digest": h.hexdigest()[:16]}
    return out


def _check_same_data(resume: str, saved: dict, now: dict) -> None:
    """--resume continues on the data the run trained on, or stops (a moved root with the same images is fine)."""
    if any(saved.get(k) != now.get(k) for k in ("train", "val", "test")):
        def show(d: dict) -> str:
            return ", ".join(f"{d[k]['images'] if d.get(k) else 0} {k}" for k in ("train", "val", "test"))
        raise SystemExit(f"error: --resume {resume} trained on {saved['root']} ({show(saved)} images), but this "
                         f"run loaded {now['root']} ({show(now)} images, or other files): give --data-root with the "
                         "run's data, or start a new run")


class Run:
    """The bookkeeping every method's main() shares, so that each file shows only what its method adds:

        run = common.Run(args, "tscam", PRESETS)     # --resume's saved args, presets, checks, seed; nothing written
        ...                                          # data (data.load_splits), model, optimizer
        run.start(model, optimizer, load_deit_weights, splits)   # weights, data check; the run folder appears
        for epoch in run.epochs():                   # train, then run.end_epoch(epoch, stats)
        return run.finish(val, test, maps)           # headline + report (naming the map), metrics.json

    The run folder is created only once data, model and weights have loaded, exclusively; --resume continues in the
    checkpoint's own folder unless --out-dir / --run-name are given, dropping rows of epochs after the checkpoint.
    Under torchrun every rank runs this; only rank 0 writes files and prints, and every rank resumes from last.pt.
    """

    current: Run | None = None  # the run in progress, for common.cli's Ctrl-C message

    def __init__(self, args, method: str, presets: dict[str, dict]):
        self.args, self.method = args, method
        default = type(args)()  # --resume without --out-dir / --run-name continues in the checkpoint's folder
        in_place = bool(args.resume) and args.out_dir == default.out_dir and args.run_name is None
        self.resumed = resume_args(args, method)
        if args.eval_only and not args.checkpoint:
            raise SystemExit("error: --eval-only needs --checkpoint PATH")
        self.evaluated = load_checkpoint(args.checkpoint) if args.eval_only else None  # read before any data
        if self.evaluated is not None:
            eval_args(args, self.evaluated, method)
        self.own_folder, self.note = False, None
        if in_place:
            self.own_folder, self.note = _own_folder(args.resume, self.resumed["args"], default.out_dir)
            if not self.own_folder:
                args.out_dir, args.run_name = default.out_dir, None
        apply_preset(args, presets)
        check_args(args)
        if not (args.resume or args.eval_only):
            check_pretrained(args.pretrained)
        self.device = init_distributed(args.device)
        self.rank, self.world = world()
        seed_everything(args.seed, args.deterministic)  # every rank builds the same initial model
        self.dir: Path | None = None
        self.start_epoch, self.epoch_done, self.progress = 0, 0, None

    def start(self, model: torch.nn.Module, optimizer, load_pretrained, splits: dict) -> None:
        args = self.args
        self.model, self.optimizer = model, optimizer
        num_train, self.data = len(splits["train"]), data_identity(args, splits)
        if self.resumed is not None and "data" in self.resumed:
            _check_same_data(args.resume, self.resumed["data"], self.data)
        self.arch = {k: getattr(args, k) for k in ARCH_FIELDS} | {"num_classes": self._num_classes(model)}
        if self.rank:  # other ranks draw their own crops, flips and drop-path masks; rank 0 is the one-process run
            seed_everything(args.seed + 1000 * self.rank, args.deterministic)
        if self.resumed is not None:
            _check_fits(args.resume, self.resumed, self.method, self.arch)
            _load_model(args.resume, model, self.resumed["model"])
            optimizer.load_state_dict(self.resumed["optimizer"])
            ranks = self.resumed.get("rng_ranks") or [self.resumed["rng"]]
            set_rng_state(ranks[self.rank] if len(ranks) == self.world else self.resumed["rng"])
            self.start_epoch = self.epoch_done = self.resumed["epoch"]
        elif args.eval_only:
            state = self.evaluated
            _check_fits(args.checkpoint, state, self.method, self.arch)
            _load_model(args.checkpoint, model, state["model"])
            self.epoch_done = state.get("epoch", 0)
        elif args.pretrained != "none":
            load_pretrained(model.vit, args.pretrained)
        broadcast_model(model)  # torchrun: rank 0's start state on every rank, whatever each rank drew before
        self.steps = steps_per_epoch(num_train, args.batch_size, args.drop_last, self.world)
        self.total_epochs = 0 if args.eval_only else args.epochs
        if self.total_epochs > self.start_epoch and self.steps == 0:
            raise SystemExit(f"error: --batch-size {args.batch_size} exceeds the {num_train} training images")
        if self.rank == 0:
            self._make_folder()
        self.dir = Path(gather_objects(str(self.dir))[0])  # every rank knows rank 0's folder
        Run.current = self
        verb = f"resumed {args.resume} at epoch {self.start_epoch}" if self.resumed is not None else "run"
        device = f"{self.device}{f' x {self.world} processes' if self.world > 1 else ''}"
        if self.note:
            self.print(self.note, flush=True)
        self.print(f"{verb} | folder {self.dir} | device {device} ({precision_name(self.device, args.precision)}) | "
                   f"data {args.data} | {self.steps} steps/epoch", flush=True)
        self.progress = Progress(self.total_epochs * self.steps, args.log_every, self.start_epoch * self.steps,
                                 quiet=self.rank > 0, scale=self.world)

    def _make_folder(self) -> None:
        args = self.args
        if self.own_folder:  # continue in the checkpoint's folder, without the rows of epochs it does not hold
            self.dir = Path(args.resume).resolve().parent
            rows = [r for r in _read_rows(self.dir / "metrics.jsonl")
                    if not any(k.startswith("test/") for k in r) and r.get("epoch", 0) <= self.start_epoch]
            text = "".join(_json(r) + "\n" for r in rows)
            _atomic_write(self.dir / "metrics.jsonl", lambda f: f.write(text.encode()))
        else:
            self.dir = make_run_dir(args.out_dir, args.data, self.method, args.seed, args.run_name)
        write_json(self.dir / "args.json", dataclasses.asdict(args))

    def print(self, *values, **kw) -> None:
        if self.rank == 0:
            print(*values, **kw)

    @property
    def overlays(self) -> Path | None:
        """Where evaluate() writes overlay pictures: the run folder's overlays/ on rank 0 only."""
        return self.dir / "overlays" if self.rank == 0 else None

    @staticmethod
    def _num_classes(model) -> int | None:
        head = getattr(model, "head", None)
        return getattr(head, "out_channels", getattr(head, "out_features", None))

    def epochs(self):
        for epoch in range(self.start_epoch, self.total_epochs):
            self.t0 = time.perf_counter()
            yield epoch

    def end_epoch(self, epoch: int, stats: dict, extra: dict | None = None) -> None:
        """One printed line and one metrics.jsonl row (train/<stat>, plus `extra` keys as they are), then last.pt
        (atomically: a crash keeps the previous one). Under torchrun the stats are the mean over ranks, and last.pt
        holds every rank's random state."""
        every = gather_objects(stats)
        stats = {k: sum(s[k] for s in every) / len(every) for k in stats}
        rngs = gather_objects(rng_state())
        self.epoch_done = epoch + 1
        if self.rank:
            return
        row = {"epoch": epoch + 1, "lr": self.optimizer.param_groups[0]["lr"], "time_s": time.perf_counter() - self.t0}
        row |= {f"train/{k}": v for k, v in stats.items()} | (extra or {})
        print(" | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()), flush=True)
        save_checkpoint({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                         "epoch": epoch + 1, "rng": rngs[0], "args": dataclasses.asdict(self.args),
                         "method": self.method, "arch": self.arch, "data": self.data}
                        | ({"rng_ranks": rngs} if self.world > 1 else {}),
                        self.dir / "last.pt")
        append_jsonl(self.dir / "metrics.jsonl", row)  # after the checkpoint: a row always has its epoch saved

    def finish(self, val: dict, test: dict, maps: str) -> dict:
        final = {"method": self.method, "epoch": self.epoch_done, **{f"val/{k}": v for k, v in val.items()},
                 **{f"test/{k}": v for k, v in test.items()}}
        if self.rank == 0:
            append_jsonl(self.dir / "metrics.jsonl", final)
            write_json(self.dir / "metrics.json", final)
            print(headline(val, test, maps), format_report(val, "val", maps), format_report(test, "test", maps),
                  sep="\n", flush=True)
            written = [str(self.dir / n) for n in ("metrics.json", "last.pt", "overlays") if (self.dir / n).exists()]
            print("wrote " + ", ".join(written), flush=True)
        Run.current = None
        return final


def _read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError):
            rows.append(json.loads(line))
    return rows


def precision_name(device: torch.device, precision: str) -> str:
    return "bf16 autocast" if precision == "bf16" or precision == "auto" and device.type == "cuda" else "fp32"


def check_finite(loss: torch.Tensor, parts: dict, epoch: int, step: int, grad_norm=None) -> None:
    """A non-finite loss or gradient norm stops the run at once: nothing non-finite is saved or reported, and the
    last good checkpoint (the previous epoch's last.pt) stays as it is."""
    values = [loss.item()] + ([] if grad_norm is None else [float(grad_norm)])
    if all(math.isfinite(v) for v in values):
        return
    terms = ", ".join(f"{k} {v:.4g}" for k, v in parts.items())
    where = Run.current.dir / "last.pt" if Run.current is not None and Run.current.epoch_done else None
    kept = f"; the last good checkpoint is {where}" if where and where.exists() else "; no epoch was completed"
    norm = "" if grad_norm is None else f", grad norm {float(grad_norm):.4g}"
    raise SystemExit(f"error: diverged at epoch {epoch + 1} step {step + 1}: loss {values[0]:.4g} ({terms}{norm}); "
                     f"nothing of this epoch was saved{kept}. Try a lower --lr or --grad-clip")


class Terminated(BaseException):
    """SIGTERM (timeout, Slurm, Kubernetes, docker stop) raised where the main thread is, so that every `finally`
    (temporary files of a set or cache build, atomic writes) runs as for Ctrl-C."""


_TERMINATED: list[int] = []  # set by the handler: a DataLoader worker killed by the same signal may surface first


def _on_sigterm(signum, frame) -> None:
    _TERMINATED.append(signum)
    raise Terminated


def cli(main, args_cls: type) -> None:
    """`python <method>.py ...`: parse, run. Ctrl-C exits 130 and SIGTERM 143, with one line saying where the last
    complete epoch is and the exact command that continues it; neither leaves a temporary file."""
    script = Path(sys.argv[0]).name
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        main(parse_args(args_cls, sys.argv[1:]))
        close_distributed()
    except BaseException as e:
        if not (isinstance(e, KeyboardInterrupt | Terminated) or _TERMINATED):
            raise
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut this message short
        what = "terminated (SIGTERM)" if _TERMINATED else "interrupted"
        run = Run.current
        if run is not None and run.dir is not None and run.epoch_done and (run.dir / "last.pt").exists():
            print(f"\n{what}: epoch {run.epoch_done} is saved in {run.dir / 'last.pt'}; continue with: python "
                  f"{script} --resume {run.dir / 'last.pt'}", file=sys.stderr, flush=True)
        else:
            print(f"\n{what} before the first epoch was saved; nothing to resume", file=sys.stderr, flush=True)
        sys.stdout.flush()
        # exit without interpreter teardown: an interrupted torch op's C++ state can be destroyed after stdout is
        # closed and abort the process (exit -6 seen in CI); every file on disk is already complete (atomic writes)
        os._exit(143 if _TERMINATED else 130)


class Progress:

    """Prints `tag step/total | key value ... | img/s | ETA` every `every` steps, and once at the end."""

    def __init__(self, total_steps: int, every: int = 50, start_step: int = 0, quiet: bool = False, scale: int = 1):
        self.total, self.every, self.step, self.quiet, self.scale = total_steps, every, start_step, quiet, scale
        self.t0, self.start, self.images = time.perf_counter(), start_step, 0

    def update(self, batch_size: int, tag: str, **values: float) -> None:
        """batch_size: this process's images; under torchrun (scale = processes) img/s is the global rate."""
        self.step += 1
        self.images += batch_size * self.scale
        if self.quiet or self.step % self.every and self.step != self.total:
            return
        elapsed = time.perf_counter() - self.t0
        rate = self.images / max(elapsed, 1e-9)
        eta = elapsed / max(self.step - self.start, 1) * (self.total - self.step)
        shown = " ".join(f"{k} {v:.4g}" for k, v in values.items())
        eta_text = format_seconds(eta)
        print(f"{tag} step {self.step}/{self.total} | {shown} | {rate:.0f} img/s | ETA {eta_text}", flush=True)


def format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d}"


def _jet(values: np.ndarray) -> np.ndarray:
    """A small 'jet' colormap: [0, 1] floats (H, W) -> uint8 RGB (H, W, 3), blue -> cyan -> yellow -> red."""
    v = np.clip(values, 0.0, 1.0)[..., None]
    r = np.clip(1.5 - np.abs(4 * v - 3), 0, 1)
    g = np.clip(1.5 - np.abs(4 * v - 2), 0, 1)
    b = np.clip(1.5 - np.abs(4 * v - 1), 0, 1)
    return (np.concatenate([r, g, b], axis=-1) * 255).astype(np.uint8)


def save_overlay(image: np.ndarray, scoremap: np.ndarray, gt_boxes, pred_boxes, path: str | Path,
                 alpha: float = 0.5, scale: int | None = None, caption: str | None = None,
                 scored: int | None = None) -> None:
    """Write image | heat map overlay side by side, GT boxes in green and predicted boxes in red, as a PNG.

    image (H, W, 3) uint8; scoremap (H, W) in [0, 1] on the same frame; boxes (K, 4) inclusive x0, y0, x1, y1.
    scale: pixel repeat factor; by default small images (the 64 px synthetic set) are enlarged to about 256 px.
    scored: the index of the predicted box the metric counted, drawn thick red; the other candidates thin orange.
    caption: text on a strip under the panels.
    """
    h, w = scoremap.shape
    scale = scale or max(1, 256 // max(h, w))
    heat = (alpha * _jet(scoremap) + (1 - alpha) * image).astype(np.uint8)
    canvas = Image.fromarray(np.concatenate([image, heat], axis=1))
    if scale != 1:
        canvas = canvas.resize((2 * w * scale, h * scale), Image.NEAREST)
    draw = ImageDraw.Draw(canvas)
    pred = np.asarray(pred_boxes, dtype=np.int64).reshape(-1, 4)
    order = [k for k in range(len(pred)) if k != scored] + ([scored] if scored is not None else [])
    styles = [(np.asarray(gt_boxes, dtype=np.int64).reshape(-1, 4), (0, 255, 0), 1)]
    styles += [(pred[k:k + 1], (255, 0, 0) if scored in (None, k) else (255, 165, 0), 2 if k == scored else 1)
               for k in order]
    for boxes, colour, width in styles:
        for x0, y0, x1, y1 in boxes.tolist():
            for dx in (0, w):  # the same box on both panels
                draw.rectangle([(x0 + dx) * scale, y0 * scale, (x1 + dx + 1) * scale - 1, (y1 + 1) * scale - 1],
                               outline=colour, width=width)
    if caption:
        lines = caption.split("\n")
        strip = Image.new("RGB", (canvas.width, 12 * len(lines) + 6), (255, 255, 255))
        text = ImageDraw.Draw(strip)
        for n, line in enumerate(lines):
            text.text((4, 3 + 12 * n), line, fill=(0, 0, 0))
        full = Image.new("RGB", (canvas.width, canvas.height + strip.height))
        full.paste(canvas, (0, 0))
        full.paste(strip, (0, canvas.height))
        canvas = full
    _atomic_write(path, lambda f: canvas.save(f, format="PNG"))


def save_overlays(meter: LocalizationMeter, dataset, overlay_dir: Path, n: int) -> None:
    """The first n evaluated images of a split as pictures (save_overlay): the map, the GT boxes, every candidate box
    at the GT-known threshold, the one wsolevaluation scores (best IoU with a GT box) thick red, and a caption with
    the true and predicted class, τ and that IoU."""
    names = getattr(dataset, "class_names", None) or []

    def name(k: int) -> str:
        return names[k] if k < len(names) else str(k)

    for (index, scoremap, boxes), (label, pred) in zip(meter.examples()[:n], meter._example_classes, strict=False):
        gt = np.asarray(dataset[index].get("boxes", torch.zeros(0, 4)), dtype=np.int64).reshape(-1, 4)
        ious = box_iou(boxes, gt).max(axis=1) if len(boxes) and len(gt) else np.zeros(len(boxes))
        scored = int(ious.argmax()) if len(boxes) and len(gt) else None
        tau = meter._example_threshold
        caption = (f"true {name(label)} | predicted {name(pred)}" + ("" if pred == label else " (wrong)") + "\n"
                   + (f"tau {tau:.3f} | " if tau is not None else "")
                   + (f"IoU of the scored box {ious[scored]:.2f} (thick red; orange: other candidates)"
                      if scored is not None else "no GT box"))
        path = overlay_dir / f"{dataset.split}_{index:05d}.png"
        save_overlay(dataset.display_image(index), scoremap, gt, boxes, path, caption=caption, scored=scored)


def eigen_cam(features: torch.Tensor, sign: Literal["maxabs", "none"] = "maxabs") -> torch.Tensor:
    """Eigen-CAM (Muhammad & Yeasin, IJCNN 2020): the projection of each image's centred features on their first
    principal direction, ReLU'd. Training-free and class-agnostic. features (B, P, D) -> (B, P).

    As pytorch-grad-cam's get_2d_projection: centre over positions, SVD, p = X v1. The SVD's sign is arbitrary, so
    `maxabs` flips p when |min p| > |max p| (the library's Seg-Eigen-CAM rule); `none` keeps torch.linalg.svd's
    sign, which is not numpy's (LAPACK's, the library's) in about half the cases (48 % of random centred 196 x 384
    float32 matrices, the ViT-S shape; shape-dependent, ~0 % for tall 196 x 16 ones).
    Our maps then go through wsolevaluation's bicubic resize and min-max (resize_scoremap), like every map here;
    pytorch-grad-cam resizes bilinearly (cv2.resize) and min-maxes with eps 1e-7, so its pixel values differ.
    """
    x = features.float()
    x = x - x.mean(dim=1, keepdim=True)  # (B, P, D), centred per channel
    _, _, vh = torch.linalg.svd(x, full_matrices=False)  # vh (B, min(P, D), D)
    p = x @ vh[:, 0, :, None]  # (B, P, 1)
    p = p[..., 0]
    if sign == "maxabs":
        flip = p.amin(dim=1).abs() > p.amax(dim=1).abs()
        p = torch.where(flip[:, None], -p, p)
    return p.clamp(min=0)
