"""layer-drop: removes blocks and their weights; matches the HF model with those blocks deleted."""

from __future__ import annotations

import copy

import pytest
import torch

from compiler.errors import PassRefused
from compiler.structure import analyze
from compiler.validation import hidden_states
from tests.helpers import run_pass


def _without_layers(model, drop):
    pruned = copy.deepcopy(model)
    pruned.encoder.layer = torch.nn.ModuleList(l for i, l in enumerate(pruned.encoder.layer) if i not in drop)
    pruned.config.num_hidden_layers = len(pruned.encoder.layer)
    return pruned


def _batch(tokenizer):
    return dict(tokenizer(["layer drop keeps the rest exact", "short"], padding=True, return_tensors="pt"))


def test_dropping_a_layer_equals_deleting_it_from_the_hf_model(tiny, tiny_gm):
    params_before = sum(p.numel() for p in tiny_gm.parameters())
    result = run_pass("layer-drop", {"layers": [0]}, tiny_gm, tiny)
    assert result.modified and result.details["dropped"] == [0] and result.details["kept"] == [1]
    assert len(analyze(result.graph_module).layers) == 1
    assert sum(p.numel() for p in result.graph_module.parameters()) < params_before
    assert not any("encoder.layer.0." in name for name, _ in result.graph_module.named_parameters())
    batch = _batch(tiny.tokenizer)
    expected = hidden_states(_without_layers(tiny.model, {0}))(batch)
    assert torch.allclose(hidden_states(result.graph_module)(batch), expected, atol=1e-5)


def test_top_and_keep_every_strategies_choose_the_documented_layers():
    from passes.layer_drop import LayerDrop

    assert LayerDrop(LayerDrop.Config(top=2)).dropped(6) == [4, 5]
    assert LayerDrop(LayerDrop.Config(keep_every=2)).dropped(6) == [0, 2, 4]
    assert LayerDrop(LayerDrop.Config(keep_every=3)).dropped(6) == [0, 1, 3, 4]


def test_layer_index_past_the_end_is_refused(tiny, tiny_gm):
    with pytest.raises(PassRefused, match="has 2 blocks"):
        run_pass("layer-drop", {"layers": [2]}, tiny_gm, tiny)


def test_dropping_every_layer_is_refused(tiny, tiny_gm):
    with pytest.raises(PassRefused, match="at least one must stay"):
        run_pass("layer-drop", {"top": 5}, tiny_gm, tiny)


@pytest.mark.minilm
def test_minilm_drop_two_layers_matches_hf_without_them(minilm, minilm_gm):
    result = run_pass("layer-drop", {"layers": [1, 4]}, minilm_gm, minilm)
    assert [layer.index for layer in analyze(result.graph_module).layers] == [0, 1, 2, 3]
    batch = _batch(minilm.tokenizer)
    expected = hidden_states(_without_layers(minilm.model, {1, 4}))(batch)
    assert torch.allclose(hidden_states(result.graph_module)(batch), expected, atol=1e-4)


def test_count_drops_the_block_whose_removal_costs_least_on_calibration_text(tiny, tiny_gm):
    result = run_pass("layer-drop", {"count": 1}, tiny_gm, tiny)
    (step,) = result.details["importance"]
    scores = {int(k): v for k, v in step["candidates"].items()}
    assert result.details["dropped"] == [max(scores, key=scores.get)]
    assert len(analyze(result.graph_module).layers) == 1
