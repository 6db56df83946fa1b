"""ONNX Runtime transformer fusions on a dynamo export, via onnxscript's `ort_fusions`.

onnxscript turns the exporter's decomposed SDPA / LayerNorm / Gelu into ORT contrib ops
(Attention, SkipLayerNormalization, BiasGelu, ...). We only drive it and count what fired;
the follow-up rewrites that make the result quantizable live in `packed_attention.py`.
"""

from __future__ import annotations

import collections
import contextlib
from unittest import mock

import onnx_ir as ir
from onnxscript.rewriter.ort_fusions import _core as _ort_core
from onnxscript.rewriter.ort_fusions import optimize_for_ort

from .quiet import quiet

MS_DOMAIN = "com.microsoft"
# Quantized contrib ops are the same fusion after quantization; fold them onto their base name
# so fusion counts do not depend on whether quantization ran.
_QUANT_BASE = {"QAttention": "Attention", "QEmbedLayerNormalization": "EmbedLayerNormalization"}


def run_ort_fusions(model: ir.Model, *, attention: bool = True) -> dict[str, int]:
    """Apply onnxscript's ORT fusions in place; return onnxscript's own (non-zero) rule counts.

    ``attention=False`` stops at MultiHeadAttention: onnxscript's last attention rule folds the q/k/v
    MatMul weights into an ``Attention`` node, where no weight-only quantizer (MatMulNBits) can reach them.
    """
    # optimize_for_ort prints pattern-matcher chatter on some failures; keep stdout clean.
    with quiet(), contextlib.ExitStack() as stack:
        if not attention:
            stack.enter_context(mock.patch.object(_ort_core, "fuse_attention", lambda *args, **kwargs: 0))
        _, counts = optimize_for_ort(model)
    return {k: v for k, v in counts.items() if v}


def op_counts(model: ir.Model) -> dict[str, int]:
    counter = collections.Counter(node.op_type for node in model.graph.all_nodes())
    return dict(sorted(counter.items()))


def fused_op_counts(model: ir.Model) -> dict[str, int]:
    """Counts of ORT contrib (com.microsoft) ops in the model, quantized variants folded in."""
    counter: collections.Counter = collections.Counter()
    for node in model.graph.all_nodes():
        if node.domain == MS_DOMAIN and node.op_type not in _QUANTIZER_HELPERS:
            counter[_QUANT_BASE.get(node.op_type, node.op_type)] += 1
    return dict(sorted(counter.items()))


# Contrib ops the quantizer (not a fusion) introduces; reported under `quantized` instead.
_QUANTIZER_HELPERS = {"DynamicQuantizeMatMul", "MatMulIntegerToFloat", "DynamicQuantizeLSTM", "MatMulNBits"}
