"""quantize-embeddings: fp16 / per-row int8 tables, simulated in the graph and stored so by lowering."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
import torch

from compiler.errors import PassRefused
from compiler.frontend import example_inputs
from compiler.graph_edit import get_tensor
from compiler.lowering import lower_to_onnx
from compiler.lowering.embeddings import int8_rows, store_embeddings
from compiler.runtime import ort_runner, session
from compiler.simulation import strip_simulation
from compiler.structure import analyze
from compiler.validation import hidden_states
from passes.quantize_embeddings import fake_int8_rows
from tests.helpers import manager_for, run_pass


def test_simulated_int8_rows_equal_the_stored_int8_table():
    table = torch.randn(50, 16) * torch.logspace(-3, 1, 50)[:, None]  # rows of very different scale
    quantized, scale = int8_rows(table.numpy())
    assert np.array_equal(fake_int8_rows(table).numpy(), quantized.astype(np.float32) * scale)
    assert (np.abs(quantized).max(axis=1) == 127).all()  # every row uses its full range


@pytest.mark.parametrize("dtype, bytes_per_weight", [("fp16", 2), ("int8", 1)])
def test_quantize_embeddings_keeps_the_budget_and_shrinks_table_bytes(tiny, tiny_gm, dtype, bytes_per_weight):
    state, (record,) = manager_for(tiny, f"  - quantize-embeddings: {{dtype: {dtype}}}", budget=0.9).run(tiny_gm)
    before = record.cost_before["by_component"]["embeddings"]["bytes"]
    assert record.kind == "lossy" and record.status == "applied"
    assert record.checks["cosine"] > 0.99
    after = record.cost_after["by_component"]["embeddings"]["bytes"]
    rows = sum(shape[0] for shape in record.details["tables"].values())
    weights = sum(shape[0] * shape[1] for shape in record.details["tables"].values())
    assert before - after == weights * (4 - bytes_per_weight) - (4 * rows if dtype == "int8" else 0)
    assert sorted(state.lowering["embedding_precision"]) == sorted(
        ["embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight", "embeddings.token_type_embeddings.weight"])


def test_lowered_int8_tables_match_the_simulation_and_keep_the_embedding_fusion(tiny, tiny_gm, tmp_path):
    result = run_pass("quantize-embeddings", {"dtype": "int8"}, tiny_gm, tiny)
    batch = example_inputs(tiny.tokenizer)
    simulated = hidden_states(result.graph_module)(batch)
    final = copy.deepcopy(result.graph_module)
    strip_simulation(final)
    lowered = lower_to_onnx(final, batch, tmp_path, quantize=None)
    size = lowered.model_path.stat().st_size
    tables = {t: get_tensor(final, t).detach().numpy() for t in result.lowering["embedding_precision"]}
    note = store_embeddings(lowered.model_path, result.lowering["embedding_precision"], tables)
    assert sorted(note["stored"].values()) == ["int8"] * 3 and not note["left"]
    assert size - lowered.model_path.stat().st_size > 0.7 * 4 * sum(t.size for t in tables.values()) - 4096
    model = onnx.load(lowered.model_path)
    assert [n.op_type for n in model.graph.node].count("EmbedLayerNormalization") == 1
    deployed = ort_runner(session(lowered.model_path, 1))(batch)
    assert float((deployed - simulated).abs().max()) < 1e-4


def test_fp16_tables_after_albert_factorization(tiny, tiny_gm):
    passes = "  - low-rank: {rank: 16, target: embeddings}\n  - quantize-embeddings: {dtype: fp16, tables: [word]}"
    state, (factorized, quantized) = manager_for(tiny, passes, budget=0.5).run(tiny_gm)
    assert quantized.status == "applied"
    assert quantized.details["tables"] == {"word": [30522, 16]}
    assert state.lowering["fp16_weights"] == [analyze(state.gm).embeddings.word_weight]


def test_quantizing_the_tables_twice_is_refused(tiny, tiny_gm):
    once = run_pass("quantize-embeddings", {"dtype": "fp16"}, tiny_gm, tiny).graph_module
    with pytest.raises(PassRefused, match="already quantized"):
        run_pass("quantize-embeddings", {"dtype": "int8"}, once, tiny)


@pytest.mark.minilm
def test_minilm_int8_word_table_keeps_held_out_cosine(minilm, minilm_gm):
    state, (record,) = manager_for(minilm, "  - quantize-embeddings: {dtype: int8}", budget=0.99).run(minilm_gm)
    assert record.status == "applied" and record.checks["cosine"] > 0.999
