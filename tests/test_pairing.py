"""compiler.lowering.pairing: int8 weight rows reordered against u8 x s8 saturation, exactly."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import onnx_ir as ir
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from compiler.lowering import QuantizeSpec, lower_to_onnx
from compiler.lowering.pairing import LIMIT, greedy_order, order_cost, pair_cost, pair_int8_weights
from compiler.lowering.verify import padded_batch, pooled_cosine
from compiler.runtime import session
from tests.test_lowering import MINILM, INPUTS, example_inputs, tiny_bert, trace


def _session(path, exact: bool = False):
    # exact: u8 x u8 kernels, no 16-bit pair sums, so the row order cannot matter
    return session(path, 2, {"session.x64quantprecision": "1"} if exact else None)


def _run(path, feed, exact: bool = False) -> list[np.ndarray]:
    return _session(path, exact).run(None, feed)


def _feed(batch) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in batch.items()}


def _saturable(path) -> int:
    """Pairs (2i, 2i+1) of int8 weight rows, per output column, whose same-sign magnitudes add up past LIMIT."""
    model = ir.load(path)
    total = 0
    for node in model.graph.all_nodes():
        if node.op_type in ("MatMulInteger", "QAttention") and node.inputs[1].const_value is not None:
            total += order_cost(node.inputs[1].const_value.numpy(), np.arange(node.inputs[1].shape[0]))[0]
    return total


def test_greedy_order_avoids_a_saturating_pair():
    rows = np.zeros((6, 3), np.int8)
    rows[0, 0], rows[1, 0] = 100, 90  # neighbours in the given order: 190 > 128 can saturate
    rows[2, 1], rows[3, 1] = -120, -60
    rows[4, 2], rows[5, 2] = 5, -3
    assert order_cost(rows, np.arange(6)) == (2, (190 - LIMIT) + (180 - LIMIT))
    order = greedy_order(rows)
    assert sorted(order) == list(range(6))
    assert order_cost(rows, order) == (0, 0)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 12), st.integers(1, 9), st.integers(0, 2**31 - 1))
def test_greedy_order_is_a_permutation_and_costs_what_pair_cost_says(half, columns, seed):
    rows = np.random.default_rng(seed).integers(-127, 128, (2 * half, columns)).astype(np.int8)
    order = greedy_order(rows)
    assert sorted(order.tolist()) == list(range(2 * half))
    cost = pair_cost(rows)
    assert (cost == cost.T).all() and order_cost(rows, order)[1] == sum(
        cost[order[2 * i], order[2 * i + 1]] for i in range(half))


def test_pairing_is_exact_and_keeps_the_interface(tmp_path):
    model = tiny_bert(seed=5)
    for layer in model.encoder.layer:  # wide weights, so that the given order has pairs that can saturate
        layer.intermediate.dense.weight.data.normal_(0, 1)
        layer.output.dense.weight.data.normal_(0, 1)
    kw = example_inputs()
    res = lower_to_onnx(trace(model, kw), kw, tmp_path, quantize=QuantizeSpec())
    paired = tmp_path / "paired.onnx"
    ir_model = ir.load(res.model_path)
    notes = pair_int8_weights(ir_model)
    ir.save(ir_model, paired)
    assert any("-> " in note for note in notes), notes
    assert _saturable(paired) < _saturable(res.model_path)

    feed = _feed(padded_batch(example_inputs(batch=3, seq=17)))
    plain_session, paired_session = _session(res.model_path), _session(paired)
    def interface(sess):
        return [(o.name, o.shape) for o in sess.get_outputs()]

    assert interface(paired_session) == interface(plain_session)
    assert [i.name for i in paired_session.get_inputs()] == [i.name for i in plain_session.get_inputs()]
    # Exact integer products: the rewrite computes the same integers, so the same floats.
    for plain, new in zip(_run(res.model_path, feed, exact=True), _run(paired, feed, exact=True)):
        assert np.abs(plain - new).max() <= 1e-6
    assert any("graph output" in note for note in notes), notes  # the hidden stream: left, no restoring op
    assert len(ir.load(paired).graph) == len(ir.load(res.model_path).graph)


def test_a_weight_shared_across_layers_stays_shared(tmp_path):
    model = tiny_bert(seed=6)
    model.encoder.layer[1].output.dense.weight = model.encoder.layer[0].output.dense.weight  # as share-layers does
    kw = example_inputs()
    res = lower_to_onnx(trace(model, kw), kw, tmp_path, quantize=QuantizeSpec())
    ir_model = ir.load(res.model_path)
    before = sum(v.const_value.nbytes for v in ir_model.graph.initializers.values())
    notes = pair_int8_weights(ir_model)
    after = sum(v.const_value.nbytes for v in ir_model.graph.initializers.values())
    assert after - before <= 8 * 64 + 1024, notes  # the restoring index and small shared biases only, no weight
    assert any("shared weight" in note for note in notes), notes


@pytest.mark.minilm
@pytest.mark.skipif(not os.path.isdir(MINILM), reason="all-MiniLM-L6-v2 weights not installed")
def test_minilm_pairing_removes_most_ffn_saturation_and_keeps_the_function(tmp_path):
    import torch
    from transformers import AutoModel, AutoTokenizer

    from compiler.calibration import load_texts

    model, tok = AutoModel.from_pretrained(MINILM).eval(), AutoTokenizer.from_pretrained(MINILM)
    example = tok(["A small dog runs across the park.", "Quantization keeps the meaning."], padding=True,
                  return_tensors="pt")
    kw = {k: example[k] for k in INPUTS}
    res = lower_to_onnx(trace(model, kw), kw, tmp_path, quantize=QuantizeSpec())
    paired = tmp_path / "paired.onnx"
    ir_model = ir.load(res.model_path)
    notes = pair_int8_weights(ir_model)
    ir.save(ir_model, paired)
    ffn = [n for n in notes if "1536 channels" in n]
    assert len(ffn) == 6, notes  # every FFN's intermediate activation
    for note in ffn:
        before, after = (int(x) for x in note.split("VNNI ")[1].split(" of")[0].split(" -> "))
        assert after < 0.2 * before
    assert any("graph output last_hidden_state" in n for n in notes), notes  # the hidden stream stays

    enc = tok(load_texts("builtin:python-docs")[:64], padding=True, truncation=True, max_length=64, return_tensors="pt")
    feed = {k: enc[k].numpy() for k in INPUTS}
    for plain, new in zip(_run(res.model_path, feed, exact=True), _run(paired, feed, exact=True)):
        assert np.abs(plain - new).max() <= 1e-6  # the same integers, so the same function
    with torch.no_grad():
        reference = model(**{k: enc[k] for k in INPUTS}).last_hidden_state.numpy()

    def fidelity(path):
        return float(pooled_cosine(_run(path, feed)[0], reference, feed["attention_mask"]).mean())

    # The default kernel: closer to fp32 on CPUs without VNNI (it saturates less), the same on CPUs with it.
    assert fidelity(paired) >= fidelity(res.model_path) - 1e-6


@pytest.mark.parametrize("table", ["{dtype: int8}", "{dtype: int4, block_size: 16}"])
def test_a_compile_of_the_flagship_form_pairs_the_ffn_and_the_word_table_rank(tmp_path, tiny_dir, table):
    """The flagship's lowering path (factorized int8 or int4 word table, int8 linears), end to end through the CLI."""
    import json

    from compiler.cli import main
    from tests.conftest import write_recipe

    recipe = write_recipe(tmp_path, f"""
model: {tiny_dir}
calibration: {{samples: 16, validation_samples: 8, max_length: 32, batch_size: 8}}
budget: {{min: 0.5}}
passes:
  - low-rank: {{target: embeddings, rank: 16}}
  - quantize-linear: {{dtype: int8}}
  - quantize-embeddings: {table}
""")
    out = tmp_path / "out"
    assert main(["compile", str(recipe), "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    notes = [n for n in report["lowering"]["notes"] if n.startswith("pairing:")]
    assert any("(16 channels, 1 int8 weight(s))" in n for n in notes), notes  # the word table's rank
    assert sum("(64 channels, 1 int8 weight(s))" in n for n in notes) == 2, notes  # each layer's FFN
    assert report["final_check"]["passed"]


def test_a_small_constant_shared_by_three_groups_gets_one_copy_each(tmp_path):
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(7)
    model = BertModel(BertConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                                 intermediate_size=128, max_position_embeddings=64)).eval()
    for layer in model.encoder.layer:
        layer.intermediate.dense.weight.data.normal_(0, 1)  # pairs that can saturate, so both FFN groups are paired
        layer.intermediate.dense.bias.data.zero_()  # byte-identical: the writer keeps one initializer for both
    kw = example_inputs()
    res = lower_to_onnx(trace(model, kw), kw, tmp_path, quantize=QuantizeSpec())
    ir_model = ir.load(res.model_path)
    notes = pair_int8_weights(ir_model)
    assert sum("(128 channels" in n and "-> " in n for n in notes) == 3, notes
    paired = tmp_path / "paired.onnx"
    ir.save(ir_model, paired)
    feed = _feed(padded_batch(example_inputs(batch=3, seq=17)))
    for plain, new in zip(_run(res.model_path, feed, exact=True), _run(paired, feed, exact=True)):
        assert np.abs(plain - new).max() <= 1e-6
