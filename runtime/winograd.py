"""3x3 stride-1 convolution by Winograd's minimal filtering F(4x4, 3x3), for the reference
executor (Lavin and Gray, "Fast Algorithms for Convolutional Neural Networks", 2015).

Each 4x4 block of outputs is computed from a 6x6 tile of input: with the tile transformed
(V = Bt d B), the weights transformed once (U = G g Gt), the 36 products U * V summed over
input channels are 36 GEMMs [M, C] x [C, tiles], and At m A turns them back into outputs.
That is 36 multiplies per 16 outputs and channel pair, against 144 for the direct form: the
GEMMs are 4x smaller. The transforms run as GEMMs with the Kronecker products of the 6x6
matrices, so every step is BLAS or one copy. Points 0, +-1, +-2 and infinity; in float32 the
result differs from direct convolution by ~1e-5 of the output's largest value (random data;
`tests/test_mil_reference.py` checks it against onnxruntime).

`fits` says where this is faster than im2col here (1 thread, per layer shape of ResNet-50,
Inception-v2, DenseNet and VGG): 1.2-1.6x from 48 outputs up on maps of 28 x 28 and more,
or 14 x 14 with few channels. Not on 7 x 7 maps, where the 36 GEMMs get too narrow, nor
with few outputs per input, where the input transform costs more than the GEMMs save.
"""

from __future__ import annotations

import math
import weakref

import numpy as np

_BT = np.array([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
                [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]], np.float64)
_G = np.array([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
               [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]], np.float64)
_AT = np.array([[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0],
                [0, 1, -1, 8, -8, 1]], np.float64)
_IN = np.kron(_BT, _BT).astype(np.float32)  # [36, 36]: tile (6x6, flat) -> its transform
_OUT_T = np.ascontiguousarray(np.kron(_AT, _AT).T.astype(np.float32))  # [36, 16]

_WEIGHTS: dict[int, np.ndarray] = {}  # id(read-only weight) -> its transform, while it lives


def fits(x: np.ndarray, w: np.ndarray, groups: int, strides, dilations) -> bool:
    if not (groups == 1 and x.ndim == 4 and w.shape[2:] == (3, 3) and x.dtype == np.float32
            and tuple(strides) == (1, 1) and tuple(dilations) == (1, 1)):
        return False
    tiles = math.ceil(x.shape[2] / 4) * math.ceil(x.shape[3] / 4)  # about: pads add a few
    c, m = x.shape[1], w.shape[0]
    return c >= 32 and m >= 48 and (tiles >= 49 or (tiles >= 16 and c * m <= 50_000))


def transformed_weight(w: np.ndarray) -> np.ndarray:
    """U [36, M, C] of the weight [M, C, 3, 3], in float64 then float32. Cached for a read-only
    weight (a constant of the program) for as long as it lives; 4x its size."""
    key = id(w)
    cached = _WEIGHTS.get(key)
    if cached is not None:
        return cached
    u = np.einsum("ai,mcij,bj->abmc", _G, w.astype(np.float64), _G)
    u = np.ascontiguousarray(u.reshape(36, w.shape[0], w.shape[1]), np.float32)
    if not w.flags.writeable:
        _WEIGHTS[key] = u
        weakref.finalize(w, _WEIGHTS.pop, key, None)
    return u


def conv3x3(x: np.ndarray, w: np.ndarray, pads, scratch, budget: int = 1 << 18) -> np.ndarray:
    """conv(x, w) with (before, after) `pads` per spatial dim, stride 1; float32 NCHW.
    `scratch(slot, shape, dtype)` lends reusable temporaries (mil_ops.scratch). Rows of tiles
    go a block at a time, about `budget` floats of transformed tiles, so the temporaries of
    one block stay in cache."""
    n, c, h, wd = x.shape
    m = w.shape[0]
    (top, bottom), (left, right) = pads
    ho, wo = h + top + bottom - 2, wd + left + right - 2
    th, tw = math.ceil(ho / 4), math.ceil(wo / 4)
    u = transformed_weight(w)
    rows = max(1, min(th, budget // (36 * max(c, m) * tw)))  # tile rows per block
    # the padded image, grown with zeros to whole tiles (the extra outputs are dropped)
    padded = scratch("winograd padded", (c, 4 * th + 2, 4 * tw + 2), np.float32)
    s = padded.strides
    windows = np.lib.stride_tricks.as_strided(
        padded, (c, th, tw, 6, 6), (s[0], 4 * s[1], 4 * s[2], s[1], s[2]), writeable=False)
    y = np.empty((n, m, 4 * th, 4 * tw), np.float32)
    for image in range(n):
        padded.fill(0)
        padded[:, top:top + h, left:left + wd] = x[image]
        for first in range(0, th, rows):
            r = min(rows, th - first)
            tiles = r * tw
            d = scratch("winograd tiles", (c, r, tw, 6, 6), np.float32)
            v = scratch("winograd in", (36, c, tiles), np.float32)
            prod = scratch("winograd products", (36, m, tiles), np.float32)
            out = scratch("winograd out", (m * tiles, 16), np.float32)
            np.copyto(d, windows[:, first:first + r])
            np.matmul(_IN, d.reshape(c * tiles, 36).T, out=v.reshape(36, c * tiles))
            np.matmul(u, v, out=prod)
            np.matmul(prod.reshape(36, m * tiles).T, _OUT_T, out=out)
            np.copyto(y[image, :, 4 * first:4 * (first + r)].reshape(m, r, 4, tw, 4),
                      out.reshape(m, r, tw, 4, 4).transpose(0, 1, 3, 2, 4))
    return y if (ho, wo) == y.shape[2:] else np.ascontiguousarray(y[:, :, :ho, :wo])
