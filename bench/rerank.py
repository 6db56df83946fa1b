"""Reranking with the DeFormer split form against the joint model: MiniLM, ONNX Runtime, 2 threads.

Workload (DeFormer's setting, scaled to MiniLM): 1 query of 16 tokens ([CLS] query [SEP]) against
N=100 passages of 96 tokens each (passage [SEP]), i.e. 100 pair inputs of 112 tokens.

- joint: the uncompressed MiniLM lowered to ONNX Runtime (fp32, same fusions), one run over the 100 pairs;
- split: recipes/minilm-deformer.yaml compiled here (decouple-attention k=4 + distill on pairs); the
  passages' lower-layer states are computed once (lower.onnx, timed separately as the cache build), and
  per query only lower.onnx over the 16 query tokens and upper.onnx (2 layers) over the 100 pairs run.

Timings are medians over interleaved repeats (compiler.benchmark.rotating_rounds: who goes first rotates,
with a pause before each timed run) in one run, so both see the same machine load. Fidelity: mean-pooled
pair embeddings of the split form vs the joint model on this workload, plus the compile report's held-out
WordNet-pair cosine before and after the distill step. Texts are real: passages from Python's
documentation, the query a WordNet gloss.

    python bench/rerank.py [--out build/rerank] [--repeats 20] [--force] [--results bench/results/rerank.json]
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from compiler.benchmark import SETTLE_SECONDS, rotating_rounds  # noqa: E402
from compiler.calibration import python_docs_texts, wordnet_texts  # noqa: E402
from compiler.compile import compile_recipe  # noqa: E402
from compiler.frontend import example_inputs, load_model, trace  # noqa: E402
from compiler.lowering import lower_to_onnx  # noqa: E402
from compiler.recipe import load_recipe  # noqa: E402
from compiler.report import environment  # noqa: E402
from compiler.roofline import _cpu_name  # noqa: E402
from compiler.runtime import session  # noqa: E402
from compiler.split_runtime import SplitModel  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "minilm-deformer.yaml"
QUERY_TOKENS, PASSAGE_TOKENS, PASSAGES, THREADS = 16, 96, 100, 2


def workload(tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of one query ([CLS] q [SEP], 16) and 100 passages (p [SEP], 96 each) from real text."""
    def content(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    query = next(ids for ids in map(content, wordnet_texts()) if len(ids) >= QUERY_TOKENS - 2)
    query_ids = [tokenizer.cls_token_id] + query[:QUERY_TOKENS - 2] + [tokenizer.sep_token_id]
    passages, current = [], []
    for sentence in python_docs_texts():  # consecutive sentences, cut into 95-token passages
        current += content(sentence)
        if len(current) >= PASSAGE_TOKENS - 1:
            passages.append(current[:PASSAGE_TOKENS - 1] + [tokenizer.sep_token_id])
            current = []
            if len(passages) == PASSAGES:
                break
    return np.array([query_ids], np.int64), np.array(passages, np.int64)


def median_seconds(samples: list[float]) -> float:
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "rerank")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--force", action="store_true", help="recompile the recipe even if it is up to date")
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "results" / "rerank.json",
                        help="where the figures are written (default bench/results/rerank.json)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    started = time.perf_counter()
    compiled = compile_recipe(load_recipe(RECIPE), args.out / "minilm-deformer", force=args.force,
                              progress=lambda message: print(f"[compile] {message}", flush=True))
    if compiled.exit_code != 0:
        raise SystemExit(f"compile failed: {compiled.report['failure']}")
    report = compiled.report
    compile_seconds = time.perf_counter() - started

    loaded = load_model("builtin:minilm-l6")
    joint_dir = args.out / "joint"
    if not (joint_dir / "model.onnx").is_file():
        example = example_inputs(loaded.tokenizer)
        lower_to_onnx(trace(loaded.model, example, max_length=loaded.max_length), example, joint_dir, quantize=None)
    joint = session(joint_dir / "model.onnx", THREADS)
    split = SplitModel(args.out / "minilm-deformer" / "lower.onnx", args.out / "minilm-deformer" / "upper.onnx", THREADS)

    query, passages = workload(loaded.tokenizer)
    n = len(passages)
    pair_ids = np.concatenate([np.repeat(query, n, 0), passages], axis=1)
    pair_feeds = {"input_ids": pair_ids, "attention_mask": np.ones_like(pair_ids),
                  "token_type_ids": np.concatenate([np.zeros((n, query.shape[1]), np.int64),
                                                    np.ones_like(passages)], axis=1)}

    mark = time.perf_counter()
    cached = split.encode_segment(passages, np.ones_like(passages), np.ones_like(passages))
    cache_seconds = time.perf_counter() - mark
    pair_mask = np.ones_like(pair_ids)

    def run_joint():
        return joint.run(None, pair_feeds)[0]

    def run_split():
        query_states = split.encode_segment(query, np.ones_like(query), np.zeros_like(query))
        states = np.concatenate([np.broadcast_to(query_states, (n, *query_states.shape[1:])), cached], axis=1)
        return split.joint(states, pair_mask)[0]

    # One timing loop for every bench: warm-up, rounds that rotate who goes first, and the settle pause before
    # each timed run (ONNX Runtime's idle workers of the previous run would otherwise share the cores).
    times = rotating_rounds({"joint": run_joint, "split": run_split}, rounds=args.repeats, warmup=1,
                            settle=SETTLE_SECONDS)
    joint_s, split_s = median_seconds(times["joint"]), median_seconds(times["split"])

    pooled_joint, pooled_split = run_joint().mean(1), run_split().mean(1)
    cosine = (pooled_joint * pooled_split).sum(1) / (np.linalg.norm(pooled_joint, axis=1) * np.linalg.norm(pooled_split, axis=1))
    records = {r["name"]: r for r in report["passes"]}
    decouple, distill = records["decouple-attention"], records["distill"]
    result = {
        "workload": {"query_tokens": int(query.shape[1]), "passages": n, "passage_tokens": int(passages.shape[1]),
                     "threads": THREADS, "repeats": args.repeats},
        "decoupled_layers": report["lowering"]["split"]["layers"],
        "joint_ms_median": round(joint_s * 1000, 2), "split_ms_median": round(split_s * 1000, 2),
        "speedup": round(joint_s / split_s, 2),
        "cache_build_ms_once": round(cache_seconds * 1000, 1),
        "workload_pair_cosine_vs_joint": {"mean": round(float(cosine.mean()), 4), "min": round(float(cosine.min()), 4)},
        "heldout_wordnet_pairs_cosine": {
            "decoupled_before_distill": decouple["checks"].get("cosine"),
            "after_distill": distill["checks"].get("cosine") if distill["status"] == "applied" else None,
            "distill_status": distill["status"], "final_onnx": round(report["final_check"]["cosine"], 4)},
        "pass_pair_fidelity_before_distill": decouple["details"].get("pair_fidelity"),
        "distill": {k: distill["details"].get(k) for k in ("steps", "seconds", "monitor_cosine_before", "monitor_cosine_after")},
        "split_check": report["lowering"]["split"]["check"],
        "compile_seconds": round(compile_seconds, 1), "up_to_date": compiled.up_to_date,
        "command": " ".join(["python bench/rerank.py", *sys.argv[1:]]),
        "environment": {**environment(), "cpu": _cpu_name(), "load_average_after": [round(x, 1) for x in os.getloadavg()]},
    }
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"\nreranking 1x{query.shape[1]}-token query vs {n} cached {passages.shape[1]}-token passages, {THREADS} threads:"
          f" joint {joint_s * 1000:.1f} ms, split {split_s * 1000:.1f} ms (median of {args.repeats}) ->"
          f" speedup {joint_s / split_s:.2f}x; pair-embedding cosine vs joint mean {cosine.mean():.4f}"
          f" (held-out pairs: {result['heldout_wordnet_pairs_cosine']})")


if __name__ == "__main__":
    main()
