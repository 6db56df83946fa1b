"""low-rank: truncated-SVD factors; full rank is exact; ranks past break-even are refused unless forced."""

from __future__ import annotations

import pytest
import torch

from compiler import cost_model
from compiler.errors import PassRefused
from compiler.frontend import example_inputs
from compiler.graph_edit import get_tensor, remove_dead_code
from compiler.lowering import lower_to_onnx
from compiler.structure import analyze
from compiler.validation import hidden_states
from passes.low_rank import factorize
from passes.options import LowRankConfig
from tests.helpers import calibration_for, manager_for, run_pass


def test_low_rank_at_full_rank_is_exact_when_forced(tiny, tiny_gm):
    passes = "  - low-rank: {rank_fraction: 1.0, target: ffn, force: true, reason: identity check}"
    state, (record,) = manager_for(tiny, passes).run(tiny_gm)
    assert record.kind == "exact" and record.status == "applied"
    assert record.checks["max_abs_error"] <= 1e-4
    assert all(lin.factor is not None for layer in analyze(state.gm).layers for lin in (layer.ffn.up, layer.ffn.down))


def test_low_rank_splits_each_ffn_linear_into_two_factors(tiny, tiny_gm):
    remove_dead_code(tiny_gm)  # the pass drops unused buffers too; count only the factorization
    before = cost_model.estimate(tiny_gm, batch=2, seq=16)
    result = run_pass("low-rank", {"rank": 8, "target": "ffn"}, tiny_gm, tiny)
    gm = result.graph_module
    up = analyze(gm).layers[0].ffn.up
    assert tuple(get_tensor(gm, up.factor).shape) == (8, 32) and tuple(get_tensor(gm, up.weight).shape) == (64, 8)
    after = cost_model.estimate(gm, batch=2, seq=16)
    assert after.parameters == before.parameters - 4 * (64 * 32 - 8 * (64 + 32))
    assert after.flops < before.flops
    assert [entry["rank"] for entry in result.details["factorized"]] == [8] * 4


def test_energy_picks_the_smallest_rank_keeping_that_share():
    weight = torch.diag(torch.tensor([4.0, 2.0, 1.0, 0.5]))  # squared: 16, 4, 1, 0.25
    rank, a, b, energy = factorize(weight, LowRankConfig(energy=0.94))
    assert rank == 2 and energy == pytest.approx(20 / 21.25)
    assert torch.allclose(b @ a, torch.diag(torch.tensor([4.0, 2.0, 0.0, 0.0])), atol=1e-5)


def test_rank_above_break_even_is_refused_with_the_reason(tiny, tiny_gm):
    with pytest.raises(PassRefused, match="break-even rank 21"):
        run_pass("low-rank", {"rank": 22, "target": "ffn"}, tiny_gm, tiny)


def test_word_table_rank_past_its_width_is_refused_naming_the_recipe_rank_and_the_bound(tiny, tiny_gm):
    # tiny's word table is 30522 x 32: break-even 31 (31 * 30554 < 30522 * 32 <= 32 * 30554).
    with pytest.raises(PassRefused) as refused:
        run_pass("low-rank", {"rank": 9999, "target": "embeddings"}, tiny_gm, tiny)
    message = str(refused.value)
    assert "rank 32 (the recipe's rank 9999, capped at the matrix's 32) of the 30522x32 word table" in message
    assert "break-even rank 31" in message and "use a rank below 32" in message


def test_force_needs_a_reason():
    with pytest.raises(ValueError, match="needs a reason"):
        LowRankConfig(rank=4, force=True)


def test_unknown_weight_in_target_list_is_refused(tiny, tiny_gm):
    with pytest.raises(PassRefused, match="not a linear weight"):
        run_pass("low-rank", {"rank": 4, "target": ["encoder.layer.9.output.dense.weight"]}, tiny_gm, tiny)


def test_embedding_factorization_albert_style(tiny, tiny_gm):
    result = run_pass("low-rank", {"rank": 16, "target": "embeddings"}, tiny_gm, tiny)
    gm = result.graph_module
    table = get_tensor(gm, analyze(gm).embeddings.word_weight)
    assert tuple(table.shape) == (30522, 16)
    assert result.details["weights_after"] == 16 * (30522 + 32)


def test_lossy_rank_breaking_the_budget_is_rolled_back(tiny, tiny_gm):
    state, (record,) = manager_for(tiny, "  - low-rank: {rank: 1, target: all, on_fail: skip}", budget=1.0).run(tiny_gm)
    assert record.status == "skipped" and "fidelity budget broken" in record.reason
    assert analyze(state.gm).layers[0].ffn.up.factor is None


@pytest.mark.minilm
def test_minilm_low_rank_ffn_lowers_with_fusions(minilm, minilm_gm, tmp_path):
    result = run_pass("low-rank", {"rank_fraction": 0.5, "target": "ffn"}, minilm_gm, minilm,
                      calibration_for(minilm, samples=8, validation=8, max_length=32))
    assert {entry["rank"] for entry in result.details["factorized"]} == {192}
    lowered = lower_to_onnx(result.graph_module, example_inputs(minilm.tokenizer), tmp_path, quantize=None)
    assert lowered.fusions.get("Attention") == 6 and lowered.op_counts.get("Sum") == 12
    assert lowered.fp32_max_abs_error < 1e-3
    batch = dict(minilm.tokenizer(["a sentence to embed"], return_tensors="pt"))
    pooled = [hidden_states(m)(batch).mean(1) for m in (minilm.model, result.graph_module)]
    assert torch.nn.functional.cosine_similarity(*pooled).item() > 0.3


def test_pruning_a_factorized_ffn_is_refused(tiny, tiny_gm):
    gm = run_pass("low-rank", {"rank": 8, "target": "ffn"}, tiny_gm, tiny).graph_module
    with pytest.raises(PassRefused, match="run prune-ffn before low-rank"):
        run_pass("prune-ffn", {"keep": 16}, gm, tiny)
