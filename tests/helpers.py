"""Test helpers: run one pass through a real PassManager context without the CLI."""

from __future__ import annotations

from compiler.calibration import prepare_calibration
from compiler.pass_infra import PassContext, get_pass
from compiler.pass_manager import StructureCache


def calibration_for(loaded, samples: int = 16, validation: int = 8, max_length: int = 32, source: str = "builtin"):
    return prepare_calibration(loaded.tokenizer, source=source, samples=samples, validation_samples=validation,
                               max_length=max_length, batch_size=8, seed=0, model_max_length=loaded.max_length)


def run_pass(name: str, options: dict, gm, loaded, calibration=None):
    cls = get_pass(name)
    instance = cls(cls.Config.model_validate(options))
    ctx = PassContext(structure_of=StructureCache(), calibration=calibration or calibration_for(loaded),
                      reference=loaded.model, tokenizer=loaded.tokenizer, model_config=loaded.config, lowering={})
    return instance.run(gm, ctx)
