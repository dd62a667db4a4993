"""Weight quantization (`--quantize int8|int4|palette4`): structure of the bundle (the
constexpr op per layer, weight.bin size), numbers (the reference executor on the quantized
bundle vs the interpreter on the same quantized IR; vs onnxruntime on the float model), the
skip rules, GPTQ calibration, the accuracy report, and every impossible combination failing
at compile time with exit code 2."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto

import applec
from applec import interpreter
from applec.accuracy import cosine, snr_db
from applec.cli import main
from applec.onnx_import import import_model
from applec.passes import run_pipeline
from applec.passes._quant import make_config
from applec.passes._quant_calibration import load_calibration
from applec.testing import GraphBuilder, tensor
from applec.validate import onnxruntime_outputs

F = TensorProto.FLOAT
MODES = ("int8", "int4", "palette4")
CONSTEXPR = {"int8": "constexpr_blockwise_shift_scale", "int4": "constexpr_blockwise_shift_scale",
             "palette4": "constexpr_lut_to_dense"}
# cosine of the fp16 quantized bundle vs onnxruntime fp32, on random weights (real trained
# weights quantize better: see docs/quantization.md for MiniLM)
COSINE_FLOOR = {"int8": 0.999, "int4": 0.99, "palette4": 0.98}
# weight.bin of the fp16 quantized bundle vs the fp32 float one (the MLP: 97% of it is
# quantized weights); int8 stores 1 byte + a scale per row, int4 0.5 byte + fp16 scale and
# fp16 offset per 32 (at most 128 / 20 = 6.4x), palette4 0.5 byte + a 16-entry LUT per 16 rows
SHRINK = {"int8": 3.8, "int4": 5.9, "palette4": 7.0}


# -- models --------------------------------------------------------------------------------
def mlp() -> onnx.ModelProto:
    """MatMul+Add (-> Linear), a bias-free MatMul, a small Gemm that stays float."""
    b = GraphBuilder(0)
    h = b.op("Add", [b.op("MatMul", ["x", b.weight("w1", (128, 256))], name="fc1"),
                     b.weight("b1", (256,), 0.1)])
    h = b.op("Relu", [h])
    h = b.op("Relu", [b.op("MatMul", [h, b.weight("w2", (256, 128))], name="fc2")])
    b.op("Gemm", [h, b.weight("w3", (10, 128)), b.weight("b3", (10,), 0.1)], transB=1,
         name="y")
    return b.model([tensor("x", F, [4, 128])], [tensor("y", F, [4, 10])])


def cnn() -> onnx.ModelProto:
    """Dense and depthwise convs; the first conv and the classifier are small."""
    b = GraphBuilder(1)
    h = b.op("Relu", [b.op("Conv", ["image", b.weight("c1_w", (32, 3, 3, 3))],
                           pads=[1, 1, 1, 1], name="conv1")])
    h = b.op("Relu", [b.op("Conv", [h, b.weight("c2_w", (64, 32, 3, 3)),
                                    b.weight("c2_b", (64,), 0.1)],
                           pads=[1, 1, 1, 1], strides=[2, 2], name="conv2")])
    h = b.op("Conv", [h, b.weight("dw_w", (64, 1, 3, 3))], group=64, pads=[1, 1, 1, 1],
             name="dw")
    h = b.op("Conv", [h, b.weight("c3_w", (64, 64, 1, 1))], name="conv3")
    h = b.op("Flatten", [b.op("GlobalAveragePool", [h])], axis=1)
    b.op("Gemm", [h, b.weight("fc_w", (10, 64)), b.weight("fc_b", (10,))], transB=1,
         name="logits")
    return b.model([tensor("image", F, [2, 3, 16, 16])], [tensor("logits", F, [2, 10])])


def embedding() -> onnx.ModelProto:
    """Token embedding (Gather on a [500, 64] table), a projection, a LayerNorm."""
    b = GraphBuilder(2)
    e = b.op("Gather", [b.weight("table", (500, 64), 1.0), "ids"], axis=0, name="embed")
    h = b.op("MatMul", [e, b.weight("proj", (64, 128))], name="project")
    b.op("LayerNormalization", [h, b.init("ln_g", np.ones(128, np.float32)),
                                b.init("ln_b", np.zeros(128, np.float32))], axis=-1,
         name="out")
    return b.model([tensor("ids", TensorProto.INT64, [2, 8])], [tensor("out", F, [2, 8, 128])])


MODELS = {"mlp": mlp, "cnn": cnn, "embedding": embedding}
QUANTIZED = {"mlp": {"fc1", "fc2"}, "cnn": {"conv2", "conv3"}, "embedding": {"embed", "project"}}


def feeds_for(name: str, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    if name == "embedding":
        return {"ids": rng.integers(0, 500, (2, 8)).astype(np.int64)}
    shape = (4, 128) if name == "mlp" else (2, 3, 16, 16)
    return {"x" if name == "mlp" else "image": rng.standard_normal(shape).astype(np.float32)}


# -- helpers -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("quantize")
    paths = {}
    for name, build in MODELS.items():
        paths[name] = root / f"{name}.onnx"
        onnx.save(build(), paths[name])
    return root, paths


def compile_bundle(root, path, name, **options):
    out = root / f"{path.stem}_{name}.bundle"
    return applec.compile(path, output=out, **options), applec.load(out, backend="reference")


def quantized_ir(path, mode, precision="fp32", ios18=True, calibration=None, **options):
    """The IR `applec compile --quantize` lowers (the same passes, the same options)."""
    graph = import_model(path)
    cfg = make_config(mode, block_size=options.get("block_size"),
                      min_size=options.get("min_size"), calibration=calibration,
                      precision=precision, ios18=ios18, target_text="test")
    if calibration is not None:
        cfg.calibration = load_calibration(calibration, graph.inputs)
    graph.meta["quantize"] = cfg
    run_pipeline(graph)
    return graph


def weight_bytes(result) -> int:
    return (result.bundle / "partitions/p0.mlpackage/Data/com.apple.CoreML/weights/"
            "weight.bin").stat().st_size


def max_rel(got, want) -> float:
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


# -- structure and numbers, per mode and model ----------------------------------------------
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(MODELS))
def test_mode_structure_and_numbers(models, name, mode):
    root, paths = models
    feeds = feeds_for(name)
    result, bundle = compile_bundle(root, paths[name], f"{mode}_fp32", quantize=mode,
                                    precision="fp32")
    nodes = result.report["nodes"]
    for onnx_node in QUANTIZED[name]:
        # under int4 an embedding table is int8 by default (--quantize-embeddings)
        want_mode = "int8" if (onnx_node, mode) == ("embed", "int4") else mode
        assert nodes[onnx_node]["mil_ops"][0] == CONSTEXPR[want_mode], onnx_node
        assert nodes[onnx_node]["quantization"]["mode"] == want_mode
    assert set(result.report["quantization"]["layers"]) == QUANTIZED[name]
    # an fp32 program decompresses to exactly the IR's numbers: only op order differs
    want = interpreter.run(quantized_ir(paths[name], mode), feeds)
    got = bundle.run(feeds)
    for output, value in want.items():
        assert got[output].shape == value.shape and got[output].dtype == value.dtype
        assert max_rel(got[output], value) < 1e-5, output
    # the fp16 program against onnxruntime on the float model
    _, half = compile_bundle(root, paths[name], f"{mode}_fp16", quantize=mode)
    reference = onnxruntime_outputs(paths[name], feeds)
    for output, value in reference.items():
        assert cosine(half.run(feeds)[output], value) >= COSINE_FLOOR[mode], output


@pytest.mark.parametrize("mode", MODES)
def test_weight_bin_shrinks(models, mode):
    root, paths = models
    float32, _ = compile_bundle(root, paths["mlp"], "float_fp32", precision="fp32")
    quantized, _ = compile_bundle(root, paths["mlp"], f"{mode}_size", quantize=mode)
    ratio = weight_bytes(float32) / weight_bytes(quantized)
    assert ratio >= SHRINK[mode], f"weight.bin only {ratio:.2f}x smaller"
    summary = quantized.report["quantization"]["weights"]
    assert summary["layers"] == 2 and summary["ratio"] > SHRINK[mode] / 2.1


def test_bias_norm_small_and_integer_tensors_stay_float(tmp_path):
    b = GraphBuilder(3)
    h = b.op("Add", [b.op("MatMul", ["x", b.weight("w", (64, 16))], name="fc"),
                     b.weight("bias", (16,))])
    h = b.op("LayerNormalization", [h, b.weight("gamma", (16,)), b.weight("beta", (16,))],
             axis=-1, name="ln")
    table = b.init("codes", np.arange(40 * 16, dtype=np.int32).reshape(40, 16))
    looked_up = b.op("Cast", [b.op("Gather", [table, "ids"], axis=0, name="lookup")], to=F)
    b.op("Add", [h, b.op("ReduceMean", [looked_up], axes=[0], keepdims=0)], name="y")
    path = tmp_path / "skip.onnx"
    onnx.save(b.model([tensor("x", F, [3, 64]), tensor("ids", TensorProto.INT64, [2])],
                      [tensor("y", F, [3, 16])]), path)
    result = applec.compile(path, output=tmp_path / "skip.bundle", quantize="int8",
                            quantize_min_size=16)
    q = result.report["quantization"]
    assert set(q["layers"]) == {"fc"}
    assert "is int32, not float" in q["skipped"]["lookup"]
    graph = quantized_ir(path, "int8", min_size=16)
    dequantized = [n for n in graph.nodes if n.op_type == "applec.DequantizeWeight"]
    assert len(dequantized) == 1 and dequantized[0].outputs[0].shape == (16, 64)
    linear = next(n for n in graph.nodes if n.op_type == "applec.Linear")
    assert linear.inputs[2].is_const and linear.inputs[2].dtype == np.float32   # the bias
    norm = next(n for n in graph.nodes if n.op_type == "LayerNormalization")
    assert all(v.is_const for v in norm.inputs[1:])
    # the default threshold keeps the 1024-element weight float too
    default = applec.compile(path, output=tmp_path / "default.bundle", quantize="int8")
    assert default.report["quantization"]["layers"] == {}
    assert "under --quantize-min-size 2048" in default.report["quantization"]["skipped"]["fc"]


# -- targets before iOS18 ------------------------------------------------------------------
@pytest.mark.parametrize("mode, op", [("int8", "constexpr_affine_dequantize"),
                                      ("palette4", "constexpr_lut_to_dense")])
def test_ios17_forms(models, mode, op):
    root, paths = models
    result, bundle = compile_bundle(root, paths["mlp"], f"{mode}_macos14", quantize=mode,
                                    precision="fp32", deployment_target="macOS14")
    assert result.manifest["target"]["deployment_target"] == "macOS14"
    assert result.manifest["target"]["mil_opset"] == "CoreML7"
    assert result.report["nodes"]["fc2"]["mil_ops"] == [op, "linear"]
    if mode == "palette4":   # the iOS16 form holds one LUT per tensor
        assert result.report["quantization"]["layers"]["fc2"]["lut_groups"] == 1
    feeds = feeds_for("mlp")
    want = interpreter.run(quantized_ir(paths["mlp"], mode, ios18=False), feeds)["y"]
    assert max_rel(bundle.run(feeds)["y"], want) < 1e-5


# -- report --------------------------------------------------------------------------------
def test_report_accuracy_and_ane_notes(models, capsys):
    root, paths = models
    out = root / "cli_int4.bundle"
    assert main(["compile", str(paths["mlp"]), "-o", str(out), "--quantize", "int4",
                 "--block-size", "64"]) == 0
    printed = capsys.readouterr()
    assert "quantized int4 (rtn): 2 weights" in printed.out and "cosine" in printed.out
    report = json.loads((out / "report.json").read_text())
    q = report["quantization"]
    assert q["block_size"] == 64 and q["outputs"]["y"]["cosine"] > 0.98
    assert q["outputs"]["y"]["snr_db"] > 15
    fc2 = q["layers"]["fc2"]
    assert fc2["block_size"] == 64 and fc2["shape"] == [128, 256]   # [out, in]
    assert 0 < fc2["weight_rel_error"] < 0.2 and fc2["weight_snr_db"] > 15
    assert fc2["output_snr_db"] > 15
    assert any("coremltools#2510" in note for note in report["nodes"]["fc2"]["notes"])
    assert "under --quantize-min-size 2048" in q["skipped"]["y"]   # the classifier
    # int8 per output channel runs on the Neural Engine: no note
    int8, _ = compile_bundle(root, paths["mlp"], "int8_notes", quantize="int8")
    assert "notes" not in int8.report["nodes"]["fc2"]


def test_rebuild_is_byte_identical(models, tmp_path):
    root, paths = models
    first = applec.compile(paths["cnn"], output=tmp_path / "a", quantize="palette4")
    second = applec.compile(paths["cnn"], output=tmp_path / "b", quantize="palette4")
    assert first.manifest["files"] == second.manifest["files"]


# -- calibration ---------------------------------------------------------------------------
def correlated(rng, count, mixing):
    return (rng.standard_normal((count, 4, 128)) @ mixing).astype(np.float32)


@pytest.mark.parametrize("mode, gain_db", [("int8", 3.0), ("int4", 3.0), ("palette4", 3.0)])
def test_gptq_beats_round_to_nearest(models, tmp_path, mode, gain_db):
    root, paths = models
    rng = np.random.default_rng(0)
    mixing = rng.standard_normal((128, 128)) * np.exp(-np.arange(128) / 12)[:, None]
    calibration = {"x": correlated(rng, 16, mixing)}
    held_out = [{"x": x} for x in correlated(rng, 4, mixing)]
    float_ir = import_model(paths["mlp"])
    run_pipeline(float_ir)
    rtn = quantized_ir(paths["mlp"], mode)
    gptq = quantized_ir(paths["mlp"], mode, calibration=calibration)
    want = np.concatenate([interpreter.run(float_ir, f)["y"] for f in held_out])
    snr = {name: snr_db(want, np.concatenate([interpreter.run(g, f)["y"] for f in held_out]))
           for name, g in (("rtn", rtn), ("gptq", gptq))}
    assert snr["gptq"] >= snr["rtn"] + gain_db, snr
    np.savez(tmp_path / "calib.npz", **calibration)
    result = applec.compile(paths["mlp"], output=tmp_path / "gptq.bundle", quantize=mode,
                            calibration=tmp_path / "calib.npz", precision="fp32")
    q = result.report["quantization"]
    assert q["method"] == "gptq" and q["inputs"].startswith("calibration: 16 sample(s)")
    assert all(layer["method"] == "gptq" for layer in q["layers"].values())
    bundle = applec.load(tmp_path / "gptq.bundle", backend="reference")
    assert max_rel(bundle.run(held_out[0])["y"], interpreter.run(gptq, held_out[0])["y"]) < 1e-5


def test_gptq_on_convolutions(models):
    root, paths = models
    rng = np.random.default_rng(5)
    smooth = np.cumsum(rng.standard_normal((4, 2, 3, 16, 16)), axis=4).astype(np.float32)
    graph = quantized_ir(paths["cnn"], "int4", calibration={"image": smooth})
    layers = graph.meta["quantize"].layers
    assert layers["conv2"]["method"] == "gptq" and layers["conv3"]["method"] == "gptq"


def test_fp16_overflow_is_kept_in_fp32_in_a_quantized_compile(tmp_path):
    b = GraphBuilder(4)
    h = b.op("MatMul", ["x", b.weight("w", (64, 64))], name="fc")
    b.op("Mul", [h, b.init("gain", np.float32(1e5))], name="y")
    path = tmp_path / "hot.onnx"
    onnx.save(b.model([tensor("x", F, [2, 64])], [tensor("y", F, [2, 64])]), path)
    calibration = {"x": np.random.default_rng(0).standard_normal((3, 2, 64)).astype(np.float32)}
    result = applec.compile(path, output=tmp_path / "hot.bundle", quantize="int8",
                            quantize_min_size=64, calibration=calibration)
    safety = result.report["fp16_safety"]
    assert list(safety["values"]) == ["y"] and safety["values"]["y"]["peak"] > 65504
    assert result.report["nodes"]["y"]["precision"] == "fp32"
    got = applec.load(tmp_path / "hot.bundle").run({"x": calibration["x"][0]})["y"]
    assert np.all(np.isfinite(got)) and np.abs(got).max() > 65504


@pytest.mark.parametrize("embeddings, want", [(None, "int8"), ("int4", "int4"),
                                               ("palette4", "palette4"), ("float", None)])
def test_quantize_embeddings(models, embeddings, want):
    root, paths = models
    result, bundle = compile_bundle(root, paths["embedding"], f"emb_{embeddings}",
                                    quantize="int4", quantize_embeddings=embeddings,
                                    precision="fp32")
    layers = result.report["quantization"]["layers"]
    assert layers["project"]["mode"] == "int4"
    if want is None:
        assert "embed" not in layers
        assert "--quantize-embeddings float" in \
            result.report["quantization"]["skipped"]["embed"]
    else:
        assert layers["embed"]["mode"] == want
    feeds = feeds_for("embedding")
    reference = onnxruntime_outputs(paths["embedding"], feeds)
    for output, value in reference.items():
        assert cosine(bundle.run(feeds)[output], value) >= COSINE_FLOOR["int4"], output


# -- impossible combinations: compile-time errors, exit code 2, no bundle ------------------
def tiny_model(path):
    b = GraphBuilder(5)
    b.op("MatMul", ["x", b.weight("w", (3, 16))], name="y")
    onnx.save(b.model([tensor("x", F, [2, 3])], [tensor("y", F, [2, 16])]), path)
    return path


@pytest.mark.parametrize("args, message", [
    (["--quantize", "int4", "--deployment-target", "macOS14"],
     "--quantize int4 stores block-wise weights (constexpr_blockwise_shift_scale), which "
     "need macOS15/iOS18, but target m2 deploys to macOS14"),
    (["--quantize", "palette4", "--quantize-min-size", "8"], "too small to palettize"),
    (["--quantize", "int3"], "--quantize must be one of int8, int4, palette4"),
    (["--block-size", "64"], "--block-size needs --quantize"),
    (["--quantize", "int8", "--block-size", "64"], "--block-size applies to --quantize int4"),
    (["--quantize", "int4", "--block-size", "0"], "--block-size must be a positive number"),
    (["--quantize", "int8", "--deployment-target", "macOS99"], "m2 supports macOS12"),
    (["--quantize-embeddings", "int8"], "--quantize-embeddings needs --quantize"),
    (["--quantize", "int8", "--quantize-embeddings", "int2"],
     "--quantize-embeddings must be one of int8, int4, palette4, float, not 'int2'"),
    (["--quantize", "int8", "--quantize-embeddings", "int4", "--deployment-target", "macOS14"],
     "--quantize-embeddings int4 stores block-wise weights"),
])
def test_impossible_options_exit_2(tmp_path, capsys, args, message):
    model = tiny_model(tmp_path / "tiny.onnx")
    out = tmp_path / "never.bundle"
    assert main(["compile", str(model), "-o", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert message in " ".join(err.split()) and "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize("arrays, message", [
    ({"image": np.zeros((2, 4, 128), np.float32)}, "missing x; unknown image"),
    ({"x": np.zeros((2, 4, 64), np.float32)}, "'x' has shape [2, 4, 64]; expected [4, 128]"),
    ({"x": np.zeros((2, 4, 128), np.int64)}, "'x' is int64, the model input is float32"),
    ({"x": np.zeros((2, 4, 128), np.float32), "extra": np.zeros(3)}, "unknown extra"),
])
def test_calibration_mismatch_exits_2(models, tmp_path, capsys, arrays, message):
    root, paths = models
    calibration = tmp_path / "calib.npz"
    np.savez(calibration, **arrays)
    out = tmp_path / "never.bundle"
    assert main(["compile", str(paths["mlp"]), "-o", str(out), "--quantize", "int8",
                 "--calibration", str(calibration)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "--calibration" in err and message in err
    assert not out.exists()


def test_calibration_formats(models):
    root, paths = models
    graph = import_model(paths["mlp"])
    sample = np.ones((4, 128), np.float32)
    assert len(load_calibration({"x": sample}, graph.inputs)) == 1
    assert len(load_calibration({"x": np.stack([sample] * 3)}, graph.inputs)) == 3


def test_int4_search_beats_min_max_and_stays_exact_in_fp16():
    """int4 scale/zero per block: searched for the least squared error, never worse than
    the plain [min, max] grid, with zero points whose `code - zero` fp16 holds exactly."""
    from applec.passes._quant import int4_block_params, int4_codes, round_to

    rng = np.random.default_rng(0)
    w = rng.standard_t(4, size=(96, 256)).astype(np.float32)   # heavy tails, like weights
    blocks = w.reshape(96, 8, 32)

    def error(scale, zero):
        codes = int4_codes(blocks, scale[..., None], zero[..., None])
        return ((codes - zero[..., None]) * scale[..., None] - blocks) ** 2, codes

    low, high = np.minimum(blocks.min(axis=2), 0), np.maximum(blocks.max(axis=2), 0)
    plain_scale = round_to((high - low) / 15, np.float16)
    plain, _ = error(plain_scale, np.rint(-low / plain_scale))
    scale, zero = int4_block_params(w, 32, np.float16)
    searched, codes = error(scale, zero)
    assert np.all(scale == round_to(scale, np.float16))
    assert np.all(searched.sum(axis=2) <= plain.sum(axis=2) * (1 + 1e-6))
    assert searched.sum() < 0.8 * plain.sum(), searched.sum() / plain.sum()
    shifted = codes - zero[..., None]
    assert np.array_equal(shifted.astype(np.float16).astype(np.float32), shifted)
