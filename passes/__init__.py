"""Built-in bertpress passes, one module each; importing this package registers them."""

from . import decouple_attention, distill, layer_drop, low_rank, prune_ffn, prune_heads, prune_weights, quantize_linear, share_layers  # noqa: F401
