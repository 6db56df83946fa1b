"""The compile driver: recipe -> reference model -> traced graph -> passes -> ONNX Runtime -> output folder.

Everything is built in a staging folder and moved into place at the end; on a failed check the
output folder holds only the report (so a build step never ships a model that broke its budget).
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import __version__, cache as build_cache, cost_model, pass_store, report as report_io
from .calibration import prepare_calibration
from .errors import CheckFailed
from .frontend import CARRIED_FILES, LoadedModel, example_inputs, load_model, trace
from .model_inputs import accepted_inputs
from .output import commit, raise_if_interrupted, staging_dir
from .pass_manager import PassCheckFailed, PassManager
from .recipe import Recipe
from .runtime import ort_runner, session
from .simulation import strip_simulation
from .structure import analyze
from .tasks import check_metric, num_labels
from .validation import pooling_mode, run_batches


@dataclass
class CompileResult:
    exit_code: int
    report: dict[str, Any]
    out_dir: Path
    up_to_date: bool = False  # nothing was rebuilt: out_dir already held this exact build


def _carry_files(loaded: LoadedModel, folder: Path, structure_summary: dict, hints: dict) -> None:
    for name in CARRIED_FILES:
        source = loaded.path / name
        if source.is_file():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, folder / name)
    # Files a pass rewrote (prune-vocab's tokenizer) replace the carried originals.
    for name, text in sorted(hints.get("files", {}).items()):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text, encoding="utf-8")
    config = json.loads((loaded.path / "config.json").read_text())
    config.update(hints.get("config", {}))
    # A member's own key for each size (DistilBERT: n_layers, n_heads, hidden_dim), so transformers reads the new one.
    key = dict(getattr(type(loaded.config), "attribute_map", {}) or {})
    if "hidden_dim" in config and "intermediate_size" not in config:  # DistilBERT's FFN width has no alias
        key["intermediate_size"] = "hidden_dim"
    layers = structure_summary["layers"]
    config[key.get("num_hidden_layers", "num_hidden_layers")] = len(layers)
    heads = {layer["heads"] for layer in layers}
    inter = {layer["intermediate"] for layer in layers}
    if len(heads) == 1:
        config[key.get("num_attention_heads", "num_attention_heads")] = heads.pop()
    if len(inter) == 1:
        config[key.get("intermediate_size", "intermediate_size")] = inter.pop()
    inputs = list(accepted_inputs(loaded.model))
    config["bertpress"] = {"version": __version__, "layers": layers, "inputs": inputs}
    tokenizer_config = folder / "tokenizer_config.json"
    if "token_type_ids" not in inputs and tokenizer_config.is_file():
        # Tokenizers feed what model_input_names lists; a model without segments must not be fed token_type_ids.
        settings = json.loads(tokenizer_config.read_text())
        settings["model_input_names"] = inputs
        tokenizer_config.write_text(json.dumps(settings, indent=2) + "\n")
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _quantize_spec(hints: dict):
    from .lowering import QuantizeSpec

    quant = hints.get("quantize")
    if not quant or quant.get("dtype") != "int8":
        return None
    return QuantizeSpec(exclude_embeddings=quant["exclude_embeddings"], exclude_modules=list(quant["exclude_modules"]))


def _int4_weights(final, hints: dict, structure) -> tuple[dict | None, bool]:
    """quantize-linear's int4 weights as (W, hint) for lowering, and whether attention may be packed
    (not when a q/k/v weight is int4: the packed Attention op takes fp32 weights only)."""
    from .graph_edit import get_tensor

    chosen = hints.get("int4_weights") or {}
    if not chosen:
        return None, True
    int4 = {target: (get_tensor(final, target).detach().numpy(), hint) for target, hint in chosen.items()}
    qkv = {lin.weight for layer in structure.layers
           for lin in (layer.attention.query, layer.attention.key, layer.attention.value)}
    qkv |= {lin.factor for layer in structure.layers
            for lin in (layer.attention.query, layer.attention.key, layer.attention.value) if lin.factor}
    return int4, not (qkv & set(int4))


def compile_recipe(recipe: Recipe, out_dir: Path, *, allow_pickle: bool = False, instruments=None,
                   progress=None, force: bool = False, fresh: bool = False) -> CompileResult:
    from .lowering import lower_to_onnx

    say = progress or (lambda message: None)
    timings: dict[str, float] = {}
    started = time.perf_counter()
    settings = recipe.file
    # Checked before any model is loaded, so an unchanged build step costs a hash of the inputs.
    cache_inputs = build_cache.cache_inputs(recipe)
    key = build_cache.cache_key(cache_inputs)
    previous = None if force else build_cache.up_to_date(Path(out_dir), key)
    if previous is not None:
        return CompileResult(0, previous, Path(out_dir), up_to_date=True)
    say(f"loading {settings.model}")
    loaded = load_model(settings.model, allow_pickle=allow_pickle, task=settings.task)
    cal = settings.calibration
    calibration = prepare_calibration(
        loaded.tokenizer, source=cal.texts, samples=cal.samples, validation_samples=cal.validation_samples,
        max_length=cal.max_length, batch_size=cal.batch_size, seed=cal.seed, model_max_length=loaded.max_length,
        base_dir=recipe.base_dir,
    )
    check_metric(settings.budget.metric, loaded.task, num_labels(loaded.config, loaded.task),
                 calibration.heldout_labels is not None, recipe.source)
    timings["load"] = time.perf_counter() - started
    say("tracing with torch.export")
    mark = time.perf_counter()
    example = example_inputs(loaded.tokenizer)
    gm = trace(loaded.model, example, max_length=loaded.max_length)
    raise_if_interrupted()  # Ctrl-C takes effect at safe points (compiler.output)
    structure_before = analyze(gm)
    timings["trace"] = time.perf_counter() - mark
    pooling = pooling_mode(loaded.pooling)

    report: dict[str, Any] = {
        "schema_version": report_io.REPORT_SCHEMA_VERSION, "status": "ok", "exit_code": 0,
        "recipe_file": recipe.source, "recipe": recipe.normalized(), "recipe_digest": recipe.digest(),
        "environment": report_io.environment(),
        "model": {"spec": settings.model, "path": str(loaded.path), "pooling": pooling,
                  "task": loaded.task, "architectures": list(getattr(loaded.config, "architectures", None) or []),
                  "num_labels": num_labels(loaded.config, loaded.task), "task_notes": loaded.task_notes,
                  "structure_before": structure_before.summary()},
        "calibration": {"source": cal.texts, "texts": len(calibration.texts), "heldout_texts": len(calibration.heldout_texts),
                        "truncated_texts": calibration.truncated,
                        "heldout_labeled": calibration.heldout_labels is not None},
        "passes": [], "lowering": None, "final_check": None, "failure": None,
        "cache": {"key": key, "inputs": cache_inputs},
    }
    # Weights-only passes (distill) replay a stored result computed from the same inputs; --fresh runs them all.
    store_root = None if fresh else pass_store.store_root()
    store = pass_store.PassStore(store_root, cache_inputs["model"]) if store_root is not None else None
    manager = PassManager(recipe, calibration, loaded.model, loaded.tokenizer, loaded.config, pooling, instruments,
                          store=store, task=loaded.task)
    point = settings.cost
    reference_cost = cost_model.estimate(gm, batch=point.batch, seq=point.seq, component_of=structure_before.node_component,
                                         machine=manager.machine)
    report["cost"] = {"reference": reference_cost.as_dict(), "compiled": None}

    with staging_dir(out_dir) as staging:
        mark = time.perf_counter()
        try:
            state, records = manager.run(gm)
        except PassCheckFailed as failed:
            report["passes"] = [r.as_dict() for r in failed.records]
            return _fail(report, failed, staging, out_dir, timings, started)
        timings["passes"] = time.perf_counter() - mark
        report["passes"] = [r.as_dict() for r in records]
        structure_after = manager.structures(state.gm)
        report["model"]["structure_after"] = structure_after.summary()
        report["cost"]["compiled"] = manager.cost(state).as_dict()

        say("lowering to ONNX Runtime")
        mark = time.perf_counter()
        final = copy.deepcopy(state.gm)
        strip_simulation(final)
        quant = state.lowering.get("quantize") or {}
        # After an input-interface change (prune-vocab) the graph takes renumbered ids.
        heldout = manager.heldout(state)
        int4, attention_fusion = _int4_weights(final, state.lowering, structure_after)
        raise_if_interrupted()
        lowered = lower_to_onnx(final, manager.map_inputs(state, [example])[0], staging,
                                quantize=_quantize_spec(state.lowering), fuse=settings.target.fusions,
                                fp16=quant.get("dtype") == "fp16", int4=int4, attention_fusion=attention_fusion)
        raise_if_interrupted()
        if state.lowering.get("embedding_precision"):
            from .graph_edit import get_tensor
            from .lowering.embeddings import store_embeddings

            precision = state.lowering["embedding_precision"]
            tables = {target: get_tensor(final, target).detach().numpy() for target in precision}
            blocks = state.lowering.get("int4_tables")
            lowered.notes.append(f"embeddings: {store_embeddings(lowered.model_path, precision, tables, blocks)}")
        if state.lowering.get("sparse_weights"):
            from .lowering.sparse import store_sparse

            lowered.notes.append(f"sparse: {store_sparse(lowered.model_path)}")
        if lowered.quantized and not state.lowering.get("split"):
            # Exact reordering of int8 weight rows against the u8 x s8 saturation of CPUs without VNNI; last,
            # because it permutes tables and weights that the steps above write. (The split form keeps the
            # plain order: its lower + upper files are checked against model.onnx.)
            from .lowering.fusions import op_counts
            from .lowering.pairing import pair_file

            notes, written = pair_file(lowered.model_path)
            lowered.notes.extend(notes)
            lowered.op_counts = op_counts(written)
        timings["lowering"] = time.perf_counter() - mark
        report["lowering"] = {"fusions": lowered.fusions, "quantized": lowered.quantized, "op_counts": lowered.op_counts,
                              "notes": lowered.notes, "seconds": round(timings["lowering"], 2)}

        raise_if_interrupted()
        say("checking the ONNX Runtime model against the reference")
        mark = time.perf_counter()
        runner = ort_runner(session(lowered.model_path, settings.target.threads))
        final_outputs = run_batches(runner, heldout)
        check = manager.fidelity(final_outputs, state)
        timings["final_check"] = time.perf_counter() - mark
        budget = settings.budget
        achieved = check.value(budget.metric)
        passed = check.finite and budget.passed(achieved)
        report["final_check"] = {**check.as_dict(), "budget_metric": budget.metric, "budget_min": budget.min,
                                 **({"budget_max": budget.max} if budget.max is not None else {}),
                                 "budget_value": achieved, "passed": passed}
        if not passed:
            failure = CheckFailed(
                f"the lowered ONNX Runtime model broke the budget: {budget.describe(achieved)}"
                + ("" if check.finite else " (it produced NaN or Inf)") + ".",
                field="budget", fix="relax budget.min or make the recipe less aggressive.")
            for produced in list(staging.iterdir()):
                if produced.is_file():
                    produced.unlink()
            return _fail(report, failure, staging, out_dir, timings, started)
        if state.lowering.get("split"):  # decouple-attention: also the cacheable lower.onnx + upper.onnx
            from .lowering.split import write_split

            say("writing lower.onnx + upper.onnx and checking that they compose to model.onnx")
            split = write_split(final, manager.map_inputs(state, [example])[0], staging, quantize=_quantize_spec(state.lowering),
                                fuse=settings.target.fusions, batches=heldout,
                                threads=settings.target.threads)
            report["lowering"]["split"] = split
            if not split["check"]["passed"]:
                failure = CheckFailed(
                    f"lower.onnx + upper.onnx do not compose to model.onnx: {split['check']['criterion']} broken"
                    f" (max abs error {split['check']['max_abs_error']:.2e}).", field="lowering.split",
                    fix="report this to bertpress; the split form must reproduce the decoupled model.")
                for produced in list(staging.iterdir()):
                    if produced.is_file():
                        produced.unlink()
                return _fail(report, failure, staging, out_dir, timings, started)

        _carry_files(loaded, staging, structure_after.summary(), state.lowering)
        say("timing the ONNX Runtime model")
        report["latency"] = _latency(report["cost"]["compiled"], lowered.model_path, staging, settings, manager.machine)
        files = {str(p.relative_to(staging)): p.stat().st_size for p in sorted(staging.rglob("*")) if p.is_file()}
        report["outputs"] = {"files": files, "total_bytes": sum(files.values())}
        timings["total"] = time.perf_counter() - started
        report["timings"] = {k: round(v, 2) for k, v in timings.items()}
        report_io.write(report, staging)
        commit(staging, out_dir)
    return CompileResult(0, report, out_dir)


def _latency(compiled_cost: dict, model_path: Path, folder: Path, settings, machine) -> dict:
    """The cost model's latency estimate next to a brief measurement (3 runs; `bertpress bench` measures properly)."""
    from .benchmark import measure_latency, vocab_size

    point = settings.cost
    measured = measure_latency(model_path, batch=point.batch, seq=point.seq, threads=settings.target.threads,
                               vocab=vocab_size(folder))
    return {"batch": point.batch, "seq": point.seq, "threads": settings.target.threads,
            "estimated_ms": compiled_cost.get("latency_ms"), "measured_ms": measured["median_ms"], "runs": measured["runs"],
            "machine": machine.as_dict()}


def _fail(report, failure: CheckFailed, staging: Path, out_dir: Path, timings, started) -> CompileResult:
    report["status"] = "check_failed"
    report["exit_code"] = failure.exit_code
    report["failure"] = {"message": failure.render(), "field": failure.field}
    timings["total"] = time.perf_counter() - started
    report["timings"] = {k: round(v, 2) for k, v in timings.items()}
    report_io.write(report, staging)
    commit(staging, out_dir)
    return CompileResult(failure.exit_code, report, out_dir)
