"""Store embedding tables of a lowered model in fp16, or in int8 with one fp32 scale per row.

The quantize-embeddings pass simulates the precision in the graph; this realizes it in the ONNX
file. Each table initializer ``T`` becomes a small stored tensor plus constant-only ops that rebuild
``T`` under its old name:
  * fp16: ``T = Cast(T_fp16, to=float)``
  * int8: ``T = Mul(Cast(T_int8, to=float), T_scale)`` with ``T_scale`` [rows, 1]
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


def store_embeddings(path: Path, precision: dict[str, str], tables: dict[str, np.ndarray]) -> dict:
    """Rewrite the model at ``path`` in place; ``precision`` maps a table's parameter path to fp16 or int8."""
    path = Path(path)
    model = onnx.load(path)
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
