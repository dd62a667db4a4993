"""CoreML lowering of LSTM, GRU and RNN.

LSTM becomes MIL `lstm` and RNN MIL `rnn` (one op per direction) where that is exact;
GRU, and an LSTM or RNN the MIL op cannot express, are composed step by step from
matmuls and elementwise ops: the sequence length is static, so the recurrence is unrolled
at compile time (about a dozen ops per step and direction).

MIL stacks LSTM gates i, f, o, z (cell) and peepholes i, f, o; ONNX stacks i, o, f, c and
i, o, f, so the constant weights are reordered here. MIL wants x as [seq, batch, input]
and the states as [batch, dirs * hidden] (forward half first); ONNX's Y is
[seq, dirs, batch, hidden] and Y_h / Y_c [dirs, batch, hidden] (layout 0, or batch first
with layout 1), so reshapes and transposes go around the ops. A "reverse" MIL recurrence
returns its outputs in processing order (last time step first: coremltools' own op tests
expect that), so they are reversed back to time order; bidirectional outputs are in time
order already.

Composed rather than MIL's op: an LSTM with clip (MIL clips the cell state, ONNX every
gate's input), input_forget, activations MIL's lstm lacks or that differ per direction,
or sequence_lens shorter than the sequence; an RNN with clip, such sequence_lens, an
activation other than tanh, relu and sigmoid, or an fp16 program before iOS17 (MIL's rnn
is fp32 only there; MIL's lstm is cast around instead). GRU always: MIL's gru with
reset_after=False is ONNX's linear_before_reset=0 with the biases summed, but
coremltools runs its tests at batch size 1 only (a runtime bug above that), and its
iOS18 reset_after=True form (torch's GRU) is a known failure in coremltools' own parity
test. Refused at compile time: weights or sequence_lens computed at run time.
"""

from __future__ import annotations

import numpy as np
from coremltools.converters.mil import Builder as mb

from applec.ops import OPS

from .rules import rule, unsupported

MIL_ACTIVATIONS = {("Sigmoid", None, None): "sigmoid", ("Tanh", None, None): "tanh",
                   ("Relu", None, None): "relu", ("HardSigmoid", 0.2, 0.5): "hard_sigmoid"}
RNN_ACTIVATIONS = {("Sigmoid", None, None): "sigmoid", ("Tanh", None, None): "tanh",
                   ("Relu", None, None): "relu"}
GATES = [0, 2, 1, 3]      # ONNX i, o, f, c -> MIL i, f, o, c
PEEPHOLES = [0, 2, 1]     # ONNX i, o, f -> MIL i, f, o


def reorder(array: np.ndarray, order, parts: int) -> np.ndarray:
    blocks = np.split(np.asarray(array), parts, axis=0)
    return np.concatenate([blocks[i] for i in order], axis=0)


def _ios17():
    import coremltools as ct

    return ct.target.iOS17


def _check_static(lw, node, seq, weights=((1, "W"), (2, "R"), (3, "B"))):
    """Refuse run-time weights and sequence_lens; the lengths, or None when every row
    runs the whole sequence."""
    for index, what in weights:
        value = node.input(index)
        if value is not None and not value.is_const:
            unsupported(lw, f"{what} is computed at run time; the lowering takes constant "
                            "weights")
    lens = node.input(4)
    if lens is None:
        return None
    if not lens.is_const:
        unsupported(lw, "sequence_lens is computed at run time; the lowering needs it at "
                        "compile time")
    lengths = lens.const.astype(np.int64).reshape(-1)
    if np.any(lengths < 0) or np.any(lengths > seq):
        unsupported(lw, f"sequence_lens {lengths.tolist()} outside [0, {seq}]")
    return None if np.all(lengths == seq) else lengths


def _x_seq_first(lw, node, layout, cast=None):
    x = lw.get(node.inputs[0])
    if cast is not None:
        x = cast(x, "x")
    if layout:
        x = mb.transpose(x=x, perm=[1, 0, 2], name=lw.tmp("x_seq_first"))
    return x


def _bind_outputs(lw, node, results, layout, seq, batch, dirs, hidden, fp32=False):
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


