"""Op table entries: shape, layout, indexing and data-movement ops.

Ops whose output shape depends on an input's data (Reshape's shape, Slice's starts...)
list that input in `static_inputs`; `infer` reads it with `self.static`, which fails when
it is not a compile-time constant, and `reference` reads the same data from its inputs.
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import UnsupportedOpError
from . import REQUIRED, OpDef, as_ints, normalize_axis, register


def _optional(inputs: list, index: int):
    return inputs[index] if index < len(inputs) else None


# -- shape and layout --------------------------------------------------------------------
@register
class Reshape(OpDef):
    """0 copies the input dim (unless allowzero=1), -1 takes what is left."""

    attrs = {"allowzero": 0}
    static_inputs = (1,)

    def out_shape(self, node, in_shape, data) -> tuple[int, ...]:
        shape = as_ints(data)
        if not self.attr(node, "allowzero"):
            if any(d == 0 and i >= len(in_shape) for i, d in enumerate(shape)):
                self.fail(node, f"0 in {shape} has no input dim to copy")
            shape = [in_shape[i] if d == 0 else d for i, d in enumerate(shape)]
        if shape.count(-1) > 1 or any(d < -1 for d in shape):
            self.fail(node, f"invalid target shape {shape}")
        size, known = math.prod(in_shape), math.prod(d for d in shape if d != -1)
        if -1 in shape:
            if known == 0 or size % known:
                self.fail(node, f"cannot infer -1 in {shape} for {size} elements")
            shape[shape.index(-1)] = size // known
        if math.prod(shape) != size:
            self.fail(node, f"cannot reshape {size} elements to {shape}")
        return tuple(shape)

    def infer(self, node):
        x = node.inputs[0]
        return [(self.out_shape(node, x.shape, self.static(node, 1)), x.dtype)]

    def reference(self, node, inputs):
        x, shape = inputs
        return [x.reshape(self.out_shape(node, x.shape, shape))]


@register
class Flatten(OpDef):
    attrs = {"axis": 1}

    def out_shape(self, node, in_shape) -> tuple[int, int]:
        axis = self.attr(node, "axis")
        rank = len(in_shape)
        if not -rank <= axis <= rank:
            self.fail(node, f"axis {axis} is out of range for rank {rank}")
        axis = axis + rank if axis < 0 else axis
        return math.prod(in_shape[:axis]), math.prod(in_shape[axis:])

    def infer(self, node):
        x = node.inputs[0]
        return [(self.out_shape(node, x.shape), x.dtype)]

    def reference(self, node, inputs):
        return [inputs[0].reshape(self.out_shape(node, inputs[0].shape))]


@register
class Transpose(OpDef):
    """`perm` defaults to reversing the dims."""

    attrs = {"perm": None}

    def perm(self, node, rank: int) -> tuple[int, ...]:
        perm = self.attr(node, "perm")
        perm = tuple(range(rank))[::-1] if perm is None else tuple(perm)
        if sorted(perm) != list(range(rank)):
            self.fail(node, f"perm {list(perm)} is not a permutation of rank {rank}")
        return perm

    def infer(self, node):
        x = node.inputs[0]
        return [(tuple(x.shape[p] for p in self.perm(node, len(x.shape))), x.dtype)]

    def reference(self, node, inputs):
        return [np.transpose(inputs[0], self.perm(node, inputs[0].ndim))]


@register
class Squeeze(OpDef):
    """Remove the listed unit dims (input 1), or every unit dim when axes is omitted or
    empty (as onnxruntime does)."""

    static_inputs = (1,)

    def out_shape(self, node, in_shape, data) -> tuple[int, ...]:
        axes = as_ints(data)
        if not axes:
            return tuple(d for d in in_shape if d != 1)
        axes = {normalize_axis(node, a, len(in_shape)) for a in axes}
        if any(in_shape[a] != 1 for a in axes):
            self.fail(node, f"cannot squeeze axes {sorted(axes)}: not all are 1")
        return tuple(d for i, d in enumerate(in_shape) if i not in axes)

    def infer(self, node):
        x = node.inputs[0]
        return [(self.out_shape(node, x.shape, self.static(node, 1)), x.dtype)]

    def reference(self, node, inputs):
        x = inputs[0]
        return [x.reshape(self.out_shape(node, x.shape, _optional(inputs, 1)))]


@register
class Unsqueeze(OpDef):
    """Insert unit dims at `axes` (input 1), numbered in the output's rank."""

    static_inputs = (1,)

    def out_shape(self, node, in_shape, data) -> tuple[int, ...]:
        axes = as_ints(data)
        rank = len(in_shape) + len(axes)
        axes = {normalize_axis(node, a, rank) for a in axes}
        if len(axes) != len(as_ints(data)):
            self.fail(node, f"repeated axes {as_ints(data)}")
        dims = iter(in_shape)
        return tuple(1 if i in axes else next(dims) for i in range(rank))

    def infer(self, node):
        x = node.inputs[0]
        return [(self.out_shape(node, x.shape, self.static(node, 1)), x.dtype)]

    def reference(self, node, inputs):
        x, axes = inputs
        return [x.reshape(self.out_shape(node, x.shape, axes))]


