"""CoreML lowering of Resize: a MIL op that computes exactly what ONNX asks, or a clear error.

Resize is separable, and the op table describes each resized axis as an [out, in] weight
matrix (`applec.ops.resize.axis_weights`). A MIL op qualifies when the matrices it computes
equal those (to 1e-6), its sampling grids taken from `applec.runtime.mil_ops`, which runs
them. Candidates, in order of preference:
- upsample_nearest_neighbor: integer factors on the last two dims, output i reads i // k;
- upsample_bilinear: integer factors, align_corners or half-pixel grids (asymmetric too
  from iOS16, with half_pixel_centers);
- resize_bilinear: any output size on the last two dims, one of five sampling grids;
- gather along one axis: any nearest-neighbour selection, on any dtype.
One op covers both last dims when it can, else one op per axis. Cubic interpolation,
antialiased downsampling, tf_crop_and_resize's extrapolation and grids no MIL op has fail
at compile time, naming the mode and the axis.
"""

from __future__ import annotations

import numpy as np
from coremltools.converters.mil import Builder as mb

from applec.ops import OPS
from applec.ops.resize import AxisResize, axis_weights
from applec.runtime.mil_ops import sampling_grid, upsample_bilinear_mode

from .rules import rule, unsupported

RESIZE_BILINEAR_MODES = ("UNALIGN_CORNERS", "STRICT_ALIGN_CORNERS", "DEFAULT", "ALIGN_CORNERS",
                         "OFFSET_CORNERS")
TOLERANCE = 1e-6


def grid_weights(n_in: int, n_out: int, mode: str) -> np.ndarray:
    """The [n_out, n_in] matrix of MIL's bilinear sampling on one axis."""
    grid = sampling_grid(n_in, n_out, mode)
    low = np.floor(grid).astype(np.int64)
    high = np.minimum(low + 1, n_in - 1)
    frac = grid - low
    weights = np.zeros((n_out, n_in))
    rows = np.arange(n_out)
    np.add.at(weights, (rows, low), 1 - frac)
    np.add.at(weights, (rows, high), frac)
    return weights


