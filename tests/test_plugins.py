"""Custom passes: registered by decorator, by function, by a recipe's ``plugins`` or a package's entry point.

The example package (examples/custom-pass) is installed for real with pip, into a temporary target
folder rather than the shared environment, and found through its ``bertpress.passes`` entry point
by a ``bertpress compile`` run whose recipe never names it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from compiler.errors import RecipeError
from compiler.graph_edit import get_tensor, set_parameter
from compiler.pass_infra import Pass, PassConfig, PassResult, get_pass, pass_function, register_pass
from compiler.pass_manager import PassManager
from compiler.recipe import load_recipe_text
from tests.conftest import write_recipe
from tests.helpers import calibration_for

EXAMPLE = Path(__file__).parent.parent / "examples" / "custom-pass"


@pytest.fixture(scope="session")
def installed_example(tmp_path_factory) -> Path:
    """examples/custom-pass installed with pip into its own folder (put it on PYTHONPATH to use it)."""
    target = tmp_path_factory.mktemp("site")
    # From a copy: an in-place setuptools build would leave build/ and *.egg-info in the repository.
    source = shutil.copytree(EXAMPLE, tmp_path_factory.mktemp("src") / "custom-pass",
                             ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    command = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(source)]
    done = subprocess.run([*command, "--no-build-isolation"], capture_output=True, text=True, timeout=300)
    if done.returncode:  # no setuptools in this environment: let pip fetch it in an isolated build
        done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert list(target.glob("bertpress_center_ln-*.dist-info/entry_points.txt"))
    return target


def _env(site: Path) -> dict:
    root = str(Path(__file__).parent.parent)
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), root])}


def test_installed_plugin_is_found_through_its_entry_point(installed_example, tiny_dir, tmp_path):
    # The recipe has no `plugins:`: the pass is found only because the installed package declares it.
    recipe = write_recipe(tmp_path, f"""
model: {tiny_dir}
calibration: {{texts: builtin, samples: 16, validation_samples: 8, max_length: 32, batch_size: 8}}
budget: {{min: 0.5}}
passes:
  - center-ln-inputs: {{}}
  - quantize-linear: {{}}
""")
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "compiler.cli", "compile", str(recipe), "--out", str(out)],
                          capture_output=True, text=True, timeout=600, env=_env(installed_example), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads((out / "report.json").read_text())["passes"]
    center = rows[0]
    assert center["name"] == "center-ln-inputs" and center["kind"] == "exact" and center["status"] == "applied"
    assert center["checks"]["max_abs_error"] <= center["checks"]["tolerance"] == 1e-4
    assert len(center["details"]["centered"]) == 4  # two layers x (attention output, ffn down)
    assert center["cost_before"]["parameters"] == center["cost_after"]["parameters"]
    assert rows[1]["name"] == "quantize-linear" and rows[1]["status"] == "applied"


def test_example_package_passes_its_own_tests(installed_example):
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(EXAMPLE / "tests")],
                          capture_output=True, text=True, timeout=600, env=_env(installed_example), cwd=EXAMPLE)
    assert done.returncode == 0, done.stdout[-3000:]
    assert " passed" in done.stdout and "failed" not in done.stdout


def test_recipe_plugins_field_imports_the_module(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLE))  # importable, but not installed: no entry point
    recipe = load_recipe_text("plugins: [bertpress_center_ln]\npasses:\n  - center-ln-inputs: {sites: ffn}\n")
    assert recipe.steps[0].name == "center-ln-inputs" and recipe.steps[0].config.sites == "ffn"
    assert get_pass("center-ln-inputs").kind == "exact"


def test_missing_plugin_module_is_bad_input_naming_the_field():
    with pytest.raises(RecipeError) as error:
        load_recipe_text("plugins: [no_such_bertpress_plugin]\n", file="r.yaml")
    assert error.value.exit_code == 2
    assert "r.yaml: plugins[0]" in str(error.value) and "no_such_bertpress_plugin" in str(error.value)


class _Scale(PassConfig):
    factor: float = 1.0


@pass_function("test-scale-first-ffn", kind="exact", config=_Scale)
def scale_first_ffn(gm, ctx, config):
    """Scale the first feed-forward down projection (exact only when factor is 1)."""
    down = ctx.structure(gm).layers[0].ffn.down
    set_parameter(gm, down.weight, get_tensor(gm, down.weight) * config.factor)
    return PassResult(gm, modified=True, details={"scaled": down.module})


def _manager(tiny, passes: str) -> PassManager:
    recipe = load_recipe_text(f"passes:\n{passes}\n", file="t.yaml")
    return PassManager(recipe, calibration_for(tiny), tiny.model, tiny.tokenizer, tiny.config)


def test_function_pass_gets_the_managers_checks_and_report_row(tiny, tiny_gm):
    _, records = _manager(tiny, "  - test-scale-first-ffn: {factor: 1.0}").run(tiny_gm)
    row = records[0].as_dict()
    assert row["status"] == "applied" and row["kind"] == "exact" and row["details"] == {"scaled": "encoder.layer.0.output.dense"}
    assert row["checks"]["max_abs_error"] <= 1e-4 and row["cost_after"] is not None


def test_custom_exact_pass_that_changes_outputs_is_rolled_back(tiny, tiny_gm):
    before = tiny_gm.state_dict()
    state, records = _manager(tiny, "  - test-scale-first-ffn: {factor: 1.5, on_fail: skip}").run(tiny_gm)
    row = records[0].as_dict()
    assert row["status"] == "skipped" and "exact rewrite changed the outputs" in row["reason"]
    assert row["checks"]["max_abs_error"] > 1e-4
    for name, value in state.gm.state_dict().items():
        assert torch.equal(value, before[name]), name  # the rollback restored every weight


def _ordered_pass(name: str, *, before=(), after=()):
    attributes = {"name": name, "kind": "exact", "must_run_before": before, "must_run_after": after,
                  "run": lambda self, gm, ctx: PassResult(gm, modified=False), "__doc__": f"Test pass {name}."}
    return register_pass(type(name.replace("-", "_"), (Pass,), attributes))


def test_contradicting_constraints_name_both_passes():
    _ordered_pass("test-tick", before=("test-tock",))
    _ordered_pass("test-tock", before=("test-tick",))
    with pytest.raises(RecipeError) as error:
        load_recipe_text("passes:\n  - test-tick: {}\n  - test-tock: {}\n", file="t.yaml")
    message = str(error.value)
    assert "contradict" in message and "'test-tick'" in message and "'test-tock'" in message
    assert "t.yaml: passes:" in message


def test_order_violation_names_both_passes_and_the_fix():
    _ordered_pass("test-late", after=("test-early",))
    _ordered_pass("test-early")
    load_recipe_text("passes:\n  - test-early: {}\n  - test-late: {}\n")
    with pytest.raises(RecipeError) as error:
        load_recipe_text("passes:\n  - test-late: {}\n  - test-early: {}\n", file="t.yaml")
    message = str(error.value)
    assert "t.yaml: passes[1]" in message and "'test-early' must run before 'test-late'" in message
    assert "('test-late' declares it)" in message and "move 'test-early' above 'test-late'" in message


def test_constraint_on_an_absent_pass_does_not_apply():
    _ordered_pass("test-lonely", before=("quantize-linear",), after=("layer-drop",))
    load_recipe_text("passes:\n  - test-lonely: {}\n")


def test_registration_rejects_an_unknown_analysis():
    with pytest.raises(TypeError, match="unknown analyses"):
        register_pass(type("NeedsMagic", (Pass,), {"name": "test-magic", "requires": ("magic",)}))
