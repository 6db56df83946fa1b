"""Stored results of weights-only passes: a distillation that already ran is replayed, not run again.

A pass that declares ``weights_only`` (distill) changes nothing but the values of parameters the
graph already has. Its result is then a function of what it reads: the graph it is given (code,
module provenance and every tensor), its own config and source, the compiler's sources that run
inside passes, the built-in pass modules that those or its own source import, the reference model,
the calibration texts and batches, the text files its config names, the tokenizer, the model
config, the seed, torch's thread count, the CPU and the library versions. The store keys the new
tensor values by a SHA-256 over all of that and keeps them under the user's cache folder, so a
later compile whose pass would read exactly the same things loads them in a second instead of
training for hours: editing a pass after distill, another pass's module that neither distill nor
the compiler imports, a lowering option or the lowering code itself no longer repeats the
distillation. The pass manager checks a replayed result exactly as a fresh one (the same held-out
fidelity check), and the report says which it was.

Where: ``$BERTPRESS_PASS_STORE`` if set (``off`` disables the store), else
``$XDG_CACHE_HOME/bertpress/passes`` (``~/.cache/bertpress/passes``). ``bertpress compile --fresh``
neither reads nor writes it. The newest :data:`KEEP` entries are kept. Entries are read with
``torch.load(weights_only=True)``: tensors and plain data only, never pickled code.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.util
import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from . import __version__

if TYPE_CHECKING:
    from .pass_infra import Pass, PassContext, PassResult

FORMAT = 1
KEEP = 8  # entries kept (newest first by last use); a MiniLM distillation is 20-90 MB
# Compiler modules that run only after the passes (lowering, output, reports) or only judge them (cost
# model, roofline): editing them cannot change what a pass computes, so they stay out of the key.
POST_PASS_MODULES = ("lowering", "cli.py", "compile.py", "output.py", "report.py", "report_schema.py", "inspect.py",
                     "benchmark.py", "runtime.py", "split_runtime.py", "cache.py", "roofline.py", "cost_model.py",
                     "pass_store.py", "__main__.py")


def store_root() -> Path | None:
    """The store's folder, or None when ``BERTPRESS_PASS_STORE=off``."""
    configured = os.environ.get("BERTPRESS_PASS_STORE")
    if configured is not None:
        return None if configured.strip().lower() in ("off", "0", "false", "") else Path(configured).expanduser()
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "bertpress" / "passes"


def _sha(*parts: bytes) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(hashlib.sha256(part).digest())
    return digest.hexdigest()


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return f"{flat.dtype}|{tuple(tensor.shape)}|".encode() + flat.view(torch.uint8).numpy().tobytes()


def graph_digest(gm: torch.fx.GraphModule) -> str:
    """The graph as a pass reads it: its code, each node's module provenance, and every tensor it holds."""
    digest = hashlib.sha256(gm.code.encode())
    for node in gm.graph.nodes:
        stack = node.meta.get("nn_module_stack") or {}
        digest.update(f"{node.name}:{[path for path, _ in stack.values()]}\n".encode())
    tensors = dict(gm.state_dict())
    for node in gm.graph.nodes:  # plain tensor attributes (constants) are not in the state dict
        if node.op == "get_attr" and node.target not in tensors:
            value = gm
            for part in node.target.split("."):
                value = getattr(value, part, None)
            if isinstance(value, torch.Tensor):
                tensors[node.target] = value
    for name in sorted(tensors):
        digest.update(name.encode() + b"\0" + hashlib.sha256(_tensor_bytes(tensors[name])).digest())
    return digest.hexdigest()


def _texts_digest(texts: list) -> bytes:
    return json.dumps(texts, ensure_ascii=False, default=list).encode()


def _batches_digest(batches: list[dict[str, torch.Tensor]]) -> bytes:
    return b"".join(name.encode() + _tensor_bytes(batch[name]) for batch in batches for name in sorted(batch))


def _tokenizer_digest(tokenizer) -> bytes:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return backend.to_str().encode()
    return json.dumps(sorted(tokenizer.get_vocab().items())).encode()


