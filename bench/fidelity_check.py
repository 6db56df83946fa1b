"""Fidelity of built outputs on compare.py's three held-out samples, without the latency runs (minutes, not an hour).

    python bench/fidelity_check.py out/minilm-fast-jargon [more output folders] [--also RECIPE ...]

Each folder is a `bertpress compile` output named after its recipe. The samples are exactly bench/compare.py's: the
flagship's held-out WordNet slice, and 256 Python-docs and 256 held-out-fortunes texts outside every corpus that the
passes of the named recipes (the folders' recipes plus --also) train on. Deterministic, so its figures can be set
beside a committed bench/results/RESULTS.md when --also names that run's recipes.
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
    held_out = compare.HeldOut(names, loaded.model.eval(), loaded.tokenizer)
    print(f"samples avoid the training texts of: {', '.join(names)}")
    print("| output | size MB | " + " | ".join(compare.SAMPLES.values()) + " |")
    print("|---|---|" + "---|" * len(compare.SAMPLES))
    for folder in args.outputs:
        measured = held_out.measure(compare.ort_run(folder / "model.onnx", 2), AutoTokenizer.from_pretrained(folder))
        print(f"| {folder.name} | {(folder / 'model.onnx').stat().st_size / 1e6:.1f} | {held_out.cells(measured)} |")


if __name__ == "__main__":
    main()
