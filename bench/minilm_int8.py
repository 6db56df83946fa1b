"""`recipes/minilm-int8.yaml` compiled by the CLI against a plain fp32 ONNX export: speed, size and held-out cosine.

One run: compile the recipe (timed, as a user runs it), export the same model plainly (dynamo,
no fusions, no quantization), then time both in ONNX Runtime at batch 32 / seq 128 / 2 threads in
interleaved rounds (medians and the median of per-round ratios), and measure the compiled model's
mean-pooled cosine to the PyTorch reference on held-out WordNet glosses (another domain than the
Python-documentation calibration text; never seen by the compile).

    python bench/minilm_int8.py [--rounds 20] [--batch 32] [--seq 128] [--threads 2] [--heldout 256]
"""

from __future__ import annotations

import argparse
import functools
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from compiler.benchmark import SETTLE_SECONDS, rotating_rounds  # noqa: E402
from compiler.calibration import python_docs_texts, tokenize_batches, wordnet_texts  # noqa: E402
from compiler.frontend import example_inputs, load_model, trace  # noqa: E402
from compiler.lowering import export_onnx  # noqa: E402
from compiler.runtime import ort_runner, session  # noqa: E402
from compiler.validation import compare, hidden_states, run_batches  # noqa: E402


def heldout_texts(count: int) -> tuple[str, list[str]]:
    try:
        return "WordNet glosses", random.Random(1234).sample(wordnet_texts(), count)
    except Exception:  # wordnet-base not installed: fall back to the same domain, say so
        return "Python docs (WordNet not installed)", random.Random(1234).sample(python_docs_texts(), count)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--heldout", type=int, default=256)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bertpress-bench-int8-"))

    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "compiler.cli", "compile", str(ROOT / "recipes/minilm-int8.yaml"),
                    "--out", str(work / "int8"), "--force"], check=True)
    compile_seconds = time.perf_counter() - started

    loaded = load_model("builtin:minilm-l6")
    example = example_inputs(loaded.tokenizer)
    plain = export_onnx(trace(loaded.model, example, loaded.max_length), example, work / "plain" / "model.onnx")
    sessions = {"plain fp32 export": session(plain, args.threads), "bertpress int8": session(work / "int8" / "model.onnx", args.threads)}

    domain, texts = heldout_texts(args.heldout)
    batches = tokenize_batches(loaded.tokenizer, texts, args.seq, 32)
    reference = run_batches(hidden_states(loaded.model), batches)
    fidelity = compare(reference, run_batches(ort_runner(sessions["bertpress int8"]), batches), batches)

    filler = (texts * (args.batch // len(texts) + 1))[: args.batch]
    enc = loaded.tokenizer(filler, padding="max_length", truncation=True, max_length=args.seq, return_tensors="np")
    feeds = {k: enc[k].astype(np.int64) for k in ("input_ids", "attention_mask", "token_type_ids")}
    # Interleaved, rotating who goes first, with a pause before each run (compiler/benchmark.py): drift hits both alike.
    times = rotating_rounds({name: functools.partial(sess.run, None, feeds) for name, sess in sessions.items()},
                            rounds=args.rounds, warmup=2, settle=SETTLE_SECONDS)
    median = {name: statistics.median(ts) * 1e3 for name, ts in times.items()}
    per_round = statistics.median(p / q for p, q in zip(times["plain fp32 export"], times["bertpress int8"]))
    speedup = median["plain fp32 export"] / median["bertpress int8"]
    size = {name: (work / d / "model.onnx").stat().st_size for name, d in (("plain fp32 export", "plain"), ("bertpress int8", "int8"))}

    print(f"\nMiniLM-L6, batch {args.batch}, seq {args.seq}, {args.threads} threads, {args.rounds} interleaved rounds;"
          f" compile of recipes/minilm-int8.yaml took {compile_seconds:.0f}s")
    print(f"{'model':<20}{'median ms':>11}{'speedup':>9}{'model.onnx MB':>15}")
    for name in sessions:
        print(f"{name:<20}{median[name]:>11.1f}{median['plain fp32 export'] / median[name]:>8.2f}x{size[name] / 1e6:>15.1f}")
    print(f"speedup (median of per-round ratios): {per_round:.2f}x")
    print(f"held-out {domain} ({len(texts)} texts): mean cosine {fidelity.cosine:.4f}, min {fidelity.cosine_min:.4f}")
    print(json.dumps({"batch": args.batch, "seq": args.seq, "threads": args.threads, "rounds": args.rounds,
                      "median_ms": {k: round(v, 1) for k, v in median.items()}, "speedup": round(speedup, 3),
                      "speedup_per_round": round(per_round, 3), "heldout": domain, "cosine_mean": round(fidelity.cosine, 5),
                      "cosine_min": round(fidelity.cosine_min, 5), "compile_seconds": round(compile_seconds, 1)}))


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