def repeat_weights(n_in: int, factor: int) -> np.ndarray:
    weights = np.zeros((n_in * factor, n_in))
    weights[np.arange(n_in * factor), np.arange(n_in * factor) // factor] = 1.0
    return weights


def candidates(lw, sizes) -> list[tuple[str, dict, list]]:
    """MIL resizes of the last two dims from (h_in, h_out), (w_in, w_out): op, arguments and
    the weight matrix each computes on the two axes."""
    (h_in, h_out), (w_in, w_out) = sizes
    found = []
    if h_out % h_in == 0 and w_out % w_in == 0:
        kh, kw = h_out // h_in, w_out // w_in
        scales = {"scale_factor_height": np.int32(kh), "scale_factor_width": np.int32(kw)}
        found.append(("upsample_nearest_neighbor", scales,
                      [repeat_weights(h_in, kh), repeat_weights(w_in, kw)]))
        grids = [(True, False), (False, True)]
        if lw.opset is not None and lw.opset >= _ios16():
            grids.append((False, False))
        for align, half_pixel in grids:
            mode = upsample_bilinear_mode(align, half_pixel)
            args = dict(scales, align_corners=align)
            if not align and not half_pixel:
                args["half_pixel_centers"] = False
            found.append(("upsample_bilinear", args,
                          [grid_weights(h_in, h_out, mode), grid_weights(w_in, w_out, mode)]))
    for mode in RESIZE_BILINEAR_MODES:
        found.append(("resize_bilinear", {"target_size_height": np.int32(h_out),
                                          "target_size_width": np.int32(w_out),
                                          "sampling_mode": mode},
                      [grid_weights(h_in, h_out, mode), grid_weights(w_in, w_out, mode)]))
    return found


def _ios16():
    import coremltools as ct

    return ct.target.iOS16


@rule("Resize")
def lower_resize(lw, node):
    op = OPS["Resize"]
    x, out = node.inputs[0], node.outputs[0]
    plans = [p for p in op.plan(node, x.shape) if not op.is_identity(node, p)]
    for p in plans:
        if p.outside is not None and p.outside.any():
            unsupported(lw, f"tf_crop_and_resize reads outside the input on axis {p.axis} "
                            "(extrapolation_value): no MIL resize extrapolates")
    targets = {p.axis: axis_weights(op, node, p) for p in plans}
    var = lw.get(x)
    rank = len(x.shape)
    last_two = {rank - 2, rank - 1}
    nearest = op.attr(node, "mode") == "nearest"
    if plans and x.dtype.kind == "f" and set(targets) <= last_two:
        emitted = _resize_last_two(lw, node, var, plans, targets, nearest)
        if emitted is not None:
            lw.bind(out, emitted)
            return
    if not plans:
        lw.bind(out, mb.identity(x=var, name=lw.out_name()))
        return
    for i, p in enumerate(plans):
        name = lw.out_name() if i == len(plans) - 1 else lw.tmp(f"axis{p.axis}")
        var = _resize_one_axis(lw, node, var, x, p, targets[p.axis], nearest, name)
    lw.bind(out, var)


def _resize_last_two(lw, node, var, plans, targets, nearest):
    """One MIL resize for both last dims, if one matches (None otherwise)."""
    x = node.inputs[0]
    rank = len(x.shape)
    sizes = [(x.shape[a], node.outputs[0].shape[a]) for a in (rank - 2, rank - 1)] \
        if rank >= 2 else [(1, 1), (x.shape[0], node.outputs[0].shape[0])]
    want = [targets.get(a, np.eye(n_in)) for a, (n_in, _) in
            zip((rank - 2, rank - 1), sizes)]
    for op_name, args, weights in candidates(lw, sizes):
        if nearest and op_name != "upsample_nearest_neighbor":
            break  # a bilinear op with 0/1 weights turns inf neighbours into NaN
        if all(w.shape == t.shape and np.allclose(w, t, rtol=0, atol=TOLERANCE)
               for w, t in zip(weights, want)):
            return _emit(lw, node, var, op_name, args)
    return None


def _emit(lw, node, var, op_name, args):
    """The MIL op on the last two dims of `var`, padding the rank to 3 and back."""
    x, out = node.inputs[0], node.outputs[0]
    fn = getattr(mb, op_name)
    if len(x.shape) >= 3:
        return fn(x=var, **args, name=lw.out_name())
    padded = [1] * (3 - len(x.shape)) + list(x.shape)
    var = mb.reshape(x=var, shape=padded, name=lw.tmp("rank3"))
    var = fn(x=var, **args, name=lw.tmp(op_name))
    return mb.reshape(x=var, shape=list(out.shape), name=lw.out_name())


def _resize_one_axis(lw, node, var, x, p: AxisResize, target, nearest, name):
    shape = list(var.shape)  # earlier axes may have changed size already
    rank = len(shape)
    one_hot = bool(np.all((target == 0) | (target == 1)) and np.all(target.sum(axis=1) == 1))
    if x.dtype.kind == "f" and p.axis >= rank - 2:
        sizes = [(p.size_in, p.size_out) if a == p.axis else (shape[a], shape[a])
                 for a in (rank - 2, rank - 1)] if rank >= 2 else \
            [(1, 1), (p.size_in, p.size_out)]
        which = 0 if rank >= 2 and p.axis == rank - 2 else 1
        for op_name, args, weights in candidates(lw, sizes):
            if nearest and op_name != "upsample_nearest_neighbor":
                continue  # see _resize_last_two
            other = weights[1 - which]
            if np.allclose(weights[which], target, rtol=0, atol=TOLERANCE) and \
                    np.allclose(other, np.eye(other.shape[1]), rtol=0, atol=TOLERANCE):
                return _emit_axis(lw, var, op_name, args, p, name)
    if one_hot:
        data, was_bool = (var, False) if x.dtype.kind != "b" else \
            (mb.cast(x=var, dtype="int32", name=lw.tmp("as_int")), True)
        index = np.argmax(target, axis=1).astype(np.int32)
        gathered = mb.gather(x=data, indices=index, axis=p.axis,
                             name=lw.tmp("gather") if was_bool else name)
        return mb.cast(x=gathered, dtype="bool", name=name) if was_bool else gathered
    attrs = node.attrs
    mode = attrs.get("mode", "nearest")
    ctm = attrs.get("coordinate_transformation_mode", "half_pixel")
    detail = " with antialias" if attrs.get("antialias") and p.scale < 1 else ""
    unsupported(lw, f"mode '{mode}'{detail} with coordinate_transformation_mode '{ctm}' on "
                    f"axis {p.axis} ({p.size_in} -> {p.size_out}, scale {p.scale:g}) matches "
                    "no CoreML resize exactly (MIL has nearest upsampling by integer "
                    "factors, bilinear on five sampling grids, and gathers)"
                    + ("" if x.dtype.kind == "f" else f"; the input is {x.dtype}"))


def _emit_axis(lw, var, op_name, args, p, name):
    """One MIL resize that changes axis `p.axis` only (the var may already differ from x
    on other axes: its shape is the running one)."""
    shape = list(var.shape)
    fn = getattr(mb, op_name)
    if len(shape) >= 3:
        return fn(x=var, **args, name=name)
    padded = [1] * (3 - len(shape)) + shape
    result_shape = list(shape)
    result_shape[p.axis] = p.size_out
    var = mb.reshape(x=var, shape=padded, name=lw.tmp("rank3"))
    var = fn(x=var, **args, name=lw.tmp(op_name))
    return mb.reshape(x=var, shape=result_shape, name=name)
