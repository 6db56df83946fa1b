"""BERT structure analysis: find embeddings, attention blocks, FFNs and layer norms in the traced graph.

The analysis matches the dataflow of a transformer encoder layer (linear -> view -> attention ->
output linear -> residual add -> layer norm -> FFN -> residual add -> layer norm) and records the
``nn_module_stack`` path of each piece for the report. Passes consume this analysis; none of them
matches module names on its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.fx import GraphModule, Node

from .errors import UnsupportedModelError
from .simulation import is_simulated

aten = torch.ops.aten
_PASSTHROUGH = {aten.dropout.default, aten.clone.default, aten.alias.default, aten.contiguous.default}
_RESHAPES = {aten.view.default, aten.reshape.default, aten.transpose.int, aten.permute.default,
             aten._unsafe_view.default, aten.contiguous.default, aten.clone.default}
_ADDS = {aten.add.Tensor}
_NORMS = {aten.layer_norm.default}
# Marks the attention-mask nodes of layers that attend within one segment (decouple-attention adds them), so the
# split lowering finds the decoupled layers in the graph after later passes renumbered or dropped layers.
SEGMENT_MASK = "bertpress.segment_mask"
_ACTS = {aten.gelu.default, aten.relu.default, aten.silu.default, aten.tanh.default}
# Ops an activation written out element by element is made of (ALBERT's gelu_new: 0.5 x (1 + tanh(...))).
_ELEMENTWISE = _ACTS | {aten.mul.Tensor, aten.add.Tensor, aten.pow.Tensor_Scalar, aten.div.Tensor, aten.erf.default,
                        aten.sigmoid.default, aten.mul.Scalar, aten.add.Scalar}


def module_path(node: Node) -> str:
    """The innermost nn.Module path a node was traced from ('' at top level)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path, _ = list(stack.values())[-1]
    # torch.export writes paths like "L['self'].encoder.layer[0]" in some versions; normalize them.
    return path.replace("L['self'].", "").replace("[", ".").replace("]", "")


@dataclass
class Linear:
    """One aten.linear call and the parameters it reads."""

    node: Node
    weight: str  # get_attr target of the weight
    bias: str | None
    module: str
    # A low-rank linear is two aten.linear calls, x -> inner (no bias, weight `factor`) -> node.
    inner: Node | None = None
    factor: str | None = None

    @property
    def input(self) -> Node:
        return (self.inner if self.inner is not None else self.node).args[0]

    def weight_tensor(self, gm: GraphModule) -> torch.Tensor:
        return gm.get_parameter(self.weight) if self.weight in dict(gm.named_parameters()) else _attr(gm, self.weight)

    def shape(self, gm: GraphModule) -> tuple[int, int]:
        out_features, in_features = _attr(gm, self.weight).shape
        return int(out_features), int(in_features)


@dataclass
class Attention:
    query: Linear
    key: Linear
    value: Linear
    output: Linear
    core: Node  # the scaled_dot_product_attention node
    head_size: int
    num_heads: int
    module: str
    # DeBERTa's relative-position projections (rows per head, like query/key; the same weights when
    # share_att_key) and the ops that turn them into the additive bias of ``core``.
    position: list[Linear] = field(default_factory=list)
    bias: list[Node] = field(default_factory=list)


@dataclass
class FeedForward:
    up: Linear
    act: Node  # the activation's output, which the down projection reads
    down: Linear
    intermediate: int
    activation: list[Node] = field(default_factory=list)  # every op of the activation (one, or an element-wise chain)


@dataclass
class Layer:
    index: int
    input: Node  # residual stream entering the layer
    output: Node  # output of the layer's last layer norm
    attention: Attention
    attention_norm: Node
    ffn: FeedForward
    output_norm: Node
    module: str


@dataclass
class Embeddings:
    word: Node
    word_weight: str
    position: Node | None
    token_type: Node | None
    norm: Node | None
    output: Node
    module: str
    # ALBERT's (and small ELECTRAs') factorized embeddings: an E -> hidden linear after the norm.
    projection: Linear | None = None


