"""CoreML lowering of the indexing, scatter and sampling ops (applec/ops/indexing.py).

- DepthToSpace / SpaceToDepth: reshapes and transposes of rank <= 5 (the ONNX formulas go
  through rank 6, and MIL's depth_to_space does not say which order it uses).
- ScatterND, ScatterElements: MIL scatter_nd / scatter_along_axis, indices wrapped into
  [0, dim) first (iOS17+ scatters treat negative indices as out of bounds). Where
  ScatterElements' indices are narrower than data off the axis, scatter_nd with every
  element's full coordinates.
- OneHot: an equal against [0, depth) and a select; Compress: a gather of the constant
  picks; ReverseSequence: MIL reverse_sequence; CenterCropPad: a slice and a pad;
  EyeLike and NonZero: constants.
- Einsum: at compile time, to diagonal slices, reduce_sum, transposes, reshapes and one
  matmul (or mul, with nothing to contract) per pair of operands, left to right.
- GridSample: composed from exact ops, not MIL's resample (whose nearest rounding and
  reflection rules are not documented): source coordinates in fp32, padded, then one
  gather per corner and the blend, innermost axis first, as the ONNX reference does.
  Cubic sampling is refused.
"""

from __future__ import annotations

import math

import numpy as np
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.mil import types

from applec.ops import OPS
from applec.ops.indexing import grid_bounds

from .rules import (
    MAX_RANK,
    bool_as_int,
    from_int,
    is_float,
    pad_by_concat,
    pad_native,
    rule,
    unsupported,
)

F32 = np.float32


# -- block rearrangement ---------------------------------------------------------------
@rule("DepthToSpace")
def lower_depth_to_space(lw, node):
    x = node.inputs[0]
    n, c, h, w = x.shape
    b = int(node.attrs["blocksize"])
    depth = c // (b * b)
    var = lw.get(x)
    if node.attrs.get("mode", "DCR") == "DCR":
        # channel (i * b + j) * depth + d: bring d to the front, where CRD has it
        var = mb.reshape(x=var, shape=[n, b * b, depth, h * w], name=lw.tmp("blocks"))
        var = mb.transpose(x=var, perm=[0, 2, 1, 3], name=lw.tmp("crd"))
    var = mb.reshape(x=var, shape=[n * depth, b, b, h, w], name=lw.tmp("split"))
    var = mb.transpose(x=var, perm=[0, 3, 1, 4, 2], name=lw.tmp("interleave"))
    lw.bind(node.outputs[0], mb.reshape(x=var, shape=[n, depth, h * b, w * b],
                                        name=lw.out_name()))


