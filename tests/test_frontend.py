"""Loading and tracing: exact traces, offline-only, safetensors-only, clear model errors."""

from __future__ import annotations

import shutil

import pytest
import torch

from compiler.errors import ModelError
from compiler.frontend import example_inputs, load_model, trace
from compiler.validation import hidden_states


def test_trace_is_exact_and_dynamic_in_batch_and_sequence(tiny, tiny_gm):
    for texts, length in ((["one"], 5), (["a b c", "d e", "f"], 23)):
        batch = tiny.tokenizer(texts, padding="max_length", max_length=length, return_tensors="pt")
        batch = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
        assert torch.allclose(hidden_states(tiny_gm)(batch), hidden_states(tiny.model)(batch), atol=1e-5)


def test_missing_folder_names_the_field_and_fix(tmp_path):
    with pytest.raises(ModelError) as info:
        load_model(str(tmp_path / "missing"))
    assert "model:" in info.value.render() and "does not exist" in info.value.render()


def test_unknown_builtin_alias_lists_the_known_ones():
    with pytest.raises(ModelError, match="builtin:minilm-l6"):
        load_model("builtin:bert-huge")


def test_pickle_weights_are_refused_without_allow_pickle(tiny_dir, tmp_path):
    folder = tmp_path / "pickled"
    shutil.copytree(tiny_dir, folder)
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"not even a pickle")
    with pytest.raises(ModelError, match="--allow-pickle"):
        load_model(str(folder))


def test_truncated_safetensors_is_a_model_error_not_a_traceback(tiny_dir, tmp_path):
    folder = tmp_path / "truncated"
    shutil.copytree(tiny_dir, folder)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 3])
    with pytest.raises(ModelError, match="truncated or corrupted"):
        load_model(str(folder))


def test_tokenizer_larger_than_embedding_table_is_refused(tmp_path):
    from tests.conftest import make_tiny_bert

    folder = make_tiny_bert(tmp_path / "small-vocab")
    import json

    config = json.loads((folder / "config.json").read_text())
    config["vocab_size"] = 1000
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError):  # either the weights or the tokenizer check names the mismatch
        load_model(str(folder))


def test_example_inputs_have_symbolic_friendly_shapes(tiny):
    batch = example_inputs(tiny.tokenizer)
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids"}
    assert batch["input_ids"].shape[0] >= 2 and batch["input_ids"].shape[1] >= 2


def test_trace_of_the_real_minilm_is_exact(minilm, minilm_gm):
    batch = minilm.tokenizer(["Graphs are traced once.", "Then passes rewrite them, and validation checks them."],
                             padding=True, return_tensors="pt")
    batch = dict(batch)
    assert torch.allclose(hidden_states(minilm_gm)(batch), hidden_states(minilm.model)(batch), atol=1e-5)


def test_traced_graph_owns_its_weights(tiny, tiny_gm):
    ref = dict(tiny.model.named_parameters())["encoder.layer.0.intermediate.dense.weight"]
    traced = tiny_gm.get_parameter("encoder.layer.0.intermediate.dense.weight")
    assert torch.equal(ref, traced) and ref.data_ptr() != traced.data_ptr()
    with torch.no_grad():
        traced.add_(1.0)  # a pass editing in place must not touch the reference
    assert not torch.equal(ref, traced)
