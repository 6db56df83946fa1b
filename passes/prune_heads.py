"""prune-heads: remove whole attention heads, scored by weight L1, gradient sensitivity or attention entropy.

Rewrites each layer's q/k/v projections (drops the output rows of removed heads) and the attention
output projection (drops the matching input columns). The q/k/v views are [B, S, -1, head_size],
so the head count follows from the new weight widths and layers may end with different counts.
Parameters, bytes and FLOPs really drop. Lossy, except when every head is kept (then it is exact
and the pass manager checks it to 1e-4). Needs the BERT structure; the data-driven importances
(``gradient``, ``entropy``) and the bias compensation use the calibration batches and the reference.

Bias compensation (opt-in): a removed head's mean output on calibration text is folded into the
output projection's bias. It is off by default: on MiniLM it does not raise fidelity on held-out text of
another domain.
"""

from __future__ import annotations

import torch

from compiler import importance as imp
from compiler.graph_edit import get_tensor, set_parameter, slice_parameter
from compiler.pass_infra import Pass, PassContext, PassResult, register_pass
from passes.options import PRUNE_HEADS, PruneHeadsConfig


def choose_heads(scores: list[torch.Tensor], cfg: PruneHeadsConfig, wanted: list[int] | None = None) -> list[list[int]]:
    """Indices (ascending) of the heads kept in each layer (``wanted``: how many, instead of cfg.keep)."""
    counts = [len(s) for s in scores]
    if cfg.keep_fraction is not None:
        total = max(round(cfg.keep_fraction * sum(counts)), 0)
        floors = [min(cfg.min_per_layer, c) for c in counts]
        kept = [set(torch.argsort(s, descending=True)[:f].tolist()) for s, f in zip(scores, floors)]
        ranked = sorted(((float(s[h]), i, h) for i, s in enumerate(scores) for h in range(len(s))
                         if h not in kept[i]), reverse=True)
        for _, i, h in ranked[:max(total - sum(floors), 0)]:
            kept[i].add(h)
        return [sorted(k) for k in kept]
    if wanted is None:
        wanted = cfg.keep if isinstance(cfg.keep, list) else [cfg.keep] * len(scores)
    return [sorted(torch.argsort(s, descending=True)[:n].tolist()) for s, n in zip(scores, wanted)]


