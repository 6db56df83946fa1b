"""Ops that simulate in the FX graph what lowering will realize in ONNX Runtime (e.g. int8 rounding).

A pass may insert a call to a function decorated with :func:`simulated_op` so validation sees the
numerics of the deployed model; before export, :func:`strip_simulation` removes those calls and the
lowering realizes the real thing (ONNX Runtime's quantizer) from the pass's lowering hints. While distill trains
through the graph it swaps each simulated op for its :func:`straight_through` twin (the op's value forward, an identity
gradient back), so a pass's simulated op needs nothing more to be trained through.
"""

from __future__ import annotations

from typing import Callable

from torch.fx import GraphModule

_SIMULATED: set[Callable] = set()
_TWINS: dict[Callable, Callable] = {}


def simulated_op(fn: Callable) -> Callable:
    """Mark a one-input function as simulation only: identity for export, real for validation."""
    _SIMULATED.add(fn)
    return fn


def straight_through(fn: Callable) -> Callable:
    """The straight-through-estimator twin of simulated op ``fn``: ``fn``'s value forward, identity gradient back to
    its first input (the same twin for every call, so graphs that use it compare equal).

    Rounding has zero gradient almost everywhere, so training through ``fn`` itself would give the tensor it rounds
    (a weight, an embedding row) a gradient only where it sets a scale (a row's largest entry), and freeze the rest.
    """
    twin = _TWINS.get(fn)
    if twin is None:
        def twin(x, *args):
            return x + (fn(x, *args) - x).detach()

        twin.__name__ = twin.__qualname__ = f"straight_through_{fn.__name__}"
        _TWINS[fn] = twin
    return twin


def is_straight_through(node) -> bool:
    """Whether ``node`` calls a :func:`straight_through` twin (in a training copy of a graph)."""
    return node.op == "call_function" and node.target in _TWINS.values()


def is_simulated(node) -> bool:
    return node.op == "call_function" and node.target in _SIMULATED


def strip_simulation(gm: GraphModule) -> int:
    """Replace every simulated op by its first input, in place; returns how many were removed."""
    removed = 0
    for node in list(gm.graph.nodes):
        if is_simulated(node):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
            removed += 1
    if removed:
        gm.graph.lint()
        gm.recompile()
    return removed
