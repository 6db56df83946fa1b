"""quantize-linear: simulated int8/fp16 in the graph, lowering hints, exclusions."""

from __future__ import annotations

import pytest
import torch

from compiler.simulation import is_simulated, strip_simulation
from compiler.structure import analyze
from compiler.validation import compare, hidden_states, run_batches
from compiler.simulation import fake_quant_activation_uint8, fake_quant_weight_int8
from tests.helpers import calibration_for, run_pass


def _simulated(gm):
    return [n for n in gm.graph.nodes if is_simulated(n)]


def test_int8_simulates_every_linear_but_embeddings_by_default(tiny, tiny_gm):
    linears = len(analyze(tiny_gm).linears)
    result = run_pass("quantize-linear", {}, tiny_gm, tiny)
    assert result.modified
    assert len(_simulated(result.graph_module)) == 2 * linears  # weight + activation per linear
    hints = result.lowering["quantize"]
    assert hints["dtype"] == "int8" and hints["exclude_embeddings"] is True and hints["exclude_modules"] == []
    assert len(result.lowering["int8_weights"]) == linears
    assert analyze(result.graph_module).layers[0].attention.num_heads == 4  # still analyzable


def test_excluded_parts_stay_full_precision_and_are_named_for_lowering(tiny, tiny_gm):
    result = run_pass("quantize-linear", {"exclude": ["embeddings", "ffn", "pooler", 0]}, tiny_gm, tiny)
    kept = result.lowering["quantize"]["exclude_modules"]
    assert "pooler.dense" in kept and "encoder.layer.1.intermediate.dense" in kept
    assert "encoder.layer.0.attention.self.query" in kept
    assert "encoder.layer.1.attention.self.query" not in kept
    assert result.details["quantized_linears"] == 4  # layer 1's q, k, v, output


def test_strip_simulation_restores_the_exact_graph(tiny, tiny_gm):
    cal = calibration_for(tiny)
    before = run_batches(hidden_states(tiny_gm), cal.heldout_batches)
    result = run_pass("quantize-linear", {}, tiny_gm, tiny)
    simulated = run_batches(hidden_states(result.graph_module), cal.heldout_batches)
    assert compare(before, simulated, cal.heldout_batches).max_abs_error > 0
    assert strip_simulation(result.graph_module) > 0
    after = run_batches(hidden_states(result.graph_module), cal.heldout_batches)
    assert compare(before, after, cal.heldout_batches).max_abs_error == 0


def test_fake_quant_matches_int8_grid():
    w = torch.randn(8, 16)
    q = fake_quant_weight_int8(w)
    scale = w.abs().amax(1, keepdim=True) / 127
    assert torch.allclose(torch.round(q / scale), q / scale, atol=1e-4)
    assert (q - w).abs().max() <= scale.max() / 2 + 1e-6
    x = torch.randn(4, 16) * 3
    assert len(torch.unique(fake_quant_activation_uint8(x))) <= 256


def test_layer_index_past_the_end_in_exclude_is_refused(tiny, tiny_gm):
    from compiler.errors import PassRefused

    with pytest.raises(PassRefused, match="layer 7"):
        run_pass("quantize-linear", {"exclude": [7]}, tiny_gm, tiny)


@pytest.mark.minilm
def test_minilm_int8_simulation_keeps_cosine(minilm, minilm_gm):
    cal = calibration_for(minilm, validation=16, max_length=64)
    reference = run_batches(hidden_states(minilm.model), cal.heldout_batches)
    result = run_pass("quantize-linear", {}, minilm_gm, minilm, calibration=cal)
    got = compare(reference, run_batches(hidden_states(result.graph_module), cal.heldout_batches), cal.heldout_batches)
    assert got.cosine > 0.98


def test_rounded_weights_are_reused_until_the_weight_changes():
    w = torch.randn(8, 16)
    first = fake_quant_weight_int8(w)
    assert fake_quant_weight_int8(w) is first  # validation batches reuse one rounding
    w.mul_(2.0)  # an in-place update (a distill step) moves the version counter
    second = fake_quant_weight_int8(w)
    assert second is not first and torch.allclose(second, 2.0 * first)
    assert torch.equal(fake_quant_weight_int8(w.clone()), second)  # another tensor: computed, same values
