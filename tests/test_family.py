"""The BERT family through bertpress: tiny random checkpoints of each member (tests/family_checkpoints.py).

The family x pass matrix: every cell runs its pass through the real pass manager (validated against the
member's transformers model on held-out text), lowers the result to ONNX Runtime and checks that ORT
agrees with the traced graph and passes the held-out budget; a "no" cell is a PassRefused (exit 2)
naming the member and the reason. docs/family.md carries the same matrix, checked here.
"""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import onnxruntime as ort
import pytest

from compiler.cli import main
from compiler.errors import PassRefused
from tests.family_checkpoints import FAMILY, make_family_checkpoint

CALIBRATION = "calibration: {texts: builtin, samples: 16, validation_samples: 8, max_length: 32, batch_size: 8}"


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """member -> its checkpoint folder, built on first use and shared by the module's tests."""
    made: dict[str, Path] = {}

    def folder(member: str) -> Path:
        if member not in made:
            made[member] = make_family_checkpoint(member, tmp_path_factory.mktemp(member))
        return made[member]

    return folder


def compile_member(folder: Path, model: Path, passes: str, budget: float = 0.5) -> tuple[int, Path]:
    recipe = folder / "recipe.yaml"
    recipe.write_text(f"model: {model}\n{CALIBRATION}\nbudget: {{min: {budget}}}\ncost: {{batch: 2, seq: 16}}\n"
                      f"passes:\n{passes}\n")
    out = folder / "out"
    return main(["compile", str(recipe), "--out", str(out)]), out


@pytest.fixture(scope="module")
def distilbert_int8(family, tmp_path_factory) -> Path:
    code, out = compile_member(tmp_path_factory.mktemp("distilbert-int8"), family("distilbert"),
                               "  - quantize-linear: {dtype: int8}")
    assert code == 0
    return out


def test_distilbert_is_traced_lowered_and_shipped_without_token_type_ids(distilbert_int8):
    out = distilbert_int8
    inputs = [i.name for i in ort.InferenceSession(str(out / "model.onnx")).get_inputs()]
    assert inputs == ["input_ids", "attention_mask"]
    config = json.loads((out / "config.json").read_text())
    assert config["bertpress"]["inputs"] == inputs
    assert json.loads((out / "tokenizer_config.json").read_text())["model_input_names"] == inputs
    assert json.loads((out / "report.json").read_text())["final_check"]["passed"]


def test_bench_times_distilbert_against_its_plain_export_without_token_type_ids(distilbert_int8):
    from compiler.benchmark import bench

    figures = bench(distilbert_int8, batch=2, seq=16, threads=1, rounds=2, warmup=1)
    assert figures["compiled"]["median_ms"] > 0 and figures["reference"]["median_ms"] > 0


ACCEPTANCE = """  - layer-drop: {layers: [1]}
  - prune-heads: {keep: 3}
  - quantize-linear: {dtype: int8}"""


@pytest.mark.parametrize("member", ["distilbert", "albert", "deberta-v2"])
def test_member_compiles_with_layer_drop_prune_heads_and_int8_within_budget(member, family, tmp_path):
    code, out = compile_member(tmp_path, family(member), ACCEPTANCE, budget=0.9)
    report = json.loads((out / "report.json").read_text())
    assert code == 0 and report["final_check"]["passed"]
    assert [layer["heads"] for layer in report["model"]["structure_after"]["layers"]] == [3, 3, 3]
    unfused = [note for note in report["lowering"]["notes"] if "attention_bias" in note]
    assert bool(unfused) == (member == "deberta-v2")  # DeBERTa's relative-position terms run outside the fused kernel
    assert not unfused or "GatherND x6" in unfused[0]  # c2p and p2c in each of the 3 layers


