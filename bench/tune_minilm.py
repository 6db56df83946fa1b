"""bertpress tune on MiniLM: recipes/minilm-tune.yaml searched, its best recipe timed and checked on other domains.

    OMP_NUM_THREADS=1 python bench/tune_minilm.py [--out out/tune-minilm] [--resume] [--executor local|ray]

Runs `bertpress tune` (bounded by the recipe's tune.time_limit: no candidate starts after it), then times the best
output against the plain fp32 ONNX export at batch 32 x seq 128 (`bertpress bench`, interleaved rounds, medians) and
measures its held-out fidelity on compare.py's three samples: the WordNet slice the search kept its budget on, and
Python documentation and everyday-life fortunes, domains it neither calibrated nor distilled on. Writes
bench/results/tune-minilm.md and .json, the search's frontier chart (tune-minilm-frontier.png) and its trials
(tune-minilm-trials.jsonl).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
RECIPE = ROOT / "recipes" / "minilm-tune.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "tune-minilm")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--executor", choices=("local", "ray"), default="local")
    parser.add_argument("--rounds", type=int, default=10, help="interleaved timed rounds of the final bench")
    args = parser.parse_args()
    started = time.monotonic()
    load_before = os.getloadavg()
    command = [sys.executable, "-m", "compiler.cli", "tune", str(RECIPE), "--out", str(args.out),
               "--executor", args.executor] + (["--resume"] if args.resume else [])
    print("$ " + " ".join(command[2:]), flush=True)
    tuned = subprocess.run(command, cwd=ROOT)
    search_seconds = time.monotonic() - started
    summary = json.loads((args.out / "frontier.json").read_text())
    RESULTS.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(args.out / "frontier.png", RESULTS / "tune-minilm-frontier.png")
    shutil.copyfile(args.out / "trials.jsonl", RESULTS / "tune-minilm-trials.jsonl")
    result = {"command": "OMP_NUM_THREADS=1 python bench/tune_minilm.py" + (" --resume" if args.resume else ""),
              "tune_exit_code": tuned.returncode, "search_seconds": round(search_seconds, 1),
              "load_average_before": [round(x, 2) for x in load_before], "summary": summary}
    best = args.out / "best"
    if tuned.returncode == 0 and (best / "model.onnx").is_file():
        bench_json = args.out / "bench.json"
        subprocess.run([sys.executable, "-m", "compiler.cli", "bench", str(best), "--batch", "32", "--seq", "128",
                        "--rounds", str(args.rounds), "--json", str(bench_json)], cwd=ROOT, check=True)
        result["bench"] = json.loads(bench_json.read_text())
        result["rounds"] = args.rounds
        sys.path.insert(0, str(ROOT / "bench"))
        import compare
        from transformers import AutoTokenizer

        from compiler.frontend import load_model

        loaded = load_model(compare.MODEL)
        held_out = compare.HeldOut([], loaded.model.eval(), loaded.tokenizer)
        result["fidelity"] = held_out.measure(compare.ort_run(best / "model.onnx", 2), AutoTokenizer.from_pretrained(best))
        result["fidelity_samples"] = dict(zip(compare.SAMPLES, held_out.labels))
    result["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    result["total_seconds"] = round(time.monotonic() - started, 1)
    (RESULTS / "tune-minilm.json").write_text(json.dumps(result, indent=2, sort_keys=True, default=str) + "\n")
    (RESULTS / "tune-minilm.md").write_text(render(result))
    print(render(result))


def render(result: dict) -> str:
    summary = result["summary"]
    lines = ["# bertpress tune on all-MiniLM-L6-v2 (written by bench/tune_minilm.py)", "",
             f"Command: `{result['command']}` (recipe `recipes/minilm-tune.yaml`, {summary['strategy']} search,"
             f" {summary['executor']} executor). Load average before / after: {result['load_average_before']} /"
             f" {result['load_average_after']} (2 cores; above 2 means other jobs shared them).", "",
             f"Search: {summary['candidates']} candidates, {summary['considered']} considered, {summary['compiles']} compiles"
             f" (statuses {summary['statuses']}), distill rungs {summary['distill_rungs']} steps;"
             f" {result['search_seconds'] / 60:.1f} min in this run, which reused {summary['reused_from_previous_run']} finished"
             f" trials of an earlier run of the same search (--resume) and compiled {summary['compiled_this_run']}."
             f" `bertpress tune` exit code {result['tune_exit_code']}.", "",
             "| options | distill steps | est. b32 ms | measured b32 ms (3 runs) | held-out WordNet cosine | within budget |",
             "|---|---|---|---|---|---|"]
    trials = [json.loads(line) for line in (RESULTS / "tune-minilm-trials.jsonl").read_text().splitlines()]
    for record in trials:
        options = ", ".join(f"{k.split('.', 1)[1]}={v}" for k, v in record["options"].items())
        if record["status"] in ("ok", "check_failed"):
            estimate = record.get("compiled_estimated_latency_ms") or f"{record.get('estimated_latency_ms')} (screen)"
            lines.append(f"| {options} | {record.get('distill_steps')} | {estimate} |"
                         f" {record.get('measured_latency_ms')} | {record.get('fidelity')} | {record.get('meets_budget')} |")
        else:
            lines.append(f"| {options} | {record.get('distill_steps')} | {record.get('estimated_latency_ms')} (screen) | - | - |"
                         f" {record['status']} |")
    lines += ["", "Frontier chart: `tune-minilm-frontier.png`; every trial: `tune-minilm-trials.jsonl`."]
    if "bench" in result:
        bench, best = result["bench"], summary["best"]
        options = ", ".join(f"{k.split('.', 1)[1]}={v}" for k, v in best["options"].items())
        lines += ["", f"Best: {options}.",
                  f"Latency at batch 32 x seq 128, 2 threads, medians of {result['rounds']} interleaved rounds:"
                  f" {bench['compiled']['median_ms']:.1f} ms against the plain fp32 export's {bench['reference']['median_ms']:.1f} ms:"
                  f" **{bench['speedup_median']:.2f}x**.", "",
                  "| held-out sample | cosine | cosine min | top-10 overlap |", "|---|---|---|---|"]
        for key, label in result["fidelity_samples"].items():
            figure = result["fidelity"][key]
            lines.append(f"| {label} | {figure['cosine']:.4f} | {figure['cosine_min']:.4f} | {figure['overlap10']:.3f} |")
    else:
        lines += ["", "No candidate kept the budget within the time limit: no best recipe to time."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
