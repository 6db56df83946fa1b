"""Can another ONNX Runtime attention kernel beat QAttention's masked attention core on this machine?

One MiniLM attention block (hidden 384, 12 heads of 32, packed q/k/v projection) at batch x 128 tokens, with a
key-padding mask (every other sequence padded after token 90), each form int8-quantized by quantize_dynamic as
bertpress's lowering does and timed in interleaved rounds (rotating order, spinning off); medians in ms and the
ratio of QAttention's time to each form's:
  * qattention: com.microsoft Attention(x, W_qkv, b_qkv, mask_index) -> QAttention, what bertpress lowers to;
  * matmul + mha (mask): DynamicQuantizeMatMul for q/k/v, then MultiHeadAttention with key_padding_mask;
  * matmul + mha flash (mask in q/k): the same, but the mask rides in an extra 33rd q/k dimension per head
    (q gets a constant 1, k gets 0 or -10000 * sqrt(32)), so q.k^T * scale carries the additive -10000 mask and
    MultiHeadAttention takes its flash path, which it only takes without key_padding_mask. Exact on real tokens.
  * fp32 attention core only (no projections), for scale: MultiHeadAttention with key_padding_mask and the
    flash form without it, on the same q/k/v.
The outputs on real tokens are checked against an fp32 reference first. ORT's per-node profile of the int8
forms is printed: QAttention is one node, so its core's share is its time minus the projection's.

Usage: python bench/attention_kernels.py [--batch 32] [--threads 2] [--rounds 15]
"""

from __future__ import annotations

import argparse
import collections
import functools
import statistics
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import QuantType, quantize_dynamic

from compiler.benchmark import rotating_rounds
from compiler.inspect import profile_node_times
from compiler.lowering.quiet import quiet

HEADS, HEAD, SEQ = 12, 32, 128
HIDDEN = HEADS * HEAD
MASK_BIAS = -10000.0  # what ORT's attention kernels add for a padded key
OPSETS = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]


def _io():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", HIDDEN])
    mask = helper.make_tensor_value_info("mask", TensorProto.INT64, ["batch", "seq"])
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", HIDDEN])
    return x, mask, out


