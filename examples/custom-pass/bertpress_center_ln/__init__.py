"""center-ln-inputs: mean-center the linears whose output only feeds a LayerNorm. Exact.

A LayerNorm over the hidden features subtracts each token's mean over those features, so anything
added to all features of a token alike is thrown away. The attention output projection and the
feed-forward down projection of a post-LN BERT write into ``LayerNorm(linear(x) + residual)``; their
share of that per-token mean is ``mean_over_rows(W) @ x + mean(b)``. Subtracting the column means
from ``W`` and the mean from ``b`` removes exactly that share, so the LayerNorm's output (and the
model's) is unchanged up to float rounding; the pass manager checks it within 1e-4.

Why: the weights lose a component that did nothing, which is the canonical form that
rotation/slicing methods (SliceGPT, QuaRot) start from, and it shrinks the weight range a little.
It runs before quantize-linear so the quantizer sees the centered float weights.

Needs: the BERT structure analysis (which linears feed which LayerNorm). A site is left alone, with
the reason in the report's details, when the linear's output reaches anything but one residual add
whose only user is a LayerNorm over the last dimension, or when its weight is shared.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from compiler.graph_edit import get_tensor, set_parameter
from compiler.pass_infra import Pass, PassConfig, PassContext, PassResult, register_pass

aten = torch.ops.aten
_PASSTHROUGH = {aten.dropout.default, aten.clone.default, aten.alias.default}


class CenterConfig(PassConfig):
    sites: Literal["all", "attention", "ffn"] = Field(
        "all", description="Which linears to center: attention output projections, feed-forward down projections, or both.")


def _why_not(gm: torch.fx.GraphModule, linear, norm: torch.fx.Node) -> str | None:
    """None if centering this linear is exact, else the reason it is not."""
    node = linear.node
    while len(node.users) == 1 and next(iter(node.users)).target in _PASSTHROUGH:
        node = next(iter(node.users))
    users = list(node.users)
    if len(users) != 1 or users[0].target != aten.add.Tensor:
        return f"its output feeds {len(users)} node(s), not one residual add"
    add = users[0]
    if list(add.users) != [norm]:
        return "the residual sum is used by more than the LayerNorm, which would see the shift"
    shape = norm.args[1]
    if list(shape) != [get_tensor(gm, linear.weight).shape[0]]:
        return f"the LayerNorm normalizes over {list(shape)}, not the linear's output features"
    readers = [n for n in gm.graph.nodes if n.op == "get_attr" and n.target == linear.weight]
    if len(readers) != 1 or len(readers[0].users) != 1:
        return "its weight is shared with another op"
    return None


@register_pass
class CenterLayerNormInputs(Pass):
    """Mean-center the linears that write into a LayerNorm (exact)."""

    name = "center-ln-inputs"
    Config = CenterConfig
    kind = "exact"
    must_run_before = ("quantize-linear",)
    requires = ("structure",)
    summary = "Remove the per-token mean that the next LayerNorm discards from the weights writing into it."

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        structure = ctx.structure(gm)
        sites = []
        for layer in structure.layers:
            if self.config.sites in ("all", "attention"):
                sites.append((layer.attention.output, layer.attention_norm))
            if self.config.sites in ("all", "ffn"):
                sites.append((layer.ffn.down, layer.output_norm))
        centered, left_alone, range_before, range_after = [], {}, 0.0, 0.0
        for linear, norm in sites:
            reason = _why_not(gm, linear, norm)
            if reason:
                left_alone[linear.module] = reason
                continue
            weight = get_tensor(gm, linear.weight).detach()
            new_weight = weight - weight.mean(dim=0, keepdim=True)
            set_parameter(gm, linear.weight, new_weight)
            if linear.bias is not None:
                bias = get_tensor(gm, linear.bias).detach()
                set_parameter(gm, linear.bias, bias - bias.mean())
            range_before = max(range_before, float(weight.abs().max()))
            range_after = max(range_after, float(new_weight.abs().max()))
            centered.append(linear.module)
        if not centered and left_alone:
            raise self.refuse(
                f"no linear feeding a LayerNorm can be centered exactly here: {next(iter(left_alone.values()))}.",
                fix="this pass needs a post-LayerNorm encoder (BERT-style); remove it from the recipe.")
        details = {"centered": centered, "left_alone": left_alone,
                   "max_abs_weight_before": round(range_before, 6), "max_abs_weight_after": round(range_after, 6)}
        return PassResult(gm, modified=bool(centered), details=details)
