"""Run a saved CoreML ML program on Linux with numpy, as a reference for the real thing.

CoreML itself only runs on macOS. `ReferenceProgram` reads the .mlpackage from disk
(`mil_reader`), folds its `const` / `constexpr_*` ops once, and interprets the rest op by
op with the numpy references in `mil_ops`. Each result is cast to the dtype the program
declares, so fp16 programs are rounded to fp16 after every op, like the device does.
Intermediate tensors are dropped as soon as their last reader has run.
"""

from __future__ import annotations

import numpy as np

from applec.errors import ApplecError, BundleError, InputError

from .mil_ops import MIL_OPS
from .mil_reader import Block, Operation, Program, TensorInfo, read_mlpackage, walk

# Ops run by the executor itself because they own nested blocks.
CONTROL_FLOW_OPS = frozenset({"cond"})


class ReferenceProgram:
    """An ML program loaded once from an .mlpackage; `run` may be called many times."""

    def __init__(self, mlpackage_path: str):
        self.path = str(mlpackage_path)
        self.program: Program = read_mlpackage(self.path)
        self._check_supported(self.program.main)
        self._consts: dict[str, object] = {}
        self._fold_constants(self.program.main)
        self._frees: dict[int, list[list[str]]] = {}
        self._plan_frees(self.program.main, keep={t.name for t in self.program.outputs})

    @property
    def inputs(self) -> list[TensorInfo]:
        return self.program.inputs

    @property
    def outputs(self) -> list[TensorInfo]:
        return self.program.outputs

    def op_types(self) -> set[str]:
        """Every op type in the program, nested blocks included."""
        return {op.type for op in walk(self.program.main)}

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Outputs by name, in the program's declared dtypes; bad feeds raise InputError."""
        env = dict(self._check_feeds(feeds))
        self._run_block(self.program.main, env)
        # Copies: an output may be a view of a cached constant or of a feed.
        return {t.name: np.array(self._lookup(env, t.name), dtype=t.dtype)
                for t in self.program.outputs}

    # ---- loading --------------------------------------------------------------------------

    def _check_supported(self, block: Block) -> None:
        for op in walk(block):
            if op.type not in MIL_OPS and op.type not in CONTROL_FLOW_OPS:
                raise BundleError(f"{self.path}: unsupported MIL op type {op.type!r} "
                                  f"(op producing {op.name!r})")

    def _fold_constants(self, block: Block) -> None:
        """Evaluate const and constexpr ops once; their results live as long as the program."""
        for op in walk(block):
            if op.type == "const" or op.type.startswith("constexpr_"):
                for t, value in zip(op.outputs, self._execute(op, self._consts)):
                    value.flags.writeable = False  # shared by every run: no op may edit it
                    self._consts[t.name] = value

    def _plan_frees(self, block: Block, keep: set[str]) -> None:
        """For each op of `block`, the names it defined or read that nobody reads later."""
        local = {t.name for t in block.inputs}
        local.update(t.name for op in block.operations for t in op.outputs)
        last: dict[str, int] = {}
        for i, op in enumerate(block.operations):
            for name in _reads(op):
                last[name] = i
            for t in op.outputs:
                last.setdefault(t.name, i)  # never read: free right after it is made
            for inner in op.blocks:
                self._plan_frees(inner, keep=keep | set(inner.outputs))
        frees: list[list[str]] = [[] for _ in block.operations]
        for name, i in last.items():
            if name in local and name not in keep and name not in self._consts:
                frees[i].append(name)
        self._frees[id(block)] = frees

    # ---- running --------------------------------------------------------------------------

    def _check_feeds(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        declared = {t.name: t for t in self.program.inputs}
        for name in feeds:
            if name not in declared:
                raise InputError(f"unknown input {name!r}; the program takes "
                                 f"{', '.join(repr(n) for n in declared)}")
        for name, t in declared.items():
            if name not in feeds:
                raise InputError(f"missing input {name!r} ({t.mil_dtype}{_shape_text(t.shape)})")
            value = feeds[name]
            if not isinstance(value, np.ndarray) or value.dtype != t.dtype:
                got = value.dtype if isinstance(value, np.ndarray) else type(value).__name__
                raise InputError(f"input {name!r}: dtype {got}, expected {t.dtype} ({t.mil_dtype})")
            if not _shape_matches(value.shape, t.shape):
                raise InputError(f"input {name!r}: shape {list(value.shape)}, "
                                 f"expected {_shape_text(t.shape)}")
        return feeds

    def _run_block(self, block: Block, env: dict) -> list:
        frees = self._frees[id(block)]
        for op, dead in zip(block.operations, frees):
            if op.type == "const" or op.type.startswith("constexpr_"):
                continue  # folded at load time
            values = self._run_cond(op, env) if op.type == "cond" else self._execute(op, env)
            env.update(zip((t.name for t in op.outputs), values))
            for name in dead:
                env.pop(name, None)
        return [self._lookup(env, name) for name in block.outputs]

    def _run_cond(self, op: Operation, env: dict) -> list[np.ndarray]:
        pred = bool(np.asarray(self._lookup(env, op.inputs["pred"])).item())
        branch = op.blocks[0] if pred else op.blocks[1]
        values = self._run_block(branch, env)
        for name in branch.outputs:  # the branch's results now live on as the cond's outputs
            if any(name == t.name for inner in branch.operations for t in inner.outputs):
                env.pop(name, None)
        return [self._cast(op, t, v) for t, v in zip(op.outputs, values)]

    def _execute(self, op: Operation, env: dict) -> list[np.ndarray]:
        """Run one op through its numpy reference; results are cast to the declared dtypes."""
        args = {k: _plain(v) for k, v in op.attributes.items() if k != "name"}
        args.update((k, self._resolve(env, v)) for k, v in op.inputs.items())
        try:
            with np.errstate(all="ignore"):  # IEEE results (inf, NaN), as on the device
                result = MIL_OPS[op.type](args, op.outputs)
        except ApplecError:
            raise
        except Exception as e:  # a numpy failure inside an op: say which op
            raise BundleError(f"{self.path}: op {op.name!r} ({op.type}) failed: {e}") from e
        results = list(result) if isinstance(result, (tuple, list)) else [result]
        if len(results) != len(op.outputs):
            raise BundleError(f"{self.path}: op {op.name!r} ({op.type}) made {len(results)} "
                              f"outputs, the program declares {len(op.outputs)}")
        return [self._cast(op, t, v) for t, v in zip(op.outputs, results)]

    def _cast(self, op: Operation, t: TensorInfo, value) -> np.ndarray:
        value = np.asarray(value)
        if value.dtype != object:
            value = value.astype(t.dtype, copy=False)
        if not _shape_matches(value.shape, t.shape):
            raise BundleError(f"{self.path}: op {op.name!r} ({op.type}) made {t.name!r} with "
                              f"shape {list(value.shape)}, the program declares "
                              f"{_shape_text(t.shape)}")
        return value

    def _resolve(self, env: dict, arg):
        if isinstance(arg, list):
            return [self._resolve(env, a) for a in arg]
        if isinstance(arg, str):
            return _plain(self._lookup(env, arg))
        return _plain(arg)

    def _lookup(self, env: dict, name: str):
        if name in env:
            return env[name]
        if name in self._consts:
            return self._consts[name]
        raise BundleError(f"{self.path}: variable {name!r} is read before it is defined")


def _reads(op: Operation) -> set[str]:
    """Variable names `op` reads, including free variables of its nested blocks."""
    names = set()
    for arg in op.inputs.values():
        for item in arg if isinstance(arg, list) else [arg]:
            if isinstance(item, str):
                names.add(item)
    for inner in op.blocks:
        defined = {t.name for t in inner.inputs}
        for nested in inner.operations:
            names.update(_reads(nested) - defined)
            defined.update(t.name for t in nested.outputs)
        names.update(set(inner.outputs) - defined)
    return names


def _plain(value):
    """MIL strings are held in object arrays; ops want a scalar string as `str`."""
    if isinstance(value, np.ndarray) and value.dtype == object and value.ndim == 0:
        return str(value.item())
    return value


def _shape_matches(actual: tuple, declared: tuple) -> bool:
    return len(actual) == len(declared) and all(
        d is None or a == d for a, d in zip(actual, declared))


def _shape_text(shape: tuple) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"
