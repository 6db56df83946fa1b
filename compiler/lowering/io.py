"""Saving ONNX models: weights stored once, single file below 2 GB, byte-deterministic."""

from __future__ import annotations

from pathlib import Path

import onnx_ir as ir
import onnx_ir.passes.common as common_passes

_TWO_GB = 2**31 - 1


def finalize(model: ir.Model, *, keep_metadata: bool = False) -> ir.Model:
    """Dedupe identical weights and drop unused nodes/initializers, in place."""
    # Several linears may share one tensor (tied / factorized weights); after constant folding
    # each use can end up as its own copy of identical bytes, so dedupe by content.
    common_passes.DeduplicateInitializersPass()(model)
    common_passes.RemoveUnusedNodesPass()(model)
    common_passes.RemoveUnusedOpsetsPass()(model)
    if not keep_metadata:
        # Node metadata carries exporter stack traces and fx node dumps: large, path-dependent
        # and useless at run time. Dropping it keeps the file small and reproducible anywhere.
        common_passes.ClearMetadataAndDocStringPass()(model)
    return model


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
