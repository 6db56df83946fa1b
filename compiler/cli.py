"""The ``bertpress`` command line: compile, validate, schema, inspect, bench, roofline.

Typed errors become one clear paragraph on stderr and their exit code (2 bad input, 1 a check
failed); nothing else in the package prints.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

from rich.console import Console

from .errors import BertpressError

console = Console(stderr=True, highlight=False, soft_wrap=True)


_bar: dict = {}  # the live progress bar of a long pass (e.g. distill), while it runs
_logged: dict = {}  # the same pass's progress as log lines, when stderr is not a terminal


def _progress_info(payload: dict) -> str:
    return "  ".join(f"{key} {value:.4f}" if isinstance(value, float) else f"{key} {value}"
                     for key, value in payload.items() if key not in ("name", "step", "total"))


def _log_progress(payload: dict) -> None:
    """A long pass's progress in a log (CI, ``> file``), where a live bar draws nothing until it ends: one
    plain line per tenth of the pass, with the elapsed time and a linear estimate of the time left."""
    step, total = payload.get("step", 0), payload.get("total")
    now = time.monotonic()
    if _logged.get("name") != payload["name"] or step < _logged.get("step", 0):
        _logged.clear()
        _logged.update(name=payload["name"], started=now, first=step, step=0, tenth=0)
    _logged["step"] = step
    if not total:
        return
    tenth = min(10, step * 10 // total)
    if tenth <= _logged["tenth"]:
        return
    _logged["tenth"] = tenth
    elapsed = now - _logged["started"]
    done = step - _logged["first"]  # steps timed since the first report (the clock starts there)
    left = elapsed / done * (total - step) if done > 0 else 0.0
    console.print(f"      {payload['name']} {step}/{total} ({100 * step // total}%)  {_progress_info(payload)}"
                  f"  {elapsed / 60:.1f} min, about {left / 60:.1f} min left", markup=False)


def _progress_instrument(event: str, payload: dict) -> None:
    if event == "pass_start":
        console.print(f"  [{payload['index'] + 1}/{payload['total']}] {payload['name']} ...")
    elif event == "pass_progress" and not console.is_terminal:
        _log_progress(payload)
    elif event == "pass_progress":
        if not _bar:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            _bar["progress"] = Progress(TextColumn("      {task.description}"), BarColumn(), MofNCompleteColumn(),
                                        TextColumn("{task.fields[info]}"), TimeRemainingColumn(),
                                        console=console, transient=True)
            _bar["progress"].start()
            _bar["task"] = _bar["progress"].add_task(payload["name"], total=payload.get("total"), info="")
        _bar["progress"].update(_bar["task"], completed=payload.get("step", 0), info=_progress_info(payload))
    elif event == "pass_replayed":
        console.print(f"      replaying its stored result (the same inputs took {payload['original_seconds']:.0f}s"
                      " when it ran; --fresh runs it again)", markup=False)
    elif event == "pass_end":
        _logged.clear()
        if _bar:
            _bar.pop("progress").stop()
            _bar.clear()
        rec = payload["record"]
        checks = rec.checks
        # The budget's metric (a task model's agreement, spearman, ...); cosine for exact passes and encoders.
        metric = (checks.get("budget") or {}).get("metric", "cosine")
        metric = metric if metric in checks else "cosine"
        detail = f"{metric} {checks[metric]:.4f}" if metric in checks else ""
        if f"{metric}_before" in checks:
            detail = f"{metric} {checks[f'{metric}_before']:.4f} -> {checks[metric]:.4f}"
        if "max_abs_error" in checks:
            detail += f", max-abs-error {checks['max_abs_error']:.1e}"
        reason = f": {rec.reason}" if rec.reason else ""
        console.print(f"      {rec.status}{reason} {detail} ({rec.seconds:.1f}s)", markup=False)


def _load(recipe_path: str, model: str | None):
    from .recipe import load_recipe

    recipe = load_recipe(recipe_path)
    if model:
        recipe = recipe.model_copy(update={"file": recipe.file.model_copy(update={"model": model})})
    return recipe


def cmd_compile(args) -> int:
    from .compile import compile_recipe
    from .output import interrupts_remembered

    recipe = _load(args.recipe, args.model)
    out = Path(args.out) if args.out else Path("out") / Path(args.recipe).stem
    started = time.perf_counter()
    console.print(f"bertpress: compiling {args.recipe} -> {out}")
    with console.status("working", spinner="dots") as status, interrupts_remembered():
        def progress(message: str) -> None:
            status.update(message)
            console.print(f"  {message}", markup=False)
        result = compile_recipe(recipe, out, allow_pickle=args.allow_pickle,
                                instruments=[_progress_instrument], progress=progress, force=args.force,
                                fresh=args.fresh)
    report = result.report
    if result.up_to_date:
        console.print(f"bertpress: {out} is up to date (same model, recipe, calibration text and versions;"
                      f" cache key {report['cache']['key'][:12]}); nothing to do. Use --force to rebuild.", markup=False)
        return 0
    if result.exit_code:
        console.print(f"bertpress: FAILED (exit {result.exit_code}): {report['failure']['message']}", markup=False)
        console.print(f"  report: {out / 'report.md'}")
        return result.exit_code
    final = report["final_check"]
    console.print(f"bertpress: wrote {out} ({report['outputs']['total_bytes'] / 1e6:.1f} MB) in {time.perf_counter() - started:.0f}s;"
                  f" held-out {final['budget_metric']} {final.get('budget_value', final['cosine']):.4f}"
                  f" (budget {'<= ' + str(final['budget_max']) if final.get('budget_max') is not None else '>= ' + str(final['budget_min'])})")
    return 0


def cmd_validate(args) -> int:
    from .calibration import load_texts
    from .model_files import resolve_model_path

    if _searchable(args.recipe):
        from .search_space import load_search_space

        space = load_search_space(args.recipe)
        resolve_model_path(space.data.get("model", "builtin:minilm-l6"))
        load_texts((space.data.get("calibration") or {}).get("texts", "builtin"), space.base_dir)
        options = ", ".join(f"{dim.name} ({len(dim.choices)})" for dim in space.dimensions) or "none"
        console.print(f"{args.recipe}: ok, searchable: {space.size} candidates over {len(space.dimensions)} options"
                      f" ({options}); every choice is valid. Search it with `bertpress tune {args.recipe} --out DIR`.",
                      markup=False)
        return 0
    recipe = _load(args.recipe, args.model)
    resolve_model_path(recipe.file.model)
    load_texts(recipe.file.calibration.texts, recipe.base_dir)
    names = ", ".join(step.name for step in recipe.steps) or "no passes"
    console.print(f"{args.recipe}: ok ({len(recipe.steps)} passes: {names})")
    if args.print:
        print(json.dumps(recipe.normalized(), indent=2))
    return 0


def _searchable(path: str) -> bool:
    import yaml

    from .search_space import is_searchable

    try:
        return is_searchable(yaml.safe_load(Path(path).read_text(encoding="utf-8")))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False  # the ordinary loader reports it


def _tune_progress(kind: str, **payload) -> None:
    if kind == "status":
        console.print(f"  {payload['message']}", markup=False)
    elif kind == "start":
        pending = payload["pending"]
        estimate = pending.estimate
        figure = f"estimated {estimate.latency_ms:.2f} ms" if estimate.latency_ms is not None else ""
        steps = f", distill {payload['steps']} steps" if payload.get("steps") else ""
        console.print(f"  [{payload['done'] + 1}/{payload['total']}] compiling {_options(pending.options)} ({figure}{steps})",
                      markup=False)
    elif kind == "trial":
        record, best = payload["record"], payload["best"]
        fidelity = f" {record.get('metric', 'cosine')} {record['fidelity']:.4f}" if record.get("fidelity") is not None else ""
        measured = f", measured {record['measured_latency_ms']:.1f} ms" if record.get("measured_latency_ms") else ""
        rung = f" (distill {record['distill_steps']} steps)" if record.get("distill_steps") else ""
        status = record["status"] + (" (from the previous run)" if record.get("reused") else "")
        if record.get("retried"):
            status = f"failed, trying once more: {record.get('reason')}"
        elif record["status"] in ("pruned", "invalid", "failed"):
            status += f": {record.get('reason')}"
        best_text = (f"best so far {_options(best['options'])} {best.get('fidelity', 0):.4f}" if best else "none within budget yet")
        console.print(f"  [{payload['done']}/{payload['total']}] {_options(record['options'])}{rung}: {status}{fidelity}"
                      f"{measured} | {best_text}", markup=False)


def _options(options: dict) -> str:
    return ", ".join(f"{name.split('.', 1)[1] if '.' in name else name}={value}" for name, value in options.items())


def cmd_tune(args) -> int:
    from .output import interrupts_remembered
    from .search_space import load_search_space
    from .tune.search import Search, run_local

    space = load_search_space(args.recipe)
    out = Path(args.out)
    console.print(f"bertpress: tuning {args.recipe} -> {out} ({args.executor} executor, {space.tune.strategy},"
                  f" objective {space.tune.objective} at batch {space.tune.batch} x seq {space.tune.seq})", markup=False)
    search = Search(space, out, resume=args.resume, executor=args.executor, store=args.store, on_event=_tune_progress)
    try:
        with interrupts_remembered():
            if args.executor == "ray":
                from .tune.ray_executor import run_ray

                outcome = run_ray(search, address=args.address)
            else:
                outcome = run_local(search)
    except KeyboardInterrupt:
        console.print(f"bertpress: interrupted; {search.done_count()} trials are recorded in {out / 'trials.jsonl'}."
                      f" `bertpress tune {args.recipe} --out {out} --resume` continues without repeating them.", markup=False)
        return 130
    summary = outcome.summary
    counts = ", ".join(f"{n} {status}" for status, n in sorted(summary["statuses"].items()))
    console.print(f"bertpress: {summary['considered']} of {summary['candidates']} candidates considered ({counts}),"
                  f" {summary['compiles']} compiles ({summary['compiled_this_run']} in this run) in {summary['seconds']:.0f} s;"
                  f" frontier in {out / 'frontier.json'} and {out / 'frontier.png'}", markup=False)
    if outcome.exit_code:
        bound = ", ".join(f"{key} {value}" for key, value in summary["budget"].items())
        console.print(f"bertpress: no candidate kept the budget ({bound})."
                      " Fix: relax budget.min, or search gentler options (or a longer distill).", markup=False)
        return outcome.exit_code
    record = summary["best"]["record"]
    console.print(f"bertpress: best {_options(record['options'])}: {record.get('metric', 'cosine')} {record['fidelity']:.4f},"
                  f" estimated {record.get('compiled_estimated_latency_ms')} ms, measured {record.get('measured_latency_ms')} ms,"
                  f" {record.get('size_bytes', 0) / 1e6:.1f} MB -> {out / 'best.yaml'} and {out / 'best'}", markup=False)
    return 0


def cmd_schema(args) -> int:
    if args.report:
        from .report_schema import report_json_schema_text

        print(report_json_schema_text(), end="")
        return 0
    if args.markdown:
        from .recipe_docs import recipe_markdown

        print(recipe_markdown(), end="")
        return 0
    from .recipe import recipe_json_schema

    print(json.dumps(recipe_json_schema(), indent=2))
    return 0


def _percent(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def cmd_inspect(args) -> int:
    from rich.table import Table

    from .inspect import inspect, plot

    console.print(f"bertpress: inspecting {args.target} at batch {args.batch} x seq {args.seq} ({args.threads} threads)")
    with console.status("exporting and profiling", spinner="dots"):
        breakdown = inspect(args.target, batch=args.batch, seq=args.seq, threads=args.threads, runs=args.runs,
                            allow_pickle=args.allow_pickle)
    table = Table(title=f"{breakdown.source}: share per component (batch {breakdown.batch} x seq {breakdown.seq})")
    for column in ("component", "storage est.", "storage meas.", "FLOPs est.", "time est.", "time meas."):
        table.add_column(column, justify="left" if column == "component" else "right")
    for component, row in breakdown.shares().items():
        table.add_row(component, *(_percent(row.get(k)) for k in ("storage_estimated", "storage_measured",
                                                                     "flops_estimated", "latency_estimated", "time_measured")))
    out = Console(highlight=False, soft_wrap=True, width=120)  # the component names need the room
    out.print(table)
    for finding in breakdown.findings():
        verdict = {True: "holds", False: "does not hold", None: "not measurable"}[finding["holds"]]
        out.print(f"  seed finding: {finding['finding']}: {verdict} ({finding['figures']})", markup=False)
    for note in breakdown.notes:
        out.print(f"  {note}", markup=False)
    if args.png:
        console.print(f"bertpress: wrote {plot(breakdown, Path(args.png))}")
    if args.json:
        Path(args.json).write_text(json.dumps(breakdown.as_dict(), indent=2) + "\n")
        console.print(f"bertpress: wrote {args.json}")
    return 0


def cmd_bench(args) -> int:
    from rich.table import Table

    from .benchmark import bench

    console.print(f"bertpress: benchmarking {args.output_dir} against {args.against or 'the plain fp32 export'}"
                  f" at batch {args.batch} x seq {args.seq}, {args.threads} threads, {args.rounds} interleaved rounds")
    with console.status("measuring", spinner="dots"):
        result = bench(Path(args.output_dir), against=Path(args.against) if args.against else None, batch=args.batch,
                       seq=args.seq, threads=args.threads, rounds=args.rounds)
    table = Table(title=f"latency at batch {args.batch} x seq {args.seq} ({args.threads} threads, medians of {args.rounds})")
    for column in ("model", "median ms", "p90 ms", "sequences/s", "bytes"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for key, size in (("compiled", result["compiled_bytes"]), ("reference", result["reference_bytes"])):
        row = result[key]
        table.add_row(f"{key} ({row['path']})", f"{row['median_ms']:.1f}", f"{row['p90_ms']:.1f}",
                      f"{row['throughput_per_s']:.1f}", f"{size:,}")
    Console(stderr=True, highlight=False, soft_wrap=True).print(table)
    console.print(f"speedup (median): {result['speedup_median']:.2f}x; load average before / after:"
                  f" {result['load_average_before']} / {result['load_average_after']}", markup=False)
    text = json.dumps(result, indent=2) + "\n"
    if args.json:
        Path(args.json).write_text(text)
        console.print(f"bertpress: wrote {args.json}")
    else:
        print(text, end="")
    return 0


def cmd_roofline(args) -> int:
    from rich.table import Table

    from . import roofline

    cached = roofline.cache_path()
    with console.status(f"measuring the roofline at {args.threads} threads" if args.refresh else "reading the roofline",
                        spinner="dots"):
        machine = roofline.machine(args.threads, refresh=args.refresh)
    table = Table(title=f"roofline of this machine at {machine.threads} threads (ONNX Runtime {machine.onnxruntime})")
    table.add_column("figure")
    table.add_column("value", justify="right")
    for label, value in (("fp32 GEMM", f"{machine.fp32_gflops:.1f} GFLOP/s"), ("int8 GEMM", f"{machine.int8_gflops:.1f} GFLOP/s"),
                         ("memory bandwidth", f"{machine.bandwidth_gbs:.1f} GB/s"), ("per-kernel overhead", f"{machine.overhead_us:.2f} us"),
                         ("cpu", machine.cpu), ("measured at", machine.measured_at),
                         ("load average then", "-" if machine.load_average is None else f"{machine.load_average:.2f}")):
        table.add_row(label, value)
    Console(stderr=True, highlight=False, soft_wrap=True).print(table)
    console.print(f"cached in {cached}; the cost model's latency estimates use it.", markup=False)
    if machine.load_average is not None and machine.load_average >= machine.threads:
        console.print(f"bertpress: warning: the machine was busy when this was measured (load average {machine.load_average:.2f}"
                      f" for {machine.threads} threads): the peaks are low and latency estimates high. Rerun"
                      " `bertpress roofline --refresh` when it is idle.", markup=False)
    print(json.dumps(machine.as_dict(), indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bertpress", description="Compile BERT-family models with a compression recipe.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("compile", help="compile a recipe into a deployable ONNX Runtime folder")
    p.add_argument("recipe")
    p.add_argument("--model", help="override the recipe's model (a local folder or builtin:minilm-l6)")
    p.add_argument("--out", help="output folder (default out/<recipe name>)")
    p.add_argument("--allow-pickle", action="store_true", help="allow pickle (.bin) weights; only for trusted models")
    p.add_argument("--force", action="store_true", help="rebuild even if the output folder is up to date")
    p.add_argument("--fresh", action="store_true",
                   help="run every pass: do not replay (or store) distill results from the pass store"
                        " (~/.cache/bertpress/passes; BERTPRESS_PASS_STORE=off disables it)")
    p.set_defaults(func=cmd_compile)
    p = sub.add_parser("validate", help="check a recipe without compiling it")
    p.add_argument("recipe")
    p.add_argument("--model", help="override the recipe's model")
    p.add_argument("--print", action="store_true", help="print the normalized recipe as JSON")
    p.set_defaults(func=cmd_validate)
    p = sub.add_parser("tune", help="search a recipe's {search: ...} options for the fastest (or smallest) recipe within budget")
    p.add_argument("recipe")
    p.add_argument("--out", required=True, help="folder for trials.jsonl, frontier.json/.png, best.yaml and best/")
    p.add_argument("--executor", choices=("local", "ray"), default="local",
                   help="local: trials one after the other here; ray: on a Ray cluster (pip install 'bertpress[ray]')")
    p.add_argument("--address", help="the Ray cluster to join (default: a local one started for the search)")
    p.add_argument("--resume", action="store_true", help="continue the search in --out, skipping finished trials")
    p.add_argument("--store", help="pass store folder the trials share (default: the user's; a path every Ray worker sees)")
    p.set_defaults(func=cmd_tune)
    p = sub.add_parser("schema", help="print the JSON Schema of recipe files (or, with --report, of report.json)")
    p.add_argument("--report", action="store_true", help="print the JSON Schema of report.json instead")
    p.add_argument("--markdown", action="store_true", help="print the recipe reference as Markdown (docs/recipes.md)")
    p.set_defaults(func=cmd_schema)
    p = sub.add_parser("inspect", help="share of storage and compute per component, estimated and measured (ORT profile)")
    p.add_argument("target", metavar="MODEL_OR_OUTPUT_DIR", help="a Hugging Face folder, builtin:minilm-l6, or a compiled output folder")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=3, help="profiled runs, after one warm-up")
    p.add_argument("--png", help="write the bar chart here (e.g. inspect.png)")
    p.add_argument("--json", help="write the figures here as JSON")
    p.add_argument("--allow-pickle", action="store_true", help="allow pickle (.bin) weights; only for trusted models")
    p.set_defaults(func=cmd_inspect)
    p = sub.add_parser("bench", help="latency and throughput of a compiled model vs a reference, interleaved")
    p.add_argument("output_dir", metavar="OUTPUT_DIR")
    p.add_argument("--against", metavar="REF", help="reference folder (with model.onnx) or .onnx file; default: the plain"
                   " fp32 export of the original model")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=20, help="interleaved timed rounds (after 2 warm-ups)")
    p.add_argument("--json", help="write the figures here (default: print them to stdout)")
    p.set_defaults(func=cmd_bench)
    p = sub.add_parser("roofline", help="the machine roofline the cost model uses: show it, or measure it again")
    p.add_argument("--threads", type=int, default=2, help="intra-op threads (a recipe's target.threads)")
    p.add_argument("--refresh", action="store_true", help="measure again (a few seconds; best on an idle machine)")
    p.set_defaults(func=cmd_roofline)
    return parser


def main(argv: list[str] | None = None) -> int:
    # torch's own deprecation chatter (pytree specs on deepcopy) is not the user's business.
    warnings.filterwarnings("ignore", category=FutureWarning, module="copyreg")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except BertpressError as error:
        console.print(f"bertpress: error: {error.render()}", markup=False)
        return error.exit_code
    except OSError as error:  # full disk, read-only or vanished output folder: the staging folder is already gone
        where = f" ({error.filename})" if error.filename else ""
        console.print(f"bertpress: error: cannot write the output{where}: {error.strerror or error}. Nothing was written."
                      " Fix: free disk space or choose a writable --out.", markup=False)
        return 2
    except KeyboardInterrupt:
        console.print("bertpress: interrupted; no output was written.")
        return 130


if __name__ == "__main__":
    sys.exit(main())