def _concat(lw, parts, axis, tag):
    if len(parts) == 1:
        return parts[0]
    return mb.concat(values=parts, axis=axis, name=lw.tmp(tag))


# -- LSTM --------------------------------------------------------------------------------
def _lstm_mil_activations(op, node) -> dict | None:
    """MIL lstm's three activation names, or None when MIL's lstm has no such set."""
    per_direction = op.activations(node)
    if any(acts != per_direction[0] for acts in per_direction):
        return None
    names = [MIL_ACTIVATIONS.get(act) for act in per_direction[0]]
    if not all(names):
        return None
    return dict(zip(("recurrent_activation", "cell_activation", "activation"), names))


@rule("LSTM")
def lower_lstm(lw, node):
    op = OPS["LSTM"]
    seq = op.sizes(node)[0]
    lengths = _check_static(lw, node, seq, ((1, "W"), (2, "R"), (3, "B"), (7, "P")))
    activations = _lstm_mil_activations(op, node)
    if op.attr(node, "clip") is not None or op.attr(node, "input_forget") or \
            activations is None or lengths is not None:
        _composed_lstm(lw, node, op)
    else:
        _native_lstm(lw, node, op, activations)


def _native_lstm(lw, node, op, args):
    seq, batch, _, hidden, dirs = op.sizes(node)
    layout = op.attr(node, "layout")
    direction = op.attr(node, "direction")
    fp32 = lw.float_dtype == np.float16 and (lw.opset is None or lw.opset < _ios17())
    dtype = np.float32 if fp32 else lw.float_dtype

    def cast_in(var, tag):
        return mb.cast(x=var, dtype="fp32", name=lw.tmp(f"{tag}32")) if fp32 else var

    def weight(array, name):  # fp16 weights saturate like every constant (lw.array)
        return np.asarray(array, np.float32) if fp32 else lw.array(array, f"{node.name}.{name}")

    x = _x_seq_first(lw, node, layout, cast_in)
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
    if direction == "reverse":
        y = mb.reverse(x=y, axes=[0], name=lw.tmp("time_order"))
    _bind_outputs(lw, node, (y, h, c), layout, seq, batch, dirs, hidden, fp32)


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


def _composed_lstm(lw, node, op):
    """Per step: gates = x W + h R + b (ONNX order i, o, f, c); i, f = f(gate + p * c),
    c' = f * c + i * g(gate_c), o = f(gate_o + p_o * c'), h' = o * h(c'); with
    input_forget f = 1 - i. Without peepholes i, o and f take one activation call."""
    hidden = op.sizes(node)[3]
    input_forget = bool(op.attr(node, "input_forget"))
    peepholes = node.input(7)

    def factory(d, acts, clip):
        w, r, wb, rb = _weights(node, d, 4 * hidden)
        f, g, h_act = acts
        weight = lw.array(r, f"{node.name}.R{d}")
        p_i, p_o, p_f = [None] * 3 if peepholes is None else \
            [lw.array(p, f"{node.name}.P{d}") for p in
             np.split(peepholes.const[d].astype(np.float64), 3)]

        def gate(pre, peep, c, tag):
            if peep is not None:
                pre = mb.add(x=pre, y=mb.mul(x=c, y=peep, name=lw.tmp(f"{tag}_peep")),
                             name=lw.tmp(f"{tag}_in"))
            return _activate(lw, pre, f, clip, tag)

        def step(x_t, state, tag):
            h, c = state
            gates = mb.add(x=x_t[0], y=mb.linear(x=h, weight=weight, name=lw.tmp(f"{tag}_rec")),
                           name=lw.tmp(f"{tag}_gates"))
            if peepholes is None and not input_forget:
                g_iof, g_c = mb.split(x=gates, split_sizes=[3 * hidden, hidden], axis=2,
                                      name=lw.tmp(f"{tag}_split"))
                i, o, forget = mb.split(x=_activate(lw, g_iof, f, clip, f"{tag}_iof"),
                                        num_splits=3, axis=2, name=lw.tmp(f"{tag}_iof_split"))
            else:
                g_i, g_o, g_f, g_c = mb.split(x=gates, num_splits=4, axis=2,
                                              name=lw.tmp(f"{tag}_split"))
                i = gate(g_i, p_i, c, f"{tag}_i")
                forget = mb.sub(x=lw.scalar(1), y=i, name=lw.tmp(f"{tag}_f")) if \
                    input_forget else gate(g_f, p_f, c, f"{tag}_f")
            cell = mb.mul(x=i, y=_activate(lw, g_c, g, clip, f"{tag}_g"),
                          name=lw.tmp(f"{tag}_cell"))
            c = mb.add(x=mb.mul(x=forget, y=c, name=lw.tmp(f"{tag}_keep_c")), y=cell,
                       name=lw.tmp(f"{tag}_c"))
            if peepholes is not None or input_forget:
                o = gate(g_o, p_o, c, f"{tag}_o")
            h = mb.mul(x=o, y=_activate(lw, c, h_act, None, f"{tag}_h_act"),
                       name=lw.tmp(f"{tag}_h"))
            return h, c

        return w, wb + rb, [4 * hidden], step

    _unrolled(lw, node, op, factory)