def test_deberta_traces_as_one_sdpa_per_layer_equal_to_transformers_eager_attention(family):
    from compiler.frontend import example_inputs, load_model, trace
    from compiler.structure import analyze
    from compiler.validation import hidden_states

    loaded = load_model(str(family("deberta-v2")))
    batch = example_inputs(loaded.tokenizer)
    batch["attention_mask"][1, 9:] = 0
    gm = trace(loaded.model, batch, max_length=loaded.max_length)
    structure = analyze(gm)
    assert len(structure.layers) == 4
    # share_att_key: the relative-position projections are query_proj and key_proj applied to the position table
    position = structure.layers[0].attention.position
    assert sorted(lin.weight.rsplit(".", 2)[-2] for lin in position) == ["key_proj", "query_proj"]
    real = batch["attention_mask"].bool()
    difference = hidden_states(gm)(batch) - hidden_states(loaded.model)(batch)  # the reference runs eager attention
    assert float(difference[real].abs().max()) < 1e-5
    assert "forward" not in vars(loaded.model.encoder.layer[0].attention.self)  # the reference keeps its own


def test_albert_is_one_shared_layer_repeated_behind_an_embedding_projection(family):
    from compiler.frontend import example_inputs, load_model, trace
    from compiler.structure import analyze

    loaded = load_model(str(family("albert")))
    gm = trace(loaded.model, example_inputs(loaded.tokenizer), max_length=loaded.max_length)
    structure = analyze(gm)
    assert structure.tied_layers() == [[0, 1, 2, 3]]
    assert structure.embeddings.norm is not None and structure.embeddings.projection.shape(gm) == (128, 32)
    assert len(structure.layers[0].ffn.activation) > 1  # gelu_new, written out element by element


def test_albert_stores_its_shared_layer_once_after_heads_are_pruned(family, tmp_path):
    code, out = compile_member(tmp_path, family("albert"), "  - prune-heads: {keep: 2}")
    assert code == 0
    shapes = [list(i.dims) for i in onnx.load(str(out / "model.onnx")).graph.initializer]
    # 2 heads of 32 kept: packed q/k/v [128, 3 x 64], output [64, 128], FFN [128, 512] and [512, 128], once each
    assert [shapes.count(shape) for shape in ([128, 192], [64, 128], [128, 512], [512, 128])] == [1, 1, 1, 1]


def test_share_layers_on_albert_is_refused_as_already_shared(family, tmp_path, capsys):
    code, _ = compile_member(tmp_path, family("albert"), "  - share-layers: {groups: [[0, 1]]}")
    assert code == 2
    assert "on AlbertModel: layers [0, 1] already read one set of weights" in capsys.readouterr().err


# One recipe per matrix column (tiny settings: the cells are checks of what applies, not of how well).
CELLS = {
    "layer-drop": "  - layer-drop: {layers: [1]}",
    "prune-heads": "  - prune-heads: {keep: 3}",
    "prune-ffn": "  - prune-ffn: {keep: 256}",
    "quantize-linear": "  - quantize-linear: {dtype: int8}",
    "distill": "  - layer-drop: {layers: [1]}\n"
               "  - distill: {steps: 4, batch_size: 4, max_length: 32, texts: builtin, samples: 200}",
    "share-layers": "  - share-layers: {groups: [[1, 2]]}",
    "low-rank": "  - low-rank: {target: ffn, rank: 32}",
    "low-rank embeddings": "  - low-rank: {target: embeddings, rank_fraction: 0.5}",
    "quantize-embeddings": "  - quantize-embeddings: {dtype: int8}",
    "prune-vocab": "  - prune-vocab: {texts: builtin}",
    "decouple-attention": "  - decouple-attention: {layers: 2, pair_samples: 8, pair_max_length: 32}",
}
# The "no" cells: (member, column) -> words of the refusal.
REFUSED = {
    ("albert", "share-layers"): "already read one set of weights",
    ("distilbert", "decouple-attention"): "takes no token_type_ids",
    ("deberta-v2", "decouple-attention"): "takes no token_type_ids",
    ("roberta", "decouple-attention"): "token-type table has 1 row",
    ("xlm-roberta", "decouple-attention"): "token-type table has 1 row",
}
MATRIX_BUDGET = 0.5  # held-out mean cosine; random weights make every lossy pass cost more than on a trained model
REASONS = {  # what the docs say for a "no" cell
    "already read one set of weights": "no: its layers already share one set of weights",
    "takes no token_type_ids": "no: no token types, so no segments",
    "token-type table has 1 row": "no: one token type (trained on single segments)",
}


