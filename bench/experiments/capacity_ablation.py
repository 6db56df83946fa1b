"""Which of the flagship's compressions costs its fidelity off the distillation text? Undo one at a time.

The flagship (recipes/minilm-fast.yaml) compresses MiniLM three ways before distilling: it drops 2 of 6 blocks, keeps
960 of 1536 FFN neurons and factorizes the word table (rank 128). It keeps more cosine on the held-out WordNet slice
(the kind of text it distills on) than on Python documentation and held-out fortunes (bench/results/RESULTS.md). This
script builds the flagship's structure and three variants that each undo one compression, every one with the same shortened
distillation on the flagship's text, and measures each on bench/compare.py's three held-out samples (the same texts as
bench/results/RESULTS.md), with its size and its speed against the plain fp32 export in one interleaved timing run. If
undoing a compression closes the off-domain gap at equal training, that compression is what stands in the way; what it
costs in speed or size is in the same table. One more variant (``--variants ... deep``) trades width for depth at the
flagship's FLOPs: all 6 blocks, each with 8 heads and 640 FFN neurons (``deep256``: with rank256's word table). Three
more (``int4rows rank256 table4``) spend the bytes int4 word-table rows save (quantize-embeddings dtype int4) on a
wider table: the flagship's rank-128 table in int4, a rank-256 table in int4 (block 64: about the flagship's bytes)
and the full table in int4; with the pass store on (BERTPRESS_PASS_STORE set), ``int4rows`` replays the flagship's
distillation and differs from it only in how the table is stored. Two more (``vocab9 table4v9``) spend rows instead:
the full table in int4 fits the flagship's bytes only with the word pieces its texts use 9 times or more; ``vocab9``
is the flagship's structure with that vocabulary (a replay, with the store on), ``table4v9`` the full int4 table with
it. ``len128`` distills the flagship's structure on its texts cut at 128 tokens instead of 64. Four (``r256once
r256latin r256all r192latin``) go the other way, more rows: the rank-256 int4 table with the pieces used once, every
Latin-alphabet piece (prune-vocab keep_latin) or every row (over the 10x budget; replays of ``rank256``'s distillation
with the store on), and every Latin piece at rank 192 (within it).

Short distillations rank the variants; they do not reach the flagship's figures (28800 steps). Two lengths (--steps)
show whether a variant's lead holds with more training or only reflects a head start. The pass store is off unless
BERTPRESS_PASS_STORE is set, so these builds do not evict the flagship's stored distillation. Builds are kept under
--out-root and reused when their recipe text is unchanged (--fresh rebuilds), so an interrupted run resumes.

    python bench/experiments/capacity_ablation.py [--steps 3000 1000] [--variants flagship blocks ffn table deep] [--rounds32 7]
                                     [--results bench/experiments/results/CAPACITY.md]
    BERTPRESS_PASS_STORE=/tmp/store python bench/experiments/capacity_ablation.py --steps 1000 \
        --variants flagship int4rows rank256 table4 --results bench/experiments/results/TABLES.md
    BERTPRESS_PASS_STORE=/tmp/store python bench/experiments/capacity_ablation.py --steps 3000 \
        --variants flagship int4rows rank256 vocab9 table4v9 --rounds32 9 --results bench/experiments/results/TABLES-3000.md
    BERTPRESS_PASS_STORE=/tmp/store python bench/experiments/capacity_ablation.py --steps 3000 \
        --variants flagship rank256 r256latin r192latin --rounds32 9 --results bench/experiments/results/LATIN-3000.md
    BERTPRESS_PASS_STORE=/tmp/store python bench/experiments/capacity_ablation.py --steps 28800 \
        --variants rank256 r256once r256all --rounds32 9 --results bench/experiments/results/ROWS-28800.md
    BERTPRESS_PASS_STORE=/tmp/store python bench/experiments/capacity_ablation.py --steps 3000 \
        --variants flagship rank256 --rounds32 15 --results bench/experiments/results/VNNI-3000.md
    BERTPRESS_PASS_STORE=/tmp/store python bench/experiments/capacity_ablation.py --steps 28800 \
        --variants r192latin --rounds32 15 --results bench/experiments/results/LATIN-28800.md
    BERTPRESS_PASS_STORE=/tmp/store python bench/experiments/capacity_ablation.py --steps 28800 \
        --variants deep --rounds32 15 --results bench/experiments/results/DEEP-28800.md
    BERTPRESS_PASS_STORE=/tmp/store python bench/experiments/capacity_ablation.py --steps 28800 \
        --variants deep256 --rounds32 15 --results bench/experiments/results/DEEP256-28800.md
    BERTPRESS_PASS_STORE=/tmp/store python bench/experiments/capacity_ablation.py --steps 28800 \
        --variants deep256j --rounds32 15 --results bench/experiments/results/DEEP256J-28800.md
    BERTPRESS_PASS_STORE=/tmp/store python bench/experiments/capacity_ablation.py --steps 3000 \
        --variants deep256mid deep256ma --rounds32 9 --results bench/experiments/results/AUSTEN-3000.md
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Eight short distillations would evict longer ones (the flagship's) from the pass store, which keeps 8 entries.
STORE_GIVEN = os.environ.get("BERTPRESS_PASS_STORE")
os.environ.setdefault("BERTPRESS_PASS_STORE", "off")

import compare  # noqa: E402

FLAGSHIP = ROOT / "recipes" / "minilm-fast.yaml"
# The samples avoid what the recipes of bench/results/RESULTS.md's run calibrate and train on, so the figures sit beside it.
RESULTS_RECIPES = compare.results_recipes()


def int4_word_table(label: str, block_size: int, leave_out: tuple = (), changes: dict | None = None,
                    added: list | None = None, before: str | None = None) -> tuple:
    """A VARIANTS value whose word table is stored in int4 rows (a scale per ``block_size`` columns) by a last
    quantize-embeddings step (``before``: placed before that pass instead), the position and token-type tables in int8
    as before; ``changes`` and ``added`` (passes it adds first) as in VARIANTS."""
    return (label, leave_out, {**(changes or {}), "quantize-embeddings": {"tables": ["position", "token_type"]}},
            list(added or []),
            [{"quantize-embeddings": {"dtype": "int4", "tables": ["word"], "block_size": block_size}}], before)


# deep's structure (6 blocks of 8 heads and FFN 640) with rank256's word table, which the deep256 variants share.
DEEP256 = {"leave_out": ("layer-drop",), "added": [{"prune-heads": {"keep": 8}}],
           "changes": {"prune-ffn": {"keep": 640}, "budget": {"min": 0.3}, "low-rank": {"rank": 256}}}
# minilm-fast-jargon's distillation text: the flagship's three sources and the Jargon File's sentences, up to 75,000
# texts each (distill gives a source without weights samples / sources texts, or all it has: WordNet 75,000 of its
# 153,390, and every one of the 12,487 docstring sentences, 8,578 training fortunes and 8,043 jargon sentences).
JARGON = {"texts": ["builtin:wordnet", "builtin:python-docstrings", "builtin:fortunes-train", "builtin:jargon"],
          "samples": 300000}

# Jane Austen's six novels (all 27,704 sentences) as a fourth source beside the flagship's three: narrative and dialogue about people,
# families and marriage, the everyday life the held-out fortunes are about, in another genre (no 8-word run of theirs
# is in any of the three held-out samples).
AUSTEN = {"texts": ["builtin:wordnet", "builtin:python-docstrings", "builtin:fortunes-train", "builtin:austen"],
          "samples": 300000}
JARGON_AUSTEN = {"texts": JARGON["texts"] + ["builtin:austen"], "samples": 375000}
MID = {"losses": {"output": 1.0, "hidden": 4.0, "attention": 4.0}}


def deep256(label: str, distill: dict | None = None, before: str | None = None) -> tuple:
    """A VARIANTS value on deep256: its structure and int4 word table, ``distill`` options changed, the int4 step
    ``before`` a pass (as int4_word_table)."""
    changes = {**DEEP256["changes"], **({"distill": distill} if distill else {})}
    return int4_word_table(label, 64, leave_out=DEEP256["leave_out"], added=DEEP256["added"], changes=changes,
                           before=before)


VARIANTS = {  # key -> (label, the flagship's passes it leaves out, {pass: options it changes}, passes it adds first
    #         [, passes it adds last [, the pass they go before instead]])
    "flagship": ("flagship structure (4 blocks, FFN 960, rank-128 word table)", (), {}, []),
    "blocks": ("all 6 blocks kept", ("layer-drop",), {}, []),
    "ffn": ("all 1536 FFN neurons kept", ("prune-ffn",), {}, []),
    "table": ("full word table kept (no low-rank)", ("low-rank",), {}, []),
    # Depth for width at the flagship's FLOPs: 6 blocks x (8 heads, FFN 640) has as many multiply-adds per token in its
    # linears as 4 x (12 heads, FFN 960). Pruning that much starts lower, so its budget is lowered for the passes
    # before distill heals them (the flagship's structural passes end at 0.69).
    "deep": ("6 blocks, 8 heads, FFN 640 (the flagship's linear FLOPs)", ("layer-drop",),
             {"prune-ffn": {"keep": 640}, "budget": {"min": 0.3}}, [{"prune-heads": {"keep": 8}}]),
    # Both levers that lead at 28800 steps off WordNet together: deep's structure with rank256's word table.
    "deep256": deep256("6 blocks, 8 heads, FFN 640, rank-256 word table in int4 rows (block 64)"),
    # deep256 with a fourth distillation text, the Jargon File's casual prose (as minilm-fast-jargon adds it to the
    # flagship), as in JARGON; the vocabulary cut keeps the flagship's three texts'
    # word pieces, so the size stays deep256's (the jargon's extra rows would cost the 10x).
    "deep256j": deep256("deep256, the Jargon File's sentences added to the distillation text", JARGON),
    # deep256's distillation trained differently, at its texts and steps: the pooled-embedding loss (what the held-out
    # cosine measures) weighted 4 against the per-layer hidden-state and attention losses, or alone (which also skips
    # recomputing the attention maps), or a quarter of them, or a peak learning rate of 1e-3 or 2.5e-4 instead of 5e-4
    # (chosen at 100 steps).
    "deep256out4": deep256("deep256, pooled-embedding loss weighted 4 (hidden and attention 1)",
                           {"losses": {"output": 4.0, "hidden": 1.0, "attention": 1.0}}),
    "deep256out": deep256("deep256, pooled-embedding loss alone (no hidden or attention loss)",
                          {"losses": {"output": 1.0, "hidden": 0.0, "attention": 0.0}}),
    "deep256mid": deep256("deep256, hidden-state and attention losses weighted 4 (pooled embedding 1)",
                          MID),
    "deep256lr": deep256("deep256, peak learning rate 1e-3", {"lr": 1.0e-3}),
    "deep256lr25": deep256("deep256, peak learning rate 2.5e-4", {"lr": 2.5e-4}),
    # deep256 with its int4 word-table rows simulated while it distills (the int4 step before distill instead of last):
    # distill trains the table through the rounding (straight-through), as qat does the int8 linears. Placed after
    # distill, the int4 step costs held-out cosine that distill cannot heal (its check in the compile report).
    "deep256q": deep256("deep256, distilled through its int4 word-table rows", before="distill"),
    "deep256jq": deep256("deep256j, distilled through its int4 word-table rows", JARGON, before="distill"),
    # All that led at 3000 steps or 28800 together: the Jargon File, the int4 rows trained through, the intermediate
    # losses weighted 4.
    "deep256jqm": deep256("deep256j, distilled through its int4 rows, hidden-state and attention losses weighted 4",
                          {**JARGON, **MID}, before="distill"),
    # The flagship's texts plus Jane Austen's novels, with the per-layer losses weighted 4 (deep256mid's, the best way
    # to train deep256 at 3000 steps): what a fourth text of everyday narrative English buys off WordNet.
    "deep256ma": deep256("deep256mid, Jane Austen's novels added to the distillation text", {**AUSTEN, **MID}),
    # deep256ma's four sources in shares set by weights instead of by corpus size (WordNet 61%, docstrings 10%,
    # fortunes 7%, Austen 22% there): WordNet 45%, the docstrings 20% and the training fortunes 15% (each repeated about
    # twice), Austen 20%, so the two small texts nearest the held-out docs and fortunes carry twice their share.
    "deep256mw": deep256("deep256ma, texts weighted: WordNet 0.45, docstrings 0.2, fortunes 0.15, Austen 0.2",
                         {**AUSTEN, **MID, "samples": 125000, "weights": [0.45, 0.2, 0.15, 0.2]}),
    # Both extra texts that helped off WordNet (the Jargon File: docs at 28800 steps; Austen: fortunes at 3000) and
    # deep256mid's losses: five sources, up to 75,000 texts each as in deep256j and deep256ma.
    "deep256jam": deep256("deep256mid, the Jargon File's and Jane Austen's sentences added to the distillation text",
                          {**JARGON_AUSTEN, **MID}),
    # Word-table storage against width: int4 rows (quantize-embeddings dtype int4, position and token-type tables
    # stay int8) spend the bytes int8 rows of the rank-128 table take on a wider table. The int4 step runs last.
    "int4rows": int4_word_table("rank-128 word table in int4 rows (block 32)", 32),
    "rank256": int4_word_table("rank-256 word table in int4 rows (block 64)", 64, changes={"low-rank": {"rank": 256}}),
    "table4": int4_word_table("full word table in int4 rows (block 32)", 32, leave_out=("low-rank",)),
    # Rows against width: a full int4 table fits the flagship's bytes only with about 15,000 rows, the word pieces its
    # training texts use 9 times or more (22,190 are used twice). vocab9 measures what that cut costs the flagship's
    # structure (with the pass store on it replays the flagship's distillation); table4v9 is the full int4 table with it.
    "vocab9": ("flagship structure, word pieces used 9 times or more", (), {"prune-vocab": {"min_count": 9}}, []),
    "table4v9": int4_word_table("full word table in int4 rows (block 64), word pieces used 9 times or more", 64,
                                leave_out=("low-rank",), changes={"prune-vocab": {"min_count": 9}}),
    # Length: distill cuts its texts at 64 tokens, and the flagship's held-out texts of 64 tokens or more score lowest
    # (bench/experiments/fidelity_breakdown.py). len128 distills the flagship's structure on the same texts cut at 128.
    "len128": ("flagship structure, distilled on texts up to 128 tokens", (), {"distill": {"max_length": 128}}, []),
    # Rows against rank, the other way: the vocabulary cut costs minilm-fast-r256 most off WordNet
    # (bench/experiments/results/ROWS-28800.md). Every Latin-alphabet row (27,734) fits
    # the flagship's bytes at rank 192 in int4. r256once, r256latin and r256all (over the 10x budget; replays of
    # rank256's distillation with the store on) show what more rows buy at rank 256, r192latin what they cost in rank.
    "r256once": int4_word_table("rank-256 int4 word table, word pieces used once or more", 64,
                                changes={"low-rank": {"rank": 256}, "prune-vocab": {"min_count": 1}}),
    "r256all": int4_word_table("rank-256 int4 word table, every row kept (no prune-vocab)", 64,
                               leave_out=("prune-vocab",), changes={"low-rank": {"rank": 256}}),
    "r256latin": int4_word_table("rank-256 int4 word table, every Latin-alphabet row kept", 64,
                                 changes={"low-rank": {"rank": 256}, "prune-vocab": {"keep_latin": True}}),
    "r192latin": int4_word_table("rank-192 int4 word table, every Latin-alphabet row kept", 64,
                                 changes={"low-rank": {"rank": 192}, "prune-vocab": {"keep_latin": True}}),
}


def variant_recipe(base: dict, variant: tuple, steps: int) -> dict:
    """The flagship recipe as ``variant`` (a VARIANTS value) says, its distillation shortened to ``steps``."""
    _, leave_out, changes, added, *rest = variant
    appended, before = (list(rest) + [[], None])[:2]
    recipe = copy.deepcopy(base)
    if "budget" in changes:
        recipe["budget"] = {**recipe["budget"], **changes["budget"]}
    passes = copy.deepcopy(added)
    for step in recipe["passes"]:
        (name, config), = step.items()
        if name in leave_out:
            continue
        config.update(changes.get(name, {}))
        if name == "distill":
            config["steps"] = steps
        if name == before:
            passes += copy.deepcopy(appended or [])
        passes.append({name: config})
    recipe["passes"] = passes + ([] if before else copy.deepcopy(appended or []))
    return recipe


def build(key: str, steps: int, base: dict, out_root: Path, fresh: bool) -> dict:
    """Compile one variant (or reuse its earlier build of the same recipe text); a row of what it gave."""
    from compiler.compile import compile_recipe
    from compiler.recipe import load_recipe_text

    label = VARIANTS[key][0]
    text = yaml.safe_dump(variant_recipe(base, VARIANTS[key], steps), sort_keys=False)
    out = out_root / f"{key}-{steps}"
    row = {"key": key, "label": label, "steps": steps, "out": str(out)}
    stored = out / "ablation-recipe.yaml"
    if not fresh and stored.is_file() and stored.read_text() == text and (out / "model.onnx").is_file():
        print(f"[capacity] {label}, {steps} steps: reusing {out}", flush=True)
        row["reused"] = True
    else:
        recipe = load_recipe_text(text, file=f"<{key}-{steps}>", base_dir=FLAGSHIP.parent)
        print(f"[capacity] {label}, {steps} steps: compiling -> {out}", flush=True)
        result = compile_recipe(recipe, out)
        if result.exit_code != 0:
            row["exit_code"] = result.exit_code
            return row
        stored.write_text(text)
    report = json.loads((out / "report.json").read_text())
    distill = next(p for p in report["passes"] if p["name"] == "distill")
    row.update(exit_code=0, bytes=(out / "model.onnx").stat().st_size,
               architecture=compare.architecture(report), distill_cosine=distill["checks"].get("cosine"),
               distill_seconds=distill.get("seconds"), compile_seconds=(report.get("timings") or {}).get("total"),
               estimated_ms=report["cost"]["compiled"].get("latency_ms"))
    return row


def write_results(path: Path, rows: list[dict], context: dict) -> None:
    lines = ["# What the flagship's compressions cost off its distillation text (written by bench/experiments/capacity_ablation.py)",
             "", f"Command: `{context['command']}`", "", f"{context['environment']}. Load average before / after:"
             f" {context['load_before']} / {context['load_after']} (2 cores). Whole run {context['seconds'] / 60:.1f} min.", "",
             "Each variant is recipes/minilm-fast.yaml with its distillation shortened to the steps shown and the named"
             " compression left out or changed (the 6-block, 8-head, FFN-640 variant: layer-drop left out, heads and FFN"
             " pruned further; the int4-row variants: the word table stored by a last quantize-embeddings step in int4,"
             " the position and token-type tables in int8); everything else (text, losses, int8, vocabulary cut) as the"
             " flagship. Held-out"
             " samples, the same as bench/results/RESULTS.md's: " + "; ".join(context["samples"]) + ".",
             "Cells: mean cosine / top-10 neighbour overlap against PyTorch fp32 (mean-pooled). Speed: batch 32 x seq"
             f" 128, {context['threads']} threads, {context['rounds32']} interleaved rounds with the plain fp32 export"
             f" (median {context['plain_ms']:.0f} ms, {context['plain_bytes'] / 1e6:.1f} MB); 'smaller' against its"
             " model.onnx.", "",
             "| variant | steps | encoder | size MB | smaller | b32 speedup | distill s/step | WordNet slice |"
             " Python docs | held-out fortunes |", "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        if row.get("exit_code") != 0:
            lines.append(f"| {row['label']} | {row['steps']} | - | - | - | - | - | exit code {row.get('exit_code')} | - | - |")
            continue
        per_step = row["distill_seconds"] / row["steps"] if row.get("distill_seconds") else None
        if per_step is not None and row["distill_seconds"] < 60:
            per_step = "replayed"  # the pass store's result of an identical distillation earlier in the run
        lines.append(f"| {row['label']} | {row['steps']} | {row['architecture']} | {row['bytes'] / 1e6:.1f} |"
                     f" {context['plain_bytes'] / row['bytes']:.1f}x | {context['plain_ms'] / row['b32_ms']:.2f}x |"
                     f" {'-' if per_step is None else per_step if isinstance(per_step, str) else f'{per_step:.3f}'} |"
                     f" {row['cells']} |")
    lines += ["", "distill s/step is the whole distill pass (its torch.compile warm-up and held-out checks included) over"
              " its steps; a reused build shows its own compile's figure; 'replayed': the pass store gave an identical"
              " distillation's result (BERTPRESS_PASS_STORE set; the script turns the store off unless it is)."]
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[3000, 1000],
                        help="distillation lengths, built in this order (default: 3000 1000)")
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=["flagship", "blocks", "ffn", "table"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds32", type=int, default=7)
    parser.add_argument("--fresh", action="store_true", help="rebuild even when a build of the same recipe text exists")
    parser.add_argument("--out-root", type=Path, default=ROOT / "out" / "capacity-ablation")
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "experiments" / "results" / "CAPACITY.md")
    args = parser.parse_args()
    command = "python bench/experiments/capacity_ablation.py " + " ".join(sys.argv[1:])
    if STORE_GIVEN:  # the store changes which builds distill and which replay: say it was on
        command = f"BERTPRESS_PASS_STORE={STORE_GIVEN} {command}"
    started = time.perf_counter()
    load_before = [round(x, 1) for x in os.getloadavg()]
    import torch
    from transformers import AutoTokenizer

    from compiler import roofline
    from compiler.frontend import example_inputs, load_model, trace
    from compiler.lowering import export_onnx
    from compiler.report import environment

    torch.set_num_threads(args.threads)
    base = yaml.safe_load(FLAGSHIP.read_text())
    rows = [build(key, steps, base, args.out_root, args.fresh) for steps in args.steps for key in args.variants]
    built = [row for row in rows if row.get("exit_code") == 0]

    loaded = load_model(base["model"])
    model, tokenizer = loaded.model.eval(), loaded.tokenizer
    held_out = compare.HeldOut(RESULTS_RECIPES, model, tokenizer)
    runs = {}
    for row in built:
        out = Path(row["out"])
        runs[row["out"]] = compare.ort_run(out / "model.onnx", args.threads)
        measured = held_out.measure(runs[row["out"]], AutoTokenizer.from_pretrained(str(out)))
        row.update(fidelity=measured, cells=held_out.cells(measured))
        print(f"[capacity] {row['label']}, {row['steps']} steps: {row['cells']}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bertpress-capacity-") as tmp:
        example = example_inputs(tokenizer)
        plain = export_onnx(trace(model, example, max_length=loaded.max_length), example, Path(tmp) / "plain.onnx")
        runs["plain"] = compare.ort_run(plain, args.threads)
        plain_bytes = plain.stat().st_size
        vocab = min([int(loaded.config.vocab_size)] + [compare.vocab_size(Path(r["out"])) for r in built])
        print(f"[capacity] timing batch 32: {args.rounds32} interleaved rounds of {len(runs)} models", flush=True)
        timings = compare.interleaved(runs, compare.synthetic_batch(32, compare.SEQ, vocab), args.rounds32)
    for row in built:
        row["b32_ms"] = 1e3 * statistics.median(timings[row["out"]])
    env = environment()
    context = {"command": command, "threads": args.threads, "rounds32": args.rounds32,
               "environment": f"onnxruntime {env.get('onnxruntime')}, torch {env.get('torch')},"
                              f" {roofline.machine(args.threads).cpu}",
               "load_before": load_before, "load_after": [round(x, 1) for x in os.getloadavg()],
               "seconds": time.perf_counter() - started, "samples": held_out.labels,
               "plain_ms": 1e3 * statistics.median(timings["plain"]), "plain_bytes": plain_bytes}
    write_results(args.results, rows, context)
    args.results.with_suffix(".json").write_text(json.dumps({"context": context, "rows": rows}, indent=2, default=str) + "\n")
    print(args.results.read_text())


if __name__ == "__main__":
    main()
