"""Built-in bertpress passes, one module each; importing this package registers them."""

from . import (decouple_attention, distill, layer_drop, low_rank, prune_ffn, prune_heads, prune_vocab,  # noqa: F401
               prune_weights, quantize_embeddings, quantize_linear, share_layers)
