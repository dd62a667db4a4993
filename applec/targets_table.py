"""Render chip profiles for people (a rich table) and for scripts (plain JSON-ready dicts).

`applec targets` prints one or the other; both take the profiles from
`applec.targets.profiles.list_profiles()` and add nothing of their own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict
from typing import Any

from rich.table import Table

from applec.targets.profiles import ChipProfile

# What a figure no source gave (null in the YAML) looks like in the table.
_UNKNOWN = "—"

# One row per column: header, how to read the cell from a profile, and whether it is a number
# (numbers are right-aligned).
_COLUMNS: list[tuple[str, Callable[[ChipProfile], Any], bool]] = [
    ("chip", lambda p: p.id, False),
    ("ANE TOPS", lambda p: p.neural_engine.tops, True),
    ("ANE cores", lambda p: p.neural_engine.cores, True),
    ("GPU cores", lambda p: p.gpu.cores, True),
    ("GPU FP32 TFLOPS", lambda p: p.gpu.fp32_tflops, True),
    ("memory GB/s", lambda p: p.memory.bandwidth_gbps, True),
    ("BF16", lambda p: "yes" if p.cpu.bf16 else "no", False),
    ("default deployment target", lambda p: p.coreml.deployment_target, False),
]


def profiles_table(profiles: Iterable[ChipProfile]) -> Table:
    """A table with one row per chip and the columns above; unknown figures show as '—'."""
    table = Table(title="Apple silicon targets")
    for header, _, numeric in _COLUMNS:
        table.add_column(header, justify="right" if numeric else "left")
    for profile in profiles:
        table.add_row(*(_cell(read(profile)) for _, read, _ in _COLUMNS))
    return table


def profiles_json(profiles: Iterable[ChipProfile]) -> list[dict]:
    """Each profile as a nested dict of plain JSON types; unknown figures are None."""
    return [_jsonable(asdict(profile)) for profile in profiles]


def _cell(value: Any) -> str:
    if value is None:
        return _UNKNOWN
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _jsonable(value: Any) -> Any:
    """Tuples become lists so the result round-trips through `json` unchanged."""
    if isinstance(value, dict):
        return {key: _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    return value
