"""Chip profiles: the per-chip capabilities and limits that the compiler reads, loaded from YAML.

Each file in `profiles/` describes one chip generation (`m1.yaml`, `m2.yaml`, ...) and cites a
source for every figure. This module turns those files into frozen `ChipProfile` values and
checks each file against the schema on load, so a missing or mistyped key fails with the file
and the key in the message rather than as a `KeyError` deep inside a lowering.

The schema is the dataclasses below: a field is a required key, a dataclass-typed field is a
nested mapping, `X | None` means the key must be present but may be null. Nothing here knows
any chip by name; code that needs a capability reads it from the profile.

    >>> load_profile("M2 Pro").memory.bandwidth_gbps
    200.0
"""

from __future__ import annotations

import re
import types
from dataclasses import dataclass, fields, is_dataclass
from functools import cache
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml

from applec.errors import TargetError

# Top-level keys of a profile file. `_shared` holds YAML anchors that chips merge in; the
# loader reads the chips, never `_shared` itself.
_FILE_KEYS = {"family", "chips"}
_OPTIONAL_FILE_KEYS = {"_shared"}


@dataclass(frozen=True)
class NeuralEngine:
    """The Apple Neural Engine (ANE): core count and Apple's headline TOPS figure."""

    cores: int
    tops: float | None


@dataclass(frozen=True)
class Gpu:
    """The integrated GPU, fully enabled part."""

    cores: int
    fp32_tflops: float | None


@dataclass(frozen=True)
class Memory:
    """Unified memory shared by CPU, GPU and ANE."""

    bandwidth_gbps: float
    max_gb: int


@dataclass(frozen=True)
class Cpu:
    """CPU cores and the matrix unit the Accelerate backend can reach (`amx` or `sme`)."""

    performance_cores: int
    efficiency_cores: int
    matrix_unit: str
    bf16: bool


@dataclass(frozen=True)
class OsSupport:
    """Newest OS releases the chip runs; null where the chip ships in no such device."""

    newest_macos: str
    newest_ipados: str | None


@dataclass(frozen=True)
class CoreMLTarget:
    """The Core ML deployment target applec emits by default, and the ones the chip can run.

    Targets are `coremltools.target` member names (`macOS15`); `mil_opset` is the MIL opset
    that target implies (`CoreML8`).
    """

    deployment_target: str
    mil_opset: str
    supported_targets: tuple[str, ...]


@dataclass(frozen=True)
class AneConstraints:
    """What keeps a subgraph on the Neural Engine; the partitioner reads these."""

    compute_dtype: str
    max_rank: int
    max_conv_dim: int | None
    weight_quantization: tuple[str, ...]
    blockwise_quantized_weights: bool
    ops_off_ane: tuple[str, ...]


@dataclass(frozen=True)
class ChipProfile:
    """One chip (`m2_pro`): its identity and every capability the compiler may consult.

    `id` is the key under `chips:` and `family` the file's `family:`; all other fields are
    read from the chip's mapping in the YAML file.
    """

    id: str
    family: str
    name: str
    year: int
    neural_engine: NeuralEngine
    gpu: Gpu
    memory: Memory
    cpu: Cpu
    os: OsSupport
    coreml: CoreMLTarget
    ane_constraints: AneConstraints


def load_profile(name: str) -> ChipProfile:
    """The profile for `name`, spelled as an id (`m2_pro`), with dashes or spaces (`m2-pro`,
    `M2 Pro`) or as its full name (`Apple M2 Pro`)."""
    index = _index()
    profile = index.get(_normalize(name))
    if profile is None:
        known = ", ".join(p.id for p in list_profiles())
        raise TargetError(f"unknown target {name.strip()!r}; known: {known}")
    return profile


def list_profiles() -> list[ChipProfile]:
    """Every profile shipped with applec, in file order (m1, m1_pro, ..., m4_max)."""
    return list(_all_profiles())


def coreml_target(profile: ChipProfile) -> Any:
    """The `coremltools.target` member for the profile's default deployment target."""
    import coremltools as ct  # deferred: importing coremltools is slow and noisy on Linux

    target = getattr(ct.target, profile.coreml.deployment_target, None)
    if target is None:
        raise TargetError(
            f"profile {profile.id!r}: coremltools {ct.__version__} has no target "
            f"{profile.coreml.deployment_target!r}"
        )
    return target


def mil_opset(profile: ChipProfile) -> str:
    """The MIL opset name (`CoreML8`) of the profile's default deployment target."""
    return profile.coreml.mil_opset


