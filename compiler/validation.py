"""Numerical checks of a candidate against a reference: max-abs-error, pooled cosine, NaN/Inf.

Fidelity is measured on the calibration's held-out slice, never on the text passes calibrated on.
The sentence embedding is pooled the way the model's sentence-transformers config says (mean by
default), so cosine here is what a user of the embeddings would see. A task model (compiler.tasks)
is compared on its logits instead: cosine of the logit vectors and the task's own metrics.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .tasks import model_output, task_metrics
from .model_inputs import feed

Runner = Callable[[dict[str, torch.Tensor]], torch.Tensor]


def hidden_states(module: torch.nn.Module) -> Runner:
    """A runner that returns the last hidden state of a HF model or traced graph (a task model: its logits)."""

    def run(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():
            out = module(**feed(module, batch))
        return model_output(out)

    return run


def pool(hidden: torch.Tensor, mask: torch.Tensor, mode: str = "mean") -> torch.Tensor:
    if mode == "cls":
        return hidden[:, 0]
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)


def pooling_mode(pooling_config: dict) -> str:
    return "cls" if pooling_config.get("pooling_mode_cls_token") else "mean"


@dataclass
class Comparison:
    max_abs_error: float
    cosine: float  # mean over texts
    cosine_min: float
    finite: bool
    # A task model's metrics (compiler.tasks.task_metrics): agreement, accuracy, spearman, logits_mse, ...
    metrics: dict | None = None

    def as_dict(self) -> dict:
        return {"max_abs_error": self.max_abs_error, "cosine": self.cosine, "cosine_min": self.cosine_min,
                "finite": self.finite, **({"metrics": self.metrics} if self.metrics else {})}

    def value(self, metric: str) -> float:
        """The named budget metric (cosine for an encoder; any of the task's metrics for a task model)."""
        if metric == "cosine" or not self.metrics:
            return self.cosine
        return self.metrics[metric]


def run_batches(runner: Runner, batches: list[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
    return [runner(batch).float() for batch in batches]


def compare(reference: list[torch.Tensor], candidate: list[torch.Tensor], batches: list[dict[str, torch.Tensor]],
            pooling: str = "mean", candidate_batches: list[dict[str, torch.Tensor]] | None = None,
            aligned: list[torch.Tensor] | None = None, task: str = "feature-extraction",
            labels: list | None = None) -> Comparison:
    """Compare hidden states on real (non-padding) tokens and pooled embeddings per text.

    ``candidate_batches`` are the same texts tokenized for the candidate when its tokenizer differs
    (prune-vocab); then ``aligned`` [batch] marks the texts tokenized to the same tokens, the only
    ones whose hidden states are compared token by token (right padding: their first n positions).
    A task model (``task`` other than feature-extraction) is compared on its logits: max-abs-error and
    NaN/Inf on real tokens, cosine of the logit vectors, and every metric of the task (``labels``: the
    held-out texts' class ids, for accuracy and f1).
    """
    if task != "feature-extraction":
        return _compare_task(reference, candidate, batches, task, labels)
    max_abs, cosines, finite = 0.0, [], True
    candidate_batches = candidate_batches or batches
    for index, (ref, cand, batch, cbatch) in enumerate(zip(reference, candidate, batches, candidate_batches)):
        mask, cmask = batch["attention_mask"].bool(), cbatch["attention_mask"].bool()
        finite = finite and bool(torch.isfinite(cand[cmask]).all())
        if aligned is None:
            if ref.shape != cand.shape:
                raise ValueError(f"output shape {tuple(cand.shape)} differs from the reference's {tuple(ref.shape)}")
            max_abs = max(max_abs, float((ref - cand)[mask].abs().max()))
        else:
            for row in aligned[index].nonzero().flatten().tolist():
                n = int(mask[row].sum())
                max_abs = max(max_abs, float((ref[row, :n] - cand[row, :n]).abs().max()))
        cos = torch.nn.functional.cosine_similarity(pool(ref, batch["attention_mask"], pooling),
                                                    pool(cand, cbatch["attention_mask"], pooling), dim=-1)
        cosines.append(cos)
    all_cos = torch.cat(cosines)
    return Comparison(max_abs, float(all_cos.mean()), float(all_cos.min()), finite)


def _compare_task(reference, candidate, batches, task: str, labels) -> Comparison:
    max_abs, finite = 0.0, True
    for ref, cand, batch in zip(reference, candidate, batches):
        if ref.shape != cand.shape:
            raise ValueError(f"output shape {tuple(cand.shape)} differs from the reference's {tuple(ref.shape)}")
        diff = ref - cand if task == "sequence-classification" else (ref - cand)[batch["attention_mask"].bool()]
        real = cand if task == "sequence-classification" else cand[batch["attention_mask"].bool()]
        finite = finite and bool(torch.isfinite(real).all())
        max_abs = max(max_abs, float(diff.abs().max()) if diff.numel() else 0.0)
    metrics = task_metrics(reference, candidate, batches, task, labels) if finite else {}
    return Comparison(max_abs, metrics.pop("cosine", float("nan")), metrics.pop("cosine_min", float("nan")), finite,
                      metrics=metrics or None)
