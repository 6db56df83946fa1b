"""layer-drop: remove whole transformer blocks (listed, every k-th kept, the top n, or the n least important).

Lossy. ``count: n`` chooses the blocks greedily by importance: at each step it drops the block
whose removal keeps the pooled embedding closest to the current graph's on *calibration* text
(never the held-out text the pass manager validates on). On MiniLM this matters: dropping the top
block costs far more fidelity than dropping a middle one. Each dropped block is bypassed by wiring its input residual stream to whatever read its
output, then its nodes and weights are deleted, so parameters, bytes and FLOPs really drop.
"""

from __future__ import annotations

import torch

from compiler.graph_edit import remove_dead_code
from compiler.structure import analyze
from compiler.tasks import output_divergence, task_of_model
from compiler.validation import compare, hidden_states, run_batches
from compiler.pass_infra import Pass, PassContext, PassResult, register_pass
from passes.options import LAYER_DROP


@register_pass
class LayerDrop(Pass):
    """Remove whole transformer blocks and their weights."""

    declaration = LAYER_DROP
    kind = "lossy"

    def dropped(self, count: int) -> list[int]:
        cfg = self.config
        if cfg.count is not None:
            raise ValueError("count is chosen by importance; see choose_by_importance")
        if cfg.layers is not None:
            return sorted(cfg.layers)
        if cfg.keep_every is not None:
            return [i for i in range(count) if (count - 1 - i) % cfg.keep_every != 0]
        return list(range(max(count - cfg.top, 0), count))

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        structure = ctx.structure(gm)
        count = len(structure.layers)
        details = {}
        if self.config.count is not None:
            if self.config.count >= count:
                raise self.refuse(f"count {self.config.count} would drop all {count} blocks; at least one must stay.",
                                  fix=f"use a count below {count}.")
            drop, details["importance"] = choose_by_importance(gm, ctx, self.config.count)
        else:
            drop = self.dropped(count)
        past = [i for i in drop if i >= count]
        if past:
            raise self.refuse(f"layers names block {past[0]} but the model has {count} blocks (0-{count - 1}).",
                              fix=f"use indices between 0 and {count - 1}.")
        if len(drop) >= count:
            raise self.refuse(f"this would drop all {count} blocks; at least one must stay.",
                              fix="drop fewer layers.")
        removed = bypass_layers(gm, structure, drop)
        kept = [i for i in range(count) if i not in drop]
        details.update({"dropped": drop, "kept": kept, "nodes_removed": removed})
        shared = [group for group in structure.tied_layers() if len(group) > 1]
        if shared:
            details["shared_layers"] = shared
            details["note"] = ("these layers repeat one shared layer (ALBERT): dropping one removes a repetition, so"
                               " FLOPs drop but the shared weights stay stored while any repetition uses them.")
        return PassResult(gm, modified=bool(drop), details=details)


def bypass_layers(gm: torch.fx.GraphModule, structure, drop: list[int]) -> int:
    """Wire each dropped block's input to its consumers and delete it; returns nodes removed."""
    # Top-down, so each bypass wires to a block that is still in the graph.
    for index in sorted(drop, reverse=True):
        layer = structure.layers[index]
        layer.output.replace_all_uses_with(layer.input)
    return remove_dead_code(gm)


def choose_by_importance(gm: torch.fx.GraphModule, ctx: PassContext, count: int) -> tuple[list[int], list[dict]]:
    """Greedy: repeatedly drop the remaining block whose removal keeps calibration cosine highest (a task model:
    whose removal moves its head's output least, by KL of the label distributions; MSE of a num_labels-1 score)."""
    import copy

    batches = ctx.calibration.batches[:4]
    target = run_batches(hidden_states(gm), batches)
    task = task_of_model(ctx.reference)

    def score(outputs) -> float:
        if task == "feature-extraction":
            return compare(target, outputs, batches).cosine
        return -sum(float(output_divergence(t, o, b["attention_mask"], task))
                    for t, o, b in zip(target, outputs, batches)) / len(batches)

    dropped: list[int] = []
    steps = []
    for _ in range(count):
        scores = {}
        for index in range(len(ctx.structure(gm).layers)):
            if index in dropped:
                continue
            trial = copy.deepcopy(gm)
            bypass_layers(trial, analyze(trial), dropped + [index])
            scores[index] = score(run_batches(hidden_states(trial), batches))
        best = max(scores, key=scores.get)
        dropped.append(best)
        measure = "calibration_cosine" if task == "feature-extraction" else "calibration_negative_divergence"
        steps.append({"dropped": best, measure: round(scores[best], 4),
                      "candidates": {str(k): round(v, 4) for k, v in sorted(scores.items())}})
    return sorted(dropped), steps