@dataclass
class BertStructure:
    embeddings: Embeddings
    layers: list[Layer]
    pooler: Linear | None
    hidden_size: int
    node_component: dict[Node, str] = field(default_factory=dict)

    @property
    def linears(self) -> list[Linear]:
        found = []
        for layer in self.layers:
            a = layer.attention
            found += [a.query, a.key, a.value, a.output, layer.ffn.up, layer.ffn.down, *a.position]
        if self.pooler is not None:
            found.append(self.pooler)
        if self.embeddings.projection is not None:
            found.append(self.embeddings.projection)
        return found

    def tied_layers(self) -> list[list[int]]:
        """Layers grouped by the weights they read: one group per weight set, several layers in a group when they
        repeat one shared layer (ALBERT's repetitions, or share-layers' groups). In layer order."""
        groups: dict[str, list[int]] = {}
        for layer in self.layers:
            groups.setdefault(layer.attention.query.weight, []).append(layer.index)
        return list(groups.values())

    def summary(self) -> dict:
        return {
            "hidden_size": self.hidden_size,
            "layers": [
                {"index": layer.index, "module": layer.module, "heads": layer.attention.num_heads,
                 "head_size": layer.attention.head_size, "intermediate": layer.ffn.intermediate}
                for layer in self.layers
            ],
            "pooler": self.pooler is not None,
            **({"shared_layers": self.tied_layers()} if len(self.tied_layers()) < len(self.layers) else {}),
        }


def _attr(gm: GraphModule, target: str) -> torch.Tensor:
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _skip_back(node: Node, ops: set) -> Node:
    """Walk up through the given ops and through simulated ops (which stand for their input)."""
    while isinstance(node, Node) and node.op == "call_function" and (node.target in ops or is_simulated(node)):
        node = node.args[0]
    return node


def _users(node: Node, ops: set) -> list[Node]:
    return [user for user in node.users if user.op == "call_function" and user.target in ops]


def _forward_through(node: Node, ops: set) -> Node:
    while True:
        nxt = [user for user in node.users if user.op == "call_function" and user.target in ops]
        if len(nxt) != 1:
            return node
        node = nxt[0]


def _forward_simulated(node: Node) -> list[Node]:
    """Users of a node, looking through simulated ops inserted between it and its consumers."""
    found = []
    for user in node.users:
        found += _forward_simulated(user) if is_simulated(user) else [user]
    return found


def _is_linear(node) -> bool:
    return isinstance(node, Node) and node.op == "call_function" and node.target == aten.linear.default


def _factor_outer(node: Node) -> Node | None:
    """If ``node`` is the first factor of a low-rank pair (bias-free linear feeding one linear), the second."""
    if not _is_linear(node) or (len(node.args) > 2 and node.args[2] is not None):
        return None
    users = _forward_simulated(node)
    if len(users) == 1 and _is_linear(users[0]) and _skip_back(users[0].args[0], set()) is node:
        return users[0]
    return None


def _linear(node: Node) -> Linear | None:
    if not _is_linear(node):
        return None
    inner = None
    outer = _factor_outer(node)
    if outer is not None:
        inner, node = node, outer
    elif _factor_outer(_skip_back(node.args[0], set())) is node:
        inner = _skip_back(node.args[0], set())
    weight = _skip_back(node.args[1], set())
    bias = _skip_back(node.args[2], set()) if len(node.args) > 2 else None
    if not (isinstance(weight, Node) and weight.op == "get_attr"):
        return None
    bias_target = bias.target if isinstance(bias, Node) and bias.op == "get_attr" else None
    factor = _skip_back(inner.args[1], set()) if inner is not None else None
    if inner is not None and not (isinstance(factor, Node) and factor.op == "get_attr"):
        return None
    return Linear(node=node, weight=weight.target, bias=bias_target, module=module_path(node), inner=inner,
                  factor=factor.target if factor is not None else None)


def _head_size(q_linear: Node, core_q: Node) -> int | None:
    # The view right after the projection is [batch, seq, heads or -1, head_size].
    node = core_q
    while isinstance(node, Node) and node is not q_linear:
        if node.target in (aten.view.default, aten.reshape.default, aten._unsafe_view.default):
            shape = node.args[1]
            if isinstance(shape, (list, tuple)) and len(shape) == 4 and isinstance(shape[-1], int):
                return int(shape[-1])
        node = node.args[0] if node.args else None
    val = core_q.meta.get("val")
    return int(val.shape[-1]) if val is not None else None


def _residual_norm(start: Node) -> tuple[Node, Node] | None:
    """From a sublayer's output linear, follow dropout -> add(residual) -> layer_norm."""
    node = _forward_through(start, _PASSTHROUGH)
    adds = _users(node, _ADDS)
    if len(adds) != 1:
        return None
    add = adds[0]
    residual = add.args[1] if add.args[0] is node else add.args[0]
    norms = _users(add, _NORMS)
    if len(norms) != 1:
        return None
    return residual, norms[0]


