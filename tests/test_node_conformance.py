"""ONNX node conformance: onnx's own node tests, compiled by applec and run.

Every node test that onnx generates (`onnx.backend.test.case.node`, regenerated into a
cache by benchmarks/node_tests.py on first use, ~7 s) whose ops are all in applec's op table is
compiled (fp32, target m2), run by the reference executor and compared with the expected
outputs the generator stored: max |error| <= 1e-4 of the output's max |value| (float16
outputs: one float16 ulp, 2**-10), NaN and inf where expected, integers and bools exact.
Graph inputs that decide a shape (Reshape's shape, a reduction's axes...) are frozen into
constants first, as exporters emit them.

A test must pass unless KNOWN_EXCEPTIONS lists it with the reason; a listed test must
still fail the clean way, at compile time with an UnsupportedOpError (or, for a wrong
expectation or one onnxruntime does not share, by comparison), and a listed test that
passes must be taken off the list.
`python benchmarks/node_tests.py` prints the per-op table; docs/node-tests.md keeps it.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parents[1] / "benchmarks" / "node_tests.py"

# reasons, by what CoreML lacks (see docs/node-tests.md)
NO_NARROW_TYPE = "a dtype CoreML has no type for and no exact narrowing of (bfloat16, " \
                 "float8, float4, int4, int2)"
NO_STRINGS = "string tensors: CoreML programs hold numbers and bools only"
RANK_ABOVE_5 = "a rank-6 tensor: CoreML tensors have rank <= 5"
ZERO_SIZE = "a tensor with zero elements, which CoreML cannot hold"
DILATED_POOL = "dilated pooling: MIL max_pool/avg_pool have no dilations"
WRAP_PAD = "Pad mode 'wrap': MIL pad has constant, reflect and replicate only"
POOL_INDICES = "MaxPool's Indices output: MIL max_pool returns values only"
RESIZE_CUBIC = "Resize mode cubic: MIL resizes are nearest-neighbour and bilinear only"
RESIZE_GRID = "a Resize sampling no MIL op computes exactly (antialiased downsampling, " \
              "half_pixel_symmetric, tf_crop_and_resize, a scale other than output/input size)"
INTEGER_LENGTH = "align_corners with a fractional scale: onnx's reference divides by " \
                 "scale * length - 1, onnxruntime (and applec) by the integer output length - 1"
ROUNDED_EXPECTATION = "the generator stores this output rounded to 4 decimals: relative " \
                      "error 1.6e-4 against it (onnx's own check uses rtol 1e-3)"
GRID_SAMPLE_CUBIC = "GridSample mode cubic: applec composes linear and nearest sampling " \
                    "from MIL gathers, not bicubic"

KNOWN_EXCEPTIONS: dict[str, str] = {
    **dict.fromkeys([
        "test_attention_3d_causal_bf16_expanded",
        "test_attention_4d_attn_mask_causal_bf16_expanded",
        "test_attention_4d_causal_bf16_expanded",
        "test_attention_4d_causal_padded_kv_bf16_expanded",
        "test_attention_4d_padded_kv_bf16_expanded", "test_cast_BFLOAT16_to_FLOAT",
        "test_cast_FLOAT16_to_FLOAT4E2M1", "test_cast_FLOAT16_to_FLOAT8E4M3FN",
        "test_cast_FLOAT16_to_FLOAT8E4M3FNUZ", "test_cast_FLOAT16_to_FLOAT8E5M2",
        "test_cast_FLOAT16_to_FLOAT8E5M2FNUZ", "test_cast_FLOAT16_to_INT2",
        "test_cast_FLOAT16_to_INT4", "test_cast_FLOAT16_to_UINT2", "test_cast_FLOAT16_to_UINT4",
        "test_cast_FLOAT4E2M1_to_FLOAT", "test_cast_FLOAT4E2M1_to_FLOAT16",
        "test_cast_FLOAT8E4M3FNUZ_to_FLOAT", "test_cast_FLOAT8E4M3FNUZ_to_FLOAT16",
        "test_cast_FLOAT8E4M3FN_to_FLOAT", "test_cast_FLOAT8E4M3FN_to_FLOAT16",
        "test_cast_FLOAT8E5M2FNUZ_to_FLOAT", "test_cast_FLOAT8E5M2FNUZ_to_FLOAT16",
        "test_cast_FLOAT8E5M2_to_FLOAT", "test_cast_FLOAT8E5M2_to_FLOAT16",
        "test_cast_FLOAT_to_BFLOAT16", "test_cast_FLOAT_to_FLOAT4E2M1",
        "test_cast_FLOAT_to_FLOAT8E4M3FN", "test_cast_FLOAT_to_FLOAT8E4M3FNUZ",
        "test_cast_FLOAT_to_FLOAT8E5M2", "test_cast_FLOAT_to_FLOAT8E5M2FNUZ",
        "test_cast_FLOAT_to_INT2", "test_cast_FLOAT_to_INT4", "test_cast_FLOAT_to_UINT2",
        "test_cast_FLOAT_to_UINT4", "test_cast_INT2_to_FLOAT", "test_cast_INT2_to_FLOAT16",
        "test_cast_INT2_to_INT8", "test_cast_INT4_to_FLOAT", "test_cast_INT4_to_FLOAT16",
        "test_cast_INT4_to_INT8", "test_cast_UINT2_to_FLOAT", "test_cast_UINT2_to_FLOAT16",
        "test_cast_UINT2_to_UINT8", "test_cast_UINT4_to_FLOAT", "test_cast_UINT4_to_FLOAT16",
        "test_cast_UINT4_to_UINT8", "test_cast_e8m0_FLOAT16_to_FLOAT8E8M0",
        "test_cast_e8m0_FLOAT8E8M0_to_FLOAT", "test_cast_e8m0_FLOAT8E8M0_to_FLOAT16",
        "test_cast_e8m0_FLOAT_to_FLOAT8E8M0", "test_cast_no_saturate_FLOAT16_to_FLOAT8E4M3FN",
        "test_cast_no_saturate_FLOAT16_to_FLOAT8E4M3FNUZ",
        "test_cast_no_saturate_FLOAT16_to_FLOAT8E5M2",
        "test_cast_no_saturate_FLOAT16_to_FLOAT8E5M2FNUZ",
        "test_cast_no_saturate_FLOAT_to_FLOAT8E4M3FN",
        "test_cast_no_saturate_FLOAT_to_FLOAT8E4M3FNUZ",
        "test_cast_no_saturate_FLOAT_to_FLOAT8E5M2",
        "test_cast_no_saturate_FLOAT_to_FLOAT8E5M2FNUZ", "test_castlike_BFLOAT16_to_FLOAT",
        "test_castlike_BFLOAT16_to_FLOAT_expanded", "test_castlike_FLOAT16_to_FLOAT4E2M1",
        "test_castlike_FLOAT16_to_FLOAT4E2M1_expanded", "test_castlike_FLOAT16_to_FLOAT8E4M3FN",
        "test_castlike_FLOAT16_to_FLOAT8E4M3FNUZ",
        "test_castlike_FLOAT16_to_FLOAT8E4M3FNUZ_expanded",
        "test_castlike_FLOAT16_to_FLOAT8E4M3FN_expanded", "test_castlike_FLOAT16_to_FLOAT8E5M2",
        "test_castlike_FLOAT16_to_FLOAT8E5M2FNUZ",
        "test_castlike_FLOAT16_to_FLOAT8E5M2FNUZ_expanded",
        "test_castlike_FLOAT16_to_FLOAT8E5M2_expanded", "test_castlike_FLOAT16_to_INT2",
        "test_castlike_FLOAT16_to_INT2_expanded", "test_castlike_FLOAT16_to_INT4",
        "test_castlike_FLOAT16_to_INT4_expanded", "test_castlike_FLOAT16_to_UINT2",
        "test_castlike_FLOAT16_to_UINT2_expanded", "test_castlike_FLOAT16_to_UINT4",
        "test_castlike_FLOAT16_to_UINT4_expanded", "test_castlike_FLOAT4E2M1_to_FLOAT",
        "test_castlike_FLOAT4E2M1_to_FLOAT16", "test_castlike_FLOAT4E2M1_to_FLOAT16_expanded",
        "test_castlike_FLOAT4E2M1_to_FLOAT_expanded", "test_castlike_FLOAT8E4M3FNUZ_to_FLOAT",
        "test_castlike_FLOAT8E4M3FNUZ_to_FLOAT16",
        "test_castlike_FLOAT8E4M3FNUZ_to_FLOAT16_expanded",
        "test_castlike_FLOAT8E4M3FNUZ_to_FLOAT_expanded", "test_castlike_FLOAT8E4M3FN_to_FLOAT",
        "test_castlike_FLOAT8E4M3FN_to_FLOAT16", "test_castlike_FLOAT8E4M3FN_to_FLOAT16_expanded",
        "test_castlike_FLOAT8E4M3FN_to_FLOAT_expanded", "test_castlike_FLOAT8E5M2FNUZ_to_FLOAT",
        "test_castlike_FLOAT8E5M2FNUZ_to_FLOAT16",
        "test_castlike_FLOAT8E5M2FNUZ_to_FLOAT16_expanded",
        "test_castlike_FLOAT8E5M2FNUZ_to_FLOAT_expanded", "test_castlike_FLOAT8E5M2_to_FLOAT",
        "test_castlike_FLOAT8E5M2_to_FLOAT16", "test_castlike_FLOAT8E5M2_to_FLOAT16_expanded",
        "test_castlike_FLOAT8E5M2_to_FLOAT_expanded", "test_castlike_FLOAT_to_BFLOAT16",
        "test_castlike_FLOAT_to_BFLOAT16_expanded", "test_castlike_FLOAT_to_FLOAT4E2M1",
        "test_castlike_FLOAT_to_FLOAT4E2M1_expanded", "test_castlike_FLOAT_to_FLOAT8E4M3FN",
        "test_castlike_FLOAT_to_FLOAT8E4M3FNUZ", "test_castlike_FLOAT_to_FLOAT8E4M3FNUZ_expanded",
        "test_castlike_FLOAT_to_FLOAT8E4M3FN_expanded", "test_castlike_FLOAT_to_FLOAT8E5M2",
        "test_castlike_FLOAT_to_FLOAT8E5M2FNUZ", "test_castlike_FLOAT_to_FLOAT8E5M2FNUZ_expanded",
        "test_castlike_FLOAT_to_FLOAT8E5M2_expanded", "test_castlike_FLOAT_to_INT2",
        "test_castlike_FLOAT_to_INT2_expanded", "test_castlike_FLOAT_to_INT4",
        "test_castlike_FLOAT_to_INT4_expanded", "test_castlike_FLOAT_to_UINT2",
        "test_castlike_FLOAT_to_UINT2_expanded", "test_castlike_FLOAT_to_UINT4",
        "test_castlike_FLOAT_to_UINT4_expanded", "test_castlike_INT2_to_FLOAT",
        "test_castlike_INT2_to_FLOAT16", "test_castlike_INT2_to_FLOAT16_expanded",
        "test_castlike_INT2_to_FLOAT_expanded", "test_castlike_INT2_to_INT8",
        "test_castlike_INT2_to_INT8_expanded", "test_castlike_INT4_to_FLOAT",
        "test_castlike_INT4_to_FLOAT16", "test_castlike_INT4_to_FLOAT16_expanded",
        "test_castlike_INT4_to_FLOAT_expanded", "test_castlike_INT4_to_INT8",
        "test_castlike_INT4_to_INT8_expanded", "test_castlike_UINT2_to_FLOAT",
        "test_castlike_UINT2_to_FLOAT16", "test_castlike_UINT2_to_FLOAT16_expanded",
        "test_castlike_UINT2_to_FLOAT_expanded", "test_castlike_UINT2_to_UINT8",
        "test_castlike_UINT2_to_UINT8_expanded", "test_castlike_UINT4_to_FLOAT",
        "test_castlike_UINT4_to_FLOAT16", "test_castlike_UINT4_to_FLOAT16_expanded",
        "test_castlike_UINT4_to_FLOAT_expanded", "test_castlike_UINT4_to_UINT8",
        "test_castlike_UINT4_to_UINT8_expanded",
        "test_castlike_no_saturate_FLOAT16_to_FLOAT8E4M3FN",
        "test_castlike_no_saturate_FLOAT16_to_FLOAT8E4M3FNUZ",
        "test_castlike_no_saturate_FLOAT16_to_FLOAT8E4M3FNUZ_expanded",
        "test_castlike_no_saturate_FLOAT16_to_FLOAT8E4M3FN_expanded",
        "test_castlike_no_saturate_FLOAT16_to_FLOAT8E5M2",
        "test_castlike_no_saturate_FLOAT16_to_FLOAT8E5M2FNUZ",
        "test_castlike_no_saturate_FLOAT16_to_FLOAT8E5M2FNUZ_expanded",
        "test_castlike_no_saturate_FLOAT16_to_FLOAT8E5M2_expanded",
        "test_castlike_no_saturate_FLOAT_to_FLOAT8E4M3FN",
        "test_castlike_no_saturate_FLOAT_to_FLOAT8E4M3FNUZ",
        "test_castlike_no_saturate_FLOAT_to_FLOAT8E4M3FNUZ_expanded",
        "test_castlike_no_saturate_FLOAT_to_FLOAT8E4M3FN_expanded",
        "test_castlike_no_saturate_FLOAT_to_FLOAT8E5M2",
        "test_castlike_no_saturate_FLOAT_to_FLOAT8E5M2FNUZ",
        "test_castlike_no_saturate_FLOAT_to_FLOAT8E5M2FNUZ_expanded",
        "test_castlike_no_saturate_FLOAT_to_FLOAT8E5M2_expanded", "test_celu_bfloat16_expanded",
        "test_celu_bfloat16",
        "test_range_bfloat16_type_positive_delta",
        "test_range_bfloat16_type_positive_delta_expanded",
    ], NO_NARROW_TYPE),
    **dict.fromkeys([
        "test_dequantizelinear_e4m3fn", "test_dequantizelinear_e4m3fn_float16",
        "test_dequantizelinear_e4m3fn_zero_point", "test_dequantizelinear_e5m2",
        "test_dequantizelinear_float4e2m1", "test_quantizelinear_e4m3fn",
        "test_quantizelinear_e5m2", "test_quantizelinear_float4e2m1",
    ], NO_NARROW_TYPE),
    **dict.fromkeys([
        "test_dequantizelinear_int2", "test_dequantizelinear_int4", "test_dequantizelinear_uint2",
        "test_dequantizelinear_uint4", "test_quantizelinear_int2", "test_quantizelinear_int4",
        "test_quantizelinear_uint2", "test_quantizelinear_uint4",
    ], "a run-time int4/int2 tensor: CoreML has 4-bit integers only in constant weights "
       "(constexpr ops, which QDQ int4 weights use) and no 2-bit ones"),
    **dict.fromkeys([
        "test_equal_string", "test_equal_string_broadcast",
    ], NO_STRINGS),
    **dict.fromkeys([
        # the *_expanded DepthToSpace/SpaceToDepth forms pass: merge_transpose_axes
        "test_nllloss_NCd1d2d3d4d5_mean_weight_expanded",
        "test_nllloss_NCd1d2d3d4d5_none_no_weight_expanded",
        "test_unsqueeze_three_axes", "test_unsqueeze_unsorted_axes",
    ], RANK_ABOVE_5),
    **dict.fromkeys([
        "test_causal_conv_with_state_kernel_size_one_expanded", "test_slice_start_out_of_bounds",
    ], ZERO_SIZE),
    **dict.fromkeys([
        "test_averagepool_2d_dilations",
        "test_averagepool_3d_dilations_large_count_include_pad_is_0_ceil_mode_is_False",
        "test_averagepool_3d_dilations_large_count_include_pad_is_0_ceil_mode_is_True",
        "test_averagepool_3d_dilations_large_count_include_pad_is_1_ceil_mode_is_False",
        "test_averagepool_3d_dilations_large_count_include_pad_is_1_ceil_mode_is_True",
        "test_averagepool_3d_dilations_small", "test_maxpool_2d_dilations",
        "test_maxpool_3d_dilations", "test_maxpool_3d_dilations_use_ref_impl",
        "test_maxpool_3d_dilations_use_ref_impl_large",
    ], DILATED_POOL),
    **dict.fromkeys([
        "test_wrap_pad",
    ], WRAP_PAD),
    **dict.fromkeys([
        "test_maxpool_with_argmax_2d_precomputed_pads",
        "test_maxpool_with_argmax_2d_precomputed_strides",
    ], POOL_INDICES),
    **dict.fromkeys([
        "test_averagepool_2d_ceil_last_window_starts_on_pad",
    ], ROUNDED_EXPECTATION),
    **dict.fromkeys([
        "test_resize_downsample_scales_cubic",
        "test_resize_downsample_scales_cubic_A_n0p5_exclude_outside",
        "test_resize_downsample_scales_cubic_align_corners",
        "test_resize_downsample_scales_cubic_antialias", "test_resize_downsample_sizes_cubic",
        "test_resize_downsample_sizes_cubic_antialias", "test_resize_upsample_scales_cubic",
        "test_resize_upsample_scales_cubic_A_n0p5_exclude_outside",
        "test_resize_upsample_scales_cubic_align_corners",
        "test_resize_upsample_scales_cubic_asymmetric", "test_resize_upsample_sizes_cubic",
    ], RESIZE_CUBIC),
    **dict.fromkeys([
        "test_resize_downsample_scales_linear", "test_resize_downsample_scales_linear_antialias",
        "test_resize_downsample_scales_linear_half_pixel_symmetric",
        "test_resize_downsample_sizes_linear_antialias", "test_resize_tf_crop_and_resize",
        "test_resize_tf_crop_and_resize_axes_2_3", "test_resize_tf_crop_and_resize_axes_3_2",
        "test_resize_tf_crop_and_resize_extrapolation_value",
        "test_resize_upsample_scales_linear_half_pixel_symmetric",
    ], RESIZE_GRID),
    **dict.fromkeys([
        "test_resize_downsample_scales_linear_align_corners",
    ], INTEGER_LENGTH),
    **dict.fromkeys([
        "test_compress_bfloat16", "test_einsum_batch_matmul_bfloat16", "test_einsum_sum_bfloat16",
        "test_einsum_transpose_bfloat16", "test_onehot_with_bfloat16_values",
        "test_reversesequence_bfloat16",
    ], NO_NARROW_TYPE),
    **dict.fromkeys([
        "test_gridsample_bicubic", "test_gridsample_bicubic_align_corners_0_additional_1",
        "test_gridsample_bicubic_align_corners_1_additional_1",
    ], GRID_SAMPLE_CUBIC),
}


def _load_tool():
    """benchmarks/node_tests.py, imported once (benchmarks/ is a script folder, not a package)."""
    name = "applec_node_tests"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, TOOL)
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


def pytest_generate_tests(metafunc):
    """Parametrize over the in-scope tests, so xdist spreads them (collection generates
    the cache if missing; every worker computes the same list)."""
    if "node_test" in metafunc.fixturenames:
        tool = _load_tool()
        cache = tool.generate()
        names = [n for n in tool.list_tests(cache) if tool.out_of_scope(cache / n) is None]
        metafunc.parametrize("node_test", names)


@pytest.fixture(scope="module")
def tool():
    module = _load_tool()
    module.warm_up()  # freezes the heap: coremltools' per-convert gc.collect gets cheap
    return module


def test_node(node_test, tool):
    cache = tool.default_cache()
    result = tool.run_test(cache / node_test)
    reason = KNOWN_EXCEPTIONS.get(node_test)
    if reason is None:
        assert result.status == "pass", f"{result.status}: {result.detail}"
        return
    assert result.status != "pass", "passes now: take it off KNOWN_EXCEPTIONS"
    if result.status == "compile_error":
        assert result.detail.startswith("UnsupportedOpError"), result.detail
    else:
        assert reason in (ROUNDED_EXPECTATION, INTEGER_LENGTH), \
            f"{result.status}: {result.detail}"


def test_known_exceptions_are_in_scope(tool):
    """Every listed name is a current, in-scope node test (no stale entries)."""
    cache = tool.generate()
    names = set(tool.list_tests(cache))
    stale = [n for n in KNOWN_EXCEPTIONS if n not in names or tool.out_of_scope(cache / n)]
    assert not stale, f"not in-scope node tests: {stale}"
