"""Store embedding tables of a lowered model in fp16, in int8 with one fp32 scale per row, or in int4.

The quantize-embeddings pass simulates the precision in the graph; this realizes it in the ONNX
file. Each table initializer ``T`` becomes a small stored tensor plus constant-only ops that rebuild
``T`` under its old name:
  * fp16: ``T = Cast(T_fp16, to=float)``
  * int8: ``T = Mul(Cast(T_int8, to=float), T_scale)`` with ``T_scale`` [rows, 1]
  * int4: ``T_int4`` uint8 [rows, width / 2] holds q + 8 (q in [-7, 7]) two to a byte, low nibble first;
    standard ops split the nibbles (``hi = Floor(p / 16)``, ``lo = p - 16 hi`` on ``p = Cast(T_int4)``),
    interleave them, subtract 8 and multiply by ``Cast(T_scale)`` (float16 [rows, width / block, 1]).
    A last ``Gather(.., T_order, axis=1)`` with ``T_order`` = 0..width-1 leaves the columns as they are; it
    is there so that pairing (``pairing.py``), which may permute a factorized table's columns, can do so
    by permuting ``T_order`` instead of the packed nibbles.
Every consumer (EmbedLayerNormalization, a Gather, or the gather of a factorized table) is left as
it was, so the EmbedLayerNormalization fusion is kept. ONNX Runtime folds these constant ops when
the session loads: the file shrinks, the in-memory tables and the kernels are fp32 as before (load
time pays one dequantization; run time pays nothing; memory does not shrink).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def int8_rows(table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per row and its fp32 scales [rows, 1]; the same arithmetic as the pass's simulation."""
    table = table.astype(np.float32)
    scale = (np.maximum(np.abs(table).max(axis=1, keepdims=True), np.float32(1e-12)) / np.float32(127.0)).astype(np.float32)
    return np.clip(np.round(table / scale), -127, 127).astype(np.int8), scale


