"""One trial: compile one candidate recipe and sum up its report as a line of trials.jsonl.

The same function runs in the search's own process (the local executor) and in a Ray worker; it takes and
returns plain data only. A pass that raises is rolled back by the pass manager like in any compile; what
escapes here (a bug, a killed worker) is the executor's to record and retry.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

# Environment a trial needs to see as the search's process does (a Ray worker starts with the cluster's).
FORWARDED_ENV = ("XDG_CACHE_HOME", "BERTPRESS_PASS_STORE", "HF_HUB_OFFLINE")


def trial_env() -> dict[str, str]:
    return {name: os.environ[name] for name in FORWARDED_ENV if name in os.environ}


def summarize(report: dict[str, Any]) -> dict[str, Any]:
    """The figures of a compile report that a search compares."""
    final = report.get("final_check") or {}
    metric = final.get("budget_metric") or (report.get("recipe") or {}).get("budget", {}).get("metric", "cosine")
    fidelity = final.get(metric, final.get("cosine"))
    if fidelity is None:  # a pass broke the budget and stopped the compile: its held-out figure
        checks = [record.get("checks") or {} for record in report.get("passes") or []]
        fidelity = next((c.get(metric, c.get("cosine")) for c in reversed(checks) if c.get(metric, c.get("cosine")) is not None), None)
    compiled = (report.get("cost") or {}).get("compiled") or {}
    latency = report.get("latency") or {}
    rolled_back = [f"{r['name']}: {r.get('reason')}" for r in report.get("passes") or []
                   if r.get("status") in ("rolled_back", "skipped")]
    return {
        "status": "ok" if report.get("status") == "ok" else "check_failed",
        "meets_budget": bool(final.get("passed")) and report.get("status") == "ok",
        "metric": metric, "fidelity": None if fidelity is None else round(float(fidelity), 6),
        "compiled_estimated_latency_ms": compiled.get("latency_ms"), "compiled_estimated_bytes": compiled.get("bytes"),
        "measured_latency_ms": latency.get("measured_ms"),
        "size_bytes": sum(size for name, size in ((report.get("outputs") or {}).get("files") or {}).items()
                          if not name.startswith("report.")) or None,
        "rolled_back": rolled_back,
        "reason": (report.get("failure") or {}).get("message"),
    }


def run_trial(spec: dict[str, Any]) -> dict[str, Any]:
    """Compile ``spec['text']`` (a recipe) into ``spec['out']``; return the summary with its seconds.

    A recipe the compiler refuses (a pass that cannot apply with these options, exit 2) comes back with status
    "invalid": trying it again would give the same answer.
    """
    os.environ.update(spec.get("env") or {})
    from ..compile import compile_recipe
    from ..errors import BertpressError
    from ..recipe import load_recipe_text

    started = time.perf_counter()
    try:
        recipe = load_recipe_text(spec["text"], file=spec["file"], base_dir=Path(spec["base_dir"]))
        result = compile_recipe(recipe, Path(spec["out"]), force=True)
    except BertpressError as error:
        if error.exit_code != 2:
            raise
        return {"status": "invalid", "meets_budget": False, "reason": error.render(),
                "seconds": round(time.perf_counter() - started, 2)}
    return {**summarize(result.report), "seconds": round(time.perf_counter() - started, 2)}
