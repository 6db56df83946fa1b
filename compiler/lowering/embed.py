"""Fuse BERT's embedding block into ORT's `EmbedLayerNormalization` contrib op.

Dynamo exports the embeddings as three Gathers (word, token type, Slice(position_ids)), two Adds
and a LayerNormalization; onnxscript has no rule for it. One fused kernel saves five ops and two
[B,S,H] temporaries. We only fuse the exact BERT shape and leave anything else alone:
  * word/type Gathers index the `input_ids` / `token_type_ids` graph inputs directly,
  * the position Gather indexes a constant `position_ids` buffer sliced from 0 that is arange
    (EmbedLayerNormalization then uses positions 0..S-1 itself).
The embedding tables stay fp32 unless quantization is asked to include embeddings.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from .fusions import MS_DOMAIN


def _producer(value: ir.Value | None, op_type: str) -> ir.Node | None:
    node = value.producer() if value is not None else None
    return node if node is not None and node.op_type == op_type and node.domain in ("", "ai.onnx") else None


def _const(value: ir.Value | None) -> np.ndarray | None:
    return value.const_value.numpy() if value is not None and value.const_value is not None else None


def _is_arange_slice_from_zero(value: ir.Value) -> bool:
    """indices = Slice(arange buffer [1, P], starts=0, ..., axes=1) -- HF's position_ids[:, :S]."""
    node = _producer(value, "Slice")
    if node is None:
        return False
    data, starts = _const(node.inputs[0]), _const(node.inputs[1])
    axes = _const(node.inputs[3]) if len(node.inputs) > 3 else None
    steps = _const(node.inputs[4]) if len(node.inputs) > 4 else None
    if data is None or starts is None or data.ndim != 2 or data.shape[0] != 1:
        return False
    if not (starts.size == 1 and int(starts.reshape(-1)[0]) == 0):
        return False
    if axes is not None and int(axes.reshape(-1)[0]) not in (1, -1):
        return False
    if steps is not None and int(steps.reshape(-1)[0]) != 1:
        return False
    return bool(np.array_equal(data[0], np.arange(data.shape[1])))


def _embedding_leaves(value: ir.Value, depth: int = 0) -> list[ir.Node] | None:
    """The Gather nodes summed by a tree of Adds ending at `value`, or None if anything else is summed."""
    gather = _producer(value, "Gather")
    if gather is not None:
        return [gather]
    add = _producer(value, "Add")
    if add is None or depth > 3 or len(value.uses()) != 1 and depth > 0:
        return None
    left, right = _embedding_leaves(add.inputs[0], depth + 1), _embedding_leaves(add.inputs[1], depth + 1)
    return None if left is None or right is None else left + right


def fuse_embed_layer_norm(model: ir.Model) -> tuple[int, str | None]:
    """Fuse in place; return (count, note)."""
    graph = model.graph
    inputs = {v.name: v for v in graph.inputs}
    ids, types = inputs.get("input_ids"), inputs.get("token_type_ids")
    if ids is None:
        return 0, None
    for ln in list(graph):
        if ln.op_type != "LayerNormalization" or len(ln.inputs) < 3 or ln.inputs[2] is None:
            continue
        leaves = _embedding_leaves(ln.inputs[0])
        if leaves is None or len(leaves) not in (2, 3):
            continue
        word = seg = pos = None
        for g in leaves:
            if g.attributes.get_int("axis", 0) != 0 or _const(g.inputs[0]) is None:
                break
            index = g.inputs[1]
            if index is ids and word is None:
                word = g
            elif types is not None and index is types and seg is None:
                seg = g
            elif pos is None and _is_arange_slice_from_zero(index):
                pos = g
            else:
                break
        else:
            if word is None or pos is None or len(leaves) != 1 + (seg is not None) + 1:
                continue
            eps = ln.attributes.get_float("epsilon", 1e-5)
            axis = ln.attributes.get_int("axis", -1)
            if axis not in (-1, 2):
                continue
            cast_ids = ir.Node("", "Cast", [ids], {"to": ir.AttrInt64("to", ir.DataType.INT32)},
                               name="input_ids_int32", num_outputs=1)
            cast_ids.outputs[0].name = "input_ids_int32"
            new_nodes = [cast_ids]
            seg_ids = None
            if seg is not None:
                cast_seg = ir.Node("", "Cast", [types], {"to": ir.AttrInt64("to", ir.DataType.INT32)},
                                   name="token_type_ids_int32", num_outputs=1)
                cast_seg.outputs[0].name = "token_type_ids_int32"
                new_nodes.append(cast_seg)
                seg_ids = cast_seg.outputs[0]
            fused = ir.Node(
                MS_DOMAIN, "EmbedLayerNormalization",
                [cast_ids.outputs[0], seg_ids, word.inputs[0], pos.inputs[0],
                 seg.inputs[0] if seg is not None else None, ln.inputs[1], ln.inputs[2]],
                {"epsilon": ir.AttrFloat32("epsilon", eps)},
                name="embeddings_EmbedLayerNormalization", num_outputs=2,
            )
            # Output 1 (mask_index) is required by the schema but unused: attention takes its
            # mask straight from attention_mask.
            fused.outputs[0].name = "embeddings_output"
            fused.outputs[1].name = "embeddings_mask_index"
            fused.outputs[0].shape, fused.outputs[0].type = ln.outputs[0].shape, ln.outputs[0].type
            new_nodes.append(fused)
            graph.insert_before(ln, new_nodes)
            ln.outputs[0].replace_all_uses_with(fused.outputs[0])
            if ln.outputs[0].is_graph_output():
                # An embeddings-only graph: keep the public output name on the fused node.
                idx = [i for i, v in enumerate(graph.outputs) if v is ln.outputs[0]]
                for i in idx:
                    graph.outputs[i] = fused.outputs[0]
            return 1, "fusions: embeddings fused into EmbedLayerNormalization (word + position + token type + LayerNorm)"
    return 0, "fusions: embedding block did not match EmbedLayerNormalization's pattern; left unfused"
