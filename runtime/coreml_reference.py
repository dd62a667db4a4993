"""Run a saved CoreML ML program on Linux with numpy, as a reference for the real thing.

CoreML itself only runs on macOS. `ReferenceProgram` reads the .mlpackage from disk
(`mil_reader`), folds its `const` / `constexpr_*` ops, and every op that reads constants
only, once, and interprets the rest op by op with the numpy references in `mil_ops`.
Intermediate tensors are dropped as soon as their last reader has run.

Loading turns every op into a `_Step`: its constant arguments resolved and decoded once
(attributes, immediates, folded constants), the variables it reads, and what becomes of
each result. Running is then a loop over steps. An `identity` op of a variable is no
step: its readers read that variable.

fp16: the executor holds every fp16 value as the float32 number it equals (the conversion is
exact), so ops always compute in fp32. Each result the program declares fp16 is rounded to
the nearest fp16 value, once per op, like the device does; results of pure data-movement
ops and of ops that pick values (maximum, clip, ...) are fp16 values already when their
inputs are, and are not rounded again. Outputs and feeds are converted at
the program's edges, so callers see the declared dtypes.
"""

from __future__ import annotations

import numpy as np

from applec.errors import ApplecError, BundleError, InputError

from .fp16_round import round_to_fp16
from .mil_ops import IN_PLACE, KEEPS_FP16, MIL_OPS, TRANSPOSED
from .mil_reader import Block, Operation, Program, TensorInfo, read_mlpackage, walk

# Ops run by the executor itself because they own nested blocks.
CONTROL_FLOW_OPS = frozenset({"cond"})
F16, F32 = np.dtype(np.float16), np.dtype(np.float32)

# What becomes of a result: KEEP it (cast to the declared dtype if needed); or, declared fp16,
# hold it as fp32: as is when it holds fp16 values already (FP16_EXACT), else rounded to them,
# in a copy (FP16_ROUND) or in place when the op made a fresh array (FP16_ROUND_IN_PLACE).
KEEP, FP16_EXACT, FP16_ROUND, FP16_ROUND_IN_PLACE = range(4)


class _Step:
    """One op ready to run. `static` holds its constant arguments (already decoded and in fp32
    where the program has fp16), `reads` the (parameter, variable) pairs it takes from the
    environment, `lists` its variadic parameters that mix variables and constants as
    (parameter, ((variable or None, constant), ...)); `finish` has one (kind, dtype, shape,
    shape is fully known) per output; `dead` names the variables nobody reads after it.
    `in_place` lists (parameter, variable) pairs the op may overwrite (see `mil_ops.IN_PLACE`)
    when the variable's array is one only the executor holds; `owns` says whether to find
    out, after the step runs, if its result is such an array."""

    __slots__ = ("branches", "dead", "finish", "in_place", "lists", "names", "op", "owns",
                 "reads", "static")

    def __init__(self, op: Operation):
        self.op = op
        self.static: dict = {}
        self.reads: tuple = ()
        self.lists: tuple = ()
        self.names = tuple(t.name for t in op.outputs)
        self.finish: tuple = ()
        self.dead: tuple = ()
        self.in_place: tuple = ()
        self.owns = False
        self.branches: tuple = ()  # cond: (steps, outputs) of the true, then the false branch