# "yes" cells that hold for the tiny checkpoints' tokenizer (WordPiece, as BERT, DistilBERT and ELECTRA ship) but
# not for the one the member usually ships: prune-vocab refuses BPE (RoBERTa) and Unigram (XLM-R, ALBERT, DeBERTa-v3).
WORDPIECE_ONLY = {("roberta", "prune-vocab"), ("xlm-roberta", "prune-vocab"), ("albert", "prune-vocab"),
                  ("deberta-v2", "prune-vocab")}


def matrix_markdown() -> str:
    """The family x pass table of docs/family.md, from CELLS, REFUSED and WORDPIECE_ONLY."""
    lines = ["| pass | " + " | ".join(FAMILY) + " |", "|---|" + "---|" * len(FAMILY)]
    for column in CELLS:
        cells = [REASONS[REFUSED[(m, column)]] if (m, column) in REFUSED
                 else "yes, with a WordPiece tokenizer" if (m, column) in WORDPIECE_ONLY else "yes" for m in FAMILY]
        lines.append(f"| {column} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def traced(family):
    """member -> (loaded model, example batch, traced graph), built once per member."""
    from compiler.frontend import example_inputs, load_model, trace

    made = {}

    def get(member: str):
        if member not in made:
            loaded = load_model(str(family(member)))
            example = example_inputs(loaded.tokenizer)
            made[member] = (loaded, example, trace(loaded.model, example, max_length=loaded.max_length))
        return made[member]

    return get


@pytest.mark.parametrize("column", list(CELLS))
@pytest.mark.parametrize("member", FAMILY)
def test_family_matrix_cell(member, column, traced, tmp_path):
    import copy

    from compiler.compile import _quantize_spec
    from compiler.lowering import lower_to_onnx
    from compiler.runtime import ort_runner, session
    from compiler.simulation import strip_simulation
    from compiler.validation import compare, run_batches
    from tests.helpers import manager_for

    loaded, example, gm = traced(member)
    manager = manager_for(loaded, CELLS[column], budget=MATRIX_BUDGET)
    if (member, column) in REFUSED:
        with pytest.raises(PassRefused) as refused:
            manager.run(copy.deepcopy(gm))
        assert refused.value.exit_code == 2
        assert f"on {type(loaded.model).__name__}: " in refused.value.message
        assert REFUSED[(member, column)] in refused.value.message
        return
    state, records = manager.run(copy.deepcopy(gm))
    assert [r.status for r in records] == ["applied"] * len(records)

    final = copy.deepcopy(state.gm)
    strip_simulation(final)
    # Unfused (the acceptance compiles above lower fused): ONNX Runtime's fusions are checked per member there,
    # and each export here is what the matrix's run time is made of.
    lowered = lower_to_onnx(final, manager.map_inputs(state, [example])[0], tmp_path,
                            quantize=_quantize_spec(state.lowering), fuse=False)
    if state.lowering.get("embedding_precision"):  # as compile stores quantize-embeddings' tables
        from compiler.graph_edit import get_tensor
        from compiler.lowering.embeddings import store_embeddings

        precision = state.lowering["embedding_precision"]
        store_embeddings(lowered.model_path, precision,
                         {t: get_tensor(final, t).detach().numpy() for t in precision}, state.lowering.get("int4_tables"))
    heldout = manager.heldout(state)
    outputs = run_batches(ort_runner(session(lowered.model_path, 1)), heldout)
    agreement = compare(state.outputs, outputs, heldout, manager.pooling)  # ONNX Runtime vs the traced graph
    exact = not state.lowering.get("quantize") and not state.lowering.get("embedding_precision")
    assert agreement.cosine_min > (0.9999 if exact else 0.99)
    assert not exact or agreement.max_abs_error < 1e-3
    assert manager.fidelity(outputs, state).cosine >= MATRIX_BUDGET  # the held-out check


def test_docs_family_matrix_is_the_tested_one():
    docs = (Path(__file__).resolve().parents[1] / "docs" / "family.md").read_text()
    assert matrix_markdown() in docs, "docs/family.md's matrix differs from tests/test_family.py's CELLS/REFUSED:\n" \
        + matrix_markdown()


@pytest.mark.parametrize("member", FAMILY)
def test_cost_model_breaks_every_member_into_storage_and_compute(member, traced):
    from compiler import cost_model
    from compiler.structure import analyze

    loaded, _, gm = traced(member)
    cost = cost_model.estimate(gm, batch=2, seq=16, component_of=analyze(gm).node_component)
    parts = cost.by_component
    for component in ("embeddings", "linear-before-attention", "linear-after-attention", "feed-forward"):
        assert parts[component]["bytes"] > 0 and parts[component]["flops"] > 0, (component, parts[component])
    assert parts["attention-core"]["flops"] > 0
    # nn.Module.parameters() yields a shared tensor once; the cost model counts stored tensors, not their uses
    # (give or take position-id buffers and small traced constants: ALBERT's shared layer alone is 200k)
    unique = sum(p.numel() for p in loaded.model.parameters())
    assert abs(cost.parameters - unique) <= 1024


def test_deberta_prune_heads_cuts_separate_relative_position_projections_with_query_and_key(tmp_path):
    """DeBERTa-v2 without share_att_key has its own pos_query_proj / pos_key_proj; they lose the same heads."""
    import copy

    from transformers import AutoModel

    from compiler.frontend import example_inputs, load_model, trace
    from compiler.graph_edit import get_tensor
    from tests.conftest import copy_minilm_tokenizer
    from tests.family_checkpoints import family_config
    from tests.helpers import manager_for

    config = family_config("deberta-v2")
    config.share_att_key = False
    AutoModel.from_config(config).eval().save_pretrained(tmp_path, safe_serialization=True)
    copy_minilm_tokenizer(tmp_path)
    loaded = load_model(str(tmp_path))
    gm = trace(loaded.model, example_inputs(loaded.tokenizer), max_length=loaded.max_length)
    state, records = manager_for(loaded, "  - prune-heads: {keep: 2}", budget=0.3).run(copy.deepcopy(gm))
    assert records[0].status == "applied"
    for name in ("query_proj", "key_proj", "value_proj", "pos_query_proj", "pos_key_proj"):
        assert get_tensor(state.gm, f"encoder.layer.0.attention.self.{name}.weight").shape == (64, 128), name


def test_albert_repetitions_asked_for_different_head_counts_are_refused(traced):
    import copy

    from tests.helpers import manager_for

    loaded, _, gm = traced("albert")
    with pytest.raises(PassRefused, match=r"on AlbertModel: layers \[0, 1, 2, 3\] repeat one shared layer") as refused:
        manager_for(loaded, "  - prune-heads: {keep: [4, 3, 3, 3]}").run(copy.deepcopy(gm))
    assert refused.value.exit_code == 2 and "keep asks for [3, 4] heads" in refused.value.message


def test_low_rank_embeddings_on_albert_factorizes_its_factorized_table_further(traced):
    import copy

    from compiler.graph_edit import get_tensor
    from compiler.structure import analyze
    from tests.helpers import manager_for

    loaded, _, gm = traced("albert")
    state, records = manager_for(loaded, "  - low-rank: {target: embeddings, rank: 16}", budget=0.3).run(copy.deepcopy(gm))
    assert records[0].status == "applied" and "already factorized" in records[0].details["note"]
    embeddings = analyze(state.gm).embeddings
    assert tuple(get_tensor(state.gm, embeddings.word_weight).shape) == (30522, 16)  # was 30522 x 32
    assert tuple(get_tensor(state.gm, embeddings.projection.weight).shape) == (128, 32)  # ALBERT's own, kept