@cache
def _all_profiles() -> tuple[ChipProfile, ...]:
    directory = resources.files("applec.targets").joinpath("profiles")
    files = sorted(
        (entry for entry in directory.iterdir() if entry.name.endswith(".yaml")),
        key=lambda entry: entry.name,
    )
    profiles: list[ChipProfile] = []
    seen: dict[str, str] = {}
    for file in files:
        for profile in _load_file(file):
            if profile.id in seen:
                raise TargetError(
                    f"{file.name}: chip {profile.id!r} is already defined in {seen[profile.id]}"
                )
            seen[profile.id] = file.name
            profiles.append(profile)
    return tuple(profiles)


@cache
def _index() -> dict[str, ChipProfile]:
    index: dict[str, ChipProfile] = {}
    for profile in _all_profiles():
        index[_normalize(profile.id)] = profile
        index[_normalize(profile.name)] = profile
    return index


def _normalize(name: str) -> str:
    """`M2 Pro`, `m2-pro` and `m2_pro` all become `m2_pro`."""
    return re.sub(r"[\s_-]+", "_", name.strip().lower())


def _load_file(path: Path | Traversable) -> list[ChipProfile]:
    """Parse and validate one profile file; every error names the file and the key."""
    where = path.name
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise TargetError(f"{where}: not valid YAML: {error}") from None
    if not isinstance(document, dict):
        raise TargetError(f"{where}: expected a mapping with keys 'family' and 'chips'")
    missing = sorted(_FILE_KEYS - document.keys())
    if missing:
        raise TargetError(f"{where}: missing key {missing[0]!r}")
    unknown = sorted(document.keys() - _FILE_KEYS - _OPTIONAL_FILE_KEYS)
    if unknown:
        raise TargetError(f"{where}: unknown key {unknown[0]!r}")
    family = _convert(str, document["family"], where, "family")
    chips = document["chips"]
    if not isinstance(chips, dict) or not chips:
        raise TargetError(f"{where}: 'chips' must be a non-empty mapping of chip id to chip")
    return [_load_chip(chip_id, chip, family, where) for chip_id, chip in chips.items()]


def _load_chip(chip_id: Any, chip: Any, family: str, where: str) -> ChipProfile:
    """`id` and `family` come from the file's structure, so a chip may not set them itself."""
    where = f"{where}: chip {chip_id!r}"
    chip = _mapping(chip, where, "chip")
    for injected in ("id", "family"):
        if injected in chip:
            raise TargetError(f"{where}: unknown key {injected!r} (it comes from the file)")
    return _build(ChipProfile, {"id": chip_id, "family": family, **chip}, where, "")


def _mapping(value: Any, where: str, key: str) -> dict:
    if not isinstance(value, dict):
        raise TargetError(f"{where}: {key!r} must be a mapping, got {type(value).__name__}")
    return value


def _build(cls: type, data: Any, where: str, path: str) -> Any:
    """Build dataclass `cls` from mapping `data`, requiring exactly its fields."""
    data = _mapping(data, where, path or "chip")
    hints = get_type_hints(cls)
    names = [field.name for field in fields(cls)]

    def key(name: str) -> str:
        return f"{path}.{name}" if path else name

    missing = [name for name in names if name not in data]
    if missing:
        raise TargetError(f"{where}: missing key {key(missing[0])!r}")
    unknown = sorted(data.keys() - set(names))
    if unknown:
        raise TargetError(f"{where}: unknown key {key(unknown[0])!r}")
    return cls(**{name: _convert(hints[name], data[name], where, key(name)) for name in names})


def _convert(hint: Any, value: Any, where: str, key: str) -> Any:
    """Check `value` against type `hint` and return it in the dataclass's type."""
    if is_dataclass(hint):
        return _build(hint, value, where, key)
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        if value is None:
            return None
        (hint,) = (arg for arg in get_args(hint) if arg is not type(None))
        return _convert(hint, value, where, key)
    if origin is tuple:
        item = get_args(hint)[0]
        if not isinstance(value, list):
            raise TargetError(f"{where}: {key!r} must be a list, got {_describe(value)}")
        return tuple(_convert(item, v, where, f"{key}[{i}]") for i, v in enumerate(value))
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if (hint is int and isinstance(value, bool)) or not isinstance(value, hint):
        raise TargetError(f"{where}: {key!r} must be {hint.__name__}, got {_describe(value)}")
    return value


def _describe(value: Any) -> str:
    return "null" if value is None else f"{type(value).__name__} {value!r}"