# -- GRU and RNN: shared pieces ---------------------------------------------------------
def _weights(node, d, rows):
    """W[d], R[d], input bias, recurrence bias of direction `d` (float64)."""
    w, r = node.inputs[1].const[d].astype(np.float64), node.inputs[2].const[d].astype(np.float64)
    b = node.input(3)
    both = np.zeros(2 * rows) if b is None else b.const[d].astype(np.float64)
    return w, r, both[:rows], both[rows:]


def _direction_state(lw, node, index, layout, d, batch, hidden, dirs):
    """Initial state input `index` (initial_h, initial_c) of direction `d` as
    [1, batch, hidden] (a constant when it is one; zeros when omitted)."""
    value = node.input(index)
    if value is None:
        return np.zeros((1, batch, hidden), lw.float_dtype)
    if value.is_const:
        state = value.const[:, d] if layout else value.const[d]
        return lw.array(state.reshape(1, batch, hidden), value.name)
    var = lw.get(value)
    if dirs == 1 and not layout:
        return var
    begin, end = ([0, d, 0], [batch, d + 1, hidden]) if layout else \
        ([d, 0, 0], [d + 1, batch, hidden])
    var = mb.slice_by_index(x=var, begin=np.asarray(begin, np.int32),
                            end=np.asarray(end, np.int32), name=lw.tmp(f"state{index}_d{d}"))
    if layout:  # [batch, 1, hidden] -> [1, batch, hidden]: the same order in memory
        var = mb.reshape(x=var, shape=[1, batch, hidden], name=lw.tmp(f"state{index}_d{d}_seq"))
    return var


def _steps(lw, var, seq, tag):
    """A [seq, batch, n] var as seq vars [1, batch, n]."""
    if seq == 1:
        return [var]
    return list(mb.split(x=var, num_splits=seq, axis=0, name=lw.tmp(tag)))


def _activate(lw, var, act, bound, tag):
    """An ONNX recurrence activation (name, alpha, beta) on `var`, after clipping."""
    if bound is not None:
        var = mb.clip(x=var, alpha=lw.scalar(-bound), beta=lw.scalar(bound),
                      name=lw.tmp(f"{tag}_clip"))
    name, alpha, beta = act
    simple = {"Sigmoid": mb.sigmoid, "Tanh": mb.tanh, "Relu": mb.relu,
              "Softplus": mb.softplus}
    if name in simple:
        return simple[name](x=var, name=lw.tmp(tag))
    if name == "LeakyRelu":
        return mb.leaky_relu(x=var, alpha=lw.scalar(alpha), name=lw.tmp(tag))
    if name == "Elu":
        return mb.elu(x=var, alpha=lw.scalar(alpha), name=lw.tmp(tag))
    if name == "HardSigmoid":
        return mb.sigmoid_hard(x=var, alpha=lw.scalar(alpha), beta=lw.scalar(beta),
                               name=lw.tmp(tag))
    if name == "Affine":
        scaled = mb.mul(x=var, y=lw.scalar(alpha), name=lw.tmp(f"{tag}_scale"))
        return mb.add(x=scaled, y=lw.scalar(beta), name=lw.tmp(tag))
    if name == "ScaledTanh":
        inner = mb.mul(x=var, y=lw.scalar(beta), name=lw.tmp(f"{tag}_in"))
        return mb.mul(x=mb.tanh(x=inner, name=lw.tmp(f"{tag}_tanh")), y=lw.scalar(alpha),
                      name=lw.tmp(tag))
    if name == "ThresholdedRelu":
        above = mb.greater(x=var, y=lw.scalar(alpha), name=lw.tmp(f"{tag}_above"))
        return mb.select(cond=above, a=var, b=lw.scalar(0), name=lw.tmp(tag))
    if name == "Softsign":
        denominator = mb.add(x=mb.abs(x=var, name=lw.tmp(f"{tag}_abs")), y=lw.scalar(1),
                             name=lw.tmp(f"{tag}_den"))
        return mb.real_div(x=var, y=denominator, name=lw.tmp(tag))
    unsupported(lw, f"activation {name} has no lowering")


