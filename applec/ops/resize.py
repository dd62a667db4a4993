"""Op table entry: Resize (the importer maps Upsample and Resize-10 onto its canonical form).

Resize is separable: each resized axis maps every output position to a few input positions
with weights, i.e. one [out, in] matrix per axis (`axis_weights`). The reference applies
those matrices one axis at a time (nearest: a gather, so integers and NaNs stay exact), and
the CoreML lowering compares them with what each MIL resize op computes, so it picks an op
only where it is exact. Coordinates follow the ONNX reference implementation
(`onnx/reference/ops/op_resize.py`); output sizes from `scales` are floor(scale * size) in
float32, as onnxruntime computes them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from . import OpDef, register

COORDINATE_MODES = ("half_pixel", "half_pixel_symmetric", "pytorch_half_pixel",
                    "align_corners", "asymmetric", "tf_half_pixel_for_nn", "tf_crop_and_resize")
NEAREST_MODES = ("round_prefer_floor", "round_prefer_ceil", "floor", "ceil")
MODES = ("nearest", "linear", "cubic")


@dataclass(frozen=True)
class AxisResize:
    """One axis: sizes, the scale its coordinates use, and each output's source position."""

    axis: int
    size_in: int
    size_out: int
    scale: float
    coords: np.ndarray          # float64 [size_out], not clamped
    outside: np.ndarray | None  # tf_crop_and_resize: outputs that take extrapolation_value


def _present(data) -> bool:
    return data is not None and np.asarray(data).size > 0


