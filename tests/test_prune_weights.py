"""prune-weights: magnitude sparsity; sparse initializers shrink the file; FLOPs stay."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from compiler import cost_model
from compiler.frontend import example_inputs
from compiler.graph_edit import get_tensor
from compiler.lowering import lower_to_onnx
from compiler.lowering.sparse import store_sparse
from compiler.structure import analyze
from tests.helpers import calibration_for, manager_for, run_pass


def test_zero_sparsity_is_exact(tiny, tiny_gm):
    state, (record,) = manager_for(tiny, "  - prune-weights: {sparsity: 0.0}").run(tiny_gm)
    assert record.kind == "exact" and record.status == "applied" and record.checks["max_abs_error"] <= 1e-4


def test_global_sparsity_zeroes_the_smallest_magnitudes(tiny, tiny_gm):
    weights = [lin.weight for lin in analyze(tiny_gm).linears]
    magnitudes = torch.cat([get_tensor(tiny_gm, w).detach().abs().reshape(-1) for w in weights])
    result = run_pass("prune-weights", {"sparsity": 0.6}, tiny_gm, tiny)
    after = torch.cat([get_tensor(result.graph_module, w).reshape(-1) for w in weights])
    assert result.details["sparsity"] == pytest.approx(0.6, abs=1e-3)
    assert float(magnitudes[after == 0].max()) <= float(magnitudes[after != 0].min())
    assert result.lowering["sparse_weights"] == sorted(set(weights), key=weights.index)


def test_per_weight_scope_reaches_the_sparsity_in_every_matrix(tiny, tiny_gm):
    result = run_pass("prune-weights", {"sparsity": 0.7, "scope": "per_weight", "target": "ffn"}, tiny_gm, tiny)
    assert len(result.details["weights"]) == 4
    assert all(entry["sparsity"] == pytest.approx(0.7, abs=0.01) for entry in result.details["weights"])


def test_cost_model_counts_sparse_bytes_but_dense_flops(tiny, tiny_gm):
    before = cost_model.estimate(tiny_gm, batch=2, seq=16)
    result = run_pass("prune-weights", {"sparsity": 0.8}, tiny_gm, tiny)
    after = cost_model.estimate(result.graph_module, batch=2, seq=16,
                                sparse_weights=set(result.lowering["sparse_weights"]))
    assert after.flops == before.flops and after.parameters == before.parameters
    assert after.bytes < before.bytes


def test_sparse_initializers_shrink_the_file_and_ort_loads_them(tiny, tiny_gm, tmp_path):
    gm = run_pass("prune-weights", {"sparsity": 0.8}, tiny_gm, tiny).graph_module
    inputs = example_inputs(tiny.tokenizer)
    lowered = lower_to_onnx(gm, inputs, tmp_path, quantize=None)
    feed = {k: v.numpy() for k, v in inputs.items()}
    dense = ort.InferenceSession(str(lowered.model_path), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    stats = store_sparse(lowered.model_path)
    assert stats["sparse_initializers"] >= 4 and stats["bytes_after"] < stats["bytes_before"]
    assert len(onnx.load(lowered.model_path).graph.sparse_initializer) == stats["sparse_initializers"]
    sparse = ort.InferenceSession(str(lowered.model_path), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    assert np.abs(sparse - dense).max() < 1e-5


def test_sparsity_that_breaks_the_budget_is_rolled_back(tiny, tiny_gm):
    state, (record,) = manager_for(tiny, "  - prune-weights: {sparsity: 0.9, on_fail: skip}", budget=1.0).run(tiny_gm)
    assert record.status == "skipped" and "fidelity budget broken" in record.reason


@pytest.mark.minilm
def test_minilm_half_sparse_ffn(minilm, minilm_gm):
    result = run_pass("prune-weights", {"sparsity": 0.5, "target": "ffn"}, minilm_gm, minilm,
                      calibration_for(minilm, samples=8, validation=8, max_length=32))
    assert result.details["sparsity"] == pytest.approx(0.5, abs=1e-3)
    batch = dict(minilm.tokenizer(["magnitude pruning keeps most of the meaning"], return_tensors="pt"))
    pooled = [m(**batch)[0].mean(1) for m in (minilm.model, result.graph_module)]
    assert torch.nn.functional.cosine_similarity(*pooled).item() > 0.8
