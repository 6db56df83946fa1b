"""Rewrite onnxscript's fused `Attention` into the form ORT's quantizer turns into `QAttention`.

onnxscript emits `Attention(x, Concat(Wq,Wk,Wv), Concat(bq,bk,bv), -, -, attention_bias)` with a
`qkv_hidden_sizes` attribute and a 4-D additive mask. `quantize_dynamic` skips any Attention that
has `qkv_hidden_sizes`, needs the packed weight to be an initializer, and `QAttention` has no
attention_bias slot. So, per Attention node:
  * fold the weight/bias Concat into one packed initializer (what the legacy optimizer emits),
  * drop `qkv_hidden_sizes` when q, k and v have the same width (always true for BERT),
  * replace the 4-D float bias by a 2-D key-padding `mask_index` = Cast(attention_mask, int32).
The mask swap assumes the bias is BERT's padding mask; `lower_to_onnx` verifies numerically on a
padded batch and re-lowers without this rewrite if that assumption is ever wrong.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from .export import module_path
from .fusions import MS_DOMAIN


def _const_array(value: ir.Value | None) -> np.ndarray | None:
    """Numpy array of a value that is constant, or a Concat of constants (folded here)."""
    if value is None:
        return None
    if value.const_value is not None:
        return value.const_value.numpy()
    node = value.producer()
    if node is None or node.op_type != "Concat" or node.domain not in ("", "ai.onnx"):
        return None
    parts = [_const_array(v) for v in node.inputs]
    if any(p is None for p in parts):
        return None
    return np.concatenate(parts, axis=node.attributes["axis"].as_int())


def _scope(node: ir.Node, index: int) -> str:
    # Name packed weights after the nn module they came from (readable, stable across runs).
    return module_path(node) or f"attention_{index}"


def _initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    """A new initializer, or the one already packed under ``name`` when it holds the same numbers: the repetitions
    of a shared layer (ALBERT) come from one module, and their packed weights stay one tensor in the file."""
    existing = graph.initializers.get(name)
    if existing is not None:
        if existing.const_value is not None and np.array_equal(existing.const_value.numpy(), array):
            return existing
        suffix = 1
        while f"{name}.{suffix}" in graph.initializers:
            suffix += 1
        name = f"{name}.{suffix}"
    value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.FLOAT),
                     const_value=ir.tensor(np.ascontiguousarray(array, dtype=np.float32), name=name))
    graph.register_initializer(value)
    return value


def pack_attention(model: ir.Model, mask_input: str = "attention_mask") -> tuple[int, list[str]]:
    """Rewrite fused Attention nodes in place; return (#rewritten, notes)."""
    graph = model.graph
    mask = next((v for v in graph.inputs if v.name == mask_input), None)
    mask_index: ir.Value | None = None
    notes: list[str] = []
    done = 0
    attentions = [n for n in graph if n.op_type == "Attention" and n.domain == MS_DOMAIN]
    for i, node in enumerate(attentions):
        scope = _scope(node, i)
        sizes = node.attributes.get("qkv_hidden_sizes")
        if sizes is not None and len(set(sizes.as_ints())) != 1:
            notes.append(f"attention: {scope} has unequal q/k/v widths {sizes.as_ints()}; left fp32 (QAttention cannot take them)")
            continue
        weight, bias = _const_array(node.inputs[1]), _const_array(node.inputs[2])
        extra = list(node.inputs[3:])
        bias_input = extra[2] if len(extra) > 2 else None
        if weight is None or bias is None or any(v is not None for v in extra[:2]) or mask is None:
            notes.append(f"attention: {scope} has non-constant weights or unexpected inputs; left as-is")
            continue
        if mask_index is None:
            # One shared int32 key-padding mask for all layers: QAttention's 2-D mask_index.
            cast = ir.Node("", "Cast", [mask], {"to": ir.AttrInt64("to", ir.DataType.INT32)},
                           name="attention_mask_int32", num_outputs=1)
            mask_index = cast.outputs[0]
            mask_index.name = "attention_mask_int32"
            graph.insert_before(attentions[0], cast)
        w = _initializer(graph, f"{scope}.qkv.weight", weight)
        b = _initializer(graph, f"{scope}.qkv.bias", bias)
        node.resize_inputs(4)
        node.replace_input_with(1, w)
        node.replace_input_with(2, b)
        # Without an attention_bias the node's mask must come from mask_index; with no mask at
        # all (bias_input None) attention was unmasked and stays unmasked.
        node.replace_input_with(3, mask_index if bias_input is not None else None)
        node.attributes.pop("qkv_hidden_sizes", None)
        done += 1
    return done, notes
