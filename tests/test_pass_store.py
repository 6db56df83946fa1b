"""The pass store: a distillation that already ran is replayed when everything it reads is the same, and only then."""

from __future__ import annotations

import copy
import importlib
import json
import sys
from pathlib import Path

import pytest
import torch

from compiler import pass_infra, pass_store
from compiler.calibration import load_texts
from compiler.cli import main
from compiler.compile import compile_recipe
from compiler.pass_infra import PassResult
from compiler.recipe import load_recipe
from passes.distill import Distill
from tests.conftest import write_recipe

DISTILL = "{steps: 20, batch_size: 8, max_length: 32, lr: 2.0e-3, monitor_every: 10, texts: corpus.txt, samples: 400}"


def _recipe(folder: Path, model: Path, *, drop: str = "[1]", distill: str = DISTILL, quantize: str = "{}",
            seed: int = 0, name: str = "recipe.yaml") -> Path:
    return write_recipe(folder, f"""
version: 1
model: {model}
calibration: {{texts: builtin, samples: 16, validation_samples: 8, max_length: 32, batch_size: 8, seed: {seed}}}
budget: {{metric: cosine, min: 0.01}}
cost: {{batch: 2, seq: 16}}
passes:
  - layer-drop: {{layers: {drop}}}
  - distill: {distill}
  - quantize-linear: {quantize}
""", name=name)


