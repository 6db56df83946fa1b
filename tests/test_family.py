"""The BERT family through bertpress: tiny random checkpoints of each member (tests/family_checkpoints.py)."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import onnxruntime as ort
import pytest

from compiler.cli import main
from tests.family_checkpoints import make_family_checkpoint

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


def test_distilbert_is_traced_lowered_and_shipped_without_token_type_ids(family, tmp_path):
    code, out = compile_member(tmp_path, family("distilbert"), "  - quantize-linear: {dtype: int8}")
    assert code == 0
    inputs = [i.name for i in ort.InferenceSession(str(out / "model.onnx")).get_inputs()]
    assert inputs == ["input_ids", "attention_mask"]
    config = json.loads((out / "config.json").read_text())
    assert config["bertpress"]["inputs"] == inputs
    assert json.loads((out / "tokenizer_config.json").read_text())["model_input_names"] == inputs
    assert json.loads((out / "report.json").read_text())["final_check"]["passed"]


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
