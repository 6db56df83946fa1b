"""quantize-linear: int8 (per-channel weights, dynamic activations) or fp16 linear layers.

Lossy. In the graph the pass only *simulates* the precision (fake-quantized weights and
activations, marked as simulated ops) so validation sees the deployed numerics; lowering strips
the simulation and ONNX Runtime's quantizer realizes it. Embeddings are excluded by default
because quantizing the lookup tables costs much more fidelity than it saves time.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, field_validator

from compiler.pass_infra import Pass, PassConfig, PassContext, PassResult, register_pass
from compiler.simulation import simulated_op

EXCLUDABLE = ("embeddings", "attention", "ffn", "pooler")


@simulated_op
def fake_quant_weight_int8(weight: torch.Tensor) -> torch.Tensor:
    """Symmetric int8 per output channel, as ONNX Runtime's per-channel weight quantization."""
    scale = weight.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127.0
    return torch.clamp(torch.round(weight / scale), -127, 127) * scale


@simulated_op
def fake_quant_table_int8(weight: torch.Tensor) -> torch.Tensor:
    """Symmetric int8 over the whole table, as ONNX Runtime quantizes a Gather's data."""
    scale = weight.abs().max().clamp(min=1e-12) / 127.0
    return torch.clamp(torch.round(weight / scale), -127, 127) * scale


@simulated_op
def fake_quant_activation_uint8(x: torch.Tensor) -> torch.Tensor:
    """Dynamic asymmetric uint8 per tensor, as ONNX Runtime's DynamicQuantizeLinear computes at run time."""
    low = torch.clamp(x.min(), max=0.0)
    high = torch.clamp(x.max(), min=0.0)
    scale = torch.clamp((high - low) / 255.0, min=1e-12)
    zero_point = torch.clamp(torch.round(-low / scale), 0, 255)
    return (torch.clamp(torch.round(x / scale) + zero_point, 0, 255) - zero_point) * scale


@simulated_op
def fake_fp16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16).to(x.dtype)


class QuantizeLinearConfig(PassConfig):
    dtype: Literal["int8", "fp16"] = Field("int8", description="int8: per-channel weights + dynamic activations (CPU). fp16: half precision (GPU targets).")
    exclude: list[str | int] = Field(
        default_factory=lambda: ["embeddings"],
        description=f"Parts kept in full precision: any of {list(EXCLUDABLE)} or layer indices.",
    )

    @field_validator("exclude")
    @classmethod
    def _known_parts(cls, value):
        for item in value:
            if isinstance(item, str) and item not in EXCLUDABLE:
                raise ValueError(f"unknown part {item!r}; use one of {list(EXCLUDABLE)} or a layer index")
            if isinstance(item, int) and item < 0:
                raise ValueError("layer indices are >= 0")
        return value


@register_pass
class QuantizeLinear(Pass):
    """Quantize linear layers to int8 (or fp16), simulated in the graph and realized at lowering."""

    name = "quantize-linear"
    Config = QuantizeLinearConfig
    kind = "lossy"

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        structure = ctx.structure(gm)
        cfg = self.config
        exclude = set(cfg.exclude)
        bad = sorted(i for i in exclude if isinstance(i, int) and i >= len(structure.layers))
        if bad:
            raise self.refuse(f"exclude names layer {bad[0]} but the model has {len(structure.layers)} layers (0-{len(structure.layers) - 1}).",
                              fix="use a layer index that exists.")
        chosen, kept = [], []
        for layer in structure.layers:
            groups = ((layer.attention.query, layer.attention.key, layer.attention.value, layer.attention.output), "attention"), \
                     ((layer.ffn.up, layer.ffn.down), "ffn")
            for linears, part in groups:
                (kept if layer.index in exclude or part in exclude else chosen).extend(linears)
        if structure.pooler is not None:
            (kept if "pooler" in exclude else chosen).append(structure.pooler)
        kept = [lin.module for lin in kept]

        weight_op = fake_quant_weight_int8 if cfg.dtype == "int8" else fake_fp16
        act_op = fake_quant_activation_uint8 if cfg.dtype == "int8" else fake_fp16
        graph = gm.graph
        for lin in chosen:
            node = lin.node
            with graph.inserting_before(node):
                weight = graph.call_function(weight_op, (node.args[1],))
                act = graph.call_function(act_op, (node.args[0],))
            node.args = (act, weight, *node.args[2:])
        quantize_tables = "embeddings" not in exclude
        if quantize_tables:
            table_op = fake_quant_table_int8 if cfg.dtype == "int8" else fake_fp16
            for lookup in (structure.embeddings.word, structure.embeddings.position, structure.embeddings.token_type):
                if lookup is None:
                    continue
                with graph.inserting_before(lookup):
                    table = graph.call_function(table_op, (lookup.args[0],))
                lookup.args = (table, *lookup.args[1:])
        graph.lint()
        gm.recompile()
        weights = sorted(lin.weight for lin in chosen)
        lowering = {"quantize": {"dtype": cfg.dtype, "exclude_embeddings": not quantize_tables,
                                 "exclude_modules": sorted(kept)}}
        lowering["int8_weights" if cfg.dtype == "int8" else "fp16_weights"] = weights
        details = {"quantized_linears": len(chosen), "kept_full_precision": sorted(kept),
                   "embeddings_quantized": quantize_tables}
        return PassResult(gm, modified=bool(chosen) or quantize_tables, details=details, lowering=lowering)
