"""Which ops compute an additive attention bias outside ONNX Runtime's fused attention.

BERT's fused attention takes only a padding mask. DeBERTa-v2/v3's disentangled attention adds
content -> position and position -> content terms (compiler/disentangled_attention.py); ORT has no
kernel that computes them, so MultiHeadAttention takes them as its ``attention_bias`` input and the
ops that build it run unfused, one by one. This names them for the lowering notes.
"""

from __future__ import annotations

import collections

import onnx_ir as ir

from .fusions import MS_DOMAIN

BIAS_INPUT = 5  # attention_bias of com.microsoft MultiHeadAttention and Attention


def _ancestors(values) -> dict[int, ir.Node]:
    found: dict[int, ir.Node] = {}
    stack = [v for v in values if v is not None]
    while stack:
        node = stack.pop().producer()
        if node is None or id(node) in found:
            continue
        found[id(node)] = node
        stack.extend(v for v in node.inputs if v is not None)
    return found


def unfused_bias_ops(model: ir.Model) -> tuple[int, dict[str, int]]:
    """(how many fused attention nodes take an attention_bias, op type -> count of the ops that only compute the
    biases: not the query/key/value path the bias terms also read)."""
    attentions = [n for n in model.graph if n.domain == MS_DOMAIN and n.op_type in ("MultiHeadAttention", "Attention")
                  and len(n.inputs) > BIAS_INPUT and n.inputs[BIAS_INPUT] is not None]
    bias_only: dict[int, ir.Node] = {}
    for node in attentions:  # per node: what an earlier layer computed is on this one's query path too
        shared = _ancestors(node.inputs[:BIAS_INPUT])
        bias_only.update({k: n for k, n in _ancestors([node.inputs[BIAS_INPUT]]).items() if k not in shared})
    return len(attentions), dict(sorted(collections.Counter(n.op_type for n in bias_only.values()).items()))


def attention_bias_note(model: ir.Model) -> str | None:
    fused, ops = unfused_bias_ops(model)
    if not fused or not any(op in ops for op in ("MatMul", "MatMulInteger", "Gather", "GatherND", "GatherElements")):
        return None  # no bias, or only the padding mask cast to a bias
    listed = ", ".join(f"{op} x{count}" for op, count in ops.items())
    return (f"attention: {fused} fused attention node(s) take an additive attention_bias (relative-position terms, as in"
            f" DeBERTa) that ONNX Runtime has no kernel for; the ops computing it run unfused: {listed}")
