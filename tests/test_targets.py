"""Chip profiles: every YAML file loads and validates, names resolve, and the facts that code
relies on (BF16 from M2 on, a real Core ML deployment target) hold in the data."""

import json
import re
from dataclasses import fields
from importlib import resources

import pytest

from applec.errors import TargetError
from applec.targets import profiles as chip_profiles
from applec.targets.profiles import (
    ChipProfile,
    coreml_target,
    list_profiles,
    load_profile,
    mil_opset,
)
from applec.targets_table import profiles_json, profiles_table

ALL = list_profiles()
IDS = [p.id for p in ALL]
PROFILE_DIR = resources.files("applec.targets").joinpath("profiles")
YAML_FILES = sorted(f.name for f in PROFILE_DIR.iterdir() if f.name.endswith(".yaml"))

# The chips the task requires; a deleted entry must fail here, not silently vanish.
EXPECTED_IDS = {
    "m1",
    "m1_pro",
    "m1_max",
    "m1_ultra",
    "m2",
    "m2_pro",
    "m2_max",
    "m2_ultra",
    "m3",
    "m3_pro",
    "m3_max",
    "m3_ultra",
    "m4",
    "m4_pro",
    "m4_max",
}

GOOD_CHIP = """\
family: mx
chips:
  mx:
    name: Apple MX
    year: 2030
    neural_engine: {cores: 16, tops: null}
    gpu: {cores: 10, fp32_tflops: null}
    memory: {bandwidth_gbps: 100, max_gb: 24}
    cpu: {performance_cores: 4, efficiency_cores: 4, matrix_unit: amx, bf16: true}
    os: {newest_macos: "26", newest_ipados: null}
    coreml: {deployment_target: macOS15, mil_opset: CoreML8, supported_targets: [macOS15]}
    ane_constraints:
      compute_dtype: fp16
      max_rank: 5
      max_conv_dim: null
      weight_quantization: [per_tensor]
      blockwise_quantized_weights: false
      ops_off_ane: []
"""


