"""quantize-linear: int8 (per-channel weights, dynamic activations), int4 (block-wise weights) or fp16 linears.

Lossy. For int8 and fp16 the pass only *simulates* the precision in the graph (fake-quantized
weights and activations, marked as simulated ops) so validation sees the deployed numerics;
lowering strips the simulation and ONNX Runtime's quantizer realizes it. Embeddings are excluded by
default because quantizing the lookup tables costs much more fidelity than it saves time.

int4 is for size: weights become 4-bit integers with one scale per block of ``block_size`` inputs,
rounded by GPTQ on the calibration text (``method: gptq``, default) or to nearest (``rtn``), with a
4-bit zero point per block unless ``symmetric`` and a per-block range search (``clip_search``). The
pass writes the dequantized weights into the graph (they are exactly what the deployed model
multiplies by) and lowering stores them as ONNX Runtime ``MatMulNBits`` (half a byte per weight plus
a float16 scale and a 4-bit zero point per block). With ``compute: int8`` (default) ONNX Runtime multiplies with int8
activations quantized per block of ``block_size`` (accuracy level 4); the pass simulates that
rounding too. ``compute: fp32`` keeps activations in float (accuracy level 0, exact). int4 buys
size, not speed, on x86: MatMulNBits runs at about fp32 speed at either level, below int8
MatMulInteger (``python bench/matmul_kernels.py`` times the three; ``bertpress roofline`` shows this CPU's
int8 and fp32 peaks). A q/k/v
projection in int4 keeps attention as MultiHeadAttention with separate q/k/v MatMuls, not QAttention.
"""

from __future__ import annotations

import torch

from compiler import gptq as gptq_lib
from compiler.graph_edit import get_tensor, set_parameter
from compiler.pass_infra import Pass, PassContext, PassResult, register_pass
from compiler.tasks import LOWER_IS_BETTER
from compiler.simulation import (fake_fp16, fake_quant_activation_blocks_int8, fake_quant_activation_uint8,
                                 fake_quant_table_int8, fake_quant_weight_int8, is_simulated)
from passes.options import QUANTIZE_LINEAR


