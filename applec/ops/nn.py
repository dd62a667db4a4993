"""Op table entries: convolution, pooling, normalization, matrix products, softmax.

The sliding-window references (Conv, pools) pad the input, take a strided window view
(`sliding_window_view`, no copies) and reduce it or multiply it as one matrix (im2col), so
they are fast enough to fold constants and to serve as test oracles.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from ..errors import UnsupportedOpError
from . import REQUIRED, OpDef, normalize_axis, register

AUTO_PADS = ("NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID")


def broadcasts_to(shape, target) -> bool:
    """Whether `shape` broadcasts to exactly `target` (unidirectional broadcasting)."""
    try:
        return np.broadcast_shapes(shape, target) == tuple(target)
    except ValueError:
        return False


def accumulator(dtype: np.dtype) -> np.dtype:
    """The dtype references accumulate in: float16 sums in float32, like every backend."""
    return np.dtype(np.float32) if dtype == np.float16 else dtype


# -- sliding-window geometry -------------------------------------------------------------
@dataclass(frozen=True)
class Window:
    """Per spatial dim: kernel size, stride, dilation, begin/end pads and output size."""

    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    begins: tuple[int, ...]
    ends: tuple[int, ...]
    out: tuple[int, ...]

    @property
    def spans(self) -> tuple[int, ...]:
        return tuple((k - 1) * d + 1 for k, d in zip(self.kernel, self.dilations))


def _spatial_attr(op: OpDef, node, name: str, n: int, default: int) -> tuple[int, ...]:
    values = node.attrs.get(name) or [default] * n
    if len(values) != n:
        op.fail(node, f"{name} {list(values)} needs {n} values")
    return tuple(int(v) for v in values)


def _same_pads(total: int, upper: bool) -> tuple[int, int]:
    """Split a total padding; SAME_UPPER puts the odd element at the end."""
    small = total // 2
    return (small, total - small) if upper else (total - small, small)


def window_geometry(op: OpDef, node, spatial, kernel, ceil_mode: bool = False) -> Window:
    """Output size and pads of a Conv/pool window over `spatial` (ONNX auto_pad rules)."""
    n = len(spatial)
    strides = _spatial_attr(op, node, "strides", n, 1)
    dilations = _spatial_attr(op, node, "dilations", n, 1)
    pads = _spatial_attr(op, node, "pads", 2 * n, 0)
    auto_pad = op.attr(node, "auto_pad")
    if auto_pad not in AUTO_PADS:
        op.fail(node, f"unknown auto_pad '{auto_pad}'")
    begins, ends, out = [], [], []
    for i, (size, k, s, d) in enumerate(zip(spatial, kernel, strides, dilations)):
        span = (k - 1) * d + 1
        if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            o = -(-size // s)
            b, e = _same_pads(max(0, (o - 1) * s + span - size), auto_pad == "SAME_UPPER")
        else:
            b, e = (0, 0) if auto_pad == "VALID" else (pads[i], pads[i + n])
            room = size + b + e - span
            if room < 0:
                op.fail(node, f"window {span} is larger than padded input {size + b + e}")
            o = (-(-room // s) if ceil_mode else room // s) + 1
            if ceil_mode and (o - 1) * s >= size + b:
                o -= 1  # the last window would start in the end padding
        begins.append(b)
        ends.append(e)
        out.append(o)
    return Window(tuple(kernel), strides, dilations, tuple(begins), tuple(ends), tuple(out))


def pad_windows(x: np.ndarray, w: Window, value, tail_value=None) -> np.ndarray:
    """Pad the spatial dims of (N, C, ...) `x` by the window's pads, plus `tail_value`
    at the end where ceil_mode's last window reaches past the padding."""
    lead = [(0, 0)] * (x.ndim - len(w.kernel))
    xp = np.pad(x, lead + list(zip(w.begins, w.ends)), constant_values=value)
    extra = [max(0, (o - 1) * s + span - size)
             for o, s, span, size in zip(w.out, w.strides, w.spans, xp.shape[len(lead):])]
    if any(extra):
        fill = value if tail_value is None else tail_value
        xp = np.pad(xp, lead + [(0, e) for e in extra], constant_values=fill)
    return xp


def windows(xp: np.ndarray, w: Window) -> np.ndarray:
    """View of padded (N, C, ...) `xp` as (N, C, *out, *kernel) windows."""
    n = len(w.kernel)
    lead = xp.ndim - n
    view = sliding_window_view(xp, w.spans, axis=tuple(range(lead, xp.ndim)))
    index = ((slice(None),) * lead
             + tuple(slice(0, (o - 1) * s + 1, s) for o, s in zip(w.out, w.strides))
             + tuple(slice(None, None, d) for d in w.dilations))
    return view[index]


