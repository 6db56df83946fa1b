"""Graph surgery shared by passes: replace or slice parameters, drop dead nodes and their weights.

Parameters live on the GraphModule under their original dotted paths (get_attr targets), so a
rewrite that changes a weight's shape swaps the tensor in place and the graph stays valid.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule


def get_tensor(gm: GraphModule, target: str) -> torch.Tensor:
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def set_parameter(gm: GraphModule, target: str, value: torch.Tensor) -> None:
    """Replace (or create) the parameter at a dotted path with a new tensor of any shape."""
    *parents, leaf = target.split(".")
    owner = gm
    for part in parents:
        if not hasattr(owner, part):
            owner.add_module(part, torch.nn.Module())
        owner = getattr(owner, part)
    if leaf in getattr(owner, "_buffers", {}):
        owner._buffers[leaf] = value.detach().clone()
    else:
        if hasattr(owner, leaf) and leaf not in owner._parameters:
            delattr(owner, leaf)
        owner._parameters[leaf] = torch.nn.Parameter(value.detach().clone(), requires_grad=False)


def slice_parameter(gm: GraphModule, target: str, dim: int, index: torch.Tensor) -> None:
    set_parameter(gm, target, torch.index_select(get_tensor(gm, target), dim, index))


def _delete_attr(gm: GraphModule, target: str) -> None:
    *parents, leaf = target.split(".")
    owner = gm
    for part in parents:
        owner = getattr(owner, part, None)
        if owner is None:
            return
    for store in (owner._parameters, owner._buffers):
        store.pop(leaf, None)


def _has_side_effect(node) -> bool:
    if node.op == "call_module":
        return True  # torch.export's input guards
    name = str(node.target)
    return node.op == "call_function" and ("assert" in name or "print" in name)


def remove_dead_code(gm: GraphModule) -> int:
    """Erase nodes nothing uses (and the weights only they read); returns how many nodes went."""
    before = len(gm.graph.nodes)
    # torch's own eliminate_dead_code keeps ops tagged nondeterministic (dropout, sdpa with its
    # dropout_p argument) even in inference graphs, which would keep dropped blocks alive.
    for node in reversed(list(gm.graph.nodes)):
        if node.users or node.op in ("placeholder", "output") or _has_side_effect(node):
            continue
        gm.graph.erase_node(node)
    used = {node.target for node in gm.graph.nodes if node.op == "get_attr"}
    for name, _ in list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False)):
        if name not in used:
            _delete_attr(gm, name)
    gm.graph.lint()
    gm.recompile()
    return before - len(gm.graph.nodes)
