"""Compiled task models load unchanged in the clients people serve them with, in the clients' own environment.

Optimum's ORTModelForSequenceClassification / ORTModelForTokenClassification / ORTModelForQuestionAnswering and
sentence-transformers' CrossEncoder(..., backend="onnx") pin transformers 4.x, so, as in tests/test_ecosystem.py,
a script runs them in the cached loader environment and compares their outputs with a plain ONNX Runtime session's.
"""

from __future__ import annotations

import json
import subprocess
import textwrap

import pytest

from tests.test_ecosystem import loader_python  # noqa: F401  (the fixture)
from tests.test_task_models import _compile, make_tiny_task_model

LOADER = textwrap.dedent('''
"""Runs inside the loader environment: load a compiled task model with its client, print JSON."""
import json
import sys

import numpy as np
import onnxruntime as ort
import torch
from transformers import AutoTokenizer

folder, client = sys.argv[1], sys.argv[2]
questions = ["who wrote the report?", "what is a list?"]
contexts = ["The report was written by a committee of three people.", "A list is a mutable sequence of items."]
tokenizer = AutoTokenizer.from_pretrained(folder)
enc = tokenizer(questions, contexts, padding=True, return_tensors="np")
feed = {k: enc[k].astype(np.int64) for k in ("input_ids", "attention_mask", "token_type_ids")}
session = ort.InferenceSession(f"{folder}/model.onnx", providers=["CPUExecutionProvider"])
names = [o.name for o in session.get_outputs()]
plain = dict(zip(names, session.run(None, feed)))
tensors = {k: torch.from_numpy(v) for k, v in feed.items()}
result = {"outputs": names}
if client == "cross-encoder":
    from sentence_transformers import CrossEncoder

    model = CrossEncoder(folder, backend="onnx", device="cpu", activation_fn=torch.nn.Identity())
    scores = np.asarray(model.predict(list(zip(questions, contexts))), dtype=np.float32).reshape(-1)
    result["class"] = type(model).__name__
    result["max_abs_vs_ort"] = float(np.abs(scores - plain["logits"].reshape(-1)).max())
else:
    import optimum.onnxruntime as ortmodels

    cls = getattr(ortmodels, client)
    model = cls.from_pretrained(folder, provider="CPUExecutionProvider")
    with torch.no_grad():
        out = model(**tensors)
    result["class"] = type(model).__name__
    result["max_abs_vs_ort"] = max(float(np.abs(getattr(out, name).numpy() - plain[name]).max()) for name in names)
print(json.dumps(result))
''')

CASES = {  # client -> (transformers head, num_labels)
    "ORTModelForSequenceClassification": ("BertForSequenceClassification", 3),
    "ORTModelForTokenClassification": ("BertForTokenClassification", 5),
    "ORTModelForQuestionAnswering": ("BertForQuestionAnswering", 2),
    "cross-encoder": ("BertForSequenceClassification", 1),
}


@pytest.mark.parametrize("client", sorted(CASES))
def test_compiled_task_model_loads_in_its_client(client, loader_python, tmp_path):  # noqa: F811
    head, labels = CASES[client]
    model = make_tiny_task_model(tmp_path / "model", head, num_labels=labels)
    budget = "{metric: spearman, min: 0.5}" if labels == 1 else "{metric: agreement, min: 0.5}"
    code, out = _compile(tmp_path, model, budget=budget, passes="  - quantize-linear: {}")
    assert code == 0
    script = tmp_path / "loader.py"
    script.write_text(LOADER)
    done = subprocess.run([str(loader_python), str(script), str(out), client], capture_output=True, text=True,
                          timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["max_abs_vs_ort"] < 1e-4, result
    assert result["outputs"] == (["start_logits", "end_logits"] if head.endswith("QuestionAnswering") else ["logits"])
