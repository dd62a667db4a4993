"""Op table entries for audio front ends: DFT, STFT, the Hann, Hamming and Blackman
windows and MelWeightMatrix (ONNX opset 17 forms; DFT in its opset-20 form, axis an input).

Complex tensors are real ones with a trailing dim: [..., 1] holds a real signal, [..., 2]
the real and imaginary parts. Every transform here is linear in the real numbers of its
input, so `transform` is also what the lowering turns into a constant matrix.

DFT: `onesided` with a forward transform takes a real input and returns bins
0..n//2 (RFFT); with `inverse` it takes those bins and returns a real signal of
dft_length (IRFFT, default length 2 * (bins - 1)). dft_length zero-pads or truncates the
input along the axis. STFT frames the signal [batch, length, 1|2] with frame_step,
multiplies every frame by the window and takes its DFT of frame_length points. A real
signal may also come as [batch, length]: torch.onnx.export writes torch.stft that way and
onnxruntime accepts it, though the spec asks for the trailing 1.
The windows and the mel matrix depend on constants only and fold at compile time.
"""

from __future__ import annotations

import numpy as np

from . import OpDef, as_ints, register


def transform(x: np.ndarray, axis: int, length: int, inverse: bool, onesided: bool):
    """The DFT of x (real [..., 1] or complex [..., 2]) along `axis`, in float64."""
    x = np.asarray(x, np.float64)
    signal = x[..., 0] + 1j * x[..., 1] if x.shape[-1] == 2 else x[..., 0]
    if inverse and onesided:
        return np.fft.irfft(signal, n=length, axis=axis)[..., None]
    result = (np.fft.ifft if inverse else np.fft.fft)(signal, n=length, axis=axis)
    if onesided:
        result = np.take(result, np.arange(length // 2 + 1), axis=axis)
    return np.stack([result.real, result.imag], axis=-1)


def transform_matrix(size: int, parts: int, length: int, inverse: bool, onesided: bool):
    """M with x_flat @ M == transform(x) flattened, for x of shape [size, parts] along
    axis 0: the transform of every unit vector (float64, [size * parts, out * parts_out])."""
    units = np.eye(size * parts).reshape(size * parts, size, parts)
    return transform(units, 1, length, inverse, onesided).reshape(size * parts, -1)


@register
class DFT(OpDef):
    # dft_length and axis: the output's shape depends on them
    static_inputs = (1, 2)
    attrs = {"inverse": 0, "onesided": 0}

    def plan(self, node) -> tuple[int, int, int, int]:
        """(axis, dft_length, output length along the axis, output's last dim)."""
        x = node.inputs[0]
        rank = len(x.shape)
        if rank < 2 or x.shape[-1] not in (1, 2):
            self.fail(node, "the input's last dim must be 1 (real) or 2 (complex)")
        axis = as_ints(self.static(node, 2, -2))[0]
        if not (-rank <= axis <= -2 or 0 <= axis <= rank - 2):
            self.fail(node, f"axis {axis} is not a signal axis of a rank-{rank} input")
        axis %= rank
        inverse, onesided = self.attr(node, "inverse"), self.attr(node, "onesided")
        size = x.shape[axis]
        if onesided and inverse and x.shape[-1] != 2:
            self.fail(node, "an inverse onesided DFT (IRFFT) takes a complex input")
        if onesided and not inverse and x.shape[-1] != 1:
            self.fail(node, "a onesided DFT (RFFT) takes a real input")
        default = 2 * (size - 1) if onesided and inverse else size
        length = as_ints(self.static(node, 1, default))[0]
        if length < 1:
            self.fail(node, f"dft_length {length} is not positive")
        if onesided and inverse:
            return axis, length, length, 1
        return axis, length, length // 2 + 1 if onesided else length, 2

    def infer(self, node):
        x = node.inputs[0]
        axis, _, out, parts = self.plan(node)
        shape = list(x.shape)
        shape[axis], shape[-1] = out, parts
        return [(tuple(shape), x.dtype)]

    def reference(self, node, inputs):
        axis, length, _, _ = self.plan(node)
        y = transform(inputs[0], axis, length, bool(self.attr(node, "inverse")),
                      bool(self.attr(node, "onesided")))
        return [y.astype(inputs[0].dtype)]


@register
class STFT(OpDef):
    # frame_step and frame_length: the output's shape depends on them
    static_inputs = (1, 3)
    attrs = {"onesided": 1}

    def plan(self, node) -> tuple[int, int, int, int]:
        """(frame_step, frame_length, frames, bins)."""
        signal, window = node.inputs[0], node.input(2)
        if len(signal.shape) not in (2, 3) or len(signal.shape) == 3 and \
                signal.shape[-1] not in (1, 2):
            self.fail(node, "the signal must be [batch, length] or [batch, length, 1 or 2]")
        step = as_ints(self.static(node, 1))[0]
        length = signal.shape[1]
        if window is not None and len(window.shape) != 1:
            self.fail(node, "the window must be 1-D")
        default = window.shape[0] if window is not None else length
        frame = as_ints(self.static(node, 3, default))[0]
        if window is not None and window.shape[0] != frame:
            self.fail(node, f"the window has {window.shape[0]} points, frame_length is {frame}")
        if step < 1 or not 1 <= frame <= length:
            self.fail(node, f"frame_step {step} and frame_length {frame} do not frame a "
                            f"signal of {length}")
        bins = frame // 2 + 1 if self.attr(node, "onesided") else frame
        return step, frame, (length - frame) // step + 1, bins

    def infer(self, node):
        signal = node.inputs[0]
        _, _, frames, bins = self.plan(node)
        return [((signal.shape[0], frames, bins, 2), signal.dtype)]

    def reference(self, node, inputs):
        signal, window = inputs[0], inputs[2] if len(inputs) > 2 else None
        step, frame, frames, _ = self.plan(node)
        if signal.ndim == 2:
            signal = signal[..., None]
        framed = signal[:, frame_indices(step, frame, frames)].astype(np.float64)
        if window is not None:
            framed = framed * np.asarray(window, np.float64)[:, None]
        y = transform(framed, 2, frame, False, bool(self.attr(node, "onesided")))
        return [y.astype(signal.dtype)]


def frame_indices(step: int, frame: int, frames: int) -> np.ndarray:
    """[frames, frame]: the signal positions each frame reads."""
    return np.arange(frames)[:, None] * step + np.arange(frame)[None, :]


class Window(OpDef):
    """A window of `size` points: a sum of cosines a0 - a1 cos(2 pi n / N) + a2 cos(4 pi n
    / N), N = size when periodic, size - 1 when symmetric."""

    static_inputs = (0,)
    attrs = {"output_datatype": np.dtype(np.float32), "periodic": 1}
    coefficients: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def size(self, node) -> int:
        size = as_ints(self.static(node, 0))[0]
        if size < 1:
            self.fail(node, f"size {size} is not positive")
        return size

    def infer(self, node):
        return [((self.size(node),), np.dtype(self.attr(node, "output_datatype")))]

    def reference(self, node, inputs):
        size = self.size(node)
        period = size if self.attr(node, "periodic") else size - 1
        with np.errstate(invalid="ignore"):  # one symmetric point: 0 / 0, NaN as in onnx
            angle = 2 * np.pi * np.arange(size) / period
        a0, a1, a2 = self.coefficients
        window = a0 - a1 * np.cos(angle) + a2 * np.cos(2 * angle)
        return [window.astype(np.dtype(self.attr(node, "output_datatype")))]


@register
class HannWindow(Window):
    coefficients = (0.5, 0.5, 0.0)


@register
class HammingWindow(Window):
    coefficients = (25 / 46, 21 / 46, 0.0)


@register
class BlackmanWindow(Window):
    coefficients = (0.42, 0.5, 0.08)


@register
class MelWeightMatrix(OpDef):
    """[dft_length // 2 + 1, num_mel_bins] triangular filters with peak 1, spaced evenly
    on the mel scale (2595 log10(1 + f / 700)) from lower_edge_hertz to upper_edge_hertz;
    the band edges are rounded down to DFT bins the way onnx's reference and onnxruntime
    do: floor((dft_length + 1) * f / sample_rate), the mel step (high - low) / (bins + 2)."""

    static_inputs = (0, 1, 2, 3, 4)
    attrs = {"output_datatype": np.dtype(np.float32)}

    def sizes(self, node) -> tuple[int, int]:
        bins, length = (as_ints(self.static(node, i))[0] for i in (0, 1))
        if bins < 1 or length < 1:
            self.fail(node, f"num_mel_bins {bins} and dft_length {length} must be positive")
        return bins, length

    def infer(self, node):
        bins, length = self.sizes(node)
        return [((length // 2 + 1, bins), np.dtype(self.attr(node, "output_datatype")))]

    def reference(self, node, inputs):
        bins, length = self.sizes(node)
        rate, low, high = (float(np.asarray(v).reshape(-1)[0]) for v in inputs[2:5])

        def mel(hertz):
            return 2595 * np.log1p(hertz / 700) / np.log(10)

        step = (mel(high) - mel(low)) / (bins + 2)
        hertz = 700 * np.expm1((np.arange(bins + 2) * step + mel(low)) / 2595 * np.log(10))
        edges = np.floor_divide((length + 1) * hertz, rate).astype(np.int64)
        matrix = np.zeros((length // 2 + 1, bins))
        for i in range(bins):
            left, center, right = edges[i:i + 3]
            if center == left:
                matrix[center, i] = 1
            else:
                matrix[left:center + 1, i] = (np.arange(left, center + 1) - left) / (center - left)
            if right > center:
                matrix[center:right, i] = (right - np.arange(center, right)) / (right - center)
        return [matrix.astype(np.dtype(self.attr(node, "output_datatype")))]
