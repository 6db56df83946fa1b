"""A fine-tuned MiniLM classifier compressed three ways, side by side in one run, on its held-out labeled split.

The classifier is bench/make_classifier.py's (all-MiniLM-L6-v2 fine-tuned on WordNet noun glosses -> 8 supersenses;
its held-out split is never trained, calibrated or distilled on). Measured in one process, on the same inputs:
  * the fp32 classifier: plain fp32 ONNX export of the traced model (dynamo, no fusions): every ratio's baseline;
  * the peer pipeline applied to the classifier, as Optimum runs it: legacy TorchScript export ->
    onnxruntime.transformers optimizer (bert) -> quantize_dynamic int8 per-channel (bench/compare.py's peer_pipeline);
  * bertpress recipes in bench/recipes/ (int8 only; structure + distill + int8), compiled with compile_recipe; they
    calibrate and distill on the training split's texts, without its labels.
For each: held-out accuracy and macro F1 against the labels, agreement (same top label) with the fp32 classifier,
size on disk, and latency at batch 1 and batch 32 (seq 128, synthetic ids, --threads intra-op threads) as medians of
interleaved rounds and their ratio to the fp32 export's. Writes bench/results/task-classifier.json and .md.

    python bench/make_classifier.py                 # once: out/minilm-supersense
    python bench/task_compare.py [--model out/minilm-supersense] [--rounds1 20] [--rounds32 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from compare import interleaved, peer_pipeline

from compiler.benchmark import synthetic_batch
from compiler.frontend import example_inputs, load_model, trace
from compiler.lowering import export_onnx
from compiler.recipe import load_recipe
from compiler.runtime import session
from compiler.tasks import macro_f1

RECIPES = ROOT / "bench" / "recipes"
RESULTS = ROOT / "bench" / "results" / "task-classifier"
SEQ = 128
# The targets: the int8 recipe against fp32 and the peer; the structure recipe against fp32.
TARGETS = {"int8_agreement": 0.99, "int8_accuracy_drop": 0.005, "fast_speedup32": 4.0, "fast_accuracy_drop": 0.015}


def heldout(model_dir: Path, label2id: dict) -> tuple[list[str], np.ndarray]:
    rows = [json.loads(line) for line in (model_dir / "heldout.jsonl").read_text().splitlines() if line.strip()]
    return [r["text"] for r in rows], np.array([label2id[r["label"]] for r in rows])


def predict(sess, tokenizer, texts: list[str], batch_size: int = 64) -> np.ndarray:
    names = {i.name for i in sess.get_inputs()}
    logits = []
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(texts[start:start + batch_size], padding=True, truncation=True, max_length=SEQ, return_tensors="np")
        feeds = {k: enc[k].astype(np.int64) for k in names if k in enc}
        if "token_type_ids" in names and "token_type_ids" not in feeds:
            feeds["token_type_ids"] = np.zeros_like(feeds["input_ids"])
        logits.append(sess.run(["logits"], feeds)[0])
    return np.concatenate(logits)


def size_of(path: Path) -> int:
    data = Path(str(path) + ".data")
    return path.stat().st_size + (data.stat().st_size if data.is_file() else 0)


def compile_recipes(out_root: Path, model_dir: Path, folder: Path) -> dict[str, dict]:
    from compiler.compile import compile_recipe

    built = {}
    for path in sorted(folder.glob("*.yaml")):
        recipe = load_recipe(str(path))
        if Path(recipe.file.model).resolve() != model_dir.resolve():
            sys.exit(f"error: {path} compiles {recipe.file.model}, not {model_dir}; run from the repository root.")
        out = out_root / path.stem
        print(f"[task] compiling {path.name} -> {out}", flush=True)
        started = time.perf_counter()
        result = compile_recipe(recipe, out, progress=lambda m: print(f"[task]   {m}", flush=True))
        seconds = time.perf_counter() - started
        report = result.report
        print(f"[task]   exit {result.exit_code} in {seconds:.0f} s", flush=True)
        built[path.stem] = {"path": out / "model.onnx", "exit_code": result.exit_code, "report": report,
                            "up_to_date": result.up_to_date, "seconds": round(seconds, 1)}
    return built


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="out/minilm-supersense")
    parser.add_argument("--out-root", default="out/task")
    parser.add_argument("--rounds1", type=int, default=20)
    parser.add_argument("--rounds32", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--recipes", default=str(RECIPES), help="folder of the task recipes to compile")
    parser.add_argument("--results", default=str(RESULTS), help="where to write the results (.json and .md)")
    args = parser.parse_args()
    model_dir = Path(args.model)
    if not (model_dir / "heldout.jsonl").is_file():
        sys.exit(f"error: {model_dir}/heldout.jsonl is missing; run bench/make_classifier.py first.")
    out_root = Path(args.out_root)
    out_root.mkdir(parents=True, exist_ok=True)

    loaded = load_model(str(model_dir))
    tokenizer = loaded.tokenizer
    texts, gold = heldout(model_dir, {k: int(v) for k, v in loaded.config.label2id.items()})
    classes = len(loaded.config.id2label)
    print(f"[task] {len(texts)} held-out texts, {classes} classes", flush=True)

    models: dict[str, Path] = {}
    notes: dict[str, dict] = {}
    fp32 = out_root / "fp32-export.onnx"
    export_onnx(trace(loaded.model, example_inputs(tokenizer), max_length=loaded.max_length), example_inputs(tokenizer), fp32)
    models["fp32 classifier (plain ONNX export)"] = fp32
    peer, peer_notes = peer_pipeline(loaded.model, tokenizer, out_root, outputs=("logits",))
    models["peer: legacy export + ORT optimizer + int8 per-channel"] = peer
    notes["peer: legacy export + ORT optimizer + int8 per-channel"] = peer_notes
    built = compile_recipes(out_root, model_dir, Path(args.recipes))
    for name, info in built.items():
        if info["exit_code"] == 0:
            models[f"recipe {name}"] = info["path"]
        notes[f"recipe {name}"] = {"exit_code": info["exit_code"], "compile_seconds": info["seconds"],
                                   "reused_build": info["up_to_date"],
                                   "passes": [{"name": p["name"], "status": p["status"], "reason": p.get("reason"),
                                               "agreement": p.get("checks", {}).get("agreement"),
                                               "seconds": p.get("seconds")} for p in info["report"].get("passes", [])],
                                   "compile_report_final_check": info["report"].get("final_check")}

    sessions = {name: session(path, args.threads) for name, path in models.items()}
    predictions = {name: predict(sess, tokenizer, texts).argmax(-1) for name, sess in sessions.items()}
    reference = predictions["fp32 classifier (plain ONNX export)"]
    rows = []
    for name, path in models.items():
        predicted = predictions[name]
        rows.append({"model": name, "bytes": size_of(path), "accuracy": float((predicted == gold).mean()),
                     "f1": macro_f1(torch.from_numpy(predicted), torch.from_numpy(gold), classes),
                     "agreement": float((predicted == reference).mean())})

    def run_of(sess):
        names = [i.name for i in sess.get_inputs()]
        return lambda feeds: sess.run(["logits"], {k: feeds[k] for k in names})

    runs = {name: run_of(sess) for name, sess in sessions.items()}
    for batch, rounds in ((1, args.rounds1), (32, args.rounds32)):
        print(f"[task] timing batch {batch} x seq {SEQ}, {rounds} rounds", flush=True)
        times = interleaved(runs, synthetic_batch(batch, SEQ, int(loaded.config.vocab_size)), rounds)
        base = statistics.median(times["fp32 classifier (plain ONNX export)"])
        for row in rows:
            median = statistics.median(times[row["model"]])
            row[f"b{batch}_ms"] = round(median * 1000, 2)
            row[f"b{batch}_speedup"] = round(base / median, 3)
    write(rows, notes, args, model_dir, len(texts), classes)


def write(rows: list[dict], notes: dict, args, model_dir: Path, count: int, classes: int) -> None:
    import platform

    import onnxruntime

    finetune = json.loads((model_dir / "finetune.json").read_text()) if (model_dir / "finetune.json").is_file() else {}
    fp32 = rows[0]
    peer = next(r for r in rows if r["model"].startswith("peer"))
    by_name = {r["model"]: r for r in rows}
    int8 = by_name.get("recipe supersense-int8")
    fast = by_name.get("recipe supersense-fast")
    targets = []
    if int8:
        targets += [("int8: agreement with fp32", int8["agreement"], f">= {TARGETS['int8_agreement']}",
                     int8["agreement"] >= TARGETS["int8_agreement"]),
                    ("int8: accuracy drop (points)", round(100 * (fp32["accuracy"] - int8["accuracy"]), 2),
                     f"<= {100 * TARGETS['int8_accuracy_drop']}", fp32["accuracy"] - int8["accuracy"] <= TARGETS["int8_accuracy_drop"]),
                    ("int8: b32 speed vs the peer", round(int8["b32_speedup"] / peer["b32_speedup"], 3), ">= 1.0",
                     int8["b32_speedup"] >= peer["b32_speedup"]),
                    ("int8: b1 speed vs the peer", round(int8["b1_speedup"] / peer["b1_speedup"], 3), ">= 1.0",
                     int8["b1_speedup"] >= peer["b1_speedup"])]
    if fast:
        targets += [("structure + distill + int8: b32 speedup vs fp32", fast["b32_speedup"], f">= {TARGETS['fast_speedup32']}",
                     fast["b32_speedup"] >= TARGETS["fast_speedup32"]),
                    ("structure + distill + int8: accuracy drop (points)", round(100 * (fp32["accuracy"] - fast["accuracy"]), 2),
                     f"<= {100 * TARGETS['fast_accuracy_drop']}", fp32["accuracy"] - fast["accuracy"] <= TARGETS["fast_accuracy_drop"])]
    context = {"command": "python bench/task_compare.py " + " ".join(sys.argv[1:]), "heldout_texts": count, "classes": classes,
               "classifier": finetune, "threads": args.threads, "seq": SEQ, "rounds": {"b1": args.rounds1, "b32": args.rounds32},
               "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                           "load_average": os.getloadavg()},
               "versions": {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__}}
    results = Path(args.results)
    results.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{results}.json").write_text(json.dumps({"context": context, "rows": rows, "notes": notes,
                                                   "targets": [dict(zip(("target", "reached", "goal", "met"), t)) for t in targets]},
                                                  indent=2, default=str) + "\n")
    lines = ["# A fine-tuned MiniLM classifier: fp32, the peer pipeline and bertpress", "",
             (f"`{context['command']}`. Classifier: all-MiniLM-L6-v2 fine-tuned by bench/make_classifier.py on WordNet noun"
             f" glosses -> {classes} supersenses ({finetune.get('train', '?')} training glosses; WordNet 3.0 licence). Every"
             f" figure is on its {count} held-out glosses (never trained, calibrated or distilled on). Latency: synthetic ids,"
             f" seq {SEQ}, {args.threads} threads, medians of interleaved rounds; speedup = fp32 export median / model median."
             f" Load average at the end of the run: {', '.join(f'{x:.1f}' for x in context['machine']['load_average'])}"
             f" on {context['machine']['cores']} cores."), "",
             "| model | size MB | accuracy | macro F1 | agreement with fp32 | b1 ms | b1 speedup | b32 ms | b32 speedup |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['bytes'] / 1e6:.1f} | {r['accuracy']:.4f} | {r['f1']:.4f} | {r['agreement']:.4f} |"
                     f" {r['b1_ms']} | {r['b1_speedup']:.2f}x | {r['b32_ms']} | {r['b32_speedup']:.2f}x |")
    lines += ["", "| target | reached | goal | met |", "|---|---|---|---|"]
    lines += [f"| {t} | {v} | {g} | {'yes' if m else 'no'} |" for t, v, g, m in targets]
    for name, info in notes.items():
        if name.startswith("recipe"):
            passes = "; ".join(f"{p['name']} {p['status']}" + (f" (agreement {p['agreement']:.4f})" if p["agreement"] is not None else "")
                               for p in info["passes"])
            lines += ["", (f"{name}: exit {info['exit_code']}, compiled in {info['compile_seconds']} s"
                           f"{' (an up-to-date build, reused)' if info['reused_build'] else ''}: {passes}.")]
    Path(f"{results}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
