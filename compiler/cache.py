"""Build cache: is the output folder already what this recipe would compile to?

The key is a SHA-256 over everything that decides the output: the model folder's files, the
normalized recipe, the calibration text (when it is a file or folder), bertpress's version and
source code (the compiler package and the modules defining the recipe's passes, so an edited
plugin or an editable checkout rebuilds), and the versions of the libraries that trace and lower (torch,
transformers, onnx, onnxscript, onnx-ir, onnxruntime) and of Python. The key and its parts are kept
in ``report.json`` under ``cache``; a rerun compares keys before any model is loaded.

Hashing reads every byte of the model (about 0.3 s for MiniLM's 90 MB); it never imports torch models.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import inspect
import json
import platform
from pathlib import Path
from typing import Any

from . import __version__
from .calibration import AUSTEN_DIR, BUILTIN_CORPORA, FORTUNES_DIR, JARGON_FILE, WORDNET_DIR
from .frontend import resolve_model_path
from .pass_infra import get_pass
from .recipe import Recipe

LIBRARIES = ("torch", "transformers", "tokenizers", "onnx", "onnxscript", "onnx-ir", "onnxruntime", "numpy")
_CHUNK = 1 << 20


def _hash_files(files: list[Path], root: Path) -> str:
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        with path.open("rb") as handle:
            while block := handle.read(_CHUNK):
                digest.update(block)
        digest.update(b"\0")
    return digest.hexdigest()


def _tree_files(folder: Path, suffixes: tuple[str, ...] | None = None) -> list[Path]:
    # Hidden entries (.git, .cache) never hold weights; skipping them keeps a hub clone's key stable.
    return sorted(p for p in folder.rglob("*") if p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts)
                  and (suffixes is None or p.suffix in suffixes))


def model_digest(spec: str) -> str:
    folder = resolve_model_path(spec)
    return _hash_files(_tree_files(folder), folder)


def calibration_digest(source: str, base_dir: Path | None) -> str:
    """Digest of the calibration text's bytes; Python's own docs and docstrings are covered by the Python version."""
    if source in BUILTIN_CORPORA:
        # Corpora read from a system package's folder are covered by that folder's bytes (the recipe's own text names
        # which corpus or split of it); Python's own are covered by the Python version.
        packaged = {"builtin:wordnet": WORDNET_DIR, "builtin:fortunes": FORTUNES_DIR, "builtin:jargon": JARGON_FILE,
                    "builtin:austen": AUSTEN_DIR}
        path = next((path for prefix, path in packaged.items() if source.startswith(prefix)), None)
        if path is not None and path.is_dir():
            return _hash_files(_tree_files(path), path)
        if path is not None and path.is_file():
            return _hash_files([path], path.parent)
        return source
    path = Path(source).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    if path.is_dir():
        return _hash_files(_tree_files(path, (".txt", ".jsonl")), path)
    if path.is_file():
        return _hash_files([path], path.parent)
    return f"missing:{path}"  # the compile itself reports the missing file


def code_digest(recipe: Recipe) -> str:
    """The compiler's sources plus the files defining the recipe's passes (built-in or plugin)."""
    import compiler

    files = _tree_files(Path(compiler.__file__).parent, (".py",))
    for step in recipe.steps:
        source = inspect.getsourcefile(get_pass(step.name))
        if source:
            files.append(Path(source))
    unique = sorted(set(files))
    digest = hashlib.sha256()
    for path in unique:
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def cache_inputs(recipe: Recipe) -> dict[str, Any]:
    """Everything the output depends on, each as a short string (kept in the report for diagnosis)."""
    settings = recipe.file
    return {
        "model": model_digest(settings.model),
        "recipe": recipe.digest(),
        "calibration": calibration_digest(settings.calibration.texts, recipe.base_dir),
        # Text sources a pass reads on its own (prune-vocab's domain corpus, distill's training text).
        "pass_texts": {f"passes[{index}].{name}": [calibration_digest(source, recipe.base_dir)
                                                    for source in ([value] if isinstance(value, str) else value)]
                       for index, step in enumerate(recipe.steps)
                       for name, value in step.config.model_dump().items()
                       if name.endswith("texts") and isinstance(value, (str, list))},
        "bertpress": __version__,
        "code": code_digest(recipe),
        "python": platform.python_version(),
        "libraries": {name: _version(name) for name in LIBRARIES},
    }


def cache_key(inputs: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def up_to_date(out_dir: Path, key: str) -> dict[str, Any] | None:
    """The previous report if ``out_dir`` is a successful build with this key and all its files intact."""
    try:
        report = json.loads((out_dir / "report.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(report, dict) or report.get("status") != "ok" or (report.get("cache") or {}).get("key") != key:
        return None
    files = (report.get("outputs") or {}).get("files") or {}
    if "model.onnx" not in files:
        return None
    for name, size in files.items():
        path = out_dir / name
        if name != "report.json" and (not path.is_file() or path.stat().st_size != size):
            return None  # a file was deleted or truncated since: rebuild rather than trust the stamp
    return report
