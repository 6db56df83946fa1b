"""Structure analysis: finds embeddings, attention, FFN and norms; refuses what is not BERT."""

from __future__ import annotations

import pytest
import torch

from compiler.errors import UnsupportedModelError
from compiler.structure import analyze


def test_tiny_bert_structure(tiny_gm):
    s = analyze(tiny_gm)
    assert [layer.attention.num_heads for layer in s.layers] == [4, 4]
    assert [layer.attention.head_size for layer in s.layers] == [8, 8]
    assert [layer.ffn.intermediate for layer in s.layers] == [64, 64]
    assert s.layers[0].attention.query.weight == "encoder.layer.0.attention.self.query.weight"
    assert s.layers[1].input is s.layers[0].output
    assert s.embeddings.word_weight == "embeddings.word_embeddings.weight"
    assert s.pooler is not None and s.pooler.module == "pooler.dense"
    assert s.hidden_size == 32


def test_components_cover_the_seed_breakdown(tiny_gm):
    s = analyze(tiny_gm)
    parts = set(s.node_component.values())
    assert {"embeddings", "linear-before-attention", "attention-core", "linear-after-attention", "feed-forward"} <= parts


@pytest.mark.minilm
def test_minilm_structure(minilm_gm):
    s = analyze(minilm_gm)
    assert len(s.layers) == 6
    assert {layer.attention.num_heads for layer in s.layers} == {12}
    assert {layer.ffn.intermediate for layer in s.layers} == {1536}
    assert s.hidden_size == 384


def test_gpt2_is_refused_with_what_was_not_found():
    from transformers import GPT2Config, GPT2Model

    from compiler.frontend import trace

    model = GPT2Model(GPT2Config(n_layer=1, n_embd=32, n_head=4, vocab_size=100, n_positions=64)).eval()
    ids = torch.randint(0, 100, (2, 8))
    gm = trace(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}, 64)
    with pytest.raises(UnsupportedModelError) as info:
        analyze(gm)
    assert "query/key/value" in info.value.render()
