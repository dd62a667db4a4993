"""Calibration data for `quantize_weights`: reading the file, and what the layers see.

The file (`--calibration FEEDS.npz`) is a numpy .npz archive keyed by model input names.
Each array holds the samples of one input, either
- `[S, *input_shape]`: S samples along a new leading axis, or
- `[S, *input_shape[1:]]` when the input's first dim is 1: S samples stacked on the batch
  axis (a batch-1 model's inputs, one row per sample), or
- `input_shape`: one sample.
Every model input must be present with the same S, and nothing else; float inputs need
float arrays and integer inputs integer arrays. A mismatch is an `InputError` at compile
time, naming the file, the input and the shapes.

The interpreter (the op table's numpy references) runs the float graph on each sample, and
`hessians` accumulates H = sum(X^T X) over the input rows X of each layer that GPTQ will
quantize: [K, K] for Linear-like layers, and over im2col patches for a Conv.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from applec import ops
from applec.errors import InputError
from applec.ir import Graph, Node, Value

MAX_SAMPLES = 256  # more samples change H very little and cost one interpreter run each


def load_calibration(source, inputs: list[Value]) -> list[dict[str, np.ndarray]]:
    """The samples of `source` (.npz path or a mapping name -> array), one feed dict each."""
    where = f"--calibration {source}" if not isinstance(source, Mapping) else "calibration"
    arrays = _read(source, where)
    names = [v.name for v in inputs]
    missing = [n for n in names if n not in arrays]
    extra = sorted(set(arrays) - set(names))
    if missing or extra:
        parts = []
        if missing:
            parts.append("missing " + ", ".join(missing))
        if extra:
            parts.append("unknown " + ", ".join(extra))
        raise InputError(f"{where}: arrays do not match the model inputs ({'; '.join(parts)}); "
                         f"the model takes " + ", ".join(_describe(v) for v in inputs))
    counts = {}
    stacked = {}
    for value in inputs:
        array = np.asarray(arrays[value.name])
        if (array.dtype.kind == "f") != (value.dtype.kind == "f") or array.dtype.kind not in "fiub":
            raise InputError(f"{where}: '{value.name}' is {array.dtype}, the model input is "
                             f"{value.dtype}")
        shape = tuple(value.shape)
        if array.shape == shape:
            array = array[None]
        elif array.shape[1:] == shape:
            pass
        elif shape and shape[0] == 1 and array.shape[1:] == shape[1:] and array.ndim == len(shape):
            array = array[:, None]
        else:
            raise InputError(f"{where}: '{value.name}' has shape {list(array.shape)}; expected "
                             f"{list(shape)} (one sample) or [S, {', '.join(map(str, shape))}]")
        counts[value.name] = array.shape[0]
        stacked[value.name] = array.astype(value.dtype)
    if len(set(counts.values())) > 1:
        raise InputError(f"{where}: inputs hold different sample counts: " +
                         ", ".join(f"{n} {c}" for n, c in counts.items()))
    count = min(next(iter(counts.values()), 0), MAX_SAMPLES)
    if count == 0:
        raise InputError(f"{where}: no samples")
    return [{n: a[i] for n, a in stacked.items()} for i in range(count)]


def _read(source, where: str) -> dict[str, np.ndarray]:
    if isinstance(source, Mapping):
        return dict(source)
    path = Path(source)
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {name: archive[name] for name in archive.files}
    except FileNotFoundError:
        raise InputError(f"{where}: no such file") from None
    except (OSError, ValueError, AttributeError) as exc:
        raise InputError(f"{where}: not a .npz archive of arrays ({exc})") from None


def _describe(value: Value) -> str:
    return f"{value.name} {value.dtype}{list(value.shape)}"


def run_observed(graph: Graph, feeds: dict[str, np.ndarray],
                 observe: Callable[[Node, list, list], None],
                 replace: Callable[[Node], list | None] | None = None) -> dict[str, np.ndarray]:
    """The interpreter's loop (applec.interpreter.run), calling `observe(node, inputs,
    outputs)` after each node; `replace(node)` may give a node's outputs instead."""
    env: dict[int, np.ndarray] = {id(v): np.asarray(feeds[v.name]) for v in graph.inputs}
    for node in graph.nodes:
        args = [None if v is None else (v.const if v.is_const else env[id(v)])
                for v in node.inputs]
        outs = replace(node) if replace is not None else None
        if outs is None:
            outs = ops.evaluate(node, args)
        observe(node, args, outs)
        for value, out in zip(node.outputs, outs):
            env[id(value)] = out
    return {v.name: (v.const if v.is_const else env[id(v)]) for v in graph.outputs}


def rows_for(node: Node, x: np.ndarray) -> np.ndarray | None:
    """The input rows X [M, K] a layer multiplies by its weight's rows, or None (no GPTQ)."""
    if node.op_type in ("applec.Linear", "MatMul"):
        return x.reshape(-1, x.shape[-1])
    if node.op_type == "Gemm" and not node.attrs.get("transA", 0):
        return x.reshape(-1, x.shape[-1])
    if node.op_type == "Conv" and conv_supported(node):
        return im2col(node, x)
    return None


def conv_supported(node: Node) -> bool:
    return len(node.inputs[0].shape) == 4 and int(node.attrs.get("group", 1)) == 1 and \
        node.attrs.get("auto_pad", "NOTSET") in ("NOTSET", "VALID")


def im2col(node: Node, x: np.ndarray) -> np.ndarray:
    """Patches [B*OH*OW, C*kh*kw] of a 2-D Conv's input, in the weight's (C, kh, kw) order."""
    kh, kw = node.inputs[1].shape[2:]
    sh, sw = node.attrs.get("strides", [1, 1])
    dh, dw = node.attrs.get("dilations", [1, 1])
    pads = node.attrs.get("pads", [0, 0, 0, 0]) \
        if node.attrs.get("auto_pad", "NOTSET") == "NOTSET" else [0, 0, 0, 0]
    x = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    windows = np.lib.stride_tricks.sliding_window_view(
        x, ((kh - 1) * dh + 1, (kw - 1) * dw + 1), axis=(2, 3))[..., ::dh, ::dw]
    windows = windows[:, :, ::sh, ::sw]          # [B, C, OH, OW, kh, kw]
    b, c, oh, ow = windows.shape[:4]
    return windows.transpose(0, 2, 3, 1, 4, 5).reshape(b * oh * ow, c * kh * kw)


def hessians(graph: Graph, layers: dict[int, Node], samples: list[dict]) -> dict[int, np.ndarray]:
    """H = sum over samples of X^T X for each layer (keyed by id(node)) that GPTQ can use."""
    sums: dict[int, np.ndarray] = {}
    counts: dict[int, int] = {}

    def observe(node, inputs, outputs):
        if id(node) not in layers:
            return
        rows = rows_for(node, np.asarray(inputs[0], np.float32))
        if rows is None:
            return
        # fp32 sums, as GPTQ's reference code keeps them: a BERT-base holds 12 [3072, 3072]
        sums[id(node)] = sums.get(id(node), 0) + rows.T @ rows
        counts[id(node)] = counts.get(id(node), 0) + rows.shape[0]

    for feeds in samples:
        run_observed(graph, feeds, observe)
    return {key: total / counts[key] for key, total in sums.items()}
