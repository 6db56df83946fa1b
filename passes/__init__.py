"""Built-in bertpress passes, one module each; importing this package registers them."""

from . import layer_drop, quantize_linear  # noqa: F401
