"""The layering rules of docs/architecture.md, read off the import graph so a new violation fails here.

1. ``passes/`` use ``compiler/``; nothing under ``compiler/`` imports ``passes`` except ``compiler/pass_registry.py``,
   the one place that registers the built-in passes.
2. Lowering knows no pass: ``compiler/lowering/`` imports neither ``passes`` nor the pass machinery.
3. Reading a recipe needs no torch: ``compiler/recipe.py`` and what it imports, ``passes/options.py``, and the
   ``validate`` and ``schema`` commands load without torch.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REGISTERING_MODULE = "compiler.pass_registry"
PASS_MACHINERY = {"compiler.pass_infra", "compiler.pass_manager", "compiler.pass_registry", "compiler.pass_store",
                  "compiler.pass_config"}
TORCH_FREE = ("compiler.recipe", "compiler.pass_config", "compiler.pass_registry", "compiler.model_files",
              "compiler.errors", "passes.options", "passes")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, *, top_level_only: bool = False, module: str | None = None) -> set[str]:
    """Absolute names of the modules ``path`` (module ``module``) imports, relative imports resolved, anywhere in the
    file or only at its top level (not inside functions or ``if TYPE_CHECKING:``)."""
    module = module or _module_name(path)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            found.add(stem)
            found.update(f"{stem}.{alias.name}" for alias in node.names)
    return found


def _sources(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


def _names(imported: set[str], prefix: str) -> set[str]:
    return {name for name in imported if name == prefix or name.startswith(prefix + ".")}


def _run_in_a_fresh_interpreter(code: str) -> None:
    """Run ``code`` in a new Python process (nothing imported yet) and fail with its error if an assertion breaks."""
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_only_the_registry_imports_passes_from_compiler():
    offenders = {_module_name(path): sorted(_names(imports_of(path), "passes")) for path in _sources("compiler")
                 if _module_name(path) != REGISTERING_MODULE and _names(imports_of(path), "passes")}
    assert not offenders, f"compiler/ modules import passes/ (only {REGISTERING_MODULE} may): {offenders}"


def test_lowering_knows_no_pass():
    offenders = {}
    for path in _sources("compiler/lowering"):
        imported = imports_of(path)
        bad = _names(imported, "passes") | {name for name in imported
                                            if any(name == m or name.startswith(m + ".") for m in PASS_MACHINERY)}
        if bad:
            offenders[_module_name(path)] = sorted(bad)
    assert not offenders, f"lowering imports passes or the pass machinery: {offenders}"


def test_recipe_modules_import_no_torch_at_top_level():
    for module in TORCH_FREE:
        path = ROOT / (module.replace(".", "/") + ".py")
        if not path.exists():
            path = ROOT / module.replace(".", "/") / "__init__.py"
        heavy = {name for name in imports_of(path, top_level_only=True)
                 if name.split(".")[0] in ("torch", "transformers", "onnx", "onnxruntime")}
        assert not heavy, f"{module} imports {sorted(heavy)} at its top level; reading a recipe must not need them"


def test_validate_and_schema_run_without_importing_torch():
    code = (
        "import sys\n"
        "from compiler.cli import main\n"
        "assert main(['validate', 'recipes/minilm-int8.yaml']) == 0\n"
        "assert main(['validate', 'recipes/minilm-fast.yaml']) == 0\n"
        "import contextlib, io\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    assert main(['schema']) == 0\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'onnxruntime') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    _run_in_a_fresh_interpreter(code)


def test_a_declared_pass_loads_its_code_only_when_asked():
    code = (
        "import sys\n"
        "from compiler.pass_registry import declared_passes, get_pass\n"
        "names = declared_passes()\n"
        "assert 'quantize-linear' in names and 'torch' not in sys.modules\n"
        "cls = get_pass('quantize-linear')\n"
        "assert cls.Config is names['quantize-linear'].Config and 'torch' in sys.modules\n"
        "assert cls.must_run_before == names['quantize-linear'].must_run_before\n"
    )
    _run_in_a_fresh_interpreter(code)


def test_the_import_graph_reader_sees_a_violation(tmp_path):
    """The reader resolves relative imports and finds imports inside functions, so a lazy violation is caught too."""
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from passes.quantize_linear import QuantizeLinear\n    from ..passes import x\n"
                     "    from .lowering import export\n")
    imported = imports_of(probe, module="compiler.probe")
    assert "passes.quantize_linear" in imported and "passes.x" in imported and "compiler.lowering.export" in imported
    assert not imports_of(probe, module="compiler.probe", top_level_only=True)
