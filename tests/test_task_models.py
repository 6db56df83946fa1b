"""Task models compile with their heads: classifiers, a num_labels-1 cross-encoder, token taggers and extractive QA.

Each is a tiny random checkpoint saved by transformers with its head; the compiled model.onnx must output the head's
logits under their Hugging Face names, agree with the traced graph in ONNX Runtime, and report the task's metric.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from compiler.calibration import python_docs_pairs, python_docs_texts
from compiler.cli import main
from tests.conftest import save_tiny_checkpoint, write_recipe

LABELS = ["noun.animal", "noun.food", "noun.plant"]


def make_tiny_task_model(folder: Path, head: str, *, num_labels: int = 3, seed: int = 0) -> Path:
    """A random BERT with a transformers head (e.g. 'BertForSequenceClassification') and MiniLM's tokenizer."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=128, num_labels=num_labels,
        id2label={i: f"LABEL_{i}" for i in range(num_labels)} if num_labels != len(LABELS) else dict(enumerate(LABELS)))
    return save_tiny_checkpoint(getattr(transformers, head)(config).eval(), folder, noise=0.05)


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory) -> Path:
    return make_tiny_task_model(tmp_path_factory.mktemp("tiny-classifier"), "BertForSequenceClassification")


@pytest.fixture(scope="module")
def labeled_texts(tmp_path_factory) -> Path:
    """Python-docs sentences labeled (arbitrarily but deterministically) with the classifier's label names."""
    path = tmp_path_factory.mktemp("labeled") / "labeled.jsonl"
    texts = python_docs_texts()[:48]
    path.write_text("".join(json.dumps({"text": t, "label": LABELS[len(t) % 3]}) + "\n" for t in texts))
    return path


def _compile(tmp_path: Path, model: Path, *, texts: str = "builtin", budget: str = "{metric: agreement, min: 0.5}",
             passes: str = "  []", extra: str = "") -> tuple[int, Path]:
    recipe = write_recipe(tmp_path, f"""
model: {model}
{extra}
calibration: {{texts: {texts}, samples: 16, validation_samples: 16, max_length: 32, batch_size: 8}}
budget: {budget}
cost: {{batch: 2, seq: 16}}
passes:
{passes}
""")
    out = tmp_path / "out"
    return main(["compile", str(recipe), "--out", str(out)]), out


def _run(out: Path, texts) -> dict[str, np.ndarray]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out)
    enc = tokenizer(*texts, padding=True, return_tensors="np") if isinstance(texts, tuple) else \
        tokenizer(texts, padding=True, return_tensors="np")
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    feeds = {i.name: enc[i.name].astype(np.int64) for i in sess.get_inputs()}
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds))), enc


def _reference(model_dir: Path, head: str, enc) -> dict:
    import transformers

    model = getattr(transformers, f"Auto{head}").from_pretrained(model_dir).eval()
    with torch.no_grad():
        return model(**{k: torch.from_numpy(v) for k, v in enc.items()})


def test_sequence_classifier_compiles_with_its_logits_and_labels(tmp_path, classifier_dir):
    code, out = _compile(tmp_path, classifier_dir)
    assert code == 0
    outputs, enc = _run(out, ["a short text", "a second and slightly longer text to classify"])
    assert list(outputs) == ["logits"] and outputs["logits"].shape == (2, 3)
    expected = _reference(classifier_dir, "ModelForSequenceClassification", enc).logits.numpy()
    assert np.abs(outputs["logits"] - expected).max() < 1e-3
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["BertForSequenceClassification"]
    assert config["id2label"] == {str(i): name for i, name in enumerate(LABELS)}
    report = json.loads((out / "report.json").read_text())
    assert report["model"]["task"] == "sequence-classification" and report["model"]["num_labels"] == 3
    final = report["final_check"]
    assert final["budget_metric"] == "agreement" and final["metrics"]["agreement"] == 1.0 and final["passed"]


def test_int8_classifier_reports_agreement_per_pass_and_in_the_final_check(tmp_path, classifier_dir):
    code, out = _compile(tmp_path, classifier_dir, passes="  - quantize-linear: {}")
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["lowering"]["quantized"] and 0.5 <= report["passes"][0]["checks"]["agreement"] <= 1.0
    assert "held-out agreement" in (out / "report.md").read_text()
    assert {"agreement", "logits_mse"} <= set(report["final_check"]["metrics"])


