"""quantize-embeddings: fp16 / per-row int8 / block-wise int4 tables, simulated in the graph and stored so by lowering."""

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
from compiler.gptq import stored_bytes
from compiler.lowering.embeddings import int4_blocks, int8_rows, store_embeddings
from compiler.runtime import ort_runner, session
from compiler.simulation import strip_simulation
from compiler.structure import analyze
from compiler.validation import hidden_states
from passes.options import QuantizeEmbeddingsConfig
from passes.quantize_embeddings import fake_int4_rows, fake_int8_rows
from tests.helpers import manager_for, run_pass


def test_simulated_int8_rows_equal_the_stored_int8_table():
    table = torch.randn(50, 16) * torch.logspace(-3, 1, 50)[:, None]  # rows of very different scale
    quantized, scale = int8_rows(table.numpy())
    assert np.array_equal(fake_int8_rows(table).numpy(), quantized.astype(np.float32) * scale)
    assert (np.abs(quantized).max(axis=1) == 127).all()  # every row uses its full range


@pytest.mark.parametrize("block", [16, 32])
def test_simulated_int4_rows_equal_the_stored_int4_table(block):
    torch.manual_seed(0)
    table = torch.randn(50, 64) * torch.logspace(-3, 1, 50)[:, None]
    table[3, 5] = 40.0  # an outlier widens its own block's scale only
    q, scale = int4_blocks(table.numpy(), block)
    stored = (q.reshape(50, 64 // block, block).astype(np.float32) * scale.astype(np.float32)).reshape(50, 64)
    assert np.array_equal(fake_int4_rows(table, block).numpy(), stored)
    assert q.min() >= -7 and q.max() <= 7 and scale.dtype == np.float16
    assert (np.abs(q).reshape(50, -1, block).max(axis=2) == 7).all()  # every block uses its full range
    # Rounding error is at most half a step of its block's scale (the fp16 scale rounds the step, not the bound).
    step = np.repeat(scale.astype(np.float32)[..., 0], block, axis=1)
    assert (np.abs(stored - table.numpy()) <= 0.5 * step * (1 + 1e-3)).all()


def test_block_size_is_for_int4_only():
    assert QuantizeEmbeddingsConfig(dtype="int4").block_size == 32
    with pytest.raises(ValueError, match="block_size applies to dtype int4 only"):
        QuantizeEmbeddingsConfig(dtype="int8", block_size=32)
    dumped = QuantizeEmbeddingsConfig(dtype="int8").model_dump(mode="json")
    assert QuantizeEmbeddingsConfig(**dumped).block_size is None  # a report's config validates again


def test_a_block_size_that_does_not_divide_the_table_is_refused(tiny, tiny_gm):
    width = tiny.model.config.hidden_size
    block = next(b for b in (16, 32, 64, 128) if width % b)
    with pytest.raises(PassRefused, match=f"not a multiple of block_size {block}"):
        run_pass("quantize-embeddings", {"dtype": "int4", "block_size": block}, tiny_gm, tiny)


@pytest.mark.parametrize("dtype, bytes_per_weight", [("fp16", 2), ("int8", 1), ("int4", None)])
def test_quantize_embeddings_keeps_the_budget_and_shrinks_table_bytes(tiny, tiny_gm, dtype, bytes_per_weight):
    options = f"{{dtype: {dtype}, block_size: 16}}" if dtype == "int4" else f"{{dtype: {dtype}}}"
    state, (record,) = manager_for(tiny, f"  - quantize-embeddings: {options}", budget=0.9).run(tiny_gm)
    before = record.cost_before["by_component"]["embeddings"]["bytes"]
    assert record.kind == "lossy" and record.status == "applied"
    assert record.checks["cosine"] > 0.99
    after = record.cost_after["by_component"]["embeddings"]["bytes"]
    rows = sum(shape[0] for shape in record.details["tables"].values())
    weights = sum(shape[0] * shape[1] for shape in record.details["tables"].values())
    if dtype == "int4":
        stored = sum(stored_bytes(shape[0] * shape[1], 16, False) for shape in record.details["tables"].values())
        assert before - after == 4 * weights - stored
        assert record.checks["cosine"] < 0.99999  # int4 rows are rounded, not passed through
    else:
        assert before - after == weights * (4 - bytes_per_weight) - (4 * rows if dtype == "int8" else 0)
    assert sorted(state.lowering["embedding_precision"]) == sorted(
        ["embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight", "embeddings.token_type_embeddings.weight"])


def _lower_and_store(tiny, tiny_gm, tmp_path, options):
    """Run quantize-embeddings, lower its graph without the simulation and store the tables as the compile does.

    Returns the batch, the simulated graph's output on it, the lowered model, its size before the tables were stored,
    the tables and store_embeddings' note."""
    result = run_pass("quantize-embeddings", options, tiny_gm, tiny)
    batch = example_inputs(tiny.tokenizer)
    simulated = hidden_states(result.graph_module)(batch)
    final = copy.deepcopy(result.graph_module)
    strip_simulation(final)
    lowered = lower_to_onnx(final, batch, tmp_path, quantize=None)
    size = lowered.model_path.stat().st_size
    tables = {t: get_tensor(final, t).detach().numpy() for t in result.lowering["embedding_precision"]}
    note = store_embeddings(lowered.model_path, result.lowering["embedding_precision"], tables,
                            result.lowering.get("int4_tables"))
    return batch, simulated, lowered, size, tables, note


def test_lowered_int8_tables_match_the_simulation_and_keep_the_embedding_fusion(tiny, tiny_gm, tmp_path):
    batch, simulated, lowered, size, tables, note = _lower_and_store(tiny, tiny_gm, tmp_path, {"dtype": "int8"})
    assert sorted(note["stored"].values()) == ["int8"] * 3 and not note["left"]
    assert size - lowered.model_path.stat().st_size > 0.7 * 4 * sum(t.size for t in tables.values()) - 4096
    model = onnx.load(lowered.model_path)
    assert [n.op_type for n in model.graph.node].count("EmbedLayerNormalization") == 1
    deployed = ort_runner(session(lowered.model_path, 1))(batch)
    assert float((deployed - simulated).abs().max()) < 1e-4


def test_lowered_int4_tables_match_the_simulation_and_fold_when_the_session_loads(tiny, tiny_gm, tmp_path):
    import onnxruntime as ort

    batch, simulated, lowered, size, tables, note = _lower_and_store(
        tiny, tiny_gm, tmp_path, {"dtype": "int4", "block_size": 16})
    assert sorted(note["stored"].values()) == ["int4"] * 3 and not note["left"]
    weights = sum(t.size for t in tables.values())
    assert size - lowered.model_path.stat().st_size > 0.99 * (4 * weights - stored_bytes(weights, 16, False))
    model = onnx.load(lowered.model_path)
    packed = {t.name: t for t in model.graph.initializer if t.name.endswith(("_int4", "_scale"))}
    assert sum(onnx.numpy_helper.to_array(t).nbytes for t in packed.values()) == stored_bytes(weights, 16, False)
    assert [n.op_type for n in model.graph.node].count("EmbedLayerNormalization") == 1
    deployed = ort_runner(session(lowered.model_path, 1))(batch)
    assert float((deployed - simulated).abs().max()) < 1e-4
    # The unpacking is constant-only: ONNX Runtime folds it into fp32 tables when the session loads.
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(lowered.model_path), options, providers=["CPUExecutionProvider"])
    optimized = [n.op_type for n in onnx.load(tmp_path / "optimized.onnx").graph.node]
    assert not {"Floor", "Concat", "Unsqueeze"} & set(optimized), optimized


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


@pytest.mark.minilm
def test_minilm_int4_word_table_keeps_held_out_cosine(minilm, minilm_gm):
    state, (record,) = manager_for(minilm, "  - quantize-embeddings: {dtype: int4, tables: [word]}",
                                   budget=0.99).run(minilm_gm)
    assert record.status == "applied" and 0.99 < record.checks["cosine"] < 0.9999
    assert record.details["tables"] == {"word": [30522, 384]}
