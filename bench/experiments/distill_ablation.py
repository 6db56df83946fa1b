"""Which parts of distillation pay: losses, training text and schedule, on MiniLM with 2 blocks dropped and 6 heads kept.

Two stages, each written to bench/experiments/results/DISTILL.md as soon as it finishes:

1. ``bench/experiments/recipes/minilm-distill.yaml`` compiled end to end (it takes minutes, so this script is what compiles
   it): held-out cosine before and after the distill pass, from the compile report.
2. The ablation: one student (layer-drop count 2 + prune-heads keep 6, chosen on Python-docs calibration
   text) distilled with each configuration for the same number of steps; held-out cosine measured on
   64 Python-docs texts and 64 WordNet glosses that no run trains on. Training on one corpus and
   reading the other column is the cross-domain number.

Every run uses one intra-op thread: the 2 cores are shared with other jobs, and two threads thrashing
against them made steps several times slower. Times are wall-clock and the load average is printed.

    python bench/experiments/distill_ablation.py [--steps 100] [--skip-recipe] [--skip-ablation]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from compiler.calibration import CalibrationData, prepare_calibration  # noqa: E402
from compiler.frontend import example_inputs, load_model, trace  # noqa: E402
from compiler.pass_infra import PassContext, get_pass  # noqa: E402
from compiler.pass_manager import StructureCache  # noqa: E402
from compiler.validation import compare, hidden_states, run_batches  # noqa: E402

RECIPE = ROOT / "bench" / "experiments" / "recipes" / "minilm-distill.yaml"
OUT = ROOT / "bench" / "experiments" / "results" / "DISTILL.md"

# (label, training text, loss weights, extra options)
RUNS = [
    ("output only", "builtin", {"output": 1, "hidden": 0, "attention": 0}, {}),
    ("output + hidden", "builtin", {"output": 1, "hidden": 1, "attention": 0}, {}),
    ("output + hidden + attention", "builtin", {"output": 1, "hidden": 1, "attention": 1}, {}),
    ("output only", "builtin:wordnet", {"output": 1, "hidden": 0, "attention": 0}, {}),
    ("output + hidden", "builtin:wordnet", {"output": 1, "hidden": 1, "attention": 0}, {}),
    ("output + hidden + attention", "builtin:wordnet", {"output": 1, "hidden": 1, "attention": 1}, {}),
    ("output + hidden + attention, layer_map kept", "builtin:wordnet", {"output": 1, "hidden": 1, "attention": 1},
     {"layer_map": "kept"}),
    ("output + hidden + attention, lr 1e-4", "builtin:wordnet", {"output": 1, "hidden": 1, "attention": 1},
     {"lr": 1e-4}),
    # 1500 texts per source: about all Python-docs sentences and as many glosses (as the recipe).
    ("output + hidden + attention", ["builtin", "builtin:wordnet"], {"output": 1, "hidden": 1, "attention": 1},
     {"samples": 3000}),
    ("output + hidden + attention, packed", ["builtin", "builtin:wordnet"], {"output": 1, "hidden": 1, "attention": 1},
     {"samples": 3000, "pack": True}),
]


def load() -> str:
    return " / ".join(f"{x:.1f}" for x in os.getloadavg())


def run_pass(name, options, gm, loaded, calibration, progress=None):
    cls = get_pass(name)
    ctx = PassContext(structure_of=StructureCache(), calibration=calibration, reference=loaded.model,
                      tokenizer=loaded.tokenizer, model_config=loaded.config, lowering={},
                      progress=progress or (lambda **_: None))
    return cls(cls.Config.model_validate(options)).run(gm, ctx)


def stage_recipe(sections: dict) -> None:
    from compiler.compile import compile_recipe
    from compiler.recipe import load_recipe

    out = ROOT / "out" / "minilm-distill"
    started, load_before = time.perf_counter(), load()

    def show(event, payload):
        if event == "pass_progress" and payload["step"] % 25 == 0:
            print(f"    step {payload['step']}/{payload['total']} loss {payload['loss']:.4f}"
                  f" monitor cosine {payload['fidelity']:.4f}", flush=True)
        elif event == "pass_end":
            rec = payload["record"]
            print(f"  {rec.name}: {rec.status} cosine {rec.checks.get('cosine')} ({rec.seconds:.0f}s)", flush=True)

    result = compile_recipe(load_recipe(RECIPE), out, instruments=[show], progress=lambda m: print(" ", m, flush=True))
    report = result.report
    rows = ["| pass | status | held-out cosine after | seconds |", "|---|---|---|---|"]
    for rec in report["passes"]:
        rows.append(f"| {rec['name']} | {rec['status']} | {rec['checks'].get('cosine', '-')} | {rec['seconds']:.0f} |")
    distill = next(r for r in report["passes"] if r["name"] == "distill")
    before, after = distill["checks"].get("cosine_before"), distill["checks"].get("cosine")
    closed = (after - before) / (1 - before) if before is not None and after is not None else None
    final = report.get("final_check") or {}
    details = distill["details"]
    sections["recipe"] = "\n".join([
        f"## `{RECIPE.relative_to(ROOT)}`, compiled by this script (exit code {report['exit_code']})", "",
        *rows, "",
        f"Held-out cosine (64 Python-docs texts, never trained on; distill trains on {details.get('texts')}): "
        f"**{before} before distill -> {after} after** ({closed:.0%} of the gap to 1.0 closed)." if closed is not None
        else "Distill did not report before/after cosines.",
        f"Distill: {details.get('steps')} steps in {details.get('seconds')} s ({details.get('seconds_per_step')} s/step),"
        f" {details.get('training_texts')} training texts, layer map {details.get('layer_map')},"
        f" student heads {details.get('student_heads')}.",
        f"Final ONNX Runtime check: held-out cosine {final.get('cosine')}"
        f" (passed: {final.get('passed')}). Whole compile {time.perf_counter() - started:.0f} s;"
        f" load average before / after: {load_before} | {load()}.",
    ])


def _texts_label(texts) -> str:
    return texts if isinstance(texts, str) else " + ".join(texts)


def table_rows(section: str) -> dict[tuple[str, str], str]:
    """Result rows of an earlier ablation table, keyed by (run, trained on), so --only reruns replace just theirs."""
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cells) == 8 and cells[2].isdigit() and cells[2] != "0":
            rows[(cells[0], cells[1])] = line
    return rows


def stage_ablation(sections: dict, steps: int, only: list[int] | None) -> None:
    previous_rows = table_rows(sections.get("ablation", ""))
    loaded = load_model("builtin:minilm-l6")
    gm = trace(loaded.model, example_inputs(loaded.tokenizer), max_length=loaded.max_length)
    docs = prepare_calibration(loaded.tokenizer, source="builtin", samples=256, validation_samples=64, max_length=128,
                               batch_size=16, seed=0, model_max_length=loaded.max_length)
    wordnet = prepare_calibration(loaded.tokenizer, source="builtin:wordnet", samples=8, validation_samples=64,
                                  max_length=128, batch_size=16, seed=0, model_max_length=loaded.max_length)
    heldout = {"python docs": docs.heldout_batches, "wordnet": wordnet.heldout_batches}
    reference = {name: run_batches(hidden_states(loaded.model), batches) for name, batches in heldout.items()}

    def cosines(module) -> dict[str, float]:
        return {name: compare(reference[name], run_batches(hidden_states(module), batches), batches).cosine
                for name, batches in heldout.items()}

    drop = run_pass("layer-drop", {"count": 2}, gm, loaded, docs)
    heads = run_pass("prune-heads", {"keep": 6}, gm, loaded, docs)
    before = cosines(gm)
    print(f"student: dropped {drop.details['dropped']}, heads after {heads.details.get('heads_after')};"
          f" held-out cosine {before}", flush=True)
    # Both held-out slices are removed from every run's training text.
    training = CalibrationData(texts=docs.texts, heldout_texts=docs.heldout_texts + wordnet.heldout_texts,
                               batches=docs.batches, heldout_batches=docs.heldout_batches, truncated=0)
    rows = dict(previous_rows)
    header = ["| run | trained on | steps | s/step | held-out python docs | held-out wordnet | gap closed (docs / wordnet) | load |",
              "|---|---|---|---|---|---|---|---|",
              f"| student before distill (drop {drop.details['dropped']}, 6 heads) | - | 0 | - | {before['python docs']:.4f} |"
              f" {before['wordnet']:.4f} | - | - |"]
    for index, (label, texts, weights, extra) in enumerate(RUNS):
        if only and index not in only:
            continue
        student = copy.deepcopy(gm)
        options = {"steps": steps, "batch_size": 16, "max_length": 64, "lr": 5e-4, "warmup": 0.1, "schedule": "linear",
                   "texts": texts, "samples": 20000, "losses": weights, **extra}
        load_before = load()
        result = run_pass("distill", options, student, loaded, training)
        after = cosines(student)
        closed = {k: (after[k] - before[k]) / (1 - before[k]) for k in after}
        key = (label, _texts_label(texts))
        rows[key] = (f"| {key[0]} | {key[1]} | {steps} | {result.details['seconds_per_step']:.2f} |"
                     f" {after['python docs']:.4f} | {after['wordnet']:.4f} |"
                     f" {closed['python docs']:+.0%} / {closed['wordnet']:+.0%} | {load_before} |")
        print(rows[key], flush=True)
        sections["ablation"] = "\n".join([
            f"## Ablation: {steps} steps each (batch 16, length 64, AdamW lr 5e-4 unless noted, 10% warmup, linear decay)", "",
            "Student: MiniLM-L6 with the 2 least important blocks dropped and 6 of 12 heads kept per layer"
            " (gradient importance, bias compensation), chosen on Python-docs calibration text."
            " Held-out: 64 Python-docs sentences and 64 WordNet glosses, removed from all training text."
            " `builtin` = Python reference documentation sentences; `builtin:wordnet` = WordNet glosses.", "",
            *header, *rows.values()])
        write(sections)


def write(sections: dict) -> None:
    text = ["# Distillation results (written by bench/experiments/distill_ablation.py)", "",
            f"torch {torch.__version__}, {torch.get_num_threads()} intra-op thread(s), 2 shared CPU cores;"
            " load average = 1 / 5 / 15-minute.", ""]
    for key in ("recipe", "ablation"):
        if key in sections:
            text += [sections[key], ""]
    OUT.write_text("\n".join(text))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100, help="steps of each ablation run")
    parser.add_argument("--only", type=int, nargs="*", help="indices of the ablation runs to do")
    parser.add_argument("--skip-recipe", action="store_true")
    parser.add_argument("--skip-ablation", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    sections: dict = {}
    if OUT.is_file():
        previous = OUT.read_text()
        for key, marker in (("recipe", "## `"), ("ablation", "## Ablation")):
            if marker in previous:
                sections[key] = marker + previous.split(marker, 1)[1].split("\n## ", 1)[0].rstrip()
    if not args.skip_recipe:
        stage_recipe(sections)
        write(sections)
        print(sections["recipe"], flush=True)
    if not args.skip_ablation:
        stage_ablation(sections, args.steps, args.only)
        write(sections)


if __name__ == "__main__":
    main()
