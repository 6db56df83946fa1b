"""prune-heads: slices q/k/v rows and output columns; identity is exact; scores rank dead heads last."""

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
from passes.options import PruneHeadsConfig
from passes.prune_heads import choose_heads
from tests.helpers import calibration_for, manager_for, run_pass


def _batch(tokenizer):
    return dict(tokenizer(["pruning heads keeps the rest", "short text"], padding=True, return_tensors="pt"))


def test_prune_heads_keeping_all_heads_is_exact(tiny, tiny_gm):
    state, (record,) = manager_for(tiny, "  - prune-heads: {keep: 4, importance: gradient}").run(tiny_gm)
    assert record.kind == "exact" and record.status == "applied"
    assert record.checks["max_abs_error"] <= 1e-4
    assert [layer["heads"] for layer in analyze(state.gm).summary()["layers"]] == [4, 4]


def test_prune_heads_slices_rows_and_columns_per_layer(tiny, tiny_gm):
    flops_before = cost_model.estimate(tiny_gm, batch=2, seq=16).flops
    result = run_pass("prune-heads", {"keep": [3, 1], "importance": "l1"}, tiny_gm, tiny)
    gm = result.graph_module
    layers = analyze(gm).layers
    assert [layer.attention.num_heads for layer in layers] == [3, 1]
    a = layers[1].attention
    assert tuple(get_tensor(gm, a.query.weight).shape) == (8, 32)
    assert tuple(get_tensor(gm, a.value.bias).shape) == (8,)
    assert tuple(get_tensor(gm, a.output.weight).shape) == (32, 8)
    assert cost_model.estimate(gm, batch=2, seq=16).flops < flops_before
    assert [len(entry["scores"]) for entry in result.details["layers"]] == [4, 4]
    assert result.details["heads_after"] == 4 and result.modified


def test_pruned_graph_equals_masking_those_heads(tiny, tiny_gm):
    original = trace(tiny.model, example_inputs(tiny.tokenizer), tiny.max_length)
    result = run_pass("prune-heads", {"keep": 2, "importance": "l1", "compensate_bias": False}, tiny_gm, tiny)
    structure = analyze(original)
    removed = {structure.layers[e["layer"]].attention.core: e["removed"] for e in result.details["layers"]}

    def zero_removed(node, out, probe):
        mask = torch.ones(out.shape[1])
        mask[removed[node]] = 0.0
        return out * mask.view(1, -1, 1, 1)

    batch = _batch(tiny.tokenizer)
    expected = Probe(original, {core: zero_removed for core in removed}).hidden(batch)
    assert torch.allclose(hidden_states(result.graph_module)(batch), expected, atol=1e-5)


def test_head_with_zero_output_weights_scores_lowest_by_gradient(tiny, tiny_gm):
    out = analyze(tiny_gm).layers[0].attention.output.weight
    weight = get_tensor(tiny_gm, out).detach().clone()
    weight[:, 8:16] = 0.0  # head 1 of layer 0 contributes nothing
    set_parameter(tiny_gm, out, weight)
    result = run_pass("prune-heads", {"keep": 3, "importance": "gradient"}, tiny_gm, tiny)
    scores = result.details["layers"][0]["scores"]
    assert abs(scores[1]) < 1e-9 and min(scores) == scores[1]
    assert result.details["layers"][0]["removed"] == [1]


def test_head_with_uniform_attention_scores_lowest_by_entropy(tiny, tiny_gm):
    query = analyze(tiny_gm).layers[1].attention.query
    for target in (query.weight, query.bias):
        tensor = get_tensor(tiny_gm, target).detach().clone()
        tensor[16:24] = 0.0  # head 2 of layer 1: q = 0, so every key gets the same score
        set_parameter(tiny_gm, target, tensor)
    result = run_pass("prune-heads", {"keep": 3, "importance": "entropy"}, tiny_gm, tiny)
    assert result.details["layers"][1]["removed"] == [2]
    assert result.details["layers"][1]["scores"][2] == pytest.approx(0.0, abs=1e-5)


def test_keep_fraction_ranks_globally_with_a_floor():
    scores = [torch.tensor([9.0, 8.0, 7.0, 6.0]), torch.tensor([1.0, 2.0, 0.5, 0.1])]
    cfg = PruneHeadsConfig(keep_fraction=0.5, min_per_layer=1)
    assert choose_heads(scores, cfg) == [[0, 1, 2], [1]]
    cfg = PruneHeadsConfig(keep_fraction=0.5, min_per_layer=2)
    assert choose_heads(scores, cfg) == [[0, 1], [0, 1]]


def test_keeping_more_heads_than_exist_is_refused(tiny, tiny_gm):
    with pytest.raises(PassRefused, match="layer 0, which has 4"):
        run_pass("prune-heads", {"keep": 5, "importance": "l1"}, tiny_gm, tiny)


def test_pruning_that_breaks_the_budget_is_rolled_back(tiny, tiny_gm):
    # A random tiny BERT's pooled output barely moves (cosine ~0.99996), so only a budget of 1 breaks.
    passes = "  - prune-heads: {keep: 1, importance: l1, on_fail: skip}"
    state, (record,) = manager_for(tiny, passes, budget=1.0).run(tiny_gm)
    assert record.status == "skipped" and "fidelity budget broken" in record.reason
    assert [layer.attention.num_heads for layer in analyze(state.gm).layers] == [4, 4]


def test_lowering_keeps_attention_fusions_with_different_head_counts(tiny, tiny_gm, tmp_path):
    gm = run_pass("prune-heads", {"keep": [3, 2], "importance": "l1"}, tiny_gm, tiny).graph_module
    lowered = lower_to_onnx(gm, example_inputs(tiny.tokenizer), tmp_path, quantize=None)
    assert lowered.fusions.get("Attention") == 2 and lowered.op_counts.get("Sum") == 4
    assert lowered.fp32_max_abs_error < 1e-3


@pytest.mark.minilm
def test_minilm_keep_six_heads_by_gradient(minilm, minilm_gm):
    calibration = calibration_for(minilm, samples=8, validation=8, max_length=32)
    result = run_pass("prune-heads", {"keep": 6, "importance": "gradient", "calibration_batches": 1},
                      minilm_gm, minilm, calibration)
    layers = analyze(result.graph_module).layers
    assert [layer.attention.num_heads for layer in layers] == [6] * 6
    assert tuple(get_tensor(result.graph_module, layers[0].attention.key.weight).shape) == (192, 384)
    batch = _batch(minilm.tokenizer)
    pooled = [hidden_states(m)(batch).mean(1) for m in (minilm.model, result.graph_module)]
    assert torch.nn.functional.cosine_similarity(*pooled).min() > 0.5


def test_reconstruct_refits_the_output_projection_on_kept_heads(tiny, tiny_gm):
    result = run_pass("prune-heads", {"keep": 2, "importance": "l1", "reconstruct": True}, tiny_gm, tiny)
    gm = result.graph_module
    assert result.details["reconstructed"]
    output = analyze(gm).layers[0].attention.output
    assert tuple(get_tensor(gm, output.weight).shape) == (32, 16)
