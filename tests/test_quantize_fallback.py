"""quantize-linear's fallback: auto keeps in fp32 the fewest linears, costliest first, that the budget needs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from compiler.cli import main
from compiler.frontend import example_inputs, load_model, trace
from tests.conftest import make_tiny_bert, write_recipe
from tests.helpers import manager_for

# On this model int8 costs the pooled embedding about 2e-5 of cosine, nearly all of it in one linear (below):
# a budget between the two is one that full int8 misses and one fp32 linear keeps.
BUDGET = 0.99999
COSTLY = "encoder.layer.0.output.dense"


@pytest.fixture(scope="module")
def outlier_dir(tmp_path_factory) -> Path:
    """A tiny BERT whose first FFN has one huge activation, so a per-tensor uint8 quantization of the input of its
    down projection (encoder.layer.0.output.dense) rounds every other activation to zero."""
    from transformers import BertModel

    folder = make_tiny_bert(tmp_path_factory.mktemp("tiny-outlier"))
    model = BertModel.from_pretrained(folder)
    with torch.no_grad():
        model.encoder.layer[0].intermediate.dense.bias[0] = 2000.0
        model.encoder.layer[0].output.dense.weight.mul_(10.0)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def test_full_int8_misses_the_budget_on_the_outlier_model(outlier_dir):
    loaded = load_model(str(outlier_dir))
    manager = manager_for(loaded, "  - quantize-linear: {dtype: int8}", budget=BUDGET)
    gm = trace(loaded.model, example_inputs(loaded.tokenizer), max_length=loaded.max_length)
    with pytest.raises(Exception) as failed:
        manager.run(gm)
    assert "fidelity budget broken" in str(failed.value)


def test_fallback_auto_keeps_the_costliest_linear_in_fp32_and_the_compile_keeps_the_budget(outlier_dir, tmp_path):
    recipe = write_recipe(tmp_path, f"""
model: {outlier_dir}
calibration: {{texts: builtin, samples: 32, validation_samples: 16, max_length: 32, batch_size: 8}}
budget: {{metric: cosine, min: {BUDGET}}}
passes:
  - quantize-linear: {{dtype: int8, fallback: auto}}
""")
    out = tmp_path / "out"
    assert main(["compile", str(recipe), "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    fallback = report["passes"][0]["details"]["fallback"]
    assert fallback["fp32_linears"] == [COSTLY] and fallback["all_quantized"] < BUDGET <= fallback["with_fallback"]
    assert fallback["cost_of_each"][0][0] == COSTLY and len(fallback["cost_of_each"]) == report["passes"][0]["details"]["quantized_linears"] + 1
    assert report["final_check"]["passed"] and report["lowering"]["quantized"]
    assert any(f"exclude_modules '{COSTLY}'" in note and "kept 1 node" in note for note in report["lowering"]["notes"])
    assert f"kept 1 linears in fp32 to keep the budget (fallback: auto" in (out / "report.md").read_text()


def test_fallback_applies_to_int8_only(tmp_path, tiny_dir, capsys):
    recipe = write_recipe(tmp_path, f"model: {tiny_dir}\npasses:\n  - quantize-linear: {{dtype: fp16, fallback: auto}}\n")
    assert main(["validate", str(recipe)]) == 2
    assert "fallback applies to dtype int8 only" in capsys.readouterr().err
