"""How fast are ONNX Runtime's weight kernels on this machine: fp32 MatMul, int8 MatMulInteger, 4-bit MatMulNBits?

One linear of MiniLM's feed-forward (K=384 inputs, N=1536 outputs) at M rows (M = batch x sequence:
128 for one sentence of 128 tokens, 4096 for batch 32), each kernel in its own one-node model, timed in
interleaved rounds (each round runs every kernel once); medians in ms and ratios to fp32.
  * fp32: MatMul with an fp32 weight;
  * int8: DynamicQuantizeLinear + MatMulInteger (+ rescale), what quantize-linear dtype int8 lowers to;
  * int4 level 4 / level 0: MatMulNBits with blocks of 32 and int8 / fp32 compute, what dtype int4
    lowers to (``compute: int8`` / ``compute: fp32``).

Usage: python bench/matmul_kernels.py [--rows 128 4096] [--threads 1 2] [--rounds 30]
"""

from __future__ import annotations

import argparse
import functools
import statistics

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from compiler.benchmark import rotating_rounds
from compiler.lowering.nbits import pack_int4

K, N, BLOCK = 384, 1536, 32


def one_node_model(kind: str, rows: int, rng: np.random.Generator):
    a = helper.make_tensor_value_info("A", TensorProto.FLOAT, [rows, K])
    y = helper.make_tensor_value_info("Y", TensorProto.FLOAT, [rows, N])
    if kind.startswith("int4"):
        level = 4 if kind.endswith("4") else 0
        q = rng.integers(0, 16, size=(N, K)).astype(np.uint8)
        scales = (rng.random((N, K // BLOCK)) * 0.01).astype(np.float32)
        nodes = [helper.make_node("MatMulNBits", ["A", "B", "S"], ["Y"], domain="com.microsoft", K=K, N=N, bits=4,
                                  block_size=BLOCK, accuracy_level=level)]
        inits = [numpy_helper.from_array(pack_int4(q, BLOCK), "B"), numpy_helper.from_array(scales.reshape(-1), "S")]
    elif kind == "int8":
        nodes = [helper.make_node("DynamicQuantizeLinear", ["A"], ["Aq", "As", "Az"]),
                 helper.make_node("MatMulInteger", ["Aq", "W", "Az"], ["Yi"]),
                 helper.make_node("Cast", ["Yi"], ["Yf"], to=TensorProto.FLOAT),
                 helper.make_node("Mul", ["As", "Ws"], ["scale"]),
                 helper.make_node("Mul", ["Yf", "scale"], ["Y"])]
        inits = [numpy_helper.from_array(rng.integers(-127, 128, size=(K, N)).astype(np.int8), "W"),
                 numpy_helper.from_array(np.float32(0.01), "Ws")]
    else:
        nodes = [helper.make_node("MatMul", ["A", "W"], ["Y"])]
        inits = [numpy_helper.from_array(rng.standard_normal((K, N)).astype(np.float32), "W")]
    graph = helper.make_graph(nodes, kind, [a], [y], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[128, 4096])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    kinds = ("fp32", "int8", "int4 level 4", "int4 level 0")
    print("| rows | threads | " + " | ".join(f"{k} ms" for k in kinds) + " | int8 vs fp32 | int4 (level 4) vs fp32 |")
    print("|---:|---:|" + "---:|" * (len(kinds) + 2))
    for rows in args.rows:
        for threads in args.threads:
            options = ort.SessionOptions()
            options.intra_op_num_threads = threads
            sessions = {k: ort.InferenceSession(one_node_model(k, rows, rng).SerializeToString(), options,
                                                providers=["CPUExecutionProvider"]) for k in kinds}
            feed = {"A": rng.standard_normal((rows, K)).astype(np.float32)}
            times = rotating_rounds({k: functools.partial(sessions[k].run, None, feed) for k in kinds},
                                    rounds=args.rounds, warmup=2)
            med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
            print(f"| {rows} | {threads} | " + " | ".join(f"{med[k]:.3f}" for k in kinds)
                  + f" | {med['fp32'] / med['int8']:.2f}x | {med['fp32'] / med['int4 level 4']:.2f}x |")


if __name__ == "__main__":
    main()