def test_labeled_heldout_text_reports_accuracy_and_f1(tmp_path, classifier_dir, labeled_texts):
    code, out = _compile(tmp_path, classifier_dir, texts=str(labeled_texts), budget="{metric: accuracy, min: 0.01}")
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    metrics = report["final_check"]["metrics"]
    assert report["calibration"]["heldout_labeled"]
    assert metrics["accuracy"] == metrics["reference_accuracy"] and 0.0 <= metrics["f1"] <= 1.0
    assert report["final_check"]["budget_value"] == metrics["accuracy"]


def test_accuracy_budget_without_labels_exits_2(tmp_path, classifier_dir, capsys):
    code, out = _compile(tmp_path, classifier_dir, budget="{metric: accuracy, min: 0.5}")
    assert code == 2 and not out.exists()
    assert "budget.metric" in capsys.readouterr().err


def test_cross_encoder_score_compiles_with_a_spearman_budget(tmp_path):
    model = make_tiny_task_model(tmp_path / "reranker", "BertForSequenceClassification", num_labels=1)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"text": a, "text_pair": b}) + "\n" for a, b in python_docs_pairs()[:48]))
    code, out = _compile(tmp_path, model, texts=str(pairs), budget="{metric: spearman, min: 0.9}",
                         passes="  - quantize-linear: {}")
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["final_check"]["budget_metric"] == "spearman" and report["final_check"]["metrics"]["spearman"] >= 0.9
    outputs, _ = _run(out, (["what is a list?"], ["A list is a mutable sequence."]))
    assert list(outputs) == ["logits"] and outputs["logits"].shape == (1, 1)


def test_cosine_budget_on_a_single_score_model_exits_2(tmp_path):
    model = make_tiny_task_model(tmp_path / "reranker", "BertForSequenceClassification", num_labels=1)
    code, _ = _compile(tmp_path, model, budget="{metric: cosine, min: 0.9}")
    assert code == 2


def test_token_classifier_outputs_per_token_logits(tmp_path):
    model = make_tiny_task_model(tmp_path / "tagger", "BertForTokenClassification", num_labels=5)
    code, out = _compile(tmp_path, model, passes="  - quantize-linear: {}")
    assert code == 0
    outputs, enc = _run(out, ["tag every token of this sentence", "and this one"])
    assert list(outputs) == ["logits"] and outputs["logits"].shape == (*enc["input_ids"].shape, 5)
    assert json.loads((out / "config.json").read_text())["architectures"] == ["BertForTokenClassification"]
    assert "agreement" in json.loads((out / "report.json").read_text())["final_check"]["metrics"]


def test_question_answering_outputs_start_and_end_logits(tmp_path):
    model = make_tiny_task_model(tmp_path / "qa", "BertForQuestionAnswering", num_labels=2)
    code, out = _compile(tmp_path, model)
    assert code == 0
    outputs, enc = _run(out, (["who wrote it?"], ["It was written by a committee of three people."]))
    assert list(outputs) == ["start_logits", "end_logits"]
    expected = _reference(model, "ModelForQuestionAnswering", enc)
    assert np.abs(outputs["start_logits"] - expected.start_logits.numpy()).max() < 1e-3
    assert np.abs(outputs["end_logits"] - expected.end_logits.numpy()).max() < 1e-3


def test_layer_drop_keeps_the_classifier_head(tmp_path, classifier_dir):
    code, out = _compile(tmp_path, classifier_dir, budget="{metric: agreement, min: 0.05}",
                         passes="  - layer-drop: {layers: [1]}")
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["passes"][0]["status"] == "applied" and report["model"]["structure_after"]["pooler"]
    outputs, _ = _run(out, ["one text"])
    assert outputs["logits"].shape == (1, 3)


def test_a_head_bertpress_cannot_carry_exits_2(tmp_path, capsys):
    model = make_tiny_task_model(tmp_path / "mc", "BertForMultipleChoice", num_labels=2)
    code, out = _compile(tmp_path, model)
    assert code == 2 and not out.exists()
    err = capsys.readouterr().err
    assert "BertForMultipleChoice" in err and "task: feature-extraction" in err


def test_asking_for_a_head_the_checkpoint_lacks_exits_2(tmp_path, tiny_dir, capsys):
    code, _ = _compile(tmp_path, tiny_dir, extra="task: sequence-classification")
    assert code == 2
    assert "no sequence-classification head" in capsys.readouterr().err


