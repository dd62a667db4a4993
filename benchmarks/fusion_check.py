"""Fusions on real exports: structure after, and numbers against the unfused compile.

    python benchmarks/fetch_corpus.py        # once: the models, cached outside git
    python benchmarks/fusion_check.py [--models hf_bert_base minilm_l6_ts ...]

For each model, two fp32 bundles: the default pipeline, and `--disable-pass fusions` (every
fuse_* pass off, the cleanups on). Both run in the reference executor on the corpus's
seeded inputs (token ids within the vocabulary, a padded attention mask, N(0, 1) images);
the fused outputs must equal the unfused ones to a relative error of 1e-4 (max |a - b| /
max |b| per output). Counted in the fused program: layer_norm, gelu,
scaled_dot_product_attention, batch_norm, softmax, matmul, linear, and what the
architecture says they should be (BERT-base: 25 LayerNorms, 12 GELUs, 12 attentions;
MiniLM-L6: 13, 6, 6; ResNet-50: no batch_norm; torch's exporter already folds BN into the
convolutions of hf_resnet50, the model zoo's resnet50 keeps BatchNormalization nodes).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

CORPUS = Path.home() / ".cache" / "applec" / "corpus" / "models"
COUNTED = ("layer_norm", "gelu", "scaled_dot_product_attention", "batch_norm", "softmax",
           "matmul", "linear")
# model -> (target, the fused op counts the architecture implies)
MODELS = {
    "hf_bert_base": ("m3", {"layer_norm": 25, "gelu": 12, "scaled_dot_product_attention": 12}),
    "minilm_l6_ts": ("m4", {"layer_norm": 13, "gelu": 6, "scaled_dot_product_attention": 6}),
    "minilm_l6_dynamo": ("m4", {"layer_norm": 13, "gelu": 6,
                                "scaled_dot_product_attention": 6}),
    "hf_resnet50": ("m2", {"batch_norm": 0}),   # torch's exporter folds BN itself
    # model zoo, BatchNormalization nodes; 4 of its 53 BNs follow convs whose weights the
    # "light" file makes at run time (ConstantOfShape, left unfolded: folding would store
    # megabytes of one value), so they stay; its weights are all 0.02, its numbers flat
    "onnx_light_resnet50": ("m2", {}),
}
TOLERANCE = 1e-4


def mil_counts(report: dict) -> Counter:
    counts = Counter()
    for entry in report["nodes"].values():
        counts.update(entry.get("mil_ops", []))
    return counts


def max_rel(got: np.ndarray, want: np.ndarray) -> float:
    scale = float(np.max(np.abs(want))) if want.size else 0.0
    diff = float(np.max(np.abs(got.astype(np.float64) - want))) if want.size else 0.0
    return diff / scale if scale else diff


def check(name: str, work: Path) -> dict:
    import applec
    from corpus import RECIPES, make_feeds, onnx_inputs

    path = CORPUS / f"{name}.onnx"
    if not path.exists():
        raise SystemExit(f"{path}: not cached; run python benchmarks/fetch_corpus.py")
    target, expected = MODELS[name]
    feeds = make_feeds(onnx_inputs(str(path)), RECIPES.get(name, {}))
    runs = {}
    for variant, disabled in (("fused", None), ("unfused", ["fusions"])):
        out = work / f"{name}_{variant}.bundle"
        result = applec.compile(path, output=out, target=target, precision="fp32",
                                disable_passes=disabled)
        outputs = applec.load(out, backend="reference").run(feeds)
        runs[variant] = (mil_counts(result.report), outputs)
    fused_counts, fused = runs["fused"]
    unfused_counts, unfused = runs["unfused"]
    errors = {k: max_rel(fused[k], unfused[k]) for k in unfused}
    structure_ok = all(fused_counts.get(op, 0) == n for op, n in expected.items())
    return {"model": name, "target": target,
            "fused": {op: fused_counts.get(op, 0) for op in COUNTED},
            "unfused": {op: unfused_counts.get(op, 0) for op in COUNTED},
            "ops": [sum(fused_counts.values()), sum(unfused_counts.values())],
            "expected": expected, "structure_ok": structure_ok,
            "max_rel": max(errors.values()), "numbers_ok": max(errors.values()) <= TOLERANCE}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--json", type=Path, help="write the records here")
    args = parser.parse_args()
    records = []
    with tempfile.TemporaryDirectory(prefix="applec-fusion-") as tmp:
        for name in args.models:
            records.append(check(name, Path(tmp)))
            print(json.dumps(records[-1]), flush=True)
    print("\n| model (target) | MIL ops fused / unfused | layer_norm | gelu | sdpa | batch_norm "
          "| softmax | expected | max rel. error vs unfused |")
    print("|---|---:|---:|---:|---:|---:|---:|---|---:|")
    for r in records:
        f, u = r["fused"], r["unfused"]
        cells = [f"{f[op]} / {u[op]}" for op in
                 ("layer_norm", "gelu", "scaled_dot_product_attention", "batch_norm", "softmax")]
        expected = ", ".join(f"{k.replace('scaled_dot_product_attention', 'sdpa')} {v}"
                             for k, v in r["expected"].items())
        print(f"| {r['model']} ({r['target']}) | {r['ops'][0]} / {r['ops'][1]} | "
              + " | ".join(cells) + f" | {expected} {'ok' if r['structure_ok'] else 'NO'} | "
              f"{r['max_rel']:.1e} {'ok' if r['numbers_ok'] else 'OVER 1e-4'} |")
    if args.json:
        args.json.write_text(json.dumps(records, indent=2) + "\n")
    if not all(r["structure_ok"] and r["numbers_ok"] for r in records):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