@register
class Shape(OpDef):
    """The input's shape as int64, sliced by start/end (clamped like Python slices)."""

    attrs = {"start": 0, "end": None}

    def dims(self, node, in_shape) -> tuple[int, ...]:
        return tuple(in_shape[self.attr(node, "start"):self.attr(node, "end")])

    def infer(self, node):
        return [((len(self.dims(node, node.inputs[0].shape)),), np.int64)]

    def reference(self, node, inputs):
        return [np.array(self.dims(node, inputs[0].shape), np.int64)]


@register
class Size(OpDef):
    def infer(self, node):
        return [((), np.int64)]

    def reference(self, node, inputs):
        return [np.array(inputs[0].size, np.int64)]


# -- joining and splitting ---------------------------------------------------------------
@register
class Concat(OpDef):
    attrs = {"axis": REQUIRED}

    def infer(self, node):
        first = node.inputs[0].shape
        axis = normalize_axis(node, self.attr(node, "axis"), len(first))
        for value in node.inputs:
            if len(value.shape) != len(first) or any(
                    a != b for i, (a, b) in enumerate(zip(value.shape, first)) if i != axis):
                self.fail(node, f"shapes differ outside axis {axis}")
        total = sum(v.shape[axis] for v in node.inputs)
        return [(first[:axis] + (total,) + first[axis + 1:], node.inputs[0].dtype)]

    def reference(self, node, inputs):
        axis = normalize_axis(node, self.attr(node, "axis"), inputs[0].ndim)
        return [np.concatenate(inputs, axis=axis)]


