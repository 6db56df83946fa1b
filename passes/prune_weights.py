"""prune-weights: element-wise magnitude pruning of linear weights to a target sparsity.

Zeroes the smallest-magnitude entries of the targeted linear weights, ranked across all of them
(``scope: global``) or within each weight (``scope: per_weight``). The graph keeps dense shapes;
lowering stores those weights as ONNX sparse initializers (values + int32 indices, which ONNX
Runtime densifies when it loads the model), so bytes on disk drop once sparsity passes 50% for
fp32 weights (80% for int8). ONNX Runtime on CPU has no sparse kernels, so FLOPs and latency do
not drop: the details and the cost model say so. Lossy; exact at sparsity 0. Needs the BERT
structure; runs after the passes that reshape or refactor weights.
"""

from __future__ import annotations

import torch

from compiler.graph_edit import get_tensor, set_parameter
from compiler.pass_infra import Pass, PassContext, PassResult, register_pass
from passes.options import PRUNE_WEIGHTS


@register_pass
class PruneWeights(Pass):
    """Zero the smallest-magnitude linear weights (stored sparse; FLOPs unchanged)."""

    declaration = PRUNE_WEIGHTS
    kind = "lossy"

    def is_exact(self) -> bool:
        return self.config.sparsity == 0.0

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        cfg = self.config
        structure = ctx.structure(gm)
        if cfg.target == "ffn":
            sites = [lin for layer in structure.layers for lin in (layer.ffn.up, layer.ffn.down)]
        elif cfg.target == "attention":
            sites = [lin for layer in structure.layers for lin in
                     (layer.attention.query, layer.attention.key, layer.attention.value, layer.attention.output)]
        else:
            sites = structure.linears
        targets = list(dict.fromkeys(t for lin in sites for t in (lin.factor, lin.weight) if t is not None))
        weights = {t: get_tensor(gm, t).detach() for t in targets}
        if cfg.scope == "global":
            magnitudes = torch.cat([w.abs().reshape(-1) for w in weights.values()])
            cut = _threshold(magnitudes, cfg.sparsity)
            thresholds = {t: cut for t in targets}
        else:
            thresholds = {t: _threshold(w.abs().reshape(-1), cfg.sparsity) for t, w in weights.items()}
        report, zeros, total = [], 0, 0
        for target, weight in weights.items():
            pruned = torch.where(weight.abs() > thresholds[target], weight, torch.zeros_like(weight)) \
                if thresholds[target] is not None else weight.clone()
            set_parameter(gm, target, pruned)
            n_zero = int((pruned == 0).sum())
            zeros += n_zero
            total += pruned.numel()
            report.append({"weight": target, "sparsity": round(n_zero / pruned.numel(), 4)})
        gm.recompile()
        details = {"scope": cfg.scope, "target": cfg.target, "sparsity": round(zeros / max(total, 1), 4),
                   "weights": report,
                   "note": "bytes on disk drop (sparse initializers); FLOPs and latency do not: ONNX Runtime densifies"
                           " the weights at load time and runs dense kernels."}
        return PassResult(gm, modified=True, details=details, lowering={"sparse_weights": targets})


def _threshold(magnitudes: torch.Tensor, sparsity: float) -> float | None:
    """Magnitude at or below which entries are zeroed so that `sparsity` of them go (None: none go)."""
    count = int(round(sparsity * magnitudes.numel()))
    if count == 0:
        return None
    return float(torch.kthvalue(magnitudes.float(), count).values)
