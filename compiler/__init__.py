"""bertpress: a declarative compression-recipe compiler for BERT-family models."""

__version__ = "0.1.0"
