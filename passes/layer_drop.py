"""layer-drop: remove whole transformer blocks (listed, every k-th kept, or the top n).

Lossy. Each dropped block is bypassed by wiring its input residual stream to whatever read its
output, then its nodes and weights are deleted, so parameters, bytes and FLOPs really drop.
"""

from __future__ import annotations

import torch
from pydantic import Field, model_validator

from compiler.graph_edit import remove_dead_code
from compiler.pass_infra import Pass, PassConfig, PassContext, PassResult, register_pass


class LayerDropConfig(PassConfig):
    layers: list[int] | None = Field(None, min_length=1, description="Indices of the blocks to remove (0 = lowest).")
    keep_every: int | None = Field(None, ge=2, description="Keep every k-th block counted from the top (2 keeps 1, 3, 5 of 0-5).")
    top: int | None = Field(None, ge=1, description="Remove the n topmost blocks.")

    @model_validator(mode="after")
    def _one_strategy(self):
        chosen = [name for name in ("layers", "keep_every", "top") if getattr(self, name) is not None]
        if len(chosen) != 1:
            raise ValueError("give exactly one of layers, keep_every or top")
        if self.layers is not None:
            if any(i < 0 for i in self.layers):
                raise ValueError("layer indices are >= 0")
            if len(set(self.layers)) != len(self.layers):
                raise ValueError("layer indices must be unique")
        return self


@register_pass
class LayerDrop(Pass):
    """Remove whole transformer blocks and their weights."""

    name = "layer-drop"
    Config = LayerDropConfig
    kind = "lossy"

    def dropped(self, count: int) -> list[int]:
        cfg = self.config
        if cfg.layers is not None:
            return sorted(cfg.layers)
        if cfg.keep_every is not None:
            return [i for i in range(count) if (count - 1 - i) % cfg.keep_every != 0]
        return list(range(max(count - cfg.top, 0), count))

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        structure = ctx.structure(gm)
        count = len(structure.layers)
        drop = self.dropped(count)
        past = [i for i in drop if i >= count]
        if past:
            raise self.refuse(f"layers names block {past[0]} but the model has {count} blocks (0-{count - 1}).",
                              fix=f"use indices between 0 and {count - 1}.")
        if len(drop) >= count:
            raise self.refuse(f"this would drop all {count} blocks; at least one must stay.",
                              fix="drop fewer layers.")
        # Top-down, so each bypass wires to a block that is still in the graph.
        for index in sorted(drop, reverse=True):
            layer = structure.layers[index]
            layer.output.replace_all_uses_with(layer.input)
        removed = remove_dead_code(gm)
        kept = [i for i in range(count) if i not in drop]
        return PassResult(gm, modified=bool(drop), details={"dropped": drop, "kept": kept, "nodes_removed": removed})
