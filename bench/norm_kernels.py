"""How fast are ONNX Runtime's kernels for BERT's residual + LayerNorm on this machine?

One residual block of MiniLM (hidden 384) at rows = batch x 128 tokens, each form in its own small model,
timed in interleaved rounds (each round runs every form once, in rotating order); medians in ms and the
ratio of the fused contrib op's time to each form's:
  * skip-layer-norm: com.microsoft SkipLayerNormalization(x, skip, gamma, beta, bias), what onnxscript's
    ort_fusions (and the legacy ORT optimizer) emit;
  * sum3 + layer-norm: Sum(x, skip, bias) -> LayerNormalization, what bertpress lowers a residual to when
    the bias has no weight MatMul to fold into;
  * sum2 + layer-norm: Sum(x, skip) -> LayerNormalization, what it lowers to when ORT folds the bias into the
    quantized MatMul before it (the common case);
  * add + layer-norm: the same with Add nodes, to show that ONNX Runtime fuses them back into
    SkipLayerNormalization at load (its optimized graph's op types are printed).
Intra-op spinning is off in every session, so one session's idle workers do not steal the core from the next.

Usage: python bench/norm_kernels.py [--batch 1 32] [--threads 1 2] [--rounds 40]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from compiler.benchmark import rotating_rounds

HIDDEN, SEQ = 384, 128


def form_model(kind: str, rng: np.random.Generator) -> onnx.ModelProto:
    inits = [numpy_helper.from_array(rng.standard_normal(HIDDEN).astype(np.float32), n) for n in ("gamma", "beta", "bias")]
    norm = helper.make_node("LayerNormalization", ["s", "gamma", "beta"], ["y"], axis=-1, epsilon=1e-12)
    nodes = {
        "skip-layer-norm": [helper.make_node("SkipLayerNormalization", ["x", "skip", "gamma", "beta", "bias"], ["y"],
                                             domain="com.microsoft", epsilon=1e-12)],
        "sum3 + layer-norm": [helper.make_node("Sum", ["x", "skip", "bias"], ["s"]), norm],
        "sum2 + layer-norm": [helper.make_node("Sum", ["x", "skip"], ["s"]), norm],
        "add + layer-norm": [helper.make_node("Add", ["x", "bias"], ["xb"]), helper.make_node("Add", ["xb", "skip"], ["s"]), norm],
    }[kind]
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", "seq", HIDDEN]) for n in ("x", "skip", "y")]
    graph = helper.make_graph(nodes, kind, io[:2], io[2:], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=40)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    kinds = ("skip-layer-norm", "sum3 + layer-norm", "sum2 + layer-norm", "add + layer-norm")
    ran_as: dict[str, list[str]] = {}
    print(f"onnxruntime {ort.__version__}; residual + LayerNorm at hidden {HIDDEN}, seq {SEQ}; median ms "
          "(ratio: skip-layer-norm's time / this form's)\n")
    print("| batch | threads | " + " | ".join(kinds) + " |")
    print("|---:|---:|" + "---|" * len(kinds))
    with tempfile.TemporaryDirectory() as tmp:
        for batch in args.batch:
            for threads in args.threads:
                sessions = {}
                for kind in kinds:
                    options = ort.SessionOptions()
                    options.intra_op_num_threads = threads
                    options.inter_op_num_threads = 1
                    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
                    optimized = Path(tmp) / f"{kind.replace(' ', '')}.onnx"
                    options.optimized_model_filepath = str(optimized)
                    sessions[kind] = ort.InferenceSession(form_model(kind, rng).SerializeToString(), options,
                                                         providers=["CPUExecutionProvider"])
                    ran_as[kind] = [n.op_type for n in onnx.load(optimized).graph.node]
                feed = {n: rng.standard_normal((batch, SEQ, HIDDEN)).astype(np.float32) for n in ("x", "skip")}
                times = rotating_rounds({k: functools.partial(sessions[k].run, None, feed) for k in kinds},
                                        rounds=args.rounds, warmup=2)
                med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
                base = med["skip-layer-norm"]
                print(f"| {batch} | {threads} | " + " | ".join(f"{med[k]:.3f} ({base / med[k]:.2f}x)" for k in kinds) + " |")
    print("\nWhat ONNX Runtime ran (op types of its optimized graph, default optimization level):")
    for kind, ops in ran_as.items():
        print(f"- {kind}: {' -> '.join(ops)}")


if __name__ == "__main__":
    main()
