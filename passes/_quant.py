"""The numbers behind `quantize_weights`: options, and the three weight quantizers.

Every quantizer works on a weight in canonical form, `w [N, K]`: one row per output
channel, the rest of the weight flattened in order (a Conv's [O, I, kh, kw] is
[O, I*kh*kw]), and returns what `applec.DequantizeWeight` stores plus the dequantized
weight. Scales and LUT entries are rounded to the program's float type first, so the
numbers the interpreter computes with are the numbers CoreML decompresses.

- int8: symmetric, one scale per output channel, codes in [-127, 127];
- int4: asymmetric per block of `block` consecutive columns of a row, codes in [0, 15]
  with a float zero point; scale and zero searched per block for the least squared error;
- palette4: a 16-entry LUT per group of output channels, by 1-D k-means.

With calibration data each quantizer rounds GPTQ-style (`quantize_gptq`): columns are
quantized one at a time and each one's rounding error is spread over the columns not yet
quantized, weighted by the inverse Hessian H = X^T X of the layer's inputs, which minimises
||X W^T - X Q^T|| instead of ||W - Q|| (Frantar et al., 2022, arXiv:2210.17323); columns
go in order of decreasing H diagonal ("act order"). Without calibration they round to
nearest (RTN). GPTQ changes only which codes are stored, never the format, so it needs no
extra op at run time (AWQ-style scaling would need 1/s folded into the previous op).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from applec.errors import ApplecError, TargetError

MODES = ("int8", "int4", "palette4")
EMBEDDING_MODES = MODES + ("float",)
DEFAULT_BLOCK = 32
DEFAULT_MIN_SIZE = 2048
PALETTE_GROUP = 16          # output channels per LUT (coremltools' per_grouped_channel default)
PALETTE_ENTRIES = 16
MIN_PER_LUT = 4 * PALETTE_ENTRIES  # fewer elements than this and the LUT is a quarter of them
GPTQ_BLOCK = 128            # lazy-batch width: columns updated together
GPTQ_DAMP = 0.01            # of mean(diag(H)), added to the diagonal
KMEANS_ITERATIONS = 30


class QuantizationError(ApplecError):
    """A quantization option that cannot be honoured for this model (exit code 2)."""


@dataclass
class QuantizeConfig:
    """What `applec compile --quantize` asked for, and what the target can hold."""

    mode: str
    block_size: int = DEFAULT_BLOCK
    min_size: int = DEFAULT_MIN_SIZE
    min_size_forced: bool = False     # the user set --quantize-min-size
    float_dtype: Any = np.float16     # the program's float type: scales are rounded to it
    grouped_lut: bool = True          # iOS18 constexpr_lut_to_dense (else one LUT per tensor)
    embeddings: str = ""              # mode for Gather tables ("float": keep them float)
    calibration: list[dict[str, np.ndarray]] | None = None
    calibration_source: str | None = None
    layers: dict[str, dict] = field(default_factory=dict)    # IR node -> what was done
    skipped: dict[str, str] = field(default_factory=dict)    # IR node -> why not


@dataclass
class Quantized:
    """One quantized weight in canonical form [N, K] (blocks/groups along the rows)."""

    mode: str                 # affine | lut
    bits: int
    data: np.ndarray          # codes or LUT indices, [N, K]
    params: np.ndarray        # scale [N, K / block] or lut [G, 16]
    offset: np.ndarray | None
    dequantized: np.ndarray   # float32 [N, K]
    block: int                # columns per scale (K for per-channel), or rows per LUT


def make_config(mode: str | None, *, block_size: int | None, min_size: int | None,
                calibration, precision: str, ios18: bool,
                target_text: str, embeddings: str | None = None) -> QuantizeConfig | None:
    """Check the --quantize options against each other and the target; None: no --quantize."""
    if mode is None:
        # --calibration alone is fine: it drives fp16 safety (applec/fp16_safety.py)
        given = [name for name, v in (("--block-size", block_size),
                                      ("--quantize-min-size", min_size),
                                      ("--quantize-embeddings", embeddings)) if v is not None]
        if given:
            raise QuantizationError(f"{given[0]} needs --quantize int8|int4|palette4")
        return None
    if mode not in MODES:
        raise QuantizationError(f"--quantize must be one of {', '.join(MODES)}, not '{mode}'")
    if block_size is not None and mode != "int4":
        raise QuantizationError(f"--block-size applies to --quantize int4, not {mode}")
    if block_size is not None and block_size < 1:
        raise QuantizationError(f"--block-size must be a positive number, not {block_size}")
    if min_size is not None and min_size < 1:
        raise QuantizationError(f"--quantize-min-size must be at least 1, not {min_size}")
    if embeddings is not None and embeddings not in EMBEDDING_MODES:
        raise QuantizationError(f"--quantize-embeddings must be one of "
                                f"{', '.join(EMBEDDING_MODES)}, not '{embeddings}'")
    embeddings = embeddings or ("int8" if mode == "int4" else mode)
    if "int4" in (mode, embeddings) and not ios18:
        option = "--quantize int4" if mode == "int4" else "--quantize-embeddings int4"
        raise TargetError(f"{option} stores block-wise weights "
                          f"(constexpr_blockwise_shift_scale), which need macOS15/iOS18, but "
                          f"{target_text}: use --quantize int8 or palette4, or "
                          "--deployment-target macOS15")
    return QuantizeConfig(mode=mode, block_size=block_size or DEFAULT_BLOCK,
                          min_size=min_size or DEFAULT_MIN_SIZE,
                          min_size_forced=min_size is not None, embeddings=embeddings,
                          float_dtype=np.float16 if precision == "fp16" else np.float32,
                          grouped_lut=ios18)


def round_to(values: np.ndarray, float_dtype) -> np.ndarray:
    """Float32 values exactly representable in the program's float type."""
    return np.asarray(values, np.float32).astype(float_dtype).astype(np.float32)