def _sources(package_dir: Path, skip: tuple[str, ...] = ()) -> dict[str, bytes]:
    """Every .py file below ``package_dir`` (but the top-level names in ``skip``) by its relative path."""
    files = sorted(p for p in package_dir.rglob("*.py") if not any(p.relative_to(package_dir).parts[0] == s for s in skip))
    return {p.relative_to(package_dir).as_posix(): p.read_bytes() for p in files}


def _digest_of(sources: dict[str, bytes]) -> str:
    return _sha(*(name.encode() + b"\0" + text for name, text in sorted(sources.items())))


@functools.cache
def _loaded_sources() -> tuple[dict[str, bytes], dict[str, bytes]]:
    """The compiler's sources (minus its post-pass modules) and the built-in passes', read once per process."""
    passes_spec = importlib.util.find_spec("passes")
    passes_dir = Path(next(iter(passes_spec.submodule_search_locations))) if passes_spec else None
    return (_sources(Path(__file__).resolve().parent, POST_PASS_MODULES),
            _sources(passes_dir) if passes_dir else {})


def _passes_imported(source: bytes, package: str = "") -> set[str]:
    """The ``passes.<module>`` names a source imports anywhere (functions included), as dotted module names.

    ``package`` is the importing module's package, for relative imports (``from . import x`` inside passes/).
    ``from passes import x`` names the module passes.x; whether x is a module is for the caller to check.
    """
    try:
        tree = ast.parse(source)
    except SyntaxError:  # cannot be read: the caller keys every module
        return {"*"}
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.split(".")[0] == "passes")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: max(len(package.split(".")) - node.level + 1, 0)] if package else []
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module.split(".")[0] != "passes":
                continue
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def passes_closure(starts: list[tuple[bytes, str]], passes_sources: dict[str, bytes]) -> dict[str, bytes]:
    """The built-in pass modules that the (source, package) ``starts`` import, and those they import in turn.

    By relative path, as in ``passes_sources``. passes/__init__.py is always in (it is the package's import list);
    the imports it makes only register the built-in passes, so they are not followed. An unparsable source keys
    every module.
    """
    by_module = {"passes." + name[:-3].replace("/", "."): name for name in passes_sources if name != "__init__.py"}
    keyed = {name: passes_sources[name] for name in ("__init__.py",) if name in passes_sources}
    pending = list(starts)
    while pending:
        source, package = pending.pop()
        imported = _passes_imported(source, package)
        if "*" in imported:
            return dict(passes_sources)
        for module in sorted(imported):
            name = by_module.get(module)
            if name is not None and name not in keyed:
                keyed[name] = passes_sources[name]
                pending.append((keyed[name], module.rsplit(".", 1)[0]))
    return keyed


def code_digest(pass_cls: type) -> str:
    """The sources a pass runs with: the compiler minus its post-pass modules, the pass's own file, and the built-in
    pass modules that either imports, directly or through each other (distill: passes/options.py, which declares every
    built-in pass; the other passes' modules stay out of its key).

    All are read as the process loaded them (the packages when this module is imported, a pass's own file when the
    pass was registered), so an edit made on disk during a compile does not go into the key of the code that ran.
    """
    from .pass_infra import registered_source

    compiler_sources, passes_sources = _loaded_sources()
    own = registered_source(pass_cls)
    module = getattr(pass_cls, "__module__", "") or ""
    package = module.rsplit(".", 1)[0] if "." in module else ""
    starts = [(text, "compiler") for text in compiler_sources.values()] + [(own, package)]
    keyed = passes_closure(starts, passes_sources)
    return _sha(_digest_of(compiler_sources).encode(), _digest_of(keyed).encode(), own)


_loaded_sources()  # at import, with the compiler: the sources this process runs


def _cpu() -> str:
    from .roofline import _cpu_name

    return _cpu_name()


@dataclass
class Stored:
    key: str
    path: Path
    tensors: dict[str, torch.Tensor]
    details: dict[str, Any]
    seconds: float
    created: str