def _unrolled(lw, node, op, step_factory):
    """Run every direction of `node` step by step and bind Y and the final states.

    `step_factory(d, acts, clip)` gives, for direction d: the input projection (weight and
    bias over x, applied to all steps at once), the sizes of the parts its output splits
    into, and the step (x_t parts, state, tag) -> state, where the state is (h,) or (h, c)
    as [1, batch, hidden] vars and h is the step's output.

    sequence_lens (constant) is honoured with constant masks: a row past its length keeps
    its state and outputs zeros (a row of length 0 ends with state 0, as in onnxruntime).
    A backward row of length L starts at time L - 1, so with ragged lengths each step
    gathers its rows' inputs, and Y is gathered back to time order.
    """
    seq, batch, _, hidden, dirs = op.sizes(node)
    lengths = _check_static(lw, node, seq)
    lens = np.full(batch, seq) if lengths is None else lengths
    ragged = lengths is not None
    layout = op.attr(node, "layout")
    clip = op.attr(node, "clip")
    x = _x_seq_first(lw, node, layout)
    ys, finals = [], []
    for d, acts in enumerate(op.activations(node)):
        weight, bias, parts, step = step_factory(d, acts,
                                                 None if clip is None else float(clip))
        projected = mb.linear(x=x, weight=lw.array(weight, f"{node.name}.W{d}"),
                              bias=lw.array(bias, f"{node.name}.B{d}"),
                              name=lw.tmp(f"d{d}_x_proj"))
        if len(parts) > 1:
            projected = mb.split(x=projected, split_sizes=parts, axis=2,
                                 name=lw.tmp(f"d{d}_x_parts"))
        else:
            projected = [projected]
        backward = op.backward(node, d)
        if backward and ragged:
            inputs = _ragged_inputs(lw, projected, lens, seq, batch, f"d{d}")
        else:
            by_time = list(zip(*[_steps(lw, part, seq, f"d{d}_x{i}_steps")
                                 for i, part in enumerate(projected)]))
            inputs = by_time[::-1] if backward else by_time
        state = tuple(_direction_state(lw, node, index, layout, d, batch, hidden, dirs)
                      for index in op.state_inputs)
        outputs = []  # in processing order
        for s, x_s in enumerate(inputs):
            tag = f"d{d}_s{s}"
            new = step(x_s, state, tag)
            active = s < lens
            if active.all():
                state = new
                outputs.append(new[0])
                continue
            mask = active.reshape(1, batch, 1)
            state = tuple(mb.select(cond=mask, a=n, b=old, name=lw.tmp(f"{tag}_keep{i}"))
                          for i, (n, old) in enumerate(zip(new, state)))
            outputs.append(mb.select(cond=mask, a=new[0], b=lw.scalar(0),
                                     name=lw.tmp(f"{tag}_y")))
        if backward and ragged:
            ys.append(_ragged_outputs(lw, outputs, lens, seq, batch, hidden, f"d{d}"))
        else:
            ys.append(_concat(lw, outputs[::-1] if backward else outputs, 0, f"d{d}_y"))
        if np.any(lens == 0):  # onnxruntime's final state of an empty row is 0
            state = tuple(mb.select(cond=(lens > 0).reshape(1, batch, 1), a=v,
                                    b=lw.scalar(0), name=lw.tmp(f"d{d}_empty_rows{i}"))
                          for i, v in enumerate(state))
        finals.append(state)
    results = [_concat(lw, ys, 2, "y")]
    for i, parts in enumerate(zip(*finals)):
        results.append(mb.reshape(x=_concat(lw, list(parts), 2, f"state{i}"),
                                  shape=[batch, dirs * hidden], name=lw.tmp(f"state{i}_flat")))
    _bind_outputs(lw, node, results, layout, seq, batch, dirs, hidden)