# -- int8: symmetric per output channel ----------------------------------------------------
def int8_params(w: np.ndarray, float_dtype):
    scale = np.abs(w).max(axis=1, keepdims=True) / 127
    scale = round_to(np.maximum(scale, np.float32(2.0 ** -24)), float_dtype)
    return scale


def int8_codes(col: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(col / scale), -127, 127)


# -- int4: asymmetric per block, range and zero point searched -----------------------------
INT4_SHRINK = np.linspace(1.0, 0.5, 11)   # candidate fractions of a block's [min, max]
INT4_REFINE = 3                           # least-squares refits of (scale, zero) after that
ZERO_STEP = 1 / 64                        # zero points are multiples of this, in code units
ZERO_RANGE = (-16.0, 31.0)                # so every code - zero is exact in fp16
CHUNK_ELEMENTS = 1 << 20                  # weights searched at once (bounds the temporaries)


def round_zero(zero: np.ndarray) -> np.ndarray:
    """Zero points on the 1/64 grid in [-16, 31]: `code - zero` is then exact in fp16, so
    CoreML's fp16 dequantization and ours compute the same number."""
    return np.clip(np.rint(zero / ZERO_STEP) * ZERO_STEP, *ZERO_RANGE).astype(np.float32)


def int4_block_params(w: np.ndarray, block: int, float_dtype):
    """scale, zero point [N, K / block] of every block of `w` [N, K], each chosen to
    minimise the block's squared error: plain min/max with a whole zero point, and the
    range [min, max] shrunk by each of INT4_SHRINK (clipping a few outliers buys a finer step for the rest), then the best
    candidate refitted by least squares (w ~ scale * (code - zero) over the block's current
    codes) while that lowers the error. The zero point is a float on a 1/64 grid, not a
    4-bit code: it costs 2 bytes per block instead of half a byte and places the 16 levels
    where the block's values are (constexpr_blockwise_shift_scale takes an fp16 offset)."""
    n, k = w.shape
    blocks = np.ascontiguousarray(w, np.float32).reshape(n * (k // block), block)
    scale = np.empty(len(blocks), np.float32)
    zero = np.empty(len(blocks), np.float32)
    rows = max(1, CHUNK_ELEMENTS // block)
    for start in range(0, len(blocks), rows):
        part = slice(start, start + rows)
        scale[part], zero[part] = _search_blocks(blocks[part], float_dtype)
    return scale.reshape(n, k // block), zero.reshape(n, k // block)


def _search_blocks(b: np.ndarray, float_dtype):
    """The search of int4_block_params on blocks `b` [M, B] (one block per row)."""
    low, high = b.min(axis=1), b.max(axis=1)
    best = None
    for fraction in (None, *INT4_SHRINK):
        if fraction is None:   # plain min/max with a whole zero point: never worse than it
            low0, high0 = np.minimum(low, 0), np.maximum(high, 0)
            scale = round_to(np.maximum((high0 - low0) / 15, np.float32(2.0 ** -24)),
                             float_dtype)
            zero = np.clip(np.rint(-low0 / scale), 0, 15).astype(np.float32)
        else:
            scale = round_to(np.maximum((high - low) * fraction / 15, np.float32(2.0 ** -24)),
                             float_dtype)
            zero = round_zero(-low * fraction / scale)
        error = _block_error(b, scale, zero)
        if best is None:
            best = [scale, zero, error]
            continue
        better = error < best[2]
        for i, value in enumerate((scale, zero, error)):
            best[i] = np.where(better, value, best[i])
    scale, zero, error = best
    for _ in range(INT4_REFINE):
        codes = int4_codes(b, scale[:, None], zero[:, None])
        mean_code, mean_w = codes.mean(axis=1), b.mean(axis=1)
        centred = codes - mean_code[:, None]
        spread = np.einsum("ij,ij->i", centred, centred)
        fitted = np.einsum("ij,ij->i", centred, b - mean_w[:, None]) / np.maximum(spread, 1e-30)
        usable = (spread > 0) & (fitted > 0)
        new_scale = round_to(np.where(usable, fitted, scale), float_dtype)
        new_zero = round_zero(np.where(usable, mean_code - mean_w / np.maximum(new_scale,
                                                                               2.0 ** -24),
                                       zero))
        new_error = _block_error(b, new_scale, new_zero)
        better = new_error < error
        if not better.any():
            break
        scale = np.where(better, new_scale, scale)
        zero = np.where(better, new_zero, zero)
        error = np.where(better, new_error, error)
    return scale, zero


def _block_error(b: np.ndarray, scale: np.ndarray, zero: np.ndarray) -> np.ndarray:
    values = (int4_codes(b, scale[:, None], zero[:, None]) - zero[:, None]) * scale[:, None]
    values -= b
    return np.einsum("ij,ij->i", values, values)


def int4_codes(col: np.ndarray, scale, zero) -> np.ndarray:
    return np.clip(np.rint(col / scale + zero), 0, 15)


# -- palette: k-means LUT per group of rows ------------------------------------------------
def kmeans_lut(values: np.ndarray, weights: np.ndarray | None = None,
               entries: int = PALETTE_ENTRIES) -> np.ndarray:
    """`entries` sorted 1-D k-means centroids of `values` (weighted), by Lloyd's algorithm
    on the sorted values: each cluster is a run, so a step is a search plus prefix sums."""
    order = np.argsort(values, kind="stable")
    x = values[order].astype(np.float64)
    wt = np.ones_like(x) if weights is None else weights[order].astype(np.float64)
    cw = np.concatenate([[0.0], np.cumsum(wt)])
    cwx = np.concatenate([[0.0], np.cumsum(wt * x)])
    centroids = np.quantile(x, (np.arange(entries) + 0.5) / entries)
    for _ in range(KMEANS_ITERATIONS):
        cuts = np.concatenate([[0], np.searchsorted(x, (centroids[1:] + centroids[:-1]) / 2),
                               [x.size]])
        mass = cw[cuts[1:]] - cw[cuts[:-1]]
        sums = cwx[cuts[1:]] - cwx[cuts[:-1]]
        updated = np.where(mass > 0, sums / np.where(mass > 0, mass, 1), centroids)
        if np.allclose(updated, centroids, rtol=0, atol=1e-12):
            break
        centroids = np.sort(updated)
    return centroids


def palette_group(n: int) -> int:
    """Rows per LUT: PALETTE_GROUP, or the largest divisor of n below it."""
    return max(d for d in range(1, min(PALETTE_GROUP, n) + 1) if n % d == 0)


def palette_luts(w: np.ndarray, group: int, float_dtype, column_weights=None) -> np.ndarray:
    n = w.shape[0]
    luts = []
    for g in range(n // group):
        rows = w[g * group:(g + 1) * group]
        weights = None if column_weights is None else np.broadcast_to(column_weights, rows.shape)
        luts.append(kmeans_lut(rows.reshape(-1), None if weights is None else
                               weights.reshape(-1)))
    return round_to(np.sort(np.stack(luts), axis=1), float_dtype)


def lut_codes(col: np.ndarray, row_luts: np.ndarray) -> np.ndarray:
    """Index of the nearest entry of each row's sorted LUT ([N, 16]) for `col` [N]."""
    mids = (row_luts[:, 1:] + row_luts[:, :-1]) / 2
    return np.sum(col[:, None] > mids, axis=1)


# -- the drivers ---------------------------------------------------------------------------
class Grid:
    """The quantizer of one weight: per-column codes and values, parameters set lazily."""

    def __init__(self, mode: str, w: np.ndarray, block: int, float_dtype, hessian_diag=None):
        self.mode, self.block, self.float_dtype = mode, block, float_dtype
        n, k = w.shape
        if mode == "int8":
            self.scale = int8_params(w, float_dtype)
        elif mode == "int4":
            self.scale = np.zeros((n, k // block), np.float32)
            self.zero = np.zeros((n, k // block), np.float32)
        else:
            self.luts = palette_luts(w, block, float_dtype, hessian_diag)
            self.row_luts = np.repeat(self.luts, block, axis=0)

    def start_block(self, j: int, current: np.ndarray) -> None:
        """Called at column j with the weight's columns j.. as they are now (int4)."""
        if self.mode == "int4" and j % self.block == 0:
            scale, zero = int4_block_params(current[:, :self.block], self.block,
                                            self.float_dtype)
            self.scale[:, j // self.block] = scale[:, 0]
            self.zero[:, j // self.block] = zero[:, 0]

    def quantize(self, j: int, col: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Codes and dequantized values of column j."""
        if self.mode == "int8":
            codes = int8_codes(col, self.scale[:, 0])
            return codes, codes * self.scale[:, 0]
        if self.mode == "int4":
            scale, zero = self.scale[:, j // self.block], self.zero[:, j // self.block]
            codes = int4_codes(col, scale, zero)
            return codes, (codes - zero) * scale
        codes = lut_codes(col, self.row_luts)
        return codes, self.row_luts[np.arange(col.size), codes]

    def result(self, codes: np.ndarray, values: np.ndarray) -> Quantized:
        if self.mode == "int8":
            return Quantized("affine", 8, codes.astype(np.int8), self.scale, None,
                             values.astype(np.float32), codes.shape[1])
        if self.mode == "int4":
            return Quantized("affine", 4, codes.astype(np.uint8), self.scale,
                             self.zero.astype(self.float_dtype), values.astype(np.float32),
                             self.block)
        return Quantized("lut", 4, codes.astype(np.uint8), self.luts, None,
                         values.astype(np.float32), self.block)


def quantize_rtn(mode: str, w: np.ndarray, block: int, float_dtype) -> Quantized:
    """Round to nearest, all columns at once (the grid's per-column steps, vectorised)."""
    w = w.astype(np.float32)
    grid = Grid(mode, w, block, float_dtype)
    n, k = w.shape
    if mode == "int8":
        codes = np.clip(np.rint(w / grid.scale), -127, 127)
        return grid.result(codes, codes * grid.scale)
    if mode == "int4":
        grid.scale, grid.zero = int4_block_params(w, block, float_dtype)
        scale = np.repeat(grid.scale, block, axis=1)
        zero = np.repeat(grid.zero, block, axis=1)
        codes = int4_codes(w, scale, zero)
        return grid.result(codes, (codes - zero) * scale)
    mids = (grid.row_luts[:, 1:] + grid.row_luts[:, :-1]) / 2
    codes = np.zeros(w.shape, np.int64)
    for e in range(mids.shape[1]):  # 15 comparisons, not a [N, K, 15] temporary
        codes += w > mids[:, e:e + 1]
    return grid.result(codes, np.take_along_axis(grid.row_luts, codes, axis=1))


def quantize_gptq(mode: str, w: np.ndarray, block: int, float_dtype,
                  hessian: np.ndarray, act_order: bool = True) -> Quantized:
    """GPTQ: quantize columns one by one, compensating each column's error on the columns
    not quantized yet. With `act_order` the columns go in order of decreasing H diagonal
    (the inputs with the most energy first) and int4 block parameters are fixed up front
    from the float weight ("static groups"), so blocks stay contiguous as the format needs."""
    w = w.astype(np.float64).copy()
    n, k = w.shape
    h = hessian.astype(np.float64).copy()
    dead = np.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h[np.diag_indices(k)] += GPTQ_DAMP * np.mean(np.diag(h))
    grid = Grid(mode, w.astype(np.float32), block, float_dtype,
                hessian_diag=np.diag(h) if mode == "palette4" else None)
    order = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(k)
    if act_order and mode == "int4":
        grid.scale, grid.zero = int4_block_params(w.astype(np.float32), block, float_dtype)
    w, h = w[:, order], h[np.ix_(order, order)]
    # the upper Cholesky factor of H^-1: row j holds column j's error propagation weights
    u = np.linalg.cholesky(np.linalg.inv(h)).T
    codes = np.zeros((n, k))
    values = np.zeros((n, k))
    width = GPTQ_BLOCK if mode != "int4" else max(block, GPTQ_BLOCK // block * block)
    for i1 in range(0, k, width):
        i2 = min(i1 + width, k)
        w1 = w[:, i1:i2].copy()
        errors = np.zeros((n, i2 - i1))
        for i in range(i2 - i1):
            column = order[i1 + i]
            if not act_order:
                grid.start_block(column, w1[:, i:])
            code, value = grid.quantize(column, w1[:, i].astype(np.float32))
            codes[:, column], values[:, column] = code, value
            error = (w1[:, i] - value) / u[i1 + i, i1 + i]
            w1[:, i:] -= np.outer(error, u[i1 + i, i1 + i:i2])
            errors[:, i] = error
        w[:, i2:] -= errors @ u[i1:i2, i2:]
    return grid.result(codes, values)
