"""Load a BERT-family checkpoint and trace it into a torch.fx graph with torch.export.

The loaded Hugging Face module is kept untouched as the *reference*; passes only ever rewrite the
traced copy. Loading is offline and safetensors-only unless the caller allows pickle explicitly.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

# No hub access at run time, ever: a typo in a model path must fail here, not reach the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

from .errors import ModelError  # noqa: E402
from .model_files import BUILTIN_MODELS, resolve_model_path  # noqa: E402,F401
from .tasks import AUTO_CLASSES, resolve_task  # noqa: E402
from .model_inputs import MODEL_INPUTS, accepted_inputs  # noqa: E402
from .disentangled_attention import EAGER_ATTENTION, traceable_attention  # noqa: E402
# Files a deployable output folder carries over from the source model (tokenizer, config,
# sentence-transformers pooling), so the output is a drop-in replacement.
CARRIED_FILES = (
    "config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
    "merges.txt", "sentencepiece.bpe.model", "spiece.model", "spm.model", "added_tokens.json",  # XLM-R, ALBERT, DeBERTa-v3
    "modules.json", "sentence_bert_config.json",
    "config_sentence_transformers.json", "1_Pooling/config.json", "2_Normalize/config.json",
)


@dataclass
class LoadedModel:
    """A reference model with its tokenizer and where it came from."""

    spec: str
    path: Path
    model: torch.nn.Module
    tokenizer: object
    config: object
    pooling: dict = field(default_factory=dict)
    # The head it was loaded with (compiler.tasks), and what the report should say about it.
    task: str = "feature-extraction"
    task_notes: list = field(default_factory=list)

    @property
    def max_length(self) -> int:
        return int(getattr(self.config, "max_position_embeddings", 512))


def load_model(spec: str, *, allow_pickle: bool = False, task: str | None = None) -> LoadedModel:
    """Load the reference model and tokenizer from a folder, refusing pickle weights by default.

    The model is loaded with its head (compiler.tasks): ``task`` None reads it from config.architectures.
    """
    path = resolve_model_path(spec)
    if not (path / "config.json").is_file():
        raise ModelError(f"{path}/config.json is missing.", field="model",
                         fix="point model at a Hugging Face folder that has config.json.")
    has_safetensors = any(path.glob("*.safetensors"))
    has_pickle = any(path.glob("pytorch_model*.bin"))
    if not has_safetensors and not has_pickle:
        raise ModelError(f"{path} has no weights (model.safetensors).", field="model",
                         fix="save the model with save_pretrained(..., safe_serialization=True).")
    if not has_safetensors and not allow_pickle:
        raise ModelError(
            f"{path} only has pickle weights (pytorch_model.bin), which can run arbitrary code when loaded.",
            field="model",
            fix="convert it to safetensors, or pass --allow-pickle if you trust its source.",
        )
    if not has_safetensors:
        warnings.warn(f"loading pickle weights from {path} because --allow-pickle was given", stacklevel=2)

    import transformers
    from transformers import AutoConfig, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as exc:  # transformers raises many types for a bad config
        raise ModelError(f"cannot read {path}/config.json: {exc}", field="model",
                         fix="check that config.json is a valid Hugging Face config.") from None
    resolved, task_notes = resolve_task(config, task, str(path))
    auto_class = getattr(transformers, AUTO_CLASSES[resolved])
    try:
        model = auto_class.from_pretrained(
            path, config=config, local_files_only=True, use_safetensors=has_safetensors,
            # DeBERTa-v2 has eager attention only; trace() runs it as one SDPA (compiler.disentangled_attention).
            attn_implementation="eager" if config.model_type in EAGER_ATTENTION else "sdpa",
        )
    except Exception as exc:
        if "scaled_dot_product_attention" in str(exc):
            raise ModelError(
                f"{path}: transformers has no SDPA attention for {config.model_type!r} models, and bertpress reads"
                " attention as scaled_dot_product_attention.", field="model",
                fix="use a BERT-family encoder bertpress supports: BERT, RoBERTa, XLM-R, ELECTRA, DistilBERT, ALBERT"
                    " or DeBERTa-v2/v3.") from None
        raise ModelError(
            f"cannot load the weights in {path}: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}",
            field="model",
            fix="the safetensors file may be truncated or corrupted; re-save or re-download the model.",
        ) from None
    model.eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as exc:
        raise ModelError(f"cannot load the tokenizer in {path}: {exc}", field="model",
                         fix="add the tokenizer files (tokenizer.json or vocab.txt) to the model folder.") from None
    vocab_size = getattr(config, "vocab_size", None)
    if vocab_size is not None and len(tokenizer) > vocab_size:
        raise ModelError(
            f"the tokenizer in {path} has {len(tokenizer)} tokens but the embedding table has {vocab_size} rows;"
            " token ids past the table would index out of range.",
            field="model",
            fix="use the tokenizer the model was trained with.",
        )
    pooling = {}
    pooling_file = path / "1_Pooling" / "config.json"
    if pooling_file.is_file():
        pooling = json.loads(pooling_file.read_text())
    return LoadedModel(spec=spec, path=path, model=model, tokenizer=tokenizer, config=config, pooling=pooling,
                       task=resolved, task_notes=task_notes)


def example_inputs(tokenizer, texts: list[str] | None = None, max_length: int = 16) -> dict[str, torch.Tensor]:
    """Tokenize a small batch (batch >= 2, sequence >= 2) so torch.export keeps both dims symbolic."""
    texts = texts or ["The quick brown fox jumps over the lazy dog.", "A second, longer sentence for tracing the model."]
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    batch = {name: enc[name] for name in MODEL_INPUTS if name in enc}
    if "token_type_ids" not in batch:
        batch["token_type_ids"] = torch.zeros_like(batch["input_ids"])
    return batch


def trace(model: torch.nn.Module, inputs: dict[str, torch.Tensor], max_length: int = 512) -> torch.fx.GraphModule:
    """Trace with torch.export (non-strict) into an aten-level GraphModule, dynamic in batch and sequence."""
    if getattr(getattr(model, "config", None), "use_cache", False):
        model.config.use_cache = False  # encoders have no KV cache; decoders would return one torch.export cannot flatten
    batch = torch.export.Dim("batch")
    seq = torch.export.Dim("seq", max=max_length)
    inputs = {name: inputs[name] for name in accepted_inputs(model) if name in inputs}  # DistilBERT: no segments
    dynamic = {name: {0: batch, 1: seq} for name in inputs}
    try:
        with torch.no_grad():
            with traceable_attention(model):
                program = torch.export.export(model, (), kwargs=dict(inputs), dynamic_shapes=dynamic, strict=False)
    except Exception as exc:
        raise ModelError(
            f"torch.export could not trace {type(model).__name__}: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}",
            field="model",
            fix="bertpress supports BERT-family encoders (BERT, MiniLM, RoBERTa-style) from transformers.",
        ) from None
    gm = program.module()
    _own_weights(gm)
    _drop_inference_dropouts(gm)
    return gm


def _own_weights(gm: torch.fx.GraphModule) -> None:
    """Give the graph its own copy of every weight (torch.export shares the reference's tensors).

    Without this, a pass that edits a weight in place (or training in distill) would silently edit
    the reference it is validated against. Tensors shared inside the model stay shared.
    """
    copies: dict[int, torch.Tensor] = {}
    with torch.no_grad():
        for store in [m._parameters for m in gm.modules()] + [m._buffers for m in gm.modules()]:
            for name, tensor in store.items():
                if tensor is None:
                    continue
                key = tensor.untyped_storage().data_ptr()
                if key not in copies:
                    copies[key] = tensor.detach().clone()
                clone = copies[key]
                store[name] = torch.nn.Parameter(clone, requires_grad=tensor.requires_grad) if isinstance(tensor, torch.nn.Parameter) else clone


def _drop_inference_dropouts(gm: torch.fx.GraphModule) -> None:
    """Remove eval-mode dropouts (identities): they are marked impure, so they would keep dead blocks alive."""
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target == torch.ops.aten.dropout.default:
            train = node.args[2] if len(node.args) > 2 else node.kwargs.get("train", True)
            if train is False:
                node.replace_all_uses_with(node.args[0])
                gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
