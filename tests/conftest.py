"""Shared fixtures: a tiny random BERT saved as a real HF folder, and the real MiniLM."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from compiler.frontend import example_inputs, load_model, resolve_model_path, trace

MINILM = "builtin:minilm-l6"
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def make_tiny_bert(folder: Path, *, layers: int = 2, hidden: int = 32, heads: int = 4, intermediate: int = 64,
                   seed: int = 0) -> Path:
    """A random BertModel with MiniLM's tokenizer (so real text tokenizes), saved as safetensors."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=30522, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                        intermediate_size=intermediate, max_position_embeddings=128)
    return save_tiny_checkpoint(BertModel(config).eval(), folder, noise=0.02)


def save_tiny_checkpoint(model: torch.nn.Module, folder: Path, *, noise: float) -> Path:
    """Save a random model, every parameter nudged by ``noise`` (random init has tiny biases and unit norms; make
    every parameter matter for the checks), as safetensors with MiniLM's tokenizer."""
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * noise)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    copy_minilm_tokenizer(folder)
    return folder


def copy_minilm_tokenizer(folder: Path) -> None:
    """MiniLM's WordPiece tokenizer files, so real text tokenizes for any tiny checkpoint."""
    source = resolve_model_path(MINILM)
    for name in TOKENIZER_FILES:
        shutil.copyfile(source / name, folder / name)


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """Tests never read or write the user's cache (~/.cache/bertpress): a roofline measured while the suite
    loads the machine would otherwise be read back by later real compiles, and theirs would leak into tests.
    The pass store is off, so no test replays another's distillation; tests/test_pass_store.py turns it on."""
    patch = pytest.MonkeyPatch()
    patch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg-cache")))
    patch.setenv("BERTPRESS_PASS_STORE", "off")
    yield
    patch.undo()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def tiny(tiny_dir):
    return load_model(str(tiny_dir))


@pytest.fixture()
def tiny_gm(tiny):
    return trace(tiny.model, example_inputs(tiny.tokenizer), max_length=tiny.max_length)


@pytest.fixture(scope="session")
def minilm():
    return load_model(MINILM)


@pytest.fixture()
def minilm_gm(minilm):
    return trace(minilm.model, example_inputs(minilm.tokenizer), max_length=minilm.max_length)


def write_recipe(folder: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = folder / name
    path.write_text(text)
    return path


def compile_tiny_int8(folder: Path, model_dir: Path) -> Path:
    """Compile the tiny model with quantize-linear through the CLI into folder/out (cost at batch 2, seq 16)."""
    from compiler.cli import main

    recipe = write_recipe(folder, f"""
model: {model_dir}
calibration: {{texts: builtin, samples: 16, validation_samples: 8, max_length: 32, batch_size: 8}}
budget: {{min: 0.5}}
cost: {{batch: 2, seq: 16}}
passes:
  - quantize-linear: {{}}
""")
    out = folder / "out"
    assert main(["compile", str(recipe), "--out", str(out)]) == 0
    return out