@pytest.fixture()
def store(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "pass-store"
    monkeypatch.setenv("BERTPRESS_PASS_STORE", str(root))
    return root


@pytest.fixture(scope="module")
def corpus_lines() -> list[str]:
    return [t for t in load_texts("builtin", None) if len(t) < 200][:400]


@pytest.fixture()
def folder(tmp_path, corpus_lines) -> Path:
    work = tmp_path / "work"
    work.mkdir()
    (work / "corpus.txt").write_text("\n".join(corpus_lines) + "\n")
    return work


@pytest.fixture()
def trainings(monkeypatch) -> list[int]:
    """How many times distill really trained (a replay never does)."""
    calls: list[int] = []
    train = Distill._train

    def counted(self, *args, **kwargs):
        calls.append(1)
        return train(self, *args, **kwargs)

    monkeypatch.setattr(Distill, "_train", counted)
    return calls


def _compile(recipe: Path, out: Path, **options) -> dict:
    result = compile_recipe(load_recipe(recipe), out, **options)
    assert result.exit_code == 0, result.report.get("failure")
    return result.report


def _distill(report: dict) -> dict:
    return next(p for p in report["passes"] if p["name"] == "distill")


def test_a_second_compile_replays_the_distillation_and_writes_the_same_model(store, folder, tiny_dir, trainings):
    recipe = _recipe(folder, tiny_dir)
    first = _compile(recipe, folder / "a")
    ran = _distill(first)
    assert ran["status"] == "applied" and ran["store"]["action"] == "stored"
    assert Path(ran["store"]["path"]).is_file() and Path(ran["store"]["path"]).parent == store
    assert len(trainings) == 1

    second = _compile(recipe, folder / "b")
    replayed = _distill(second)
    assert len(trainings) == 1, "the replay trained again"
    assert replayed["status"] == "applied" and replayed["store"]["action"] == "replayed"
    assert replayed["store"]["key"] == ran["store"]["key"]
    assert 0 < replayed["store"]["original_seconds"] <= ran["seconds"]
    assert "replayed from the pass store" in (folder / "b" / "report.md").read_text()
    # Checked again, not trusted: the same held-out figures, and the same bytes in every output file.
    assert replayed["checks"] == ran["checks"]
    assert replayed["details"]["steps"] == 20 and replayed["details"]["curve"] == ran["details"]["curve"]
    assert second["final_check"]["cosine"] == first["final_check"]["cosine"]
    for name in ("model.onnx", "config.json", "tokenizer.json"):
        assert (folder / "a" / name).read_bytes() == (folder / "b" / name).read_bytes(), name


def test_a_change_after_the_distillation_still_replays_it(store, folder, tiny_dir, trainings):
    _compile(_recipe(folder, tiny_dir), folder / "a")
    report = _compile(_recipe(folder, tiny_dir, quantize="{dtype: fp16}", name="later.yaml"), folder / "b")
    assert _distill(report)["store"]["action"] == "replayed" and len(trainings) == 1


@pytest.mark.parametrize("change", ["distill config", "earlier pass", "training text", "calibration seed"])
def test_a_change_to_anything_the_distillation_reads_runs_it_again(store, folder, tiny_dir, trainings, change):
    _compile(_recipe(folder, tiny_dir), folder / "a")
    options = {}
    if change == "distill config":
        options["distill"] = DISTILL.replace("steps: 20", "steps: 21")
    elif change == "earlier pass":
        options["drop"] = "[0]"
    elif change == "training text":
        corpus = folder / "corpus.txt"
        corpus.write_text(corpus.read_text().replace("\n", " \n", 1))
    else:
        options["seed"] = 1
    report = _compile(_recipe(folder, tiny_dir, name="changed.yaml", **options), folder / "b")
    assert _distill(report)["store"]["action"] == "stored" and len(trainings) == 2
    assert len(list(store.glob("*.pt"))) == 2


def test_fresh_runs_every_pass_and_leaves_the_store_alone(store, folder, tiny_dir, trainings):
    recipe = _recipe(folder, tiny_dir)
    _compile(recipe, folder / "a")
    entries = {p: p.read_bytes() for p in store.glob("*.pt")}
    assert main(["compile", str(recipe), "--out", str(folder / "b"), "--fresh"]) == 0
    report = json.loads((folder / "b" / "report.json").read_text())
    assert _distill(report)["store"] is None and len(trainings) == 2
    assert {p: p.read_bytes() for p in store.glob("*.pt")} == entries


def test_the_store_can_be_switched_off(folder, tiny_dir, trainings, monkeypatch, tmp_path):
    monkeypatch.setenv("BERTPRESS_PASS_STORE", "off")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    report = _compile(_recipe(folder, tiny_dir), folder / "a")
    assert _distill(report)["store"] is None
    assert not (tmp_path / "xdg" / "bertpress" / "passes").exists()


def test_an_unreadable_entry_is_ignored_said_and_replaced(store, folder, tiny_dir, trainings, capsys):
    recipe = _recipe(folder, tiny_dir)
    first = _compile(recipe, folder / "a")
    path = Path(_distill(first)["store"]["path"])
    path.write_bytes(path.read_bytes()[:1000])  # a copy cut short
    report = _compile(recipe, folder / "b")
    entry = _distill(report)["store"]
    assert len(trainings) == 2 and entry["action"] == "stored" and "unreadable" in entry["problem"]
    assert (folder / "a" / "model.onnx").read_bytes() == (folder / "b" / "model.onnx").read_bytes()
    assert len(_compile(recipe, folder / "c")["passes"]) and len(trainings) == 2  # the rewritten entry replays


def _linear_graph() -> torch.fx.GraphModule:
    torch.manual_seed(0)
    return torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()))


class _Pass:
    name = "weights"


def test_a_result_that_breaks_the_weights_only_promise_is_not_stored(tmp_path):
    store = pass_store.PassStore(tmp_path, "model")
    before = _linear_graph()
    changed_graph = copy.deepcopy(before)
    relu = next(n for n in changed_graph.graph.nodes if n.op == "call_module" and n.target == "1")
    relu.replace_all_uses_with(relu.args[0])
    changed_graph.graph.erase_node(relu)
    changed_graph.recompile()
    path, note = store.save("k1", _Pass(), before, PassResult(changed_graph, True), 1.0)
    assert path is None and "changed the graph" in note
    reshaped = copy.deepcopy(before)
    reshaped.get_submodule("0").weight = torch.nn.Parameter(torch.zeros(4, 5))
    path, note = store.save("k2", _Pass(), before, PassResult(reshaped, True), 1.0)
    assert path is None and "shapes" in note
    assert not list(tmp_path.glob("*.pt"))


