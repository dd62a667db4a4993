"""Op table entry: LSTM (ONNX opset 14 form: `layout` attribute, peepholes, sequence_lens).

Inputs X, W, R, B, sequence_lens, initial_h, initial_c, P; gates stacked in ONNX order
i, o, f, c (peepholes i, o, f); B is the input bias then the recurrence bias. With
layout 0 X is [seq, batch, input], Y [seq, dirs, batch, hidden] and Y_h / Y_c
[dirs, batch, hidden]; layout 1 puts batch first in all of them. The reference follows
onnxruntime: `clip` bounds every gate's input before its activation, `input_forget` uses
1 - i as the forget gate, and a batch row shorter than seq (sequence_lens) stops there:
its later Y steps are 0 and Y_h / Y_c hold its last real step.
"""

from __future__ import annotations

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
DEFAULT_ACTIVATIONS = ("Sigmoid", "Tanh", "Tanh")
DIRECTIONS = {"forward": 1, "reverse": 1, "bidirectional": 2}


def canonical_activation(name: str) -> str:
    """ONNX activation names are case-insensitive in practice (exporters write 'tanh')."""
    for known in ACTIVATIONS:
        if known.lower() == str(name).lower():
            return known
    return str(name)


@register
class LSTM(OpDef):
    # W, R, B, sequence_lens and P: no shape depends on them, but a compiled LSTM needs
    # them at compile time (MIL's lstm takes constant weights), as exporters emit them
    static_inputs = (1, 2, 3, 4, 7)
    attrs = {"activation_alpha": None, "activation_beta": None, "activations": None,
             "clip": None, "direction": "forward", "hidden_size": None, "input_forget": 0,
             "layout": 0}

    # -- attributes ------------------------------------------------------------------------
    def directions(self, node) -> int:
        direction = self.attr(node, "direction")
        if direction not in DIRECTIONS:
            self.fail(node, f"unknown direction '{direction}'")
        return DIRECTIONS[direction]

    def activations(self, node) -> list[list[tuple[str, float | None, float | None]]]:
        """Per direction: (name, alpha, beta) of f, g and h."""
        dirs = self.directions(node)
        names = [canonical_activation(n) for n in
                 (self.attr(node, "activations") or DEFAULT_ACTIVATIONS * dirs)]
        if len(names) != 3 * dirs:
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
        return [result[3 * d:3 * d + 3] for d in range(dirs)]

    def sizes(self, node) -> tuple[int, int, int, int, int]:
        """(seq, batch, input, hidden, directions), checked against W and R."""
        x, w, r = node.inputs[:3]
        if len(x.shape) != 3:
            self.fail(node, "X must have rank 3")
        layout = self.attr(node, "layout")
        seq, batch, size = (x.shape[1], x.shape[0], x.shape[2]) if layout else x.shape
        dirs = self.directions(node)
        hidden = self.attr(node, "hidden_size") or (r.shape[-1] if len(r.shape) == 3 else 0)
        if tuple(w.shape) != (dirs, 4 * hidden, size):
            self.fail(node, f"W must be [{dirs}, {4 * hidden}, {size}]")
        if tuple(r.shape) != (dirs, 4 * hidden, hidden):
            self.fail(node, f"R must be [{dirs}, {4 * hidden}, {hidden}]")
        return seq, batch, size, hidden, dirs

    # -- the two rules ---------------------------------------------------------------------
    def infer(self, node):
        seq, batch, _, hidden, dirs = self.sizes(node)
        self.activations(node)
        dtype = node.inputs[0].dtype
        if self.attr(node, "layout"):
            return [((batch, seq, dirs, hidden), dtype), ((batch, dirs, hidden), dtype),
                    ((batch, dirs, hidden), dtype)]
        return [((seq, dirs, batch, hidden), dtype), ((dirs, batch, hidden), dtype),
                ((dirs, batch, hidden), dtype)]

    def reference(self, node, inputs):
        x, w, r = inputs[:3]
        b, lens, h0, c0, p = (inputs[i] if i < len(inputs) else None for i in range(3, 8))
        seq, batch, _, hidden, dirs = self.sizes(node)
        layout = self.attr(node, "layout")
        dtype = x.dtype
        work = np.float64
        x = (np.swapaxes(x, 0, 1) if layout else x).astype(work)
        if layout:
            h0 = None if h0 is None else np.swapaxes(h0, 0, 1)
            c0 = None if c0 is None else np.swapaxes(c0, 0, 1)
        lens = np.full(batch, seq) if lens is None else np.asarray(lens).astype(np.int64)
        clip = self.attr(node, "clip")
        y = np.zeros((seq, dirs, batch, hidden), work)
        y_h = np.zeros((dirs, batch, hidden), work)
        y_c = np.zeros((dirs, batch, hidden), work)
        for d, acts in enumerate(self.activations(node)):
            backward = self.attr(node, "direction") == "reverse" or d == 1
            state = (np.zeros((batch, hidden), work) if h0 is None else h0[d].astype(work),
                     np.zeros((batch, hidden), work) if c0 is None else c0[d].astype(work))
            bias = np.zeros(8 * hidden) if b is None else b[d].astype(work)
            peep = np.zeros(3 * hidden) if p is None else p[d].astype(work)
            params = (w[d].astype(work), r[d].astype(work), bias[:4 * hidden] +
                      bias[4 * hidden:], np.split(peep, 3))
            y[:, d], y_h[d], y_c[d] = self._direction(x, lens, state, params, acts, clip,
                                                      backward, bool(self.attr(node,
                                                                               "input_forget")))
        if layout:
            y, y_h, y_c = np.transpose(y, (2, 0, 1, 3)), np.swapaxes(y_h, 0, 1), \
                np.swapaxes(y_c, 0, 1)
        return [y.astype(dtype), y_h.astype(dtype), y_c.astype(dtype)]

    @staticmethod
    def _direction(x, lens, state, params, acts, clip, backward, input_forget):
        """One direction over x [seq, batch, input]; returns Y [seq, batch, hidden], h, c."""
        w, r, bias, (p_i, p_o, p_f) = params
        (f, fa, fb), (g, ga, gb), (h, ha, hb) = [(ACTIVATIONS[n][0], a, b) for n, a, b in acts]
        seq, batch = x.shape[:2]
        hidden = r.shape[1]
        h_t, c_t = state
        y = np.zeros((seq, batch, hidden))
        bound = (lambda v: np.clip(v, -clip, clip)) if clip is not None else (lambda v: v)
        for step in range(seq):
            # each row reads its own time index: reversed within its length when backward
            t = np.where(backward, lens - 1 - step, step)
            active = step < lens
            x_t = x[np.clip(t, 0, seq - 1), np.arange(batch)]
            gates = x_t @ w.T + h_t @ r.T + bias
            g_i, g_o, g_f, g_c = np.split(gates, 4, axis=1)
            i = f(bound(g_i + p_i * c_t), fa, fb)
            forget = 1 - i if input_forget else f(bound(g_f + p_f * c_t), fa, fb)
            c_new = forget * c_t + i * g(bound(g_c), ga, gb)
            o = f(bound(g_o + p_o * c_new), fa, fb)
            h_new = o * h(c_new, ha, hb)
            keep = active[:, None]
            h_t, c_t = np.where(keep, h_new, h_t), np.where(keep, c_new, c_t)
            rows = np.arange(batch)[active]
            y[t[active], rows] = h_new[active]
        return y, h_t, c_t
