"""CoreML lowering of DFT, STFT, the windows and MelWeightMatrix.

Shapes are static, so a DFT is one matmul by a constant matrix: the transform of every
unit vector of the input (`applec.ops.spectral.transform_matrix`), which carries the
real/imaginary interleaving, dft_length's padding or truncation, onesided output, the
inverse's 1/n and IRFFT's real output. The DFT axis is moved next to the complex dim,
everything else is flattened into rows, and a `linear` does the rest.

STFT with a constant window (or none) is one strided conv1d whose kernel is that matrix
with the window folded in: framing, windowing and the DFT in one op. A run-time window
needs the frames themselves: a gather of the frame positions, a multiply, then the matmul.

The windows and the mel matrix depend on constants only; they fold at import, and this
rule emits the same numbers as a constant when the fold was too large to keep.
"""

from __future__ import annotations

import numpy as np
from coremltools.converters.mil import Builder as mb

from applec.ops import OPS, evaluate
from applec.ops.spectral import frame_indices, transform_matrix

from .rules import rule, unsupported

# a dense DFT matrix above this many weights (256 MB in fp32) is refused, not built
MAX_MATRIX = 1 << 26


def _matrix(lw, size, parts, length, inverse, onesided):
    out = length if onesided and inverse else (length // 2 + 1 if onesided else length)
    count = size * parts * out * 2
    if count > MAX_MATRIX:
        unsupported(lw, f"a {length}-point DFT would be a dense matrix of {count} weights "
                        f"(the lowering's limit is {MAX_MATRIX})")
    return transform_matrix(size, parts, length, inverse, onesided)


@rule("DFT")
def lower_dft(lw, node):
    op = OPS["DFT"]
    x = node.inputs[0]
    axis, length, out, parts_out = op.plan(node)
    inverse, onesided = bool(op.attr(node, "inverse")), bool(op.attr(node, "onesided"))
    rank, size, parts = len(x.shape), x.shape[axis], x.shape[-1]
    matrix = _matrix(lw, size, parts, length, inverse, onesided)
    perm = [d for d in range(rank - 1) if d != axis] + [axis, rank - 1]
    moved = perm != list(range(rank))
    var = lw.get(x)
    if moved:
        var = mb.transpose(x=var, perm=perm, name=lw.tmp("axis_last"))
    others = [x.shape[d] for d in perm[:-2]]
    rows = int(np.prod(others))
    var = mb.reshape(x=var, shape=[rows, size * parts], name=lw.tmp("rows"))
    var = mb.linear(x=var, weight=lw.array(matrix.T, f"{node.name}.dft"), name=lw.tmp("dft"))
    var = mb.reshape(x=var, shape=others + [out, parts_out],
                     name=lw.tmp("split") if moved else lw.out_name())
    if moved:
        var = mb.transpose(x=var, perm=list(np.argsort(perm)), name=lw.out_name())
    lw.bind(node.outputs[0], var)


@rule("STFT")
def lower_stft(lw, node):
    op = OPS["STFT"]
    signal, window = node.inputs[0], node.input(2)
    step, frame, frames, bins = op.plan(node)
    batch, parts = signal.shape[0], _parts(signal)
    matrix = _matrix(lw, frame, parts, frame, False, bool(op.attr(node, "onesided")))
    if window is None or window.is_const:
        if window is not None:
            matrix = matrix * np.repeat(window.const.astype(np.float64), parts)[:, None]
        _stft_conv(lw, node, matrix, step, frame, frames, bins)
        return
    framed = mb.gather(x=_complex_signal(lw, signal), indices=frame_indices(step, frame, frames)
                       .astype(np.int32), axis=1, name=lw.tmp("frames"))
    weights = mb.reshape(x=lw.get(window), shape=[frame, 1], name=lw.tmp("window"))
    framed = mb.mul(x=framed, y=weights, name=lw.tmp("windowed"))
    rows = mb.reshape(x=framed, shape=[batch * frames, frame * parts], name=lw.tmp("rows"))
    spectrum = mb.linear(x=rows, weight=lw.array(matrix.T, f"{node.name}.dft"),
                         name=lw.tmp("dft"))
    lw.bind(node.outputs[0], mb.reshape(x=spectrum, shape=[batch, frames, bins, 2],
                                        name=lw.out_name()))


def _parts(signal) -> int:
    """1 for a real signal ([batch, length] or [batch, length, 1]), 2 for a complex one."""
    return signal.shape[2] if len(signal.shape) == 3 else 1


def _complex_signal(lw, signal):
    """The signal as [batch, length, parts]: a [batch, length] one gets its trailing 1."""
    if len(signal.shape) == 3:
        return lw.get(signal)
    return mb.expand_dims(x=lw.get(signal), axes=[-1], name=lw.tmp("signal"))


def _stft_conv(lw, node, matrix, step, frame, frames, bins):
    """signal [batch, length, parts] -> [batch, parts, length] -> conv1d (kernel
    [bins * 2, parts, frame], stride frame_step) -> [batch, frames, bins, 2]."""
    signal = node.inputs[0]
    batch, parts = signal.shape[0], _parts(signal)
    kernel = matrix.reshape(frame, parts, bins * 2).transpose(2, 1, 0)
    channels = mb.transpose(x=_complex_signal(lw, signal), perm=[0, 2, 1],
                            name=lw.tmp("channels"))
    spectrum = mb.conv(x=channels, weight=lw.array(kernel, f"{node.name}.dft"),
                       strides=[step], pad_type="valid", name=lw.tmp("dft"))
    by_frame = mb.transpose(x=spectrum, perm=[0, 2, 1], name=lw.tmp("by_frame"))
    lw.bind(node.outputs[0], mb.reshape(x=by_frame, shape=[batch, frames, bins, 2],
                                        name=lw.out_name()))


@rule("HannWindow", "HammingWindow", "BlackmanWindow", "MelWeightMatrix")
def lower_constant_table(lw, node):
    """Constant inputs only (static_inputs): the reference's numbers as a constant."""
    value = evaluate(node, [v.const for v in node.inputs])[0]
    lw.bind(node.outputs[0], mb.const(val=lw.array(value, node.name), name=lw.out_name()))