def qattention_model(w: np.ndarray, b: np.ndarray) -> onnx.ModelProto:
    x, mask, out = _io()
    nodes = [helper.make_node("Cast", ["mask"], ["mask32"], to=TensorProto.INT32),
             helper.make_node("Attention", ["x", "w", "b", "mask32"], ["y"], domain="com.microsoft", num_heads=HEADS)]
    graph = helper.make_graph(nodes, "qattention", [x, mask], [out], [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    return helper.make_model(graph, opset_imports=OPSETS)


def _widen(w: np.ndarray, b: np.ndarray, extra_bias: float) -> tuple[np.ndarray, np.ndarray]:
    """Give every head a 33rd output: weight column 0, bias ``extra_bias``."""
    w33 = np.concatenate([w.reshape(HIDDEN, HEADS, HEAD), np.zeros((HIDDEN, HEADS, 1), np.float32)], -1)
    b33 = np.concatenate([b.reshape(HEADS, HEAD), np.full((HEADS, 1), extra_bias, np.float32)], -1)
    return w33.reshape(HIDDEN, -1), b33.reshape(-1)


def mha_model(w: np.ndarray, b: np.ndarray, flash: bool) -> onnx.ModelProto:
    x, mask, out = _io()
    wq, bq, wk, bk, wv, bv = w[:, :HIDDEN], b[:HIDDEN], w[:, HIDDEN:2 * HIDDEN], b[HIDDEN:2 * HIDDEN], w[:, 2 * HIDDEN:], b[2 * HIDDEN:]
    inits = {}
    if flash:
        (wq, bq), (wk, bk) = _widen(wq, bq, 1.0), _widen(wk, bk, 0.0)
        onehot = np.zeros((HEADS, HEAD + 1), np.float32)
        onehot[:, HEAD] = MASK_BIAS * np.sqrt(HEAD)  # times the 1/sqrt(32) scale: -10000 on a padded key
        inits.update(onehot=onehot.reshape(-1), one=np.array(1.0, np.float32), axis=np.array([2], np.int64))
    qk = wq.shape[1]
    inits.update(w=np.concatenate([wq, wk, wv], 1), b=np.concatenate([bq, bk, bv]),
                 split=np.array([qk, qk, HIDDEN], np.int64))
    nodes = [helper.make_node("MatMul", ["x", "w"], ["qkv"]),
             helper.make_node("Split", ["qkv", "split"], ["q", "k0" if flash else "k", "v"], axis=2)]
    if flash:
        nodes += [helper.make_node("Cast", ["mask"], ["maskf"], to=TensorProto.FLOAT),
                  helper.make_node("Sub", ["one", "maskf"], ["padded"]),
                  helper.make_node("Unsqueeze", ["padded", "axis"], ["padded3"]),
                  helper.make_node("Mul", ["padded3", "onehot"], ["mask_term"]),
                  helper.make_node("Add", ["k0", "mask_term"], ["k"]),
                  helper.make_node("MultiHeadAttention", ["q", "k", "v", "b"], ["y"], domain="com.microsoft",
                                   num_heads=HEADS, scale=float(1 / np.sqrt(HEAD)))]
    else:
        nodes += [helper.make_node("Cast", ["mask"], ["mask32"], to=TensorProto.INT32),
                  helper.make_node("MultiHeadAttention", ["q", "k", "v", "b", "mask32"], ["y"], domain="com.microsoft",
                                   num_heads=HEADS)]
    graph = helper.make_graph(nodes, "mha", [x, mask], [out], [numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=OPSETS)


def core_model(flash: bool) -> onnx.ModelProto:
    width = HEADS * (HEAD + 1) if flash else HIDDEN
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", "seq", width if n in "qk" else HIDDEN]) for n in "qkv"]
    inputs = ["q", "k", "v"]
    if not flash:
        io.append(helper.make_tensor_value_info("mask32", TensorProto.INT32, ["batch", "seq"]))
        inputs += ["", "mask32"]
    node = helper.make_node("MultiHeadAttention", inputs, ["y"], domain="com.microsoft", num_heads=HEADS,
                            scale=float(1 / np.sqrt(HEAD)))
    graph = helper.make_graph([node], "core", io, [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", HIDDEN])])
    return helper.make_model(graph, opset_imports=OPSETS)


def _session(model: onnx.ModelProto | Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    source = str(model) if isinstance(model, Path) else model.SerializeToString()
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def _per_op(path: Path, feeds: dict, threads: int, runs: int = 6) -> dict[str, float]:
    """Milliseconds per run by op type of ORT's optimized graph (per node: median over runs; compiler.inspect)."""
    per_node, graph = profile_node_times(path, feeds, threads=threads, runs=runs, basic=False)
    op_of = dict(graph)
    per_op: dict[str, float] = collections.defaultdict(float)
    for name, microseconds in per_node.items():
        per_op[op_of.get(name, name)] += microseconds / 1e3
    return dict(sorted(per_op.items(), key=lambda kv: -kv[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((HIDDEN, 3 * HIDDEN)) * 0.05).astype(np.float32)
    b = (rng.standard_normal(3 * HIDDEN) * 0.1).astype(np.float32)
    x = rng.standard_normal((args.batch, SEQ, HIDDEN)).astype(np.float32)
    mask = np.ones((args.batch, SEQ), np.int64)
    mask[::2, 90:] = 0
    feeds = {"x": x, "mask": mask}
    forms = {"qattention": qattention_model(w, b), "matmul + mha (mask)": mha_model(w, b, flash=False),
             "matmul + mha flash (mask in q/k)": mha_model(w, b, flash=True)}

    runs, int8_paths, ran_as = {}, {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        reference = _session(forms["qattention"], args.threads).run(None, feeds)[0]
        real = mask.astype(bool)
        print(f"onnxruntime {ort.__version__}; attention block at batch {args.batch} x seq {SEQ}, hidden {HIDDEN},"
              f" {HEADS} heads, {args.threads} threads, {args.rounds} interleaved rounds\n")
        print("max |difference| on real tokens against the fp32 Attention op:")
        for name, model in forms.items():
            fp32 = Path(tmp) / f"{len(int8_paths)}.onnx"
            int8 = fp32.with_suffix(".int8.onnx")
            for index, node in enumerate(model.graph.node):  # named, so profiled nodes map back to their op types
                node.name = node.name or f"{node.op_type.lower()}_{index}"
            onnx.save(model, fp32)
            with quiet():
                quantize_dynamic(str(fp32), str(int8), weight_type=QuantType.QInt8, per_channel=False)
            int8_paths[name] = int8
            fp32_out = _session(model, args.threads).run(None, feeds)[0]
            sess = _session(int8, args.threads)
            int8_out = sess.run(None, feeds)[0]
            print(f"- {name}: fp32 {np.abs(fp32_out - reference)[real].max():.1e}, int8 {np.abs(int8_out - reference)[real].max():.1e}")
            runs[name] = functools.partial(sess.run, None, feeds)
            ran_as[name] = [n.op_type for n in onnx.load(int8).graph.node]
        # The attention core alone, fp32, on the same q/k/v (projections done in numpy).
        qkv = x @ w + b
        q, k, v = np.split(qkv, 3, axis=-1)
        q33 = np.concatenate([q.reshape(*q.shape[:2], HEADS, HEAD), np.ones((*q.shape[:2], HEADS, 1), np.float32)], -1)
        pad = ((1 - mask) * MASK_BIAS * np.sqrt(HEAD)).astype(np.float32)
        k33 = np.concatenate([k.reshape(*k.shape[:2], HEADS, HEAD), np.broadcast_to(pad[:, :, None, None], (*k.shape[:2], HEADS, 1))], -1)
        core_feeds = {"core, key_padding_mask": (core_model(False), {"q": q, "k": k, "v": v, "mask32": mask.astype(np.int32)}),
                      "core, flash (mask in q/k)": (core_model(True), {"q": q33.reshape(*q.shape[:2], -1).astype(np.float32),
                                                                       "k": k33.reshape(*k.shape[:2], -1).astype(np.float32), "v": v})}
        core_out = {}
        for name, (model, f) in core_feeds.items():
            sess = _session(model, args.threads)
            core_out[name] = sess.run(None, f)[0]
            runs[name] = functools.partial(sess.run, None, f)
        print(f"- core forms agree on real tokens to {np.abs(core_out['core, key_padding_mask'] - core_out['core, flash (mask in q/k)'])[real].max():.1e}")

        times = rotating_rounds(runs, rounds=args.rounds, warmup=2)
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        base = med["qattention"]
        print("\n| form | median ms | QAttention / form |")
        print("|---|---:|---:|")
        for name, ms in med.items():
            print(f"| {name} | {ms:.2f} | {base / ms:.2f}x |")
        print("\nORT per-node profile of the int8 forms (ms per run, per node the median of 6 runs):")
        for name, path in int8_paths.items():
            ops = _per_op(path, feeds, args.threads)
            print(f"- {name}: " + ", ".join(f"{op} {ms:.2f}" for op, ms in ops.items() if ms >= 0.05))
            print(f"  (model ops: {' -> '.join(ran_as[name])})")


if __name__ == "__main__":
    main()
