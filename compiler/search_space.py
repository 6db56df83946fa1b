"""Searchable recipes: pass options that are spaces instead of values, and the ``tune:`` section.

Any pass option may be ``{search: [a, b, c]}`` (choices) or ``{search: {low: L, high: H, step: S}}`` (a range,
both ends included; ``step`` defaults to 1 for whole numbers and is required otherwise). Every space is finite,
so an exhaustive search enumerates it and every candidate is a plain recipe. ``bertpress validate`` checks
each choice against its pass's Config; ``bertpress compile`` refuses a searchable recipe (``bertpress tune``
searches it and writes the winner as an ordinary recipe).

Torch-free, like the recipe schema that imports it.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field

from .errors import RecipeError

SEARCH = "search"


class Tune(BaseModel):
    """How ``bertpress tune`` searches a recipe's spaces; the recipe's ``budget`` is the constraint it keeps."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    objective: Literal["latency", "size"] = Field(
        "latency", description="What to minimise: latency at batch x seq on this machine (the cost model's roofline"
        " estimate ranks candidates, every compiled one is also timed) or the bytes of the model files.")
    batch: int = Field(32, ge=1, le=4096, description="Batch size latency is estimated and measured at.")
    seq: int = Field(128, ge=1, le=8192, description="Sequence length latency is estimated and measured at.")
    trials: int | None = Field(
        None, ge=1, le=100_000, description="Candidates to consider at most (default: the whole space for"
        " exhaustive, 20 for random and tpe). A candidate screened out by the cost model counts but is not compiled.")
    strategy: Literal["exhaustive", "random", "tpe"] = Field(
        "exhaustive", description="exhaustive: every candidate, cheapest estimate first; random: Optuna's"
        " RandomSampler; tpe: Optuna's TPESampler, told each compiled candidate's objective and budget margin.")
    seed: int = Field(0, ge=0, description="Seed of the sampler (random, tpe).")
    time_limit: float | None = Field(
        None, gt=0, description="Seconds after which no new candidate starts (the running ones finish).")
    margin: float = Field(
        0.1, ge=0.0, le=10.0, description="A candidate whose estimate exceeds that of one already within budget by more"
        " than this fraction is not compiled (recorded as pruned): the cost model ranks, it does not time exactly.")
    eta: int = Field(3, ge=2, le=10, description="Successive halving for distill: each rung keeps 1/eta of the"
                                                 " candidates and gives them eta times more steps.")
    rungs: int = Field(2, ge=1, le=5, description="Distill step counts tried: steps/eta^(rungs-1), ..., steps"
                                                  " (1: every candidate distills fully).")


@dataclass(frozen=True)
class Dimension:
    """One searchable option: where it is in the recipe and the values it may take."""

    index: int  # passes[index]
    pass_name: str
    path: tuple[str, ...]  # keys inside the pass's options
    choices: tuple[Any, ...]
    range: tuple[float, float, float] | None = None  # (low, high, step) when written as a range

    @property
    def name(self) -> str:
        return f"passes[{self.index}].{self.pass_name}." + ".".join(self.path)


def _is_space(value: Any) -> bool:
    return isinstance(value, dict) and len(value) == 1 and SEARCH in value


def _range_values(spec: dict, file: str, field: str) -> tuple[tuple, tuple[float, float, float]]:
    unknown = sorted(set(spec) - {"low", "high", "step"})
    if unknown or "low" not in spec or "high" not in spec:
        raise RecipeError(f"a range needs low and high (and optionally step){f', not {unknown[0]!r}' if unknown else ''}.",
                          file=file, field=field, fix="write {search: {low: 256, high: 1024, step: 128}}.")
    low, high, step = spec["low"], spec["high"], spec.get("step")
    numbers = [v for v in (low, high, step) if v is not None]
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in numbers):
        raise RecipeError("low, high and step of a range must be numbers.", file=file, field=field,
                          fix="write {search: {low: 256, high: 1024, step: 128}}, or list the choices.")
    whole = all(isinstance(v, int) for v in numbers)
    if step is None:
        if not whole:
            raise RecipeError("a range of fractional numbers needs a step (every space is finite).", file=file,
                              field=field, fix="add step, e.g. {search: {low: 0.25, high: 1.0, step: 0.25}}.")
        step = 1
    if step <= 0 or high < low:
        raise RecipeError(f"a range needs low <= high and step > 0 (got low {low}, high {high}, step {step}).",
                          file=file, field=field, fix="swap low and high or use a positive step.")
    count = int(math.floor((high - low) / step + 1e-9)) + 1
    if count > 10_000:
        raise RecipeError(f"the range has {count} values; a search space option may have at most 10,000.", file=file,
                          field=field, fix="use a larger step.")
    values = tuple(low + k * step if whole else round(low + k * step, 10) for k in range(count))
    return values, (low, high, step)


