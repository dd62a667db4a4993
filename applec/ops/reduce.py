"""Op table entries: reductions, arg-reductions, TopK and CumSum."""

from __future__ import annotations

import numpy as np

from . import OpDef, as_ints, normalize_axis, register


def _acc(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float32) if x.dtype == np.float16 else x


class Reduce(OpDef):
    """Opset-18 form: optional constant `axes` input 1.

    No axes (or an empty list) reduces everything, unless noop_with_empty_axes=1: then the
    reduction runs over no axes, so only the elementwise part (e.g. the square) remains.
    """

    attrs = {"keepdims": 1, "noop_with_empty_axes": 0}
    static_inputs = (1,)

    def axes(self, node, rank: int, data) -> tuple[int, ...]:
        axes = as_ints(data)
        if not axes:
            return () if self.attr(node, "noop_with_empty_axes") else tuple(range(rank))
        normalized = sorted({normalize_axis(node, a, rank) for a in axes})
        if len(normalized) != len(axes):
            self.fail(node, f"repeated axes {axes}")
        return tuple(normalized)

    def infer(self, node):
        x = node.inputs[0]
        axes = self.axes(node, len(x.shape), self.static(node, 1))
        if self.attr(node, "keepdims"):
            shape = tuple(1 if i in axes else d for i, d in enumerate(x.shape))
        else:
            shape = tuple(d for i, d in enumerate(x.shape) if i not in axes)
        return [(shape, x.dtype)]

    def reference(self, node, inputs):
        x = inputs[0]
        axes = self.axes(node, x.ndim, inputs[1] if len(inputs) > 1 else None)
        keep = bool(self.attr(node, "keepdims"))
        with np.errstate(all="ignore"):  # e.g. log of an empty sum is -inf, as ONNX says
            return [np.asarray(self.reduce(_acc(x), axes, keep)).astype(x.dtype)]

    def reduce(self, x: np.ndarray, axes: tuple[int, ...], keep: bool) -> np.ndarray:
        raise NotImplementedError


@register
class ReduceSum(Reduce):
    def reduce(self, x, axes, keep):
        return np.sum(x, axis=axes, keepdims=keep, dtype=x.dtype)


@register
class ReduceMean(Reduce):
    def reduce(self, x, axes, keep):
        return np.mean(x, axis=axes, keepdims=keep, dtype=x.dtype)


def _lowest(dtype: np.dtype):
    """The identity of max: what the maximum of an empty set is (ONNX: -inf, the int's
    minimum, False)."""
    if dtype.kind == "f":
        return -np.inf
    return False if dtype.kind == "b" else np.iinfo(dtype).min


def _highest(dtype: np.dtype):
    if dtype.kind == "f":
        return np.inf
    return True if dtype.kind == "b" else np.iinfo(dtype).max


@register
class ReduceMax(Reduce):
    def reduce(self, x, axes, keep):
        return np.max(x, axis=axes, keepdims=keep, initial=_lowest(x.dtype))


@register
class ReduceMin(Reduce):
    def reduce(self, x, axes, keep):
        return np.min(x, axis=axes, keepdims=keep, initial=_highest(x.dtype))


@register
class ReduceProd(Reduce):
    def reduce(self, x, axes, keep):
        return np.prod(x, axis=axes, keepdims=keep, dtype=x.dtype)


@register
class ReduceL1(Reduce):
    def reduce(self, x, axes, keep):
        return np.sum(np.abs(x), axis=axes, keepdims=keep, dtype=x.dtype)


@register
class ReduceL2(Reduce):
    def reduce(self, x, axes, keep):
        return np.sqrt(np.sum(np.square(x), axis=axes, keepdims=keep, dtype=x.dtype))


@register
class ReduceSumSquare(Reduce):
    def reduce(self, x, axes, keep):
        return np.sum(np.square(x), axis=axes, keepdims=keep, dtype=x.dtype)


