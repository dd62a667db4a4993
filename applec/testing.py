"""Small ONNX models built with onnx.helper, for tests, examples and benchmarks.

Each builder returns an `onnx.ModelProto` with seeded random weights. They are written the
way exporters write them (decomposed LayerNorm, GELU via Erf, shape subgraphs feeding
Reshape), because that is what applec has to take.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


class GraphBuilder:
    """A thin helper over onnx.helper: named nodes, initializers from numpy."""

    def __init__(self, seed: int = 0):
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.count = 0

    def weight(self, name: str, shape, scale: float | None = None) -> str:
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else shape[0]
        scale = scale if scale is not None else 1.0 / np.sqrt(max(fan_in, 1))
        return self.init(name, (self.rng.standard_normal(shape) * scale).astype(np.float32))

    def init(self, name: str, array) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, name: str | None = None,
           **attrs) -> str | list[str]:
        self.count += 1
        name = name or f"{op_type.lower()}_{self.count}"
        outs = [f"{name}_out{i}" if i else name for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=name, **attrs))
        return outs[0] if n_out == 1 else outs

    def model(self, inputs, outputs, opset: int = 17, name: str = "model") -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, name, inputs, outputs, self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                                  producer_name="applec.testing")
        model.ir_version = 8
        onnx.checker.check_model(model)
        return model


def tensor(name: str, elem_type, shape) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem_type, shape)


def cnn(seed: int = 0, batch="N") -> onnx.ModelProto:
    """Conv-BN-ReLU, max pool, depthwise conv, Clip (ReLU6), pooling, Gemm, Softmax."""
    b = GraphBuilder(seed)

    def bn(x: str, channels: int) -> str:
        return b.op("BatchNormalization", [
            x, b.init(f"bn{b.count}_g", b.rng.uniform(0.5, 1.5, channels).astype(np.float32)),
            b.init(f"bn{b.count}_b", b.rng.normal(0, 0.1, channels).astype(np.float32)),
            b.init(f"bn{b.count}_m", b.rng.normal(0, 0.1, channels).astype(np.float32)),
            b.init(f"bn{b.count}_v", b.rng.uniform(0.5, 2, channels).astype(np.float32))],
            epsilon=1e-5)

    h = b.op("Conv", ["image", b.weight("conv1_w", (8, 3, 3, 3)), b.weight("conv1_b", (8,))],
             pads=[1, 1, 1, 1], name="conv1")
    h = b.op("Relu", [bn(h, 8)])
    h = b.op("MaxPool", [h], kernel_shape=[2, 2], strides=[2, 2])
    h = b.op("Conv", [h, b.weight("dw_w", (8, 1, 3, 3))], group=8, pads=[1, 1, 1, 1],
             name="depthwise")
    h = b.op("Clip", [bn(h, 8), b.init("zero", np.float32(0)), b.init("six", np.float32(6))])
    h = b.op("Conv", [h, b.weight("pw_w", (16, 8, 1, 1)), b.weight("pw_b", (16,))],
             name="pointwise")
    h = b.op("Relu", [h])
    h = b.op("AveragePool", [h], kernel_shape=[2, 2], strides=[2, 2])
    h = b.op("GlobalAveragePool", [h])
    h = b.op("Flatten", [h], axis=1)
    h = b.op("Gemm", [h, b.weight("fc_w", (10, 16)), b.weight("fc_b", (10,))], transB=1)
    b.op("Softmax", [h], axis=-1, name="probs")
    return b.model([tensor("image", TensorProto.FLOAT, [batch, 3, 32, 32])],
                   [tensor("probs", TensorProto.FLOAT, [batch, 10])], name="cnn")


def token_mlp(seed: int = 0, vocab: int = 100, seq: int = 6) -> onnx.ModelProto:
    """int64 token ids -> embedding Gather -> mean -> Gemm/ReLU/Gemm -> Softmax."""
    b = GraphBuilder(seed)
    emb = b.op("Gather", [b.weight("embedding", (vocab, 16), 1.0), "ids"], axis=0)
    pooled = b.op("ReduceMean", [emb], axes=[1], keepdims=0)
    h = b.op("Gemm", [pooled, b.weight("w1", (16, 32)), b.weight("b1", (32,))])
    h = b.op("Relu", [h])
    h = b.op("Gemm", [h, b.weight("w2", (8, 32)), b.weight("b2", (8,))], transB=1)
    b.op("Softmax", [h], axis=1, name="scores")
    return b.model([tensor("ids", TensorProto.INT64, ["batch", seq])],
                   [tensor("scores", TensorProto.FLOAT, ["batch", 8])], opset=13,
                   name="token_mlp")


def transformer_block(seed: int = 0, seq: int = 8, dim: int = 32, heads: int = 4,
                      opset: int = 17) -> onnx.ModelProto:
    """One encoder block as exporters emit it: decomposed LayerNorm, attention with an
    additive mask from int64 attention_mask, Shape-computed head reshapes, GELU via Erf."""
    b = GraphBuilder(seed)
    head_dim = dim // heads
    f32 = lambda v: b.init(f"c{b.count}_{len(b.inits)}", np.float32(v))  # noqa: E731
    i64 = lambda v: b.init(f"i{b.count}_{len(b.inits)}", np.asarray(v, np.int64))  # noqa: E731

    def layer_norm(x: str, prefix: str) -> str:
        mean = b.op("ReduceMean", [x], axes=[-1], keepdims=1)
        centered = b.op("Sub", [x, mean])
        var = b.op("ReduceMean", [b.op("Pow", [centered, f32(2.0)])], axes=[-1], keepdims=1)
        std = b.op("Sqrt", [b.op("Add", [var, f32(1e-5)])])
        normed = b.op("Div", [centered, std])
        gamma = b.init(f"{prefix}_g", b.rng.uniform(0.5, 1.5, dim).astype(np.float32))
        beta = b.init(f"{prefix}_b", b.rng.normal(0, 0.1, dim).astype(np.float32))
        return b.op("Add", [b.op("Mul", [normed, gamma]), beta])

    def linear(x: str, prefix: str, n_in: int, n_out: int) -> str:
        return b.op("Add", [b.op("MatMul", [x, b.weight(f"{prefix}_w", (n_in, n_out))]),
                            b.weight(f"{prefix}_b", (n_out,), 0.02)])

    def split_heads(x: str, perm: list[int]) -> str:
        batch = b.op("Gather", [b.op("Shape", ["hidden"]), i64(0)], axis=0)
        batch = b.op("Unsqueeze", [batch, i64([0])])
        shape = b.op("Concat", [batch, i64([-1, heads, head_dim])], axis=0)
        return b.op("Transpose", [b.op("Reshape", [x, shape])], perm=perm)

    # additive mask: (1 - mask) * -10000, broadcast over heads and queries
    mask = b.op("Cast", [b.op("Unsqueeze", ["attention_mask", i64([1, 2])])],
                to=TensorProto.FLOAT)
    mask = b.op("Mul", [b.op("Sub", [f32(1.0), mask]), f32(-10000.0)])
    q = split_heads(linear("hidden", "q", dim, dim), [0, 2, 1, 3])
    k = split_heads(linear("hidden", "k", dim, dim), [0, 2, 3, 1])
    v = split_heads(linear("hidden", "v", dim, dim), [0, 2, 1, 3])
    scores = b.op("Div", [b.op("MatMul", [q, k]), f32(np.sqrt(head_dim))])
    probs = b.op("Softmax", [b.op("Add", [scores, mask])], axis=-1)
    context = b.op("Transpose", [b.op("MatMul", [probs, v])], perm=[0, 2, 1, 3])
    context = b.op("Reshape", [context, i64([0, -1, dim])])
    h = layer_norm(b.op("Add", ["hidden", linear(context, "o", dim, dim)]), "ln1")
    up = linear(h, "ff1", dim, 4 * dim)
    gelu = b.op("Mul", [b.op("Mul", [up, b.op("Add", [
        b.op("Erf", [b.op("Div", [up, f32(np.sqrt(2.0))])]), f32(1.0)])]), f32(0.5)])
    out = layer_norm(b.op("Add", [h, linear(gelu, "ff2", 4 * dim, dim)]), "ln2")
    b.op("Identity", [out], name="output")
    return b.model([tensor("hidden", TensorProto.FLOAT, ["batch", seq, dim]),
                    tensor("attention_mask", TensorProto.INT64, ["batch", seq])],
                   [tensor("output", TensorProto.FLOAT, ["batch", seq, dim])], opset=opset,
                   name="transformer_block")


MODELS = {"cnn": cnn, "token_mlp": token_mlp, "transformer_block": transformer_block}
