"""decouple-attention: the lowest k layers attend only within each segment (DeFormer, Cao et al. 2020).

Rewrites, for sentence-pair inputs (segments from ``token_type_ids``):

- the boolean ``[B, 1, S, S]`` mask of the lower k layers' scaled_dot_product_attention is ANDed
  with ``tt[:, :, None] == tt[:, None, :]`` (block-diagonal by segment, still combined with the
  key-padding mask), so a token of segment B never sees segment A below layer k;
- the position ids of the embeddings restart in every segment: a token's position is its index
  minus the index of the first real (non-padding) token of its segment, plus
  ``second_segment_position`` for segments other than 0. Restarting is what makes caching work:
  segment B's lower-layer states must not depend on how long segment A is, or a passage's states
  could not be computed once and reused for every query. Segment 0 starts at its first real token,
  which for right-padded input (what tokenizers produce) is index 0, so single-segment inputs keep
  their positions exactly.

The upper layers keep the joint mask and see the concatenated states. On single-segment inputs the
rewrite is an identity; on pairs it is lossy (an approximation of the joint model until distilled
on pairs). ``layers: 0`` is exact (nothing changes). The pass measures the pair fidelity against the
reference on sentence pairs it builds from real text (``pair_texts``), because held-out batches of a
single-segment calibration corpus cannot see the change; use a pair corpus (``builtin:wordnet-pairs``)
as calibration text to make the recipe's budget apply to pairs.

Lowering hint ``split: {layers: k}``: the driver also writes ``lower.onnx`` (embeddings + the k
decoupled layers, run on one segment) and ``upper.onnx`` (the remaining layers over the
concatenated states) and checks that they compose to ``model.onnx`` within 1e-4.

Needs: the structure analysis, a ``token_type_ids`` input feeding a token-type embedding, and the
reference model (for the pair-fidelity detail).
"""

from __future__ import annotations

import random

import torch
from torch.fx import GraphModule, Node

from compiler.calibration import load_texts, tokenize_batches
from compiler.graph_edit import get_tensor
from compiler.pass_infra import Pass, PassContext, PassResult, register_pass
from compiler.structure import SEGMENT_MASK
from compiler.tasks import task_of_model
from compiler.validation import compare, hidden_states, run_batches
from passes.options import DECOUPLE_ATTENTION

aten = torch.ops.aten


@register_pass
class DecoupleAttention(Pass):
    """Restrict the lower layers' attention to each segment and restart positions per segment."""

    declaration = DECOUPLE_ATTENTION
    judged_by_cost = False  # the speedup is in the cached split form (lower.onnx + upper.onnx)
    kind = "lossy"
    requires = ("structure", "reference", "tokenizer")
    summary = "DeFormer: lower layers attend within a segment; cacheable split lowering"

    def is_exact(self) -> bool:
        return self.config.count == 0

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        k = self.config.count
        task = task_of_model(ctx.reference)
        if task != "feature-extraction":
            raise self.refuse(f"decouple-attention splits an encoder into lower.onnx + upper.onnx that output hidden states,"
                              f" and this model is a {task} model: its head would be left out of the split form.",
                              fix="compile the encoder alone (task: feature-extraction) or remove decouple-attention.")
        structure = ctx.structure(gm)
        total = len(structure.layers)
        if ctx.lowering.get("int4_weights"):
            raise self.refuse("the split form (lower.onnx + upper.onnx) cannot store int4 weights yet, and an earlier "
                              "quantize-linear chose int4.", fix="use quantize-linear dtype int8 with decouple-attention.")
        if k >= total:
            raise self.refuse(f"layers: {k} would decouple all {total} layers; at least one upper layer must see both"
                              " segments (otherwise encode the segments as separate inputs).",
                              fix=f"use layers between 0 and {total - 1}.")
        if k == 0:
            return PassResult(gm, modified=False, details={"layers": 0})
        token_types = _placeholder(gm, "token_type_ids")
        attention_mask = _placeholder(gm, "attention_mask")
        position = structure.embeddings.position
        if token_types is None or structure.embeddings.token_type is None:
            raise self.refuse("the model takes no token_type_ids into a token-type embedding, so it has no segments"
                              " to decouple.", fix="use decouple-attention only on BERT-style models with segment ids.")
        table = structure.embeddings.token_type.args[0]
        while isinstance(table, Node) and table.op == "call_function":  # a simulated (quantized) table reads the real one
            table = table.args[0]
        segments = int(get_tensor(gm, table.target).shape[0]) if isinstance(table, Node) and table.op == "get_attr" else 2
        if segments < 2:
            raise self.refuse(f"the token-type table has {segments} row, so the model was trained on single segments"
                              " (as RoBERTa and XLM-R are) and cannot read a pair's second segment id.",
                              fix="use decouple-attention only on models with two or more token types (BERT, ELECTRA,"
                                  " ALBERT).")
        if position is None or attention_mask is None:
            raise self.refuse("no position-embedding lookup or attention_mask input was found in the traced graph.",
                              fix="use decouple-attention on BERT-style models with absolute position embeddings.")
        pairs = self._pair_batches(ctx)
        reference = run_batches(hidden_states(ctx.reference), pairs)
        before = run_batches(hidden_states(gm), pairs)

        graph = gm.graph
        with graph.inserting_before(position):
            same, start = _segment_nodes(graph, token_types, attention_mask)
            positions = _restarted_positions(graph, position.args[1], start, token_types,
                                             self.config.second_segment_position)
        position.args = (position.args[0], positions, *position.args[2:])
        masks: dict[Node | None, Node] = {}
        for layer in structure.layers[:k]:
            core = layer.attention.core
            mask = core.args[3] if len(core.args) > 3 else core.kwargs.get("attn_mask")
            if mask not in masks:
                with graph.inserting_before(core):
                    masks[mask] = _segment_mask(graph, mask, same, attention_mask)
            if len(core.args) > 3:
                core.args = (*core.args[:3], masks[mask], *core.args[4:])
            else:
                core.kwargs = {**core.kwargs, "attn_mask": masks[mask]}
        graph.lint()
        gm.recompile()

        details = {"layers": k, "upper_layers": total - k, "positions": "restart per segment",
                   "second_segment_position": self.config.second_segment_position}
        if pairs:
            after = run_batches(hidden_states(gm), pairs)
            vs_reference = compare(reference, after, pairs)
            details["pair_fidelity"] = {
                "texts": self.config.pair_texts, "pairs": sum(len(b["input_ids"]) for b in pairs),
                "cosine_vs_reference": round(vs_reference.cosine, 6),
                "cosine_min_vs_reference": round(vs_reference.cosine_min, 6),
                "max_abs_error_vs_reference": vs_reference.max_abs_error,
                "cosine_vs_before": round(compare(before, after, pairs).cosine, 6),
            }
        return PassResult(gm, modified=True, details=details, lowering={"split": {"layers": k}})

    def _pair_batches(self, ctx: PassContext) -> list[dict[str, torch.Tensor]]:
        cfg = self.config
        if cfg.pair_samples == 0:
            return []
        pairs = [p for p in load_texts(cfg.pair_texts, ctx.base_dir) if isinstance(p, tuple)]
        if not pairs:
            raise self.refuse(f"pair_texts {cfg.pair_texts!r} has no sentence pairs.",
                              fix="use builtin:wordnet-pairs or builtin:python-docs-pairs.")
        picked = random.Random(ctx.seed).sample(pairs, min(cfg.pair_samples, len(pairs)))
        return tokenize_batches(ctx.tokenizer, picked, cfg.pair_max_length, 16)


