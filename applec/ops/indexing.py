"""Op table entries: block rearrangement, scatters, one-hot, einsum, sampling and the ops
whose output shape depends on data.

- DepthToSpace / SpaceToDepth (DCR and CRD), ReverseSequence, CenterCropPad: data movement.
- ScatterND, ScatterElements (the importer maps the deprecated Scatter onto it): indices
  may be negative (they count back from the end of their dim), reductions none, add, mul,
  max and min.
- OneHot: `depth` decides the shape, so it is a compile-time input; indices and values
  may be run-time tensors.
- Einsum: `einsum_plan` parses the equation once (ellipses, implicit outputs, repeated
  labels) for the shape rule and the CoreML lowering alike.
- GridSample: linear, nearest and cubic sampling of 1-3 spatial dims, following the ONNX
  reference implementation (`onnx/reference/ops/op_grid_sample.py`), coordinates in float32.
- NonZero, Compress: their output shape depends on data, so that data (NonZero's input,
  Compress's condition) must be a compile-time constant; anything else is refused with an
  UnsupportedOpError saying why.
"""

from __future__ import annotations

import math
import string
from dataclasses import dataclass

import numpy as np

from ..errors import UnsupportedOpError
from . import REQUIRED, OpDef, as_ints, normalize_axis, register
from .tensor import _check_castable


# -- block rearrangement ---------------------------------------------------------------
class _BlockOp(OpDef):
    """Shared checks of DepthToSpace and SpaceToDepth: a 4-D input, a block size > 0 and
    a mode DCR or CRD."""

    attrs = {"blocksize": REQUIRED, "mode": "DCR"}

    def block(self, node, shape) -> tuple[int, str]:
        size, mode = int(self.attr(node, "blocksize")), self.attr(node, "mode")
        if len(shape) != 4 or size < 1:
            self.fail(node, f"needs a 4-D input and blocksize >= 1 (blocksize {size})")
        if mode not in ("DCR", "CRD"):
            self.fail(node, f"unknown mode '{mode}'")
        return size, mode