def _walk(options: Any, prefix: tuple[str, ...]):
    if _is_space(options):
        yield prefix, options[SEARCH]
    elif isinstance(options, dict):
        for key, value in options.items():
            yield from _walk(value, prefix + (str(key),))


def find_dimensions(passes: list[Any], file: str = "<recipe>") -> list[Dimension]:
    """The searchable options of a recipe's raw ``passes`` list, in recipe order."""
    found = []
    for index, item in enumerate(passes):
        if not isinstance(item, dict) or len(item) != 1:
            continue  # the recipe loader reports a malformed pass item
        (name, options), = item.items()
        for path, spec in _walk(options, ()):
            field = f"passes[{index}].{name}." + ".".join(path)
            if isinstance(spec, list):
                if not spec:
                    raise RecipeError("the list of choices is empty.", file=file, field=field,
                                      fix="list at least one value, e.g. {search: [256, 512]}.")
                found.append(Dimension(index, str(name), path, tuple(spec)))
            elif isinstance(spec, dict):
                values, bounds = _range_values(spec, file, field)
                found.append(Dimension(index, str(name), path, values, bounds))
            else:
                raise RecipeError(f"search takes a list of choices or a range, got {json.dumps(spec)[:60]}.",
                                  file=file, field=field, fix="write {search: [a, b, c]} or {search: {low: L, high: H, step: S}}.")
    return found


def is_searchable(data: Any) -> bool:
    """Whether a parsed recipe has a ``tune:`` section or any searchable option (``bertpress compile`` refuses it)."""
    if not isinstance(data, dict):
        return False
    passes = data.get("passes")
    spaced = isinstance(passes, list) and any(True for item in passes if isinstance(item, dict)
                                               for options in item.values() for _ in _walk(options, ()))
    return spaced or "tune" in data


def refusal(data: dict, file: str) -> RecipeError:
    """The error ``bertpress compile`` gives a searchable recipe."""
    passes = data.get("passes") if isinstance(data.get("passes"), list) else []
    spaces = []
    for index, item in enumerate(passes):
        if isinstance(item, dict):
            for name, options in item.items():
                spaces += [f"passes[{index}].{name}." + ".".join(path) for path, _ in _walk(options, ())]
    what = f"{spaces[0]} is a search space" if spaces else "it has a tune: section"
    return RecipeError(
        f"is a searchable recipe ({what}); compile needs one value per option.", file=file,
        fix=f"search it with `bertpress tune {file} --out DIR` (it writes DIR/best.yaml, an ordinary recipe that"
            " compile reproduces), or replace each {search: ...} with one value and remove the tune: section.")


def _set(options: dict, path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        options = options[key]
    options[path[-1]] = value


@dataclass(frozen=True)
class Candidate:
    """One point of the space: a choice index per dimension."""

    picks: tuple[int, ...]

    def options(self, space: "SearchSpace") -> dict[str, Any]:
        return {dim.name: dim.choices[pick] for dim, pick in zip(space.dimensions, self.picks)}


@dataclass
class SearchSpace:
    """A searchable recipe: its raw data, the spaces in it and its ``tune`` settings."""

    file: str
    base_dir: Path
    data: dict  # the recipe as parsed YAML, tune section included
    dimensions: list[Dimension]
    tune: Tune

    @property
    def size(self) -> int:
        return math.prod(len(dim.choices) for dim in self.dimensions)

    def candidates(self):
        """Every candidate, in the order of the product of the choices."""
        for picks in itertools.product(*(range(len(dim.choices)) for dim in self.dimensions)):
            yield Candidate(picks)

    def materialize(self, candidate: Candidate, distill_steps: int | None = None) -> dict:
        """The ordinary recipe (no spaces, no tune section) of ``candidate``, with the tune cost point.

        ``distill_steps`` replaces every distill step count (successive halving's shorter rungs).
        """
        data = copy.deepcopy(self.data)
        data.pop("tune", None)
        for dim, pick in zip(self.dimensions, candidate.picks):
            (options,) = data["passes"][dim.index].values()
            _set(options, dim.path, copy.deepcopy(dim.choices[pick]))
        data["cost"] = {"batch": self.tune.batch, "seq": self.tune.seq}
        if distill_steps is not None:
            for item in data["passes"]:
                (name, options), = item.items()
                if name == "distill":
                    options["steps"] = distill_steps
        return data

    def distill_steps(self) -> int | None:
        """The step count of the recipe's distill pass (the full rung), if it has one with a fixed count."""
        for item in self.data.get("passes") or []:
            (name, options), = item.items()
            if name == "distill":
                steps = (options or {}).get("steps")
                return steps if isinstance(steps, int) else None
        return None

    def rung_steps(self) -> list[int | None]:
        """Distill step counts of successive halving's rungs, shortest first ([None]: no distill to shorten)."""
        full = self.distill_steps()
        if full is None or self.tune.rungs == 1:
            return [None]
        steps = [max(1, full // self.tune.eta ** k) for k in range(self.tune.rungs - 1, 0, -1)] + [full]
        return sorted(set(steps))

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.data, sort_keys=True, default=str).encode()).hexdigest()


def recipe_text(data: dict) -> str:
    """A materialized recipe as YAML text: what best.yaml holds and what each trial compiles, byte for byte."""
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=120)


