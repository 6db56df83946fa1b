"""Every bad input and fault we try, what the user sees, and docs/reliability.md generated from it.

Each case runs the real CLI in-process and checks the exit code, that the message names what it
must, and that nothing was written. `BERTPRESS_WRITE_DOCS=1 pytest tests/test_bad_inputs.py`
rewrites the table; otherwise the test fails when the table is out of date.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from compiler.cli import main
from tests.conftest import TOKENIZER_FILES, make_tiny_bert

DOC = Path(__file__).parent.parent / "docs" / "reliability.md"
BASE = "calibration: {{samples: 16, validation_samples: 8, max_length: 32, batch_size: 8}}\nbudget: {{min: 0.5}}\n"


@dataclass
class Case:
    group: str
    title: str
    recipe: str  # {model} and {data} are filled in
    exit_code: int
    expect: list[str]
    setup: Callable[[Path, Path], None] | None = None
    command: str = "compile"


def _gpt2(data: Path, tiny_dir: Path) -> None:
    from transformers import GPT2Config, GPT2Model

    folder = data / "gpt2"
    GPT2Model(GPT2Config(n_layer=1, n_embd=32, n_head=4, vocab_size=30522, n_positions=64)).save_pretrained(folder)
    for name in TOKENIZER_FILES:
        shutil.copyfile(tiny_dir / name, folder / name)


def _truncated(data: Path, tiny_dir: Path) -> None:
    shutil.copytree(tiny_dir, data / "truncated")
    weights = data / "truncated" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])


def _pickle_only(data: Path, tiny_dir: Path) -> None:
    shutil.copytree(tiny_dir, data / "pickled")
    (data / "pickled" / "model.safetensors").rename(data / "pickled" / "pytorch_model.bin")


def _small_table(data: Path, tiny_dir: Path) -> None:
    shutil.copytree(tiny_dir, data / "mismatch")
    make_tiny_bert(data / "mismatch")  # weights for the same shapes
    config = json.loads((data / "mismatch" / "config.json").read_text())
    (data / "mismatch" / "vocab.txt").write_text((data / "mismatch" / "vocab.txt").read_text() + "\n".join(f"extra{i}" for i in range(50)))
    (data / "mismatch" / "tokenizer.json").unlink()
    (data / "mismatch" / "config.json").write_text(json.dumps(config))


def _files(data: Path, tiny_dir: Path) -> None:
    (data / "empty.txt").write_text("\n\n")
    (data / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))


T = "model: {model}\n" + BASE
CASES = [
    Case("recipe", "malformed YAML", T + "passes:\n  - layer-drop: {{layers: [1]]}}\n", 2, ["line 5", "not valid YAML"]),
    Case("recipe", "misspelled pass name", T + "passes:\n  - quantise-linear: {{}}\n", 2, ["passes[0]", "Did you mean 'quantize-linear'"]),
    Case("recipe", "unknown field in a pass", T + "passes:\n  - layer-drop: {{layer: [1]}}\n", 2, ["passes[0].layer-drop", "Did you mean 'layers'"]),
    Case("recipe", "unknown top-level field", T + "pases: []\n", 2, ["Did you mean 'passes'"]),
    Case("recipe", "wrong type", T.replace("samples: 16", "samples: many"), 2, ["calibration.samples", "valid integer"]),
    Case("recipe", "value out of range (budget above 1)", T.replace("min: 0.5", "min: 1.5"), 2, ["budget.min", "less than or equal to 1"]),
    Case("recipe", "keeping 0 heads", T + "passes:\n  - prune-heads: {{keep: 0}}\n", 2, ["passes[0].prune-heads", "keep must be >= 1"]),
    Case("recipe", "layer index past the end", T + "passes:\n  - layer-drop: {{layers: [9]}}\n", 2, ["recipe.yaml: passes[0].layer-drop", "has 2 blocks"]),
    Case("recipe", "dropping every layer", T + "passes:\n  - layer-drop: {{top: 2}}\n", 2, ["at least one must stay"]),
    Case("recipe", "conflicting options", T + "passes:\n  - layer-drop: {{layers: [1], top: 1}}\n", 2, ["exactly one of"]),
    Case("recipe", "plugin module that does not exist", T + "plugins: [no_such_plugin]\n", 2, ["plugins[0]", "no_such_plugin"]),
    Case("model", "missing folder", "model: {data}/nowhere\n" + BASE, 2, ["does not exist"]),
    Case("model", "non-BERT architecture (GPT-2)", "model: {data}/gpt2\n" + BASE, 2, ["query/key/value linears"], _gpt2),
    Case("model", "truncated safetensors", "model: {data}/truncated\n" + BASE, 2, ["truncated or corrupted"], _truncated),
    Case("model", "pickle-only weights", "model: {data}/pickled\n" + BASE, 2, ["--allow-pickle"], _pickle_only),
    Case("model", "tokenizer larger than the embedding table", "model: {data}/mismatch\n" + BASE, 2, ["embedding table"], _small_table),
    Case("calibration", "empty text file", T.replace("calibration: {{", "calibration: {{texts: {data}/empty.txt, "), 2, ["no texts"], _files),
    Case("calibration", "non-UTF-8 text file", T.replace("calibration: {{", "calibration: {{texts: {data}/latin1.txt, "), 2, ["not UTF-8"], _files),
    Case("calibration", "missing text file", T.replace("calibration: {{", "calibration: {{texts: {data}/none.txt, "), 2, ["does not exist"]),
    Case("fault", "a pass produces NaN", T + "plugins: [tests.faulty_passes]\npasses:\n  - fault-nan: {{}}\n", 1, ["fault-nan", "NaN or Inf"]),
    Case("fault", "a pass produces a shape error", T + "plugins: [tests.faulty_passes]\npasses:\n  - fault-shape: {{}}\n", 1, ["fault-shape", "does not run"]),
    Case("fault", "a failing pass with on_fail: skip", T + "plugins: [tests.faulty_passes]\npasses:\n  - fault-nan: {{on_fail: skip}}\n", 0, ["held-out cosine"]),
]


def _run(case: Case, tmp_path: Path, tiny_dir: Path, capsys) -> tuple[int, str]:
    data = tmp_path / "data"
    data.mkdir()
    if case.setup:
        case.setup(data, tiny_dir)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(case.recipe.format(model=tiny_dir, data=data))
    out = tmp_path / "out"
    code = main([case.command, str(recipe), "--out", str(out)])
    err = capsys.readouterr().err
    if code == 2:
        assert not out.exists(), "bad input must leave nothing on disk"
    if code == 1:
        assert not (out / "model.onnx").exists() and (out / "report.json").is_file()
    assert not list(tmp_path.glob(".out.partial-*"))
    message = err.replace(str(data), "DATA").replace(str(tmp_path), "TMP").replace(str(tiny_dir), "MODEL")
    return code, message


_SEEN: dict[str, tuple[Case, int, str]] = {}


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.title)
def test_bad_input_is_one_clear_message(case, tmp_path, tiny_dir, capsys):
    code, message = _run(case, tmp_path, tiny_dir, capsys)
    assert code == case.exit_code, message
    for text in case.expect:
        assert text in message, f"{text!r} not in {message!r}"
    assert "Traceback" not in message
    _SEEN[case.title] = (case, code, message)


def _render() -> str:
    lines = ["# Reliability: bad input and faults", "",
             "Generated by `tests/test_bad_inputs.py` (rerun with `BERTPRESS_WRITE_DOCS=1 python -m pytest tests/test_bad_inputs.py`).",
             "Every case runs the real CLI on a tiny BERT; exit code 2 is bad input (nothing is written), 1 a failed check",
             "(the output folder holds only the report), 0 success. Paths are shown as TMP, DATA and MODEL.", "",
             "| group | input or fault | exit | what the user sees |", "|---|---|---|---|"]
    for case in CASES:
        _, code, message = _SEEN[case.title]
        shown = " ".join(line.strip() for line in message.splitlines() if "error" in line or "FAILED" in line or "wrote" in line)
        shown = re.sub(r"\s+", " ", shown).replace("|", "\\|")
        shown = re.sub(r" in \d+s;", " in Ns;", shown)
        lines.append(f"| {case.group} | {case.title} | {code} | {shown} |")
    lines += ["", "Faults tested in `tests/test_reliability.py`:", "",
              "| fault | what happens |", "|---|---|",
              "| compile killed with SIGKILL or Ctrl-C (SIGINT) mid-run | the previous output folder is byte-for-byte unchanged; the hidden staging folder is removed (Ctrl-C) or cleaned by the next compile (SIGKILL) |",
              "| compile killed before its first output | no output folder exists |",
              "| disk full while writing | exit 2, `cannot write the output (...): No space left on device. Nothing was written.`; no output, no staging folder |",
              "| output path under a file (not writable) | exit 2, `cannot create the output folder next to ...`, fix: choose a writable location |",
              ""]
    return "\n".join(lines)


def test_reliability_table_lists_every_case():
    if os.environ.get("BERTPRESS_WRITE_DOCS"):
        assert len(_SEEN) == len(CASES), "run the whole module to regenerate the table"
        DOC.write_text(_render())
    text = DOC.read_text()
    missing = [case.title for case in CASES if f"| {case.title} |" not in text]
    assert not missing, f"docs/reliability.md lacks {missing}: rerun with BERTPRESS_WRITE_DOCS=1"