def _placeholder(gm: GraphModule, name: str) -> Node | None:
    return next((n for n in gm.graph.nodes if n.op == "placeholder" and n.name == name), None)


def _call(graph, target, *args, **kwargs) -> Node:
    node = graph.call_function(target, args, kwargs)
    node.meta[SEGMENT_MASK] = True
    return node


def _segment_nodes(graph, token_types: Node, attention_mask: Node) -> tuple[Node, Node]:
    """``same[b, i, j]``: tokens i and j are in one segment; ``start[b, i]``: first real token of i's segment."""
    same = _call(graph, aten.eq.Tensor, _call(graph, aten.unsqueeze.default, token_types, 2),
                 _call(graph, aten.unsqueeze.default, token_types, 1))
    real = _call(graph, aten.ne.Scalar, _call(graph, aten.unsqueeze.default, attention_mask, 1), 0)
    # argmax returns the first maximum: the first real key in the query's segment (0 if it has none).
    first = _call(graph, aten._to_copy.default, _call(graph, aten.logical_and.default, same, real), dtype=torch.float32)
    start = _call(graph, aten.argmax.default, first, -1)
    return same, start


def _restarted_positions(graph, positions: Node, start: Node, token_types: Node, offset: int) -> Node:
    """position - start of the token's segment (+ offset for segments after the first)."""
    restarted = _call(graph, aten.sub.Tensor, positions, start)
    if offset:
        later = _call(graph, aten.mul.Tensor, _call(graph, aten.ne.Scalar, token_types, 0), offset)
        restarted = _call(graph, aten.add.Tensor, restarted, later)
    return restarted


def _segment_mask(graph, mask: Node | None, same: Node, attention_mask: Node) -> Node:
    """The layer's mask restricted to same-segment keys (bool AND, or -inf bias for additive masks)."""
    same4 = _call(graph, aten.unsqueeze.default, same, 1)
    if mask is None:  # no padding mask was materialized: build the key-padding mask ourselves
        keys = _call(graph, aten.ne.Scalar, _call(graph, aten.unsqueeze.default,
                                                  _call(graph, aten.unsqueeze.default, attention_mask, 1), 1), 0)
        return _call(graph, aten.logical_and.default, same4, keys)
    value = mask.meta.get("val")
    if value is None or value.dtype == torch.bool:
        return _call(graph, aten.logical_and.default, mask, same4)
    return _call(graph, aten.masked_fill.Scalar, mask, _call(graph, aten.logical_not.default, same4),
                 torch.finfo(value.dtype).min)
