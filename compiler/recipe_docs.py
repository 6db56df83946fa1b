"""docs/recipes.md, written from the recipe schema itself (``bertpress schema --markdown``), so it cannot drift.

Every top-level section and every pass option is listed with its type, default and description, exactly as the
pydantic models in ``compiler/recipe.py`` and ``passes/options.py`` define them; ``tests/test_docs.py`` fails
when the committed page differs from what this module writes.
"""

from __future__ import annotations

import json
import re
import types
import typing
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from .pass_config import PassDeclaration
from .pass_registry import declared_passes, summary_of
from .recipe import RecipeFile

INTRO = """# Recipe reference

A recipe is a YAML file: a few top-level sections, then `passes`, a list of one-key mappings
`- pass-name: {options}` applied in order. Unknown fields are errors (with a "did you mean"), and
`bertpress validate RECIPE` checks a file without compiling it. This page is generated from the schema
(`bertpress schema --markdown > docs/recipes.md`); `bertpress schema` prints the same as JSON Schema for editors.

```yaml
version: 1
model: builtin:minilm-l6          # a local Hugging Face folder, or the packaged all-MiniLM-L6-v2
calibration: {texts: builtin:wordnet, samples: 256}
budget: {metric: cosine, min: 0.98}
passes:
  - prune-heads: {keep: 8}
  - quantize-linear: {dtype: int8}
```
"""


def _type(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Literal:
        return " \\| ".join(json.dumps(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(_type(a) for a in args if a is not type(None)) + (" \\| null" if type(None) in args else "")
    if origin in (list, tuple):
        return f"list[{', '.join(_type(a) for a in args if a is not Ellipsis)}]"
    if origin is dict:
        return "mapping"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "mapping"
    return getattr(annotation, "__name__", str(annotation))


def _default(field) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
    elif field.default is PydanticUndefined:
        return "required"
    else:
        value = field.default
    if isinstance(value, BaseModel):
        return "see below"
    return f"`{json.dumps(value, default=str)}`"


def _cell(text: str) -> str:
    return re.sub(r"\s+", " ", text.replace("|", "\\|")).strip()


def _table(model: type[BaseModel], prefix: str = "") -> list[str]:
    rows = ["| field | type | default | description |", "|---|---|---|---|"]
    nested = []
    for name, field in model.model_fields.items():
        rows.append(f"| `{prefix}{name}` | {_type(field.annotation)} | {_default(field)} | {_cell(field.description or '')} |")
        annotation = field.annotation
        candidates = [annotation, *typing.get_args(annotation)]
        for candidate in candidates:
            if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                nested.append((f"{prefix}{name}.", candidate))
    for sub_prefix, sub_model in nested:
        rows += [""] + _table(sub_model, sub_prefix)[0:]
    return rows


def is_builtin_pass(entry) -> bool:
    module = entry.module if isinstance(entry, PassDeclaration) else entry.__module__
    return module.startswith("passes.")


def recipe_markdown() -> str:
    lines = [INTRO, "## Top level", ""]
    top = [(name, field) for name, field in RecipeFile.model_fields.items()]
    lines += ["| field | type | default | description |", "|---|---|---|---|"]
    sections = []
    for name, field in top:
        models = [a for a in (field.annotation, *typing.get_args(field.annotation))
                  if isinstance(a, type) and issubclass(a, BaseModel)]
        description = field.description or (models[0].__doc__ if models else "") or ""
        lines.append(f"| `{name}` | {_type(field.annotation)} | {_default(field)} | {_cell(description)} |")
        sections += [(name, model) for model in models[:1]]
    for name, model in sections:
        lines += ["", f"## `{name}`", "", _cell(model.__doc__ or ""), ""] + _table(model, f"{name}.")
    lines += ["", "## Passes", "", "Every pass also takes `on_fail: stop | skip | defer` (stop with exit 1 when its check"
              " breaks, or roll it back and go on; defer: a lossy pass that breaks only the budget is kept when a healing"
              " pass such as distill follows, which must bring the model back). Ordering constraints are checked before"
              " anything runs.", ""]
    for name, declared in declared_passes().items():
        if not is_builtin_pass(declared):
            continue  # a plugin documents itself; this page is bertpress's own reference
        lines += [f"### `{name}`", "", _cell(summary_of(declared))]
        order = []
        if declared.must_run_before:
            order.append("runs before " + ", ".join(f"`{n}`" for n in declared.must_run_before))
        if declared.must_run_after:
            order.append("runs after " + ", ".join(f"`{n}`" for n in declared.must_run_after))
        if order:
            lines += ["", "Order: " + "; ".join(order) + " (when both are in the recipe)."]
        fields = {k: v for k, v in declared.Config.model_fields.items() if k != "on_fail"}
        if fields:
            table = _table(declared.Config)
            lines += [""] + [row for row in table if "`on_fail`" not in row]
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"