class ReferenceProgram:
    """An ML program loaded once from an .mlpackage; `run` may be called many times."""

    def __init__(self, mlpackage_path: str):
        self.path = str(mlpackage_path)
        self.program: Program = read_mlpackage(self.path)
        self._check_supported(self.program.main)
        consts = self._fold_constants(self.program.main)
        self._dtypes = {t.name: t.mil_dtype for t in self.program.inputs}
        for op in walk(self.program.main):
            self._dtypes.update((t.name, t.mil_dtype) for t in op.outputs)
        self._alias: dict[str, str] = {}  # identity result -> the variable it passes on
        keep = {t.name for t in self.program.outputs}
        self._main = self._plan_block(self.program.main, consts, keep)
        # Constants live in the steps that read them; only those a block returns by name stay.
        returned = set(keep)
        for op in walk(self.program.main):
            for inner in op.blocks:
                returned.update(inner.outputs)
        self._consts = {name: self._constant(name, consts) for name in returned if name in consts}

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
        env = {name: value.astype(F32) if value.dtype == F16 else value
               for name, value in self._check_feeds(feeds).items()}
        with np.errstate(all="ignore"):  # IEEE results (inf, NaN), as on the device
            self._run_steps(self._main, env)
        # Copies: an output may be a view of a constant or of a feed.
        return {t.name: np.array(self._lookup(env, t.name), dtype=t.dtype)
                for t in self.program.outputs}

    # ---- loading --------------------------------------------------------------------------

    def _check_supported(self, block: Block) -> None:
        for op in walk(block):
            if op.type not in MIL_OPS and op.type not in CONTROL_FLOW_OPS:
                raise BundleError(f"{self.path}: unsupported MIL op type {op.type!r} "
                                  f"(op producing {op.name!r})")

    def _fold_constants(self, block: Block) -> dict[str, np.ndarray]:
        """Evaluate const and constexpr ops once. A const's value moves out of the program
        as it is (`_constant` converts it when a step binds it)."""
        consts: dict[str, np.ndarray] = {}
        for op in walk(block):
            if op.type == "const":
                value = op.attributes["val"]
                if not _shape_matches(value.shape, op.outputs[0].shape):
                    raise BundleError(f"{self.path}: const {op.name!r} has shape "
                                      f"{list(value.shape)}, the program declares "
                                      f"{_shape_text(op.outputs[0].shape)}")
                dtype = op.outputs[0].dtype
                if value.dtype != dtype and value.dtype != object:
                    value = value.astype(dtype)
                value.flags.writeable = False  # shared by every run: no op may edit it
                consts[op.name] = _plain(value)
                op.attributes = {k: v for k, v in op.attributes.items() if k != "val"}
            elif op.type.startswith("constexpr_"):
                step = _Step(op)
                step.finish = _finishes(op, exact=False)
                args = {k: _plain(v) for k, v in op.attributes.items() if k != "name"}
                for k, v in op.inputs.items():
                    args[k] = _resolve_const(consts, v, self.path)
                with np.errstate(all="ignore"):
                    values = _as_list(self._call(step, args))
                consts.update((name, _shadow(value)) for name, value in zip(step.names, values))
        return consts

    def _plan_block(self, block: Block, consts: dict, keep: set[str]) -> list[_Step]:
        """Steps for the ops of `block`. An op that reads constants only is folded into one."""
        ops, steps = [], []
        for op in block.operations:
            if op.type == "const" or op.type.startswith("constexpr_"):
                continue
            source = op.inputs.get("x") if op.type == "identity" else None
            if isinstance(source, str) and source not in consts and \
                    self._dtypes.get(source) == op.outputs[0].mil_dtype:
                self._alias[op.outputs[0].name] = self._resolve(source)  # a name, not a step
                continue
            step = self._plan_op(op, consts, keep)
            if not (step.reads or step.lists or step.branches) and self._fold(step, consts):
                continue
            ops.append(op)
            steps.append(step)
        local = {t.name for t in block.inputs}
        local.update(name for step in steps for name in step.names)
        keep = {self._resolve(name) for name in keep}
        last: dict[str, int] = {}
        for i, op in enumerate(ops):
            for name in _reads(op):
                last[self._resolve(name)] = i
            for t in op.outputs:
                last.setdefault(t.name, i)  # never read: free right after it is made
        dead: list[list[str]] = [[] for _ in steps]
        for name, i in last.items():
            if name in local and name not in keep:
                dead[i].append(name)
        for step, names in zip(steps, dead):
            step.dead = tuple(names)
        _plan_in_place(steps)
        return steps

    def _fold(self, step: _Step, consts: dict) -> bool:
        """Run `step` now and keep its results as constants, unless it fails (it may sit in a
        branch that never runs: then it fails at run time, if ever)."""
        try:
            with np.errstate(all="ignore"):
                values = _as_list(self._call(step, step.static.copy()))
        except ApplecError:
            return False
        for name, value in zip(step.names, values):
            consts[name] = _shadow(value)
        return True

    def _plan_op(self, op: Operation, consts: dict, keep: set[str]) -> _Step:
        step = _Step(op)
        step.static = {k: _shadow(_plain(v)) for k, v in op.attributes.items() if k != "name"}

        def variable(arg) -> bool:
            return isinstance(arg, str) and arg not in consts

        reads, lists = [], []
        for param, arg in op.inputs.items():
            if isinstance(arg, list):
                items = tuple((self._resolve(a), None) if variable(a)
                              else (None, self._constant(a, consts)) for a in arg)
                if all(name is None for name, _ in items):
                    step.static[param] = [value for _, value in items]
                else:
                    lists.append((param, items))
            elif variable(arg):
                reads.append((param, self._resolve(arg)))
            else:
                transposed = param in TRANSPOSED.get(op.type, ())
                step.static[param] = self._constant(arg, consts, transposed)
        step.reads, step.lists = tuple(reads), tuple(lists)
        step.finish = _finishes(op, exact=op.type in KEEPS_FP16 and self._holds_fp16(op))
        for inner in op.blocks:
            inner_keep = keep | set(inner.outputs)
            step.branches += ((self._plan_block(inner, consts, inner_keep), inner.outputs),)
        return step

    @staticmethod
    def _constant(arg, consts: dict, transposed: bool = False):
        """A constant argument as steps hold it (see `_shadow`). A named constant is
        converted once, by its first reader, and shared by the others."""
        if not isinstance(arg, str):
            return _shadow(_plain(arg))
        value = consts[arg]
        held = _shadow(_plain(value), transposed)
        if held is not value:
            consts[arg] = held
        return held

    def _holds_fp16(self, op: Operation) -> bool:
        """Whether every floating-point input of `op` is a variable declared fp16."""
        for arg in op.inputs.values():
            for item in arg if isinstance(arg, list) else [arg]:
                if isinstance(item, np.ndarray) and item.dtype.kind == "f":
                    return False  # an immediate: not known to hold fp16 values
                dtype = self._dtypes.get(item, "") if isinstance(item, str) else ""
                if dtype.startswith(("fp", "bf")) and dtype != "fp16":
                    return False
        return True

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

    def _run_steps(self, steps: list[_Step], env: dict) -> None:
        owned: set[str] = set()  # results only the executor holds (see _Step.in_place)
        for step in steps:
            if step.branches:
                values = self._run_cond(step, env)
            else:
                args = step.static.copy()
                try:
                    for param, name in step.reads:
                        args[param] = env[name]
                    for param, items in step.lists:
                        args[param] = [value if name is None else env[name]
                                       for name, value in items]
                except KeyError as e:
                    raise BundleError(f"{self.path}: variable {e.args[0]!r} is read before it "
                                      "is defined") from None
                over = next((p for p, name in step.in_place if name in owned), None)
                values = self._call(step, args, over)
                if step.owns:  # a fresh array, or one it overwrote that only we hold
                    value = values if values.__class__ is np.ndarray else values[0]
                    if value.flags.owndata and value.flags.writeable and (
                            (over and value is args[over])
                            or not any(value is v for v in args.values())):
                        owned.add(step.names[0])
            if values.__class__ is np.ndarray:  # one output, already finished
                env[step.names[0]] = values
            else:
                for name, value in zip(step.names, values):
                    env[name] = value
            for name in step.dead:
                env.pop(name, None)

    def _run_cond(self, step: _Step, env: dict) -> list[np.ndarray]:
        pred = step.static.get("pred")
        if pred is None:
            pred = self._lookup(env, step.op.inputs["pred"])
        steps, outputs = step.branches[0] if bool(np.asarray(pred).item()) else step.branches[1]
        self._run_steps(steps, env)
        values = [self._lookup(env, name) for name in outputs]
        for name in map(self._resolve, outputs):  # they live on as the cond's outputs
            if any(name in inner.names for inner in steps):
                env.pop(name, None)
        return [self._finish(step, i, kind, value)  # cond is FP16_ROUND: never in place
                for i, ((kind, *_), value) in enumerate(zip(step.finish, values))]

    def _call(self, step: _Step, args: dict, over: str | None = None):
        """Run one op through its numpy reference and finish its results: a list, or the
        one result itself when it needed no finishing (see `_as_list`). `over`: a parameter
        whose array the op may overwrite (the in-place form is used where it fits)."""
        op = step.op
        try:
            result = IN_PLACE[op.type][1](args, over) if over else None
            if result is None:
                over = None
                result = MIL_OPS[op.type](args, op.outputs)
        except ApplecError:
            raise
        except Exception as e:  # a numpy failure inside an op: say which op
            raise BundleError(f"{self.path}: op {op.name!r} ({op.type}) failed: {e}") from e
        finish = step.finish
        if len(finish) == 1 and not isinstance(result, (tuple, list)):
            kind, dtype, shape, known = finish[0]
            if kind == KEEP and result.__class__ is np.ndarray and result.dtype == dtype \
                    and known and result.shape == shape:
                return result  # the common case, checked without _finish's generality
            if kind == FP16_ROUND and isinstance(result, np.ndarray) and (over or (
                    result.flags.owndata and result.flags.writeable
                    and not any(result is v for v in args.values()))):
                kind = FP16_ROUND_IN_PLACE  # a fresh array only this op holds
            return [self._finish(step, 0, kind, result)]
        results = list(result) if isinstance(result, (tuple, list)) else [result]
        if len(results) != len(finish):
            raise BundleError(f"{self.path}: op {op.name!r} ({op.type}) made {len(results)} "
                              f"outputs, the program declares {len(op.outputs)}")
        return [self._finish(step, i, f[0], value)
                for i, (f, value) in enumerate(zip(finish, results))]

    def _finish(self, step: _Step, index: int, kind: int, value) -> np.ndarray:
        """Result `index` of `step` in the dtype the executor holds it in, shape checked."""
        _, dtype, shape, known = step.finish[index]
        value = np.asarray(value)
        vdtype = value.dtype
        if kind == KEEP:
            if vdtype != dtype and vdtype.kind != "O":
                value = value.astype(dtype)
        elif vdtype == F32:
            if kind != FP16_EXACT:
                value = round_to_fp16(value, in_place=kind == FP16_ROUND_IN_PLACE)
        else:  # fp16 made by the op (exact in fp32), or another dtype: round it as numpy does
            value = (value if vdtype == F16 else value.astype(F16)).astype(F32)
        if (value.shape != shape) if known else not _shape_matches(value.shape, shape):
            op = step.op
            raise BundleError(f"{self.path}: op {op.name!r} ({op.type}) made "
                              f"{op.outputs[index].name!r} with shape {list(value.shape)}, the "
                              f"program declares {_shape_text(shape)}")
        return _plain(value) if vdtype.kind == "O" else value

    def _resolve(self, name: str) -> str:
        """The variable that holds `name`'s value: itself, or what the identity ops that
        made it pass on (they run as renames, not as steps)."""
        return self._alias.get(name, name)

    def _lookup(self, env: dict, name: str):
        name = self._resolve(name)
        if name in env:
            return env[name]
        if name in self._consts:
            return self._consts[name]
        raise BundleError(f"{self.path}: variable {name!r} is read before it is defined")