@register
class Resize(OpDef):
    """Inputs X, roi, scales, sizes (exactly one of scales and sizes given)."""

    attrs = {"mode": "nearest", "coordinate_transformation_mode": "half_pixel",
             "nearest_mode": "round_prefer_floor", "cubic_coeff_a": -0.75,
             "exclude_outside": 0, "extrapolation_value": 0.0, "antialias": 0, "axes": None,
             "keep_aspect_ratio_policy": "stretch"}
    static_inputs = (1, 2, 3)

    # -- geometry -------------------------------------------------------------------------
    def _axes(self, node, rank: int) -> list[int]:
        axes = self.attr(node, "axes")
        if axes is None:
            return list(range(rank))
        return [int(a) % rank for a in axes]

    def plan(self, node, in_shape) -> list[AxisResize]:
        """The per-axis geometry of `node` on an input of `in_shape` (every axis)."""
        rank = len(in_shape)
        mode = self.attr(node, "mode")
        ctm = self.attr(node, "coordinate_transformation_mode")
        if mode not in MODES:
            self.fail(node, f"unknown mode '{mode}'")
        if ctm not in COORDINATE_MODES:
            self.fail(node, f"unknown coordinate_transformation_mode '{ctm}'")
        if self.attr(node, "nearest_mode") not in NEAREST_MODES:
            self.fail(node, f"unknown nearest_mode '{self.attr(node, 'nearest_mode')}'")
        axes = self._axes(node, rank)
        scales_in = self.static(node, 2) if node.input(2) is not None else None
        sizes_in = self.static(node, 3) if node.input(3) is not None else None
        if _present(scales_in) == _present(sizes_in):
            self.fail(node, "exactly one of 'scales' and 'sizes' must be given")
        scales, sizes = [1.0] * rank, list(in_shape)
        if _present(scales_in):
            values = np.asarray(scales_in, np.float32).reshape(-1)
            if len(values) != len(axes):
                self.fail(node, f"{len(values)} scales for {len(axes)} axes")
            for axis, s in zip(axes, values):
                if not s > 0:
                    self.fail(node, f"scale {float(s)} is not positive")
                scales[axis] = float(s)
                sizes[axis] = math.floor(np.float32(s) * np.float32(in_shape[axis]))
        else:
            values = [int(v) for v in np.asarray(sizes_in).reshape(-1)]
            if len(values) != len(axes):
                self.fail(node, f"{len(values)} sizes for {len(axes)} axes")
            ratios = {axis: float(np.float32(v) / np.float32(in_shape[axis]))
                      for axis, v in zip(axes, values)}
            policy = self.attr(node, "keep_aspect_ratio_policy")
            if policy in ("not_larger", "not_smaller"):
                pick = min if policy == "not_larger" else max
                common = pick(ratios.values())
                ratios = dict.fromkeys(axes, common)
                values = [int(np.floor(np.float32(common) * np.float32(in_shape[a]) + 0.5))
                          for a in axes]
            elif policy != "stretch":
                self.fail(node, f"unknown keep_aspect_ratio_policy '{policy}'")
            for axis, v in zip(axes, values):
                scales[axis], sizes[axis] = ratios[axis], v
        if any(s <= 0 for s in sizes):
            self.fail(node, f"output sizes {sizes} must be positive")
        roi = self._roi(node, rank, axes) if ctm == "tf_crop_and_resize" else None
        return [AxisResize(a, in_shape[a], sizes[a], scales[a],
                           *_coordinates(ctm, in_shape[a], sizes[a], scales[a],
                                         None if roi is None else (roi[a], roi[a + rank])))
                for a in range(rank)]

    def _roi(self, node, rank, axes) -> list[float]:
        data = self.static(node, 1) if node.input(1) is not None else None
        if not _present(data):
            self.fail(node, "tf_crop_and_resize needs 'roi'")
        values = [float(v) for v in np.asarray(data).reshape(-1)]
        if len(values) != 2 * len(axes):
            self.fail(node, f"roi has {len(values)} values for {len(axes)} axes")
        roi = [0.0] * rank + [1.0] * rank
        for i, axis in enumerate(axes):
            roi[axis], roi[axis + rank] = values[i], values[i + len(axes)]
        return roi

    def is_identity(self, node, p: AxisResize) -> bool:
        if p.size_in != p.size_out or (p.outside is not None and p.outside.any()):
            return False
        if np.array_equal(p.coords, np.arange(p.size_in)):  # every mode copies then
            return True
        return bool(np.array_equal(axis_weights(self, node, p), np.eye(p.size_in)))

    # -- the two rules --------------------------------------------------------------------
    def infer(self, node):
        x = node.inputs[0]
        if self.attr(node, "antialias") and self.attr(node, "mode") == "nearest":
            self.fail(node, "antialias applies to linear and cubic modes only")
        return [(tuple(p.size_out for p in self.plan(node, x.shape)), x.dtype)]

    def reference(self, node, inputs):
        x = inputs[0]
        nearest = self.attr(node, "mode") == "nearest"
        y = x if nearest else x.astype(np.float64)
        extrapolation = float(self.attr(node, "extrapolation_value"))
        for p in self.plan(node, x.shape):
            if self.is_identity(node, p):
                continue
            if nearest:
                y = np.take(y, nearest_indices(self, node, p), axis=p.axis)
            else:
                w = axis_weights(self, node, p)
                y = np.moveaxis(np.tensordot(w, y, axes=([1], [p.axis])), 0, p.axis)
            if p.outside is not None and p.outside.any():
                shape = [1] * y.ndim
                shape[p.axis] = -1
                y = np.where(p.outside.reshape(shape), np.asarray(extrapolation, y.dtype), y)
        if x.dtype.kind in "iu" and not nearest:
            info = np.iinfo(x.dtype)
            y = np.clip(np.rint(y), info.min, info.max)
        return [np.asarray(y).astype(x.dtype, copy=False)]


# -- coordinates and weights ---------------------------------------------------------------
def _coordinates(ctm: str, size_in: int, size_out: int, scale: float, roi):
    """Source coordinate of every output position along one axis (ONNX formulas).

    Computed in float32 in onnxruntime's order of operations: where a coordinate lands
    exactly between two pixels in real arithmetic, the rounding of float32 decides which
    one nearest mode takes, and onnxruntime is what models are checked against.
    """
    f = np.float32
    y = np.arange(size_out, dtype=np.float32)
    s, half = f(scale), f(0.5)
    outside = None
    if ctm == "align_corners":
        x = np.zeros(size_out, f) if size_out == 1 else y * f(size_in - 1) / f(size_out - 1)
    elif ctm == "asymmetric":
        x = y / s
    elif ctm == "pytorch_half_pixel":
        x = np.zeros(size_out, f) if size_out == 1 else (y + half) / s - half
    elif ctm == "half_pixel":
        x = (y + half) / s - half
    elif ctm == "tf_half_pixel_for_nn":
        x = (y + half) / s
    elif ctm == "half_pixel_symmetric":  # onnxruntime adds the terms in float64
        offset = f(size_in) / f(2) * (f(1) - f(size_out) / (s * f(size_in)))
        x = (np.float64(offset) + (y.astype(np.float64) + 0.5) / np.float64(s) - 0.5).astype(f)
    else:  # tf_crop_and_resize
        start, end = f(roi[0]), f(roi[1])
        if size_out == 1:
            x = np.full(size_out, 0.5 * np.float64(start + end) * (size_in - 1), f)
        else:
            x = start * f(size_in - 1) + y * (end - start) * f(size_in - 1) / f(size_out - 1)
        outside = (x < 0) | (x > size_in - 1)
    return x.astype(np.float64), outside


