"""Op table entries: LSTM, GRU and RNN (ONNX opset 14+ forms: `layout`, sequence_lens).

The three share inputs X, W, R, B, sequence_lens, initial_h (LSTM adds initial_c and P)
and their layouts: with layout 0 X is [seq, batch, input], Y [seq, dirs, batch, hidden]
and the states [dirs, batch, hidden]; layout 1 puts batch first in all of them. B is the
input bias then the recurrence bias. Gates are stacked in ONNX order: LSTM i, o, f, c
(peepholes i, o, f); GRU z (update), r (reset), h (hidden); RNN one gate.

The references follow onnxruntime: `clip` bounds every gate's input before its
activation; LSTM's `input_forget` uses 1 - i as the forget gate; GRU's
`linear_before_reset` applies the reset gate after the recurrence's matmul and bias
instead of before; a batch row shorter than seq (sequence_lens) stops there: its later
Y steps are 0 and the final states hold its last real step (0 for a row of length 0).
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from . import OpDef, register


def _sigmoid(x):
    return np.exp(-np.logaddexp(0, -x))


ACTIVATIONS = {  # name -> (function(x, alpha, beta), default alpha, default beta)
    "Sigmoid": (lambda x, a, b: _sigmoid(x), None, None),
    "Tanh": (lambda x, a, b: np.tanh(x), None, None),
    "Relu": (lambda x, a, b: np.maximum(x, 0), None, None),
    "Affine": (lambda x, a, b: a * x + b, 1.0, 0.0),
    "LeakyRelu": (lambda x, a, b: np.where(x >= 0, x, a * x), 0.01, None),
    "ThresholdedRelu": (lambda x, a, b: np.where(x > a, x, 0), 1.0, None),
    "ScaledTanh": (lambda x, a, b: a * np.tanh(b * x), 1.0, 1.0),
    "HardSigmoid": (lambda x, a, b: np.clip(a * x + b, 0, 1), 0.2, 0.5),
    "Elu": (lambda x, a, b: np.where(x >= 0, x, a * (np.exp(x) - 1)), 1.0, None),
    "Softsign": (lambda x, a, b: x / (1 + np.abs(x)), None, None),
    "Softplus": (lambda x, a, b: np.logaddexp(0, x), None, None),
}
DIRECTIONS = {"forward": 1, "reverse": 1, "bidirectional": 2}


def canonical_activation(name: str) -> str:
    """ONNX activation names are case-insensitive in practice (exporters write 'tanh')."""
    for known in ACTIVATIONS:
        if known.lower() == str(name).lower():
            return known
    return str(name)


def apply(act, x):
    """One (name, alpha, beta) activation applied to x."""
    name, alpha, beta = act
    return ACTIVATIONS[name][0](x, alpha, beta)


class Recurrent(OpDef):
    """What LSTM, GRU and RNN share: directions, activations, sizes, layouts, and the
    scan over time that honours sequence_lens."""

    gates: ClassVar[int] = 1                      # gate blocks stacked in W and R
    default_activations: ClassVar[tuple[str, ...]] = ()
    # W, R, B and sequence_lens: no shape depends on them, but a compiled recurrence
    # takes them at compile time (constant weights, static lengths), as exporters emit them
    static_inputs = (1, 2, 3, 4)
    state_inputs: ClassVar[tuple[int, ...]] = (5,)  # initial_h (LSTM: and initial_c)

    # -- attributes ------------------------------------------------------------------------
    def directions(self, node) -> int:
        direction = self.attr(node, "direction")
        if direction not in DIRECTIONS:
            self.fail(node, f"unknown direction '{direction}'")
        return DIRECTIONS[direction]

    def backward(self, node, d: int) -> bool:
        """Whether direction `d` runs from the last step to the first."""
        return self.attr(node, "direction") == "reverse" or d == 1

    def activations(self, node) -> list[list[tuple[str, float | None, float | None]]]:
        """Per direction: (name, alpha, beta) of each activation (f, g, h for LSTM)."""
        dirs = self.directions(node)
        count = len(self.default_activations)
        names = [canonical_activation(n) for n in
                 (self.attr(node, "activations") or self.default_activations * dirs)]
        if len(names) != count * dirs:
            self.fail(node, f"{len(names)} activations for {dirs} direction(s)")
        alphas = list(self.attr(node, "activation_alpha") or [])
        betas = list(self.attr(node, "activation_beta") or [])
        result = []
        for name in names:
            if name not in ACTIVATIONS:
                self.fail(node, f"unknown activation '{name}'")
            _, alpha, beta = ACTIVATIONS[name]
            if alpha is not None and alphas:
                alpha = float(alphas.pop(0))
            if beta is not None and betas:
                beta = float(betas.pop(0))
            result.append((name, alpha, beta))
        return [result[count * d:count * (d + 1)] for d in range(dirs)]

    def sizes(self, node) -> tuple[int, int, int, int, int]:
        """(seq, batch, input, hidden, directions), checked against W and R."""
        x, w, r = node.inputs[:3]
        if len(x.shape) != 3:
            self.fail(node, "X must have rank 3")
        layout = self.attr(node, "layout")
        seq, batch, size = (x.shape[1], x.shape[0], x.shape[2]) if layout else x.shape
        dirs = self.directions(node)
        hidden = self.attr(node, "hidden_size") or (r.shape[-1] if len(r.shape) == 3 else 0)
        rows = self.gates * hidden
        if tuple(w.shape) != (dirs, rows, size):
            self.fail(node, f"W must be [{dirs}, {rows}, {size}]")
        if tuple(r.shape) != (dirs, rows, hidden):
            self.fail(node, f"R must be [{dirs}, {rows}, {hidden}]")
        b = node.input(3)
        if b is not None and tuple(b.shape) != (dirs, 2 * rows):
            self.fail(node, f"B must be [{dirs}, {2 * rows}]")
        return seq, batch, size, hidden, dirs

    # -- the two rules ---------------------------------------------------------------------
    def infer(self, node):
        seq, batch, _, hidden, dirs = self.sizes(node)
        self.activations(node)
        dtype = node.inputs[0].dtype
        states = len(self.state_inputs)
        if self.attr(node, "layout"):
            return [((batch, seq, dirs, hidden), dtype)] + \
                [((batch, dirs, hidden), dtype)] * states
        return [((seq, dirs, batch, hidden), dtype)] + [((dirs, batch, hidden), dtype)] * states

    def reference(self, node, inputs):
        """Y and the final states, one direction at a time through `cell`."""
        x = inputs[0]
        seq, batch, _, hidden, dirs = self.sizes(node)
        layout = self.attr(node, "layout")
        work = np.float64
        x = (np.swapaxes(x, 0, 1) if layout else x).astype(work)
        lens = inputs[4] if len(inputs) > 4 else None
        lens = np.full(batch, seq) if lens is None else np.asarray(lens).astype(np.int64)
        initial = [inputs[i] if i < len(inputs) else None for i in self.state_inputs]
        initial = [None if s is None else (np.swapaxes(s, 0, 1) if layout else s).astype(work)
                   for s in initial]
        clip = self.attr(node, "clip")
        bound = (lambda v: np.clip(v, -clip, clip)) if clip is not None else (lambda v: v)
        y = np.zeros((seq, dirs, batch, hidden), work)
        finals = [np.zeros((dirs, batch, hidden), work) for _ in initial]
        for d, acts in enumerate(self.activations(node)):
            state = tuple(np.zeros((batch, hidden), work) if s is None else s[d]
                          for s in initial)
            cell = self.cell(node, inputs, d, acts, bound)
            y[:, d], last = scan(x, lens, state, cell, self.backward(node, d))
            for final, value in zip(finals, last):
                final[d] = np.where((lens > 0)[:, None], value, 0)  # as onnxruntime does
        if layout:
            y, finals = np.transpose(y, (2, 0, 1, 3)), [np.swapaxes(f, 0, 1) for f in finals]
        return [a.astype(inputs[0].dtype) for a in [y, *finals]]

    def cell(self, node, inputs, d, acts, bound):
        """The step function of direction `d`: (x_t, state) -> new state (h first)."""
        raise NotImplementedError

    @staticmethod
    def weights(inputs, d, rows):
        """W[d], R[d] and the input and recurrence biases of direction `d`, in float64."""
        w, r = inputs[1][d].astype(np.float64), inputs[2][d].astype(np.float64)
        b = inputs[3] if len(inputs) > 3 and inputs[3] is not None else None
        both = np.zeros(2 * rows) if b is None else b[d].astype(np.float64)
        return w, r, both[:rows], both[rows:]


def scan(x, lens, state, cell, backward):
    """Run `cell` over x [seq, batch, input]; returns Y [seq, batch, hidden] and the final
    state. Each row reads its own time index (reversed within its length when backward)
    and keeps its state once past its length."""
    seq, batch = x.shape[:2]
    y = np.zeros((seq, batch, state[0].shape[1]))
    rows = np.arange(batch)
    for step in range(seq):
        t = lens - 1 - step if backward else np.full(batch, step)
        active = step < lens
        new = cell(x[np.clip(t, 0, seq - 1), rows], state)
        keep = active[:, None]
        state = tuple(np.where(keep, n, s) for n, s in zip(new, state))
        y[t[active], rows[active]] = new[0][active]
    return y, state


@register
class LSTM(Recurrent):
    gates = 4
    default_activations = ("Sigmoid", "Tanh", "Tanh")
    static_inputs = (1, 2, 3, 4, 7)  # and the peepholes
    state_inputs = (5, 6)
    attrs = {"activation_alpha": None, "activation_beta": None, "activations": None,
             "clip": None, "direction": "forward", "hidden_size": None, "input_forget": 0,
             "layout": 0}

    def cell(self, node, inputs, d, acts, bound):
        hidden = inputs[2].shape[-1]
        w, r, wb, rb = self.weights(inputs, d, 4 * hidden)
        p = inputs[7] if len(inputs) > 7 else None
        p_i, p_o, p_f = np.split(np.zeros(3 * hidden) if p is None else
                                 p[d].astype(np.float64), 3)
        f, g, h = acts
        input_forget = bool(self.attr(node, "input_forget"))

        def step(x_t, state):
            h_t, c_t = state
            g_i, g_o, g_f, g_c = np.split(x_t @ w.T + h_t @ r.T + wb + rb, 4, axis=1)
            i = apply(f, bound(g_i + p_i * c_t))
            forget = 1 - i if input_forget else apply(f, bound(g_f + p_f * c_t))
            c_new = forget * c_t + i * apply(g, bound(g_c))
            o = apply(f, bound(g_o + p_o * c_new))
            return o * apply(h, c_new), c_new

        return step


@register
class GRU(Recurrent):
    gates = 3
    default_activations = ("Sigmoid", "Tanh")
    attrs = {"activation_alpha": None, "activation_beta": None, "activations": None,
             "clip": None, "direction": "forward", "hidden_size": None,
             "layout": 0, "linear_before_reset": 0}

    def cell(self, node, inputs, d, acts, bound):
        hidden = inputs[2].shape[-1]
        w, r, wb, rb = self.weights(inputs, d, 3 * hidden)
        (w_zr, w_h), (r_zr, r_h) = np.split(w, [2 * hidden]), np.split(r, [2 * hidden])
        f, g = acts
        after = bool(self.attr(node, "linear_before_reset"))

        def step(x_t, state):
            (h_t,) = state
            zr = apply(f, bound(x_t @ w_zr.T + h_t @ r_zr.T + wb[:2 * hidden] +
                                rb[:2 * hidden]))
            z, reset = zr[:, :hidden], zr[:, hidden:]
            if after:
                recurrence = reset * (h_t @ r_h.T + rb[2 * hidden:])
            else:
                recurrence = (reset * h_t) @ r_h.T + rb[2 * hidden:]
            n = apply(g, bound(x_t @ w_h.T + wb[2 * hidden:] + recurrence))
            return ((1 - z) * n + z * h_t,)

        return step


@register
class RNN(Recurrent):
    gates = 1
    default_activations = ("Tanh",)
    attrs = {"activation_alpha": None, "activation_beta": None, "activations": None,
             "clip": None, "direction": "forward", "hidden_size": None, "layout": 0}

    def cell(self, node, inputs, d, acts, bound):
        w, r, wb, rb = self.weights(inputs, d, inputs[2].shape[-1])
        (f,) = acts

        def step(x_t, state):
            return (apply(f, bound(x_t @ w.T + state[0] @ r.T + wb + rb)),)

        return step