@register
class DepthToSpace(_BlockOp):
    def infer(self, node):
        x = node.inputs[0]
        b, _ = self.block(node, x.shape)
        n, c, h, w = x.shape
        if c % (b * b):
            self.fail(node, f"{c} channels do not split into blocks of {b}x{b}")
        return [((n, c // (b * b), h * b, w * b), x.dtype)]

    def reference(self, node, inputs):
        x = inputs[0]
        b, mode = self.block(node, x.shape)
        n, c, h, w = x.shape
        if mode == "DCR":
            y = x.reshape(n, b, b, c // (b * b), h, w).transpose(0, 3, 4, 1, 5, 2)
        else:
            y = x.reshape(n, c // (b * b), b, b, h, w).transpose(0, 1, 4, 2, 5, 3)
        return [y.reshape(n, c // (b * b), h * b, w * b)]


@register
class SpaceToDepth(_BlockOp):
    def infer(self, node):
        x = node.inputs[0]
        b, _ = self.block(node, x.shape)
        n, c, h, w = x.shape
        if h % b or w % b:
            self.fail(node, f"spatial dims {h}x{w} do not split into blocks of {b}x{b}")
        return [((n, c * b * b, h // b, w // b), x.dtype)]

    def reference(self, node, inputs):
        x = inputs[0]
        b, mode = self.block(node, x.shape)
        n, c, h, w = x.shape
        y = x.reshape(n, c, h // b, b, w // b, b)
        y = y.transpose((0, 3, 5, 1, 2, 4) if mode == "DCR" else (0, 1, 3, 5, 2, 4))
        return [y.reshape(n, c * b * b, h // b, w // b)]


# -- scatters --------------------------------------------------------------------------
SCATTER_REDUCTIONS = {"none": None, "add": np.add, "mul": np.multiply, "max": np.maximum,
                      "min": np.minimum}


def _scatter(node, op: OpDef, data, index: tuple, updates) -> np.ndarray:
    """A copy of `data` with `updates` written (or reduced) at the advanced `index`."""
    reduction = op.attr(node, "reduction")
    if reduction not in SCATTER_REDUCTIONS:
        op.fail(node, f"unknown reduction '{reduction}'")
    out = data.copy()
    if SCATTER_REDUCTIONS[reduction] is None:
        out[index] = updates  # duplicates: the last one wins (ONNX leaves it undefined)
    else:
        SCATTER_REDUCTIONS[reduction].at(out, index, updates)
    return out


def _wrapped(op: OpDef, node, indices, dims) -> np.ndarray:
    """Indices as int64 with negative ones counted back from `dims` (broadcast)."""
    indices = np.asarray(indices).astype(np.int64)
    dims = np.asarray(dims, np.int64)
    if np.any((indices < -dims) | (indices >= dims)):
        op.fail(node, f"indices out of range for dims {dims.tolist()}")
    return np.where(indices < 0, indices + dims, indices)


@register
class ScatterND(OpDef):
    """Each index tuple in the last dim of `indices` addresses a slice of `data`, which the
    matching slice of `updates` replaces (or is reduced into)."""

    attrs = {"reduction": "none"}

    def infer(self, node):
        data, indices, updates = node.inputs
        depth = indices.shape[-1] if indices.shape else 0
        want = indices.shape[:-1] + data.shape[depth:]
        if not indices.shape or depth > len(data.shape) or updates.shape != want:
            self.fail(node, f"updates must have shape {list(want)} for these indices")
        if self.attr(node, "reduction") not in SCATTER_REDUCTIONS:
            self.fail(node, f"unknown reduction '{self.attr(node, 'reduction')}'")
        return [(data.shape, data.dtype)]

    def reference(self, node, inputs):
        data, indices, updates = inputs
        depth = indices.shape[-1]
        idx = _wrapped(self, node, indices, data.shape[:depth])
        return [_scatter(node, self, data, tuple(np.moveaxis(idx, -1, 0)), updates)]


@register
class ScatterElements(OpDef):
    """updates[i...] goes to data at i... with the `axis` coordinate from indices[i...]."""

    attrs = {"axis": 0, "reduction": "none"}

    def infer(self, node):
        data, indices, updates = node.inputs
        axis = normalize_axis(node, self.attr(node, "axis"), len(data.shape))
        if indices.shape != updates.shape or len(indices.shape) != len(data.shape) or any(
                i > d for a, (i, d) in enumerate(zip(indices.shape, data.shape)) if a != axis):
            self.fail(node, "indices and updates must have one shape, data's rank, and fit "
                            "inside data")
        if self.attr(node, "reduction") not in SCATTER_REDUCTIONS:
            self.fail(node, f"unknown reduction '{self.attr(node, 'reduction')}'")
        return [(data.shape, data.dtype)]

    def reference(self, node, inputs):
        data, indices, updates = inputs
        axis = normalize_axis(node, self.attr(node, "axis"), data.ndim)
        index = list(np.indices(indices.shape, sparse=True))
        index[axis] = _wrapped(self, node, indices, data.shape[axis])
        return [_scatter(node, self, data, tuple(index), updates)]


# -- constructing ----------------------------------------------------------------------
@register
class OneHot(OpDef):
    """values = [off, on]; a new axis of size `depth` at `axis`. Indices in [-depth, depth)
    (negative ones count back) pick `on`, others (and non-integral floats) nothing."""

    attrs = {"axis": -1}
    static_inputs = (1,)

    def depth(self, node, data) -> int:
        data = np.asarray(data)
        if data.size != 1:
            self.fail(node, "depth must have one element")
        depth = int(data.reshape(-1)[0])
        if depth < 1:
            self.fail(node, f"depth {depth} must be positive")
        return depth

    def axis(self, node, rank: int) -> int:
        return normalize_axis(node, self.attr(node, "axis"), rank + 1)

    def infer(self, node):
        indices, _, values = node.inputs
        depth = self.depth(node, self.static(node, 1))
        if values.size != 2:
            self.fail(node, "values must hold two elements, [off, on]")
        axis = self.axis(node, len(indices.shape))
        return [(indices.shape[:axis] + (depth,) + indices.shape[axis:], values.dtype)]

    def reference(self, node, inputs):
        indices, depth, values = inputs
        depth, axis = self.depth(node, depth), self.axis(node, indices.ndim)
        # float indices are compared as they are: 2.5 matches nothing (onnxruntime and
        # the ONNX reference both do so, though the spec speaks of a cast to int64)
        idx = indices.astype(np.float64 if indices.dtype.kind == "f" else np.int64)
        idx = np.where(idx < 0, idx + depth, idx)
        shape = [1] * (indices.ndim + 1)
        shape[axis] = depth
        hit = np.expand_dims(idx, axis) == np.arange(depth).reshape(shape)
        off, on = values.reshape(-1)
        return [np.where(hit, on, off).astype(values.dtype)]


@register
class EyeLike(OpDef):
    """Ones on diagonal `k` of a 2-D tensor shaped like the input; dtype from `dtype` (a
    numpy dtype after import), else the input's."""

    attrs = {"dtype": None, "k": 0}

    def dtype(self, node) -> np.dtype:
        dtype = self.attr(node, "dtype")
        dtype = node.inputs[0].dtype if dtype is None else np.dtype(dtype)
        return _check_castable(self, node, dtype)

    def infer(self, node):
        x = node.inputs[0]
        if len(x.shape) != 2:
            self.fail(node, "input must be 2-D")
        return [(x.shape, self.dtype(node))]

    def reference(self, node, inputs):
        rows, cols = inputs[0].shape
        return [np.eye(rows, cols, k=int(self.attr(node, "k")), dtype=self.dtype(node))]


# -- einsum ----------------------------------------------------------------------------
@dataclass(frozen=True)
class EinsumPlan:
    """An equation resolved against its operands' ranks: one label list per operand and
    for the output (ellipsis dims get labels '...0', '...1'...), and every label's size
    (the largest: a size-1 dim broadcasts)."""

    equation: str
    terms: tuple[tuple[str, ...], ...]
    output: tuple[str, ...]
    sizes: dict


def _labels(term: str, rank: int, ellipsis: int, fail) -> list[str]:
    if term.count("...") > 1 or "." in term.replace("...", ""):
        fail(f"term '{term}' has a malformed ellipsis")
    head, dots, tail = term.partition("...")
    if any(c not in string.ascii_letters for c in head + tail):
        fail(f"term '{term}' has a label that is not a letter")
    named = len(head) + len(tail)
    if (not dots and named != rank) or (dots and named > rank):
        fail(f"term '{term}' does not match an operand of rank {rank}")
    extra = rank - named if dots else 0
    filler = [f"...{i}" for i in range(ellipsis - extra, ellipsis)]
    return list(head) + filler + list(tail)


def einsum_plan(op: OpDef, node, equation: str, shapes) -> EinsumPlan:
    """Parse `equation` for operands of `shapes`; shape errors name op, node and the equation."""

    def fail(why):
        op.fail(node, f"equation '{equation}': {why}")

    text = equation.replace(" ", "")
    lhs, arrow, rhs = text.partition("->")
    terms_text = lhs.split(",")
    if len(terms_text) != len(shapes):
        fail(f"{len(terms_text)} terms for {len(shapes)} inputs")
    ellipsis = max((len(s) - len(t.replace("...", "")) for t, s in zip(terms_text, shapes)
                    if "..." in t), default=0)
    terms = [_labels(t, len(s), ellipsis, fail) for t, s in zip(terms_text, shapes)]
    if arrow:
        output = _labels(rhs, len(rhs.replace("...", "")) + (ellipsis if "..." in rhs else 0),
                         ellipsis, fail)
    else:  # implicit: the ellipsis dims, then the labels used once, in alphabetical order
        counts = {}
        for term in terms_text:
            for c in term.replace("...", ""):
                counts[c] = counts.get(c, 0) + 1
        output = [f"...{i}" for i in range(ellipsis)] + sorted(
            c for c, n in counts.items() if n == 1)
    sizes: dict = {}
    for labels, shape in zip(terms, shapes):
        for label, size in zip(labels, shape):
            known = sizes.get(label, 1)
            if known != 1 and size not in (1, known):
                fail(f"label '{label}' has sizes {known} and {size}")
            sizes[label] = max(known, size)
    used = {label for labels in terms for label in labels}
    if len(set(output)) != len(output) or not set(output) <= used:
        fail("the output repeats a label or has one no input has")
    return EinsumPlan(equation, tuple(map(tuple, terms)), tuple(output), sizes)


def _letters(plan: EinsumPlan) -> dict[str, str]:
    """numpy subscripts for every label (ellipsis labels get unused letters)."""
    named = {label for labels in plan.terms for label in labels if not label.startswith("...")}
    free = iter(c for c in string.ascii_letters if c not in named)
    return {label: (label if label in named else next(free)) for label in plan.sizes}


@register
class Einsum(OpDef):
    attrs = {"equation": REQUIRED}

    def plan(self, node, shapes) -> EinsumPlan:
        return einsum_plan(self, node, self.attr(node, "equation"), shapes)

    def infer(self, node):
        plan = self.plan(node, [v.shape for v in node.inputs])
        return [(tuple(plan.sizes[label] for label in plan.output), node.inputs[0].dtype)]

    def reference(self, node, inputs):
        plan = self.plan(node, [x.shape for x in inputs])
        letters = _letters(plan)
        subscripts = ",".join("".join(letters[label] for label in labels)
                              for labels in plan.terms)
        subscripts += "->" + "".join(letters[label] for label in plan.output)
        wide = [x.astype(np.float64) if x.dtype.kind == "f" else x for x in inputs]
        return [np.einsum(subscripts, *wide)]


# -- data movement ---------------------------------------------------------------------
@register
class ReverseSequence(OpDef):
    """For each batch entry b, the first sequence_lens[b] steps along time_axis reversed."""

    attrs = {"batch_axis": 1, "time_axis": 0}

    def axes(self, node, shape) -> tuple[int, int]:
        batch, time = self.attr(node, "batch_axis"), self.attr(node, "time_axis")
        if len(shape) < 2 or sorted((batch, time)) != [0, 1]:
            self.fail(node, f"batch_axis {batch} and time_axis {time} must be 0 and 1")
        return batch, time

    def infer(self, node):
        x, lens = node.inputs
        batch, _ = self.axes(node, x.shape)
        if lens.shape != (x.shape[batch],):
            self.fail(node, f"sequence_lens must have shape [{x.shape[batch]}]")
        return [(x.shape, x.dtype)]

    def reference(self, node, inputs):
        x, lens = inputs
        batch, time = self.axes(node, x.shape)
        steps, lens = x.shape[time], lens.astype(np.int64)
        if np.any((lens < 0) | (lens > steps)):
            self.fail(node, f"sequence_lens {lens.tolist()} must lie in [0, {steps}]")
        t = np.arange(steps)
        source = np.where(t[None, :] < lens[:, None], lens[:, None] - 1 - t[None, :], t)
        if batch == 1:  # source is [batch, time]; x has time first
            source = source.T
        source = source.reshape(source.shape + (1,) * (x.ndim - 2))
        return [np.take_along_axis(x, np.broadcast_to(source, x.shape), axis=time)]


@register
class CenterCropPad(OpDef):
    """Crop (window start rounded down) or zero-pad (extra element at the end) each of
    `axes` to the size in input 1."""

    attrs = {"axes": None}
    static_inputs = (1,)

    def windows(self, node, in_shape, data) -> list[tuple[int, int, int, int]]:
        """Per dim: (crop begin, crop end, pad before, output size); the pad after makes
        up the rest of the output size."""
        rank, sizes = len(in_shape), as_ints(data)
        axes = self.attr(node, "axes")
        axes = [normalize_axis(node, a, rank) for a in (range(rank) if axes is None else axes)]
        if len(sizes) != len(axes) or len(set(axes)) != len(axes) or min(sizes) < 0:
            self.fail(node, f"shape {sizes} needs one size >= 0 for each of axes {axes}")
        result = [(0, d, 0, d) for d in in_shape]
        for axis, size in zip(axes, sizes):
            dim = in_shape[axis]
            if size <= dim:
                begin = (dim - size) // 2
                result[axis] = (begin, begin + size, 0, size)
            else:
                result[axis] = (0, dim, (size - dim) // 2, size)
        return result

    def infer(self, node):
        x = node.inputs[0]
        windows = self.windows(node, x.shape, self.static(node, 1))
        return [(tuple(size for *_, size in windows), x.dtype)]

    def reference(self, node, inputs):
        x, data = inputs
        windows = self.windows(node, x.shape, data)
        out = np.zeros(tuple(size for *_, size in windows), x.dtype)
        crop = tuple(slice(b, e) for b, e, _, _ in windows)
        place = tuple(slice(p, p + e - b) for b, e, p, _ in windows)
        out[place] = x[crop]
        return [out]


# -- sampling --------------------------------------------------------------------------
GRID_MODES = ("linear", "nearest", "cubic")
GRID_PADDING = ("zeros", "border", "reflection")


def grid_source(grid_axis: np.ndarray, size: int, align: bool) -> np.ndarray:
    """Normalized coordinates in [-1, 1] -> input positions, in float32 and in the ONNX
    reference's order of operations (its rounding decides nearest-mode ties)."""
    g = grid_axis.astype(np.float32)
    if align:
        return (g + np.float32(1)) / np.float32(2) * np.float32(size - 1)
    return ((g + np.float32(1)) * np.float32(size) - np.float32(1)) / np.float32(2)


def grid_bounds(size: int, align: bool) -> tuple[float, float]:
    """The interval a reflection folds coordinates into."""
    return (0.0, size - 1.0) if align else (-0.5, size - 0.5)


def reflect(x: np.ndarray, low: float, high: float) -> np.ndarray:
    """Fold x into [low, high] by reflecting at the bounds, as often as needed."""
    span = high - low
    if span <= 0:
        return np.full_like(x, low)
    t = (x - low) % (2 * span)
    return np.where((x < low) | (x > high), low + np.minimum(t, 2 * span - t), x)


@register
class GridSample(OpDef):
    """X [N, C, *spatial] sampled at grid [N, *out, r] (r = number of spatial dims, the
    last grid dim listing coordinates innermost dim first, like x, y)."""

    attrs = {"align_corners": 0, "mode": "linear", "padding_mode": "zeros"}

    def check(self, node, x_shape, grid_shape) -> None:
        mode, padding = self.attr(node, "mode"), self.attr(node, "padding_mode")
        if mode not in GRID_MODES or padding not in GRID_PADDING:
            self.fail(node, f"unknown mode '{mode}' or padding_mode '{padding}'")
        r = len(x_shape) - 2
        if r < 1 or len(grid_shape) != r + 2 or grid_shape[-1] != r \
                or grid_shape[0] != x_shape[0]:
            self.fail(node, "grid must be [N, *out, r] for X [N, C, r spatial dims]")

    def infer(self, node):
        x, grid = node.inputs
        self.check(node, x.shape, grid.shape)
        return [(x.shape[:2] + grid.shape[1:-1], x.dtype)]

    def reference(self, node, inputs):
        x, grid = inputs
        self.check(node, x.shape, grid.shape)
        mode, padding = self.attr(node, "mode"), self.attr(node, "padding_mode")
        if mode == "cubic":
            raise UnsupportedOpError(f"GridSample node '{node.name}': mode 'cubic' has no "
                                     "reference in applec")
        align = bool(self.attr(node, "align_corners"))
        spatial = x.shape[2:]
        coords = []
        for k, size in enumerate(spatial):
            c = grid_source(grid[..., len(spatial) - 1 - k], size, align)
            if mode == "nearest":
                c = np.rint(c)
            if padding == "border":
                c = np.clip(c, 0, size - 1)
            elif padding == "reflection":
                c = reflect(c.astype(np.float64), *grid_bounds(size, align)).astype(np.float32)
            coords.append(c)
        picks = [[(np.floor(c), None)] if mode == "nearest" else
                 [(np.floor(c), 1 - (c - np.floor(c))), (np.floor(c) + 1, c - np.floor(c))]
                 for c in coords]
        batch = np.arange(x.shape[0]).reshape((-1,) + (1,) * (grid.ndim - 2))
        out = self._blend(x, batch, picks, padding, align, [])
        return [np.moveaxis(out, -1, 1).astype(x.dtype)]

    def _blend(self, x, batch, picks, padding, align, chosen):
        """Sum over the corners of axes len(chosen).. of weight * pixel, innermost axis
        first, as the ONNX reference interpolates."""
        k = len(chosen)
        if k == len(picks):
            return self._pixels(x, batch, chosen, padding, align)
        total = None
        for index, weight in picks[k]:
            value = self._blend(x, batch, picks, padding, align, chosen + [index])
            if weight is not None:
                value = value * weight[..., None]
            total = value if total is None else total + value
        return total

    @staticmethod
    def _pixels(x, batch, indices, padding, align):
        """x[n, :, i0, i1...] for integer-valued float indices, [N, *out, C]; outside
        pixels are 0 (zeros), the edge (border) or mirrored (reflection)."""
        valid = np.ones(batch.shape, bool)
        fixed = []
        for index, size in zip(indices, x.shape[2:]):
            if padding == "zeros":
                valid = valid & (index >= 0) & (index <= size - 1)
            elif padding == "reflection" and align:
                index = np.minimum(index, 2 * (size - 1) - index)  # size -> size - 2
            fixed.append(np.clip(index, 0, size - 1).astype(np.int64))
        values = np.moveaxis(x, 1, -1)[(batch,) + tuple(fixed)]
        return np.where(valid[..., None], values, np.zeros((), x.dtype))


# -- data-dependent shapes -------------------------------------------------------------
def _needs_constant(op: OpDef, node, index: int, what: str) -> np.ndarray:
    value = node.inputs[index]
    if value.const is None:
        raise UnsupportedOpError(
            f"{op.op_type} node '{node.name}': the output shape depends on run-time data "
            f"({what} of '{value.name}'); supported only when that input is a compile-time "
            "constant")
    return value.const


@register
class NonZero(OpDef):
    """The indices of the non-zero elements, [rank, count], int64 (folds to a constant)."""

    static_inputs = (0,)

    def infer(self, node):
        data = _needs_constant(self, node, 0, "the number of non-zero elements")
        return [((data.ndim, int(np.count_nonzero(data))), np.int64)]

    def reference(self, node, inputs):
        return [np.array(np.nonzero(inputs[0]), np.int64).reshape(inputs[0].ndim, -1)]


@register
class Compress(OpDef):
    """The slices along `axis` (of the flattened input when axis is absent) whose entry
    in `condition` is true; a shorter condition leaves the rest out."""

    attrs = {"axis": None}
    static_inputs = (1,)

    def picked(self, node, in_shape, condition) -> tuple[int | None, np.ndarray]:
        axis = self.attr(node, "axis")
        dim = math.prod(in_shape) if axis is None else \
            in_shape[normalize_axis(node, axis, len(in_shape))]
        condition = np.asarray(condition).reshape(-1).astype(bool)
        if condition.size > dim and condition[dim:].any():
            self.fail(node, f"condition selects beyond the {dim} entries there are")
        axis = None if axis is None else normalize_axis(node, axis, len(in_shape))
        return axis, np.nonzero(condition[:dim])[0]

    def infer(self, node):
        x = node.inputs[0]
        condition = _needs_constant(self, node, 1, "the true entries")
        axis, picked = self.picked(node, x.shape, condition)
        if axis is None:
            return [((len(picked),), x.dtype)]
        return [(x.shape[:axis] + (len(picked),) + x.shape[axis + 1:], x.dtype)]

    def reference(self, node, inputs):
        x, condition = inputs
        axis, picked = self.picked(node, x.shape, condition)
        if axis is None:
            return [x.reshape(-1)[picked]]
        return [np.take(x, picked, axis=axis)]