def nearest_indices(op: Resize, node, p: AxisResize) -> np.ndarray:
    """The input index each output position copies (nearest mode), clamped to the axis."""
    x = p.coords
    low = np.floor(x)
    frac = x - low
    mode = op.attr(node, "nearest_mode")
    if mode == "round_prefer_floor":
        up = frac > 0.5
    elif mode == "round_prefer_ceil":
        up = frac >= 0.5
    elif mode == "floor":
        up = np.zeros(x.shape, bool)
    else:  # ceil
        up = frac > 0
    return np.clip(low.astype(np.int64) + up, 0, p.size_in - 1)


def axis_weights(op: Resize, node, p: AxisResize) -> np.ndarray:
    """The [size_out, size_in] matrix that resizes one axis (rows sum to 1)."""
    weights = np.zeros((p.size_out, p.size_in))
    mode = op.attr(node, "mode")
    if mode == "nearest":
        weights[np.arange(p.size_out), nearest_indices(op, node, p)] = 1.0
        return weights
    x = p.coords
    low = np.floor(x).astype(np.int64)
    # ratio in (0, 1]: an integer coordinate takes its left neighbour with weight 0
    ratio = np.where(x == low, 1.0, x - low)
    antialias = bool(op.attr(node, "antialias")) and p.scale < 1
    if mode == "linear":
        coeffs = _linear_antialias(ratio, p.scale) if antialias else \
            np.stack([1 - ratio, ratio], axis=1)
    else:
        a = float(op.attr(node, "cubic_coeff_a"))
        coeffs = _cubic_antialias(ratio, p.scale, a) if antialias else _cubic(ratio, a)
    taps = coeffs.shape[1]
    # the `taps` indices nearest to x, ties to the smaller: they start here
    start = np.where(x == low, low - taps // 2, low - taps // 2 + 1)
    index = start[:, None] + np.arange(taps)[None, :]
    if op.attr(node, "exclude_outside"):
        coeffs = np.where((index < 0) | (index >= p.size_in), 0.0, coeffs)
        total = coeffs.sum(axis=1, keepdims=True)
        coeffs = coeffs / np.where(total == 0, 1.0, total)
    rows = np.repeat(np.arange(p.size_out), taps)
    np.add.at(weights, (rows, np.clip(index, 0, p.size_in - 1).reshape(-1)), coeffs.reshape(-1))
    return weights


def _cubic(ratio: np.ndarray, a: float) -> np.ndarray:
    def kernel(d):
        d = np.abs(d)
        near = ((a + 2) * d - (a + 3)) * d * d + 1
        far = ((a * d - 5 * a) * d + 8 * a) * d - 4 * a
        return np.where(d <= 1, near, np.where(d < 2, far, 0.0))

    return np.stack([kernel(ratio + 1), kernel(ratio), kernel(1 - ratio), kernel(2 - ratio)],
                    axis=1)


def _antialias_taps(ratio: np.ndarray, scale: float, support: float, kernel) -> np.ndarray:
    """The kernel stretched by 1/scale (downsampling) over 2 - 2 * start taps, normalised
    per output."""
    start = int(np.floor(-support / scale) + 1)
    offsets = np.arange(start, 2 - start)
    coeffs = kernel(scale * (offsets[None, :] - ratio[:, None]))
    return coeffs / coeffs.sum(axis=1, keepdims=True)


def _linear_antialias(ratio, scale):
    return _antialias_taps(ratio, scale, 1, lambda d: np.clip(1 - np.abs(d), 0, 1))


def _cubic_antialias(ratio, scale, a):
    def kernel(d):
        d = np.abs(d)
        near = (a + 2) * d ** 3 - (a + 3) * d ** 2 + 1
        far = a * d ** 3 - 5 * a * d ** 2 + 8 * a * d - 4 * a
        return np.where(d <= 1, near, np.where(d < 2, far, 0.0))

    return _antialias_taps(ratio, scale, 2, kernel)
