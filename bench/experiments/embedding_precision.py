"""What storing MiniLM's embedding tables in fp16, int8 or int4 costs in fidelity, and what it saves in bytes.

Each setting runs quantize-embeddings alone on the real all-MiniLM-L6-v2 through the pass manager, as a compile
does, and reports the pass's held-out check (mean-pooled cosine against the fp32 reference on held-out texts the
pass never calibrated on: ``--heldout`` Python-documentation paragraphs and the same number of WordNet glosses, in
two runs) and the tables' bytes from the cost model (what lowering writes).

    python bench/experiments/embedding_precision.py [--heldout 256]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

SETTINGS = [
    "{dtype: fp16}",
    "{dtype: int8, tables: [word]}",
    "{dtype: int8}",
    "{dtype: int4, tables: [word], block_size: 16}",
    "{dtype: int4, tables: [word], block_size: 32}",
    "{dtype: int4, tables: [word], block_size: 64}",
    "{dtype: int4, tables: [word], block_size: 128}",
    "{dtype: int4, block_size: 32}",
]


def main() -> None:
    from compiler.calibration import prepare_calibration
    from compiler.frontend import example_inputs, load_model, trace
    from compiler.pass_manager import PassManager
    from compiler.recipe import load_recipe_text

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heldout", type=int, default=256)
    args = parser.parse_args()
    loaded = load_model("builtin:minilm-l6")
    sources = {"Python docs": "builtin:python-docs", "WordNet": "builtin:wordnet"}
    calibrations = {name: prepare_calibration(loaded.tokenizer, source=source, samples=16, validation_samples=args.heldout,
                                              max_length=128, batch_size=32, seed=0, model_max_length=loaded.max_length)
                    for name, source in sources.items()}
    print(f"| quantize-embeddings | embedding bytes (MB) | {' | '.join(f'cosine on {n} (min)' for n in sources)} |")
    print("|---|---|" + "---|" * len(sources))
    for options in SETTINGS:
        cells, size = [], None
        for name, calibration in calibrations.items():
            gm = trace(loaded.model, example_inputs(loaded.tokenizer), max_length=loaded.max_length)
            recipe = load_recipe_text(f"budget: {{min: 0.5}}\npasses:\n  - quantize-embeddings: {options}\n", file="bench")
            manager = PassManager(recipe, calibration, loaded.model, loaded.tokenizer, loaded.config)
            _, (record,) = manager.run(gm)
            size = record.cost_after["by_component"]["embeddings"]["bytes"]
            before = record.cost_before["by_component"]["embeddings"]["bytes"]
            cells.append(f"{record.checks['cosine']:.5f} ({record.checks['cosine_min']:.4f})")
        print(f"| `{options}` | {size / 1e6:.2f} (fp32 {before / 1e6:.2f}) | {' | '.join(cells)} |", flush=True)


if __name__ == "__main__":
    main()