def _absolute_paths(data: dict, base_dir: Path) -> dict:
    """The model and text sources named by relative path, made absolute: a candidate recipe compiles from any folder."""
    data = copy.deepcopy(data)

    def fix(value):
        if isinstance(value, str) and not value.startswith("builtin") and (base_dir / value).exists() \
                and not Path(value).is_absolute():
            return str((base_dir / value).resolve())
        return value

    if isinstance(data.get("model"), str):
        data["model"] = fix(data["model"])
    calibration = data.get("calibration")
    if isinstance(calibration, dict) and "texts" in calibration:
        calibration["texts"] = fix(calibration["texts"])
    for item in data.get("passes") or []:
        if isinstance(item, dict):
            for options in item.values():
                if isinstance(options, dict):
                    for key, value in options.items():
                        if key.endswith("texts") and not _is_space(value):
                            options[key] = [fix(v) for v in value] if isinstance(value, list) else fix(value)
    return data


def load_search_space(path: str | Path) -> SearchSpace:
    """Read and check a searchable recipe: the plain parts as ``bertpress validate`` checks any recipe, and every
    choice of every space against its pass's Config (the other spaces at their first choice)."""
    from .recipe import load_recipe_text

    path = Path(path)
    file = str(path)
    if not path.is_file():
        raise RecipeError("does not exist.", file=file, fix="give the path of a recipe YAML file.")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError):
        load_recipe_text(path.read_text(encoding="utf-8", errors="replace"), file=file)  # raises the usual error
        raise
    if not isinstance(data, dict):
        load_recipe_text(yaml.safe_dump(data), file=file)
        raise RecipeError("must be a YAML mapping at the top level.", file=file, fix="start from one of the files in recipes/.")
    base_dir = path.resolve().parent
    tune_data = data.get("tune") if data.get("tune") is not None else {}
    if not isinstance(tune_data, dict):
        raise RecipeError("tune must be a mapping.", file=file, field="tune", fix="write tune: {objective: latency, strategy: exhaustive}.")
    try:
        tune = Tune.model_validate(tune_data)
    except Exception as exc:  # a pydantic ValidationError: name the field
        from pydantic import ValidationError

        if not isinstance(exc, ValidationError):
            raise
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        raise RecipeError(f"{first['msg']} (got {json.dumps(first.get('input'), default=str)[:60]}).", file=file,
                          field=f"tune.{loc}" if loc else "tune",
                          fix="see the tune section of `bertpress schema` (or docs/tune.md).") from None
    passes = data.get("passes") if isinstance(data.get("passes"), list) else []
    dimensions = find_dimensions(passes, file)
    space = SearchSpace(file, base_dir, _absolute_paths(data, base_dir), dimensions, tune)
    for number, dim in enumerate(dimensions):
        for pick, choice in enumerate(dim.choices):
            if pick == 0 and number > 0:
                continue  # the first candidate was checked with the first dimension
            picks = tuple(pick if i == number else 0 for i in range(len(dimensions)))
            try:
                load_recipe_text(recipe_text(space.materialize(Candidate(picks))), file=file, base_dir=base_dir)
            except RecipeError as error:
                dim_at_fault = next((d for d in dimensions if error.field and error.field.startswith(d.name)), dim)
                shown = dim_at_fault.choices[picks[dimensions.index(dim_at_fault)]]
                raise RecipeError(f"choice {json.dumps(shown, default=str)} of {dim_at_fault.name} is not valid: {error.message}",
                                  file=file, field=dim_at_fault.name, fix=error.fix) from None
    if not dimensions:
        load_recipe_text(recipe_text(space.materialize(Candidate(()))), file=file, base_dir=base_dir)
    return space
