"""The example pass on a tiny random BERT, judged by bertpress's own pass manager."""

from __future__ import annotations

import shutil

import pytest
import torch

from compiler.calibration import prepare_calibration
from compiler.frontend import example_inputs, load_model, resolve_model_path, trace
from compiler.pass_manager import PassManager
from compiler.recipe import load_recipe_text
from compiler.graph_edit import get_tensor
from compiler.structure import analyze

import bertpress_center_ln  # noqa: F401  (registers the pass)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import BertConfig, BertModel

    folder = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                        max_position_embeddings=128)
    model = BertModel(config).eval()
    with torch.no_grad():  # random init has near-zero biases and column means; make centering matter
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05 + 0.02)
    model.save_pretrained(folder, safe_serialization=True)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copyfile(resolve_model_path("builtin:minilm-l6") / name, folder / name)
    return load_model(str(folder))


def _run(tiny, passes: str):
    recipe = load_recipe_text(f"model: {tiny.path}\npasses:\n{passes}\nbudget: {{min: 0.5}}\n")
    calibration = prepare_calibration(tiny.tokenizer, source="builtin", samples=16, validation_samples=8, max_length=32,
                                      batch_size=8, seed=0, model_max_length=tiny.max_length)
    gm = trace(tiny.model, example_inputs(tiny.tokenizer), max_length=tiny.max_length)
    manager = PassManager(recipe, calibration, tiny.model, tiny.tokenizer, tiny.config)
    return manager.run(gm)


def test_centering_is_exact_and_zeroes_the_column_means(tiny):
    state, records = _run(tiny, "  - center-ln-inputs: {}")
    record = records[0]
    assert record.status == "applied" and record.kind == "exact"
    assert record.checks["max_abs_error"] <= record.checks["tolerance"] == 1e-4
    structure = analyze(state.gm)
    assert len(record.details["centered"]) == 4 and record.details["left_alone"] == {}
    for layer in structure.layers:
        for linear in (layer.attention.output, layer.ffn.down):
            assert get_tensor(state.gm, linear.weight).mean(dim=0).abs().max() < 1e-6
            assert abs(float(get_tensor(state.gm, linear.bias).mean())) < 1e-6
    # It changed real weights: the column means it removed were not already zero.
    before = tiny.model.encoder.layer[0].output.dense.weight.mean(dim=0).abs().max()
    assert before > 1e-3


def test_only_attention_sites_when_asked(tiny):
    state, records = _run(tiny, "  - center-ln-inputs: {sites: attention}")
    structure = analyze(state.gm)
    assert records[0].details["centered"] == [layer.attention.output.module for layer in structure.layers]


def test_declares_it_runs_before_quantization(tiny):
    from compiler.errors import RecipeError

    with pytest.raises(RecipeError) as error:
        load_recipe_text("passes:\n  - quantize-linear: {}\n  - center-ln-inputs: {}\n")
    assert "center-ln-inputs" in str(error.value) and "quantize-linear" in str(error.value)
