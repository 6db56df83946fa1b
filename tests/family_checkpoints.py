"""Tiny random checkpoints of each BERT-family member, saved as real Hugging Face folders.

Every member is 4 layers of hidden 128 with 4 heads of 32 and a 512-wide feed-forward (BERT-base's
ratios at a small width), with MiniLM's WordPiece tokenizer so real text tokenizes. The member's own
config class builds it, so the traced graph is the one transformers runs for that architecture:
DistilBERT takes no token_type_ids, ALBERT shares one layer across its 4 repetitions behind a
32 -> 128 embedding projection, DeBERTa-v2 is configured as DeBERTa-v3 is (relative-position buckets,
c2p + p2c disentangled attention, no absolute position embedding).
"""

from __future__ import annotations

from pathlib import Path

import torch

FAMILY = ("bert", "roberta", "xlm-roberta", "electra", "distilbert", "albert", "deberta-v2")
VOCAB = 30522  # MiniLM's tokenizer
LAYERS, HIDDEN, HEADS, INTERMEDIATE = 4, 128, 4, 512


def family_config(member: str):
    """The transformers config of one tiny member."""
    import transformers as tf

    common = dict(vocab_size=VOCAB, max_position_embeddings=128, pad_token_id=0)
    bert_like = dict(common, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                     intermediate_size=INTERMEDIATE)
    if member == "bert":
        return tf.BertConfig(**bert_like)
    if member == "roberta":
        return tf.RobertaConfig(**dict(bert_like, max_position_embeddings=130, type_vocab_size=1))
    if member == "xlm-roberta":
        return tf.XLMRobertaConfig(**dict(bert_like, max_position_embeddings=130, type_vocab_size=1))
    if member == "electra":
        return tf.ElectraConfig(**dict(bert_like, embedding_size=HIDDEN))
    if member == "distilbert":
        return tf.DistilBertConfig(**common, dim=HIDDEN, n_layers=LAYERS, n_heads=HEADS, hidden_dim=INTERMEDIATE)
    if member == "albert":
        return tf.AlbertConfig(**dict(bert_like, embedding_size=32, num_hidden_groups=1, inner_group_num=1,
                                      hidden_act="gelu_new"))
    if member == "deberta-v2":
        return tf.DebertaV2Config(**dict(bert_like, max_position_embeddings=128, type_vocab_size=0,
                                         relative_attention=True, position_buckets=32, max_relative_positions=-1,
                                         pos_att_type=["p2c", "c2p"], position_biased_input=False,
                                         norm_rel_ebd="layer_norm", share_att_key=True))
    raise ValueError(f"unknown family member {member!r}; choose from {FAMILY}")


def make_family_checkpoint(member: str, folder: Path, *, seed: int = 0) -> Path:
    """Build one tiny random member with its base AutoModel class and save it with MiniLM's tokenizer."""
    from transformers import AutoModel

    from tests.conftest import save_tiny_checkpoint

    torch.manual_seed(seed)
    return save_tiny_checkpoint(AutoModel.from_config(family_config(member)).eval(), folder, noise=0.02)
