"""decouple-attention: segment-restricted lower layers, restarted positions, and the split lowering."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from compiler.cli import main
from compiler.distillation import build_probe
from compiler.errors import PassRefused
from compiler.lowering.split import split_modules
from compiler.pass_infra import get_pass
from compiler.split_runtime import SplitEncoder
from compiler.structure import analyze
from tests.conftest import write_recipe
from tests.helpers import run_pass

NO_PAIRS = {"pair_samples": 0}


def _pairs(tokenizer, first: list[str], second: list[str]) -> dict[str, torch.Tensor]:
    enc = tokenizer(first, second, padding=True, return_tensors="pt")
    return {n: enc[n] for n in ("input_ids", "attention_mask", "token_type_ids")}


def _singles(tokenizer, texts: list[str]) -> dict[str, torch.Tensor]:
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    return {n: enc[n] for n in ("input_ids", "attention_mask", "token_type_ids")}


@pytest.fixture()
def pair_batch(tiny):
    # Row 1 is shorter, so it carries right-padding after its second segment.
    return _pairs(tiny.tokenizer, ["what is a cat?", "why"],
                  ["a cat is a small domesticated carnivorous mammal", "because"])


def test_zero_layers_is_exact_and_unchanged(tiny, tiny_gm, pair_batch):
    expected = tiny_gm(**pair_batch)[0]
    result = run_pass("decouple-attention", {"layers": 0, **NO_PAIRS}, tiny_gm, tiny)
    cls = get_pass("decouple-attention")
    assert cls(cls.Config(layers=0)).is_exact() and not cls(cls.Config(layers=1)).is_exact()
    assert not result.modified and not result.lowering
    assert torch.equal(result.graph_module(**pair_batch)[0], expected)


def test_single_segment_inputs_keep_the_joint_outputs(tiny, tiny_gm):
    batch = _singles(tiny.tokenizer, ["a single segment of text", "short"])
    expected = tiny_gm(**batch)[0]
    result = run_pass("decouple-attention", {"layers": 1, **NO_PAIRS}, tiny_gm, tiny)
    assert result.modified and result.lowering == {"split": {"layers": 1}}
    assert (result.graph_module(**batch)[0] - expected).abs().max() < 1e-5


def test_pairs_change_and_pair_fidelity_is_reported(tiny, tiny_gm, pair_batch):
    expected = tiny_gm(**pair_batch)[0]
    result = run_pass("decouple-attention", {"layers": 1, "pair_texts": "builtin:python-docs-pairs",
                                             "pair_samples": 16}, tiny_gm, tiny)
    assert (result.graph_module(**pair_batch)[0] - expected).abs().max() > 1e-2
    fidelity = result.details["pair_fidelity"]
    assert fidelity["pairs"] == 16 and 0.0 < fidelity["cosine_vs_reference"] < 0.9999


def test_masks_are_block_diagonal_by_segment_and_drop_padding(tiny, tiny_gm, pair_batch):
    gm = run_pass("decouple-attention", {"layers": 1, **NO_PAIRS}, tiny_gm, tiny).graph_module
    probe, _ = build_probe(gm, analyze(gm))
    masks = probe(**pair_batch)["masks"]
    tt, real = pair_batch["token_type_ids"], pair_batch["attention_mask"].bool()
    same = tt[:, :, None] == tt[:, None, :]
    lower, upper = masks[0][:, 0], masks[1][:, 0]
    assert torch.equal(lower, same & real[:, None, :])
    assert torch.equal(upper, real[:, None, :].expand_as(upper))
    # The boundary: the [SEP] closing segment A sees A but not B's first token, and vice versa.
    boundary = int(tt[0].argmax())  # first token of segment B in row 0
    assert lower[0, boundary - 1, boundary - 1] and not lower[0, boundary - 1, boundary]
    assert lower[0, boundary, boundary] and not lower[0, boundary, boundary - 1]
    # Padding keys of row 1 stay masked in both kinds of layer.
    assert not lower[1, :, ~real[1]].any() and not upper[1, :, ~real[1]].any()


def test_second_segment_states_do_not_depend_on_the_first(tiny, tiny_gm):
    gm = run_pass("decouple-attention", {"layers": 1, **NO_PAIRS}, tiny_gm, tiny).graph_module
    probe, _ = build_probe(gm, analyze(gm))
    passage = "the passage whose states are cached"
    short = _pairs(tiny.tokenizer, ["hi"], [passage])
    long = _pairs(tiny.tokenizer, ["a much longer first segment than the other one"], [passage])
    states = [probe(**batch)["layers"][0][0][batch["token_type_ids"][0] == 1] for batch in (short, long)]
    assert states[0].shape == states[1].shape
    assert (states[0] - states[1]).abs().max() < 1e-5


def test_split_modules_compose_to_the_decoupled_graph(tiny, tiny_gm, pair_batch):
    gm = run_pass("decouple-attention", {"layers": 1, **NO_PAIRS}, tiny_gm, tiny).graph_module
    lower, upper = split_modules(gm, 1)
    expected = gm(**pair_batch)
    states = torch.zeros_like(expected[0])
    for row in range(len(states)):
        for segment in (0, 1):
            where = (pair_batch["token_type_ids"][row] == segment) & pair_batch["attention_mask"][row].bool()
            ids = pair_batch["input_ids"][row][where][None]
            states[row, where] = lower(input_ids=ids, attention_mask=torch.ones_like(ids),
                                       token_type_ids=torch.full_like(ids, segment))[0]
    got = upper(hidden_states=states, attention_mask=pair_batch["attention_mask"])
    real = pair_batch["attention_mask"].bool()
    assert (got[0] - expected[0])[real].abs().max() < 1e-5
    assert (got[1] - expected[1]).abs().max() < 1e-5


def test_refuses_decoupling_every_layer(tiny, tiny_gm):
    with pytest.raises(PassRefused, match="at least one upper layer"):
        run_pass("decouple-attention", {"layers": 2, **NO_PAIRS}, tiny_gm, tiny)


def test_explicit_layers_must_be_the_lowest_block():
    cls = get_pass("decouple-attention")
    assert cls.Config(layers=[1, 0]).count == 2
    with pytest.raises(ValueError, match="lowest"):
        cls.Config(layers=[1, 2])


def test_compile_writes_a_split_form_that_composes_to_model_onnx(tmp_path, tiny_dir, tiny):
    recipe = write_recipe(tmp_path, f"""
