"""Recipe parsing: typed configs, errors that name file, field and fix, the JSON Schema."""

from __future__ import annotations

import json

import pytest

from compiler.errors import RecipeError
from compiler.recipe import load_recipe, load_recipe_text, recipe_json_schema
from tests.conftest import write_recipe


def test_defaults_fill_in_and_normalized_recipe_round_trips(tmp_path):
    recipe = load_recipe(write_recipe(tmp_path, "version: 1\npasses:\n  - quantize-linear: {}\n"))
    normalized = recipe.normalized()
    assert normalized["passes"] == [{"quantize-linear": {"dtype": "int8", "exclude": ["embeddings"], "on_fail": "stop"}}]
    assert normalized["budget"] == {"metric": "cosine", "min": 0.98}
    again = load_recipe_text(json.dumps(normalized), file="normalized.json")
    assert again.digest() == recipe.digest()


def test_misspelled_pass_names_file_path_valid_names_and_suggestion(tmp_path):
    path = write_recipe(tmp_path, "version: 1\npasses:\n  - layer-drop: {layers: [5]}\n  - quantise-linear: {dtype: int8}\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    text = info.value.render()
    assert str(path) in text and "passes[1]" in text
    assert "Did you mean 'quantize-linear'?" in text
    assert "layer-drop" in text and "quantize-linear" in text


def test_unknown_field_in_pass_config_suggests_the_close_one(tmp_path):
    path = write_recipe(tmp_path, "passes:\n  - layer-drop: {layer: [5]}\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert "passes[0].layer-drop" in info.value.render()
    assert "Did you mean 'layers'?" in info.value.render()


def test_unknown_top_level_field_suggests(tmp_path):
    with pytest.raises(RecipeError, match="Did you mean 'budget'"):
        load_recipe(write_recipe(tmp_path, "budgett: {min: 0.9}\n"))


def test_malformed_yaml_reports_line_and_column(tmp_path):
    with pytest.raises(RecipeError, match=r"line 3, column \d+"):
        load_recipe(write_recipe(tmp_path, "version: 1\npasses:\n  - layer-drop: {layers: [5]]}\n"))


@pytest.mark.parametrize("text, field", [
    ("budget: {min: 1.5}\n", "budget.min"),
    ("calibration: {samples: -3}\n", "calibration.samples"),
    ("passes:\n  - layer-drop: {layers: [-1]}\n", "passes[0].layer-drop"),
    ("passes:\n  - layer-drop: {layers: []}\n", "passes[0].layer-drop.layers"),
    ("passes:\n  - layer-drop: {layers: [1], top: 2}\n", "passes[0].layer-drop"),
    ("passes:\n  - quantize-linear: {dtype: int3}\n", "passes[0].quantize-linear.dtype"),
    ("passes:\n  - quantize-linear: {exclude: [embedings]}\n", "passes[0].quantize-linear.exclude"),
    ("version: 2\n", "version"),
])
def test_values_out_of_range_name_their_field(tmp_path, text, field):
    path = write_recipe(tmp_path, text)
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert f"{path}: {field}" in info.value.render()
    assert info.value.exit_code == 2


def test_pass_entry_must_be_a_one_key_mapping(tmp_path):
    with pytest.raises(RecipeError, match=r"passes\[0\].*one-key mapping"):
        load_recipe(write_recipe(tmp_path, "passes:\n  - {layer-drop: {top: 1}, quantize-linear: {}}\n"))


def test_missing_and_empty_recipe_files_are_clear(tmp_path):
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")
    with pytest.raises(RecipeError, match="is empty"):
        load_recipe(write_recipe(tmp_path, ""))


def test_yaml_tags_that_construct_objects_are_refused(tmp_path):
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(write_recipe(tmp_path, "model: !!python/object/apply:os.system ['true']\n"))


def test_schema_lists_every_registered_pass_with_its_typed_config():
    schema = recipe_json_schema()
    text = json.dumps(schema)
    assert '"layer-drop"' in text and '"quantize-linear"' in text
    assert schema["properties"]["passes"]["type"] == "array"
