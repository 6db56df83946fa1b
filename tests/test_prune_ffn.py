"""prune-ffn: slices up rows and down columns; identity is exact; dead neurons go first."""

from __future__ import annotations

import pytest
import torch

from compiler import cost_model
from compiler.errors import PassRefused
from compiler.frontend import example_inputs, trace
from compiler.graph_edit import get_tensor, set_parameter
from compiler.importance import Probe
from compiler.lowering import lower_to_onnx
from compiler.structure import analyze
from compiler.validation import hidden_states
from tests.helpers import calibration_for, manager_for, run_pass


def _batch(tokenizer):
    return dict(tokenizer(["pruning neurons keeps the rest", "short text"], padding=True, return_tensors="pt"))


def test_prune_ffn_keeping_all_neurons_is_exact(tiny, tiny_gm):
    state, (record,) = manager_for(tiny, "  - prune-ffn: {keep_fraction: 1.0}").run(tiny_gm)
    assert record.kind == "exact" and record.status == "applied"
    assert record.checks["max_abs_error"] <= 1e-4


def test_prune_ffn_slices_up_rows_and_down_columns(tiny, tiny_gm):
    flops_before = cost_model.estimate(tiny_gm, batch=2, seq=16).flops
    result = run_pass("prune-ffn", {"keep": [40, 16], "importance": "l1"}, tiny_gm, tiny)
    gm = result.graph_module
    layers = analyze(gm).layers
    assert [layer.ffn.intermediate for layer in layers] == [40, 16]
    assert tuple(get_tensor(gm, layers[1].ffn.up.weight).shape) == (16, 32)
    assert tuple(get_tensor(gm, layers[1].ffn.up.bias).shape) == (16,)
    assert tuple(get_tensor(gm, layers[1].ffn.down.weight).shape) == (32, 16)
    assert cost_model.estimate(gm, batch=2, seq=16).flops < flops_before
    assert result.details["neurons_after"] == 56


def test_pruned_graph_equals_zeroing_those_neurons(tiny, tiny_gm):
    original = trace(tiny.model, example_inputs(tiny.tokenizer), tiny.max_length)
    up_before = [get_tensor(original, layer.ffn.up.weight).detach() for layer in analyze(original).layers]
    result = run_pass("prune-ffn", {"keep": 48, "importance": "l1", "compensate_bias": False}, tiny_gm, tiny)
    acts = {}
    for layer, before in zip(analyze(original).layers, up_before):
        after = get_tensor(result.graph_module, analyze(result.graph_module).layers[layer.index].ffn.up.weight)
        kept = [int(torch.nonzero((before == row).all(dim=1))[0]) for row in after]
        mask = torch.zeros(before.shape[0])
        mask[kept] = 1.0
        acts[layer.ffn.act] = mask
    batch = _batch(tiny.tokenizer)
    expected = Probe(original, {act: (lambda node, out, probe: out * acts[node]) for act in acts}).hidden(batch)
    assert torch.allclose(hidden_states(result.graph_module)(batch), expected, atol=1e-5)


def test_dead_neurons_are_removed_first_by_activation(tiny, tiny_gm):
    down = analyze(tiny_gm).layers[0].ffn.down.weight
    weight = get_tensor(tiny_gm, down).detach().clone()
    weight[:, :10] = 0.0  # neurons 0-9 of layer 0 feed nothing forward
    set_parameter(tiny_gm, down, weight)
    result = run_pass("prune-ffn", {"keep": 54, "importance": "activation"}, tiny_gm, tiny)
    down_after = get_tensor(result.graph_module, analyze(result.graph_module).layers[0].ffn.down.weight)
    assert bool((down_after.abs().sum(dim=0) > 0).all())  # every kept neuron has a live down column


def test_bias_compensation_keeps_the_output_closer(tiny):
    calibration = calibration_for(tiny)
    batch = calibration.heldout_batches[0]
    reference = hidden_states(tiny.model)(batch)
    errors = {}
    for compensate in (False, True):
        gm = trace(tiny.model, example_inputs(tiny.tokenizer), tiny.max_length)
        run_pass("prune-ffn", {"keep": 16, "importance": "activation", "compensate_bias": compensate}, gm, tiny, calibration)
        errors[compensate] = float((hidden_states(gm)(batch) - reference).pow(2).mean())
    assert errors[True] < errors[False]


def test_keeping_more_neurons_than_exist_is_refused(tiny, tiny_gm):
    with pytest.raises(PassRefused, match="65 neurons in layer 0, which has 64"):
        run_pass("prune-ffn", {"keep": 65}, tiny_gm, tiny)


def test_pruning_that_breaks_the_budget_is_rolled_back(tiny, tiny_gm):
    passes = "  - prune-ffn: {keep: 1, importance: l1, on_fail: skip}"
    state, (record,) = manager_for(tiny, passes, budget=1.0).run(tiny_gm)
    assert record.status == "skipped" and "fidelity budget broken" in record.reason
    assert [layer.ffn.intermediate for layer in analyze(state.gm).layers] == [64, 64]


@pytest.mark.minilm
def test_minilm_keep_1024_neurons_lowers_with_fusions(minilm, minilm_gm, tmp_path):
    calibration = calibration_for(minilm, samples=8, validation=8, max_length=32)
    result = run_pass("prune-ffn", {"keep": 1024, "calibration_batches": 1}, minilm_gm, minilm, calibration)
    layers = analyze(result.graph_module).layers
    assert [layer.ffn.intermediate for layer in layers] == [1024] * 6
    lowered = lower_to_onnx(result.graph_module, example_inputs(minilm.tokenizer), tmp_path, quantize=None)
    assert lowered.fusions.get("Attention") == 6 and lowered.fusions.get("BiasGelu") == 6
    assert lowered.fp32_max_abs_error < 1e-3


def test_reconstruct_refits_the_down_projection_closer_on_calibration_text(tiny):
    calibration = calibration_for(tiny)
    batch = calibration.batches[0]
    reference = hidden_states(tiny.model)(batch)
    errors = {}
    for reconstruct in (False, True):
        gm = trace(tiny.model, example_inputs(tiny.tokenizer), tiny.max_length)
        result = run_pass("prune-ffn", {"keep": 16, "importance": "l1", "reconstruct": reconstruct,
                                        "compensate_bias": False}, gm, tiny, calibration)
        assert result.details["reconstructed"] is reconstruct
        assert tuple(get_tensor(gm, analyze(gm).layers[0].ffn.down.weight).shape) == (32, 16)
        errors[reconstruct] = float((hidden_states(gm)(batch) - reference).pow(2).mean())
    assert errors[True] < errors[False]
