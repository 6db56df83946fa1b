"""Ops that simulate in the FX graph what lowering will realize in ONNX Runtime (e.g. int8 rounding).

A pass may insert a call to a function decorated with :func:`simulated_op` so validation sees the
numerics of the deployed model; before export, :func:`strip_simulation` removes those calls and the
lowering realizes the real thing (ONNX Runtime's quantizer) from the pass's lowering hints. While distill trains
through the graph it swaps each simulated op for its :func:`straight_through` twin (the op's value forward, an identity
gradient back), so a pass's simulated op needs nothing more to be trained through.
"""

from __future__ import annotations

import weakref
from typing import Callable

import torch
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


# The numerics of ONNX Runtime's int8 kernels, simulated: quantize-linear inserts them, distill trains through them.

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