def _attention_block(core: Node, gm: GraphModule) -> tuple[Attention, Node, Node] | None:
    q = _linear(_skip_back(core.args[0], _RESHAPES))
    k = _linear(_skip_back(core.args[1], _RESHAPES))
    v = _linear(_skip_back(core.args[2], _RESHAPES))
    if q is None or k is None or v is None:
        return None
    out_node = _forward_through(core, _RESHAPES)
    outs = [_linear(user) for user in _forward_simulated(out_node)]
    outs = [o for o in outs if o is not None]
    if len(outs) != 1:
        return None
    head_size = _head_size(q.node, core.args[0])
    if not head_size:
        return None
    heads = int(_attr(gm, q.weight).shape[0]) // head_size
    prefix = _common_prefix([q.module, k.module, v.module])
    position, bias = _attention_bias(core, {q.node, k.node, v.node})
    return Attention(q, k, v, outs[0], core, head_size, heads, prefix, position, bias), \
        _skip_back(q.input, set()), outs[0].node


def _attention_bias(core: Node, content: set[Node]) -> tuple[list[Linear], list[Node]]:
    """The linears (other than q/k/v) that an attention's additive mask reads, and the ops between them and it.

    BERT's mask is the padding mask alone: no linears. DeBERTa's adds content -> position and position -> content
    terms computed from relative-position projections (compiler/disentangled_attention.py)."""
    mask = core.args[3] if len(core.args) > 3 else core.kwargs.get("attn_mask")
    if not isinstance(mask, Node):
        return [], []
    linears, ops, seen, stack = [], [], set(), [mask]
    while stack:
        node = stack.pop()
        if node in seen or node.op != "call_function":
            continue
        seen.add(node)
        if _is_linear(node):
            if node not in content:
                found = _linear(node)
                if found is not None:
                    linears.append(found)
            continue
        ops.append(node)
        stack.extend(node.all_input_nodes)
    return sorted(linears, key=lambda lin: lin.node.name), ops if linears else []


def _common_prefix(paths: list[str]) -> str:
    parts = [p.split(".") for p in paths]
    common = []
    for items in zip(*parts):
        if len(set(items)) != 1:
            break
        common.append(items[0])
    return ".".join(common)


def analyze(gm: GraphModule) -> BertStructure:
    """Find the BERT structure of a traced encoder, or say precisely what is missing."""
    graph = gm.graph
    placeholders = {n.name: n for n in graph.nodes if n.op == "placeholder"}
    cores = [n for n in graph.nodes if n.op == "call_function" and n.target == aten.scaled_dot_product_attention.default]
    if not cores:
        raise UnsupportedModelError(
            "no attention block found: the graph has no scaled_dot_product_attention fed by query/key/value linears.",
            field="model",
            fix="bertpress supports BERT-family encoders loaded with attn_implementation='sdpa' (BERT, MiniLM, RoBERTa).",
        )
    layers: list[Layer] = []
    for index, core in enumerate(cores):
        found = _attention_block(core, gm)
        if found is None:
            raise UnsupportedModelError(
                f"attention op {core.name} is not fed by separate query/key/value linears with a [batch, seq, heads,"
                " head_size] view, or is not followed by one output linear.", field="model",
                fix="bertpress supports BERT-style encoders (separate q/k/v projections, post-layer-norm).",
            )
        attention, layer_input, out_linear = found
        after_attn = _residual_norm(out_linear)
        if after_attn is None or _skip_back(after_attn[0], _PASSTHROUGH) is not _skip_back(layer_input, _PASSTHROUGH):
            raise UnsupportedModelError(
                f"after attention {core.name}, no residual add + layer norm on the layer input was found.",
                field="model", fix="bertpress supports post-layer-norm BERT encoders.",
            )
        attention_norm = after_attn[1]
        ups = [_linear(u) for u in _forward_simulated(attention_norm)]
        ups = [u for u in ups if u is not None]
        if len(ups) != 1:
            raise UnsupportedModelError(f"no feed-forward input linear after layer norm {attention_norm.name}.",
                                        field="model", fix="bertpress supports BERT-style feed-forward blocks.")
        up = ups[0]
        activation = _activation(up.node)
        acts = activation[-1:]
        downs = [_linear(u) for u in _forward_simulated(acts[0])] if len(acts) == 1 else []
        downs = [d for d in downs if d is not None]
        after_ffn = _residual_norm(downs[0].node) if len(downs) == 1 else None
        if after_ffn is None or after_ffn[0] is not attention_norm:
            raise UnsupportedModelError(
                f"no feed-forward block (linear -> activation -> linear -> residual add -> layer norm) after {attention_norm.name}.",
                field="model", fix="bertpress supports BERT-style feed-forward blocks.",
            )
        module = _common_prefix([attention.module, up.module, downs[0].module])
        layers.append(Layer(index, layer_input, after_ffn[1], attention, attention_norm,
                            FeedForward(up, acts[0], downs[0], int(_attr(gm, up.weight).shape[0]), activation),
                            after_ffn[1], module))
    for previous, layer in zip(layers, layers[1:]):
        if _skip_back(layer.input, _PASSTHROUGH) is not previous.output:
            raise UnsupportedModelError(f"layer {layer.index} does not consume layer {previous.index}'s output.",
                                        field="model", fix="bertpress supports sequential encoder stacks.")

    embeddings = _embeddings(graph, placeholders, layers[0].input)
    last = layers[-1].output
    pooler = None
    for user in _forward_through(last, set()).users:
        node = _forward_through(user, {aten.slice.Tensor, aten.select.int})
        for candidate in [node] + list(node.users):
            found = _linear(candidate)
            if found is not None and found.node.args[0] is not last:
                pooler = found
    hidden = int(_attr(gm, layers[0].attention.output.weight).shape[0])
    structure = BertStructure(embeddings, layers, pooler, hidden)
    structure.node_component = classify_nodes(gm, structure)
    return structure


