"""share-layers: groups read one tensor set; storage drops, FLOPs do not; equal weights are exact."""

from __future__ import annotations

import copy

import onnx
import pytest
import torch

from compiler import cost_model
from compiler.errors import PassRefused
from compiler.frontend import example_inputs, trace
from compiler.graph_edit import remove_dead_code
from compiler.lowering import lower_to_onnx
from compiler.structure import analyze
from passes.share_layers import layer_weights
from tests.helpers import calibration_for, manager_for, run_pass


def test_sharing_layers_with_equal_weights_is_exact(tiny):
    model = copy.deepcopy(tiny.model)
    model.encoder.layer[1].load_state_dict(model.encoder.layer[0].state_dict())
    gm = trace(model, example_inputs(tiny.tokenizer), tiny.max_length)
    loaded = copy.copy(tiny)
    loaded.model = model
    state, (record,) = manager_for(loaded, "  - share-layers: {groups: [[0, 1]], strategy: mean}").run(gm)
    assert record.kind == "exact" and record.status == "applied"
    assert record.checks["max_abs_error"] <= 1e-4


def test_shared_layers_read_one_tensor_and_storage_drops_but_flops_do_not(tiny, tiny_gm):
    remove_dead_code(tiny_gm)
    before = cost_model.estimate(tiny_gm, batch=2, seq=16)
    result = run_pass("share-layers", {"groups": [[0, 1]]}, tiny_gm, tiny)
    layers = analyze(result.graph_module).layers
    assert layer_weights(layers[0]) == layer_weights(layers[1])
    after = cost_model.estimate(result.graph_module, batch=2, seq=16)
    assert after.flops == before.flops
    per_layer = sum(p.numel() for name, p in tiny.model.encoder.layer[1].named_parameters())
    assert before.parameters - after.parameters == per_layer
    assert "FLOPs" in result.details["note"]


def test_mean_strategy_averages_the_group(tiny, tiny_gm):
    q0, q1 = (tiny.model.encoder.layer[i].attention.self.query.weight.detach() for i in (0, 1))
    result = run_pass("share-layers", {"groups": [[0, 1]], "strategy": "mean"}, tiny_gm, tiny)
    shared = result.graph_module.get_parameter(analyze(result.graph_module).layers[1].attention.query.weight)
    assert torch.allclose(shared, (q0 + q1) / 2)


def test_onnx_file_holds_shared_weights_once(tiny, tiny_gm, tmp_path):
    plain = lower_to_onnx(copy.deepcopy(tiny_gm), example_inputs(tiny.tokenizer), tmp_path / "plain", quantize=None)
    gm = run_pass("share-layers", {"groups": [[0, 1]]}, tiny_gm, tiny).graph_module
    shared = lower_to_onnx(gm, example_inputs(tiny.tokenizer), tmp_path / "shared", quantize=None)
    assert shared.fusions == plain.fusions
    encoder = lambda path: sum(t.ByteSize() for t in onnx.load(path).graph.initializer if "embeddings" not in t.name)
    assert encoder(shared.model_path) < 0.6 * encoder(plain.model_path)


def test_layers_pruned_to_different_shapes_cannot_share(tiny, tiny_gm):
    gm = run_pass("prune-ffn", {"keep": [32, 16], "importance": "l1"}, tiny_gm, tiny).graph_module
    with pytest.raises(PassRefused, match="different shapes"):
        run_pass("share-layers", {"groups": [[0, 1]]}, gm, tiny)


def test_overlapping_groups_are_a_recipe_error():
    from passes.options import ShareLayersConfig

    with pytest.raises(ValueError, match="at most once"):
        ShareLayersConfig(groups=[[0, 1], [1, 2]])


@pytest.mark.minilm
def test_minilm_share_pairs_halves_encoder_storage(minilm, minilm_gm):
    remove_dead_code(minilm_gm)
    before = cost_model.estimate(minilm_gm, batch=1, seq=32)
    result = run_pass("share-layers", {"groups": [[0, 1], [2, 3], [4, 5]]}, minilm_gm, minilm,
                      calibration_for(minilm, samples=8, validation=8, max_length=32))
    after = cost_model.estimate(result.graph_module, batch=1, seq=32)
    per_layer = sum(p.numel() for p in minilm.model.encoder.layer[0].parameters())
    assert before.parameters - after.parameters == 3 * per_layer
    assert after.flops == before.flops
