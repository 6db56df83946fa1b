"""Built-in bertpress passes, one module each; importing this package registers them."""

from . import distill, layer_drop, prune_ffn, prune_heads, quantize_linear  # noqa: F401