def _activation(up: Node) -> list[Node]:
    """The ops between a feed-forward's two linears, last the one the down projection reads: a single activation
    op, or an element-wise chain computed from the up projection alone (gelu_new, written out). [] if neither."""
    acts = _users(up, _ACTS)
    if len(acts) == 1:
        return acts
    inside, chain = {up}, []
    node = up.next
    for _ in range(24):  # a written-out activation is a handful of ops; simulated ops may sit between them
        if node.op == "call_function" and node.target in _ELEMENTWISE and node.all_input_nodes \
                and all(arg in inside for arg in node.all_input_nodes):
            inside.add(node)
            chain.append(node)
        node = node.next
        if node.op == "output":
            break
    leaving = [n for n in chain if any(u not in inside for u in n.users)]
    if len(leaving) != 1 or any(u not in inside for u in up.users):
        return []
    return chain[:chain.index(leaving[0]) + 1] if chain[-1] is not leaving[0] else chain


def _embeddings(graph, placeholders, first_input: Node) -> Embeddings:
    lookups = [n for n in graph.nodes if n.op == "call_function" and n.target == aten.embedding.default]
    word = next((n for n in lookups if n.args[1] is placeholders.get("input_ids")), None)
    if word is None or not (isinstance(word.args[0], Node) and word.args[0].op == "get_attr"):
        raise UnsupportedModelError("no word-embedding lookup of input_ids found.", field="model",
                                    fix="bertpress needs a model whose first op looks up input_ids in an embedding table.")
    token_type = next((n for n in lookups if n.args[1] is placeholders.get("token_type_ids")), None)
    position = next((n for n in lookups if n is not word and n is not token_type), None)
    output = _skip_back(first_input, _PASSTHROUGH)
    if output.op == "call_function" and output.target == aten.mul.Tensor:  # DeBERTa zeroes padding: norm * mask
        norms = [arg for arg in output.args if isinstance(arg, Node) and arg.target in _NORMS]
        output = norms[0] if len(norms) == 1 else output
    projection = _linear(output)
    if projection is not None:  # factorized embeddings: the norm is on the E-wide sum, before the projection
        output = _skip_back(projection.input, _PASSTHROUGH)
    norm = output if output.op == "call_function" and output.target in _NORMS else None
    return Embeddings(word, word.args[0].target, position, token_type, norm, first_input,
                      module_path(word).rsplit(".", 1)[0], projection)


# Components of the seed's breakdown of BERT cost.
COMPONENTS = ("embeddings", "linear-before-attention", "attention-core", "linear-after-attention", "feed-forward", "other")


def classify_nodes(gm: GraphModule, structure: BertStructure) -> dict[Node, str]:
    """Assign every node to one component of the seed's breakdown, by dataflow position."""
    component: dict[Node, str] = {}
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    first_layer = order[structure.layers[0].attention.query.node]
    for node in gm.graph.nodes:
        if node.op == "call_function" and order[node] < first_layer:  # weights follow their user below
            component[node] = "embeddings"
    for layer in structure.layers:
        a = layer.attention
        for lin in (a.query, a.key, a.value, *a.position):
            component[lin.node] = "linear-before-attention"
        component[a.core] = "attention-core"
        for node in a.bias:
            component[node] = "attention-core"
        component[a.output.node] = "linear-after-attention"
        component[layer.ffn.up.node] = "feed-forward"
        component[layer.ffn.act] = "feed-forward"
        for node in layer.ffn.activation:
            component[node] = "feed-forward"
        component[layer.ffn.down.node] = "feed-forward"
    for lin in structure.linears:
        if lin.inner is not None and lin.node in component:
            component[lin.inner] = component[lin.node]
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            users = _forward_simulated(node)
            if users and users[0] in component:
                component[node] = component[users[0]]
        component.setdefault(node, "other")
    return component
