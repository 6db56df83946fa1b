"""Analytic cost of a traced graph: parameters, bytes on disk, FLOPs and activation bytes.

Shapes come from propagating fake tensors at the recipe's (batch, seq), so nothing is computed and
any graph a pass produces can be costed. Costs are aggregated per component of the seed's
breakdown of BERT (embeddings, linear-before-attention, attention-core, linear-after-attention,
feed-forward, other). Weights shared by several nodes are counted once.

Given a :class:`~compiler.roofline.Machine`, each node also gets a latency estimate: the roofline
time ``max(flops / peak, bytes moved / bandwidth) + per-kernel overhead``, with the int8 GEMM peak for
linears that lowering quantizes and the fp32 one otherwise; reshapes and views cost nothing (ORT
fuses or aliases them).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx import GraphModule, Interpreter

from .gptq import stored_bytes
from .graph_edit import get_tensor
from .roofline import Machine
from .simulation import is_simulated
from .structure import COMPONENTS

aten = torch.ops.aten
_FREE = {aten.view.default, aten.reshape.default, aten.transpose.int, aten.permute.default, aten.unsqueeze.default,
         aten.slice.Tensor, aten.select.int, aten.expand.default, aten.dropout.default, aten.alias.default,
         aten._unsafe_view.default, aten.sym_size.int, aten.embedding.default, aten.to.device, aten.to.dtype,
         aten._assert_tensor_metadata.default}
# FLOPs per output element of the common elementwise ops (layer norm: mean, var, normalize, affine).
_PER_ELEMENT = {aten.layer_norm.default: 8, aten.gelu.default: 8, aten.tanh.default: 4, aten.softmax.int: 5,
                aten._softmax.default: 5}


@dataclass
class Cost:
    parameters: int
    bytes: int  # weight bytes as stored in the deployed model
    flops: int
    activation_bytes: int
    batch: int
    seq: int
    by_component: dict[str, dict[str, int]] = field(default_factory=dict)
    latency_s: float | None = None  # roofline estimate of one forward pass (needs a Machine)

    def as_dict(self) -> dict:
        out = {"parameters": self.parameters, "bytes": self.bytes, "flops": self.flops,
               "activation_bytes": self.activation_bytes, "batch": self.batch, "seq": self.seq,
               "by_component": self.by_component}
        if self.latency_s is not None:
            out["latency_ms"] = round(self.latency_s * 1e3, 4)
        return out


class _ShapeRecorder(Interpreter):
    def __init__(self, gm):
        super().__init__(gm)
        self.values = {}

    def run_node(self, node):
        result = super().run_node(node)
        self.values[node] = result
        return result


def _numel(value) -> int:
    return int(value.numel()) if isinstance(value, torch.Tensor) else 0


def node_flops(node, values) -> int:
    if node.op != "call_function" or node.target in _FREE:
        return 0
    out = values.get(node)
    if node.target == aten.linear.default:
        weight = values.get(node.args[1])
        return 2 * _numel(out) * int(weight.shape[1]) if weight is not None else 0
    if node.target in (aten.mm.default, aten.bmm.default, aten.matmul.default):
        left = values.get(node.args[0])
        return 2 * _numel(out) * int(left.shape[-1])
    if node.target == aten.scaled_dot_product_attention.default:
        q, k = values.get(node.args[0]), values.get(node.args[1])
        *lead, s_q, d = q.shape
        s_k = k.shape[-2]
        heads = int(torch.tensor(lead).prod()) if lead else 1
        # QK^T and attention x V, plus scale, mask and softmax on the score matrix.
        return 4 * heads * int(s_q) * int(s_k) * int(d) + 7 * heads * int(s_q) * int(s_k)
    return _PER_ELEMENT.get(node.target, 1) * _numel(out)


def _weight_target(node) -> str | None:
    """The get_attr target of a linear's weight, looking through simulated ops (fake int8 rounding)."""
    weight = node.args[1] if len(node.args) > 1 else None
    while weight is not None and is_simulated(weight):
        weight = weight.args[0]
    return weight.target if weight is not None and weight.op == "get_attr" else None


