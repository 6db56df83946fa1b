"""Task models: which head a checkpoint carries, how its output is read, and the metrics that fit it.

A checkpoint's head comes from ``config.architectures`` (``BertForSequenceClassification`` ->
sequence-classification), or from the recipe's ``task:`` when it names one. bertpress carries four:

- ``feature-extraction``: the bare encoder (``AutoModel``); output ``last_hidden_state`` (+ ``pooler_output``).
- ``sequence-classification``: ``logits`` [batch, labels]; ``num_labels: 1`` is a regression or a
  cross-encoder's relevance score (sentence-transformers ``CrossEncoder`` folders are this).
- ``token-classification``: ``logits`` [batch, seq, labels].
- ``question-answering``: ``start_logits`` and ``end_logits`` [batch, seq].

Everything that judges a model (the pass manager, the final ONNX Runtime check) sees one tensor per
batch: the hidden state, the logits, or QA's start and end logits stacked on a last axis of 2.
This module loads no torch at import, so the recipe schema can name its tasks and metrics.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import ModelError, RecipeError

if TYPE_CHECKING:
    import torch

TASKS = ("feature-extraction", "sequence-classification", "token-classification", "question-answering")
METRICS = ("cosine", "agreement", "accuracy", "f1", "spearman", "logits_mse")
# Metrics where lower is better; the budget bounds them with `max`, every other with `min`.
LOWER_IS_BETTER = ("logits_mse",)
AUTO_CLASSES = {"feature-extraction": "AutoModel", "sequence-classification": "AutoModelForSequenceClassification",
                "token-classification": "AutoModelForTokenClassification",
                "question-answering": "AutoModelForQuestionAnswering"}
# The architecture name's suffix -> the task of its head.
_HEADS = {"ForSequenceClassification": "sequence-classification", "ForTokenClassification": "token-classification",
          "ForQuestionAnswering": "question-answering"}
# Bare encoders, and pre-training heads a base checkpoint ships with (BERT's own bert-base-uncased says
# BertForMaskedLM): their encoder is the model a user compresses, and the report says the head was not compiled.
_ENCODERS = ("Model", "ForMaskedLM", "ForPreTraining")


def head_of(architectures: list[str] | None) -> tuple[str | None, str | None]:
    """(task, architecture) that config.architectures names; task None for a head bertpress cannot carry."""
    for name in architectures or []:
        for suffix, task in _HEADS.items():
            if name.endswith(suffix):
                return task, name
        if name.endswith(_ENCODERS):
            return "feature-extraction", name
    return (None, architectures[0]) if architectures else ("feature-extraction", None)


def task_of_model(module) -> str:
    """The task of a loaded Hugging Face model (or its traced graph's reference) from its class name."""
    task, _ = head_of([type(module).__name__])
    return task or "feature-extraction"


def resolve_task(config, requested: str | None, where: str) -> tuple[str, list[str]]:
    """The task to load ``config``'s checkpoint as, and notes for the report; a head that cannot be carried
    (or a requested head the checkpoint does not have) is a ModelError, never a silent drop."""
    architectures = list(getattr(config, "architectures", None) or [])
    task, architecture = head_of(architectures)
    notes: list[str] = []
    if requested is None:
        if task is None:
            raise ModelError(
                f"{where}/config.json names the architecture {architecture!r}, whose head bertpress cannot compile"
                f" (it carries {', '.join(TASKS[1:])} heads, or the bare encoder).",
                field="model",
                fix="set `task: feature-extraction` in the recipe to compile the encoder without its head, or use a"
                    " checkpoint with a supported head.")
        if architecture and architecture.endswith(("ForMaskedLM", "ForPreTraining")):
            notes.append(f"{architecture}'s pre-training head is not compiled: model.onnx outputs the encoder's hidden"
                         " states (task feature-extraction)")
        return task, notes
    if requested == "feature-extraction":
        if task not in ("feature-extraction", None) or (architecture and task is None):
            notes.append(f"task feature-extraction: the {architecture} head is not compiled, as the recipe asks")
        return requested, notes
    if task != requested:
        raise ModelError(
            f"the recipe asks for task {requested!r} but {where}/config.json names"
            f" {architecture or 'no architecture'}, which has no {requested} head (loading it would add an untrained"
            " random head).",
            field="task",
            fix=f"point model at a fine-tuned {requested} checkpoint, or remove `task:` to compile what the checkpoint is.")
    return task, notes


def num_labels(config, task: str) -> int | None:
    if task in ("sequence-classification", "token-classification"):
        return int(getattr(config, "num_labels", 2))
    return None


def check_metric(metric: str, task: str, labels: int | None, has_labels: bool, file: str) -> None:
    """Refuse (exit 2, before any work) a budget metric that does not fit the model's task or held-out text."""
    fits = {
        "feature-extraction": ("cosine",),
        "sequence-classification": ("spearman", "logits_mse") if labels == 1 else
        ("cosine", "agreement", "accuracy", "f1", "logits_mse"),
        "token-classification": ("cosine", "agreement", "accuracy", "f1", "logits_mse"),
        "question-answering": ("cosine", "agreement", "logits_mse"),
    }[task]
    what = f"a {task} model" + (" with num_labels 1 (a regression or reranker score)" if labels == 1 else "")
    if metric not in fits:
        raise RecipeError(f"budget.metric {metric!r} does not fit {what}.", file=file, field="budget.metric",
                          fix=f"use one of: {', '.join(fits)}.")
    if metric in ("accuracy", "f1") and not has_labels:
        raise RecipeError(
            f"budget.metric {metric!r} needs labeled held-out text, but calibration.texts has no labels.", file=file,
            field="budget.metric",
            fix='give calibration.texts a .jsonl file with a "label" on every line (or "labels" per token), or use'
                " budget.metric agreement.")


def model_output(out) -> torch.Tensor:
    """One tensor from a model's output: hidden states, logits, or QA's start/end logits stacked [batch, seq, 2]."""
    import torch

    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "keys") and "start_logits" in out:
        return torch.stack([out["start_logits"], out["end_logits"]], dim=-1)
    return out[0]