def _ragged_inputs(lw, parts, lens, seq, batch, tag):
    """Per step s, each part's rows at time lens[b] - 1 - s (a backward pass over rows of
    different lengths): one gather from the part flattened to [seq * batch, n]."""
    rows = np.arange(batch)
    flats = [mb.reshape(x=part, shape=[seq * batch, part.shape[-1]],
                        name=lw.tmp(f"{tag}_x{i}_flat")) for i, part in enumerate(parts)]
    steps = []
    for s in range(seq):
        index = (np.clip(lens - 1 - s, 0, seq - 1) * batch + rows).astype(np.int32)
        steps.append(tuple(
            mb.reshape(x=mb.gather(x=flat, indices=index, axis=0,
                                   name=lw.tmp(f"{tag}_s{s}_x{i}_rows")),
                       shape=[1, batch, flat.shape[-1]], name=lw.tmp(f"{tag}_s{s}_x{i}"))
            for i, flat in enumerate(flats)))
    return steps


def _ragged_outputs(lw, outputs, lens, seq, batch, hidden, tag):
    """Processing-order outputs -> Y [seq, batch, hidden] in time order: Y[t, b] is step
    lens[b] - 1 - t, or (t past the row's length) the last step, where the row is inactive
    and its output zero."""
    stacked = mb.reshape(x=_concat(lw, outputs, 0, f"{tag}_steps"), shape=[seq * batch, hidden],
                         name=lw.tmp(f"{tag}_steps_flat"))
    t, rows = np.arange(seq)[:, None], np.arange(batch)[None, :]
    step = np.where(t < lens[None, :], lens[None, :] - 1 - t, seq - 1)
    index = (step * batch + rows).reshape(-1).astype(np.int32)
    y = mb.gather(x=stacked, indices=index, axis=0, name=lw.tmp(f"{tag}_time_order"))
    return mb.reshape(x=y, shape=[seq, batch, hidden], name=lw.tmp(f"{tag}_y"))


# -- GRU ---------------------------------------------------------------------------------
@rule("GRU")
def lower_gru(lw, node):
    """Per step: [z r] = f(x W_zr + h R_zr + b), n = g(x W_h + (r * h) R_h + b_h) (or
    r * (h R_h + Rb_h) with linear_before_reset), h = n + z * (h - n). Biases that sit
    outside the reset gate are folded into the input projection of all steps at once."""
    op = OPS["GRU"]
    hidden = op.sizes(node)[3]
    after = bool(op.attr(node, "linear_before_reset"))

    def factory(d, acts, clip):
        w, r, wb, rb = _weights(node, d, 3 * hidden)
        f, g = acts
        bias = wb + np.concatenate([rb[:2 * hidden], np.zeros(hidden) if after else
                                    rb[2 * hidden:]])
        r_zr = lw.array(r[:2 * hidden], f"{node.name}.R{d}")
        r_h = lw.array(r[2 * hidden:], f"{node.name}.Rh{d}")
        r_bias = lw.array(rb[2 * hidden:], f"{node.name}.Rbh{d}")

        def step(x_t, state, tag):
            (h,), (x_zr, x_h) = state, x_t
            h_zr = mb.linear(x=h, weight=r_zr, name=lw.tmp(f"{tag}_h_zr"))
            zr = _activate(lw, mb.add(x=x_zr, y=h_zr, name=lw.tmp(f"{tag}_zr_in")), f,
                           clip, f"{tag}_zr")
            z, reset = mb.split(x=zr, split_sizes=[hidden, hidden], axis=2,
                                name=lw.tmp(f"{tag}_z_r"))
            if after:
                h_h = mb.linear(x=h, weight=r_h, bias=r_bias, name=lw.tmp(f"{tag}_h_h"))
                recurrence = mb.mul(x=reset, y=h_h, name=lw.tmp(f"{tag}_reset"))
            else:
                gated = mb.mul(x=reset, y=h, name=lw.tmp(f"{tag}_reset"))
                recurrence = mb.linear(x=gated, weight=r_h, name=lw.tmp(f"{tag}_h_h"))
            n = _activate(lw, mb.add(x=x_h, y=recurrence, name=lw.tmp(f"{tag}_n_in")), g,
                          clip, f"{tag}_n")
            change = mb.sub(x=h, y=n, name=lw.tmp(f"{tag}_change"))
            kept = mb.mul(x=z, y=change, name=lw.tmp(f"{tag}_kept"))
            return (mb.add(x=n, y=kept, name=lw.tmp(f"{tag}_h")),)

        return w, bias, [2 * hidden, hidden], step

    _unrolled(lw, node, op, factory)


