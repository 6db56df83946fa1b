"""Where a compiled model loses fidelity on one held-out sample: by text length and by how its pruned vocabulary splits.

Takes bench/compare.py's other-domain sample (the same texts, seed and exclusions as its table for the recipes named),
embeds it with the reference (PyTorch fp32) and with the output folder's model.onnx and tokenizer, and prints the mean
cosine per length band (tokens under the original tokenizer, up to compare.py's 128) and for the texts the output's
tokenizer splits into the same or into other word pieces than the original's (prune-vocab maps dropped pieces to
shorter ones or [UNK]).

    python bench/experiments/fidelity_breakdown.py out/minilm-fast [--source builtin:fortunes-heldout] [--recipes minilm-fast ...]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

BANDS = [(0, 16), (16, 32), (32, 64), (64, 129)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("output", type=Path, help="a bertpress output folder (model.onnx + tokenizer)")
    parser.add_argument("--source", default="builtin:fortunes-heldout")
    parser.add_argument("--recipes", nargs="+", default=None,
                        help="recipes whose calibration and training texts the sample leaves out (default: the folder's name)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    spec = importlib.util.spec_from_file_location("bench_compare", ROOT / "bench" / "compare.py")
    compare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compare)
    from transformers import AutoTokenizer

    from compiler.frontend import load_model

    loaded = load_model(compare.MODEL)
    tokenizer, model = loaded.tokenizer, loaded.model.eval()
    output_tokenizer = AutoTokenizer.from_pretrained(str(args.output))
    texts, label = compare.other_domain_texts(args.recipes or [args.output.name], args.source, "texts")
    reference = compare.embed(compare.torch_run(model), tokenizer, texts)
    mine = compare.embed(compare.ort_run(args.output / "model.onnx", args.threads), output_tokenizer, texts)
    a = mine / np.linalg.norm(mine, axis=1, keepdims=True)
    b = reference / np.linalg.norm(reference, axis=1, keepdims=True)
    cosine = (a * b).sum(1)

    def pieces(tok, text):
        return tok(text, truncation=True, max_length=compare.SEQ)["input_ids"]

    lengths = np.array([len(pieces(tokenizer, t)) for t in texts])
    same = np.array([tokenizer.convert_ids_to_tokens(pieces(tokenizer, t))
                     == output_tokenizer.convert_ids_to_tokens(pieces(output_tokenizer, t)) for t in texts])
    print(f"{args.output}: {label}")
    print(f"| texts | n | mean cosine |\n|---|---|---|\n| all | {len(texts)} | {cosine.mean():.4f} |")
    for lo, hi in BANDS:
        band = (lengths >= lo) & (lengths < hi)
        if band.any():
            print(f"| {lo}-{hi - 1} tokens | {band.sum()} | {cosine[band].mean():.4f} |")
    for name, rows in (("same word pieces as the original", same), ("other word pieces", ~same)):
        if rows.any():
            print(f"| {name} | {rows.sum()} | {cosine[rows].mean():.4f} |")


if __name__ == "__main__":
    main()