# ---- helpers ---------------------------------------------------------------------------------

def _finishes(op: Operation, exact: bool) -> tuple:
    """(kind, dtype held, declared shape, shape fully known) for each output of `op`."""
    return tuple((KEEP if t.dtype != F16 else FP16_EXACT if exact else FP16_ROUND,
                  t.dtype if t.dtype != F16 else F32, t.shape, None not in t.shape)
                 for t in op.outputs)


def _shadow(value, transposed: bool = False):
    """A constant as the executor holds it: fp16 as fp32 (exact), read-only; `transposed`:
    a 2-D array stored in Fortran order (same shape and values), for ops that multiply by
    its transpose. An fp16 array is converted and transposed in the same copy."""
    if isinstance(value, list):
        return [_shadow(v) for v in value]
    if isinstance(value, np.ndarray):
        dtype = F32 if value.dtype == F16 else value.dtype
        if transposed and value.ndim == 2 and not value.T.flags.c_contiguous:
            value = np.asarray(value.T, dtype=dtype, order="C").T
        elif dtype != value.dtype:
            value = value.astype(dtype)
        value.flags.writeable = False
    return value


def _resolve_const(consts: dict, arg, path: str):
    if isinstance(arg, list):
        return [_resolve_const(consts, a, path) for a in arg]
    if isinstance(arg, str):
        if arg not in consts:
            raise BundleError(f"{path}: variable {arg!r} is read before it is defined")
        return _plain(consts[arg])
    return _plain(arg)


def _plan_in_place(steps: list[_Step]) -> None:
    """Mark the steps that may overwrite an input (`_Step.in_place`): an op with an in-place
    form whose input dies at it, made by an earlier step of the same block (never a block
    input: the caller's feed, or a variable of the enclosing block), and that step as one
    whose result's ownership the run loop must check."""
    made = {name: step for step in steps for name in step.names}
    for step in steps:
        if step.op.type not in IN_PLACE or len(step.names) != 1:
            continue
        params = IN_PLACE[step.op.type][0]
        dead = set(step.dead)
        pairs = tuple((p, name) for p, name in step.reads
                      if p in params and name in dead and name in made
                      and len(made[name].names) == 1 and made[name] is not step)
        step.in_place = pairs
        for _, name in pairs:
            made[name].owns = True


def _as_list(values) -> list:
    return [values] if values.__class__ is np.ndarray else values


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
