"""Test helpers: run one pass through a real PassManager context, or a short recipe through a real PassManager,
without the CLI."""

from __future__ import annotations

from compiler.calibration import prepare_calibration
from compiler.pass_infra import PassContext, get_pass
from compiler.pass_manager import PassManager, StructureCache
from compiler.recipe import load_recipe_text


def calibration_for(loaded, samples: int = 16, validation: int = 8, max_length: int = 32, source: str = "builtin"):
    return prepare_calibration(loaded.tokenizer, source=source, samples=samples, validation_samples=validation,
                               max_length=max_length, batch_size=8, seed=0, model_max_length=loaded.max_length)


def run_pass(name: str, options: dict, gm, loaded, calibration=None):
    cls = get_pass(name)
    instance = cls(cls.Config.model_validate(options))
    ctx = PassContext(structure_of=StructureCache(), calibration=calibration or calibration_for(loaded),
                      reference=loaded.model, tokenizer=loaded.tokenizer, model_config=loaded.config, lowering={})
    return instance.run(gm, ctx)


def manager_for(loaded, passes: str, budget: float = 0.5, source: str = "builtin") -> PassManager:
    """A PassManager for `passes` (recipe YAML lines under `passes:`) on `loaded`, checked against `budget` cosine."""
    recipe = load_recipe_text(f"budget: {{min: {budget}}}\npasses:\n{passes}\n", file="t.yaml")
    return PassManager(recipe, calibration_for(loaded, source=source), loaded.model, loaded.tokenizer, loaded.config)
