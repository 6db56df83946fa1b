"""The pass contract: what a pass is, what it returns, and how it is registered.

A pass is a class with a pydantic ``Config``, a ``kind`` ("exact" or "lossy"), and a ``run`` method
that rewrites a ``torch.fx.GraphModule`` and returns a :class:`PassResult`. The pass manager is the
only place that validates, rolls back, costs and reports: a pass never checks its own numerics.

Built-in passes use this same API. Third-party passes register with :func:`register_pass`, through
the ``bertpress.passes`` entry-point group, or by naming their module in a recipe's ``plugins``. The
torch-free half of the contract (``PassConfig``, declarations, the registry by name) lives in
``compiler/pass_config.py`` and ``compiler/pass_registry.py`` so that reading a recipe needs no torch.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Literal

import torch

from .errors import PassRefused
from .pass_config import PassConfig, PassDeclaration, PerLayerKeepConfig
from .pass_registry import _REGISTRY, add_class, get_pass, load_plugins, registered_passes

if TYPE_CHECKING:
    from .calibration import CalibrationData
    from .structure import BertStructure


class InputMap:
    """How inputs of the graph before a pass become inputs of the graph after it.

    A pass that changes the graph's input interface (prune-vocab renumbers token ids) returns one, so
    the manager can feed the graph after it the batches it tokenized for the reference, and later
    passes and the driver get batches and a tokenizer that fit the new interface.
    """

    tokenizer: Any = None  # the tokenizer that turns text into the new inputs (None: unchanged)

    def map_batch(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def restore(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The inverse: new inputs as the graph before the pass takes them (to check an exact pass on equal tokens)."""
        raise NotImplementedError

    def lossless(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Bool [batch, seq] over old inputs: tokens the new interface keeps (the rest lose meaning, e.g. become [UNK])."""
        return torch.ones_like(batch["input_ids"], dtype=torch.bool)


@dataclass
class PassResult:
    """What a pass hands back: the graph, whether it changed, and facts for the report."""

    graph_module: torch.fx.GraphModule
    modified: bool
    details: dict[str, Any] = field(default_factory=dict)
    # Instructions for lowering that the graph itself cannot carry (e.g. "quantize these linears to int8").
    lowering: dict[str, Any] = field(default_factory=dict)
    # Set by a pass that changed what the graph takes as input (see InputMap).
    inputs: InputMap | None = None


@dataclass
class PassContext:
    """What a pass may read besides the graph: the analyses, calibration text and the reference."""

    structure_of: Any  # callable(gm) -> BertStructure, cached by the manager
    calibration: "CalibrationData"
    reference: torch.nn.Module
    tokenizer: Any
    model_config: Any
    lowering: dict[str, Any]  # hints accumulated by earlier passes (read-only for passes)
    seed: int = 0
    # Where relative text paths in a pass's config resolve (the recipe's folder).
    base_dir: Any = None
    # Long passes report progress (step=, total=, and what they track) here; the manager forwards it
    # to its instruments as a 'pass_progress' event, so a pass never draws anything itself.
    progress: Callable[..., None] = lambda **_: None
    # The recipe's budget (compiler.recipe.Budget) and its metric measured for a graph on a few calibration batches
    # against the reference, for a pass that sizes its rewrite to the budget (quantize-linear's fallback: auto).
    # Calibration text, not held-out: the manager's check after the pass stays on text no decision saw. fidelity is
    # None where it cannot be measured (after a pass changed the input interface) and outside a compile.
    budget: Any = None
    fidelity: Callable[[torch.fx.GraphModule], float] | None = None

    def structure(self, gm: torch.fx.GraphModule) -> "BertStructure":
        return self.structure_of(gm)


class Pass:
    """Base class of every graph pass.

    Subclasses set ``name``, ``Config`` and ``kind`` and implement :meth:`run`. ``kind`` is "exact"
    when the rewrite must reproduce its input within 1e-4, "lossy" when it only has to keep the
    recipe's fidelity budget; :meth:`is_exact` may refine it per config (keeping every head is exact).
    """

    name: ClassVar[str]
    Config: ClassVar[type[PassConfig]] = PassConfig
    # A built-in pass names its declaration (passes/options.py), which sets name, Config and the ordering below.
    declaration: ClassVar[PassDeclaration | None] = None
    kind: ClassVar[Literal["exact", "lossy"]] = "lossy"
    # Ordering constraints, checked against the recipe before anything runs.
    must_run_before: ClassVar[tuple[str, ...]] = ()
    must_run_after: ClassVar[tuple[str, ...]] = ()
    requires: ClassVar[tuple[str, ...]] = ("structure",)
    summary: ClassVar[str] = ""
    # A healing pass (distill) exists to raise fidelity: the manager rolls it back if held-out
    # fidelity ends lower than before it, even when the budget still holds.
    heals: ClassVar[bool] = False
    # False for a pass whose gain the single-graph cost model cannot see (decouple-attention pays off
    # through its cached split form), so the manager does not roll it back as one that "does not pay".
    judged_by_cost: ClassVar[bool] = True
    # A pass whose only effect is new values for parameters the graph already has (same graph, same
    # parameter names and shapes, no lowering hints, no input map), e.g. distill. The manager keeps such
    # a result in the pass store (compiler.pass_store), keyed by everything the pass reads, and replays it
    # on a later compile instead of running the pass again. The pass must then read nothing else: files
    # named in its config go into the key only through config fields whose names end in "texts".
    weights_only: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        declared = cls.__dict__.get("declaration")
        if declared is not None:
            cls.name, cls.Config = declared.name, declared.Config
            cls.must_run_before, cls.must_run_after = declared.must_run_before, declared.must_run_after
            cls.summary = cls.summary or declared.summary

    def __init__(self, config: PassConfig):
        self.config = config
        # run() sets this when, on this graph, the rewrite turned out to change nothing numerically
        # (every unit kept, full rank, layers already equal): the manager then checks it as exact.
        self.kept_everything = False

    def is_exact(self) -> bool:
        """Checked at 1e-4 (exact) or against the recipe's budget (lossy)?

        Asked before run() (the config alone: override to add cases such as keep_fraction 1.0) and
        again after it, when ``kept_everything`` may have been set.
        """
        return self.kind == "exact" or self.kept_everything

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        raise NotImplementedError

    def refuse(self, reason: str, fix: str | None = None) -> PassRefused:
        """Build the error a pass raises when it cannot apply; the reason must be actionable."""
        return PassRefused(reason, field=self.name, fix=fix)


# Each registered pass class's source file as it was when the class was registered (imported). The pass store keys
# a result by the code that computed it, not by what is on disk when the pass runs, perhaps an hour of training later.
_SOURCES: dict[type, bytes] = {}
# What a pass may list in ``requires``: the analyses and data a PassContext hands it.
ANALYSES = ("structure", "calibration", "reference", "tokenizer")


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Class decorator that makes a pass available to recipes under ``cls.name``."""
    name = getattr(cls, "name", None)
    if not name or not isinstance(name, str):
        raise TypeError(f"{cls.__qualname__} must set a string class attribute 'name' to be registered")
    if not (isinstance(cls.Config, type) and issubclass(cls.Config, PassConfig)):
        raise TypeError(f"{cls.__qualname__}.Config must subclass bertpress PassConfig")
    if cls.kind not in ("exact", "lossy"):
        raise TypeError(f"{cls.__qualname__}.kind must be 'exact' or 'lossy', got {cls.kind!r}")
    for attribute in ("must_run_before", "must_run_after", "requires"):
        value = getattr(cls, attribute)
        if isinstance(value, str) or not all(isinstance(item, str) for item in value):
            raise TypeError(f"{cls.__qualname__}.{attribute} must be a tuple of names, got {value!r}")
    unknown = sorted(set(cls.requires) - set(ANALYSES))
    if unknown:
        raise TypeError(f"{cls.__qualname__}.requires names unknown analyses {unknown}; available: {list(ANALYSES)}")
    add_class(cls)
    try:
        _SOURCES[cls] = _read_source(cls)
    except (OSError, TypeError):  # no source file (a class made in a notebook cell): the pass store cannot key it
        _SOURCES.pop(cls, None)
    return cls


def _read_source(cls: type) -> bytes:
    path = inspect.getsourcefile(cls)
    if not path:
        return cls.__qualname__.encode()
    with open(path, "rb") as handle:
        return handle.read()


def registered_source(cls: type) -> bytes:
    """The source file of a pass class as it was when the class was registered (read now if it never was).

    Raises OSError or TypeError when the class has no source file: the pass store then runs the pass, unkeyed.
    """
    source = _SOURCES.get(cls)
    return source if source is not None else _read_source(cls)


def pass_function(name: str, *, kind: Literal["exact", "lossy"] = "lossy", config: type[PassConfig] = PassConfig,
                  must_run_before: tuple[str, ...] = (), must_run_after: tuple[str, ...] = (),
                  requires: tuple[str, ...] = ("structure",)) -> Callable:
    """Register ``fn(gm, ctx, config) -> PassResult`` as a pass: the function form of a :class:`Pass`."""

    def wrap(fn: Callable[[torch.fx.GraphModule, PassContext, PassConfig], PassResult]) -> type[Pass]:
        def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
            return fn(gm, ctx, self.config)

        attributes = {"name": name, "kind": kind, "Config": config, "must_run_before": tuple(must_run_before),
                      "must_run_after": tuple(must_run_after), "requires": tuple(requires), "run": run,
                      "__doc__": fn.__doc__, "__module__": fn.__module__, "__qualname__": fn.__qualname__}
        return register_pass(type(fn.__name__, (Pass,), attributes))

    return wrap


__all__ = ["ANALYSES", "InputMap", "Pass", "PassConfig", "PassContext", "PassDeclaration", "PassResult",
           "PerLayerKeepConfig", "get_pass", "load_plugins", "pass_function", "register_pass", "registered_passes",
           "registered_source", "_REGISTRY"]
