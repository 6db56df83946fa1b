"""The command line end to end: exit codes, output folders, nothing half-written on bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from compiler.cli import main
from tests.conftest import write_recipe

ROOT = Path(__file__).parent.parent
RECIPES = sorted((ROOT / "recipes").rglob("*.yaml"))  # the recipes a user starts from
EXPERIMENT_RECIPES = sorted((ROOT / "bench" / "experiments" / "recipes").glob("*.yaml"))  # variants bench scripts build
# Recipes of a model a bench command makes first (bench/make_classifier.py): their model and texts exist only after it.
BENCH_RECIPES = sorted((ROOT / "bench" / "recipes").glob("*.yaml"))


def _tiny_recipe(tmp_path, tiny_dir, passes: str, budget: float = 0.5) -> Path:
    return write_recipe(tmp_path, f"""
version: 1
model: {tiny_dir}
calibration: {{texts: builtin, samples: 16, validation_samples: 8, max_length: 32, batch_size: 8}}
budget: {{metric: cosine, min: {budget}}}
passes:
{passes}
""")


def test_compile_writes_a_deployable_folder(tmp_path, tiny_dir, tiny):
    recipe = _tiny_recipe(tmp_path, tiny_dir, "  - layer-drop: {layers: [1]}\n  - quantize-linear: {}")
    out = tmp_path / "out"
    assert main(["compile", str(recipe), "--out", str(out)]) == 0
    for name in ("model.onnx", "config.json", "tokenizer.json", "vocab.txt", "report.json", "report.md"):
        assert (out / name).is_file(), name
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "ok" and report["exit_code"] == 0 and report["schema_version"] == 1
    assert [p["status"] for p in report["passes"]] == ["applied", "applied"]
    assert report["final_check"]["passed"] and report["lowering"]["quantized"]
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 1
    assert report["recipe"]["passes"][0] == {"layer-drop": {"layers": [1], "keep_every": None, "top": None, "count": None, "on_fail": "stop"}}
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["input_ids", "attention_mask", "token_type_ids"]
    assert sess.get_outputs()[0].name == "last_hidden_state"
    enc = tiny.tokenizer(["a drop-in replacement"], return_tensors="np")
    hidden = sess.run(None, {k: enc[k].astype(np.int64) for k in ("input_ids", "attention_mask", "token_type_ids")})[0]
    assert hidden.shape == (1, enc["input_ids"].shape[1], 32)
    assert not list(tmp_path.glob(".out.partial-*"))


def test_misspelled_pass_exits_2_and_writes_nothing(tmp_path, tiny_dir, capsys):
    recipe = _tiny_recipe(tmp_path, tiny_dir, "  - layer-drop: {layers: [1]}\n  - quantise-linear: {}")
    out = tmp_path / "out"
    assert main(["validate", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert str(recipe) in err and "passes[1]" in err and "Did you mean 'quantize-linear'?" in err
    assert main(["compile", str(recipe), "--out", str(out)]) == 2
    assert not out.exists() and list(tmp_path.iterdir()) == [recipe]


def test_broken_budget_exits_1_with_a_report_and_no_model(tmp_path, tiny_dir, capsys):
    recipe = _tiny_recipe(tmp_path, tiny_dir, "  - layer-drop: {layers: [1]}", budget=0.9999)
    out = tmp_path / "out"
    assert main(["compile", str(recipe), "--out", str(out)]) == 1
    assert "passes[0]" in capsys.readouterr().err
    assert not (out / "model.onnx").exists()
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "check_failed" and report["exit_code"] == 1
    assert report["passes"][0]["status"] == "rolled_back"
    assert "fidelity budget broken" in report["passes"][0]["reason"]


def test_refused_pass_config_is_bad_input(tmp_path, tiny_dir, capsys):
    recipe = _tiny_recipe(tmp_path, tiny_dir, "  - layer-drop: {layers: [7]}")
    assert main(["compile", str(recipe), "--out", str(tmp_path / "out")]) == 2
    assert "layer-drop" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_missing_model_is_bad_input(tmp_path, capsys):
    recipe = write_recipe(tmp_path, f"model: {tmp_path / 'nope'}\n")
    assert main(["compile", str(recipe), "--out", str(tmp_path / "out")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_schema_command_prints_json_schema(capsys):
    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert schema["title"] == "bertpress recipe"


@pytest.mark.parametrize("recipe", RECIPES + EXPERIMENT_RECIPES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_recipe_validates_and_the_slow_ones_name_the_bench_that_compiles_them(recipe, capsys):
    assert main(["validate", str(recipe)]) == 0
    text = recipe.read_text()
    if "compiled-by: bench" in text:
        bench = text.split("compiled-by: ", 1)[1].split()[0]
        assert (ROOT / bench).is_file(), bench


@pytest.mark.parametrize("recipe", BENCH_RECIPES, ids=lambda p: str(p.relative_to(ROOT)))
def test_bench_recipes_parse_and_name_the_bench_that_compiles_them(recipe):
    from compiler.recipe import load_recipe

    assert load_recipe(recipe).steps
    bench = recipe.read_text().split("compiled-by: ", 1)[1].split()[0]
    assert (ROOT / bench).is_file(), bench


def test_recipes_folder_holds_at_most_eight_starting_points_each_with_a_short_header():
    assert 0 < len(RECIPES) <= 8, [p.name for p in RECIPES]
    for recipe in RECIPES:
        lines = recipe.read_text().splitlines()
        header = next(i for i, line in enumerate(lines) if not line.startswith("#"))
        assert 0 < header <= 5, f"{recipe.name}: {header} header comment lines (at most 5: what it is for, its headline)"


@pytest.mark.minilm
@pytest.mark.parametrize("recipe", [r for r in RECIPES if "compiled-by: bench" not in r.read_text()], ids=lambda p: p.name)
def test_every_fast_recipe_compiles(recipe, tmp_path):
    out = tmp_path / recipe.stem
    assert main(["compile", str(recipe), "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["final_check"]["passed"]
