"""Reference models for the benchmarks, written in plain torch.nn, and their cached ONNX exports.

Each `ModelSpec` builds the same architecture every time (fixed seed, random weights), so a
benchmark can hand the PyTorch module to coremltools and the exported ONNX file to applec
and know both compilers see one network. There is no torchvision or transformers here on
purpose: both would add dependencies the `bench` extra does not pin.

    spec = MODELS["resnet50"]
    onnx_path = export_onnx(spec)          # exported once, then reused from the cache
    module = spec.build()                  # eval mode, seeded weights
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "applec" / "bench"
ONNX_OPSET = 17
SEED = 0


# ResNet-50 (v1.5: the stride sits on the 3x3 convolution, as in torchvision).

class Bottleneck(nn.Module):
    """1x1 reduce -> 3x3 -> 1x1 expand (x4), with a projection shortcut when shapes change."""

    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int = 1):
        super().__init__()
        out_channels = width * self.expansion
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + shortcut)


class ResNet50(nn.Module):
    def __init__(self, blocks=(3, 4, 6, 3), num_classes: int = 1000):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False), nn.BatchNorm2d(64),
            nn.ReLU(inplace=True), nn.MaxPool2d(3, stride=2, padding=1))
        stages, channels = [], 64
        for index, count in enumerate(blocks):
            width = 64 * 2 ** index
            layers = []
            for block in range(count):
                stride = 2 if block == 0 and index > 0 else 1
                layers.append(Bottleneck(channels, width, stride))
                channels = width * Bottleneck.expansion
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.stages(self.stem(x)))
        return self.fc(torch.flatten(x, 1))


# BERT-base (the eager attention of the original BERT, additive -10000 mask, pooler).

class BertEmbeddings(nn.Module):
    def __init__(self, vocab: int, hidden: int, max_positions: int, eps: float):
        super().__init__()
        self.word = nn.Embedding(vocab, hidden)
        self.position = nn.Embedding(max_positions, hidden)
        self.token_type = nn.Embedding(2, hidden)
        self.norm = nn.LayerNorm(hidden, eps=eps)
        # Sliced by sequence length in forward, as transformers' BertEmbeddings does.
        self.register_buffer("position_ids", torch.arange(max_positions)[None], persistent=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = self.position_ids[:, :input_ids.shape[1]]
        x = self.word(input_ids) + self.position(positions) + self.token_type.weight[0]
        return self.norm(x)


class BertSelfAttention(nn.Module):
    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, hidden // heads
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, _ = x.shape
        return x.view(batch, seq, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        q, k, v = self._split(self.query(x)), self._split(self.key(x)), self._split(self.value(x))
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim) + mask
        context = torch.softmax(scores, dim=-1) @ v
        batch, _, seq, _ = context.shape
        return context.transpose(1, 2).reshape(batch, seq, self.heads * self.head_dim)


class BertLayer(nn.Module):
    def __init__(self, hidden: int, heads: int, ffn: int, eps: float):
        super().__init__()
        self.attention = BertSelfAttention(hidden, heads)
        self.attention_out = nn.Linear(hidden, hidden)
        self.attention_norm = nn.LayerNorm(hidden, eps=eps)
        self.ffn_in = nn.Linear(hidden, ffn)
        self.gelu = nn.GELU()
        self.ffn_out = nn.Linear(ffn, hidden)
        self.ffn_norm = nn.LayerNorm(hidden, eps=eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.attention_norm(x + self.attention_out(self.attention(x, mask)))
        return self.ffn_norm(x + self.ffn_out(self.gelu(self.ffn_in(x))))


class BertBase(nn.Module):
    """Returns (sequence output [B, S, 768], pooled output [B, 768]) like `BertModel`."""

    def __init__(self, vocab: int = 30522, hidden: int = 768, layers: int = 12, heads: int = 12,
                 ffn: int = 3072, max_positions: int = 512, eps: float = 1e-12):
        super().__init__()
        self.embeddings = BertEmbeddings(vocab, hidden, max_positions, eps)
        self.layers = nn.ModuleList(BertLayer(hidden, heads, ffn, eps) for _ in range(layers))
        self.pooler = nn.Linear(hidden, hidden)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        # -10000 rather than finfo.min: the mask must survive a cast to fp16.
        mask = (1.0 - attention_mask[:, None, None, :].to(torch.float32)) * -10000.0
        x = self.embeddings(input_ids)
        for layer in self.layers:
            x = layer(x, mask)
        return x, torch.tanh(self.pooler(x[:, 0]))


# Specs and export.

@dataclass(frozen=True)
class InputSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str  # "float32" or "int64"; what the ONNX file declares

    def example(self) -> torch.Tensor:
        generator = torch.Generator().manual_seed(SEED)
        if self.dtype == "int64":
            # Token ids below 1000 and an all-ones mask are valid for both BERT inputs.
            high = 2 if self.name == "attention_mask" else 1000
            low = 1 if self.name == "attention_mask" else 0
            return torch.randint(low, high, self.shape, generator=generator)
        return torch.randn(self.shape, generator=generator)


@dataclass(frozen=True)
class ModelSpec:
    name: str
    factory: Callable[[], nn.Module]
    inputs: tuple[InputSpec, ...]
    outputs: tuple[str, ...]

    def build(self) -> nn.Module:
        """The module in eval mode, with the same seeded random weights on every call."""
        torch.manual_seed(SEED)
        return self.factory().eval()

    def example_inputs(self) -> tuple[torch.Tensor, ...]:
        return tuple(spec.example() for spec in self.inputs)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {spec.name: spec.shape for spec in self.inputs}


MODELS = {
    "resnet50": ModelSpec("resnet50", ResNet50,
                          (InputSpec("input", (1, 3, 224, 224), "float32"),), ("logits",)),
    "bert-base": ModelSpec("bert-base", BertBase,
                           (InputSpec("input_ids", (1, 128), "int64"),
                            InputSpec("attention_mask", (1, 128), "int64")),
                           ("last_hidden_state", "pooler_output")),
}


def onnx_path(spec: ModelSpec, cache_dir: Path = DEFAULT_CACHE) -> Path:
    return Path(cache_dir) / f"{spec.name}-opset{ONNX_OPSET}.onnx"


def export_onnx(spec: ModelSpec, cache_dir: Path = DEFAULT_CACHE) -> Path:
    """Export `spec` with the TorchScript exporter (static shapes), or reuse the cached file."""
    path = onnx_path(spec, cache_dir)
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".onnx.partial")  # a killed export never looks finished
    with torch.no_grad():
        torch.onnx.export(spec.build(), spec.example_inputs(), str(partial), dynamo=False,
                          opset_version=ONNX_OPSET, input_names=[i.name for i in spec.inputs],
                          output_names=list(spec.outputs), do_constant_folding=True)
    partial.replace(path)
    return path
