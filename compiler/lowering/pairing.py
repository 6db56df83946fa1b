"""Reorder int8 weight rows so ONNX Runtime's u8 x s8 kernel cannot saturate on CPUs without VNNI.

On x86 without VNNI (AVX2, AVX-512 without VNNI) ONNX Runtime multiplies uint8 activations by int8 weights
with VPMADDUBSW, which adds the products of neighbouring rows k = 2i and 2i+1 in 16 bits and saturates at
+-32767 (``bench/saturation.py`` checks the kernel and measures what it costs a model). With activations
up to 255, a pair can only saturate if its two weights have the same sign and ``|w1| + |w2| > 128``. Which
rows are neighbours is free: permuting the K rows of a weight together with the channels of the
activation that feeds it is an exact rewrite. This pass finds, for every *channel group* (a set of
tensors that can be permuted along their last axis as one), an order of its channels in which such pairs
are rare, and rewrites the model. In a BERT encoder those are:

* each FFN's intermediate activation (first MatMul's columns, BiasGelu's bias, second MatMul's rows);
* the factorized word table's rank dimension (the table's columns, the projection's rows).

The hidden stream (embeddings' LayerNorm, every residual Sum and LayerNorm; consumed by q/k/v and the first
FFN MatMul of every layer) is one group too, but it ends in the model's output, whose order would have to
be restored by an op on [batch, seq, hidden] at every run (a Gather on the last axis, or Transpose + Gather +
Transpose), which costs time at every batch, while pairing that group does not change held-out fidelity
measurably (``bench/saturation.py --paired`` measures a pairing's fidelity). So groups that reach a graph
output are left as they are.

Groups are found by propagating through the ops our lowering emits (elementwise ops, LayerNormalization,
DynamicQuantizeLinear, Cast, BiasGelu, Gather, the integer MatMuls); a group that reaches anything else (a
graph input, a reshape, QAttention's output) is left as it is. Channels are paired greedily: the heaviest
channel first, each with the free partner that adds the least excess over the threshold, summed over every
output channel of every consumer.

The rewritten model computes the same integers: with ONNX Runtime's exact u8 x u8 option
(``session.x64quantprecision=1``) its outputs equal the original's (``tests/test_pairing.py``, on a tiny model
and on MiniLM); only the default kernel's saturation changes, which ``python bench/saturation.py --paired``
measures on compiled outputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

LIMIT = 128  # same-sign |w1| + |w2| <= 128: 255 * 128 = 32640 <= 32767, no saturation for any uint8 activations

_ELEMENTWISE = {"Add", "Sum", "Sub", "Mul", "Div"}
_PASS_THROUGH = {"Cast", "Relu", "Gelu", "FastGelu", "Tanh", "Erf", "Sqrt", "Identity"}


class _Unsupported(Exception):
    pass


@dataclass
class ChannelGroup:
    """Tensors permuted along their last axis together, and what that means for the constants around them."""

    size: int
    values: set = field(default_factory=set)  # ids of the permuted non-constant values
    nodes: set = field(default_factory=set)  # ids of the nodes that touch the group
    permute: dict = field(default_factory=dict)  # id(constant value) -> (value, axis)
    consumers: list = field(default_factory=list)  # (int8 weight value, node): rows follow the permutation


def _const(value: ir.Value | None) -> np.ndarray | None:
    return None if value is None or value.const_value is None else value.const_value.numpy()


def _last_dim(value: ir.Value) -> int | None:
    if value.shape is None or len(value.shape) == 0:
        return None
    dim = value.shape[-1]
    return dim if isinstance(dim, int) else None


def _is_2d_reshape(value: ir.Value) -> bool:
    """Whether `value` is the output of a Reshape to a constant 2-D shape (a table rebuilt from stored parts)."""
    producer = value.producer()
    shape = _const(producer.inputs[1]) if producer is not None and producer.op_type == "Reshape" else None
    return shape is not None and shape.size == 2


class _Finder:
    def __init__(self, seed: ir.Value, size: int):
        self.group = ChannelGroup(size=size)
        self.todo = [seed]

    def run(self) -> ChannelGroup:
        while self.todo:
            value = self.todo.pop()
            if id(value) in self.group.values:
                continue
            self.group.values.add(id(value))
            if value.is_graph_input():
                raise _Unsupported(f"graph input {value.name}")
            if value.is_graph_output():
                # Its order would have to be restored by an op at every run (see the module docstring).
                raise _Unsupported(f"it reaches the graph output {value.name}")
            producer = value.producer()
            if producer is not None:
                self._visit(producer, output=value)
            for use in value.uses():
                self._visit(use.node, index=use.idx)
        return self.group

    # -- helpers
    def _add(self, value: ir.Value | None) -> None:
        if value is None:
            return
        if value.const_value is not None:
            self._permute(value, -1)
        elif id(value) not in self.group.values:
            if _last_dim(value) not in (None, self.group.size):
                raise _Unsupported(f"{value.name} has last dimension {_last_dim(value)}, not {self.group.size}")
            self.todo.append(value)

    def _permute(self, value: ir.Value, axis: int) -> None:
        array = value.const_value.numpy()
        if array.ndim == 0 or array.shape[axis] == 1:
            return  # broadcast along the permuted axis: unchanged
        if array.shape[axis] != self.group.size:
            raise _Unsupported(f"constant {value.name} has {array.shape[axis]} channels, not {self.group.size}")
        seen = self.group.permute.get(id(value))
        if seen is not None and seen[1] != axis % array.ndim:
            raise _Unsupported(f"constant {value.name} would be permuted along two axes")
        self.group.permute[id(value)] = (value, axis % array.ndim)

    def _broadcasts(self, value: ir.Value) -> bool:
        """Whether `value` is constant along the last axis of an elementwise op (a scalar, or last dimension 1)."""
        array = _const(value)
        if array is not None:
            return array.ndim == 0 or array.shape[-1] == 1
        producer = value.producer()
        if producer is not None and producer.op_type == "DynamicQuantizeLinear" and value is not producer.outputs[0]:
            return True  # its scale and zero point are scalars (the quantized graph carries no shapes for them)
        if producer is not None and producer.op_type in _ELEMENTWISE | _PASS_THROUGH and all(
                v is None or self._broadcasts(v) for v in producer.inputs):
            return True
        return _last_dim(value) == 1 or (value.shape is not None and len(value.shape) == 0)

    # -- one node touching the group, reached through output `output` or input `index`
    def _visit(self, node: ir.Node, output: ir.Value | None = None, index: int | None = None) -> None:
        self.group.nodes.add(id(node))
        op = node.op_type
        ins = list(node.inputs)
        if op in _ELEMENTWISE or op in _PASS_THROUGH:
            for value in ins:
                if value is not None and not self._broadcasts(value):
                    self._add(value)
            for value in node.outputs:
                self._add(value)
        elif op == "LayerNormalization" and node.attributes.get_int("axis", -1) in (-1, len(ins[0].shape or []) - 1):
            self._add(ins[0])
            for value in ins[1:3]:
                if value is not None:
                    self._add(value)
            if len(node.outputs) > 1 and any(v.uses() or v.is_graph_output() for v in node.outputs[1:]):
                raise _Unsupported("LayerNormalization's mean/inv-std outputs are used")
            self._add(node.outputs[0])
        elif (op == "EmbedLayerNormalization" and (output is None or output is node.outputs[0])
              and index not in (0, 1, 7, 8)):  # reached through its embedding output, not ids, mask or positions
            for value in ins[2:7]:  # word, position, segment tables (last axis), gamma, beta
                if value is not None:
                    self._add(value)
            if len(node.outputs) > 2 and (node.outputs[2].uses() or node.outputs[2].is_graph_output()):
                raise _Unsupported("EmbedLayerNormalization's embedding-sum output is used")
            self._add(node.outputs[0])
        elif op == "DynamicQuantizeLinear" and (output is None or output is node.outputs[0]):
            self._add(ins[0])
            self._add(node.outputs[0])
        elif op == "BiasGelu":
            self._add(ins[0])
            self._add(ins[1])
            self._add(node.outputs[0])
        elif (op == "Gather" and output is not None and node.attributes.get_int("axis", 0) in (1, -1)
              and _const(ins[1]) is not None and _const(ins[1]).ndim == 1 and _is_2d_reshape(ins[0])):
            # A table rebuilt from packed int4 ends in a Gather of its columns by a constant order
            # (lowering/embeddings.py): permuting the order permutes the table, the nibbles stay as stored.
            self._permute(ins[1], 0)
        elif op == "Gather":
            axis = node.attributes.get_int("axis", 0)
            rank = len(ins[0].shape) if ins[0].shape is not None else None
            if index == 1 or rank is None or axis % rank == rank - 1:
                raise _Unsupported("a Gather along the permuted axis or of the permuted indices")
            self._add(ins[0])
            self._add(node.outputs[0])
        elif op == "MatMulInteger":
            weight = ins[1]
            if _const(weight) is None or _const(weight).ndim != 2:
                raise _Unsupported("MatMulInteger with a non-constant weight")
            if output is not None:  # the group is its output: weight columns, weight zero points
                self._permute(weight, 1)
                if len(ins) > 3 and ins[3] is not None:
                    self._permute_zero_point(ins[3])
            elif index == 0:  # the group feeds it: weight rows
                self._consumer(weight, node)
            else:
                raise _Unsupported("MatMulInteger reached through a zero point or its weight")
        elif op == "QAttention" and index == 0:
            weight = ins[1]
            if _const(weight) is None or _const(weight).ndim != 2:
                raise _Unsupported("QAttention with a non-constant weight")
            self._consumer(weight, node)
        elif op == "MatMul" and index == 0 and _const(ins[1]) is not None and _const(ins[1]).ndim == 2:
            self._permute(ins[1], 0)  # fp32 consumer (a pooler): rows follow, no saturation involved
        elif op == "MatMul" and output is not None and _const(ins[1]) is not None and _const(ins[1]).ndim == 2:
            self._permute(ins[1], 1)
        else:
            raise _Unsupported(f"{op} node {node.name!r}")

    def _permute_zero_point(self, value: ir.Value) -> None:
        array = _const(value)
        if array is not None and array.size > 1 and np.any(array != array.flat[0]):
            self._permute(value, -1)  # all-equal zero points (symmetric weights) need no change

    def _consumer(self, weight: ir.Value, node: ir.Node) -> None:
        array = _const(weight)
        if array.dtype != np.int8 or array.shape[0] != self.group.size:
            raise _Unsupported(f"consumer weight {weight.name} is {array.dtype} {array.shape}")
        self.group.consumers.append((weight, node))
        self._permute(weight, 0)


def _seeds(model: ir.Model) -> list[tuple[ir.Value, int | None]]:
    """The activations that int8 weights consume, with their channel count (the weight's rows)."""
    seeds = []
    for node in model.graph.all_nodes():
        if node.op_type in ("MatMulInteger", "QAttention") and node.inputs[0] is not None:
            weight = _const(node.inputs[1])
            seeds.append((node.inputs[0], None if weight is None or weight.ndim != 2 else int(weight.shape[0])))
    return seeds


def pair_cost(rows: np.ndarray, limit: int = LIMIT) -> np.ndarray:
    """Excess over `limit` of the same-sign sums of every pair of rows: [K, K] (rows: int8 [K, N])."""
    r = rows.astype(np.int16)
    pos, neg = np.maximum(r, 0), np.maximum(-r, 0)
    k = r.shape[0]
    cost = np.zeros((k, k), np.int64)
    scratch = np.empty_like(pos)
    for i in range(k - 1):  # symmetric: the upper triangle, in int16 (sums of two int8 magnitudes fit)
        rest = slice(i + 1, k)
        tmp = scratch[rest]
        np.maximum(np.add(pos[rest], pos[i] - limit, out=tmp), 0, out=tmp)
        cost[i, rest] = tmp.sum(axis=1, dtype=np.int64)
        np.maximum(np.add(neg[rest], neg[i] - limit, out=tmp), 0, out=tmp)
        cost[i, rest] += tmp.sum(axis=1, dtype=np.int64)
    return cost + cost.T


def order_cost(rows: np.ndarray, order: np.ndarray, limit: int = LIMIT) -> tuple[int, int]:
    """(#pairs that can saturate, total excess) of `rows` taken in `order` (int8 [K, N], K even)."""
    pairs = rows[order].astype(np.int32).reshape(-1, 2, rows.shape[1])
    pos, neg = np.maximum(pairs, 0).sum(axis=1), np.maximum(-pairs, 0).sum(axis=1)
    excess = np.maximum(pos - limit, 0) + np.maximum(neg - limit, 0)
    return int((excess > 0).sum()), int(excess.sum())


def greedy_order(rows: np.ndarray, limit: int = LIMIT) -> np.ndarray:
    """An order of the K rows (K even) whose neighbouring pairs (2i, 2i+1) add little excess over `limit`."""
    k = rows.shape[0]
    cost = pair_cost(rows, limit)
    magnitude = np.abs(rows.astype(np.int32))
    heaviness = np.maximum(magnitude - limit // 2, 0).sum(axis=1)
    free = np.ones(k, bool)
    order = []
    for i in np.argsort(-heaviness, kind="stable"):
        if not free[i]:
            continue
        free[i] = False
        candidates = np.flatnonzero(free)
        # Least excess; among equals, the lightest partner (keeps light rows for the heavy ones still to come).
        best = candidates[np.lexsort((heaviness[candidates], cost[i, candidates]))[0]]
        free[best] = False
        order += [int(i), int(best)]
    return np.asarray(order)


SMALL_COPY_BYTES = 16384  # a constant shared beyond its group is copied if at most this big (biases, scales)


_WEIGHT_INPUTS = {"MatMulInteger": 1, "QAttention": 1, "MatMul": 1, "DynamicQuantizeMatMul": 1}


def _check_sharing(group: ChannelGroup) -> None:
    """Refuse groups that would have to copy a weight or a large constant (share-layers' weights stay shared)."""
    for value, _ in group.permute.values():
        outside = [u for u in value.uses() if id(u.node) not in group.nodes]
        if not outside and not value.is_graph_output():
            continue
        weight = any(_WEIGHT_INPUTS.get(u.node.op_type) == u.idx for u in value.uses())
        if weight or value.const_value.nbytes > SMALL_COPY_BYTES:
            raise _Unsupported(f"{value.name} is also used outside this group (a shared weight)")


def _apply(model: ir.Model, group: ChannelGroup, order: np.ndarray) -> None:
    graph = model.graph
    for value, axis in group.permute.values():
        outside = [u for u in value.uses() if id(u.node) not in group.nodes]
        array = np.take(value.const_value.numpy(), order, axis=axis)
        if outside or value.is_graph_output():  # a small constant shared beyond the group: the group gets a copy
            name = next(f"{value.name}__paired{n}" for n in range(len(graph.initializers) + 1)
                        if f"{value.name}__paired{n}" not in graph.initializers)
            own = ir.Value(name=name, shape=value.shape, type=value.type,
                           const_value=ir.Tensor(np.ascontiguousarray(array), name=name))
            graph.register_initializer(own)
            for use in list(value.uses()):
                if id(use.node) in group.nodes:
                    use.node.replace_input_with(use.idx, own)
        else:
            value.const_value = ir.Tensor(np.ascontiguousarray(array), name=value.name)


def pair_int8_weights(model: ir.Model, limit: int = LIMIT) -> list[str]:
    """Rewrite `model` in place (see the module docstring); return notes: one per group, one for those left."""
    notes, seen, left = [], set(), {}
    for seed, size in _seeds(model):
        if id(seed) in seen:
            continue
        if size is None or size % 2:
            seen.add(id(seed))
            left.setdefault("a non-constant weight or an odd channel count", []).append(seed.name)
            continue
        try:
            group = _Finder(seed, size).run()
            _check_sharing(group)
        except _Unsupported as why:
            seen.add(id(seed))
            reason = str(why)
            left.setdefault(reason.split(" node ")[0] if " node " in reason else reason, []).append(seed.name)
            continue
        seen |= group.values
        rows = np.concatenate([value.const_value.numpy() for value, _ in group.consumers], axis=1)
        before = order_cost(rows, np.arange(size), limit)
        order = greedy_order(rows, limit)
        after = order_cost(rows, order, limit)
        label = f"pairing: {seed.name} ({size} channels, {len(group.consumers)} int8 weight(s))"
        if after[1] >= before[1]:
            notes.append(f"{label}: kept the order ({before[0]} pairs can saturate; no better order found)")
            continue
        _apply(model, group, order)
        notes.append(f"{label}: weight pairs that can saturate on CPUs without VNNI {before[0]} -> {after[0]}"
                     f" of {rows.shape[1] * size // 2}")
    for reason, names in left.items():
        notes.append(f"pairing: {len(names)} activation(s) left in their order ({reason}): {', '.join(names[:3])}"
                     + (", ..." if len(names) > 3 else ""))
    return notes


def pair_file(path) -> tuple[list[str], ir.Model]:
    """Pair the int8 weights of the ONNX model at `path` in place; return the notes and the model as written."""
    from .io import save_model

    model = ir.load(path)
    notes = pair_int8_weights(model)
    save_model(model, path)
    return notes, model