def int4_blocks(table: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int4 q in [-7, 7] [rows, width] and float16 scales [rows, width / block, 1]; the pass's arithmetic."""
    rows, width = table.shape
    blocks = table.astype(np.float32).reshape(rows, width // block, block)
    scale = np.clip(np.abs(blocks).max(axis=2, keepdims=True) / np.float32(7.0), 1e-7, 6e4).astype(np.float16)
    q = np.clip(np.rint(blocks / scale.astype(np.float32)), -7, 7).astype(np.int8)
    return q.reshape(rows, width), scale


def _int4_nodes(graph: onnx.GraphProto, name: str, array: np.ndarray, block: int) -> list[onnx.NodeProto]:
    rows, width = array.shape
    q, scale = int4_blocks(array, block)
    nibbles = (q + 8).astype(np.uint8)
    const = {f"{name}_int4": (nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)).astype(np.uint8),
             f"{name}_scale": scale,
             f"{name}_sixteen": np.array(16.0, np.float32), f"{name}_eight": np.array(8.0, np.float32),
             f"{name}_last": np.array([-1], np.int64),
             f"{name}_blocks": np.array([rows, width // block, block], np.int64),
             f"{name}_shape": np.array([rows, width], np.int64),
             f"{name}_order": np.arange(width, dtype=np.int64)}
    graph.initializer.extend(numpy_helper.from_array(value, key) for key, value in const.items())
    n = f"{name}_int4_"
    return [
        helper.make_node("Cast", [f"{name}_int4"], [n + "packed"], to=TensorProto.FLOAT, name=n + "cast"),
        helper.make_node("Div", [n + "packed", f"{name}_sixteen"], [n + "div"], name=n + "div"),
        helper.make_node("Floor", [n + "div"], [n + "hi"], name=n + "floor"),
        helper.make_node("Mul", [n + "hi", f"{name}_sixteen"], [n + "hi16"], name=n + "shift"),
        helper.make_node("Sub", [n + "packed", n + "hi16"], [n + "lo"], name=n + "lo"),
        helper.make_node("Unsqueeze", [n + "lo", f"{name}_last"], [n + "lo3"], name=n + "unsqueeze_lo"),
        helper.make_node("Unsqueeze", [n + "hi", f"{name}_last"], [n + "hi3"], name=n + "unsqueeze_hi"),
        helper.make_node("Concat", [n + "lo3", n + "hi3"], [n + "pairs"], axis=-1, name=n + "interleave"),
        helper.make_node("Reshape", [n + "pairs", f"{name}_blocks"], [n + "blocked"], name=n + "blocks"),
        helper.make_node("Sub", [n + "blocked", f"{name}_eight"], [n + "q"], name=n + "center"),
        helper.make_node("Cast", [f"{name}_scale"], [n + "scale"], to=TensorProto.FLOAT, name=n + "scale"),
        helper.make_node("Mul", [n + "q", n + "scale"], [n + "scaled"], name=n + "dequantize"),
        helper.make_node("Reshape", [n + "scaled", f"{name}_shape"], [n + "table"], name=n + "rows"),
        helper.make_node("Gather", [n + "table", f"{name}_order"], [name], axis=1, name=n + "order"),
    ]


def _find(initializers: dict[str, onnx.TensorProto], target: str, table: np.ndarray | None) -> onnx.TensorProto | None:
    # The exporter names initializers by their parameter path; fall back to content when it renamed one.
    if target in initializers:
        return initializers[target]
    if table is None:
        return None
    for tensor in initializers.values():
        if tuple(tensor.dims) == table.shape and np.array_equal(numpy_helper.to_array(tensor), table):
            return tensor
    return None


def store_embeddings(path: Path, precision: dict[str, str], tables: dict[str, np.ndarray],
                     blocks: dict[str, int] | None = None) -> dict:
    """Rewrite the model at ``path`` in place; ``precision`` maps a table's parameter path to fp16, int8 or int4
    (``blocks`` gives an int4 table's block size)."""
    path = Path(path)
    model = onnx.load(path)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if "int4" in precision.values() and opset < 13:
        raise ValueError(f"int4 tables need ONNX opset 13 or later (Unsqueeze with axes as an input); {path} has {opset}")
    graph = model.graph
    before = path.stat().st_size
    initializers = {t.name: t for t in graph.initializer}
    inputs = {i.name: i for i in graph.input}
    nodes, stored, left = [], {}, {}
    for target, dtype in sorted(precision.items()):
        tensor = _find(initializers, target, tables.get(target))
        if tensor is None:
            left[target] = "not found in the lowered model"
            continue
        array = numpy_helper.to_array(tensor)
        if array.dtype != np.float32 or array.ndim != 2:
            left[target] = f"stored as {array.dtype} {list(array.shape)} already"
            continue
        name = tensor.name
        graph.initializer.remove(tensor)
        if name in inputs:  # older IR versions list initializers as graph inputs too
            graph.input.remove(inputs[name])
        if dtype == "fp16":
            graph.initializer.append(numpy_helper.from_array(array.astype(np.float16), f"{name}_fp16"))
            nodes.append(helper.make_node("Cast", [f"{name}_fp16"], [name], to=TensorProto.FLOAT, name=f"{name}_from_fp16"))
        elif dtype == "int4":
            nodes += _int4_nodes(graph, name, array, (blocks or {})[target])
        else:
            quantized, scale = int8_rows(array)
            graph.initializer.extend([numpy_helper.from_array(quantized, f"{name}_int8"),
                                      numpy_helper.from_array(scale, f"{name}_scale")])
            nodes += [helper.make_node("Cast", [f"{name}_int8"], [f"{name}_int8_float"], to=TensorProto.FLOAT,
                                       name=f"{name}_from_int8"),
                      helper.make_node("Mul", [f"{name}_int8_float", f"{name}_scale"], [name], name=f"{name}_dequantize")]
        stored[name] = dtype
    for node in reversed(nodes):  # constant-only ops first keeps the node list topologically sorted
        graph.node.insert(0, node)
    onnx.save(model, path)
    return {"stored": stored, "left": left, "bytes_before": before, "bytes_after": path.stat().st_size,
            "note": "tables are dequantized by constant ops ONNX Runtime folds at load; fused embedding ops are kept"}
