"""The Pareto front of a search: objective (estimated latency or file bytes) against held-out fidelity.

The front is drawn from the contenders: the compiled candidates whose screening estimate is within the
margin of the best one within budget, the set every executor compiles whatever order its trials finish in.
"""

from __future__ import annotations

from pathlib import Path

from .search import objective_value


def frontier(records: list[dict], objective: str, margin: float, lower_is_better: bool = False) -> tuple[list[dict], list[dict]]:
    """(Pareto points sorted by objective, contenders). A point is on the front when no other contender is at
    least as good on both axes and better on one."""
    compiled = [r for r in records if r["status"] in ("ok", "check_failed") and r.get("fidelity") is not None
                and objective_value(r, objective) is not None]
    estimate = "estimated_latency_ms" if objective == "latency" else "estimated_bytes"
    within = [r[estimate] for r in compiled if r.get("meets_budget") and r.get(estimate) is not None]
    contenders = compiled
    if within:  # what any executor compiles: all candidates estimated at most (1 + margin) times the cheapest within
        ceiling = min(within) * (1 + margin)
        contenders = [r for r in compiled if r.get(estimate) is None or r[estimate] <= ceiling]
    sign = -1.0 if lower_is_better else 1.0  # fidelity * sign: higher is better
    points = []
    for record in sorted(contenders, key=lambda r: (objective_value(r, objective), -sign * r["fidelity"], r["key"])):
        if not points or sign * record["fidelity"] > sign * points[-1]["fidelity"]:
            points.append({"key": record["key"], "options": record["options"], "objective": objective_value(record, objective),
                           "fidelity": record["fidelity"], "meets_budget": bool(record.get("meets_budget")),
                           "measured_latency_ms": record.get("measured_latency_ms"), "size_bytes": record.get("size_bytes"),
                           "distill_steps": record.get("distill_steps")})
    return points, contenders


def plot(records: list[dict], points: list[dict], objective: str, bound: float, lower_is_better: bool, best: dict | None,
         path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scale, unit = (1.0, "estimated latency (ms)") if objective == "latency" else (1e-6, "model files (MB)")
    figure, axes = plt.subplots(figsize=(7, 4.5))
    compiled = [r for r in records if r["status"] in ("ok", "check_failed") and r.get("fidelity") is not None
                and objective_value(r, objective) is not None]
    for meets, colour, label in ((True, "tab:blue", "within budget"), (False, "tab:gray", "over budget")):
        chosen = [r for r in compiled if bool(r.get("meets_budget")) == meets]
        if chosen:
            axes.scatter([objective_value(r, objective) * scale for r in chosen], [r["fidelity"] for r in chosen],
                         c=colour, s=24, label=f"{label} ({len(chosen)})", alpha=0.8)
    if points:
        axes.step([p["objective"] * scale for p in points], [p["fidelity"] for p in points], where="post",
                  c="tab:orange", label="Pareto front")
    axes.axhline(bound, c="tab:red", ls="--", lw=1, label=f"budget {'<=' if lower_is_better else '>='} {bound}")
    if best is not None:
        axes.scatter([objective_value(best, objective) * scale], [best["fidelity"]], marker="*", s=220, c="tab:green",
                     zorder=5, label="best")
    pruned = sum(1 for r in records if r["status"] == "pruned")
    axes.set_xlabel(unit)
    axes.set_ylabel(f"held-out {(records[0].get('metric') if records and records[0].get('metric') else 'cosine')}")
    axes.set_title(f"bertpress tune: {len(compiled)} compiled, {pruned} screened out by the cost model")
    axes.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