version: 1
model: {tiny_dir}
calibration: {{texts: builtin:python-docs-pairs, samples: 16, validation_samples: 8, max_length: 48, batch_size: 8}}
budget: {{metric: cosine, min: 0.5}}
passes:
  - decouple-attention: {{layers: 1, pair_samples: 8}}
""")
    out = tmp_path / "out"
    assert main(["compile", str(recipe), "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    split = report["lowering"]["split"]
    assert split["layers"] == 1 and split["check"]["passed"] and split["check"]["two_segment_rows"] >= 8
    assert split["check"]["max_abs_error"] <= 1e-4
    assert report["passes"][0]["details"]["pair_fidelity"]["pairs"] == 8

    # The reranking path: passages cached once, a query scored against all of them.
    encoder = SplitEncoder.from_folder(out, threads=1)
    passages = ["a cat is a small domesticated carnivorous mammal", "because", "the passage whose states are cached"]
    result = encoder.pairs("what is a cat?", encoder.cache_passages(passages, max_length=32))
    import onnxruntime as ort

    whole = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    for i, passage in enumerate(passages):
        enc = tiny.tokenizer(["what is a cat?"], [passage], return_tensors="np")
        expected = whole.run(None, {k: enc[k].astype(np.int64) for k in ("input_ids", "attention_mask", "token_type_ids")})[0][0]
        got = result.last_hidden_state[i][result.attention_mask[i].astype(bool)]
        assert np.abs(got - expected).max() < 1e-4
    # model.onnx itself keeps the segment mask (a lowering that dropped it would match the joint model).
    batch = _pairs(tiny.tokenizer, ["what is a cat?"], [passages[0]])
    joint = tiny.model(**batch)[0][0].detach().numpy()
    enc = {k: v.numpy() for k, v in batch.items()}
    assert np.abs(whole.run(None, enc)[0][0] - joint).max() > 1e-2


@pytest.mark.minilm
def test_minilm_decoupled_passage_states_are_cacheable(minilm, minilm_gm):
    gm = run_pass("decouple-attention", {"layers": 4, "pair_samples": 16}, minilm_gm, minilm).graph_module
    single = _singles(minilm.tokenizer, ["Sentence embeddings map text to vectors.", "Short one."])
    assert (gm(**single)[0] - minilm.model(**single)[0]).abs().max() < 1e-4
    probe, _ = build_probe(gm, analyze(gm))
    passage = "Python lists are sorted in place with the sort method."
    states = []
    for query in ("how to sort?", "what is the fastest way to order a list of numbers in python?"):
        batch = _pairs(minilm.tokenizer, [query], [passage])
        states.append(probe(**batch)["layers"][3][0][batch["token_type_ids"][0] == 1])
    assert (states[0] - states[1]).abs().max() < 1e-4
