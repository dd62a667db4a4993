"""Read a saved CoreML ML program (.mlpackage) back from disk into plain Python.

The CoreML reference executor must check what we actually wrote, so it never trusts an
in-memory coremltools object: it parses `Manifest.json`, the root model's protobuf spec and
the MIL blob storage files (`weights/weight.bin`) itself. The result is a small structure
of `Program` -> `Block` -> `Operation`, with every constant decoded to a numpy array.

An operation's inputs map each parameter name to one of:
  * `str`           the name of a variable defined earlier (or in an enclosing block);
  * `np.ndarray`    an immediate value bound in place (constexpr ops do this); strings
                    are object arrays, so a `str` is always a variable name;
  * `list`          a variadic parameter (concat's `values`), each item one of the above.

Blob storage format (MILBlob `StorageFormat.hpp`): a 64-byte file header
(uint32 count, uint32 version == 2, reserved), then at each blob's offset a 64-byte
metadata record (uint32 sentinel 0xDEADBEEF, uint32 data type, uint64 size in bytes,
uint64 data offset, uint64 padding bits of the last byte for sub-byte types, reserved)
and the raw data at the data offset. Sub-byte data is packed least significant bit first.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import numpy as np

from applec.errors import BundleError

_HEADER_SIZE = 64
_METADATA_SIZE = 64
_SENTINEL = 0xDEADBEEF
_STORAGE_VERSION = 2
_HEADER_DTYPE = np.dtype([("count", "<u4"), ("version", "<u4")])
_METADATA_DTYPE = np.dtype(
    [("sentinel", "<u4"), ("dtype", "<u4"), ("size", "<u8"), ("offset", "<u8"), ("pad_bits", "<u8")]
)

# MIL dtype name -> (numpy storage dtype, bits per element). Sub-byte types are widened to
# one byte per element once unpacked; bf16 is widened to fp32 because numpy has no bf16.
MIL_DTYPES: dict[str, tuple[np.dtype, int]] = {
    "bool": (np.dtype(bool), 8),
    "fp16": (np.dtype(np.float16), 16),
    "fp32": (np.dtype(np.float32), 32),
    "fp64": (np.dtype(np.float64), 64),
    "bf16": (np.dtype(np.float32), 16),
    "int4": (np.dtype(np.int8), 4),
    "int8": (np.dtype(np.int8), 8),
    "int16": (np.dtype(np.int16), 16),
    "int32": (np.dtype(np.int32), 32),
    "int64": (np.dtype(np.int64), 64),
    "uint1": (np.dtype(np.uint8), 1),
    "uint2": (np.dtype(np.uint8), 2),
    "uint3": (np.dtype(np.uint8), 3),
    "uint4": (np.dtype(np.uint8), 4),
    "uint6": (np.dtype(np.uint8), 6),
    "uint8": (np.dtype(np.uint8), 8),
    "uint16": (np.dtype(np.uint16), 16),
    "uint32": (np.dtype(np.uint32), 32),
    "uint64": (np.dtype(np.uint64), 64),
    "string": (np.dtype(object), 0),
}

# MIL.proto DataType enum name -> MIL dtype name.
_PROTO_DTYPES = {
    "BOOL": "bool", "STRING": "string", "FLOAT16": "fp16", "FLOAT32": "fp32",
    "FLOAT64": "fp64", "BFLOAT16": "bf16", "INT4": "int4", "INT8": "int8", "INT16": "int16",
    "INT32": "int32", "INT64": "int64", "UINT1": "uint1", "UINT2": "uint2", "UINT3": "uint3",
    "UINT4": "uint4", "UINT6": "uint6", "UINT8": "uint8", "UINT16": "uint16",
    "UINT32": "uint32", "UINT64": "uint64",
}

# MILBlob `BlobDataType.hpp` codes -> MIL dtype name (fp8 codes 16/17 are not decoded).
BLOB_DTYPES = {
    1: "fp16", 2: "fp32", 3: "uint8", 4: "int8", 5: "bf16", 6: "int16", 7: "uint16",
    8: "int4", 9: "uint1", 10: "uint2", 11: "uint4", 12: "uint3", 13: "uint6",
    14: "int32", 15: "uint32",
}

# Parameters declared as tuples in the MIL op definitions: always read as lists, even
# when only one variable is bound.
VARIADIC_INPUTS = {
    ("concat", "values"), ("stack", "values"), ("einsum", "values"),
    ("while_loop", "loop_vars"), ("make_list", "elem_shape"),
}

Arg = str | np.ndarray | list


@dataclass(frozen=True)
class TensorInfo:
    """A named value: MIL dtype name, numpy dtype it is held in, shape (None = unknown dim)."""

    name: str
    mil_dtype: str
    shape: tuple

    @property
    def dtype(self) -> np.dtype:
        return MIL_DTYPES[self.mil_dtype][0]


@dataclass
class Operation:
    """One MIL operation; `attributes` holds the decoded attribute values (const's `val`)."""

    type: str
    inputs: dict[str, Arg]
    outputs: list[TensorInfo]
    attributes: dict[str, object] = field(default_factory=dict)
    blocks: list[Block] = field(default_factory=list)

    @property
    def name(self) -> str:
        """The first output's name: what error messages call the op."""
        return self.outputs[0].name if self.outputs else str(self.attributes.get("name", "?"))


@dataclass
class Block:
    """An ordered list of ops; `outputs` names the variables the block returns."""

    inputs: list[TensorInfo]
    outputs: list[str]
    operations: list[Operation]


@dataclass
class Program:
    """Function `main` of an ML program: its inputs, its outputs and its body."""

    path: str
    opset: str
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    main: Block


def read_mlpackage(path: str) -> Program:
    """Parse the .mlpackage directory at `path`; raise `BundleError` if it is not valid."""
    model_path = _root_model_path(path)
    spec = _load_spec(model_path)
    reader = _SpecReader(path, os.path.dirname(model_path))
    return reader.program(spec)


def _root_model_path(package: str) -> str:
    """The root model file named by the package manifest."""
    manifest_path = os.path.join(package, "Manifest.json")
    try:
        with open(manifest_path, encoding="utf-8") as f:
            manifest = json.load(f)
        entry = manifest["itemInfoEntries"][manifest["rootModelIdentifier"]]
        relative = entry["path"]
    except FileNotFoundError:
        raise BundleError(f"{manifest_path}: missing (not an .mlpackage?)") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise BundleError(f"{manifest_path}: cannot find the root model ({e})") from None
    return _inside(package, os.path.join(package, "Data", relative), manifest_path)


def _inside(package: str, path: str, who: str) -> str:
    """Refuse a path that escapes the package: a tampered manifest must not read elsewhere."""
    root = os.path.realpath(package)
    real = os.path.realpath(path)
    if os.path.commonpath([root, real]) != root:
        raise BundleError(f"{who}: path {path!r} points outside the package")
    return real


def _load_spec(model_path: str):
    from coremltools.proto import Model_pb2  # heavy import, only when a model is read
    from google.protobuf.message import DecodeError

    try:
        with open(model_path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise BundleError(f"{model_path}: cannot read the model spec ({e.strerror})") from None
    spec = Model_pb2.Model()
    try:
        spec.ParseFromString(data)
    except DecodeError as e:
        raise BundleError(f"{model_path}: corrupt model spec ({e})") from None
    if spec.WhichOneof("Type") != "mlProgram":
        raise BundleError(f"{model_path}: not an ML program (got {spec.WhichOneof('Type')})")
    return spec


class _SpecReader:
    """Turns protobuf messages into the plain structures above; caches blob files."""

    def __init__(self, package: str, model_dir: str):
        self.package = package
        self.model_dir = model_dir
        self.blob_files: dict[str, BlobFile] = {}

    def program(self, spec) -> Program:
        functions = spec.mlProgram.functions
        if "main" not in functions:
            raise BundleError(f"{self.package}: ML program has no function 'main'")
        function = functions["main"]
        if function.opset not in function.block_specializations:
            raise BundleError(f"{self.package}: no block for opset {function.opset!r}")
        inputs = [self.named_type(v) for v in function.inputs]
        main = self.block(function.block_specializations[function.opset], inputs)
        types = {t.name: t for t in inputs}
        for op in walk(main):
            types.update((t.name, t) for t in op.outputs)
        missing = [n for n in main.outputs if n not in types]
        if missing:
            raise BundleError(f"{self.package}: program output {missing[0]!r} is never defined")
        outputs = [types[n] for n in main.outputs]
        return Program(self.package, function.opset, inputs, outputs, main)

    def block(self, message, inputs: list[TensorInfo] | None = None) -> Block:
        if inputs is None:
            inputs = [self.named_type(v) for v in message.inputs]
        ops = [self.operation(op) for op in message.operations]
        return Block(inputs, list(message.outputs), ops)

    def operation(self, message) -> Operation:
        inputs = {}
        for param, argument in message.inputs.items():
            items = [self.binding(b) for b in argument.arguments]
            variadic = (message.type, param) in VARIADIC_INPUTS or len(items) != 1
            inputs[param] = items if variadic else items[0]
        attributes = {k: self.value(v) for k, v in message.attributes.items()}
        outputs = [self.named_type(v) for v in message.outputs]
        blocks = [self.block(b) for b in message.blocks]
        return Operation(message.type, inputs, outputs, attributes, blocks)

    def binding(self, message) -> Arg:
        if message.WhichOneof("binding") == "name":
            return message.name
        return self.value(message.value)

    def named_type(self, message) -> TensorInfo:
        mil_dtype, shape = self.tensor_type(message.type, message.name)
        return TensorInfo(message.name, mil_dtype, shape)

    def tensor_type(self, value_type, who: str) -> tuple[str, tuple]:
        kind = value_type.WhichOneof("type")
        if kind != "tensorType":
            raise BundleError(f"{self.package}: {who!r} has type {kind}; only tensors are "
                              "supported")
        t = value_type.tensorType
        mil_dtype = _mil_dtype(t.dataType, f"{self.package}: {who!r}")
        shape = tuple(d.constant.size if d.WhichOneof("dimension") == "constant" else None
                      for d in t.dimensions)
        return mil_dtype, shape

    def value(self, message) -> np.ndarray:
        """Decode a MIL Value into a numpy array (strings are held in object arrays)."""
        mil_dtype, shape = self.tensor_type(message.type, "value")
        if None in shape:
            raise BundleError(f"{self.package}: constant with unknown shape {shape}")
        kind = message.WhichOneof("value")
        if kind == "blobFileValue":
            blob = message.blobFileValue
            return self.blob_file(blob.fileName).read(blob.offset, mil_dtype, shape)
        if kind == "immediateValue" and message.immediateValue.WhichOneof("value") == "tensor":
            return _decode_tensor(message.immediateValue.tensor, mil_dtype, shape, self.package)
        raise BundleError(f"{self.package}: unsupported constant kind {kind!r}")

    def blob_file(self, file_name: str) -> BlobFile:
        """The weight file `file_name` ("@model_path/weights/weight.bin"), opened once."""
        if file_name not in self.blob_files:
            relative = file_name.removeprefix("@model_path/")
            path = _inside(self.package, os.path.join(self.model_dir, relative), file_name)
            self.blob_files[file_name] = BlobFile(path)
        return self.blob_files[file_name]


def walk(block: Block):
    """Every op of `block`, nested blocks included, in program order."""
    for op in block.operations:
        yield op
        for inner in op.blocks:
            yield from walk(inner)


def _mil_dtype(proto_dtype: int, who: str) -> str:
    from coremltools.proto import MIL_pb2

    name = MIL_pb2.DataType.Name(proto_dtype) if proto_dtype in MIL_pb2.DataType.values() else "?"
    if name not in _PROTO_DTYPES:
        raise BundleError(f"{who}: unsupported data type {name} ({proto_dtype})")
    return _PROTO_DTYPES[name]


def _decode_tensor(tensor, mil_dtype: str, shape: tuple, who: str):
    """An immediate TensorValue; fp16, 8-bit and sub-byte values come packed as `bytes`."""
    kind = tensor.WhichOneof("value")
    count = int(np.prod(shape, dtype=np.int64))
    if kind == "strings":
        values = [s.decode("utf-8") if isinstance(s, bytes) else s for s in tensor.strings.values]
        return np.array(values, object).reshape(shape)
    if kind == "bytes":
        raw = np.frombuffer(tensor.bytes.values, np.uint8)
        values = _from_raw(raw, mil_dtype, count, who)
    elif kind is None:
        values = np.zeros(0, MIL_DTYPES[mil_dtype][0])
    else:
        values = np.array(getattr(tensor, kind).values)
    if values.size != count:
        raise BundleError(f"{who}: immediate value has {values.size} elements, shape {shape}")
    return values.astype(MIL_DTYPES[mil_dtype][0], copy=False).reshape(shape)


def _from_raw(raw: np.ndarray, mil_dtype: str, count: int, who: str) -> np.ndarray:
    """Reinterpret little-endian raw bytes as `count` elements of `mil_dtype`."""
    np_dtype, bits = MIL_DTYPES[mil_dtype]
    if bits < 8:
        if raw.size * 8 < count * bits:
            raise BundleError(f"{who}: {raw.size} bytes cannot hold {count} {mil_dtype} values")
        return unpack_bits(raw, bits, count, signed=mil_dtype.startswith("int"))
    if mil_dtype == "bf16":
        # bf16 is the upper half of an fp32: widen by shifting into the high 16 bits.
        return (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)
    return raw.view(np_dtype.newbyteorder("<")).astype(np_dtype, copy=False)


def unpack_bits(raw: np.ndarray, bits: int, count: int, signed: bool) -> np.ndarray:
    """Unpack `count` `bits`-wide integers packed LSB first (MILBlob and constexpr layout)."""
    bit_array = np.unpackbits(raw, bitorder="little")[: count * bits].reshape(count, bits)
    weights = (1 << np.arange(bits, dtype=np.int16))
    values = (bit_array.astype(np.int16) @ weights)
    if signed:
        values = np.where(values >= 1 << (bits - 1), values - (1 << bits), values)
        return values.astype(np.int8)
    return values.astype(np.uint8)


class BlobFile:
    """One MIL blob storage file, memory-mapped once; `read` decodes one blob."""

    def __init__(self, path: str):
        self.path = path
        try:
            self.data = np.memmap(path, dtype=np.uint8, mode="r")
        except (OSError, ValueError) as e:
            reason = getattr(e, "strerror", None) or str(e)
            raise BundleError(f"{path}: cannot open weight file ({reason})") from None
        if self.data.size < _HEADER_SIZE:
            raise BundleError(f"{path}: weight file too short for its header")
        header = self.data[:_HEADER_DTYPE.itemsize].view(_HEADER_DTYPE)[0]
        if header["version"] != _STORAGE_VERSION:
            raise BundleError(f"{path}: unknown blob storage version {header['version']}")

    def metadata(self, offset: int):
        """The metadata record at `offset`, checked against the file."""
        if offset < _HEADER_SIZE or offset + _METADATA_SIZE > self.data.size:
            raise BundleError(f"{self.path}: blob offset {offset} is past the end of the file")
        meta = self.data[offset:offset + _METADATA_DTYPE.itemsize].view(_METADATA_DTYPE)[0]
        if meta["sentinel"] != _SENTINEL:
            raise BundleError(
                f"{self.path}: bad blob sentinel {int(meta['sentinel']):#x} at offset {offset}")
        end = int(meta["offset"]) + int(meta["size"])
        if end > self.data.size:
            raise BundleError(f"{self.path}: blob at offset {offset} runs past the end of the file")
        return meta

    def read(self, offset: int, mil_dtype: str, shape: tuple) -> np.ndarray:
        """The blob at `offset` as an array of `shape`; its stored type must be `mil_dtype`."""
        meta = self.metadata(offset)
        stored = BLOB_DTYPES.get(int(meta["dtype"]))
        if stored != mil_dtype:
            raise BundleError(f"{self.path}: blob at offset {offset} holds "
                              f"{stored or int(meta['dtype'])}, the program expects {mil_dtype}")
        count = int(np.prod(shape, dtype=np.int64))
        bits = MIL_DTYPES[mil_dtype][1]
        expected = (count * bits + 7) // 8
        if int(meta["size"]) != expected:
            raise BundleError(f"{self.path}: blob at offset {offset} has {int(meta['size'])} "
                              f"bytes, {count} {mil_dtype} values need {expected}")
        start = int(meta["offset"])
        raw = np.array(self.data[start:start + expected])  # copy: do not keep the mmap alive
        return _from_raw(raw, mil_dtype, count, self.path).reshape(shape)

    def read_all(self, offset: int) -> np.ndarray:
        """The blob at `offset` as a flat array, its type and length from the metadata."""
        meta = self.metadata(offset)
        mil_dtype = BLOB_DTYPES.get(int(meta["dtype"]))
        if mil_dtype is None:
            raise BundleError(f"{self.path}: unsupported blob data type {int(meta['dtype'])}")
        bits = MIL_DTYPES[mil_dtype][1]
        count = (int(meta["size"]) * 8 - int(meta["pad_bits"])) // bits
        start = int(meta["offset"])
        raw = np.array(self.data[start:start + int(meta["size"])])
        return _from_raw(raw, mil_dtype, count, self.path)