def node_seconds(node, values, flops: int, machine: Machine, int8_weights, weight_bytes: dict[str, int]) -> float:
    """Roofline time of one node: compute- or memory-bound, plus the kernel overhead."""
    if node.op != "call_function" or (node.target in _FREE and node.target != aten.embedding.default):
        return 0.0
    out = values.get(node)
    if not isinstance(out, torch.Tensor):
        return 0.0
    moved = _numel(out) * out.element_size()
    peak = machine.fp32_gflops
    if node.target == aten.linear.default:
        target = _weight_target(node)
        moved += weight_bytes.get(target, 0) + _numel(values.get(node.args[0])) * 4
        if target in int8_weights:
            peak = machine.int8_gflops
    elif node.target == aten.scaled_dot_product_attention.default:
        q, k = values.get(node.args[0]), values.get(node.args[1])
        scores = _numel(q) // int(q.shape[-1]) * int(k.shape[-2])
        moved += 3 * _numel(q) * 4 + 2 * scores * 4  # q, k, v in; the score matrix written and read back
    elif node.target != aten.embedding.default:
        moved += sum(_numel(values.get(a)) * 4 for a in node.args if isinstance(a, torch.fx.Node))
    return max(flops / (peak * 1e9), moved / (machine.bandwidth_gbs * 1e9)) + machine.overhead_us * 1e-6


def estimate(gm: GraphModule, *, batch: int, seq: int, component_of: dict | None = None,
             int8_weights: set[str] | frozenset = frozenset(), fp16_weights: set[str] | frozenset = frozenset(),
             sparse_weights: set[str] | frozenset = frozenset(), machine: Machine | None = None,
             int4_weights: dict[str, tuple[int, bool]] | None = None) -> Cost:
    """Estimate the cost of one forward pass at (batch, seq).

    ``int8_weights``/``fp16_weights`` name weights that lowering will store in that precision
    (int8 per-channel: one byte per element plus a float scale per output channel). ``sparse_weights``
    are stored as sparse initializers (nonzeros + indices) when that is smaller; their FLOPs stay dense.
    ``int4_weights`` maps a weight to (block size, zero points): half a byte per element,
    a float16 scale and (with zero points) half a byte per block. Its linear is timed at the fp32
    peak whatever its compute level: on x86 CPUs ONNX Runtime's MatMulNBits runs at about fp32 MatMul's
    speed at either accuracy level, well below int8 MatMulInteger (``python bench/matmul_kernels.py``).
    With a ``machine`` (see :func:`compiler.roofline.machine`) the cost includes a roofline latency.
    """
    int4_weights = int4_weights or {}
    fast_weights = set(int8_weights)
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    with fake:
        args = [torch.ones(batch, seq, dtype=torch.long) if p.name == "attention_mask"
                else torch.zeros(batch, seq, dtype=torch.long) for p in placeholders]
    recorder = _ShapeRecorder(gm)
    with fake:
        recorder.run(*args)
    values = recorder.values
    component_of = component_of or {}
    per: dict[str, dict[str, int]] = {c: defaultdict(int) for c in COMPONENTS}
    seen_storage: set = set()
    parameters = stored = flops = activations = 0
    weight_bytes: dict[str, int] = {}
    seconds = 0.0
    for node in gm.graph.nodes:
        component = component_of.get(node, "other")
        if node.op == "get_attr":
            tensor = get_tensor(gm, node.target)
            if not isinstance(tensor, torch.Tensor):
                continue
            key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
            if key in seen_storage:
                continue  # a shared weight is stored once
            seen_storage.add(key)
            count = int(tensor.numel())
            if node.target in int4_weights:
                block, zero_points = int4_weights[node.target]
                size = stored_bytes(count, block, zero_points)
            elif node.target in int8_weights:
                size = count + 4 * int(tensor.shape[0])
            elif node.target in fp16_weights:
                size = 2 * count
            else:
                size = count * tensor.element_size()
            if node.target in sparse_weights:
                from .lowering.sparse import sparse_bytes

                scales = 4 * int(tensor.shape[0]) if node.target in int8_weights else 0
                element = (size - scales) // max(count, 1)
                size = sparse_bytes(count, int(torch.count_nonzero(tensor)), element) + scales
            weight_bytes[node.target] = size
            parameters += count
            stored += size
            per[component]["parameters"] += count
            per[component]["bytes"] += size
            continue
        if is_simulated(node):
            continue  # simulation of lowering's numerics; not part of the deployed model
        node_cost = node_flops(node, values)
        flops += node_cost
        per[component]["flops"] += node_cost
        if machine is not None:
            node_time = node_seconds(node, values, node_cost, machine, fast_weights, weight_bytes)
            seconds += node_time
            per[component]["latency_ns"] += int(node_time * 1e9)
        out = values.get(node)
        if node.op == "call_function" and node.target not in _FREE and isinstance(out, torch.Tensor):
            size = _numel(out) * out.element_size()
            activations += size
            per[component]["activation_bytes"] += size
    by_component = {c: {k: int(v) for k, v in sorted(per[c].items())} for c in COMPONENTS if per[c]}
    return Cost(parameters, stored, flops, activations, batch, seq, by_component,
                latency_s=seconds if machine is not None else None)