@register_pass
class QuantizeLinear(Pass):
    """Quantize linear layers to int8, int4 or fp16, simulated (int4: rounded) in the graph and realized at lowering."""

    declaration = QUANTIZE_LINEAR
    kind = "lossy"

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        structure = ctx.structure(gm)
        cfg = self.config
        exclude = set(cfg.exclude)
        bad = sorted(i for i in exclude if isinstance(i, int) and i >= len(structure.layers))
        if bad:
            raise self.refuse(f"exclude names layer {bad[0]} but the model has {len(structure.layers)} layers (0-{len(structure.layers) - 1}).",
                              fix="use a layer index that exists.")
        for group in structure.tied_layers():
            if len({index in exclude for index in group}) > 1:
                raise self.refuse(f"layers {group} repeat one shared layer (their weights are the same tensors), so they"
                                  " are quantized together, but exclude names only some of them.",
                                  fix=f"exclude all of layers {group} or none.")
        chosen, kept = [], []
        for layer in structure.layers:
            groups = ((layer.attention.query, layer.attention.key, layer.attention.value, layer.attention.output), "attention"), \
                     ((layer.ffn.up, layer.ffn.down), "ffn")
            for linears, part in groups:
                (kept if layer.index in exclude or part in exclude else chosen).extend(linears)
        if structure.pooler is not None:
            (kept if "pooler" in exclude else chosen).append(structure.pooler)
        if structure.embeddings.projection is not None:  # ALBERT's E -> hidden projection belongs to the embeddings
            (kept if "embeddings" in exclude else chosen).append(structure.embeddings.projection)
        kept = [lin.module for lin in kept]
        # Linears an earlier quantize-linear stored in int4 keep that (a recipe may put the FFN in
        # int4 for size and the rest in int8 for speed).
        int4_before = ctx.lowering.get("int4_weights", {})
        already_int4 = [lin for lin in chosen if lin.weight in int4_before]
        chosen = [lin for lin in chosen if lin.weight not in int4_before]
        if cfg.dtype == "int4":
            result = self._int4(gm, ctx, chosen, kept)
            if already_int4:
                result.details["kept_int4"] = sorted(lin.module for lin in already_int4)
            return result

        weight_op = fake_quant_weight_int8 if cfg.dtype == "int8" else fake_fp16
        act_op = fake_quant_activation_uint8 if cfg.dtype == "int8" else fake_fp16
        fallback = None
        if cfg.fallback == "auto":
            fallen, fallback = self._fallback(gm, ctx, chosen, structure, quantize_tables="embeddings" not in exclude)
            kept += [lin.module for lin in fallen]
            chosen = [lin for lin in chosen if lin not in fallen]
        graph = gm.graph
        for lin in chosen:
            node = lin.node
            with graph.inserting_before(node):
                weight = graph.call_function(weight_op, (node.args[1],))
                act = graph.call_function(act_op, (node.args[0],))
            node.args = (act, weight, *node.args[2:])
        quantize_tables = "embeddings" not in exclude
        if quantize_tables:
            table_op = fake_quant_table_int8 if cfg.dtype == "int8" else fake_fp16
            for lookup in (structure.embeddings.word, structure.embeddings.position, structure.embeddings.token_type):
                if lookup is None:
                    continue
                with graph.inserting_before(lookup):
                    table = graph.call_function(table_op, (lookup.args[0],))
                lookup.args = (table, *lookup.args[1:])
        graph.lint()
        gm.recompile()
        weights = sorted(lin.weight for lin in chosen)
        lowering = {"quantize": {"dtype": cfg.dtype, "exclude_embeddings": not quantize_tables,
                                 "exclude_modules": sorted(kept + [lin.module for lin in already_int4])}}
        lowering["int8_weights" if cfg.dtype == "int8" else "fp16_weights"] = weights
        details = {"quantized_linears": len(chosen), "kept_full_precision": sorted(kept),
                   "embeddings_quantized": quantize_tables}
        if already_int4:
            details["kept_int4"] = sorted(lin.module for lin in already_int4)
        if fallback is not None:
            details["fallback"] = fallback
        return PassResult(gm, modified=bool(chosen) or quantize_tables, details=details, lowering=lowering)

    def _fallback(self, gm: torch.fx.GraphModule, ctx: PassContext, chosen, structure, quantize_tables: bool):
        """NNCF-style accuracy control: the fewest linears to keep in fp32 so that the budget holds.

        Each weight (tied linears share one and go together) is quantized alone and costed by how much the budget's
        metric drops on calibration batches; then everything is quantized and the costliest are put back to fp32,
        one at a time, until the metric is within budget. The graph is left as it came; returns (linears kept in
        fp32, what the report says).
        """
        if ctx.fidelity is None or ctx.budget is None:
            raise self.refuse("fallback: auto measures the budget's metric against the reference on calibration text,"
                              " which is not possible after a pass that changed the input interface (prune-vocab).",
                              fix="put quantize-linear before prune-vocab, or remove fallback.")
        budget = ctx.budget
        lower_is_better = budget.metric in LOWER_IS_BETTER
        graph = gm.graph
        groups: dict[str, list] = {}
        for lin in chosen:
            groups.setdefault(lin.weight, []).append(lin)
        tables = []
        if quantize_tables:
            for lookup in (structure.embeddings.word, structure.embeddings.position, structure.embeddings.token_type):
                if lookup is not None:
                    with graph.inserting_before(lookup):
                        table = graph.call_function(fake_quant_table_int8, (lookup.args[0],))
                    tables.append((lookup, lookup.args, [table]))
                    lookup.args = (table, *lookup.args[1:])

        def measure() -> float:
            gm.recompile()
            return float(ctx.fidelity(gm))

        base = measure()
        cost: dict[str, float] = {}
        for step, (target, lins) in enumerate(groups.items()):
            entries = [_simulate_int8(graph, lin) for lin in lins]
            value = measure()
            for entry in reversed(entries):
                _undo(graph, entry)
            cost[target] = (value - base) if lower_is_better else (base - value)
            ctx.progress(step=step + 1, total=len(groups), what="linears ranked")
        order = sorted(groups, key=lambda target: (-cost[target], target))
        simulated = {target: [_simulate_int8(graph, lin) for lin in groups[target]] for target in order}
        without = value = measure()
        fallen: list[str] = []
        for target in order:
            if budget.passed(value):
                break
            for entry in reversed(simulated.pop(target)):
                _undo(graph, entry)
            fallen.append(target)
            value = measure()
        for entries in simulated.values():
            for entry in reversed(entries):
                _undo(graph, entry)
        for entry in tables:
            _undo(graph, entry)
        gm.recompile()
        modules = {target: sorted(lin.module for lin in groups[target]) for target in groups}
        report = {"metric": budget.metric, "on": "calibration text",
                  "all_quantized": round(without, 6), "with_fallback": round(value, 6),
                  "budget_kept_on_calibration": budget.passed(value),
                  "fp32_linears": [module for target in fallen for module in modules[target]],
                  "cost_of_each": [[", ".join(modules[target]), round(cost[target], 6)] for target in order]}
        return [lin for target in fallen for lin in groups[target]], report

    def _int4(self, gm: torch.fx.GraphModule, ctx: PassContext, chosen, kept: list[str]) -> PassResult:
        cfg = self.config
        block = cfg.block_size
        if ctx.lowering.get("split"):
            raise self.refuse("decouple-attention's split form (lower.onnx + upper.onnx) cannot store int4 weights yet.",
                              fix="use dtype int8 with decouple-attention.")
        # Every weight matrix: a low-rank linear is two (x -> inner -> node).
        matrices: list[tuple[torch.fx.Node, str, str]] = []
        for lin in chosen:
            if lin.inner is not None:
                matrices.append((lin.inner, lin.factor, lin.module))
            matrices.append((lin.node, lin.weight, lin.module))
        for node, target, module in matrices:
            weight_arg, input_arg = node.args[1], node.args[0]
            if is_simulated(weight_arg) or is_simulated(input_arg):
                raise self.refuse(f"{module} is already quantized by an earlier pass (int8 or fp16); a linear is quantized once.",
                                  fix="put the int4 quantize-linear first and let the later one keep its linears "
                                      "(it skips int4 weights), or exclude the part from one of them.")
            in_features = int(get_tensor(gm, target).shape[1])
            if in_features % block:
                raise self.refuse(f"{module} has {in_features} inputs, which block_size {block} does not divide.",
                                  fix=f"use a block_size that divides {in_features} (16, 32, 64 or 128), or make the "
                                      "pruned width a multiple of it.")
        # Group the weights by the input nodes their uses read (q, k and v share one Hessian; a
        # shared weight sums over its uses) and quantize the groups in graph order.
        order = {node: i for i, node in enumerate(gm.graph.nodes)}
        uses: dict[str, list[torch.fx.Node]] = {}
        for node, target, _ in matrices:
            uses.setdefault(target, []).append(node)
        groups: dict[tuple, list[str]] = {}
        for target, nodes in uses.items():
            key = tuple(sorted({n.args[0] for n in nodes}, key=order.__getitem__))
            groups.setdefault(key, []).append(target)
        batches = ctx.calibration.batches[:cfg.calibration_batches]
        scales: dict[str, dict] = {}
        errors = []
        ordered = sorted(groups.items(), key=lambda item: order[item[0][-1]])
        for step, (inputs, targets) in enumerate(ordered):
            hessian = None
            if cfg.method == "gptq":
                sums = gptq_lib.input_hessians(gm, list(inputs), batches)
                hessian = sum(sums[node] for node in inputs)
            for target in targets:
                weight = get_tensor(gm, target).detach().float()
                grid = {"symmetric": cfg.symmetric, "clip_search": cfg.clip_search}
                quantized = (gptq_lib.gptq(weight, hessian, block, cfg.damp, **grid) if hessian is not None
                             else gptq_lib.round_to_nearest(weight, block, **grid))
                approx = quantized.dequantize()
                errors.append(float((approx - weight).norm() / weight.norm().clamp(min=1e-12)))
                set_parameter(gm, target, approx)
                scales[target] = {"block_size": block, "scales": quantized.scales,
                                  "zero_points": None if cfg.symmetric else quantized.zeros,
                                  "accuracy_level": 4 if cfg.compute == "int8" else 0}
            ctx.progress(step=step + 1, total=len(ordered), what="weight groups")
        if cfg.compute == "int8":
            graph = gm.graph
            simulated: dict[torch.fx.Node, torch.fx.Node] = {}
            for node, _, _ in matrices:
                source = node.args[0]
                if source not in simulated:
                    with graph.inserting_after(source):
                        simulated[source] = graph.call_function(fake_quant_activation_blocks_int8, (source, block))
                node.args = (simulated[source], *node.args[1:])
            graph.lint()
        gm.recompile()
        count = sum(int(get_tensor(gm, t).numel()) for t in scales)
        details = {"dtype": "int4", "method": cfg.method, "block_size": block, "compute": cfg.compute,
                   "quantized_linears": len(chosen), "weight_matrices": len(scales), "weights": count,
                   "symmetric": cfg.symmetric, "clip_search": cfg.clip_search,
                   "stored_bytes": gptq_lib.stored_bytes(count, block, zero_points=not cfg.symmetric),
                   "mean_relative_weight_error": round(sum(errors) / max(len(errors), 1), 5),
                   "kept_full_precision": sorted(kept),
                   "calibration_batches": len(batches) if cfg.method == "gptq" else 0}
        return PassResult(gm, modified=bool(scales), details=details, lowering={"int4_weights": scales})


def _simulate_int8(graph: torch.fx.Graph, lin) -> tuple:
    """Put int8 simulation on one linear; returns what :func:`_undo` needs to take it off again."""
    node = lin.node
    with graph.inserting_before(node):
        weight = graph.call_function(fake_quant_weight_int8, (node.args[1],))
        act = graph.call_function(fake_quant_activation_uint8, (node.args[0],))
    entry = (node, node.args, [act, weight])
    node.args = (act, weight, *node.args[2:])
    return entry


def _undo(graph: torch.fx.Graph, entry: tuple) -> None:
    node, args, added = entry
    node.args = args
    for inserted in added:
        graph.erase_node(inserted)
