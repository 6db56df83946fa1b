"""What a recipe needs to know about a pass without loading it: its options and its ordering.

Torch-free on purpose: the recipe schema (``compiler/recipe.py``), ``bertpress validate`` and
``bertpress schema`` read only this module and the pass options, so checking a YAML file never pays
for importing torch. A pass's code (``compiler/pass_infra.Pass``) is imported when it runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

if TYPE_CHECKING:
    from .pass_infra import Pass


class PassConfig(BaseModel):
    """Options every pass accepts; a pass's own config subclasses this."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    on_fail: Literal["stop", "skip", "defer"] = Field(
        "stop",
        description="What the compile does if this pass breaks its check: stop with exit code 1, or roll it back and go on."
        " defer: a lossy pass that breaks only the fidelity budget is kept when a healing pass (distill) comes later; that"
        " pass and the final check must bring the model back within budget (any other failure stops).",
    )


class PerLayerKeepConfig(PassConfig):
    """``keep`` (one count, or one per layer) or ``keep_fraction``: how much of each layer a pruning pass keeps.

    Shared by prune-heads and prune-ffn; subclasses restate the fields' descriptions in their own unit.
    """

    keep: int | list[int] | None = Field(None, description="Units kept per layer: one number, or a list with one entry per layer.")
    keep_fraction: float | None = Field(None, gt=0.0, le=1.0, description="Share of the units kept.")

    @model_validator(mode="after")
    def _one_target(self):
        if (self.keep is None) == (self.keep_fraction is None):
            raise ValueError("give exactly one of keep or keep_fraction")
        if isinstance(self.keep, int) and self.keep < 1:
            raise ValueError("keep must be >= 1 (a layer cannot lose all of them; remove a whole layer with layer-drop)")
        if isinstance(self.keep, list) and (not self.keep or min(self.keep) < 1):
            raise ValueError("keep lists one count >= 1 per layer")
        return self

    def counts(self, pass_: "Pass", sizes: list[int], unit: str) -> list[int | None]:
        """The count ``keep`` asks for in each layer (None under keep_fraction), refused if impossible."""
        if isinstance(self.keep, list) and len(self.keep) != len(sizes):
            raise pass_.refuse(f"keep lists {len(self.keep)} counts but the model has {len(sizes)} layers.",
                               fix=f"give one count per layer ({len(sizes)}) or a single number.")
        wanted = self.keep if isinstance(self.keep, list) else [self.keep] * len(sizes)
        for index, (count, size) in enumerate(zip(wanted, sizes)):
            if count is not None and count > size:
                raise pass_.refuse(f"keep asks for {count} {unit} in layer {index}, which has {size}.",
                                   fix=f"keep at most {size} {unit} per layer.")
        return wanted


@dataclass(frozen=True)
class PassDeclaration:
    """A pass as the recipe schema sees it: name, options, ordering, one line of description, and where its code is.

    A built-in pass is declared in ``passes/options.py`` and its module is imported only when a compile runs it; its
    class takes name, Config and ordering from the declaration (``Pass.declaration``), so the two cannot disagree.
    """

    name: str
    Config: type[PassConfig]
    module: str
    summary: str
    must_run_before: tuple[str, ...] = ()
    must_run_after: tuple[str, ...] = ()
