"""quantize-linear: int8 (per-channel weights, dynamic activations), int4 (block-wise weights) or fp16 linears.

Lossy. For int8 and fp16 the pass only *simulates* the precision in the graph (fake-quantized
weights and activations, marked as simulated ops) so validation sees the deployed numerics;
lowering strips the simulation and ONNX Runtime's quantizer realizes it. Embeddings are excluded by
default because quantizing the lookup tables costs much more fidelity than it saves time.

int4 is for size: weights become 4-bit integers with one scale per block of ``block_size`` inputs,
rounded by GPTQ on the calibration text (``method: gptq``, default) or to nearest (``rtn``), with a
4-bit zero point per block unless ``symmetric`` and a per-block range search (``clip_search``). The
pass writes the dequantized weights into the graph (they are exactly what the deployed model
multiplies by) and lowering stores them as ONNX Runtime ``MatMulNBits`` (half a byte per weight plus
a float16 scale and a 4-bit zero point per block). With ``compute: int8`` (default) ONNX Runtime multiplies with int8
activations quantized per block of ``block_size`` (accuracy level 4); the pass simulates that
rounding too. ``compute: fp32`` keeps activations in float (accuracy level 0, exact). int4 buys
size, not speed, on x86: ``bench/matmul_kernels.py`` timed MatMulNBits at about fp32 speed at either
level, where int8 MatMulInteger ran 3.5x faster (on an earlier machine with VNNI; on AVX2 without VNNI
int8 GEMM is only about 1.8x fp32, see ``bertpress roofline``). A q/k/v
projection in int4 keeps attention as MultiHeadAttention with separate q/k/v MatMuls, not QAttention.
"""

from __future__ import annotations

import weakref
from typing import Literal

import torch
from pydantic import Field, field_validator, model_serializer, model_validator

from compiler import gptq as gptq_lib
from compiler.graph_edit import get_tensor, set_parameter
from compiler.pass_infra import Pass, PassConfig, PassContext, PassResult, register_pass
from compiler.simulation import is_simulated, simulated_op

EXCLUDABLE = ("embeddings", "attention", "ffn", "pooler")
INT4_DEFAULTS = {"block_size": 32, "method": "gptq", "symmetric": False, "clip_search": True, "compute": "int8",
                 "calibration_batches": 8, "damp": 0.01}


# Fake-quantized weights by id(weight): validation runs the same weights over every held-out batch,
# so each is rounded once, until the weight changes (its version counter moves, e.g. a distill step)
# or dies (the weakref callback drops the entry, so a reused id never hits).
_ROUNDED_WEIGHTS: dict[int, tuple[weakref.ref, int, torch.Tensor]] = {}


def round_weight_int8(weight: torch.Tensor) -> torch.Tensor:
    """The rounding of fake_quant_weight_int8 without its cache (training changes the weights at every step,
    and the cache's id/version lookups would stop torch.compile from capturing the training graph)."""
    with torch.no_grad():
        scale = weight.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127.0
        return torch.clamp(torch.round(weight / scale), -127, 127) * scale


@simulated_op
def fake_quant_weight_int8(weight: torch.Tensor) -> torch.Tensor:
    """Symmetric int8 per output channel, as ONNX Runtime's per-channel weight quantization.

    No gradient flows through it (round has none; distill's straight-through estimator adds its own).
    """
    key = id(weight)
    hit = _ROUNDED_WEIGHTS.get(key)
    if hit is not None and hit[0]() is weight and hit[1] == weight._version:
        return hit[2]
    rounded = round_weight_int8(weight)
    if type(rounded) is torch.Tensor:  # not under FakeTensorMode (the cost model's shape pass)
        _ROUNDED_WEIGHTS[key] = (weakref.ref(weight, lambda _, key=key: _ROUNDED_WEIGHTS.pop(key, None)),
                                 weight._version, rounded)
    return rounded


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
def fake_quant_activation_blocks_int8(x: torch.Tensor, block: int) -> torch.Tensor:
    """Symmetric int8 per block of ``block`` features of each row, as MatMulNBits (accuracy level 4) quantizes A."""
    shape = x.shape
    blocks = x.reshape(*shape[:-1], shape[-1] // block, block)
    scale = blocks.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / 127.0
    return (torch.clamp(torch.round(blocks / scale), -127, 127) * scale).reshape(shape)


@simulated_op
def fake_fp16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16).to(x.dtype)