# -- RNN ---------------------------------------------------------------------------------
@rule("RNN")
def lower_rnn(lw, node):
    """MIL rnn per direction when it is exact (activations tanh, relu or sigmoid, no clip,
    an fp32 program or iOS17+), else h = f(x W + h R + b) step by step."""
    op = OPS["RNN"]
    seq, _, _, hidden, _ = op.sizes(node)
    lengths = _check_static(lw, node, seq)
    fp16_ok = lw.float_dtype == np.float32 or (lw.opset is not None and lw.opset >= _ios17())
    native = [RNN_ACTIVATIONS.get(acts[0]) for acts in op.activations(node)]
    if op.attr(node, "clip") is None and fp16_ok and lengths is None and all(native):
        _native_rnn(lw, node, op, native)
        return

    def factory(d, acts, clip):
        w, r, wb, rb = _weights(node, d, hidden)
        weight = lw.array(r, f"{node.name}.R{d}")

        def step(x_t, state, tag):
            recurrence = mb.linear(x=state[0], weight=weight, name=lw.tmp(f"{tag}_rec"))
            pre = mb.add(x=x_t[0], y=recurrence, name=lw.tmp(f"{tag}_in"))
            return (_activate(lw, pre, acts[0], clip, f"{tag}_h"),)

        return w, wb + rb, [hidden], step

    _unrolled(lw, node, op, factory)


def _native_rnn(lw, node, op, activations):
    seq, batch, _, hidden, dirs = op.sizes(node)
    layout = op.attr(node, "layout")
    x = _x_seq_first(lw, node, layout)
    ys, finals = [], []
    for d, activation in enumerate(activations):
        w, r, wb, rb = _weights(node, d, hidden)
        backward = op.backward(node, d)
        h0 = _direction_state(lw, node, 5, layout, d, batch, hidden, dirs)
        h0 = h0.reshape(batch, hidden) if isinstance(h0, np.ndarray) else \
            mb.reshape(x=h0, shape=[batch, hidden], name=lw.tmp(f"d{d}_h0"))
        y, h = mb.rnn(x=x, initial_h=h0, weight_ih=lw.array(w, f"{node.name}.W{d}"),
                      weight_hh=lw.array(r, f"{node.name}.R{d}"),
                      bias=lw.array(wb + rb, f"{node.name}.B{d}"),
                      direction="reverse" if backward else "forward", output_sequence=True,
                      activation=activation, name=lw.tmp(f"d{d}_rnn"))
        if backward:  # processing order -> time order
            y = mb.reverse(x=y, axes=[0], name=lw.tmp(f"d{d}_time_order"))
        ys.append(y)
        finals.append(h)
    _bind_outputs(lw, node, (_concat(lw, ys, 2, "y"), _concat(lw, finals, 1, "y_h")),
                  layout, seq, batch, dirs, hidden)
