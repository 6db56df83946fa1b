"""Which buys cross-domain fidelity: the distillation's text or the heads the structure keeps? A 2 x 2 on the flagship.

bench/experiments/recipes/minilm-fast-wordnet-docstrings.yaml (12 heads, distilled on WordNet + Python's docstrings)
and bench/experiments/recipes/minilm-fast-wordnet.yaml (8 heads, WordNet alone) differ in two things at once. This
script compiles the four combinations of {12 heads, 8 heads} x {WordNet + docstrings, WordNet alone} from the flagship
recipe (recipes/minilm-fast.yaml, its distillation and vocabulary texts replaced), each with
the same shortened distillation (``--steps``; the text choice applies to distill and prune-vocab alike), and measures
each on the three held-out samples of bench/compare.py: the WordNet slice, Python documentation, the fortunes.
Short distillations rank the variants; they do not reach the flagship's figures (28800 steps). The pass store is
off unless BERTPRESS_PASS_STORE is set, so these builds do not evict the flagship's stored distillation.

    python bench/experiments/domain_ablation.py [--steps 1500] [--out-root out/domain-ablation] [--results bench/experiments/results/DOMAINS.md]
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Four short distillations would evict longer ones (the flagship's) from the pass store, which keeps 8 entries.
os.environ.setdefault("BERTPRESS_PASS_STORE", "off")

from compiler.compile import compile_recipe  # noqa: E402
from compiler.recipe import load_recipe_text  # noqa: E402

FLAGSHIP = ROOT / "recipes" / "minilm-fast.yaml"
MIXED = ["builtin:wordnet", "builtin:python-docstrings"]
VARIANTS = [  # (label, heads kept or None for all, training text)
    ("12 heads, WordNet + docstrings", None, MIXED),
    ("12 heads, WordNet alone", None, "builtin:wordnet"),
    ("8 heads, WordNet + docstrings", 8, MIXED),
    ("8 heads, WordNet alone", 8, "builtin:wordnet"),
]


def _compare_module():
    spec = importlib.util.spec_from_file_location("bench_compare", ROOT / "bench" / "compare.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def variant_recipe(base: dict, heads: int | None, texts, steps: int) -> dict:
    recipe = copy.deepcopy(base)
    passes = []
    for step in recipe["passes"]:
        (name, config), = step.items()
        if name == "distill":
            config.update(steps=steps, texts=texts)
        if name == "prune-vocab":
            config.update(texts=texts)
        passes.append({name: config})
        if name == "layer-drop" and heads is not None:
            passes.append({"prune-heads": {"keep": heads}})
    recipe["passes"] = passes
    return recipe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out-root", type=Path, default=ROOT / "out" / "domain-ablation")
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "experiments" / "results" / "DOMAINS.md")
    args = parser.parse_args()
    command = "python bench/experiments/domain_ablation.py " + " ".join(sys.argv[1:])
    compare = _compare_module()
    import torch
    from transformers import AutoTokenizer

    from compiler.frontend import load_model

    torch.set_num_threads(args.threads)
    base = yaml.safe_load(FLAGSHIP.read_text())
    loaded = load_model(base["model"])
    model, tokenizer = loaded.model.eval(), loaded.tokenizer
    held_out = compare.HeldOut(["minilm-fast", "minilm-fast-wordnet"], model, tokenizer)

    rows = []
    for label, heads, texts in VARIANTS:
        recipe = load_recipe_text(yaml.safe_dump(variant_recipe(base, heads, texts, args.steps), sort_keys=False),
                                  file=f"<{label}>", base_dir=FLAGSHIP.parent)
        out = args.out_root / label.replace(" ", "-").replace(",", "").replace("+", "and").lower()
        print(f"[domains] {label}: compiling -> {out}", flush=True)
        started = time.perf_counter()
        result = compile_recipe(recipe, out)
        seconds = time.perf_counter() - started
        row = {"label": label, "exit_code": result.exit_code, "seconds": round(seconds, 1)}
        if result.exit_code == 0:
            run = compare.ort_run(out / "model.onnx", args.threads)
            own_tokenizer = AutoTokenizer.from_pretrained(str(out))
            row["fidelity"] = held_out.measure(run, own_tokenizer)
            row["bytes"] = (out / "model.onnx").stat().st_size
            distill = next(p for p in result.report["passes"] if p["name"] == "distill")
            row["distill_cosine"] = distill["checks"].get("cosine")
        rows.append(row)
        print(f"[domains]   {json.dumps(row)}", flush=True)

    lines = ["# Distillation text vs kept heads (written by bench/experiments/domain_ablation.py)", "",
             f"Command: `{command}`", "",
             f"Each variant is recipes/minilm-fast.yaml with distill shortened to {args.steps} steps, its heads and its"
             " training text (distill and prune-vocab) as named; everything else as the flagship. Held-out samples"
             " (never trained on): " + "; ".join(held_out.labels) + ".",
             "Cells: mean cosine / top-10 neighbour overlap against PyTorch fp32 (mean-pooled), as bench/compare.py.", "",
             "| variant | size MB | compile s | WordNet slice | Python docs | fortunes |", "|---|---|---|---|---|---|"]
    for row in rows:
        if row["exit_code"] != 0:
            lines.append(f"| {row['label']} | - | {row['seconds']:.0f} | exit code {row['exit_code']} | - | - |")
            continue
        cells = held_out.cells(row["fidelity"])
        lines.append(f"| {row['label']} | {row['bytes'] / 1e6:.1f} | {row['seconds']:.0f} | {cells} |")
    args.results.write_text("\n".join(lines) + "\n")
    print(args.results.read_text())


if __name__ == "__main__":
    main()
