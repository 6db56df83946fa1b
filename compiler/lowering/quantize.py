"""Dynamic int8 weight quantization with ORT's `quantize_dynamic`, scoped by op type and module.

We pass an explicit op-type list (never the quantizer's default, which would also quantize the
embedding Gathers of a dynamo export) and exclude nodes by the nn-module path recorded in the
exporter's node metadata, so callers can say "keep encoder.layer.5.output.dense fp32".
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from pathlib import Path

import onnx_ir as ir

from .export import module_path
from .quiet import quiet

# Ops the quantizer emits; counted as "quantized" in the result.
QUANT_OPS = ("MatMulNBits", "QAttention", "MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat",
             "QEmbedLayerNormalization", "QGemm", "DynamicQuantizeLinear", "DequantizeLinear")
WEIGHT_OPS = ("MatMul", "Gemm", "Attention")


@dataclass
class QuantizeSpec:
    weight_dtype: str = "int8"  # ORT QInt8 weights ("uint8" -> QUInt8)
    per_channel: bool = True
    exclude_embeddings: bool = True  # never quantize Gather / embedding tables unless False
    # nn module path prefixes whose linears must stay fp32, e.g. "encoder.layer.5.output.dense".
    exclude_modules: list[str] = field(default_factory=list)


def _matches(path: str, prefix: str) -> bool:
    prefix = prefix.rstrip(".")
    if path == prefix or path.startswith(prefix + "."):
        return True
    # A fused node (Attention = q,k,v linears) is excluded if any module inside it is.
    return prefix.startswith(path + ".") and path != ""


def _has_const_weight(node: ir.Node) -> bool:
    return len(node.inputs) > 1 and node.inputs[1] is not None and node.inputs[1].const_value is not None


def plan_exclusions(model: ir.Model, spec: QuantizeSpec) -> tuple[list[str], list[str]]:
    """Node names to keep fp32 and human-readable notes. Call before metadata is cleared."""
    excluded, notes = [], []
    hits: dict[str, list[str]] = collections.defaultdict(list)
    for node in model.graph:
        if node.op_type not in WEIGHT_OPS or not _has_const_weight(node):
            continue
        path = module_path(node) or ""
        for prefix in spec.exclude_modules:
            if _matches(path, prefix):
                excluded.append(node.name)
                hits[prefix].append(f"{node.op_type}@{path}")
                break
    for prefix in spec.exclude_modules:
        if hits[prefix]:
            notes.append(f"quantize: kept {len(hits[prefix])} node(s) fp32 for exclude_modules {prefix!r}: {', '.join(hits[prefix])}")
        else:
            notes.append(f"quantize: exclude_modules {prefix!r} matched no weight op (nothing to keep fp32)")
    return excluded, notes


def op_types(spec: QuantizeSpec) -> list[str]:
    # Gemm is not in ORT's dynamic (IntegerOps) registry; the only Gemm in BERT is the pooler.
    ops = ["MatMul", "Attention"]
    if not spec.exclude_embeddings:
        ops += ["Gather", "EmbedLayerNormalization"]
    return ops


def quantize_file(src: Path, dst: Path, spec: QuantizeSpec, nodes_to_exclude: list[str]) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    if spec.weight_dtype not in ("int8", "uint8"):
        raise ValueError(f"QuantizeSpec.weight_dtype must be 'int8' or 'uint8', got {spec.weight_dtype!r}")
    with quiet():
        quantize_dynamic(
            model_input=str(src),
            model_output=str(dst),
            weight_type=QuantType.QInt8 if spec.weight_dtype == "int8" else QuantType.QUInt8,
            per_channel=spec.per_channel,
            op_types_to_quantize=op_types(spec),
            nodes_to_exclude=list(nodes_to_exclude),
            # Only weight x activation MatMuls: quantizing both operands of an unfused attention's
            # Q.K^T / P.V products costs accuracy for little speed.
            extra_options={"MatMulConstBOnly": True},
        )


def quantized_counts(model: ir.Model) -> dict[str, int]:
    counter = collections.Counter(n.op_type for n in model.graph.all_nodes() if n.op_type in QUANT_OPS)
    return dict(sorted(counter.items()))