@rule("SpaceToDepth")
def lower_space_to_depth(lw, node):
    x = node.inputs[0]
    n, c, h, w = x.shape
    b = int(node.attrs["blocksize"])
    var = mb.reshape(x=lw.get(x), shape=[n * c, h // b, b, w // b, b], name=lw.tmp("split"))
    var = mb.transpose(x=var, perm=[0, 2, 4, 1, 3], name=lw.tmp("blocks"))  # CRD order
    if node.attrs.get("mode", "DCR") == "DCR":  # the block position before the channel
        var = mb.reshape(x=var, shape=[n, c, b * b, (h // b) * (w // b)], name=lw.tmp("crd"))
        var = mb.transpose(x=var, perm=[0, 2, 1, 3], name=lw.tmp("dcr"))
    lw.bind(node.outputs[0], mb.reshape(x=var, shape=[n, c * b * b, h // b, w // b],
                                        name=lw.out_name()))


# -- scatters --------------------------------------------------------------------------
MIL_SCATTER_MODES = {"none": "update", "add": "add", "mul": "mul", "max": "max", "min": "min"}


def indices_in_range(lw, indices, dims):
    """Indices with negative ones counted back from `dims` (broadcast against the last
    dim): constants now, run-time ones with a select."""
    dims = np.asarray(dims, np.int32)
    if indices.is_const:
        raw = indices.const.astype(np.int64)
        return lw.array(np.where(raw < 0, raw + dims, raw))
    raw = lw.get(indices)
    negative = mb.less(x=raw, y=np.int32(0), name=lw.tmp("negative"))
    shifted = mb.add(x=raw, y=dims, name=lw.tmp("wrapped"))
    return mb.select(cond=negative, a=shifted, b=raw, name=lw.tmp("indices"))


def _scatter_mode(lw, node) -> str:
    reduction = node.attrs.get("reduction", "none")
    if reduction not in MIL_SCATTER_MODES:
        unsupported(lw, f"reduction '{reduction}' is not supported")
    return MIL_SCATTER_MODES[reduction]


@rule("ScatterND")
def lower_scatter_nd(lw, node):
    data, indices, updates = node.inputs
    mode = _scatter_mode(lw, node)
    index = indices_in_range(lw, indices, data.shape[:indices.shape[-1]])
    x, was_bool = bool_as_int(lw, data)
    values, _ = bool_as_int(lw, updates)
    y = mb.scatter_nd(data=x, indices=index, updates=values, mode=mode,
                      name=lw.tmp("scatter") if was_bool else lw.out_name())
    lw.bind(node.outputs[0], from_int(lw, y, was_bool))


@rule("ScatterElements")
def lower_scatter_elements(lw, node):
    data, indices, updates = node.inputs
    mode = _scatter_mode(lw, node)
    axis = int(node.attrs.get("axis", 0)) % len(data.shape)
    x, was_bool = bool_as_int(lw, data)
    values, _ = bool_as_int(lw, updates)
    name = lw.tmp("scatter") if was_bool else lw.out_name()
    index = indices_in_range(lw, indices, data.shape[axis])
    if all(i == d for a, (i, d) in enumerate(zip(indices.shape, data.shape)) if a != axis):
        y = mb.scatter_along_axis(data=x, indices=index, updates=values, axis=axis, mode=mode,
                                  name=name)
    else:  # MIL wants indices as wide as data off the axis: address each element instead
        count = math.prod(indices.shape)
        flat = mb.reshape(x=values, shape=[count], name=lw.tmp("flat_updates"))
        y = mb.scatter_nd(data=x, indices=element_coordinates(lw, index, indices.shape, axis),
                          updates=flat, mode=mode, name=name)
    lw.bind(node.outputs[0], from_int(lw, y, was_bool))


def element_coordinates(lw, index, shape, axis: int):
    """[count, rank] coordinates of every element of an index tensor of `shape`: its own
    position, with the `axis` coordinate replaced by its (in-range) value."""
    count = math.prod(shape)
    grids = [g.reshape(count, 1).astype(np.int32) for g in np.indices(shape)]
    if isinstance(index, np.ndarray):
        grids[axis] = index.reshape(count, 1).astype(np.int32)
        return np.concatenate(grids, axis=1)
    grids[axis] = mb.reshape(x=index, shape=[count, 1], name=lw.tmp("axis_coordinate"))
    return mb.concat(values=grids, axis=1, name=lw.tmp("coordinates"))


# -- constructing ----------------------------------------------------------------------
@rule("OneHot")
def lower_one_hot(lw, node):
    indices, depth_value, values = node.inputs
    out = node.outputs[0]
    depth = OPS["OneHot"].depth(node, depth_value.const)
    axis = OPS["OneHot"].axis(node, len(indices.shape))
    index = lw.get(indices)
    kind = lw.mil_dtype(indices.dtype)  # float indices compare as floats: 2.5 hits nothing
    negative = mb.less(x=index, y=kind.type(0), name=lw.tmp("negative"))
    shifted = mb.add(x=index, y=kind.type(depth), name=lw.tmp("wrapped"))
    index = mb.select(cond=negative, a=shifted, b=index, name=lw.tmp("index"))
    index = mb.expand_dims(x=index, axes=[axis], name=lw.tmp("column"))
    positions = np.arange(depth).astype(kind).reshape(
        [depth if i == axis else 1 for i in range(len(out.shape))])
    hit = mb.equal(x=index, y=positions, name=lw.tmp("hit"))
    ones = [1] * len(out.shape)
    if values.is_const:
        off, on = values.const.reshape(-1)
        on_var = mb.fill(shape=np.asarray(out.shape, np.int32),
                         value=lw.array(np.asarray(on, values.dtype)), name=lw.tmp("on"))
        off_var = lw.array(np.asarray(off, values.dtype).reshape(ones))
    else:
        pair = mb.reshape(x=lw.get(values), shape=[2], name=lw.tmp("values"))
        off_var, on_var = (mb.reshape(x=mb.slice_by_index(
            x=pair, begin=[i], end=[i + 1], name=lw.tmp(f"value{i}")), shape=ones,
            name=lw.tmp(key)) for i, key in ((0, "off"), (1, "on_one")))
        on_var = mb.tile(x=on_var, reps=list(out.shape), name=lw.tmp("on"))
    lw.bind(out, mb.select(cond=hit, a=on_var, b=off_var, name=lw.out_name()))


@rule("EyeLike")
def lower_eye_like(lw, node):
    out = node.outputs[0]
    rows, cols = out.shape
    eye = np.eye(rows, cols, k=int(node.attrs.get("k", 0)), dtype=out.dtype)
    lw.bind(out, mb.const(val=lw.array(eye), name=lw.out_name()))


@rule("NonZero")
def lower_non_zero(lw, node):
    # the op table refuses a run-time input; a constant one usually folds before this
    result = OPS["NonZero"].reference(node, [node.inputs[0].const])[0]
    lw.bind(node.outputs[0], mb.const(val=lw.array(result), name=lw.out_name()))


@rule("Compress")
def lower_compress(lw, node):
    x = node.inputs[0]
    axis, picked = OPS["Compress"].picked(node, x.shape, node.inputs[1].const)
    var, was_bool = bool_as_int(lw, x)
    if axis is None:
        var = mb.reshape(x=var, shape=[max(math.prod(x.shape), 1)], name=lw.tmp("flat"))
        axis = 0
    y = mb.gather(x=var, indices=picked.astype(np.int32), axis=axis,
                  name=lw.tmp("gather") if was_bool else lw.out_name())
    lw.bind(node.outputs[0], from_int(lw, y, was_bool))


# -- data movement ---------------------------------------------------------------------
@rule("ReverseSequence")
def lower_reverse_sequence(lw, node):
    x, lens = node.inputs
    batch, time = OPS["ReverseSequence"].axes(node, x.shape)
    if lens.is_const and np.any((lens.const < 0) | (lens.const > x.shape[time])):
        unsupported(lw, f"sequence_lens {lens.const.tolist()} must lie in "
                        f"[0, {x.shape[time]}]")
    lw.bind(node.outputs[0], mb.reverse_sequence(x=lw.get(x), lengths=lw.get(lens),
                                                 seq_axis=time, batch_axis=batch,
                                                 name=lw.out_name()))


@rule("CenterCropPad")
def lower_center_crop_pad(lw, node):
    x, out = node.inputs[0], node.outputs[0]
    windows = OPS["CenterCropPad"].windows(node, x.shape, node.inputs[1].const)
    inner = [end - begin for begin, end, _, _ in windows]
    full = []  # [before, after] per dim, as Pad's lowering takes them
    for begin, end, before, size in windows:
        full += [before, size - (end - begin) - before]
    var = lw.get(x)
    if inner != list(x.shape):
        var = mb.slice_by_index(x=var, begin=[w[0] for w in windows],
                                end=[w[1] for w in windows],
                                name=lw.tmp("crop") if any(full) else lw.out_name())
    elif not any(full):
        var = mb.identity(x=var, name=lw.out_name())
    if any(full):
        var = pad_native(lw, node, var, inner, full, "constant") if is_float(x) \
            else pad_by_concat(lw, node, var, inner, full)
    lw.bind(out, var)


# -- einsum ----------------------------------------------------------------------------
class _Operand:
    """A MIL var with one einsum label per dim."""

    def __init__(self, var, labels, shape, named: bool = False):
        self.var, self.labels, self.shape = var, list(labels), list(shape)
        self.named = named  # its var carries the output's name


@rule("Einsum")
def lower_einsum(lw, node):
    plan = OPS["Einsum"].plan(node, [v.shape for v in node.inputs])
    operands = [_Operand(lw.get(v), labels, v.shape) for v, labels in zip(node.inputs, plan.terms)]
    for i, operand in enumerate(operands):
        take_diagonals(lw, plan, operand)
        elsewhere = set(plan.output).union(*(plan.terms[j] for j in range(len(operands))
                                             if j != i))
        # a size-1 dim that broadcasts, or a label nothing else uses: summed away now
        reduce_labels(lw, operand, [label for label, size in zip(operand.labels, operand.shape)
                                    if label not in elsewhere
                                    or (size == 1 and plan.sizes[label] > 1)])
    result = operands[0]
    for i in range(1, len(operands)):
        keep = set(plan.output).union(*plan.terms[i + 1:])
        last = i == len(operands) - 1
        result = contract(lw, plan, result, operands[i], keep, lw.out_name() if last else None)
    perm = [result.labels.index(label) for label in plan.output]
    if perm != list(range(len(perm))):
        var = mb.transpose(x=result.var, perm=perm, name=lw.out_name())
    elif result.named:
        var = result.var
    else:
        var = mb.identity(x=result.var, name=lw.out_name())
    lw.bind(node.outputs[0], var)


def take_diagonals(lw, plan, operand: _Operand) -> None:
    """A label repeated in one operand (a trace, 'ii->i'): its two dims moved last, merged,
    and every (n + 1)-th element kept."""
    while len(set(operand.labels)) != len(operand.labels):
        label = next(lb for lb in operand.labels if operand.labels.count(lb) > 1)
        first = operand.labels.index(label)
        second = operand.labels.index(label, first + 1)
        n = operand.shape[first]
        if operand.shape[second] != n:
            unsupported(lw, f"equation '{plan.equation}': label '{label}' repeats with sizes "
                            f"{n} and {operand.shape[second]}")
        rest = [a for a in range(len(operand.labels)) if a not in (first, second)]
        var = arrange(lw, operand, rest + [first, second], None)
        sizes = [operand.shape[a] for a in rest]
        var = mb.reshape(x=var, shape=sizes + [n * n], name=lw.tmp("square"))
        var = mb.slice_by_index(x=var, begin=[0] * (len(sizes) + 1), end=sizes + [n * n],
                                stride=[1] * len(sizes) + [n + 1], name=lw.tmp("diagonal"))
        operand.var = var
        operand.labels = [operand.labels[a] for a in rest] + [label]
        operand.shape = sizes + [n]


def reduce_labels(lw, operand: _Operand, labels) -> None:
    axes = [a for a, label in enumerate(operand.labels) if label in labels]
    if not axes:
        return
    operand.var = mb.reduce_sum(x=operand.var, axes=axes, keep_dims=False,
                                name=lw.tmp("sum"))
    operand.labels = [lb for a, lb in enumerate(operand.labels) if a not in axes]
    operand.shape = [d for a, d in enumerate(operand.shape) if a not in axes]


def arrange(lw, operand: _Operand, order, shape):
    """The operand's var with its dims permuted to `order`, then reshaped to `shape`."""
    var = operand.var
    if list(order) != list(range(len(order))):
        var = mb.transpose(x=var, perm=list(order), name=lw.tmp("perm"))
    if shape is not None and list(shape) != [operand.shape[a] for a in order]:
        var = mb.reshape(x=var, shape=list(shape), name=lw.tmp("shape"))
    return var


def contract(lw, plan, a: _Operand, b: _Operand, keep: set, out_name=None) -> _Operand:
    """a and b as [batch, rows, k] @ [batch, k, cols]: labels in both are batch dims when
    kept, summed (k) otherwise; the others become rows (a) and columns (b), once those
    not kept are summed away (a label that b only broadcasts against). With `out_name`,
    the last op takes it when the result's dims are in the output's order."""
    reduce_labels(lw, a, [lb for lb in a.labels if lb not in b.labels and lb not in keep])
    reduce_labels(lw, b, [lb for lb in b.labels if lb not in a.labels and lb not in keep])
    batch = [lb for lb in a.labels if lb in b.labels and lb in keep]
    summed = [lb for lb in a.labels if lb in b.labels and lb not in keep]
    rows = [lb for lb in a.labels if lb not in b.labels]
    cols = [lb for lb in b.labels if lb not in a.labels]
    labels = batch + rows + cols
    if len(labels) > MAX_RANK:
        unsupported(lw, f"equation '{plan.equation}' needs an intermediate of rank "
                        f"{len(labels)}; CoreML tensors have rank <= {MAX_RANK}")

    def size(group):
        return math.prod(plan.sizes[lb] for lb in group)

    x = arrange(lw, a, [a.labels.index(lb) for lb in batch + rows + summed],
                [size(batch), size(rows), size(summed)])
    y = arrange(lw, b, [b.labels.index(lb) for lb in batch + summed + cols],
                [size(batch), size(summed), size(cols)])
    shape = [plan.sizes[lb] for lb in labels]
    reshaped = shape != [size(batch), size(rows), size(cols)]
    named = out_name is not None and labels == list(plan.output)
    name = out_name if named and not reshaped else None
    if summed:
        var = mb.matmul(x=x, y=y, name=name or lw.tmp("matmul"))
    else:  # [batch, rows, 1] * [batch, 1, cols]: an outer product, exactly
        var = mb.mul(x=x, y=y, name=name or lw.tmp("outer"))
    if reshaped:
        name = out_name if named else None
        var = mb.reshape(x=var, shape=shape, name=name or lw.tmp("unflatten")) if shape \
            else mb.squeeze(x=var, name=name or lw.tmp("scalar"))
    return _Operand(var, labels, shape, named)


# -- grid sampling ---------------------------------------------------------------------
@rule("GridSample")
def lower_grid_sample(lw, node):
    x, grid = node.inputs
    mode = node.attrs.get("mode", "linear")
    padding = node.attrs.get("padding_mode", "zeros")
    align = bool(node.attrs.get("align_corners", 0))
    if mode == "cubic":
        unsupported(lw, "mode 'cubic' is not supported (applec lowers linear and nearest "
                        "sampling only)")
    if mode == "linear" and not is_float(x):
        unsupported(lw, "linear sampling of non-float data is not supported")
    spatial = list(x.shape[2:])
    # coordinates in fp32 even in fp16 programs: fp16 would move pixels
    if grid.is_const:
        g = mb.const(val=grid.const.astype(F32), name=lw.tmp("grid32"))
    else:
        g = lw.get(grid)
        if lw.mil_dtype(grid.dtype) != F32:
            g = mb.cast(x=g, dtype="fp32", name=lw.tmp("grid32"))
    corners = []  # per spatial axis: [(flat offset, valid or None, weight or None)]
    strides = [math.prod(spatial[k + 1:]) for k in range(len(spatial))]
    for k, size in enumerate(spatial):
        c = source_coordinate(lw, g, grid.shape, k, size, align, mode, padding)
        corners.append(axis_corners(lw, c, k, size, strides[k], align, mode, padding))
    source, was_bool = bool_as_int(lw, x)
    if mode == "linear" and lw.mil_dtype(x.dtype) != F32:
        source = mb.cast(x=source, dtype="fp32", name=lw.tmp("x32"))
    rank = len(x.shape)
    source = mb.transpose(x=source, perm=[0] + list(range(2, rank)) + [1], name=lw.tmp("nhwc"))
    source = mb.reshape(x=source, shape=[x.shape[0] * math.prod(spatial), x.shape[1]],
                        name=lw.tmp("pixels"))
    offsets = (np.arange(x.shape[0], dtype=np.int32) * math.prod(spatial)).reshape(
        [-1] + [1] * (len(grid.shape) - 2))
    picked = blend(lw, source, offsets, corners, [], padding)  # [N, *out, C]
    out_rank = len(node.outputs[0].shape)
    perm = [0, out_rank - 1] + list(range(1, out_rank - 1))
    want = lw.mil_dtype_name(x.dtype)
    cast = was_bool or (mode == "linear" and want != "fp32")
    var = mb.transpose(x=picked, perm=perm, name=lw.tmp("nchw") if cast else lw.out_name())
    if cast:
        var = mb.cast(x=var, dtype=want, name=lw.out_name())
    lw.bind(node.outputs[0], var)


def source_coordinate(lw, g, grid_shape, k: int, size: int, align: bool, mode, padding):
    """The fp32 input position along spatial axis k of every output, [N, *out]: the
    ONNX formula (in its order of operations), rounded for nearest, then padded."""
    rank = len(grid_shape)
    column = rank - 3 - k  # the grid lists the innermost axis first
    component = mb.slice_by_index(
        x=g, begin=[0] * (rank - 1) + [column], end=list(grid_shape[:-1]) + [column + 1],
        squeeze_mask=[False] * (rank - 1) + [True], name=lw.tmp(f"grid{k}"))
    shifted = mb.add(x=component, y=F32(1), name=lw.tmp(f"shift{k}"))
    if align:
        half = mb.mul(x=shifted, y=F32(0.5), name=lw.tmp(f"half{k}"))
        c = mb.mul(x=half, y=F32(size - 1), name=lw.tmp(f"coord{k}"))
    else:
        scaled = mb.mul(x=shifted, y=F32(size), name=lw.tmp(f"scaled{k}"))
        c = mb.mul(x=mb.sub(x=scaled, y=F32(1), name=lw.tmp(f"edge{k}")), y=F32(0.5),
                   name=lw.tmp(f"coord{k}"))
    if mode == "nearest":
        c = mb.round(x=c, name=lw.tmp(f"round{k}"))  # half to even, as ONNX's rint
    if padding == "reflection":
        return reflect(lw, c, *grid_bounds(size, align), k)
    # border: the edge; zeros: far enough out that both corners stay outside (and the
    # cast to int32 stays in range)
    low, high = (0, size - 1) if padding == "border" else (-2, size + 1)
    c = mb.maximum(x=c, y=F32(low), name=lw.tmp(f"low{k}"))
    return mb.minimum(x=c, y=F32(high), name=lw.tmp(f"high{k}"))


def reflect(lw, c, low: float, high: float, k: int):
    """c folded into [low, high] by reflections at the bounds (a triangle wave of period
    2 * (high - low)); coordinates inside stay exactly as they are."""
    span = high - low
    if span <= 0:
        return mb.mul(x=c, y=F32(0), name=lw.tmp(f"reflected{k}"))
    t = mb.sub(x=c, y=F32(low), name=lw.tmp(f"from_low{k}"))
    periods = mb.floor(x=mb.real_div(x=t, y=F32(2 * span), name=lw.tmp(f"ratio{k}")),
                       name=lw.tmp(f"periods{k}"))
    u = mb.sub(x=t, y=mb.mul(x=periods, y=F32(2 * span), name=lw.tmp(f"whole{k}")),
               name=lw.tmp(f"phase{k}"))
    folded = mb.minimum(x=u, y=mb.sub(x=F32(2 * span), y=u, name=lw.tmp(f"back{k}")),
                        name=lw.tmp(f"fold{k}"))
    folded = mb.add(x=folded, y=F32(low), name=lw.tmp(f"folded{k}"))
    outside = mb.logical_or(x=mb.less(x=c, y=F32(low), name=lw.tmp(f"below{k}")),
                            y=mb.greater(x=c, y=F32(high), name=lw.tmp(f"above{k}")),
                            name=lw.tmp(f"outside{k}"))
    return mb.select(cond=outside, a=folded, b=c, name=lw.tmp(f"reflected{k}"))


def axis_corners(lw, c, k: int, size: int, stride: int, align: bool, mode, padding):
    """The pixels a coordinate reads along one axis: (flat offset as int32, validity for
    zeros padding, blend weight [N, *out, 1] for linear)."""
    if mode == "nearest":
        picks = [(c, None)]
    else:
        low = mb.floor(x=c, name=lw.tmp(f"floor{k}"))
        frac = mb.sub(x=c, y=low, name=lw.tmp(f"frac{k}"))
        picks = [(low, mb.sub(x=F32(1), y=frac, name=lw.tmp(f"w_low{k}"))),
                 (mb.add(x=low, y=F32(1), name=lw.tmp(f"next{k}")), frac)]
    corners = []
    for j, (index, weight) in enumerate(picks):
        valid = None
        if padding == "zeros":
            valid = mb.logical_and(
                x=mb.greater_equal(x=index, y=F32(0), name=lw.tmp(f"ge{k}_{j}")),
                y=mb.less_equal(x=index, y=F32(size - 1), name=lw.tmp(f"le{k}_{j}")),
                name=lw.tmp(f"valid{k}_{j}"))
        elif padding == "reflection" and align:  # one past the end reads size - 2
            index = mb.minimum(x=index, y=mb.sub(x=F32(2 * (size - 1)), y=index,
                                                 name=lw.tmp(f"mirror{k}_{j}")),
                               name=lw.tmp(f"reflect{k}_{j}"))
        index = mb.minimum(x=mb.maximum(x=index, y=F32(0), name=lw.tmp(f"nonnegative{k}_{j}")),
                           y=F32(size - 1), name=lw.tmp(f"clamp{k}_{j}"))
        offset = mb.cast(x=index, dtype="int32", name=lw.tmp(f"index{k}_{j}"))
        if stride != 1:
            offset = mb.mul(x=offset, y=np.int32(stride), name=lw.tmp(f"offset{k}_{j}"))
        if weight is not None:
            weight = mb.expand_dims(x=weight, axes=[-1], name=lw.tmp(f"weight{k}_{j}"))
        corners.append((offset, valid, weight))
    return corners


def blend(lw, source, offsets, corners, chosen, padding):
    """Sum of weight * pixel over the corners of the axes not yet in `chosen`; the
    innermost axis is blended first (deepest in the recursion)."""
    k = len(chosen)
    if k == len(corners):
        return gather_pixels(lw, source, offsets, chosen, padding)
    total = None
    for offset, valid, weight in corners[k]:
        value = blend(lw, source, offsets, corners, chosen + [(offset, valid)], padding)
        if weight is not None:
            value = mb.mul(x=value, y=weight, name=lw.tmp("weighted"))
        total = value if total is None else mb.add(x=total, y=value, name=lw.tmp("blend"))
    return total


def gather_pixels(lw, source, offsets, chosen, padding):
    """The [N, *out, C] pixels at one corner (zeros where zeros padding says outside)."""
    index = offsets
    valid = None
    for offset, ok in chosen:
        index = mb.add(x=index, y=offset, name=lw.tmp("flat_index"))
        if ok is not None:
            valid = ok if valid is None else mb.logical_and(x=valid, y=ok,
                                                            name=lw.tmp("inside"))
    pixels = mb.gather(x=source, indices=index, axis=0, name=lw.tmp("pixels"))
    if valid is None:
        return pixels
    valid = mb.expand_dims(x=valid, axes=[-1], name=lw.tmp("inside_c"))
    zero = np.zeros((), types.nptype_from_builtin(pixels.dtype))
    return mb.select(cond=valid, a=pixels, b=zero, name=lw.tmp("masked"))
