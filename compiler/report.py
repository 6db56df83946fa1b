"""The compile report: ``report.json`` (versioned, machine-readable) and ``report.md`` (a short summary).

The JSON holds the normalized recipe it was built from, every pass decision with its checks and
costs, the lowering's fusions and quantized ops, the final ONNX Runtime check and the file sizes.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

REPORT_SCHEMA_VERSION = 1


def environment() -> dict[str, str]:
    import onnx
    import onnxruntime
    import torch
    import transformers

    from . import __version__

    return {"bertpress": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}


def _mb(value: float) -> str:
    return f"{value / 1e6:.1f} MB"


def _gflops(value: float) -> str:
    return f"{value / 1e9:.1f} GFLOPs"


def render_markdown(report: dict[str, Any]) -> str:
    lines = [f"# bertpress report: {report['status']}", ""]
    recipe = report["recipe"]
    lines.append(f"Model `{recipe['model']}`, recipe `{report['recipe_file']}`, exit code {report['exit_code']}.")
    if report.get("failure"):
        lines += ["", f"**Failed:** {report['failure']['message']}"]
    metric = recipe.get("budget", {}).get("metric", "cosine")
    task = (report.get("model") or {}).get("task", "feature-extraction")
    if task != "feature-extraction":
        lines.append(f"Task {task}: checked on its logits; budget metric {metric}.")
    lines += ["", f"| # | pass | kind | status | held-out {metric} | max-abs-error | params | FLOPs | seconds |",
              "|---|---|---|---|---|---|---|---|---|"]
    for rec in report["passes"]:
        checks = rec.get("checks", {})
        cos = f"{checks[metric]:.4f}" if metric in checks else "-"
        err = checks.get("max_abs_error", checks.get("max_abs_error_vs_reference"))
        err = f"{err:.2e}" if isinstance(err, (int, float)) else "-"
        before, after = rec.get("cost_before") or {}, rec.get("cost_after") or {}
        params = f"{before.get('parameters', 0) / 1e6:.1f}M -> {after.get('parameters', 0) / 1e6:.1f}M" if after else "-"
        flops = f"{before.get('flops', 0) / 1e9:.1f} -> {after.get('flops', 0) / 1e9:.1f} G" if after else "-"
        status = rec["status"] + (f" ({rec['reason']})" if rec.get("reason") else "")
        if (rec.get("store") or {}).get("action") == "replayed":
            status += f" (replayed from the pass store; running it took {rec['store']['original_seconds']:.0f} s)"
        lines.append(f"| {rec['index']} | {rec['name']} | {rec['kind']} | {status} | {cos} | {err} | {params} | {flops} | {rec['seconds']} |")
    for rec in report["passes"]:
        fallback = (rec.get("details") or {}).get("fallback")
        if fallback and rec["status"] == "applied":  # quantize-linear's fallback: auto
            kept = ", ".join(fallback["fp32_linears"]) or "none"
            lines += ["", f"{rec['name']} (passes[{rec['index']}]) kept {len(fallback['fp32_linears'])} linears in fp32 to"
                          f" keep the budget (fallback: auto; {fallback['metric']} on calibration text"
                          f" {fallback['all_quantized']:.6f} all quantized, {fallback['with_fallback']:.6f} with them): {kept}."]
    lowering = report.get("lowering")
    if lowering:
        fusions = ", ".join(f"{k} x{v}" for k, v in sorted(lowering.get("fusions", {}).items())) or "none"
        quant = ", ".join(f"{k} x{v}" for k, v in sorted(lowering.get("quantized", {}).items())) or "none"
        lines += ["", f"Lowering: fusions {fusions}; quantized ops {quant}."]
    final = report.get("final_check")
    if final:
        verdict = "passed" if final["passed"] else "FAILED"
        if final.get("metrics"):
            shown = ", ".join(f"{name} {value:.4f}" for name, value in sorted({"cosine": final["cosine"], **final["metrics"]}.items()))
            bound = f"<= {final['budget_max']}" if final.get("budget_max") is not None else f">= {final['budget_min']}"
            lines.append(f"Final ONNX Runtime check {verdict}: held-out {shown} (budget {final['budget_metric']} {bound}).")
        else:
            lines.append(f"Final ONNX Runtime check {verdict}: held-out mean cosine {final['cosine']:.4f}"
                         f" (min {final['cosine_min']:.4f}, budget >= {final['budget_min']}).")
    cost = report.get("cost")
    if cost and cost.get("compiled"):
        ref, out = cost["reference"], cost["compiled"]
        lines.append(f"Estimated at batch {ref['batch']}, seq {ref['seq']}: weights {_mb(ref['bytes'])} -> {_mb(out['bytes'])},"
                     f" {_gflops(ref['flops'])} -> {_gflops(out['flops'])}.")
    latency = report.get("latency")
    if latency and latency.get("estimated_ms") is not None:
        reference_ms = (cost or {}).get("reference", {}).get("latency_ms")
        lines.append(f"Latency at batch {latency['batch']}, seq {latency['seq']}, {latency['threads']} threads: estimated"
                     f" {latency['estimated_ms']:.1f} ms (reference estimated {reference_ms:.1f} ms), measured"
                     f" {latency['measured_ms']:.1f} ms (median of {latency['runs']} runs; `bertpress bench` measures properly).")
    outputs = report.get("outputs")
    if outputs:
        lines.append(f"Output: {outputs['total_bytes'] / 1e6:.1f} MB in {len(outputs['files'])} files.")
    return "\n".join(lines) + "\n"


def write(report: dict[str, Any], folder: Path) -> None:
    (folder / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True, default=str) + "\n")
    (folder / "report.md").write_text(render_markdown(report))
