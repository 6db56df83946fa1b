"""prune-ffn: remove intermediate neurons of each feed-forward block by importance.

Rewrites the FFN's up projection (drops output rows and bias entries of removed neurons) and down
projection (drops the matching input columns), so parameters, bytes and FLOPs really drop. Lossy,
except when every neuron is kept (then exact, checked by the pass manager to 1e-4). Importance is
``l1`` (weight norms, no data) or ``activation`` (mean |activation| on calibration text times the
down column's norm). Needs the BERT structure and, for ``activation`` or bias compensation, the
calibration batches.

Bias compensation (opt-in): a removed neuron's mean activation on calibration text, pushed through
its down column, is added to the down projection's bias. ``reconstruct`` goes further: it refits the
down projection by least squares on calibration activations.
"""

from __future__ import annotations

import torch

from compiler import importance as imp
from compiler.graph_edit import get_tensor, set_parameter, slice_parameter
from compiler.pass_infra import Pass, PassContext, PassResult, register_pass
from passes.options import PRUNE_FFN


@register_pass
class PruneFfn(Pass):
    """Remove feed-forward neurons (up rows and down columns) by importance."""

    declaration = PRUNE_FFN
    kind = "lossy"
    requires = ("structure", "calibration")

    def is_exact(self) -> bool:
        return self.config.keep_fraction == 1.0 or super().is_exact()

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        cfg = self.config
        structure = ctx.structure(gm)
        layers = structure.layers
        sizes = [layer.ffn.intermediate for layer in layers]
        wanted = [n if n is not None else max(1, round(cfg.keep_fraction * size))
                  for n, size in zip(cfg.counts(self, sizes, "neurons"), sizes)]
        # Layers that repeat one shared layer (ALBERT) lose the same neurons: scores add up over the repetitions.
        groups = structure.tied_layers()
        group_of = {i: tuple(group) for group in groups for i in group}
        seen: dict[str, int] = {}
        for layer in layers:
            if layer.ffn.up.factor is not None or layer.ffn.down.factor is not None:
                raise self.refuse(f"layer {layer.index}'s FFN is factorized (low-rank); its rows no longer map to neurons.",
                                  fix="run prune-ffn before low-rank.")
            for target in (layer.ffn.up.weight, layer.ffn.down.weight):
                if group_of[seen.setdefault(target, layer.index)] != group_of[layer.index]:
                    raise self.refuse(f"layers {seen[target]} and {layer.index} share the weight {target} but not all"
                                      " their weights.", fix="run prune-ffn before share-layers.")
        for group in groups:
            if len({wanted[i] for i in group}) > 1:
                raise self.refuse(f"layers {group} repeat one shared layer (their weights are the same tensors), so they"
                                  f" keep the same neurons, but keep asks for {sorted({wanted[i] for i in group})}.",
                                  fix=f"give layers {group} one keep count.")

        self.kept_everything = all(n == l.ffn.intermediate for n, l in zip(wanted, layers))
        batches = ctx.calibration.batches[:cfg.calibration_batches]
        stats = None
        if cfg.importance == "activation" or (cfg.compensate_bias and not cfg.reconstruct and not self.kept_everything):
            stats = imp.neuron_activations(gm, structure, batches)
        scores = stats.scores if cfg.importance == "activation" else imp.neuron_l1(gm, structure)
        grams = imp.input_grams(gm, [l.ffn.act for l in layers], batches) \
            if cfg.reconstruct and not self.kept_everything else None
        scores = list(scores)
        for group in groups:  # a shared weight is scored, refit and compensated over all its repetitions
            scores[group[0]] = sum(scores[i] for i in group)
            if grams is not None:
                grams[group[0]] = sum(grams[i] for i in group)
            if stats is not None:
                stats.mean_activation[group[0]] = sum(stats.mean_activation[i] for i in group) / len(group)
        first = {i: group[0] for group in groups for i in group}

        report = []
        for layer, n in zip(layers, wanted):
            ffn = layer.ffn
            if first[layer.index] != layer.index:  # its weights are the group's first layer's, sliced there
                report.append({"layer": layer.index, "neurons_before": ffn.intermediate, "neurons_after": n,
                               "shares_weights_with": first[layer.index]})
                continue
            order = torch.argsort(scores[layer.index], descending=True)
            keep = torch.sort(order[:n]).values
            removed = torch.sort(order[n:]).values
            if grams is not None:
                down, bias = imp.refit_columns(get_tensor(gm, ffn.down.weight).detach(),
                                               get_tensor(gm, ffn.down.bias).detach() if ffn.down.bias else None,
                                               grams[layer.index], keep)
                set_parameter(gm, ffn.down.weight, down)
                if bias is not None:
                    set_parameter(gm, ffn.down.bias, bias)
            elif cfg.compensate_bias and len(removed) and ffn.down.bias is not None:
                down = get_tensor(gm, ffn.down.weight).detach()
                shift = down[:, removed] @ stats.mean_activation[layer.index][removed]
                set_parameter(gm, ffn.down.bias, get_tensor(gm, ffn.down.bias).detach() + shift)
            slice_parameter(gm, ffn.up.weight, 0, keep)
            if ffn.up.bias is not None:
                slice_parameter(gm, ffn.up.bias, 0, keep)
            if grams is None:
                slice_parameter(gm, ffn.down.weight, 1, keep)
            kept_scores = scores[layer.index][keep]
            report.append({"layer": layer.index, "neurons_before": ffn.intermediate, "neurons_after": n,
                           "kept_score_share": round(float(kept_scores.sum() / scores[layer.index].sum().clamp_min(1e-12)), 4)})
        gm.recompile()
        details = {"importance": cfg.importance, "neurons_before": sum(l.ffn.intermediate for l in layers),
                   "neurons_after": sum(wanted), "layers": report,
                   "bias_compensated": cfg.compensate_bias and grams is None and not self.kept_everything,
                   "reconstructed": grams is not None}
        if any(len(group) > 1 for group in groups):
            details["shared_layers"] = [group for group in groups if len(group) > 1]
        return PassResult(gm, modified=True, details=details)
