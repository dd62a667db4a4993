"""CoreML lowering of LSTM: MIL `lstm`, with ONNX's layouts and gate order converted.

MIL stacks gates i, f, o, z (cell) and peepholes i, f, o; ONNX stacks i, o, f, c and
i, o, f, so the constant weights are reordered here. MIL wants x as [seq, batch, input]
and the states as [batch, dirs * hidden] (forward half first); ONNX's Y is
[seq, dirs, batch, hidden] and Y_h / Y_c [dirs, batch, hidden] (layout 0, or batch first
with layout 1), so reshapes and transposes go around the op. Weights must be constants
(MIL takes them as const); MIL has one set of activations for both directions, no
input_forget, and a `clip` that is not ONNX's, so those are compile-time errors, as is a
sequence_lens that shortens any row. Before iOS17 MIL's lstm is fp32 only: an fp16
program casts around it.
"""

from __future__ import annotations

import numpy as np
from coremltools.converters.mil import Builder as mb

from applec.ops import OPS

from .rules import rule, unsupported

MIL_ACTIVATIONS = {("Sigmoid", None, None): "sigmoid", ("Tanh", None, None): "tanh",
                   ("Relu", None, None): "relu", ("HardSigmoid", 0.2, 0.5): "hard_sigmoid"}
GATES = [0, 2, 1, 3]      # ONNX i, o, f, c -> MIL i, f, o, c
PEEPHOLES = [0, 2, 1]     # ONNX i, o, f -> MIL i, f, o


def reorder(array: np.ndarray, order, parts: int) -> np.ndarray:
    blocks = np.split(np.asarray(array), parts, axis=0)
    return np.concatenate([blocks[i] for i in order], axis=0)


def _activations(lw, op, node) -> dict:
    per_direction = op.activations(node)
    if any(acts != per_direction[0] for acts in per_direction):
        unsupported(lw, "the two directions use different activations; MIL's lstm has "
                        "one set")
    names = []
    for name, alpha, beta in per_direction[0]:
        mil = MIL_ACTIVATIONS.get((name, alpha, beta))
        if mil is None:
            unsupported(lw, f"activation {name} (alpha {alpha}, beta {beta}) has no MIL "
                            "lstm equivalent")
        names.append(mil)
    return dict(zip(("recurrent_activation", "cell_activation", "activation"), names))


def _check(lw, op, node, seq):
    if op.attr(node, "clip") is not None:
        unsupported(lw, "clip: MIL's lstm clips the cell state, ONNX clips every gate's input")
    if op.attr(node, "input_forget"):
        unsupported(lw, "input_forget (coupled input and forget gates) has no MIL equivalent")
    for index, what in ((1, "W"), (2, "R"), (3, "B"), (7, "P")):
        value = node.input(index)
        if value is not None and not value.is_const:
            unsupported(lw, f"{what} is computed at run time; MIL's lstm takes constant "
                            "weights")
    lens = node.input(4)
    if lens is not None and not (lens.is_const and np.all(lens.const == seq)):
        unsupported(lw, "sequence_lens shorter than the sequence has no MIL equivalent")


@rule("LSTM")
def lower_lstm(lw, node):
    op = OPS["LSTM"]
    seq, batch, _, hidden, dirs = op.sizes(node)
    _check(lw, op, node, seq)
    args = _activations(lw, op, node)
    layout = op.attr(node, "layout")
    direction = op.attr(node, "direction")
    fp32 = lw.float_dtype == np.float16 and (lw.opset is None or lw.opset < _ios17())
    dtype = np.float32 if fp32 else lw.float_dtype

    def cast_in(var, tag):
        return mb.cast(x=var, dtype="fp32", name=lw.tmp(f"{tag}32")) if fp32 else var

    x = cast_in(lw.get(node.inputs[0]), "x")
    if layout:
        x = mb.transpose(x=x, perm=[1, 0, 2], name=lw.tmp("x_seq_first"))
    def weight(array, name):  # fp16 weights saturate like every constant (lw.array)
        return np.asarray(array, np.float32) if fp32 else lw.array(array, f"{node.name}.{name}")

    w, r = node.inputs[1].const, node.inputs[2].const
    b, p = node.input(3), node.input(7)
    for d, suffix in enumerate(["", "_back"][:dirs]):
        args["weight_ih" + suffix] = weight(reorder(w[d], GATES, 4), "W")
        args["weight_hh" + suffix] = weight(reorder(r[d], GATES, 4), "R")
        if b is not None:
            both = b.const[d].astype(np.float64)
            args["bias" + suffix] = weight(reorder(both[:4 * hidden] + both[4 * hidden:],
                                                   GATES, 4).astype(np.float32), "B")
        if p is not None:
            args["peephole" + suffix] = weight(reorder(p.const[d], PEEPHOLES, 3), "P")
    for key, index in (("initial_h", 5), ("initial_c", 6)):
        args[key] = _initial_state(lw, node.input(index), layout, batch, dirs, hidden, dtype,
                                   cast_in, key)
    y, h, c = mb.lstm(x=x, direction=direction, output_sequence=True, **args,
                      name=lw.tmp("lstm"))
    _bind_outputs(lw, node, (y, h, c), layout, seq, batch, dirs, hidden, fp32)


def _ios17():
    import coremltools as ct

    return ct.target.iOS17


def _initial_state(lw, value, layout, batch, dirs, hidden, dtype, cast_in, key):
    """ONNX [dirs, batch, hidden] (layout 1: [batch, dirs, hidden]) -> MIL [batch, dirs*H]."""
    if value is None:
        return np.zeros((batch, dirs * hidden), dtype)
    if value.is_const:
        state = value.const if layout else np.swapaxes(value.const, 0, 1)
        return np.ascontiguousarray(state).reshape(batch, dirs * hidden).astype(dtype)
    var = cast_in(lw.get(value), key)
    if not layout and dirs > 1:
        var = mb.transpose(x=var, perm=[1, 0, 2], name=lw.tmp(f"{key}_batch_first"))
    return mb.reshape(x=var, shape=[batch, dirs * hidden], name=lw.tmp(key))


def _bind_outputs(lw, node, results, layout, seq, batch, dirs, hidden, fp32):
    """MIL's Y [seq, batch, dirs*H] and states [batch, dirs*H] -> ONNX's: Y
    [seq, dirs, batch, H] and states [dirs, batch, H]; layout 1 puts batch first: Y
    [batch, seq, dirs, H], states [batch, dirs, H]. A reshape does it unless a dim bigger
    than 1 moves past another."""
    split = [(seq, batch, dirs, hidden), (batch, dirs, hidden), (batch, dirs, hidden)]
    perms = [(1, 0, 2, 3), (0, 1, 2), (0, 1, 2)] if layout else \
        [(0, 2, 1, 3), (1, 0, 2), (1, 0, 2)]
    for i, (value, var, shape, perm) in enumerate(zip(node.outputs, results, split, perms)):
        name = lw.tmp(f"out{i}") if fp32 else lw.out_name(i)
        kept = [d for d in perm if shape[d] != 1]
        if kept == sorted(kept):
            var = mb.reshape(x=var, shape=[shape[d] for d in perm], name=name)
        else:
            var = mb.reshape(x=var, shape=list(shape), name=lw.tmp(f"out{i}_split"))
            var = mb.transpose(x=var, perm=list(perm), name=name)
        if fp32:
            var = mb.cast(x=var, dtype="fp16", name=lw.out_name(i))
        lw.bind(value, var)
