"""The schema of ``report.json``, as pydantic models; ``docs/report.schema.json`` is generated from it.

Versioning: ``schema_version`` is 1. Adding a field (anywhere) keeps the version, so readers must
ignore fields they do not know (every object here allows extra properties). Removing, renaming or
retyping a field bumps the version. Regenerate the published file with
``bertpress schema --report > docs/report.schema.json`` (a test checks it is up to date).
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class Cost(_Open):
    """Cost-model estimate of a graph at one input shape (``recipe.cost``)."""

    parameters: int = Field(ge=0, description="Parameters (weights and biases).")
    bytes: int = Field(ge=0, description="Bytes of the parameters at their compiled precision.")
    flops: int = Field(ge=0, description="Floating-point operations for one batch.")
    activation_bytes: int | None = Field(None, ge=0, description="Peak-ish activation bytes for one batch.")
    batch: int = Field(ge=1)
    seq: int = Field(ge=1)
    by_component: dict[str, dict[str, int]] = Field(
        default_factory=dict, description="The same figures per component (embeddings, feed-forward, ...).")


class Structure(_Open):
    hidden_size: int
    layers: list[dict[str, Any]] = Field(description="Per block: index, module, heads, head_size, intermediate.")
    pooler: bool


class ModelInfo(_Open):
    spec: str = Field(description="The recipe's model: a folder or builtin:minilm-l6.")
    path: str = Field(description="Where the model's files were read from.")
    pooling: str = Field(description="Sentence pooling used to compare embeddings (mean, cls, ...).")
    task: str = Field("feature-extraction", description="The head compiled with the encoder (feature-extraction,"
                      " sequence-classification, token-classification, question-answering; docs/task-models.md).")
    architectures: list[str] = Field(default_factory=list, description="config.json's architectures.")
    num_labels: int | None = Field(None, description="Labels of a classifier or tagger head (1: a regression or reranker score).")
    task_notes: list[str] = Field(default_factory=list, description="What the report should say about the head (one not compiled).")
    structure_before: Structure
    structure_after: Structure | None = Field(None, description="Absent when a pass check failed.")


class CalibrationInfo(_Open):
    source: str
    texts: int = Field(ge=0, description="Calibration texts the passes saw.")
    heldout_texts: int = Field(ge=0, description="Held-out texts used only for validation.")
    truncated_texts: int = Field(ge=0)


class PassRow(_Open):
    """One recipe step: what ran, what the pass manager checked, and what it cost."""

    index: int = Field(ge=0, description="Position in the recipe's passes list.")
    name: str
    config: dict[str, Any] = Field(description="The pass's full config, defaults filled in.")
    kind: Literal["exact", "lossy"]
    status: Literal["pending", "applied", "unchanged", "rolled_back", "skipped"]
    reason: str | None = Field(description="Why the pass was rolled back or skipped.")
    checks: dict[str, Any] = Field(
        description="lint, finite, cosine / cosine_min / max_abs_error_vs_reference against the reference on held-out"
        " text; for exact passes max_abs_error against the graph before it and its tolerance; for lossy ones the budget.")
    cost_before: Cost | None
    cost_after: Cost | None
    details: dict[str, Any] = Field(description="Facts the pass reported (what it removed, chose, ...).")
    seconds: float = Field(ge=0)
    store: dict[str, Any] | None = Field(
        None, description="Weights-only passes (distill) and the pass store: action 'replayed' (a stored result computed"
        " from the same inputs was applied; original_seconds is what running it took), 'stored', 'not stored' (note says"
        " why), or 'ran' (problem says why a stored entry was unusable); key is the SHA-256 of the pass's inputs.")


class Lowering(_Open):
    fusions: dict[str, int] = Field(description="Fused ONNX Runtime op type -> count in model.onnx.")
    quantized: dict[str, int] = Field(description="Quantized op type -> count in model.onnx.")
    op_counts: dict[str, int]
    notes: list[str]
    seconds: float | None = None


class FinalCheck(_Open):
    """The lowered model run in ONNX Runtime on the held-out text, against the reference model."""

    cosine: float
    cosine_min: float
    max_abs_error: float
    finite: bool
    budget_metric: str
    budget_min: float
    passed: bool
    metrics: dict[str, float] | None = Field(
        None, description="A task model's metrics: agreement, accuracy / f1 and the reference's (labeled held-out text),"
        " spearman, logits_mse (cosine above is then of the logit vectors).")
    budget_value: float | None = Field(None, description="The budget metric's held-out value.")
    budget_max: float | None = Field(None, description="The upper bound of a lower-is-better metric (logits_mse).")


class Failure(_Open):
    message: str = Field(description="What failed and how to fix it.")
    field: str | None = Field(description="The recipe field to look at, e.g. passes[1] or budget.")


class CostSummary(_Open):
    reference: Cost
    compiled: Cost | None


class Outputs(_Open):
    files: dict[str, int] = Field(description="Relative path -> size in bytes of every file written (but the reports).")
    total_bytes: int = Field(ge=0)


class CacheInfo(_Open):
    key: str = Field(pattern="^[0-9a-f]{64}$", description="SHA-256 of `inputs`; a rerun with the same key is up to date.")
    inputs: dict[str, Any] = Field(description="Digests of the model, recipe, calibration text and code, and versions.")


class Latency(_Open):
    batch: int = Field(ge=1)
    seq: int = Field(ge=1)
    threads: int = Field(ge=1)
    estimated_ms: float | None = Field(description="The cost model's roofline estimate of one forward pass.")
    measured_ms: float = Field(description="Median of a brief ONNX Runtime measurement (`bertpress bench` measures properly).")
    runs: int = Field(ge=1)
    machine: dict[str, Any] | None = Field(None, description="The roofline the estimate used (`bertpress roofline`): peaks,"
                                           " bandwidth, overhead, when it was measured and the load average then.")


class Report(_Open):
    """A bertpress compile report (report.json)."""

    model_config = ConfigDict(extra="allow", title="bertpress report")

    schema_version: Literal[1] = Field(description="Bumped only when a field is removed, renamed or retyped.")
    status: Literal["ok", "check_failed"] = Field(description="ok: model written. check_failed: no model, see failure.")
    exit_code: Literal[0, 1] = Field(description="The CLI's exit code: 0 ok, 1 a check or budget failed.")
    recipe_file: str
    recipe: dict[str, Any] = Field(description="The normalized recipe (see `bertpress schema`); compiling it again gives the same model.")
    recipe_digest: str = Field(pattern="^[0-9a-f]{64}$")
    environment: dict[str, str] = Field(description="Versions of bertpress, Python and the libraries that built the model.")
    model: ModelInfo
    calibration: CalibrationInfo
    passes: list[PassRow]
    lowering: Lowering | None
    final_check: FinalCheck | None
    failure: Failure | None
    cost: CostSummary
    outputs: Outputs | None = Field(None, description="Present when status is ok.")
    latency: Latency | None = Field(None, description="Estimated against measured latency of the output; present when status is ok.")
    timings: dict[str, float] = Field(description="Seconds per phase (load, trace, passes, lowering, final_check, total).")
    cache: CacheInfo



def report_json_schema() -> dict[str, Any]:
    schema = Report.model_json_schema()
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}


def report_json_schema_text() -> str:
    """The published schema file's exact text (docs/report.schema.json)."""
    return json.dumps(report_json_schema(), indent=2) + "\n"
