"""Benchmark the ONNX lowering on all-MiniLM-L6-v2: plain fp32 export vs our lowered int8 model.

One run measures, at batch 32 / seq 128 with 2 intra-op threads, interleaved repeated runs of
  * plain   : fp32 dynamo export, no fusions, no quantization (the baseline),
  * int8    : lower_to_onnx(quantize=QuantizeSpec())  -- the model bertpress ships,
  * int8_skipln : the same with onnxscript's fused SkipLayerNormalization kept (skip_layer_norm=True), the
              residual norms as the peer pipeline lowers them,
  * fused   : lower_to_onnx(quantize=None), fp32 with fusions (reference only),
and the int8 model's mean-pooled cosine vs the PyTorch module on 64 held-out real sentences.

    python bench/lowering_speed.py [--rounds 20] [--threads 2] [--out-dir DIR]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from compiler.benchmark import SETTLE_SECONDS, rotating_rounds  # noqa: E402
from compiler.lowering import QuantizeSpec, export_onnx, lower_to_onnx  # noqa: E402
from compiler.lowering.verify import pooled_cosine  # noqa: E402

from compiler.frontend import resolve_model_path  # noqa: E402

MODEL_DIR = resolve_model_path("builtin:minilm-l6")
INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def sentences(n: int, offset: int) -> list[str]:
    """Real English text: WordNet noun glosses if installed, else Python's pydoc topics."""
    wn = Path("/usr/share/wordnet/data.noun")
    if wn.exists():
        lines = [ln.split("|", 1)[1].strip() for ln in wn.read_text(errors="ignore").splitlines()
                 if not ln.startswith("  ") and "|" in ln]
    else:
        from pydoc_data.topics import topics
        lines = [p.strip() for t in topics.values() for p in t.split("\n\n") if len(p.split()) > 6]
    step = max(1, len(lines) // (4 * n))
    return [lines[offset + i * step] for i in range(n)]


def trace(model, enc):
    from torch.export import Dim

    kw = {k: enc[k] for k in INPUTS}
    batch, seq = Dim("batch"), Dim("seq", max=512)
    ep = torch.export.export(model, (), kwargs=kw, dynamic_shapes={k: {0: batch, 1: seq} for k in kw}, strict=False)
    return ep.module(), kw


def session(path: Path, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--out-dir", type=Path, default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)

    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(MODEL_DIR).eval()
    tok = AutoTokenizer.from_pretrained(MODEL_DIR)
    # Trace on a small padded batch (what the frontend does); the export is shape-dynamic.
    gm, example = trace(model, tok(sentences(4, 0), padding=True, return_tensors="pt"))

    out_dir = args.out_dir or Path(tempfile.mkdtemp(prefix="bertpress-bench-"))
    t0 = time.perf_counter()
    plain = export_onnx(gm, example, out_dir / "plain" / "model.onnx")
    t1 = time.perf_counter()
    int8 = lower_to_onnx(gm, example, out_dir / "int8", quantize=QuantizeSpec())
    t2 = time.perf_counter()
    fused = lower_to_onnx(gm, example, out_dir / "fused", quantize=None)
    t3 = time.perf_counter()
    skipln = lower_to_onnx(gm, example, out_dir / "int8-skipln", quantize=QuantizeSpec(), skip_layer_norm=True)
    print(f"lowering time: plain export {t1 - t0:.1f}s, int8 lowering {t2 - t1:.1f}s, fp32 fused lowering {t3 - t2:.1f}s")
    print("int8 fusions:", int8.fusions)
    print("int8 quantized:", int8.quantized)
    print("int8 op_counts:", int8.op_counts)
    for note in int8.notes:
        print("  note:", note)

    # Latency batch: real sentences padded/truncated to exactly seq tokens.
    enc = tok(sentences(args.batch, 1), padding="max_length", truncation=True, max_length=args.seq, return_tensors="np")
    feeds = {k: enc[k].astype(np.int64) for k in INPUTS}
    variants = {"plain_fp32": plain, "int8_lowered": int8.model_path, "int8_skipln": skipln.model_path,
                "fused_fp32(ref)": fused.model_path}
    sessions = {name: session(path, args.threads) for name, path in variants.items()}
    # Interleaved, in rotating order, so drift (thermal, noisy neighbours) hits every variant alike; a pause before
    # each run lets the previous session's spinning workers park (compiler/benchmark.py).
    times = rotating_rounds({name: functools.partial(s.run, None, feeds) for name, s in sessions.items()},
                            rounds=args.rounds, warmup=args.warmup, settle=SETTLE_SECONDS)
    med = {name: statistics.median(ts) * 1e3 for name, ts in times.items()}
    # Per-round ratios (neighbouring runs) are steadier than a ratio of medians when the machine
    # is shared; report both.
    round_ratio = {name: statistics.median(p / t for p, t in zip(times["plain_fp32"], ts)) for name, ts in times.items()}

    # Accuracy: 64 held-out sentences (disjoint offset from the trace/latency ones), dynamic padding.
    held = tok(sentences(64, 2), padding=True, truncation=True, max_length=args.seq, return_tensors="pt")
    with torch.no_grad():
        ref = model(**{k: held[k] for k in INPUTS}).last_hidden_state.numpy()
    got = sessions["int8_lowered"].run(None, {k: held[k].numpy().astype(np.int64) for k in INPUTS})[0]
    cos = pooled_cosine(got, ref, held["attention_mask"].numpy())

    base = med["plain_fp32"]
    print(f"\nMiniLM-L6 batch {args.batch} seq {args.seq}, {args.threads} threads, {args.rounds} interleaved rounds")
    print(f"{'variant':<18}{'median ms':>12}{'speedup':>10}{'per-round':>11}")
    for name, ms in med.items():
        print(f"{name:<18}{ms:>12.1f}{base / ms:>9.2f}x{round_ratio[name]:>10.2f}x")
    print(f"int8 mean-pooled cosine vs PyTorch on 64 held-out sentences: mean {cos.mean():.5f} min {cos.min():.5f}")
    print(json.dumps({
        "batch": args.batch, "seq": args.seq, "threads": args.threads, "rounds": args.rounds,
        "median_ms": {k: round(v, 2) for k, v in med.items()},
        "speedup_int8_vs_plain": round(base / med["int8_lowered"], 3),
        "speedup_fused_vs_plain": round(base / med["fused_fp32(ref)"], 3),
        "speedup_int8_skipln_vs_plain": round(base / med["int8_skipln"], 3),
        "speedup_int8_per_round_median": round(round_ratio["int8_lowered"], 3),
        "cosine_mean": round(float(cos.mean()), 5), "cosine_min": round(float(cos.min()), 5),
        "int8_fusions": int8.fusions, "int8_quantized": int8.quantized,
        "lowering_seconds_int8": round(t2 - t1, 1),
    }))


if __name__ == "__main__":
    main()