class PassStore:
    """Weights-only pass results by key, as files under ``root``."""

    def __init__(self, root: Path, model_digest: str, keep: int = KEEP):
        self.root = Path(root)
        self.model_digest = model_digest
        self.keep = keep

    def key(self, instance: "Pass", gm: torch.fx.GraphModule, ctx: "PassContext") -> str:
        from .cache import calibration_digest, _version, LIBRARIES

        config = instance.config.model_dump(mode="json")
        texts = {name: [calibration_digest(source, ctx.base_dir) for source in ([value] if isinstance(value, str) else value)]
                 for name, value in instance.config.model_dump().items()
                 if name.endswith("texts") and isinstance(value, (str, list))}
        model_config = ctx.model_config.to_json_string(use_diff=False) if hasattr(ctx.model_config, "to_json_string") \
            else repr(ctx.model_config)
        cal = ctx.calibration
        inputs = {
            "format": FORMAT, "pass": instance.name, "config": config, "pass_texts": texts,
            "code": code_digest(type(instance)), "graph": graph_digest(gm), "model": self.model_digest,
            "calibration": _sha(_texts_digest(cal.texts), _texts_digest(cal.heldout_texts), _batches_digest(cal.batches),
                                _batches_digest(cal.heldout_batches), str(cal.max_length).encode()),
            "tokenizer": _sha(_tokenizer_digest(ctx.tokenizer)), "model_config": _sha(model_config.encode()),
            "seed": ctx.seed, "lowering": json.dumps(ctx.lowering, sort_keys=True, default=str),
            "threads": torch.get_num_threads(), "cpu": _cpu(), "bertpress": __version__,
            "python": platform.python_version(), "libraries": {name: _version(name) for name in LIBRARIES},
        }
        return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()

    def _path(self, key: str) -> Path:
        return self.root / f"{key}.pt"

    def load(self, key: str, gm: torch.fx.GraphModule) -> tuple[Stored | None, str | None]:
        """The stored result for ``key`` if it fits ``gm``; else None and, for an unusable entry, why."""
        path = self._path(key)
        if not path.is_file():
            return None, None
        try:
            entry = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(entry, dict) or entry.get("format") != FORMAT or entry.get("key") != key:
                return None, f"ignored {path}: not a result stored by this version"
            current = dict(gm.named_parameters(remove_duplicate=False))
            tensors = entry["tensors"]
            for name, tensor in tensors.items():
                if name not in current or current[name].shape != tensor.shape or current[name].dtype != tensor.dtype:
                    return None, f"ignored {path}: tensor {name} does not fit the graph"
            os.utime(path)  # last use, for eviction
            return Stored(key, path, tensors, dict(entry["details"]), float(entry["seconds"]), str(entry["created"])), None
        except Exception as exc:  # a truncated or foreign file: run the pass instead
            return None, f"ignored {path}: unreadable ({type(exc).__name__}: {exc})"

    def save(self, key: str, instance: "Pass", before: torch.fx.GraphModule, result: "PassResult",
             seconds: float) -> tuple[Path | None, str]:
        """Store the parameters ``result`` changed; refuse a result that is not weights-only."""
        after = result.graph_module
        if after.code != before.code or result.lowering or result.inputs is not None:
            return None, "not stored: the pass declares weights_only but changed the graph, lowering hints or inputs"
        old = dict(before.named_parameters(remove_duplicate=False))
        new = dict(after.named_parameters(remove_duplicate=False))
        if set(old) != set(new) or any(old[n].shape != new[n].shape or old[n].dtype != new[n].dtype for n in new):
            return None, "not stored: the pass declares weights_only but changed which parameters exist or their shapes"
        changed = {name: tensor.detach().clone() for name, tensor in new.items() if not torch.equal(old[name], tensor)}
        entry = {"format": FORMAT, "key": key, "pass": instance.name, "tensors": changed,
                 # Plain data only, so the entry loads with weights_only=True.
                 "details": json.loads(json.dumps(result.details, default=str)), "seconds": float(seconds),
                 "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "bertpress": __version__}
        path = self._path(key)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            partial = path.with_suffix(f".{os.getpid()}.partial")
            torch.save(entry, partial)
            os.replace(partial, path)  # readers see a whole entry or none
            self._evict()
        except OSError as exc:  # a full or read-only cache folder must not fail the compile
            return None, f"not stored: {type(exc).__name__}: {exc}"
        return path, "stored"

    def _evict(self) -> None:
        entries = sorted(self.root.glob("*.pt"), key=lambda p: p.stat().st_mtime, reverse=True)
        for stale in entries[self.keep:]:
            stale.unlink(missing_ok=True)