def test_only_changed_tensors_are_stored_and_the_newest_entries_are_kept(tmp_path):
    store = pass_store.PassStore(tmp_path, "model", keep=2)
    before = _linear_graph()
    for index in range(3):
        after = copy.deepcopy(before)
        with torch.no_grad():
            after.get_submodule("0").weight.add_(index + 1)
        path, note = store.save(f"k{index}", _Pass(), before, PassResult(after, True, details={"i": index}), 2.5)
        assert note == "stored"
        entry, problem = store.load(f"k{index}", before)
        assert problem is None and set(entry.tensors) == {"0.weight"} and entry.details == {"i": index}
        assert torch.equal(entry.tensors["0.weight"], after.get_submodule("0").weight)
    assert sorted(p.stem for p in tmp_path.glob("*.pt")) == ["k1", "k2"]


def test_the_key_follows_the_graphs_tensors_not_just_its_code():
    gm = _linear_graph()
    other = copy.deepcopy(gm)
    assert pass_store.graph_digest(gm) == pass_store.graph_digest(other)
    with torch.no_grad():
        other.get_submodule("0").bias[0] += 1e-6
    assert pass_store.graph_digest(gm) != pass_store.graph_digest(other)


PLUGIN = '''from compiler.pass_infra import Pass, PassResult, register_pass


@register_pass
class EditedWhileCompiling(Pass):
    """A plugin pass whose file is edited on disk after it was imported."""

    name = "test-edited-while-compiling"
    kind = "lossy"
    weights_only = True

    def run(self, gm, ctx):
        return PassResult(gm, changed=False)
'''


def test_the_key_is_of_the_code_that_was_loaded_not_of_an_edit_made_on_disk_since(tmp_path, monkeypatch):
    (tmp_path / "edited_plugin.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        module = importlib.import_module("edited_plugin")
        loaded = pass_store.code_digest(module.EditedWhileCompiling)
        # An edit made while a compile runs (the module stays as it was imported): the key must not follow it.
        (tmp_path / "edited_plugin.py").write_text(PLUGIN.replace("changed=False", "changed=True"))
        assert pass_store.code_digest(module.EditedWhileCompiling) == loaded
        # A process that imports the edited code (here: a reload) keys it anew.
        reloaded = importlib.reload(module)
        assert pass_store.code_digest(reloaded.EditedWhileCompiling) != loaded
    finally:
        pass_infra._REGISTRY.pop("test-edited-while-compiling", None)
        sys.modules.pop("edited_plugin", None)


def test_the_distillation_key_covers_the_pass_modules_it_imports_and_no_others(monkeypatch):
    """Editing another pass's module (low-rank's messages, quantize-linear's rewrite) must not throw away hours of stored
    distillation; editing the pass options (passes/options.py, where distill's own options live) must. The int8
    simulation the distillation's QAT runs is compiler code (compiler/simulation.py), keyed with the compiler."""
    compiler_sources, passes_sources = pass_store._loaded_sources()
    loaded = pass_store.code_digest(Distill)

    def edited(name):
        changed = dict(passes_sources, **{name: passes_sources[name] + b"\n# edited\n"})
        monkeypatch.setattr(pass_store, "_loaded_sources", lambda: (compiler_sources, changed))
        return pass_store.code_digest(Distill)

    assert edited("low_rank.py") == loaded and edited("prune_vocab.py") == loaded
    assert edited("quantize_linear.py") == loaded
    assert edited("options.py") != loaded
    assert edited("__init__.py") != loaded


def test_pass_imports_are_followed_through_relative_and_nested_imports():
    sources = {"__init__.py": b"from . import a, b, c, d\n", "a.py": b"def f():\n    from .b import g\n",
               "b.py": b"import passes.c as c\n", "c.py": b"x = 1\n", "d.py": b"import os\n"}
    start = [(b"def run():\n    from passes import a\n", "compiler")]
    assert sorted(pass_store.passes_closure(start, sources)) == ["__init__.py", "a.py", "b.py", "c.py"]
    assert sorted(pass_store.passes_closure([(b"import torch\n", "compiler")], sources)) == ["__init__.py"]
    assert pass_store.passes_closure([(b"def broken(:\n", "")], sources) == sources  # unreadable: key everything