@register
class ReduceLogSumExp(Reduce):
    def reduce(self, x, axes, keep):
        if not axes:
            return x
        top = np.max(x, axis=axes, keepdims=True, initial=-np.inf)
        top = np.where(np.isfinite(top), top, 0)  # keeps all -inf rows at -inf, not NaN
        total = np.log(np.sum(np.exp(x - top), axis=axes, keepdims=True)) + top
        return total if keep else np.squeeze(total, axis=axes)


# -- arg-reductions and friends ----------------------------------------------------------
class ArgReduce(OpDef):
    """Index (int64) of the first extreme along `axis`, or the last with select_last_index."""

    attrs = {"axis": 0, "keepdims": 1, "select_last_index": 0}
    pick = staticmethod(np.argmax)

    def infer(self, node):
        x = node.inputs[0]
        axis = normalize_axis(node, self.attr(node, "axis"), len(x.shape))
        shape = list(x.shape)
        if self.attr(node, "keepdims"):
            shape[axis] = 1
        else:
            del shape[axis]
        return [(tuple(shape), np.int64)]

    def reference(self, node, inputs):
        x = inputs[0]
        axis = normalize_axis(node, self.attr(node, "axis"), x.ndim)
        if self.attr(node, "select_last_index"):
            index = x.shape[axis] - 1 - self.pick(np.flip(x, axis), axis=axis)
        else:
            index = self.pick(x, axis=axis)
        if self.attr(node, "keepdims"):
            index = np.expand_dims(index, axis)
        return [index.astype(np.int64)]


@register
class ArgMax(ArgReduce):
    pick = staticmethod(np.argmax)


@register
class ArgMin(ArgReduce):
    pick = staticmethod(np.argmin)


@register
class TopK(OpDef):
    """Values and int64 indices of the k largest (or smallest) along `axis`.

    Equal values keep their original order (lower index first). sorted=0 also sorts.
    """

    attrs = {"axis": -1, "largest": 1, "sorted": 1}
    static_inputs = (1,)

    def k(self, node, x_shape, data) -> tuple[int, int]:
        axis = normalize_axis(node, self.attr(node, "axis"), len(x_shape))
        k = as_ints(data)
        if k is None or len(k) != 1 or not 0 <= k[0] <= x_shape[axis]:
            self.fail(node, f"k={k} is out of range for axis {axis}")
        return k[0], axis

    def infer(self, node):
        x = node.inputs[0]
        k, axis = self.k(node, x.shape, self.static(node, 1))
        shape = x.shape[:axis] + (k,) + x.shape[axis + 1:]
        return [(shape, x.dtype), (shape, np.int64)]

    def reference(self, node, inputs):
        x, k = inputs
        k, axis = self.k(node, x.shape, k)
        if self.attr(node, "largest"):
            # A stable ascending sort of the reversed axis, read backwards, is a descending
            # sort in which equal values keep their original order.
            order = np.argsort(np.flip(x, axis), axis=axis, kind="stable")
            order = x.shape[axis] - 1 - np.flip(order, axis)
        else:
            order = np.argsort(x, axis=axis, kind="stable")
        index = np.take(order, np.arange(k), axis=axis)
        return [np.take_along_axis(x, index, axis=axis), index.astype(np.int64)]


@register
class CumSum(OpDef):
    """Cumulative sum along the constant scalar `axis` input; exclusive and reverse flags."""

    attrs = {"exclusive": 0, "reverse": 0}
    static_inputs = (1,)

    def axis(self, node, rank: int, data) -> int:
        axis = as_ints(data)
        if axis is None or len(axis) != 1:
            self.fail(node, "axis must be a scalar")
        return normalize_axis(node, axis[0], rank)

    def infer(self, node):
        x = node.inputs[0]
        self.axis(node, len(x.shape), self.static(node, 1))
        return [(x.shape, x.dtype)]

    def reference(self, node, inputs):
        x = inputs[0]
        axis = self.axis(node, x.ndim, inputs[1])
        reverse = self.attr(node, "reverse")
        xs = np.flip(x, axis) if reverse else x
        total = np.cumsum(_acc(xs), axis=axis, dtype=_acc(xs).dtype)
        if self.attr(node, "exclusive"):
            total = total - _acc(xs)
        total = np.flip(total, axis) if reverse else total
        return [total.astype(x.dtype)]
