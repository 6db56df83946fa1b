"""share-layers: ALBERT-style cross-layer parameter sharing; each group of layers reads one set of weights.

Rewrites the get_attr nodes of every layer in a group (q/k/v/output linears, FFN linears and both
layer norms) to read the first layer's tensors, which hold either that layer's weights (``first``)
or the group's element-wise mean (``mean``); the other layers' tensors are deleted. Stored bytes
drop (the cost model and the ONNX file hold a shared tensor once); FLOPs do not, since every layer
still runs. Lossy; exact when the grouped layers' weights are already equal (the manager then checks
it to 1e-4). Needs the BERT structure; runs after the passes that reshape single layers.
"""

from __future__ import annotations

import torch

from compiler.graph_edit import get_tensor, remove_dead_code, set_parameter
from compiler.pass_infra import Pass, PassContext, PassResult, register_pass
from compiler.structure import Layer
from passes.options import SHARE_LAYERS


def layer_weights(layer: Layer) -> list[str]:
    """The get_attr targets a layer reads, in a fixed order of roles."""
    a = layer.attention
    targets = []
    for lin in (a.query, a.key, a.value, a.output, layer.ffn.up, layer.ffn.down):
        targets += [lin.factor, lin.weight, lin.bias]
    for norm in (layer.attention_norm, layer.output_norm):
        targets += [arg.target if hasattr(arg, "target") and arg.op == "get_attr" else None for arg in norm.args[2:4]]
    return targets


@register_pass
class ShareLayers(Pass):
    """Make groups of layers share one set of weights (storage drops, FLOPs do not)."""

    declaration = SHARE_LAYERS
    kind = "lossy"

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        structure = ctx.structure(gm)
        count = len(structure.layers)
        for group in self.config.groups:
            past = [i for i in group if i >= count]
            if past:
                raise self.refuse(f"groups names layer {past[0]} but the model has {count} layers (0-{count - 1}).",
                                  fix=f"use indices between 0 and {count - 1}.")
        tied = {i: tuple(group) for group in structure.tied_layers() for i in group}
        for group in self.config.groups:
            if len({tied[i] for i in group}) == 1 and len(tied[group[0]]) > 1:
                raise self.refuse(f"layers {group} already read one set of weights (the model repeats one shared layer,"
                                  " as ALBERT does), so there is nothing to share.",
                                  fix="drop share-layers from the recipe, or use layer-drop to remove repetitions.")
        plans, equal = [], True
        for group in self.config.groups:
            roles = list(zip(*[layer_weights(structure.layers[i]) for i in group]))
            for targets in roles:
                if any(t is None for t in targets):
                    if not all(t is None for t in targets):
                        raise self.refuse(f"layers {group} differ in structure (one has a tensor the others lack).",
                                          fix="share only layers of the same shape and kind.")
                    continue
                tensors = [get_tensor(gm, t).detach() for t in targets]
                if len({tuple(t.shape) for t in tensors}) != 1:
                    raise self.refuse(f"layers {group} have different shapes for {targets[0]} and {targets[1:]}"
                                      " (pruned differently?).", fix="share only layers with equal shapes.")
                equal = equal and all(torch.equal(tensors[0], t) for t in tensors[1:])
                plans.append((targets, tensors))
        self.kept_everything = equal
        retarget = {}
        for targets, tensors in plans:
            shared = tensors[0] if self.config.strategy == "first" else torch.stack(tensors).mean(0)
            set_parameter(gm, targets[0], shared)
            retarget.update({t: targets[0] for t in targets[1:]})
        for node in gm.graph.nodes:
            if node.op == "get_attr" and node.target in retarget:
                node.target = retarget[node.target]
        remove_dead_code(gm)
        details = {"groups": self.config.groups, "strategy": self.config.strategy, "tensors_shared": len(retarget),
                   "parameters_removed": int(sum(get_tensor(gm, targets[0]).numel() * (len(targets) - 1)
                                                 for targets, _ in plans)),
                   "note": "storage only: every layer still runs, so FLOPs and latency do not drop."}
        return PassResult(gm, modified=bool(plans), details=details)
