"""Residual + LayerNorm as `Sum` + `LayerNormalization`, not ORT's fused `SkipLayerNormalization`.

On x86 CPUs, ONNX Runtime's CPU kernel for the contrib op `SkipLayerNormalization` is slower than an ONNX
`Sum` followed by the standard `LayerNormalization` on BERT's activations (`python bench/norm_kernels.py`
times both). A BERT layer has two of them; `python bench/lowering_speed.py` times the whole int8 MiniLM both
ways.

onnxscript's ort_fusions emit `SkipLayerNormalization(input, skip, gamma, beta, bias)`, and ONNX Runtime's
own graph optimizer (level extended, on by default) fuses any `Add` -> `LayerNormalization` back into it
when the session is created, so writing plain Adds would not last. It matches `Add` parents only, so we
write the residual sum as one `Sum` node:

  * ``bias`` given and ``input`` is the output of a weight MatMul used only here: ``Add(MatMul, bias)``
    (ORT folds it into the quantized MatMul's bias at load), then ``Sum(that, skip)``;
  * otherwise ``Sum(input, skip[, bias])``,

then ``LayerNormalization(sum, gamma, beta, axis=-1, epsilon)``. The fused node's optional outputs
(mean, inverse std) must be unused; its fourth (the pre-norm sum) becomes the Sum's output.
"""

from __future__ import annotations

import onnx_ir as ir

from .fusions import MS_DOMAIN

_DEFAULT_EPSILON = 1e-12  # ORT's kDefaultSkipLayerNormEpsilon


def _weight_matmul(value: ir.Value) -> bool:
    node = value.producer()
    return (node is not None and node.op_type == "MatMul" and node.domain in ("", "ai.onnx")
            and len(value.uses()) == 1 and len(node.inputs) > 1 and node.inputs[1] is not None
            and node.inputs[1].const_value is not None)


def _used(value: ir.Value | None) -> bool:
    return value is not None and (bool(value.uses()) or value.is_graph_output())


def unfuse_skip_layer_norm(model: ir.Model) -> tuple[int, list[str]]:
    """Rewrite every SkipLayerNormalization of ``model`` in place; return (#rewritten, notes)."""
    graph = model.graph
    done, kept = 0, []
    for node in [n for n in graph if n.op_type == "SkipLayerNormalization" and n.domain == MS_DOMAIN]:
        inputs = list(node.inputs) + [None] * (5 - len(node.inputs))
        x, skip, gamma, beta, bias = inputs[:5]
        outputs = list(node.outputs)
        if any(_used(v) for v in outputs[1:3]) or x is None or skip is None or gamma is None:
            kept.append(node.name or "?")
            continue
        eps = node.attributes.get_float("epsilon", _DEFAULT_EPSILON)
        new_nodes: list[ir.Node] = []
        name = node.name or f"skip_layer_norm_{done}"
        terms = [x, skip]
        if bias is not None and _weight_matmul(x):
            add = ir.Node("", "Add", [x, bias], name=f"{name}_bias", num_outputs=1)
            add.outputs[0].name = f"{name}_biased"
            add.outputs[0].shape, add.outputs[0].type = outputs[0].shape, outputs[0].type
            new_nodes.append(add)
            terms[0] = add.outputs[0]
        elif bias is not None:
            terms.append(bias)
        total = ir.Node("", "Sum", terms, name=f"{name}_residual", num_outputs=1)
        total.outputs[0].name = f"{name}_sum"
        total.outputs[0].shape, total.outputs[0].type = outputs[0].shape, outputs[0].type
        norm = ir.Node("", "LayerNormalization", [total.outputs[0], gamma] + ([beta] if beta is not None else []),
                       {"axis": ir.AttrInt64("axis", -1), "epsilon": ir.AttrFloat32("epsilon", eps)},
                       name=f"{name}_norm", num_outputs=1)
        norm.outputs[0].shape, norm.outputs[0].type = outputs[0].shape, outputs[0].type
        new_nodes += [total, norm]
        graph.insert_before(node, new_nodes)
        _replace(graph, outputs[0], norm.outputs[0])
        if len(outputs) > 3 and _used(outputs[3]):
            _replace(graph, outputs[3], total.outputs[0])
        graph.remove(node, safe=True)
        done += 1
    notes = []
    if done:
        notes.append(f"fusions: {done} SkipLayerNormalization node(s) written as Sum + LayerNormalization "
                     "(ORT's CPU SkipLayerNormalization kernel is 2-3x slower; bench/norm_kernels.py)")
    if kept:
        notes.append(f"fusions: {len(kept)} SkipLayerNormalization node(s) kept fused (their mean/inv-std outputs are used)")
    return done, notes


def _replace(graph: ir.Graph, old: ir.Value, new: ir.Value) -> None:
    """Point every use of ``old`` (and a graph output slot, keeping its public name) at ``new``."""
    if old.is_graph_output():
        public = old.name
        for i, value in enumerate(graph.outputs):
            if value is old:
                graph.outputs[i] = new
        old.name = f"{public}_fused"
        new.name = public
    old.replace_all_uses_with(new)