def label_ids(labels: list, config) -> list:
    """Held-out labels as class ids: ints stay, names map through config.label2id; per-token lists keep -100 (ignore)."""
    label2id = {str(name): int(i) for i, name in (getattr(config, "id2label", None) or {}).items()}
    label2id.update({str(k): int(v) for k, v in (getattr(config, "label2id", None) or {}).items()})

    def one(value):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return value
        if str(value) in label2id:
            return label2id[str(value)]
        raise ValueError(f"label {value!r} is not one of the model's labels ({', '.join(sorted(label2id))})")

    return [[one(v) for v in value] if isinstance(value, list) else one(value) for value in labels]


def output_divergence(teacher: torch.Tensor, student: torch.Tensor, token_mask: torch.Tensor, task: str,
                      temperature: float = 1.0) -> torch.Tensor:
    """How far a task head's output is from the teacher's (differentiable; outputs as model_output gives them).

    Temperature-scaled KL(teacher || student) of the label distributions times T^2 (Hinton et al. 2015): per text
    (sequence classification), per real token (token classification), over the real positions of the answer's start
    and of its end (QA); the squared error of a num_labels-1 regression or reranker score.
    """
    import torch

    if task == "sequence-classification" and teacher.shape[-1] == 1:
        return (teacher - student).pow(2).mean()

    def kl(t, s):  # over the last axis, one value per row
        t_log = torch.log_softmax(t / temperature, dim=-1)
        s_log = torch.log_softmax(s / temperature, dim=-1)
        return (t_log.exp() * (t_log - s_log)).sum(-1) * temperature ** 2

    if task == "sequence-classification":
        return kl(teacher, student).mean()
    real = token_mask.bool()
    if task == "token-classification":
        return kl(teacher[real], student[real]).mean()
    far = torch.finfo(teacher.dtype).min
    padded = ~real.unsqueeze(-1)
    return kl(teacher.masked_fill(padded, far).transpose(1, 2), student.masked_fill(padded, far).transpose(1, 2)).mean()


def _per_row(out: torch.Tensor, mask: torch.Tensor, task: str) -> torch.Tensor:
    """A vector per text for cosine: the logits, or the token-level logits over real tokens (padding zeroed)."""
    if task == "sequence-classification":
        return out
    return (out * mask.unsqueeze(-1).to(out.dtype)).flatten(1)


def _ranks(values: torch.Tensor) -> torch.Tensor:
    import torch

    order = values.argsort()
    ranks = torch.empty_like(values, dtype=torch.float64)
    ranks[order] = torch.arange(len(values), dtype=torch.float64)
    # Ties share their mean rank.
    for value in values.unique():
        tied = values == value
        if int(tied.sum()) > 1:
            ranks[tied] = ranks[tied].mean()
    return ranks


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    import torch

    ra, rb = _ranks(a.double()), _ranks(b.double())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / denominator if denominator > 0 else float(torch.equal(a, b))


