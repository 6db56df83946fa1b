"""What ONNX Runtime's u8 x s8 saturation costs a compiled int8 model, and what the exact u8 x u8 option costs in speed.

On x86 CPUs without VNNI (AVX2, AVX-512 without VNNI), ONNX Runtime multiplies uint8 activations by int8 weights
with VPMADDUBSW, which adds each pair of neighbouring products (k = 2i, 2i+1) in 16 bits and saturates at 32767;
the session option ``session.x64quantprecision=1`` converts the weights to uint8 and uses exact u8 x u8 kernels.
For each compiled output folder this runs its model.onnx both ways, in one process:

  * fidelity on the flagship recipe's held-out WordNet glosses (bench/compare.py's slice and metrics) against
    PyTorch fp32 MiniLM: mean cosine of mean-pooled embeddings and top-10 neighbour overlap;
  * latency at batch 32 x seq 128 (and batch 1), 2 threads, interleaved rounds with the settle pause
    (compiler.benchmark.rotating_rounds), as medians and the exact/default ratio.

With ``--paired`` it also runs each model after compiler.lowering.pairing (the exact reordering of int8 weight
rows that a compile applies itself, so --paired is for outputs built without it, such as the split form) with the
default kernel: its fidelity, and its latency in the same rounds.

It also checks the kernel itself: one DynamicQuantizeMatMul whose neighbouring weights are large and of the same
sign, against exact integer arithmetic (relative error 0 on a VNNI machine, large where the kernel saturates).

    python bench/saturation.py [OUT_DIR ...] [--paired] [--rounds32 9] [--rounds1 30] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import compare  # noqa: E402  (held-out slice, embedding and fidelity metrics shared with bench/compare.py)
from compiler.benchmark import SETTLE_SECONDS, rotating_rounds, synthetic_batch, vocab_size  # noqa: E402
from compiler.runtime import session  # noqa: E402

OPTION = "session.x64quantprecision"


def with_own_zero_points(path: Path, tmp: Path) -> Path:
    """``path`` itself if no zero point feeds two integer ops; else a copy in ``tmp`` where each has its own.

    The exact option refuses to load a model whose integer ops share a zero point (compiler.lowering.io keeps them
    apart; an output folder from another lowering may not). The copy is numerically the same model.
    """
    import onnx_ir as ir

    from compiler.lowering.io import ZERO_POINT_INPUTS

    model = ir.load(path)
    copied = 0
    for node in model.graph.all_nodes():
        for index in ZERO_POINT_INPUTS.get(node.op_type, ()):
            value = node.inputs[index] if index < len(node.inputs) else None
            if value is None or value.const_value is None or len(value.uses()) < 2:
                continue
            name = f"{value.name}__{node.name}"
            own = ir.Value(name=name, shape=value.shape, type=value.type,
                           const_value=ir.Tensor(value.const_value.numpy().copy(), name=name))
            model.graph.register_initializer(own)
            node.replace_input_with(index, own)
            copied += 1
    if not copied:
        return path
    print(f"{path}: {copied} shared zero point(s) given their own copy for the exact option")
    out = tmp / f"{path.parent.name}.onnx"
    ir.save(model, out)
    return out


def kernel_check() -> float:
    """Relative error of one DynamicQuantizeMatMul built to saturate (pairs of weights at +127, activations near max)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    k, n, m = 384, 64, 32
    weights = np.zeros((k, n), np.int8)
    weights[0::4] = 127
    weights[1::4] = 127  # rows 4i and 4i+1 are neighbours in one 16-bit pair sum
    scale = np.full((n,), 0.01, np.float32)
    x = np.random.default_rng(0).uniform(0.95, 1.0, size=(m, k)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("DynamicQuantizeMatMul", ["x", "w", "s", "", ""], ["y"], domain="com.microsoft")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])],
        initializer=[numpy_helper.from_array(weights, "w"), numpy_helper.from_array(scale, "s")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    y = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    low, high = min(0.0, float(x.min())), max(0.0, float(x.max()))
    step = (high - low) / 255
    zero = np.round(-low / step)
    q = np.clip(np.round(x / step) + zero, 0, 255)
    exact = ((q - zero) @ weights.astype(np.float64)) * step * scale
    return float(np.abs(y - exact).max() / np.abs(exact).max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="*", type=Path, default=[ROOT / "out" / "minilm-fast"])
    parser.add_argument("--rounds32", type=int, default=9)
    parser.add_argument("--rounds1", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--paired", action="store_true", help="also the model after compiler.lowering.pairing")
    args = parser.parse_args()
    from transformers import AutoTokenizer

    for folder in args.folders:
        if not (folder / "model.onnx").is_file():
            recipe = compare.known_recipes().get(folder.name)
            raise SystemExit(f"bench/saturation.py: {folder}/model.onnx does not exist; compile the recipe first "
                             f"(bertpress compile {compare._shown(recipe) if recipe else 'RECIPE'} --out {folder}).")
    loaded = compare.load_model(compare.MODEL)
    texts, label = compare.heldout_texts()
    reference = compare.embed(compare.torch_run(loaded.model.eval()), loaded.tokenizer, texts)
    print(f"kernel check (one saturating DynamicQuantizeMatMul): relative error {kernel_check():.3g}; "
          f"{platform.processor() or platform.machine()}")
    rows, tmp = [], Path(tempfile.mkdtemp(prefix="bertpress-saturation-"))
    for folder in args.folders:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        path = with_own_zero_points(folder / "model.onnx", tmp)
        variants = {"default": (path, "0"), "exact": (path, "1")}
        if args.paired:
            import onnx_ir as ir

            from compiler.lowering.pairing import pair_int8_weights

            model = ir.load(path)
            for note in pair_int8_weights(model):
                print(f"{folder.name}: {note}")
            ir.save(model, tmp / f"{folder.name}-paired.onnx")
            variants["paired"] = (tmp / f"{folder.name}-paired.onnx", "0")
        sessions = {name: session(p, args.threads, {OPTION: exact}) for name, (p, exact) in variants.items()}
        row = {"model": folder.name}
        for name, sess in sessions.items():
            names = {i.name for i in sess.get_inputs()}
            emb = compare.embed(lambda feeds, s=sess, n=names: s.run(None, {k: v for k, v in feeds.items() if k in n})[0],
                                tokenizer, texts)
            row[name] = compare.fidelity(emb, reference)
        for batch, rounds in ((32, args.rounds32), (1, args.rounds1)):
            feeds = synthetic_batch(batch, compare.SEQ, vocab_size(folder))
            runs = {name: (lambda s=sess: s.run(None, {i.name: feeds[i.name] for i in s.get_inputs()}))
                    for name, sess in sessions.items()}
            seconds = rotating_rounds(runs, rounds=rounds, settle=SETTLE_SECONDS)
            ms = {name: 1000 * statistics.median(seconds[name]) for name in sessions}
            row[f"b{batch}"] = {f"{name}_ms": round(value, 2) for name, value in ms.items()}
            row[f"b{batch}"].update({f"{name}_over_default": round(value / ms["default"], 3)
                                     for name, value in ms.items() if name != "default"})
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\nfidelity on {label} against PyTorch fp32; latency at seq {compare.SEQ}, {args.threads} threads")
    print("| model | cosine default | cosine exact | overlap default | overlap exact | b32 ms default | b32 ms exact | exact/default b32 | exact/default b1 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        d, e = r["default"], r["exact"]
        print(f"| {r['model']} | {d['cosine']:.4f} | {e['cosine']:.4f} | {d['overlap10']:.3f} | {e['overlap10']:.3f} | "
              f"{r['b32']['default_ms']:.1f} | {r['b32']['exact_ms']:.1f} | {r['b32']['exact_over_default']:.2f}x | "
              f"{r['b1']['exact_over_default']:.2f}x |")
    if args.paired:
        print("\npaired (compiler.lowering.pairing), default kernel:")
        print("| model | cosine default | cosine paired | cosine exact | overlap default | overlap paired | paired/default b32 | paired/default b1 |")
        print("|---|---|---|---|---|---|---|---|")
        for r in rows:
            d, q, e = r["default"], r["paired"], r["exact"]
            print(f"| {r['model']} | {d['cosine']:.4f} | {q['cosine']:.4f} | {e['cosine']:.4f} | {d['overlap10']:.3f} | "
                  f"{q['overlap10']:.3f} | {r['b32']['paired_over_default']:.3f}x | {r['b1']['paired_over_default']:.3f}x |")

if __name__ == "__main__":
    main()