def test_feature_extraction_task_compiles_a_classifiers_encoder_alone(tmp_path, classifier_dir):
    code, out = _compile(tmp_path, classifier_dir, extra="task: feature-extraction", budget="{metric: cosine, min: 0.9}")
    assert code == 0
    outputs, _ = _run(out, ["one text"])
    assert next(iter(outputs)) == "last_hidden_state"
    assert json.loads((out / "report.json").read_text())["model"]["task_notes"]


def test_distill_trains_a_classifier_on_its_logits(tmp_path, classifier_dir):
    code, out = _compile(tmp_path, classifier_dir, budget="{metric: agreement, min: 0.05}", passes="""
  - layer-drop: {layers: [1]}
  - distill: {steps: 6, batch_size: 4, monitor_every: 3, texts: builtin, samples: 96, losses: {output: 0.0, hidden: 1.0, attention: 1.0, logits: 1.0}, on_fail: skip}
""")
    assert code == 0
    distill = json.loads((out / "report.json").read_text())["passes"][1]
    assert distill["details"]["curve"][-1]["logits"] >= 0.0
    assert "agreement_before" in distill["checks"]


@pytest.mark.parametrize("head, labels", [("BertForSequenceClassification", 3), ("BertForTokenClassification", 4),
                                          ("BertForQuestionAnswering", 2)])
def test_importance_passes_score_a_task_model_on_its_head(tmp_path, head, labels):
    model = make_tiny_task_model(tmp_path / "model", head, num_labels=labels)
    code, out = _compile(tmp_path, model, budget="{metric: agreement, min: 0.01}", passes="""
  - prune-heads: {keep: 3, importance: gradient}
  - layer-drop: {count: 1}
""")
    assert code == 0
    heads, drop = json.loads((out / "report.json").read_text())["passes"]
    assert heads["status"] == "applied" and drop["status"] == "applied"
    assert "calibration_negative_divergence" in drop["details"]["importance"][0]


def test_cross_encoder_distills_on_sentence_pairs(tmp_path):
    model = make_tiny_task_model(tmp_path / "reranker", "BertForSequenceClassification", num_labels=1)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"text": a, "text_pair": b}) + "\n" for a, b in python_docs_pairs()[:120]))
    code, out = _compile(tmp_path, model, texts=str(pairs), budget="{metric: spearman, min: 0.05}", passes="""
  - layer-drop: {layers: [1]}
  - distill: {steps: 4, batch_size: 4, monitor_every: 2, texts: pairs.jsonl, samples: 100, on_fail: skip}
""")
    assert code == 0
    distill = json.loads((out / "report.json").read_text())["passes"][1]
    assert distill["details"]["training_texts"] > 0 and "spearman_before" in distill["checks"]
    assert distill["details"]["curve"][-1]["logits"] >= 0.0


def test_per_token_labels_give_a_taggers_accuracy(tmp_path):
    from transformers import AutoTokenizer

    model = make_tiny_task_model(tmp_path / "tagger", "BertForTokenClassification", num_labels=4)
    tokenizer = AutoTokenizer.from_pretrained(model)
    lines = []
    for text in python_docs_texts()[:40]:
        n = len(tokenizer(text, truncation=True, max_length=32)["input_ids"])
        lines.append(json.dumps({"text": text, "labels": [-100] + [i % 4 for i in range(n - 2)] + [-100]}) + "\n")
    texts = tmp_path / "tagged.jsonl"
    texts.write_text("".join(lines))
    code, out = _compile(tmp_path, model, texts=str(texts), budget="{metric: accuracy, min: 0.01}")
    assert code == 0
    metrics = json.loads((out / "report.json").read_text())["final_check"]["metrics"]
    assert metrics["accuracy"] == metrics["reference_accuracy"] and 0.0 < metrics["accuracy"] < 1.0


@pytest.mark.parametrize("passes", ["  - decouple-attention: {layers: 1}", "  - prune-vocab: {}"])
def test_passes_that_cannot_keep_a_token_head_refuse_with_exit_2(tmp_path, passes, capsys):
    model = make_tiny_task_model(tmp_path / "qa", "BertForQuestionAnswering", num_labels=2)
    code, out = _compile(tmp_path, model, passes=passes)
    assert code == 2 and not out.exists()
    assert "question-answering model" in capsys.readouterr().err
