"""prune-vocab: exact on the kept tokens, a matching tokenizer in the output, unknown words to [UNK]."""

from __future__ import annotations

import copy
import json

import onnx
import onnxruntime as ort
import pytest
import torch
from transformers import AutoTokenizer

from compiler.compile import compile_recipe
from compiler import pass_infra
from compiler.errors import PassRefused
from compiler.graph_edit import get_tensor
from compiler.pass_infra import Pass, PassResult, register_pass
from compiler.recipe import load_recipe
from compiler.structure import analyze
from compiler.validation import hidden_states
from tests.conftest import write_recipe
from tests.helpers import calibration_for, manager_for, run_pass

TEXT = "The function returns a list of values."
UNSEEN = "漢"  # in BERT's vocabulary, not in Python's docs


def test_prune_vocab_is_exact_on_kept_tokens_and_reports_the_oov_rate(tiny, tiny_gm):
    state, (record,) = manager_for(tiny, "  - prune-vocab: {texts: builtin}").run(tiny_gm)
    assert record.kind == "exact" and record.status == "applied"
    assert record.checks["max_abs_error"] <= 1e-4
    assert 0 < record.checks["heldout_tokens_out_of_interface"] < record.checks["heldout_tokens"]
    assert record.checks["heldout_oov_rate"] == pytest.approx(
        record.checks["heldout_tokens_out_of_interface"] / record.checks["heldout_tokens"], abs=1e-6)
    kept = record.details["tokens_kept"]
    assert 100 < kept < 30522
    assert tuple(get_tensor(state.gm, analyze(state.gm).embeddings.word_weight).shape) == (kept, 32)


def test_new_tokenizer_gives_the_renumbered_ids_and_unknown_words_become_unk(tiny, tiny_gm):
    result = run_pass("prune-vocab", {"texts": "builtin"}, tiny_gm, tiny)
    new = result.inputs.tokenizer
    old_ids = tiny.tokenizer(TEXT, return_tensors="pt")["input_ids"]
    assert result.inputs.lossless({"input_ids": old_ids}).all()  # Python's docs use all these words
    assert new(TEXT)["input_ids"] == result.inputs.old_to_new[old_ids[0]].tolist()
    assert new.convert_ids_to_tokens(new(TEXT)["input_ids"]) == tiny.tokenizer.convert_ids_to_tokens(old_ids[0].tolist())
    assert tiny.tokenizer.convert_ids_to_tokens(tiny.tokenizer(UNSEEN)["input_ids"]) == ["[CLS]", UNSEEN, "[SEP]"]
    assert new.convert_ids_to_tokens(new(UNSEEN)["input_ids"]) == ["[CLS]", "[UNK]", "[SEP]"]
    assert new.pad_token_id == 0 and len(new) == result.details["tokens_kept"]
    assert result.lowering["files"]["vocab.txt"].splitlines() == new.convert_ids_to_tokens(list(range(len(new))))


def test_graph_on_new_ids_equals_graph_before_on_old_ids(tiny, tiny_gm):
    batch = {k: v for k, v in tiny.tokenizer([TEXT, "A class defines new attributes."], padding=True,
                                              return_tensors="pt").items()}
    before = hidden_states(tiny_gm)(batch)
    result = run_pass("prune-vocab", {"texts": "builtin"}, tiny_gm, tiny)
    after = hidden_states(result.graph_module)(result.inputs.map_batch(batch))
    assert torch.equal(before, after)


def test_keep_characters_spells_unseen_words_instead_of_unk(tiny, tiny_gm):
    result = run_pass("prune-vocab", {"keep_characters": True}, tiny_gm, tiny)
    tokens = result.inputs.tokenizer.convert_ids_to_tokens(result.inputs.tokenizer("zygomorphic")["input_ids"])
    assert "[UNK]" not in tokens and "".join(t.removeprefix("##") for t in tokens[1:-1]) == "zygomorphic"
    assert result.details["characters_added"] > 0


