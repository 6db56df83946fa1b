"""Does the in-batch similarity loss (relational KD) carry distillation further on held-out text? An A/B on the flagship.

Each arm is recipes/minilm-fast.yaml with its distillation shortened to ``--steps`` and the similarity loss at one
weight of ``--weights`` (0 is the flagship's own loss mix: output + hidden + attention); everything else is the
flagship's. Each is measured on bench/compare.py's three held-out samples, drawn exactly as in the run of
bench/results/RESULTS.md (the WordNet slice; Python documentation and the held-out fortunes outside every text its six recipes
calibrate or train on). Short distillations rank the arms; they do not reach the flagship's figures (28800 steps).
The pass store is off unless BERTPRESS_PASS_STORE is set, so these builds do not evict a long distillation.

    python bench/experiments/loss_ablation.py [--steps 800] [--weights 0 20] [--out-root out/loss-ablation] [--results bench/experiments/results/LOSSES.md]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("BERTPRESS_PASS_STORE", "off")

import compare  # noqa: E402

from compiler.compile import compile_recipe  # noqa: E402
from compiler.recipe import load_recipe_text  # noqa: E402

FLAGSHIP = ROOT / "recipes" / "minilm-fast.yaml"
# The samples avoid what the recipes of bench/results/RESULTS.md's run calibrate and train on, as that run's did.
RESULTS_RECIPES = compare.results_recipes()


def arm_recipe(base: dict, steps: int, similarity: float) -> dict:
    recipe = copy.deepcopy(base)
    for step in recipe["passes"]:
        (name, config), = step.items()
        if name == "distill":
            config["steps"] = steps
            config["losses"] = {**config.get("losses", {}), "similarity": similarity}
    return recipe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--weights", type=float, nargs="+", default=[0.0, 20.0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out-root", type=Path, default=ROOT / "out" / "loss-ablation")
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "experiments" / "results" / "LOSSES.md")
    args = parser.parse_args()
    command = "python bench/experiments/loss_ablation.py " + " ".join(sys.argv[1:])
    import torch
    from transformers import AutoTokenizer

    from compiler import roofline
    from compiler.frontend import load_model

    torch.set_num_threads(args.threads)
    base = yaml.safe_load(FLAGSHIP.read_text())
    loaded = load_model(base["model"])
    model, tokenizer = loaded.model.eval(), loaded.tokenizer
    held_out = compare.HeldOut(RESULTS_RECIPES, model, tokenizer)

    rows = []
    for weight in args.weights:
        label = f"similarity {weight:g}"
        recipe = load_recipe_text(yaml.safe_dump(arm_recipe(base, args.steps, weight), sort_keys=False),
                                  file=f"<{label}>", base_dir=FLAGSHIP.parent)
        out = args.out_root / f"similarity-{weight:g}"
        print(f"[losses] {label}: compiling -> {out}", flush=True)
        started = time.perf_counter()
        result = compile_recipe(recipe, out)
        # An up-to-date build is reused (seconds); its report keeps what the compile took.
        took = (result.report or {}).get("timings", {}).get("total") or time.perf_counter() - started
        row = {"label": label, "exit_code": result.exit_code, "seconds": round(took, 1), "reused": result.up_to_date}
        if result.exit_code == 0:
            run = compare.ort_run(out / "model.onnx", args.threads)
            own_tokenizer = AutoTokenizer.from_pretrained(str(out))
            row["fidelity"] = held_out.measure(run, own_tokenizer)
            distill = next(p for p in result.report["passes"] if p["name"] == "distill")
            row["seconds_per_step"] = distill["details"].get("seconds_per_step")
            last = distill["details"]["curve"][-1]
            row["final_terms"] = {k: last[k] for k in ("output", "hidden", "attention", "similarity") if k in last}
        rows.append(row)
        print(f"[losses]   {json.dumps(row)}", flush=True)

    cpu = roofline.machine(args.threads).cpu
    lines = ["# In-batch similarity loss, A/B on the flagship (written by bench/experiments/loss_ablation.py)", "",
             f"Command: `{command}` ({cpu}, {args.threads} threads)", "",
             f"Each arm is recipes/minilm-fast.yaml with distill shortened to {args.steps} steps and the similarity loss"
             " (MSE between the teacher's and the student's in-batch matrices of pairwise cosines of the pooled"
             " embeddings) at the weight named; output, hidden and attention losses at 1 as in the flagship. Held-out"
             " samples (never trained on), bench/results/RESULTS.md's (\"this run\" below: its recipes "
             + ", ".join(RESULTS_RECIPES) + "): " + "; ".join(held_out.labels) + ".",
             "Compile seconds are each build's own (a rerun reuses an up-to-date build and reads them from its report).",
             "Cells: mean cosine / top-10 neighbour overlap against PyTorch fp32 (mean-pooled), as bench/compare.py."
             " Last loss terms: the training curve's last running means (unweighted).", "",
             "| arm | compile s | s/step | WordNet slice | Python docs | held-out fortunes | last loss terms |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        if row["exit_code"] != 0:
            lines.append(f"| {row['label']} | {row['seconds']:.0f} | - | exit code {row['exit_code']} | - | - | - |")
            continue
        cells = held_out.cells(row["fidelity"])
        terms = ", ".join(f"{k} {v:.4f}" for k, v in row["final_terms"].items())
        lines.append(f"| {row['label']} | {row['seconds']:.0f} | {row['seconds_per_step']} | {cells} | {terms} |")
    args.results.write_text("\n".join(lines) + "\n")
    print(args.results.read_text())


if __name__ == "__main__":
    main()