@register
class Split(OpDef):
    """Sizes from input 1, else `num_outputs` (or the output count) near-equal chunks,
    the last one smaller."""

    attrs = {"axis": 0, "num_outputs": None}
    static_inputs = (1,)

    def sizes(self, node, in_shape, data) -> tuple[int, list[int]]:
        axis = normalize_axis(node, self.attr(node, "axis"), len(in_shape))
        dim, sizes = in_shape[axis], as_ints(data)
        if sizes is None:
            count = self.attr(node, "num_outputs") or len(node.outputs)
            chunk = -(-dim // count)
            sizes = [chunk] * (count - 1) + [dim - chunk * (count - 1)]
        if len(sizes) != len(node.outputs) or sum(sizes) != dim or min(sizes) < 0:
            self.fail(node, f"cannot split {dim} into {sizes} for {len(node.outputs)} outputs")
        return axis, sizes

    def infer(self, node):
        x = node.inputs[0]
        axis, sizes = self.sizes(node, x.shape, self.static(node, 1))
        return [(x.shape[:axis] + (s,) + x.shape[axis + 1:], x.dtype) for s in sizes]

    def reference(self, node, inputs):
        x = inputs[0]
        axis, sizes = self.sizes(node, x.shape, _optional(inputs, 1))
        return np.split(x, np.cumsum(sizes)[:-1], axis=axis)


# -- slicing and indexing ----------------------------------------------------------------
@register
class Slice(OpDef):
    """starts/ends/axes/steps inputs; out-of-range bounds clamp, negative ones count back."""

    static_inputs = (1, 2, 3, 4)

    def slices(self, node, in_shape, starts, ends, axes, steps) -> tuple[slice, ...]:
        starts, ends = as_ints(starts), as_ints(ends)
        axes = as_ints(axes) or list(range(len(starts)))
        steps = as_ints(steps) or [1] * len(starts)
        if not len(starts) == len(ends) == len(axes) == len(steps) or 0 in steps:
            self.fail(node, "starts/ends/axes/steps must have equal lengths, steps non-zero")
        result = [slice(None)] * len(in_shape)
        for start, end, axis, step in zip(starts, ends, axes, steps):
            axis = normalize_axis(node, axis, len(in_shape))
            dim = in_shape[axis]
            start, end = (start + dim if start < 0 else start), (end + dim if end < 0 else end)
            if step > 0:
                start, end = min(max(start, 0), dim), min(max(end, 0), dim)
            else:
                start, end = min(max(start, 0), dim - 1), min(max(end, -1), dim - 1)
            result[axis] = slice(start, None if end < 0 else end, step)
        return tuple(result)

    def infer(self, node):
        x = node.inputs[0]
        bounds = [self.static(node, i) for i in range(1, 5)]
        index = self.slices(node, x.shape, *bounds)
        return [(tuple(len(range(*s.indices(d))) for s, d in zip(index, x.shape)), x.dtype)]

    def reference(self, node, inputs):
        x = inputs[0]
        bounds = [_optional(inputs, i) for i in range(1, 5)]
        return [x[self.slices(node, x.shape, *bounds)]]


@register
class Gather(OpDef):
    """Indices (negative ones count back) pick slices of `data` along `axis`."""

    attrs = {"axis": 0}

    def infer(self, node):
        data, indices = node.inputs
        axis = normalize_axis(node, self.attr(node, "axis"), len(data.shape))
        return [(data.shape[:axis] + indices.shape + data.shape[axis + 1:], data.dtype)]

    def reference(self, node, inputs):
        data, indices = inputs
        axis = normalize_axis(node, self.attr(node, "axis"), data.ndim)
        return [np.take(data, indices.astype(np.int64), axis=axis)]


@register
class GatherElements(OpDef):
    attrs = {"axis": 0}

    def infer(self, node):
        data, indices = node.inputs
        axis = normalize_axis(node, self.attr(node, "axis"), len(data.shape))
        if len(indices.shape) != len(data.shape) or any(
                i > d for a, (i, d) in enumerate(zip(indices.shape, data.shape)) if a != axis):
            self.fail(node, "indices must have data's rank and fit inside it")
        return [(indices.shape, data.dtype)]

    def reference(self, node, inputs):
        data, indices = inputs
        axis = normalize_axis(node, self.attr(node, "axis"), data.ndim)
        indices = indices.astype(np.int64)
        indices = np.where(indices < 0, indices + data.shape[axis], indices)
        window = tuple(slice(None) if a == axis else slice(0, n)
                       for a, n in enumerate(indices.shape))
        return [np.take_along_axis(data[window], indices, axis=axis)]


@register
class GatherND(OpDef):
    """Each index tuple in the last dim of `indices` picks a slice of `data`; the first
    `batch_dims` dims are shared by both."""

    attrs = {"batch_dims": 0}

    def infer(self, node):
        data, indices = node.inputs
        b, depth = self.attr(node, "batch_dims"), indices.shape[-1] if indices.shape else 0
        if (not indices.shape or data.shape[:b] != indices.shape[:b]
                or b + depth > len(data.shape)):
            self.fail(node, f"indices do not fit data with batch_dims={b}")
        return [(indices.shape[:-1] + data.shape[b + depth:], data.dtype)]

    def reference(self, node, inputs):
        data, indices = inputs
        b, depth = self.attr(node, "batch_dims"), indices.shape[-1]
        batch = math.prod(data.shape[:b])
        data_b = data.reshape((batch,) + data.shape[b:])
        idx = indices.astype(np.int64).reshape(batch, -1, depth)
        idx = np.where(idx < 0, idx + np.array(data.shape[b:b + depth]), idx)
        picked = data_b[(np.arange(batch)[:, None],) + tuple(np.moveaxis(idx, -1, 0))]
        return [picked.reshape(indices.shape[:-1] + data.shape[b + depth:])]


@register
class Trilu(OpDef):
    """Keep the upper (or lower) triangle of the last two dims, offset by input k."""

    attrs = {"upper": 1}
    static_inputs = (1,)

    def infer(self, node):
        x = node.inputs[0]
        if len(x.shape) < 2:
            self.fail(node, "input must have rank >= 2")
        return [(x.shape, x.dtype)]

    def reference(self, node, inputs):
        x, k = inputs[0], as_ints(_optional(inputs, 1)) or [0]
        keep = np.triu if self.attr(node, "upper") else np.tril
        return [keep(x, k[0])]


# -- dtype -------------------------------------------------------------------------------
# numpy's own dtypes. The ml_dtypes ones onnx maps float8/bfloat16/int4 to have no numpy
# arithmetic we could trust for a reference (casts do not saturate) and no CoreML type.
STANDARD_DTYPES = {np.dtype(t) for t in (bool, np.int8, np.int16, np.int32, np.int64,
                                         np.uint8, np.uint16, np.uint32, np.uint64,
                                         np.float16, np.float32, np.float64)}


def _check_castable(op: OpDef, node, dtype: np.dtype) -> np.dtype:
    if dtype not in STANDARD_DTYPES:
        raise UnsupportedOpError(f"{op.op_type} node '{node.name}': dtype {dtype} is not "
                                 "supported (no numpy or CoreML arithmetic for it)")
    return dtype


@register
class Cast(OpDef):
    """`to` arrives as a numpy dtype; `saturate` only matters for float8, which we lack."""

    attrs = {"to": REQUIRED, "saturate": 1}

    def infer(self, node):
        dtype = _check_castable(self, node, np.dtype(self.attr(node, "to")))
        return [(node.inputs[0].shape, dtype)]

    def reference(self, node, inputs):
        return [inputs[0].astype(np.dtype(self.attr(node, "to")))]


@register
class CastLike(OpDef):
    attrs = {"saturate": 1}

    def infer(self, node):
        x, like = node.inputs
        return [(x.shape, _check_castable(self, node, like.dtype))]

    def reference(self, node, inputs):
        return [inputs[0].astype(inputs[1].dtype)]


# -- constructing and tiling -------------------------------------------------------------
@register
class Expand(OpDef):
    """Broadcast the input against the constant `shape` input (both ways)."""

    static_inputs = (1,)

    def out_shape(self, node, in_shape, data) -> tuple[int, ...]:
        try:
            return tuple(np.broadcast_shapes(in_shape, tuple(as_ints(data))))
        except ValueError:
            self.fail(node, f"shape {as_ints(data)} does not broadcast with the input")

    def infer(self, node):
        x = node.inputs[0]
        return [(self.out_shape(node, x.shape, self.static(node, 1)), x.dtype)]

    def reference(self, node, inputs):
        x, shape = inputs
        return [np.broadcast_to(x, self.out_shape(node, x.shape, shape)).copy()]


@register
class Tile(OpDef):
    static_inputs = (1,)

    def repeats(self, node, rank: int, data) -> list[int]:
        repeats = as_ints(data)
        if len(repeats) != rank or min(repeats, default=0) < 0:
            self.fail(node, f"repeats {repeats} must be {rank} non-negative counts")
        return repeats

    def infer(self, node):
        x = node.inputs[0]
        repeats = self.repeats(node, len(x.shape), self.static(node, 1))
        return [(tuple(d * r for d, r in zip(x.shape, repeats)), x.dtype)]

    def reference(self, node, inputs):
        x, repeats = inputs
        return [np.tile(x, self.repeats(node, x.ndim, repeats))]


@register
class ConstantOfShape(OpDef):
    """`value` is a one-element array whose dtype is the output's (float32 0 by default)."""

    attrs = {"value": np.zeros(1, np.float32)}
    static_inputs = (0,)

    def fill(self, node) -> np.ndarray:
        value = np.asarray(self.attr(node, "value"))
        if value.size != 1:
            self.fail(node, "value must have one element")
        return value.reshape(())

    def out_shape(self, node, data) -> tuple[int, ...]:
        shape = as_ints(data)
        if min(shape, default=0) < 0:
            self.fail(node, f"negative dims in {shape}")
        return tuple(shape)

    def infer(self, node):
        return [(self.out_shape(node, self.static(node, 0)), self.fill(node).dtype)]

    def reference(self, node, inputs):
        value = self.fill(node)
        return [np.full(self.out_shape(node, inputs[0]), value, value.dtype)]


@register
class Range(OpDef):
    """start + i * delta for i < max(ceil((limit - start) / delta), 0); dtype of start."""

    static_inputs = (0, 1, 2)

    def count(self, node, start, limit, delta) -> int:
        start, limit, delta = (np.asarray(v).reshape(()) for v in (start, limit, delta))
        if delta == 0:
            self.fail(node, "delta must be non-zero")
        if start.dtype.kind in "iu":
            return max(-((int(start) - int(limit)) // int(delta)), 0)
        return max(math.ceil(float(limit - start) / float(delta)), 0)

    def infer(self, node):
        bounds = [self.static(node, i) for i in range(3)]
        dtype = _check_castable(self, node, node.inputs[0].dtype)
        return [((self.count(node, *bounds),), dtype)]

    def reference(self, node, inputs):
        start, limit, delta = inputs
        steps = np.arange(self.count(node, start, limit, delta))
        return [(start.reshape(()) + steps * delta.reshape(())).astype(start.dtype)]


@register
class Pad(OpDef):
    """pads (input 1, begins then ends, negative crops), constant_value (2), axes (3);
    mode constant, reflect, edge or wrap."""

    attrs = {"mode": "constant"}
    static_inputs = (1, 3)
    MODES = ("constant", "reflect", "edge", "wrap")  # numpy.pad's names too

    def widths(self, node, in_shape, pads, axes) -> list[tuple[int, int]]:
        rank, pads = len(in_shape), as_ints(pads)
        axes = [normalize_axis(node, a, rank) for a in as_ints(axes) or range(rank)]
        if len(pads) != 2 * len(axes) or len(set(axes)) != len(axes):
            self.fail(node, f"pads {pads} need two values for each of axes {axes}")
        if self.attr(node, "mode") not in self.MODES:
            self.fail(node, f"unknown mode '{self.attr(node, 'mode')}'")
        widths = [(0, 0)] * rank
        for i, axis in enumerate(axes):
            widths[axis] = (pads[i], pads[i + len(axes)])
        if any(d + b + e < 0 for d, (b, e) in zip(in_shape, widths)):
            self.fail(node, f"pads {pads} crop more than the input has")
        return widths

    def infer(self, node):
        x = node.inputs[0]
        widths = self.widths(node, x.shape, self.static(node, 1), self.static(node, 3))
        return [(tuple(d + b + e for d, (b, e) in zip(x.shape, widths)), x.dtype)]

    def reference(self, node, inputs):
        x = inputs[0]
        widths = self.widths(node, x.shape, inputs[1], _optional(inputs, 3))
        crop = tuple(slice(max(-b, 0), d - max(-e, 0)) for d, (b, e) in zip(x.shape, widths))
        grow = [(max(b, 0), max(e, 0)) for b, e in widths]
        mode = self.attr(node, "mode")
        if mode != "constant":
            return [np.pad(x[crop], grow, mode=mode)]
        value = _optional(inputs, 2)
        value = 0 if value is None or value.size == 0 else value.reshape(-1)[0]
        return [np.pad(x[crop], grow, constant_values=value)]
