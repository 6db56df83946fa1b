"""DeBERTa-v2/v3's disentangled attention, traced as one scaled_dot_product_attention with an additive bias.

transformers runs DeBERTa-v2 only in eager attention (bmm, softmax, bmm), which the structure analysis
and ONNX Runtime's attention fusions do not read. The same attention is

    softmax((q k^T + c2p + p2c) / sqrt(d * factor) masked) v
      c2p[i, j] = q_i . key_proj(r)[bucket(i - j)]      (content -> position)
      p2c[i, j] = k_j . query_proj(r)[bucket(j - i)]    (position -> content)

with r the (layer-normed) relative-position embeddings, so while tracing every DisentangledSelfAttention
runs that form: scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1/sqrt(d * factor)), the
relative terms and the padding mask folded into ``bias``. Heads are views [batch, seq, -1, head_size] on
both the content and the relative-position projections, so removing a head's rows from query_proj /
key_proj (or pos_query_proj / pos_key_proj) removes it from both terms at once. The reference model
keeps transformers' own eager forward; the pass manager checks the traced form against it.
"""

from __future__ import annotations

import math
import types
from contextlib import contextmanager

import torch

# Members transformers loads only with eager attention, and that this module traces in SDPA form.
EAGER_ATTENTION = ("deberta-v2",)


def _heads(x: torch.Tensor, head_size: int) -> torch.Tensor:
    """[batch, seq, heads * head_size] -> [batch, heads, seq, head_size], the head count read from the width."""
    return x.view(x.size(0), x.size(1), -1, head_size).transpose(1, 2)


def _relative_bias(self, q: torch.Tensor, k: torch.Tensor, relative_pos: torch.Tensor,
                   rel_embeddings: torch.Tensor) -> torch.Tensor:
    """c2p + p2c [batch, heads, seq, seq], unscaled (transformers' disentangled_attention_bias, head-count free)."""
    span = self.pos_ebd_size
    relative_pos = relative_pos.reshape(relative_pos.shape[-2], relative_pos.shape[-1]).to(torch.long)
    table = rel_embeddings.reshape(-1, rel_embeddings.shape[-1])[0:span * 2].unsqueeze(0)
    size = self.attention_head_size
    if self.share_att_key:
        pos_query_proj, pos_key_proj = self.query_proj, self.key_proj
    else:
        pos_query_proj, pos_key_proj = getattr(self, "pos_query_proj", None), getattr(self, "pos_key_proj", None)
    # [i, j] picks column index[i, j] of row i, for every batch and head: advanced indexing, not gather, whose
    # index would have to be expanded to the head count and so fix it in the traced graph.
    rows = torch.arange(relative_pos.shape[0], device=q.device).unsqueeze(1)
    bias = None
    if "c2p" in self.pos_att_type:
        pos_key = _heads(pos_key_proj(table), size)  # [1, heads, 2 span, d]
        c2p = torch.matmul(q, pos_key.transpose(-1, -2))  # [batch, heads, query, 2 span]
        bias = c2p[:, :, rows, torch.clamp(relative_pos + span, 0, span * 2 - 1)]
    if "p2c" in self.pos_att_type:
        pos_query = _heads(pos_query_proj(table), size)
        p2c = torch.matmul(k, pos_query.transpose(-1, -2))  # [batch, heads, key, 2 span]
        p2c = p2c[:, :, rows, torch.clamp(-relative_pos + span, 0, span * 2 - 1)].transpose(-1, -2)
        bias = p2c if bias is None else bias + p2c
    return bias


def sdpa_forward(self, hidden_states, attention_mask, output_attentions=False, query_states=None, relative_pos=None,
                 rel_embeddings=None):
    """DisentangledSelfAttention.forward as one scaled_dot_product_attention (self-attention, no attention probs)."""
    from transformers.models.deberta_v2.modeling_deberta_v2 import build_relative_position

    if output_attentions or query_states is not None:
        raise NotImplementedError("the traced DeBERTa attention returns no attention probabilities and attends to itself")
    size = self.attention_head_size
    q = _heads(self.query_proj(hidden_states), size)
    k = _heads(self.key_proj(hidden_states), size)
    v = _heads(self.value_proj(hidden_states), size)
    factor = 1 + ("c2p" in self.pos_att_type) + ("p2c" in self.pos_att_type)
    scale = 1.0 / math.sqrt(size * factor)
    mask = attention_mask.bool()  # [batch, 1, query, key]: query and key both real tokens
    bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device)
    if self.relative_attention and self.pos_att_type:
        if relative_pos is None:
            relative_pos = build_relative_position(q, k, bucket_size=self.position_buckets,
                                                   max_position=self.max_relative_positions)
        bias = _relative_bias(self, q, k, relative_pos, rel_embeddings) * scale
    bias = bias.masked_fill(~mask, torch.finfo(q.dtype).min)
    context = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)
    batch, seq = hidden_states.shape[0], hidden_states.shape[1]
    # An explicit copy before merging the heads: the ONNX exporter decomposes this SDPA (float bias) into ops
    # whose output strides differ from the traced kernel's, and a merging reshape traced as a view then fails.
    context = context.transpose(1, 2).clone(memory_format=torch.contiguous_format)
    return context.reshape(batch, seq, -1), None


@contextmanager
def traceable_attention(model: torch.nn.Module):
    """While inside, every DeBERTa-v2 attention of ``model`` runs sdpa_forward; its own forward comes back after."""
    swapped = []
    if getattr(getattr(model, "config", None), "model_type", None) in EAGER_ATTENTION:
        from transformers.models.deberta_v2.modeling_deberta_v2 import DisentangledSelfAttention

        for module in model.modules():
            if isinstance(module, DisentangledSelfAttention):
                module.forward = types.MethodType(sdpa_forward, module)
                swapped.append(module)
    try:
        yield swapped
    finally:
        for module in swapped:
            del module.forward  # the instance attribute; the class's forward shows through again