# -- convolution -------------------------------------------------------------------------
class ConvBase(OpDef):
    attrs = {"auto_pad": "NOTSET", "dilations": None, "group": 1, "kernel_shape": None,
             "pads": None, "strides": None}

    def check(self, node, transposed: bool) -> tuple[int, ...]:
        """Check X/W ranks and channels (W is (M, C/group, ...), or (C, M/group, ...) when
        transposed); return the kernel shape."""
        x, w = node.inputs[0], node.inputs[1]
        if len(x.shape) < 3 or len(w.shape) != len(x.shape):
            self.fail(node, "X must be (N, C, ...) and W of the same rank")
        group = self.attr(node, "group")
        w_channels = w.shape[0] if transposed else w.shape[1] * group
        if group < 1 or x.shape[1] % group or w_channels != x.shape[1]:
            self.fail(node, f"channels do not match weights with group={group}")
        kernel, declared = tuple(w.shape[2:]), self.attr(node, "kernel_shape")
        if declared is not None and tuple(declared) != kernel:
            self.fail(node, f"kernel_shape {list(declared)} does not match W")
        return kernel


@register
class Conv(ConvBase):
    def infer(self, node):
        x, w, b = node.inputs[0], node.inputs[1], node.input(2)
        window = window_geometry(self, node, x.shape[2:], self.check(node, False))
        m = w.shape[0]
        if m % self.attr(node, "group") or (b is not None and b.shape != (m,)):
            self.fail(node, f"bias must be ({m},) and divisible by group")
        return [((x.shape[0], m) + window.out, x.dtype)]

    def reference(self, node, inputs):
        x, w = inputs[:2]
        bias = inputs[2] if len(inputs) > 2 else None
        acc = accumulator(x.dtype)
        window = window_geometry(self, node, x.shape[2:], w.shape[2:])
        n, m, g = x.shape[0], w.shape[0], self.attr(node, "group")
        rank = len(window.kernel)
        view = windows(pad_windows(x.astype(acc), window, 0), window)
        # im2col: (N, C, *out, *kernel) -> (N, group, C/group * kernel, out pixels).
        perm = (0, 1) + tuple(range(2 + rank, 2 + 2 * rank)) + tuple(range(2, 2 + rank))
        cols = view.transpose(perm).reshape(n, g, -1, math.prod(window.out))
        y = np.matmul(w.astype(acc, copy=False).reshape(g, m // g, -1), cols)
        y = y.reshape((n, m) + window.out)
        if bias is not None:
            y = y + bias.astype(acc).reshape((m,) + (1,) * rank)
        return [y.astype(x.dtype)]


def transpose_geometry(op: OpDef, node, spatial, kernel) -> Window:
    """Pads and output size of ConvTranspose (the ONNX output_shape/auto_pad rules)."""
    n = len(spatial)
    strides = _spatial_attr(op, node, "strides", n, 1)
    dilations = _spatial_attr(op, node, "dilations", n, 1)
    pads = _spatial_attr(op, node, "pads", 2 * n, 0)
    extra = _spatial_attr(op, node, "output_padding", n, 0)
    auto_pad = op.attr(node, "auto_pad")
    wanted = op.attr(node, "output_shape")
    if wanted is not None:
        wanted = list(wanted)[-n:]
    elif auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        wanted = [size * s for size, s in zip(spatial, strides)]
    begins, ends, out = [], [], []
    for i, (size, k, s, d) in enumerate(zip(spatial, kernel, strides, dilations)):
        full = s * (size - 1) + extra[i] + (k - 1) * d + 1
        if wanted is not None:
            b, e = _same_pads(full - wanted[i], auto_pad == "SAME_UPPER")
        else:
            b, e = (0, 0) if auto_pad == "VALID" else (pads[i], pads[i + n])
        if full - b - e < 1:
            op.fail(node, f"output size {full - b - e} in spatial dim {i}")
        begins.append(b)
        ends.append(e)
        out.append(full - b - e)
    return Window(tuple(kernel), strides, dilations, tuple(begins), tuple(ends), tuple(out))


@register
class ConvTranspose(ConvBase):
    attrs = {**ConvBase.attrs, "output_padding": None, "output_shape": None}

    def infer(self, node):
        x, w, b = node.inputs[0], node.inputs[1], node.input(2)
        window = transpose_geometry(self, node, x.shape[2:], self.check(node, True))
        m = w.shape[1] * self.attr(node, "group")
        if b is not None and b.shape != (m,):
            self.fail(node, f"bias must be ({m},)")
        return [((x.shape[0], m) + window.out, x.dtype)]

    def reference(self, node, inputs):
        x, w = inputs[:2]
        bias = inputs[2] if len(inputs) > 2 else None
        acc = accumulator(x.dtype)
        kernel, spatial = w.shape[2:], x.shape[2:]
        window = transpose_geometry(self, node, spatial, kernel)
        n, c, g = x.shape[0], x.shape[1], self.attr(node, "group")
        m = w.shape[1] * g
        # Each input pixel scatters W * x into the output: one matmul, then one strided
        # add per kernel offset (col2im).
        wm = w.astype(acc).reshape(g, c // g, -1).transpose(0, 2, 1)
        cols = np.matmul(wm, x.astype(acc).reshape(n, g, c // g, -1))
        cols = cols.reshape((n, m) + tuple(kernel) + tuple(spatial))
        full = tuple(o + b + e for o, b, e in zip(window.out, window.begins, window.ends))
        y = np.zeros((n, m) + full, acc)
        for offset in np.ndindex(*kernel):
            dst = tuple(slice(o * d, o * d + s * (size - 1) + 1, s) for o, d, s, size
                        in zip(offset, window.dilations, window.strides, spatial))
            y[(slice(None), slice(None)) + dst] += cols[(slice(None), slice(None)) + offset]
        y = crop(y, window.begins, window.ends)
        if bias is not None:
            y = y + bias.astype(acc).reshape((m,) + (1,) * len(spatial))
        return [y.astype(x.dtype)]


def crop(y: np.ndarray, begins, ends) -> np.ndarray:
    """Remove `begins`/`ends` from the trailing dims of `y`; negative amounts pad zeros."""
    lead = [(0, 0)] * (y.ndim - len(begins))
    y = np.pad(y, lead + [(max(-b, 0), max(-e, 0)) for b, e in zip(begins, ends)])
    index = tuple(slice(max(b, 0), size - max(e, 0))
                  for b, e, size in zip(begins, ends, y.shape[len(lead):]))
    return y[(slice(None),) * len(lead) + index]


# -- pooling -----------------------------------------------------------------------------
class Pool(OpDef):
    attrs = {"auto_pad": "NOTSET", "ceil_mode": 0, "dilations": None,
             "kernel_shape": REQUIRED, "pads": None, "strides": None}

    def window(self, node, shape) -> Window:
        kernel = tuple(self.attr(node, "kernel_shape"))
        if len(shape) < 3 or len(kernel) != len(shape) - 2:
            self.fail(node, f"kernel_shape {list(kernel)} does not fit X")
        return window_geometry(self, node, shape[2:], kernel, bool(self.attr(node, "ceil_mode")))

    def infer(self, node):
        if len(node.outputs) > 1:
            raise UnsupportedOpError(f"{self.op_type} node '{node.name}': the Indices output "
                                     "is not supported")
        x = node.inputs[0]
        return [(x.shape[:2] + self.window(node, x.shape).out, x.dtype)]


@register
class MaxPool(Pool):
    attrs = {**Pool.attrs, "storage_order": 0}

    def reference(self, node, inputs):
        x = inputs[0]
        window = self.window(node, x.shape)
        low = -np.inf if x.dtype.kind == "f" else np.iinfo(x.dtype).min
        view = windows(pad_windows(x, window, low), window)
        return [view.max(axis=tuple(range(-len(window.kernel), 0)))]


@register
class AveragePool(Pool):
    """count_include_pad counts explicit pads, never the ceil_mode overhang."""

    attrs = {**Pool.attrs, "count_include_pad": 0}

    def reference(self, node, inputs):
        x = inputs[0]
        window = self.window(node, x.shape)
        axes = tuple(range(-len(window.kernel), 0))
        acc = accumulator(x.dtype)
        sums = windows(pad_windows(x.astype(acc), window, 0), window).sum(axis=axes)
        ones = np.ones((1, 1) + x.shape[2:], acc)
        pad_value = 1 if self.attr(node, "count_include_pad") else 0
        counts = windows(pad_windows(ones, window, pad_value, 0), window).sum(axis=axes)
        return [(sums / counts).astype(x.dtype)]


class GlobalPool(OpDef):
    reduce = staticmethod(np.mean)

    def infer(self, node):
        x = node.inputs[0]
        if len(x.shape) < 3:
            self.fail(node, "X must be (N, C, ...)")
        return [(x.shape[:2] + (1,) * (len(x.shape) - 2), x.dtype)]

    def reference(self, node, inputs):
        x = inputs[0]
        axes = tuple(range(2, x.ndim))
        return [self.reduce(x.astype(accumulator(x.dtype)), axis=axes, keepdims=True)
                .astype(x.dtype)]


@register
class GlobalAveragePool(GlobalPool):
    reduce = staticmethod(np.mean)


@register
class GlobalMaxPool(GlobalPool):
    reduce = staticmethod(np.max)


# -- normalization -----------------------------------------------------------------------
def _channel_params(op: OpDef, node, first: int, last: int) -> None:
    """Inputs first..last must each be a (C,) vector for X of shape (N, C, ...)."""
    x = node.inputs[0]
    if len(x.shape) < 2 or len(node.inputs) <= last:
        op.fail(node, f"X must be (N, C, ...), with {last} more inputs")
    for value in node.inputs[first:last + 1]:
        if value is None or value.shape != (x.shape[1],):
            op.fail(node, f"per-channel parameters must be ({x.shape[1]},)")


@register
class BatchNormalization(OpDef):
    """Inference form only: one output, running statistics as inputs 3 and 4."""

    attrs = {"epsilon": 1e-5, "momentum": 0.9, "training_mode": 0}

    def infer(self, node):
        if self.attr(node, "training_mode") or len(node.outputs) > 1:
            raise UnsupportedOpError(f"BatchNormalization node '{node.name}': training mode "
                                     "is not supported")
        _channel_params(self, node, 1, 4)
        x = node.inputs[0]
        return [(x.shape, x.dtype)]

    def reference(self, node, inputs):
        x, scale, bias, mean, var = inputs
        acc = accumulator(x.dtype)
        shape = (-1,) + (1,) * (x.ndim - 2)
        a = (scale / np.sqrt(var.astype(acc) + self.attr(node, "epsilon"))).reshape(shape)
        y = (x.astype(acc) - mean.reshape(shape)) * a + bias.reshape(shape)
        return [y.astype(x.dtype)]


@register
class InstanceNormalization(OpDef):
    attrs = {"epsilon": 1e-5}

    def infer(self, node):
        _channel_params(self, node, 1, 2)
        x = node.inputs[0]
        return [(x.shape, x.dtype)]

    def reference(self, node, inputs):
        x, scale, bias = inputs
        acc = accumulator(x.dtype)
        xa = x.astype(acc)
        axes = tuple(range(2, x.ndim))
        mean = xa.mean(axis=axes, keepdims=True)
        var = np.square(xa - mean).mean(axis=axes, keepdims=True)
        shape = (-1,) + (1,) * (x.ndim - 2)
        y = (xa - mean) / np.sqrt(var + self.attr(node, "epsilon"))
        return [(y * scale.reshape(shape) + bias.reshape(shape)).astype(x.dtype)]


@register
class LayerNormalization(OpDef):
    """Outputs Y and the optional Mean and InvStdDev (float32, keeping reduced dims)."""

    attrs = {"axis": -1, "epsilon": 1e-5, "stash_type": 1}

    def infer(self, node):
        x = node.inputs[0]
        if self.attr(node, "stash_type") != 1:
            raise UnsupportedOpError(f"LayerNormalization node '{node.name}': only "
                                     "stash_type=1 (float32) is supported")
        axis = normalize_axis(node, self.attr(node, "axis"), len(x.shape))
        normalized = x.shape[axis:]
        for value in node.inputs[1:3]:
            if value is not None and not broadcasts_to(value.shape, normalized):
                self.fail(node, f"scale/bias must broadcast to {list(normalized)}")
        stats = x.shape[:axis] + (1,) * len(normalized)
        return [(x.shape, x.dtype), (stats, np.float32), (stats, np.float32)]

    def reference(self, node, inputs):
        x, scale = inputs[:2]
        bias = inputs[2] if len(inputs) > 2 else None
        axis = normalize_axis(node, self.attr(node, "axis"), x.ndim)
        xa = x.astype(np.float32)
        axes = tuple(range(axis, x.ndim))
        mean = xa.mean(axis=axes, keepdims=True)
        var = np.square(xa - mean).mean(axis=axes, keepdims=True)
        inv_std = 1 / np.sqrt(var + np.float32(self.attr(node, "epsilon")))
        y = (xa - mean) * inv_std * scale
        if bias is not None:
            y = y + bias
        return [y.astype(x.dtype), mean, inv_std]


@register
class LRN(OpDef):
    """Across-channel local response normalization over `size` neighbouring channels."""

    attrs = {"alpha": 1e-4, "beta": 0.75, "bias": 1.0, "size": REQUIRED}

    def infer(self, node):
        x = node.inputs[0]
        if len(x.shape) < 3 or self.attr(node, "size") < 1:
            self.fail(node, "X must be (N, C, ...) and size >= 1")
        return [(x.shape, x.dtype)]

    def reference(self, node, inputs):
        x = inputs[0]
        size = self.attr(node, "size")
        xa = x.astype(accumulator(x.dtype))
        lead = (size - 1) // 2
        squares = np.pad(np.square(xa), [(0, 0), (lead, size - 1 - lead)]
                         + [(0, 0)] * (x.ndim - 2))
        sums = sliding_window_view(squares, size, axis=1).sum(axis=-1)
        scale = self.attr(node, "bias") + self.attr(node, "alpha") / size * sums
        return [(xa / scale ** self.attr(node, "beta")).astype(x.dtype)]


# -- matrix products ---------------------------------------------------------------------
@register
class Gemm(OpDef):
    """Y = alpha * A' @ B' + beta * C, with C broadcast to (M, N)."""

    attrs = {"alpha": 1.0, "beta": 1.0, "transA": 0, "transB": 0}

    def infer(self, node):
        a, b, c = node.inputs[0], node.inputs[1], node.input(2)
        if len(a.shape) != 2 or len(b.shape) != 2:
            self.fail(node, "A and B must be matrices")
        m, k = a.shape[::-1] if self.attr(node, "transA") else a.shape
        kb, n = b.shape[::-1] if self.attr(node, "transB") else b.shape
        if k != kb:
            self.fail(node, f"inner dimensions {k} and {kb} differ")
        if c is not None and not broadcasts_to(c.shape, (m, n)):
            self.fail(node, f"C does not broadcast to {[m, n]}")
        return [((m, n), a.dtype)]

    def reference(self, node, inputs):
        a, b = inputs[:2]
        c = inputs[2] if len(inputs) > 2 else None
        acc = accumulator(a.dtype)
        a = a.astype(acc, copy=False)
        b = b.astype(acc, copy=False)
        a = a.T if self.attr(node, "transA") else a
        b = b.T if self.attr(node, "transB") else b
        y = self.attr(node, "alpha") * (a @ b)
        if c is not None:
            y = y + self.attr(node, "beta") * c.astype(acc)
        return [y.astype(inputs[0].dtype)]


@register
class MatMul(OpDef):
    """numpy.matmul semantics: 1-D operands gain and lose a unit dim, batches broadcast."""

    def infer(self, node):
        a, b = node.inputs
        if not a.shape or not b.shape:
            self.fail(node, "operands must have rank >= 1")
        sa = (1,) + a.shape if len(a.shape) == 1 else a.shape
        sb = b.shape + (1,) if len(b.shape) == 1 else b.shape
        if sa[-1] != sb[-2]:
            self.fail(node, f"inner dimensions {sa[-1]} and {sb[-2]} differ")
        try:
            batch = np.broadcast_shapes(sa[:-2], sb[:-2])
        except ValueError:
            self.fail(node, "batch dimensions do not broadcast")
        rows = (sa[-2],) if len(a.shape) > 1 else ()
        cols = (sb[-1],) if len(b.shape) > 1 else ()
        return [(tuple(batch) + rows + cols, a.dtype)]

    def reference(self, node, inputs):
        a, b = inputs
        acc = accumulator(a.dtype)
        return [np.matmul(a.astype(acc), b.astype(acc)).astype(a.dtype)]


# -- softmax -----------------------------------------------------------------------------
class SoftmaxBase(OpDef):
    """Opset-13 form: normalize along the one axis `axis`."""

    attrs = {"axis": -1}

    def infer(self, node):
        x = node.inputs[0]
        normalize_axis(node, self.attr(node, "axis"), len(x.shape))
        return [(x.shape, x.dtype)]

    def shifted(self, node, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(x - max, sum(exp(x - max))) along the op's axis, in the accumulator dtype."""
        axis = normalize_axis(node, self.attr(node, "axis"), x.ndim)
        xa = x.astype(accumulator(x.dtype))
        with np.errstate(invalid="ignore"):  # an all -inf row gives NaN, as ONNX defines
            shifted = xa - xa.max(axis=axis, keepdims=True)
            return shifted, np.exp(shifted).sum(axis=axis, keepdims=True)


@register
class Softmax(SoftmaxBase):
    def reference(self, node, inputs):
        shifted, total = self.shifted(node, inputs[0])
        return [(np.exp(shifted) / total).astype(inputs[0].dtype)]


@register
class LogSoftmax(SoftmaxBase):
    def reference(self, node, inputs):
        shifted, total = self.shifted(node, inputs[0])
        return [(shifted - np.log(total)).astype(inputs[0].dtype)]