class QuantizeLinearConfig(PassConfig):
    dtype: Literal["int8", "int4", "fp16"] = Field(
        "int8", description="int8: per-channel weights + dynamic activations (CPU, fast). int4: block-wise 4-bit "
                            "weights (ONNX Runtime MatMulNBits; for size, about fp32 speed on x86). fp16: half precision (GPU targets).")
    # int4 options: None unless dtype is int4 (then the defaults in INT4_DEFAULTS fill in); giving one
    # with another dtype is an error rather than silently ignored.
    block_size: Literal[16, 32, 64, 128] | None = Field(None, description="int4 (default 32): inputs per scale; smaller is more faithful and larger.")
    method: Literal["gptq", "rtn"] | None = Field(None, description="int4 (default gptq): GPTQ rounding on calibration text, or round-to-nearest.")
    symmetric: bool | None = Field(None, description="int4 (default false): symmetric blocks (zero point 8); false adds a 4-bit "
                                   "zero point per block (an eighth of a byte per weight at block 32), more faithful on skewed blocks.")
    clip_search: bool | None = Field(None, description="int4 (default true): per block, try shrinking the range (1.0 to 0.75) "
                                     "and keep the least rounding error.")
    compute: Literal["int8", "fp32"] | None = Field(
        None, description="int4 (default int8): ONNX Runtime multiplies with int8 activations per block (accuracy level 4) or fp32 (exact).")
    calibration_batches: int | None = Field(None, ge=1, description="int4 + gptq (default 8): calibration batches for the input Hessians.")
    damp: float | None = Field(None, gt=0, le=1, description="int4 + gptq (default 0.01): Hessian dampening, a fraction of its mean diagonal.")
    exclude: list[str | int] = Field(
        default_factory=lambda: ["embeddings"],
        description=f"Parts kept in full precision: any of {list(EXCLUDABLE)} or layer indices.",
    )

    @model_validator(mode="after")
    def _int4_options(self):
        given = [name for name in INT4_DEFAULTS if getattr(self, name) is not None]
        if self.dtype != "int4" and given:
            raise ValueError(f"{given[0]} applies to dtype int4 only, and this step has dtype {self.dtype}; "
                             "remove it or set dtype: int4")
        if self.dtype == "int4":
            for name, value in INT4_DEFAULTS.items():
                if getattr(self, name) is None:
                    object.__setattr__(self, name, value)  # frozen config: fill the defaults once, here
        return self

    @model_serializer(mode="wrap")
    def _without_unused_int4_options(self, handler):
        return {key: value for key, value in handler(self).items() if not (key in INT4_DEFAULTS and value is None)}

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
    """Quantize linear layers to int8, int4 or fp16, simulated (int4: rounded) in the graph and realized at lowering."""

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
        # Linears an earlier quantize-linear stored in int4 keep that (a recipe may put the FFN in
        # int4 for size and the rest in int8 for speed).
        int4_before = ctx.lowering.get("int4_weights", {})
        already_int4 = [lin for lin in chosen if lin.weight in int4_before]
        chosen = [lin for lin in chosen if lin.weight not in int4_before]
        if cfg.dtype == "int4":
            result = self._int4(gm, ctx, chosen, kept)
            if already_int4:
                result.details["kept_int4"] = sorted(lin.module for lin in already_int4)
            return result

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
                                 "exclude_modules": sorted(kept + [lin.module for lin in already_int4])}}
        lowering["int8_weights" if cfg.dtype == "int8" else "fp16_weights"] = weights
        details = {"quantized_linears": len(chosen), "kept_full_precision": sorted(kept),
                   "embeddings_quantized": quantize_tables}
        if already_int4:
            details["kept_int4"] = sorted(lin.module for lin in already_int4)
        return PassResult(gm, modified=bool(chosen) or quantize_tables, details=details, lowering=lowering)

    def _int4(self, gm: torch.fx.GraphModule, ctx: PassContext, chosen, kept: list[str]) -> PassResult:
        cfg = self.config
        block = cfg.block_size
        if ctx.lowering.get("split"):
            raise self.refuse("decouple-attention's split form (lower.onnx + upper.onnx) cannot store int4 weights yet.",
                              fix="use dtype int8 with decouple-attention.")
        # Every weight matrix: a low-rank linear is two (x -> inner -> node).
        matrices: list[tuple[torch.fx.Node, str, str]] = []
        for lin in chosen:
            if lin.inner is not None:
                matrices.append((lin.inner, lin.factor, lin.module))
            matrices.append((lin.node, lin.weight, lin.module))
        for node, target, module in matrices:
            weight_arg, input_arg = node.args[1], node.args[0]
            if is_simulated(weight_arg) or is_simulated(input_arg):
                raise self.refuse(f"{module} is already quantized by an earlier pass (int8 or fp16); a linear is quantized once.",
                                  fix="put the int4 quantize-linear first and let the later one keep its linears "
                                      "(it skips int4 weights), or exclude the part from one of them.")
            in_features = int(get_tensor(gm, target).shape[1])
            if in_features % block:
                raise self.refuse(f"{module} has {in_features} inputs, which block_size {block} does not divide.",
                                  fix=f"use a block_size that divides {in_features} (16, 32, 64 or 128), or make the "
                                      "pruned width a multiple of it.")
        # Group the weights by the input nodes their uses read (q, k and v share one Hessian; a
        # shared weight sums over its uses) and quantize the groups in graph order.
        order = {node: i for i, node in enumerate(gm.graph.nodes)}
        uses: dict[str, list[torch.fx.Node]] = {}
        for node, target, _ in matrices:
            uses.setdefault(target, []).append(node)
        groups: dict[tuple, list[str]] = {}
        for target, nodes in uses.items():
            key = tuple(sorted({n.args[0] for n in nodes}, key=order.__getitem__))
            groups.setdefault(key, []).append(target)
        batches = ctx.calibration.batches[:cfg.calibration_batches]
        scales: dict[str, dict] = {}
        errors = []
        ordered = sorted(groups.items(), key=lambda item: order[item[0][-1]])
        for step, (inputs, targets) in enumerate(ordered):
            hessian = None
            if cfg.method == "gptq":
                sums = gptq_lib.input_hessians(gm, list(inputs), batches)
                hessian = sum(sums[node] for node in inputs)
            for target in targets:
                weight = get_tensor(gm, target).detach().float()
                grid = {"symmetric": cfg.symmetric, "clip_search": cfg.clip_search}
                quantized = (gptq_lib.gptq(weight, hessian, block, cfg.damp, **grid) if hessian is not None
                             else gptq_lib.round_to_nearest(weight, block, **grid))
                approx = quantized.dequantize()
                errors.append(float((approx - weight).norm() / weight.norm().clamp(min=1e-12)))
                set_parameter(gm, target, approx)
                scales[target] = {"block_size": block, "scales": quantized.scales,
                                  "zero_points": None if cfg.symmetric else quantized.zeros,
                                  "accuracy_level": 4 if cfg.compute == "int8" else 0}
            ctx.progress(step=step + 1, total=len(ordered), what="weight groups")
        if cfg.compute == "int8":
            graph = gm.graph
            simulated: dict[torch.fx.Node, torch.fx.Node] = {}
            for node, _, _ in matrices:
                source = node.args[0]
                if source not in simulated:
                    with graph.inserting_after(source):
                        simulated[source] = graph.call_function(fake_quant_activation_blocks_int8, (source, block))
                node.args = (simulated[source], *node.args[1:])
            graph.lint()
        gm.recompile()
        count = sum(int(get_tensor(gm, t).numel()) for t in scales)
        details = {"dtype": "int4", "method": cfg.method, "block_size": block, "compute": cfg.compute,
                   "quantized_linears": len(chosen), "weight_matrices": len(scales), "weights": count,
                   "symmetric": cfg.symmetric, "clip_search": cfg.clip_search,
                   "stored_bytes": gptq_lib.stored_bytes(count, block, zero_points=not cfg.symmetric),
                   "mean_relative_weight_error": round(sum(errors) / max(len(errors), 1), 5),
                   "kept_full_precision": sorted(kept),
                   "calibration_batches": len(batches) if cfg.method == "gptq" else 0}
        return PassResult(gm, modified=bool(scales), details=details, lowering={"int4_weights": scales})
