"""Screening: the cost model's estimate of a candidate recipe, without compiling it.

The model is loaded, its calibration text sampled and its graph traced once per search; each candidate then
runs its passes that change the graph (every pass but the weights-only ones such as distill, which change
no cost) without the pass manager's checks, and the cost model estimates latency and bytes at the tune's
batch x seq on this machine's roofline. Candidates share leading passes: the graph after each prefix of
passes is kept (a few of them, newest first), so a search over the last pass's options runs the first ones once.
"""

from __future__ import annotations

import copy
import json
from collections import OrderedDict
from dataclasses import dataclass

from ..calibration import prepare_calibration
from ..errors import BertpressError
from ..frontend import example_inputs, load_model, trace
from ..pass_infra import PassContext, get_pass
from ..pass_manager import CompileState, PassManager, _merge
from ..recipe import Recipe

PREFIXES_KEPT = 8


@dataclass
class Estimate:
    latency_ms: float | None = None
    bytes: int | None = None
    problem: str | None = None  # why the candidate cannot be built (a pass refused it)

    def objective(self, objective: str) -> float | None:
        return self.latency_ms if objective == "latency" else self.bytes


class Screen:
    """Estimates candidates of one search (same model, calibration and target; only pass options differ)."""

    def __init__(self, recipe: Recipe):
        settings = recipe.file
        loaded = load_model(settings.model)
        cal = settings.calibration
        calibration = prepare_calibration(
            loaded.tokenizer, source=cal.texts, samples=cal.samples, validation_samples=cal.validation_samples,
            max_length=cal.max_length, batch_size=cal.batch_size, seed=cal.seed, model_max_length=loaded.max_length,
            base_dir=recipe.base_dir)
        self.gm = trace(loaded.model, example_inputs(loaded.tokenizer), max_length=loaded.max_length)
        self.manager = PassManager(recipe, calibration, loaded.model, loaded.tokenizer, loaded.config)
        self._prefixes: OrderedDict[str, CompileState] = OrderedDict()

    def estimate(self, recipe: Recipe) -> Estimate:
        steps = [step for step in recipe.steps if not get_pass(step.name).weights_only]
        state, start = CompileState(self.gm, {}, []), 0
        keys = [json.dumps([[s.name, s.config.model_dump(mode="json")] for s in steps[:n + 1]], sort_keys=True)
                for n in range(len(steps))]
        for n in range(len(steps), 0, -1):  # the longest prefix already run
            if keys[n - 1] in self._prefixes:
                self._prefixes.move_to_end(keys[n - 1])
                kept = self._prefixes[keys[n - 1]]
                state, start = CompileState(copy.deepcopy(kept.gm), copy.deepcopy(kept.lowering), [], list(kept.input_maps)), n
                break
        else:
            state = CompileState(copy.deepcopy(self.gm), {}, [])
        for n in range(start, len(steps)):
            step = steps[n]
            try:
                state = self._run(step, state)
            except BertpressError as error:
                return Estimate(problem=f"passes {step.name}: {error.message}")
            except Exception as exc:  # a pass that cannot run on this candidate is not worth compiling
                return Estimate(problem=f"{step.name} raised {type(exc).__name__}: {exc}")
            self._prefixes[keys[n]] = CompileState(copy.deepcopy(state.gm), copy.deepcopy(state.lowering), [],
                                                   list(state.input_maps))
            while len(self._prefixes) > PREFIXES_KEPT:
                self._prefixes.popitem(last=False)
        cost = self.manager.cost(state)
        return Estimate(latency_ms=cost.latency_s * 1e3 if cost.latency_s is not None else None, bytes=cost.bytes)

    def _run(self, step, state: CompileState) -> CompileState:
        manager = self.manager
        calibration, tokenizer = manager._context_data(state)
        ctx = PassContext(structure_of=manager.structures, calibration=calibration, reference=manager.reference,
                          tokenizer=tokenizer, model_config=manager.model_config, lowering=copy.deepcopy(state.lowering),
                          seed=manager.recipe.file.calibration.seed, base_dir=manager.recipe.base_dir)
        result = get_pass(step.name)(step.config).run(state.gm, ctx)
        manager.structures.invalidate()
        return CompileState(result.graph_module, _merge(state.lowering, result.lowering), [],
                            state.input_maps + ([result.inputs] if result.inputs is not None else []))
