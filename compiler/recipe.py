"""The recipe schema: YAML parsed with ``yaml.safe_load`` into pydantic models, one config per pass.

Every mistake becomes a :class:`RecipeError` that names the file, the field path (``passes[1]``)
and a fix, with "did you mean" suggestions for misspelled names.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, model_serializer, model_validator

from .errors import RecipeError
from .tasks import LOWER_IS_BETTER
from .search_space import Tune, is_searchable, refusal as searchable_refusal
from .pass_config import PassConfig
from .pass_registry import declared_passes, get_declaration, load_plugins, summary_of

RECIPE_VERSION = 1


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Calibration(_Strict):
    """Unlabeled text the passes calibrate on; a held-out slice of it validates every pass."""

    texts: str = Field(
        "builtin",
        description="'builtin' (Python's own reference documentation, shipped with Python), 'builtin:python-docs',"
        " 'builtin:wordnet' (Debian package wordnet-base), 'builtin:python-docstrings' (the docstrings of Python's"
        " standard library), 'builtin:fortunes' (Debian package fortunes;"
        " 'builtin:fortunes-train' and 'builtin:fortunes-heldout' split it by subject), 'builtin:jargon' (the"
        " Jargon File's sentences, Debian package dict-jargon), 'builtin:austen' (the sentences of Jane Austen's six"
        " novels, Debian package r-cran-janeaustenr and the Python package rdata),"
        " 'builtin:wordnet-pairs' / 'builtin:python-docs-pairs'"
        " (two-segment sentence pairs, for decouple-attention), a .txt file (one text per line), a .jsonl file"
        " (objects with a 'text' field) or a folder of such files. Relative paths are relative to the recipe.",
    )
    samples: int = Field(256, ge=8, le=100_000, description="How many texts to sample (seeded) for calibration.")
    validation_samples: int = Field(
        64, ge=4, le=10_000,
        description="How many further texts are held out from calibration and used only to validate passes.",
    )
    max_length: int = Field(128, ge=8, le=4096, description="Tokens per text (longer texts are truncated).")
    batch_size: int = Field(16, ge=1, le=1024, description="Batch size for calibration and validation runs.")
    seed: int = Field(0, ge=0, description="Seed of the sampling; same seed, same texts.")


class Budget(_Strict):
    """How close to the reference the compiled model must stay, checked after lossy passes and lowering."""

    metric: Literal["cosine", "agreement", "accuracy", "f1", "spearman", "logits_mse"] = Field(
        "cosine",
        description="cosine: mean cosine of the pooled sentence embedding to the reference's (a task model: of its"
        " logits). Task models (see `task`) also take: agreement (share of held-out texts, or tokens, whose top label"
        " matches the reference's), accuracy and f1 (macro; against the labels of a labeled .jsonl held-out text),"
        " spearman (rank correlation of a num_labels-1 regression or reranker score with the reference's) and"
        " logits_mse (mean squared logit error, bounded by `max`).",
    )
    min: float = Field(0.98, gt=0.0, le=1.0, description="Lowest acceptable value of the metric on held-out text.")
    max: float | None = Field(None, gt=0.0, description="logits_mse only: the highest acceptable mean squared error.")

    @model_validator(mode="after")
    def _bound_fits_metric(self):
        lower_is_better = self.metric in LOWER_IS_BETTER
        if lower_is_better and self.max is None:
            raise ValueError(f"metric {self.metric} is bounded from above: give budget.max (e.g. max: 0.01)")
        if lower_is_better and "min" in self.model_fields_set and self.min != Budget.model_fields["min"].default:
            raise ValueError(f"metric {self.metric} is bounded by max, not min: remove budget.min")
        if not lower_is_better and self.max is not None:
            raise ValueError(f"budget.max only bounds {', '.join(LOWER_IS_BETTER)}; metric {self.metric} uses min")
        return self

    @model_serializer(mode="wrap")
    def _without_an_unused_max(self, handler):
        # max bounds logits_mse only; leaving it out otherwise keeps every other recipe's normalized form (and cache key).
        return {key: value for key, value in handler(self).items() if not (key == "max" and value is None)}

    def passed(self, value: float) -> bool:
        return value <= self.max if self.metric in LOWER_IS_BETTER else value >= self.min

    def describe(self, value: float) -> str:
        """'held-out agreement 0.9700 < 0.99': the measured value against the bound it broke or kept."""
        bound = f"{'<=' if self.passed(value) else '>'} {self.max}" if self.metric in LOWER_IS_BETTER else \
            f"{'>=' if self.passed(value) else '<'} {self.min}"
        return f"held-out {'mean ' if self.metric == 'cosine' else ''}{self.metric} {value:.4f} {bound}"


class CostPoint(_Strict):
    """The input shape the cost model estimates FLOPs and latency at."""

    batch: int = Field(32, ge=1, le=4096, description="Sequences per batch the cost model estimates at.")
    seq: int = Field(128, ge=1, le=8192, description="Tokens per sequence the cost model estimates at.")


class Target(_Strict):
    """The runtime the model is lowered for and checked on."""

    runtime: Literal["onnxruntime"] = Field("onnxruntime", description="The only runtime: ONNX Runtime on the CPU.")
    threads: int = Field(2, ge=1, le=256, description="Intra-op threads of the ONNX Runtime session.")
    fusions: bool = Field(True, description="Apply ONNX Runtime transformer fusions (attention, layer norm, gelu).")


class RecipeFile(_Strict):
    """Top level of a recipe file (pass configs are typed per pass, see ``passes``)."""

    version: Literal[1] = Field(1, description="Recipe format version.")
    model: str = Field("builtin:minilm-l6", description="A local Hugging Face folder or builtin:minilm-l6.")
    task: Literal["feature-extraction", "sequence-classification", "token-classification", "question-answering"] | None = Field(
        None,
        description="The head to compile with the encoder; by default the one config.json's architectures names"
        " (BertForSequenceClassification: sequence-classification, BertModel: feature-extraction). feature-extraction"
        " on a task checkpoint compiles its encoder alone.",
    )
    calibration: Calibration = Calibration()
    budget: Budget = Budget()
    cost: CostPoint = CostPoint()
    plugins: list[str] = Field(default_factory=list, description="Modules to import that register custom passes.")
    passes: list[dict[str, Any]] = Field(
        default_factory=list,
        description="Passes in order; each item is a one-key mapping {pass-name: {config}}.",
    )
    target: Target = Target()
    tune: Tune | None = Field(
        None, exclude=True, description="How `bertpress tune` searches the recipe's {search: ...} options (a recipe"
        " with this section or any search space is tuned, not compiled).")


class PassStep(BaseModel):
    """One resolved pass in a recipe: its registered name and typed config."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    name: str
    config: PassConfig

    def as_dict(self) -> dict[str, Any]:
        return {self.name: self.config.model_dump(mode="json")}


