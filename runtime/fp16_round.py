"""Rounding float32 arrays to fp16 values, kept as float32, without numpy's slow fp16 cast.

The numpy reference executor holds fp16 values as the float32 numbers they equal and rounds
each fp16 op result with `round_to_fp16`; numpy's own float16 cast is a scalar loop (~4 ns an
element); this is five vectorised passes and two reductions (~0.6 ns an element).
"""

from __future__ import annotations

import numpy as np

from .mil_ops import scratch

F16, F32 = np.dtype(np.float16), np.dtype(np.float32)

# Constants as 0-d arrays: ufuncs take them faster than numpy scalars.
_EXPONENT = np.array(0x7F800000, np.uint32)
_FLOOR, _CEILING = np.array(113 << 23, np.uint32), np.array(142 << 23, np.uint32)  # 2**-14, 2**15
_MAGIC = np.array((13 << 23) | (1 << 22), np.uint32)  # 2**e -> 1.5 * 2**(e+13)
_SIGN = np.array(0x80000000, np.uint32)
_TOP = 142 << 23  # a block with |x| >= 2**15, inf or NaN may overflow fp16
_NEGATIVE_TINY = -0x4D000000  # bits of -2**-25 as int32: up to it, x in [-2**-25, -0] -> -0
_TO_INF, _FROM_INF = np.array(2.0 ** 112, np.float32), np.array(2.0 ** -112, np.float32)
_SMALL = 2500  # below this many elements numpy's cast beats the passes' fixed ~10 us
_BLOCK = 1 << 18  # elements per pass, so the temporaries stay in cache


def round_to_fp16(x: np.ndarray, in_place: bool = False) -> np.ndarray:
    """float32 `x` rounded to the nearest fp16 value (ties to even, overflow to inf), as
    float32: bit for bit `x.astype(float16).astype(float32)` (NaNs stay NaN). `in_place`
    overwrites `x`, which the caller must own.

    Let e = the exponent of x clamped to [-14, 15] and M = 1.5 * 2**(e+13), made from x's
    bits. For |x| < 2**(e+1), x + M lies in [2**(e+13), 2**(e+14)), where fp32's spacing is
    2**(e-10): fp16's spacing at x (2**-24 below 2**-13, subnormals included). M is an even
    multiple of that spacing, so the fp32 add rounds x to fp16's grid with ties to even, and
    subtracting M again is exact; M > 0 serves both signs. Two cases come out wrong and are
    mended in the blocks where cheap reductions find them: x in [-2**-25, -0] gives +0 (x's
    sign bits are put back), and |x| >= 65520 gives at least 65536 in magnitude (scaling by 2**112 and back
    makes exactly those inf). Checked against numpy on all 2**32 float32 bit patterns."""
    if x.size < _SMALL:
        return x.astype(F16).astype(F32)
    if not x.flags.c_contiguous:
        x, in_place = np.ascontiguousarray(x), True
    out = x if in_place else np.empty_like(x)
    bits, rounded = x.reshape(-1).view(np.uint32), out.reshape(-1)
    size = bits.size
    magic = scratch("fp16 magic", (min(size, _BLOCK),), np.uint32)
    for start in range(0, size, _BLOCK):
        _round_block(bits[start:start + _BLOCK], rounded[start:start + _BLOCK], magic)
    return out


def _round_block(u: np.ndarray, y: np.ndarray, magic: np.ndarray) -> None:
    """`y` = float32 bits `u` rounded to fp16 values (`y` may be `u`'s memory)."""
    m = magic[:u.size]
    np.bitwise_and(u, _EXPONENT, m)
    top = np.maximum.reduce(m) >= _TOP
    signed = u.view(np.int32)
    negative_zero = np.minimum.reduce(signed) <= _NEGATIVE_TINY
    if negative_zero:  # keep x's sign bits, to put them back on the +0s rounding made
        signs = scratch("fp16 signs", u.shape, np.uint32)
        np.bitwise_and(u, _SIGN, signs)
    m.clip(_FLOOR, _CEILING, out=m)
    np.add(m, _MAGIC, m)
    mf = m.view(F32)
    np.add(u.view(F32), mf, y)
    np.subtract(y, mf, y)
    if negative_zero:  # a negative x rounds to a value <= 0: only its +0s change
        bits = y.view(np.uint32)
        np.bitwise_or(bits, signs, bits)
    if top:
        with np.errstate(over="ignore"):
            np.multiply(y, _TO_INF, y)
            np.multiply(y, _FROM_INF, y)