def test_keep_latin_keeps_every_latin_piece_and_drops_other_scripts_and_placeholders(tiny, tiny_gm):
    original = tiny.tokenizer
    corpus_only = set(run_pass("prune-vocab", {}, copy.deepcopy(tiny_gm), tiny).inputs.tokenizer.get_vocab())
    result = run_pass("prune-vocab", {"keep_latin": True}, tiny_gm, tiny)
    new = result.inputs.tokenizer
    words = "zygomorphic quixotically café naïveté"  # outside Python's docs; their pieces are Latin
    assert new.convert_ids_to_tokens(new(words)["input_ids"]) == original.convert_ids_to_tokens(original(words)["input_ids"])
    assert new.convert_ids_to_tokens(new(UNSEEN)["input_ids"])[1:-1] == ["[UNK]"]
    kept = set(new.get_vocab())
    assert not any(t.startswith("[unused") for t in kept)
    latin = {t for t in original.get_vocab()
             if not (t.startswith("[") and t.endswith("]") and len(t) > 2) and all(ord(c) < 0x250 for c in t)}
    assert kept == latin | corpus_only  # the corpus's own pieces (curly quotes, say) and the special tokens stay
    assert result.details["latin_added"] > 0


def test_min_count_keeps_fewer_tokens(tiny, tiny_gm):
    every = run_pass("prune-vocab", {"texts": "builtin"}, copy.deepcopy(tiny_gm), tiny).details["tokens_kept"]
    frequent = run_pass("prune-vocab", {"texts": "builtin", "min_count": 5}, tiny_gm, tiny).details["tokens_kept"]
    assert frequent < every


def test_a_list_of_corpora_keeps_the_tokens_of_all_of_them(tiny, tiny_gm, tmp_path):
    (tmp_path / "animals.txt").write_text("zebra tiger zebra\n")
    (tmp_path / "colours.txt").write_text("purple orange purple\n")
    sources = [str(tmp_path / "animals.txt"), str(tmp_path / "colours.txt")]
    result = run_pass("prune-vocab", {"texts": sources, "min_count": 2}, tiny_gm, tiny)
    tokens = set(result.inputs.tokenizer.get_vocab())
    assert {"zebra", "purple"} <= tokens and not {"tiger", "orange"} & tokens  # counted over the pooled corpus
    assert result.details["corpus"] == sources and result.details["corpus_texts"] == 2


def test_keep_top_adds_the_most_frequent_tokens_of_the_frequency_corpus(tiny, tiny_gm, tmp_path):
    general = tmp_path / "general.txt"
    general.write_text("zebra zebra zebra tiger tiger lion\n" * 3)  # one token each
    result = run_pass("prune-vocab", {"keep_top": 2, "frequency_texts": str(general)}, tiny_gm, tiny)
    tokens = set(result.inputs.tokenizer.get_vocab())
    assert {"zebra", "tiger"} <= tokens and "lion" not in tokens
    assert result.details["keep_top_added"] == 2


def test_prune_vocab_slices_an_albert_factorized_table(tiny, tiny_gm):
    passes = "  - low-rank: {rank: 8, target: embeddings}\n  - prune-vocab: {texts: builtin}"
    state, (factorized, pruned) = manager_for(tiny, passes).run(tiny_gm)
    assert factorized.status == pruned.status == "applied"
    assert pruned.checks["max_abs_error"] <= 1e-4
    table = get_tensor(state.gm, analyze(state.gm).embeddings.word_weight)
    assert tuple(table.shape) == (pruned.details["tokens_kept"], 8)


def test_prune_vocab_slices_a_factorized_table_whose_rows_are_already_stored_in_int4(tiny, tiny_gm):
    # quantize-embeddings before distill (distill then trains through the int4 rows) puts the simulated rows before
    # prune-vocab, which must still cut the table exactly: the rounding is row-local.
    passes = ("  - low-rank: {rank: 16, target: embeddings}\n"
              "  - quantize-embeddings: {dtype: int4, tables: [word], block_size: 16}\n  - prune-vocab: {texts: builtin}")
    state, (_, quantized, pruned) = manager_for(tiny, passes, budget=0.5).run(tiny_gm)
    assert quantized.status == pruned.status == "applied"
    assert pruned.kind == "exact" and pruned.checks["max_abs_error"] <= 1e-4
    assert tuple(get_tensor(state.gm, analyze(state.gm).embeddings.word_weight).shape) == (pruned.details["tokens_kept"], 16)


def test_a_corpus_of_only_heldout_texts_is_refused(tiny, tiny_gm, tmp_path):
    calibration = calibration_for(tiny)
    corpus = tmp_path / "heldout.txt"
    corpus.write_text("\n".join(calibration.heldout_texts))
    with pytest.raises(PassRefused, match="no texts outside the held-out slice"):
        run_pass("prune-vocab", {"texts": str(corpus)}, tiny_gm, tiny, calibration)


