"""Saving ONNX models: weights stored once, single file below 2 GB, byte-deterministic."""

from __future__ import annotations

import hashlib
from pathlib import Path


import onnx_ir as ir
import onnx_ir.passes.common as common_passes

_TWO_GB = 2**31 - 1


def finalize(model: ir.Model, *, keep_metadata: bool = False) -> ir.Model:
    """Dedupe identical weights and drop unused nodes/initializers, in place."""
    # Several linears may share one tensor (tied / factorized weights); after constant folding
    # each use can end up as its own copy of identical bytes, so dedupe by content.
    dedupe_initializers(model)
    common_passes.RemoveUnusedNodesPass()(model)
    common_passes.RemoveUnusedOpsetsPass()(model)
    if not keep_metadata:
        # Node metadata carries exporter stack traces and fx node dumps: large, path-dependent
        # and useless at run time. Dropping it keeps the file small and reproducible anywhere.
        common_passes.ClearMetadataAndDocStringPass()(model)
    return model


# Zero-point inputs of integer ops, by op type (see dedupe_initializers).
ZERO_POINT_INPUTS = {"MatMulInteger": (2, 3), "DynamicQuantizeMatMul": (3,), "MatMulIntegerToFloat": (4, 5),
                     "QAttention": (6, 7), "QGemm": (2, 5, 8)}


def dedupe_initializers(model: ir.Model) -> int:
    """Point every use of a byte-identical initializer at its first copy; return #removed.

    Not the zero points of integer ops: the per-channel zero points of int8 weights are all zeros, so byte-identical
    across layers, and merging them breaks ONNX Runtime's exact u8 x u8 option (``session.x64quantprecision=1``,
    for x86 CPUs without VNNI, where the default u8 x s8 kernel adds pairs of products in 16 bits and saturates).
    That option converts each node's int8 weight and zero point to uint8, and refuses to load a model in which one
    zero point feeds several nodes ("Attempt to replace the existing tensor"). Zero points are one byte per
    output channel, so keeping them apart costs a few kilobytes. (Weights that a recipe shares on purpose, as
    share-layers does, stay shared; whether the option accepts one weight feeding several nodes is untested.)
    """
    # onnx_ir's own dedupe passes either skip tensors > 1 KB or choke on non-contiguous arrays
    # (exporter constants can be transposed views), so hash the C-order bytes ourselves.
    graph, seen, removed = model.graph, {}, 0
    outputs = {id(v) for v in graph.outputs}
    for name, value in list(graph.initializers.items()):
        if value.const_value is None or id(value) in outputs or value.is_graph_input():
            continue
        if any(index in ZERO_POINT_INPUTS.get(user.op_type, ()) for user, index in value.uses()):
            continue
        array = value.const_value.numpy()  # tobytes() is C-order even for strided views
        key = (str(value.const_value.dtype), array.shape, hashlib.sha256(array.tobytes()).hexdigest())
        first = seen.setdefault(key, value)
        if first is not value:
            value.replace_all_uses_with(first)
            del graph.initializers[name]
            removed += 1
    return removed


def initializer_bytes(model: ir.Model) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def save_model(model: ir.Model, path: Path, *, keep_metadata: bool = False) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    finalize(model, keep_metadata=keep_metadata)
    if initializer_bytes(model) < _TWO_GB:
        ir.save(model, path)
    else:
        # Protobuf cannot hold >2 GB; fall back to one external data file next to the model.
        ir.save(model, path, external_data=path.name + ".data")
    return path