@register_pass
class PruneHeads(Pass):
    """Remove whole attention heads (q/k/v rows and output columns) by importance."""

    declaration = PRUNE_HEADS
    kind = "lossy"
    requires = ("structure", "calibration", "reference")

    def is_exact(self) -> bool:
        return self.config.keep_fraction == 1.0 or super().is_exact()

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        cfg = self.config
        structure = ctx.structure(gm)
        layers = structure.layers
        counts = cfg.counts(self, [layer.attention.num_heads for layer in layers], "heads")
        # Layers that repeat one shared layer (ALBERT) lose the same heads: scores add up over the repetitions.
        groups = _tied_groups(self, structure)

        batches = ctx.calibration.batches[:cfg.calibration_batches]
        if cfg.importance == "l1":
            scores = imp.head_l1(gm, structure)
        elif cfg.importance == "entropy":
            scores = imp.head_entropy(gm, structure, batches)
        else:
            scores = imp.head_gradient(gm, structure, batches, ctx.reference, seed=ctx.seed)
        kept = self._choose(scores, groups, counts)
        self.kept_everything = all(len(k) == l.attention.num_heads for k, l in zip(kept, layers))
        refit = cfg.reconstruct and not self.kept_everything
        grams = imp.input_grams(gm, [l.attention.output.input for l in layers], batches) if refit else None
        means = imp.head_mean_outputs(gm, structure, batches) \
            if cfg.compensate_bias and not refit and not self.kept_everything else None
        for group in groups:  # a shared weight is refit to, or compensated for, all its repetitions at once
            if grams is not None:
                grams[group[0]] = sum(grams[i] for i in group)
            if means is not None:
                means[group[0]] = sum(means[i] for i in group) / len(group)
        first = {i: group[0] for group in groups for i in group}

        report = []
        for layer, keep in zip(layers, kept):
            a = layer.attention
            size = a.head_size
            removed = [h for h in range(a.num_heads) if h not in keep]
            if first[layer.index] != layer.index:  # its weights are the group's first layer's, sliced there
                report.append({"layer": layer.index, "heads_before": a.num_heads, "kept": keep, "removed": removed,
                               "shares_weights_with": first[layer.index]})
                continue
            if means is not None and removed and a.output.bias is not None:
                out_weight = get_tensor(gm, a.output.weight).detach()
                blocks = torch.cat([torch.arange(h * size, (h + 1) * size) for h in removed])
                shift = out_weight[:, blocks] @ means[layer.index][removed].reshape(-1)
                set_parameter(gm, a.output.bias, get_tensor(gm, a.output.bias).detach() + shift)
            rows = torch.cat([torch.arange(h * size, (h + 1) * size) for h in keep])
            # DeBERTa's relative-position projections have rows per head too; with share_att_key they are query/key.
            own = {a.query.weight, a.key.weight, a.value.weight}
            position = list({p.weight: p for p in a.position if p.weight not in own}.values())
            for lin in (a.query, a.key, a.value, *position):
                slice_parameter(gm, lin.weight, 0, rows)
                if lin.bias is not None:
                    slice_parameter(gm, lin.bias, 0, rows)
            if grams is not None:
                weight, bias = imp.refit_columns(get_tensor(gm, a.output.weight).detach(),
                                                 get_tensor(gm, a.output.bias).detach() if a.output.bias else None,
                                                 grams[layer.index], rows)
                set_parameter(gm, a.output.weight, weight)
                if bias is not None:
                    set_parameter(gm, a.output.bias, bias)
            else:
                slice_parameter(gm, a.output.weight, 1, rows)
            report.append({"layer": layer.index, "heads_before": a.num_heads, "kept": keep, "removed": removed,
                           "scores": [round(float(s), 6) for s in scores[layer.index]]})
        gm.recompile()
        details = {"importance": cfg.importance, "heads_before": sum(l.attention.num_heads for l in layers),
                   "heads_after": sum(len(k) for k in kept), "layers": report,
                   "bias_compensated": means is not None, "reconstructed": grams is not None}
        if any(len(group) > 1 for group in groups):
            details["shared_layers"] = [group for group in groups if len(group) > 1]
        # Keeping every head still re-materializes the weights: the manager checks it as an exact rewrite.
        return PassResult(gm, modified=True, details=details)

    def _choose(self, scores: list[torch.Tensor], groups: list[list[int]], counts: list) -> list[list[int]]:
        """choose_heads over groups of tied layers (one per layer when nothing is shared), per layer again."""
        if all(len(group) == 1 for group in groups):
            return choose_heads(scores, self.config)
        wanted = None
        if self.config.keep_fraction is None:
            wanted = []
            for group in groups:
                asked = sorted({counts[i] for i in group})
                if len(asked) > 1:
                    raise self.refuse(f"layers {group} repeat one shared layer (their weights are the same tensors), so"
                                      f" they keep the same heads, but keep asks for {asked} heads among them.",
                                      fix=f"give layers {group} one keep count.")
                wanted.append(asked[0])
        chosen = choose_heads([sum(scores[i] for i in group) for group in groups], self.config, wanted)
        by_layer = {i: keep for group, keep in zip(groups, chosen) for i in group}
        return [by_layer[i] for i in range(len(scores))]


def _tied_groups(pass_: Pass, structure) -> list[list[int]]:
    """Groups of layers that read the same attention weights (all four), refusing weights shared any other way."""
    seen: dict[str, int] = {}
    groups = structure.tied_layers()
    group_of = {i: tuple(group) for group in groups for i in group}
    for layer in structure.layers:
        a = layer.attention
        for lin in (a.query, a.key, a.value, a.output, *a.position):
            if lin.factor is not None:
                raise pass_.refuse(f"{lin.weight} is factorized (low-rank); its rows no longer map to heads.",
                                   fix="run prune-heads before low-rank.")
            other = seen.setdefault(lin.weight, layer.index)
            if group_of[other] != group_of[layer.index]:
                raise pass_.refuse(f"layers {other} and {layer.index} share the weight {lin.weight} but not all their"
                                   " attention weights; removing heads from one would change the other.",
                                   fix="run prune-heads before share-layers.")
    return groups
