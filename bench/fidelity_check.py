"""Fidelity of built outputs on compare.py's three held-out samples, without the latency runs (minutes, not an hour).

    python bench/fidelity_check.py out/minilm-fast-jargon [more output folders] [--also RECIPE ...]

Each folder is a `bertpress compile` output named after its recipe. The samples are exactly bench/compare.py's: the
flagship's held-out WordNet slice, and 256 Python-docs and 256 held-out-fortunes texts outside every corpus that the
passes of the named recipes (the folders' recipes plus --also) train on. Deterministic, so its figures can be set
beside a committed bench/RESULTS.md when --also names that run's recipes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compare  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from compiler.frontend import load_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("outputs", nargs="+", type=Path)
    parser.add_argument("--also", nargs="*", default=[], help="recipes whose training texts the samples also avoid")
    args = parser.parse_args()
    names = sorted({p.name for p in args.outputs} | set(args.also))
    loaded = load_model(compare.MODEL)
    reference_run = compare.torch_run(loaded.model.eval())
    samples = {"WordNet slice": compare.heldout_texts()[0],
               "Python docs": compare.other_domain_texts(names, "builtin:python-docs", "Python-documentation texts")[0],
               "held-out fortunes": compare.other_domain_texts(names, "builtin:fortunes-heldout", "fortunes")[0]}
    references = {key: compare.embed(reference_run, loaded.tokenizer, texts) for key, texts in samples.items()}
    print(f"samples avoid the training texts of: {', '.join(names)}")
    print("| output | size MB | " + " | ".join(samples) + " |")
    print("|---|---|" + "---|" * len(samples))
    for folder in args.outputs:
        run = compare.ort_run(folder / "model.onnx", 2)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        cells = []
        for key, texts in samples.items():
            f = compare.fidelity(compare.embed(run, tokenizer, texts), references[key])
            cells.append(f"{f['cosine']:.4f} / {f['overlap10']:.3f}")
        print(f"| {folder.name} | {(folder / 'model.onnx').stat().st_size / 1e6:.1f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
