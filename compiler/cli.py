"""The ``bertpress`` command line: compile, validate, schema.

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


def _progress_instrument(event: str, payload: dict) -> None:
    if event == "pass_start":
        console.print(f"  [{payload['index'] + 1}/{payload['total']}] {payload['name']} ...")
    elif event == "pass_progress":
        if not _bar:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            _bar["progress"] = Progress(TextColumn("      {task.description}"), BarColumn(), MofNCompleteColumn(),
                                        TextColumn("{task.fields[info]}"), TimeRemainingColumn(),
                                        console=console, transient=True)
            _bar["progress"].start()
            _bar["task"] = _bar["progress"].add_task(payload["name"], total=payload.get("total"), info="")
        info = "  ".join(f"{key} {value:.4f}" if isinstance(value, float) else f"{key} {value}"
                         for key, value in payload.items() if key not in ("name", "step", "total"))
        _bar["progress"].update(_bar["task"], completed=payload.get("step", 0), info=info)
    elif event == "pass_end":
        if _bar:
            _bar.pop("progress").stop()
            _bar.clear()
        rec = payload["record"]
        checks = rec.checks
        detail = f"cosine {checks['cosine']:.4f}" if "cosine" in checks else ""
        if "cosine_before" in checks:
            detail = f"cosine {checks['cosine_before']:.4f} -> {checks['cosine']:.4f}"
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

    recipe = _load(args.recipe, args.model)
    out = Path(args.out) if args.out else Path("out") / Path(args.recipe).stem
    started = time.perf_counter()
    console.print(f"bertpress: compiling {args.recipe} -> {out}")
    with console.status("working", spinner="dots") as status:
        def progress(message: str) -> None:
            status.update(message)
            console.print(f"  {message}", markup=False)
        result = compile_recipe(recipe, out, allow_pickle=args.allow_pickle,
                                instruments=[_progress_instrument], progress=progress, force=args.force)
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
                  f" held-out cosine {final['cosine']:.4f} (budget >= {final['budget_min']})")
    return 0


def cmd_validate(args) -> int:
    from .calibration import load_texts
    from .frontend import resolve_model_path

    recipe = _load(args.recipe, args.model)
    resolve_model_path(recipe.file.model)
    load_texts(recipe.file.calibration.texts, recipe.base_dir)
    names = ", ".join(step.name for step in recipe.steps) or "no passes"
    console.print(f"{args.recipe}: ok ({len(recipe.steps)} passes: {names})")
    if args.print:
        print(json.dumps(recipe.normalized(), indent=2))
    return 0


def cmd_schema(args) -> int:
    if args.report:
        from .report_schema import report_json_schema_text

        print(report_json_schema_text(), end="")
        return 0
    from .recipe import recipe_json_schema

    print(json.dumps(recipe_json_schema(), indent=2))
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
    p.set_defaults(func=cmd_compile)
    p = sub.add_parser("validate", help="check a recipe without compiling it")
    p.add_argument("recipe")
    p.add_argument("--model", help="override the recipe's model")
    p.add_argument("--print", action="store_true", help="print the normalized recipe as JSON")
    p.set_defaults(func=cmd_validate)
    p = sub.add_parser("schema", help="print the JSON Schema of recipe files (or, with --report, of report.json)")
    p.add_argument("--report", action="store_true", help="print the JSON Schema of report.json instead")
    p.set_defaults(func=cmd_schema)
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