def write(tmp_path, text, name="mx.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("name", YAML_FILES)
def test_every_yaml_file_loads_and_validates(name):
    loaded = chip_profiles._load_file(PROFILE_DIR.joinpath(name))
    assert loaded, f"{name} defines no chips"
    assert {p.family for p in loaded} == {name.removesuffix(".yaml")}


def test_the_expected_chips_are_all_there_once():
    assert len(IDS) == len(set(IDS))
    assert set(IDS) == EXPECTED_IDS


@pytest.mark.parametrize("profile", ALL, ids=IDS)
def test_every_chip_has_the_required_keys(profile):
    assert isinstance(profile, ChipProfile)
    for field in fields(ChipProfile):
        assert hasattr(profile, field.name)
    assert profile.neural_engine.cores > 0 and profile.gpu.cores > 0
    assert profile.memory.bandwidth_gbps > 0 and profile.memory.max_gb > 0
    assert profile.cpu.performance_cores > 0 and profile.cpu.efficiency_cores > 0
    assert profile.name.startswith("Apple ")


@pytest.mark.parametrize(
    "spelling, expected",
    [
        ("m2", "m2"),
        ("m2_pro", "m2_pro"),
        ("m2-pro", "m2_pro"),
        ("M2 Pro", "m2_pro"),
        ("Apple M2 Pro", "m2_pro"),
        ("  M3-ULTRA ", "m3_ultra"),
        ("apple m4 max", "m4_max"),
    ],
)
def test_names_resolve_in_all_spellings(spelling, expected):
    assert load_profile(spelling).id == expected


@pytest.mark.parametrize("profile", ALL, ids=IDS)
def test_every_chip_resolves_by_id_and_by_name(profile):
    assert load_profile(profile.id) is profile
    assert load_profile(profile.name) is profile
    assert load_profile(profile.id.replace("_", "-").upper()) is profile


def test_unknown_chip_names_the_chip_and_lists_the_known_ones():
    with pytest.raises(TargetError) as raised:
        load_profile("m9")
    message = str(raised.value)
    assert message.startswith("unknown target 'm9'; known: ")
    assert message.endswith(", ".join(IDS))


@pytest.mark.parametrize("profile", ALL, ids=IDS)
def test_bf16_is_absent_on_m1_and_present_from_m2_on(profile):
    assert profile.cpu.bf16 is (profile.family != "m1")


@pytest.mark.parametrize("profile", ALL, ids=IDS)
def test_default_deployment_target_is_a_real_coremltools_target(profile):
    ct = pytest.importorskip("coremltools")
    target = coreml_target(profile)
    assert target is getattr(ct.target, profile.coreml.deployment_target)
    assert profile.coreml.deployment_target in profile.coreml.supported_targets
    for name in profile.coreml.supported_targets:
        assert hasattr(ct.target, name), name


@pytest.mark.parametrize("profile", ALL, ids=IDS)
def test_mil_opset_matches_what_coremltools_emits_for_the_target(profile):
    ct = pytest.importorskip("coremltools")
    assert mil_opset(profile) == ct._OPSET[int(coreml_target(profile))]


@pytest.mark.parametrize("profile", ALL, ids=IDS)
def test_supported_targets_stop_at_the_newest_macos(profile):
    targets = profile.coreml.supported_targets
    majors = [int(re.fullmatch(r"macOS(\d+)", target).group(1)) for target in targets]
    assert majors == sorted(majors)
    assert max(majors) <= int(profile.os.newest_macos)


def test_a_missing_key_names_the_file_and_the_key(tmp_path):
    text = GOOD_CHIP.replace("gpu: {cores: 10, fp32_tflops: null}", "gpu: {cores: 10}")
    with pytest.raises(TargetError, match=r"^mx\.yaml: chip 'mx': missing key 'gpu\.fp32_tflops'$"):
        chip_profiles._load_file(write(tmp_path, text))


def test_a_missing_chip_field_names_the_file_and_the_key(tmp_path):
    text = GOOD_CHIP.replace("    year: 2030\n", "")
    with pytest.raises(TargetError, match=r"^mx\.yaml: chip 'mx': missing key 'year'$"):
        chip_profiles._load_file(write(tmp_path, text))


def test_a_missing_top_level_key_names_the_file(tmp_path):
    path = write(tmp_path, GOOD_CHIP.replace("family: mx\n", ""))
    with pytest.raises(TargetError, match=r"^mx\.yaml: missing key 'family'$"):
        chip_profiles._load_file(path)


@pytest.mark.parametrize(
    "old, new, key",
    [
        ("cores: 16, tops: null", "cores: sixteen, tops: null", "neural_engine.cores"),
        ("bf16: true", "bf16: 1", "cpu.bf16"),
        ("max_rank: 5", "max_rank: true", "ane_constraints.max_rank"),
        ("ops_off_ane: []", "ops_off_ane: gather", "ane_constraints.ops_off_ane"),
        ('newest_macos: "26"', "newest_macos: null", "os.newest_macos"),
        ("year: 2030", "year: 2030\n    colour: red", "colour"),
        ("year: 2030", "year: 2030\n    id: other", "id"),
    ],
)
def test_a_wrong_value_names_the_file_and_the_key(tmp_path, old, new, key):
    path = write(tmp_path, GOOD_CHIP.replace(old, new))
    with pytest.raises(TargetError) as raised:
        chip_profiles._load_file(path)
    assert str(raised.value).startswith("mx.yaml: chip 'mx': ")
    assert f"'{key}'" in str(raised.value)


def test_a_valid_file_builds_a_profile(tmp_path):
    (profile,) = chip_profiles._load_file(write(tmp_path, GOOD_CHIP))
    assert profile.id == "mx" and profile.family == "mx"
    assert profile.memory.bandwidth_gbps == 100.0
    assert profile.neural_engine.tops is None
    assert profile.coreml.supported_targets == ("macOS15",)


def test_table_has_one_row_per_chip_and_the_agreed_columns():
    table = profiles_table(ALL)
    headers = [column.header for column in table.columns]
    assert headers == [
        "chip",
        "ANE TOPS",
        "ANE cores",
        "GPU cores",
        "GPU FP32 TFLOPS",
        "memory GB/s",
        "BF16",
        "default deployment target",
    ]
    assert table.row_count == len(ALL)
    assert list(table.columns[0].cells) == IDS


def test_json_round_trips_and_keeps_unknowns_as_null():
    records = profiles_json(ALL)
    assert json.loads(json.dumps(records)) == records
    by_id = {record["id"]: record for record in records}
    assert by_id["m2_pro"]["memory"]["bandwidth_gbps"] == 200.0
    assert by_id["m1_pro"]["neural_engine"]["tops"] is None
    assert by_id["m2"]["coreml"]["supported_targets"][-1] == "macOS26"