def macro_f1(predicted: torch.Tensor, gold: torch.Tensor, classes: int) -> float:
    scores = []
    for c in range(classes):
        tp = int(((predicted == c) & (gold == c)).sum())
        fp = int(((predicted == c) & (gold != c)).sum())
        fn = int(((predicted != c) & (gold == c)).sum())
        if tp + fp + fn:
            scores.append(2 * tp / (2 * tp + fp + fn))
    return sum(scores) / len(scores) if scores else 0.0


def task_metrics(reference: list[torch.Tensor], candidate: list[torch.Tensor], batches: list[dict], task: str,
                 labels: list | None = None) -> dict:
    """Every metric that fits ``task`` on held-out outputs (one tensor per batch, as model_output gives them).

    cosine: mean over texts of the cosine of their logit vectors; agreement: share of texts (token tasks:
    of real tokens; QA: of texts whose start and end both) whose argmax matches the reference's; accuracy
    and macro f1 against ``labels`` when given (the reference's too, as ``reference_accuracy``...);
    spearman: rank correlation of num_labels-1 scores with the reference's; logits_mse: mean squared
    difference of the logits on real tokens.
    """
    import torch

    cosines, sq, count = [], 0.0, 0
    ref_pred, cand_pred, ref_scores, cand_scores, real = [], [], [], [], []
    for ref, cand, batch in zip(reference, candidate, batches):
        mask = batch["attention_mask"].bool()
        cosines.append(torch.nn.functional.cosine_similarity(_per_row(ref, mask, task), _per_row(cand, mask, task), dim=-1))
        diff = (ref - cand) if task == "sequence-classification" else (ref - cand)[mask]
        sq += float(diff.double().pow(2).sum())
        count += diff.numel()
        if task == "sequence-classification" and ref.shape[-1] == 1:
            ref_scores.append(ref[:, 0])
            cand_scores.append(cand[:, 0])
        elif task == "question-answering":
            # The answer span's start and end: padding can never be one.
            far = torch.finfo(ref.dtype).min
            ref_pred.append(ref.masked_fill(~mask.unsqueeze(-1), far).argmax(1))  # [batch, 2]
            cand_pred.append(cand.masked_fill(~mask.unsqueeze(-1), far).argmax(1))
        else:
            ref_pred.append(ref.argmax(-1))
            cand_pred.append(cand.argmax(-1))
            real.append(mask)
    cos = torch.cat(cosines)
    metrics = {"cosine": float(cos.mean()), "cosine_min": float(cos.min()), "logits_mse": sq / max(count, 1)}
    if ref_scores:
        metrics["spearman"] = spearman(torch.cat(ref_scores), torch.cat(cand_scores))
        return metrics
    if task == "question-answering":
        r, c = torch.cat(ref_pred), torch.cat(cand_pred)
        metrics["agreement"] = float((r == c).all(-1).double().mean())
        return metrics
    if task == "token-classification":
        width = max(p.shape[1] for p in ref_pred)
        def pad(tensors):
            return torch.cat([torch.nn.functional.pad(t, (0, width - t.shape[1])) for t in tensors])

        r, c, m = pad(ref_pred), pad(cand_pred), pad(real).bool()
        metrics["agreement"] = float((r == c)[m].double().mean())
        if labels is not None:
            gold = torch.full_like(r, -100)
            for row, tags in enumerate(labels):
                tags = torch.tensor(tags[:width], dtype=torch.long)
                gold[row, :len(tags)] = tags
            scored = m & (gold != -100)
            classes = int(reference[0].shape[-1])
            for name, pred in (("", c), ("reference_", r)):
                metrics[f"{name}accuracy"] = float((pred == gold)[scored].double().mean())
                metrics[f"{name}f1"] = macro_f1(pred[scored], gold[scored], classes)
        return metrics
    r, c = torch.cat(ref_pred), torch.cat(cand_pred)
    metrics["agreement"] = float((r == c).double().mean())
    if labels is not None:
        gold = torch.tensor(labels, dtype=torch.long)
        classes = int(reference[0].shape[-1])
        for name, pred in (("", c), ("reference_", r)):
            metrics[f"{name}accuracy"] = float((pred == gold).double().mean())
            metrics[f"{name}f1"] = macro_f1(pred, gold, classes)
    return metrics
