"""The inputs a BERT-family encoder takes, read from its forward signature.

BERT, RoBERTa, ALBERT and DeBERTa take ``token_type_ids``; DistilBERT does not. Batches inside the
compiler always carry all of MODEL_INPUTS (zeros where a tokenizer gives no segments); every call of
a model, a traced graph or an exported one feeds it only the inputs it names, so a model without
segments is traced, validated, lowered and benchmarked without them.
"""

from __future__ import annotations

import inspect

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
_NAMED = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


def accepted_inputs(module) -> tuple[str, ...]:
    """The MODEL_INPUTS that ``module``'s forward names (a ``**kwargs`` catch-all does not count)."""
    module = getattr(module, "_orig_mod", module)  # torch.compile's wrapper forwards *args, **kwargs
    try:
        params = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return MODEL_INPUTS
    named = {name for name, param in params.items() if param.kind in _NAMED}
    return tuple(name for name in MODEL_INPUTS if name in named)


def feed(module, batch: dict) -> dict:
    """The part of ``batch`` that ``module`` takes, in MODEL_INPUTS order."""
    return {name: batch[name] for name in accepted_inputs(module) if name in batch}