def test_compile_writes_the_pruned_tokenizer_and_the_model_takes_its_ids(tiny_dir, tmp_path):
    recipe = write_recipe(tmp_path, f"model: {tiny_dir}\ncalibration: {{samples: 64, validation_samples: 8, max_length: 32}}\n"
                                    "budget: {min: 0.5}\npasses:\n  - prune-vocab: {}\n")
    result = compile_recipe(load_recipe(recipe), tmp_path / "out")
    assert result.exit_code == 0, result.report.get("failure")
    out = tmp_path / "out"
    kept = result.report["passes"][0]["details"]["tokens_kept"]
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert len(tokenizer) == kept == len((out / "vocab.txt").read_text().splitlines())
    assert json.loads((out / "config.json").read_text())["vocab_size"] == kept
    enc = tokenizer([UNSEEN + " " + TEXT], return_tensors="np")
    assert max(enc["input_ids"][0]) < kept and tokenizer.unk_token_id in enc["input_ids"][0]
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    hidden = session.run(None, {name: enc[name].astype("int64") for name in ("input_ids", "attention_mask", "token_type_ids")})[0]
    assert hidden.shape[:2] == enc["input_ids"].shape


def test_a_table_distilled_through_its_int4_rows_is_cut_and_stored_in_int4(tiny_dir, tmp_path):
    # int4 rows before distill (which trains through them), prune-vocab after it: the final ONNX Runtime model keeps
    # the cut table in int4 and agrees with the compiled graph.
    recipe = write_recipe(tmp_path, f"model: {tiny_dir}\ncalibration: {{samples: 160, validation_samples: 8, max_length: 32}}\n"
                                    "budget: {min: 0.3}\npasses:\n  - low-rank: {rank: 16, target: embeddings}\n"
                                    "  - quantize-embeddings: {dtype: int4, tables: [word], block_size: 16}\n"
                                    "  - distill: {steps: 10, batch_size: 8, max_length: 32, lr: 2.0e-3, monitor_every: 5}\n"
                                    "  - prune-vocab: {}\n")
    result = compile_recipe(load_recipe(recipe), tmp_path / "out")
    assert result.exit_code == 0, result.report.get("failure")
    assert [row["status"] for row in result.report["passes"]] == ["applied"] * 4
    kept = result.report["passes"][3]["details"]["tokens_kept"]
    graph = onnx.load(str(tmp_path / "out" / "model.onnx"))
    packed = [t for t in graph.graph.initializer if t.name.endswith("_int4")]  # two int4 values to a byte
    assert [tuple(t.dims) for t in packed] == [(kept, 8)]
    assert result.report["final_check"]["passed"]


@pytest.fixture()
def calibration_reader():
    """A pass after prune-vocab that runs the graph on ctx's calibration batches and tokenizes with ctx's tokenizer."""
    seen = {}

    class ReadsCalibration(Pass):
        name = "test-reads-calibration"
        kind = "exact"

        def run(self, gm, ctx):
            seen["vocab"] = len(ctx.tokenizer)
            seen["max_id"] = max(int(b["input_ids"].max()) for b in ctx.calibration.batches)
            hidden_states(gm)(ctx.calibration.batches[0])  # indexes the pruned table
            return PassResult(gm, modified=False)

    register_pass(ReadsCalibration)
    yield seen
    pass_infra._REGISTRY.pop("test-reads-calibration")


def test_passes_after_prune_vocab_get_batches_and_a_tokenizer_in_the_new_ids(tiny, tiny_gm, calibration_reader):
    passes = "  - prune-vocab: {}\n  - test-reads-calibration: {}"
    _, (pruned, reader) = manager_for(tiny, passes).run(tiny_gm)
    assert reader.status == "unchanged"
    assert calibration_reader["vocab"] == pruned.details["tokens_kept"] > calibration_reader["max_id"]


@pytest.mark.minilm
def test_minilm_keeps_a_few_thousand_tokens_of_python_docs_exactly(minilm, minilm_gm):
    state, (record,) = manager_for(minilm, "  - prune-vocab: {texts: builtin}").run(minilm_gm)
    assert record.status == "applied" and record.checks["max_abs_error"] <= 1e-4
    assert 1000 < record.details["tokens_kept"] < 5000
    assert record.checks["heldout_oov_rate"] < 0.05
