"""Plain fp32 ONNX export of a (possibly rewritten) BERT graph with the dynamo exporter.

The frontend hands us `ep.module()` of a `torch.export` trace; we re-export it with
`torch.onnx.export(..., dynamo=True)` (the legacy TorchScript exporter is not used anywhere).
"""

from __future__ import annotations

from pathlib import Path

import onnx_ir as ir
import torch
from torch.export import Dim

from ..model_inputs import MODEL_INPUTS, accepted_inputs
from .io import save_model
from .quiet import quiet

INPUT_NAMES = MODEL_INPUTS
OUTPUT_NAMES = ("last_hidden_state", "pooler_output")
OPSET = 20  # first opset with a native Gelu op; ORT 1.32 supports it and fusions match it


def _max_sequence(module: torch.nn.Module) -> int:
    # The position table bounds the sequence length; torch.export rejects a larger Dim max.
    for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
        if name.endswith("position_embeddings.weight"):
            return min(512, int(tensor.shape[0]))
    return 512


def _dynamic_shapes(example_inputs: dict[str, torch.Tensor], max_seq: int) -> dict:
    # One Dim object per axis kind, shared by all inputs, so the exporter knows that the three
    # inputs always agree on batch and sequence length (it then emits one symbolic dim each).
    batch, seq = Dim("batch"), Dim("seq", max=max_seq)
    return {name: {0: batch, 1: seq} for name in example_inputs}


def _ordered_inputs(module: torch.nn.Module, example_inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    names = accepted_inputs(module)  # the model's own inputs: DistilBERT's ONNX graph has no token_type_ids
    missing = [n for n in names if n not in example_inputs]
    if missing:
        raise ValueError(f"export_onnx: example_inputs lacks {missing}; need {list(names)}")
    # int64 ids/masks: the exported graph's inputs carry this dtype, and HF tokenizers return it.
    return {n: example_inputs[n].to(torch.int64) for n in names}


def export_ir(module: torch.nn.Module, example_inputs: dict[str, torch.Tensor]) -> ir.Model:
    """Export to an in-memory `onnx_ir` model (fp32, exporter's own constant folding only)."""
    kwargs = _ordered_inputs(module, example_inputs)
    if not isinstance(module, torch.fx.GraphModule):
        # A raw nn.Module must not export dropout; an exported GraphModule already baked
        # train=False into its dropout nodes and refuses .eval().
        module = module.eval()
    with torch.no_grad():
        out = module(**kwargs)
    n_out = len(_flat_outputs(out))
    # A task model's outputs keep their Hugging Face names (logits; start_logits, end_logits), which
    # Optimum's ORTModelFor* and sentence-transformers' CrossEncoder read them by.
    names = [name for name in out.keys()] if hasattr(out, "keys") else list(OUTPUT_NAMES[:n_out])
    with quiet():
        program = torch.onnx.export(
            module,
            (),
            kwargs=kwargs,
            dynamo=True,
            opset_version=OPSET,
            input_names=list(kwargs),
            output_names=names[:n_out],
            dynamic_shapes=_dynamic_shapes(kwargs, _max_sequence(module)),
            optimize=True,
            verbose=False,
        )
    return program.model


def _flat_outputs(out) -> list:
    # HF ModelOutput / tuple / tensor -> list of tensors in the order the exporter flattens them.
    if isinstance(out, torch.Tensor):
        return [out]
    if hasattr(out, "to_tuple"):
        return [t for t in out.to_tuple() if isinstance(t, torch.Tensor)]
    return [t for t in out if isinstance(t, torch.Tensor)]


def module_path(node: ir.Node) -> str | None:
    """nn module path a node was exported from (exporter metadata), e.g. 'encoder.layer.0.intermediate.dense'."""
    scopes = node.metadata_props.get("pkg.torch.onnx.name_scopes")
    if not scopes:
        return None
    parts = [p.strip(" '\"") for p in scopes.strip("[]").split(",")]
    # The last scope is the aten op's own name ("linear_3"); the one before is its module.
    return parts[-2] if len(parts) >= 2 else None


def export_onnx(module: torch.nn.Module, example_inputs: dict[str, torch.Tensor], path: Path) -> Path:
    """Plain fp32 dynamo export to `path` (single file), inputs int64 with dynamic batch & sequence."""
    path = Path(path)
    model = export_ir(module, example_inputs)
    return save_model(model, path)