class Recipe(BaseModel):
    """A validated recipe: the top-level settings and the typed pass steps."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    source: str
    base_dir: Path
    file: RecipeFile
    steps: list[PassStep]

    def normalized(self) -> dict[str, Any]:
        """The recipe with every default filled in: compiling it again gives the same model."""
        data = self.file.model_dump(mode="json")
        data["passes"] = [step.as_dict() for step in self.steps]
        return data

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.normalized(), sort_keys=True).encode()).hexdigest()


def _suggest(word: str, options: list[str]) -> str:
    close = difflib.get_close_matches(word, options, n=1, cutoff=0.5)
    return f" Did you mean {close[0]!r}?" if close else ""


def _loc(parts: tuple) -> str:
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _validation_error(exc: ValidationError, model: type[BaseModel], file: str, prefix: str) -> RecipeError:
    first = exc.errors()[0]
    loc = first["loc"]
    path = prefix + (("." if prefix and loc and not isinstance(loc[0], int) else "") + _loc(loc) if loc else "")
    if first["type"] == "extra_forbidden":
        # Walk the model to the parent of the unknown field so the suggestion lists its siblings.
        parent: Any = model
        for part in loc[:-1]:
            field = getattr(parent, "model_fields", {}).get(part) if isinstance(part, str) else None
            parent = field.annotation if field is not None else parent
        valid = sorted(getattr(parent, "model_fields", {}).keys())
        return RecipeError(
            f"unknown field {loc[-1]!r}.{_suggest(str(loc[-1]), valid)}",
            file=file, field=path, fix=f"valid fields here are: {', '.join(valid)}.",
        )
    value = first.get("input")
    shown = json.dumps(value, default=str)[:80] if value is not None else "missing"
    return RecipeError(
        f"{first['msg']} (got {shown}).", file=file, field=path,
        fix="see `bertpress schema` for the type and range of this field.",
    )


def parse_step(item: Any, index: int, file: str) -> PassStep:
    field = f"passes[{index}]"
    names = sorted(declared_passes())
    if isinstance(item, str):
        item = {item: {}}
    if not isinstance(item, dict) or len(item) != 1:
        raise RecipeError(
            "each pass must be a one-key mapping like `- layer-drop: {layers: [5]}`.",
            file=file, field=field, fix=f"write the pass name as the key; valid names: {', '.join(names)}.",
        )
    (name, options), = item.items()
    cls = get_declaration(str(name))
    if cls is None:
        raise RecipeError(
            f"unknown pass {name!r}.{_suggest(str(name), names)}",
            file=file, field=field, fix=f"valid pass names are: {', '.join(names)}.",
        )
    options = {} if options is None else options
    if not isinstance(options, dict):
        raise RecipeError(f"the options of {name!r} must be a mapping, got {type(options).__name__}.",
                          file=file, field=f"{field}.{name}", fix="write them as {key: value, ...}.")
    try:
        config = cls.Config.model_validate(options)
    except ValidationError as exc:
        raise _validation_error(exc, cls.Config, file, f"{field}.{name}") from None
    return PassStep(name=str(name), config=config)


def _check_order(steps: list[PassStep], file: str) -> None:
    """Check the passes' declared ordering constraints as a graph: first against each other, then the recipe's order.

    A constraint only applies when both passes are in the recipe ("quantize after pruning, if you prune").
    """
    present = sorted({step.name for step in steps})
    edges = []  # (a, b, by): a must run before b, as pass "by" declared
    for name in present:
        cls = get_declaration(name)
        edges += [(name, later, name) for later in cls.must_run_before if later in present and later != name]
        edges += [(earlier, name, name) for earlier in cls.must_run_after if earlier in present and earlier != name]
    if not edges:
        return
    import networkx as nx

    before = nx.DiGraph()
    for a, b, by in edges:
        before.add_edge(a, b, by=by)
    try:
        cycle = nx.find_cycle(before)
    except nx.NetworkXNoCycle:
        cycle = []
    if cycle:
        rules = "; ".join(f"{before.edges[a, b]['by']!r} says {a!r} must run before {b!r}" for a, b in cycle)
        names = " and ".join(repr(a) for a, _ in cycle)
        raise RecipeError(
            f"the ordering constraints of {names} contradict each other ({rules}), so no order of these passes works.",
            file=file, field="passes", fix="remove one of them from the recipe (or fix the plugin that declares the constraint).",
        )
    for index, step in enumerate(steps):
        for earlier_index, earlier in enumerate(steps[:index]):
            if before.has_edge(step.name, earlier.name):
                declared = before.edges[step.name, earlier.name]["by"]
                raise RecipeError(
                    f"{step.name!r} must run before {earlier.name!r} ({declared!r} declares it), but"
                    f" passes[{earlier_index}] ({earlier.name}) comes first.",
                    file=file, field=f"passes[{index}]", fix=f"move {step.name!r} above {earlier.name!r}.",
                )


def load_recipe_text(text: str, *, file: str = "<recipe>", base_dir: Path | None = None) -> Recipe:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown position"
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise RecipeError(f"is not valid YAML at {where}: {problem}.", file=file,
                          fix="fix the YAML syntax there (indentation, a missing ':' or an unclosed bracket).") from None
    if data is None:
        raise RecipeError("is empty.", file=file, fix="start from one of the files in recipes/.")
    if not isinstance(data, dict):
        raise RecipeError(f"must be a YAML mapping at the top level, got {type(data).__name__}.", file=file,
                          fix="start from one of the files in recipes/.")
    if is_searchable(data):  # bertpress tune reads these (compiler/search_space.py); a compile needs plain values
        raise searchable_refusal(data, file)
    try:
        recipe_file = RecipeFile.model_validate(data)
    except ValidationError as exc:
        raise _validation_error(exc, RecipeFile, file, "") from None
    load_plugins(recipe_file.plugins, file=file)
    steps = [parse_step(item, index, file) for index, item in enumerate(recipe_file.passes)]
    _check_order(steps, file)
    base = base_dir if base_dir is not None else Path.cwd()
    return Recipe(source=file, base_dir=base, file=recipe_file, steps=steps)


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise RecipeError("does not exist.", file=str(path), fix="give the path of a recipe YAML file, e.g. recipes/minilm-int8.yaml.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise RecipeError("is not UTF-8 text.", file=str(path), fix="save the recipe as UTF-8.") from None
    return load_recipe_text(text, file=str(path), base_dir=path.resolve().parent)


def recipe_json_schema() -> dict[str, Any]:
    """JSON Schema of recipe files, with each pass's typed config, for editors and CI."""
    steps = []
    for name, declared in declared_passes().items():
        step = create_model(
            f"Step_{name.replace('-', '_')}", __config__=ConfigDict(extra="forbid"),
            **{name: (declared.Config, Field(..., description=summary_of(declared)))},
        )
        steps.append(step)
    union = Union[tuple(steps)] if steps else dict  # noqa: UP007
    typed = create_model("Recipe", __base__=RecipeFile, passes=(list[union], Field(default_factory=list)))
    schema = typed.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "bertpress recipe"
    return schema
