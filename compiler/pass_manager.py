"""Run a recipe's passes in order; validate, cost, roll back and record every one.

This is the only place that judges a pass. After each pass: graph lint, a run on the held-out
batches (finite outputs, right shapes), the numerical check its kind promises (exact: within 1e-4
of the graph before it; lossy: the recipe's fidelity budget against the reference), and the cost
before and after. A pass that fails is rolled back; the compile stops (exit 1) unless the pass
says ``on_fail: skip``. A lossy pass with ``on_fail: defer`` that breaks only the budget is kept when a
healing pass (distill) follows it: that pass's check and the final one after lowering hold the budget.
"""

from __future__ import annotations

import copy
import dataclasses
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from . import cost_model, roofline
from .calibration import CalibrationData, tokenize_batches
from .errors import BertpressError, CheckFailed, PassRefused
from .output import raise_if_interrupted
from .graph_edit import set_parameter
from .pass_infra import InputMap, Pass, PassContext, PassResult, get_pass
from .pass_store import PassStore, Stored
from .recipe import Recipe
from .structure import BertStructure, analyze
from .tasks import LOWER_IS_BETTER, label_ids
from .validation import compare, hidden_states, run_batches

EXACT_TOLERANCE = 1e-4
# Calibration batches a pass that sizes itself to the budget measures on (PassContext.fidelity).
CALIBRATION_CHECK_BATCHES = 4
# A lossy pass that makes the estimated latency worse by more than this, without saving bytes, does not pay.
LATENCY_SLACK = 0.02


@dataclass
class PassRecord:
    index: int
    name: str
    config: dict
    kind: str
    status: str = "pending"  # applied | unchanged | rolled_back | skipped
    reason: str | None = None
    checks: dict[str, Any] = field(default_factory=dict)
    cost_before: dict | None = None
    cost_after: dict | None = None
    details: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    # Weights-only passes: whether the result was replayed from or written to the pass store (compiler.pass_store).
    store: dict[str, Any] | None = None

    def as_dict(self) -> dict:
        return dict(self.__dict__)


class StructureCache:
    """The BERT structure analysis, computed once per graph version and dropped when a pass changes it."""

    def __init__(self):
        self._cache: dict[int, BertStructure] = {}

    def __call__(self, gm: torch.fx.GraphModule) -> BertStructure:
        key = id(gm)
        if key not in self._cache:
            self._cache[key] = analyze(gm)
        return self._cache[key]

    def invalidate(self) -> None:
        self._cache.clear()


@dataclass
class CompileState:
    gm: torch.fx.GraphModule
    lowering: dict[str, Any]
    outputs: list[torch.Tensor]  # hidden states on the held-out batches
    # Input-interface changes made so far (prune-vocab), applied in order to batches tokenized for the reference.
    input_maps: list[InputMap] = field(default_factory=list)


Instrument = Callable[[str, dict], None]  # (event, payload): progress display, timing, logs


class PassManager:
    def __init__(self, recipe: Recipe, calibration: CalibrationData, reference: torch.nn.Module, tokenizer,
                 model_config, pooling: str = "mean", instruments: list[Instrument] | None = None,
                 store: PassStore | None = None, task: str = "feature-extraction"):
        self.recipe = recipe
        self.store = store
        self.calibration = calibration
        self.reference = reference
        self.tokenizer = tokenizer
        self.model_config = model_config
        self.pooling = pooling
        # A task model is judged on its logits (compiler.tasks); labeled held-out text adds accuracy and f1.
        self.task = task
        self.labels = _label_ids(calibration.heldout_labels, model_config) if task != "feature-extraction" else None
        self.instruments = instruments or []
        self.structures = StructureCache()
        # The roofline of the target's thread count: measured once per machine, then read from the user's cache.
        self.machine = roofline.machine(recipe.file.target.threads)
        self.reference_outputs = run_batches(hidden_states(reference), calibration.heldout_batches)
        self._calibration_reference: list[torch.Tensor] | None = None  # computed when a pass first asks (fidelity)

    def emit(self, event: str, **payload) -> None:
        # Every event (a pass starting, each step of a long pass) is a safe point where a Ctrl-C
        # stops the compile (compiler.output).
        raise_if_interrupted()
        for instrument in self.instruments:
            instrument(event, payload)

    def cost(self, state: CompileState) -> cost_model.Cost:
        structure = self.structures(state.gm)
        point = self.recipe.file.cost
        return cost_model.estimate(
            state.gm, batch=point.batch, seq=point.seq, component_of=structure.node_component,
            int8_weights=set(state.lowering.get("int8_weights", ())),
            fp16_weights=set(state.lowering.get("fp16_weights", ())),
            sparse_weights=set(state.lowering.get("sparse_weights", ())), machine=self.machine,
            int4_weights={**{target: (hint["block_size"], hint.get("zero_points") is not None)
                             for target, hint in state.lowering.get("int4_weights", {}).items()},
                          **{target: (block, False) for target, block in state.lowering.get("int4_tables", {}).items()}},
        )

    def fidelity(self, outputs: list[torch.Tensor], state: CompileState | None = None):
        """Held-out fidelity against the reference; ``outputs`` are on ``heldout(state)``."""
        if state is None or not state.input_maps:
            return compare(self.reference_outputs, outputs, self.calibration.heldout_batches, self.pooling,
                           task=self.task, labels=self.labels)
        batches = self.heldout(state)
        aligned = []
        for reference, batch in zip(self.calibration.heldout_batches, batches):
            restored = batch
            for input_map in reversed(state.input_maps):
                restored = input_map.restore(restored)
            n, m = reference["attention_mask"].sum(1), batch["attention_mask"].sum(1)
            aligned.append(torch.tensor([bool(n[i] == m[i]) and torch.equal(reference["input_ids"][i, :n[i]],
                                                                           restored["input_ids"][i, :n[i]])
                                         for i in range(len(n))]))
        return compare(self.reference_outputs, outputs, self.calibration.heldout_batches, self.pooling,
                       candidate_batches=batches, aligned=aligned, task=self.task, labels=self.labels)

    def heldout(self, state: CompileState) -> list[dict[str, torch.Tensor]]:
        """The held-out texts as the graph of ``state`` takes them."""
        return self._inputs(state, self.calibration.heldout_texts, self.calibration.heldout_batches)

    def _inputs(self, state: CompileState, texts: list[str], batches: list[dict[str, torch.Tensor]]):
        # Text goes through the newest tokenizer, as a user of the output would tokenize it (a word whose
        # pieces were dropped may be split differently, or become one [UNK]); later id maps apply on top.
        maps = state.input_maps
        last = max((i for i, m in enumerate(maps) if m.tokenizer is not None), default=-1)
        if last >= 0:
            length = self.calibration.max_length or max(b["input_ids"].shape[1] for b in batches)
            batches = tokenize_batches(maps[last].tokenizer, texts, length, len(batches[0]["input_ids"]))
        for input_map in maps[last + 1:]:
            batches = [input_map.map_batch(batch) for batch in batches]
        return batches

    @staticmethod
    def map_inputs(state: CompileState, batches: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
        """Batches tokenized for the reference, as the graph of ``state`` takes them."""
        for input_map in state.input_maps:
            batches = [input_map.map_batch(batch) for batch in batches]
        return batches

    def _heals_later(self, index: int) -> bool:
        """Whether a healing pass (distill) comes after passes[index]: on_fail: defer waits for it."""
        return any(get_pass(step.name).heals for step in self.recipe.steps[index + 1:])

    def _calibration_fidelity(self, state: CompileState, record: PassRecord):
        """The budget's metric of a graph on the first calibration batches, against the reference (PassContext.fidelity).

        None after an input-interface change: the reference cannot read the renumbered batches."""
        if state.input_maps:
            return None
        batches = self.calibration.batches[:CALIBRATION_CHECK_BATCHES]
        metric = self.recipe.file.budget.metric

        def measure(gm: torch.fx.GraphModule) -> float:
            if self._calibration_reference is None:
                self._calibration_reference = run_batches(hidden_states(self.reference), batches)
            outputs = run_batches(hidden_states(gm), batches)
            comparison = compare(self._calibration_reference, outputs, batches, self.pooling, task=self.task)
            try:
                return comparison.value(metric)
            except KeyError:
                raise PassRefused(f"the budget's metric {metric} needs labeled text, and calibration text has no labels,"
                                  " so a pass cannot size itself to it.", field=f"passes[{record.index}].{record.name}",
                                  fix="use a budget metric measured against the reference (cosine, agreement) or"
                                      " remove the option that sizes the pass to the budget (fallback: auto).") from None

        return measure

    def _context_data(self, state: CompileState) -> tuple[CalibrationData, object]:
        # Passes after an interface change calibrate on batches (and a tokenizer) that fit the graph they rewrite.
        if not state.input_maps:
            return self.calibration, self.tokenizer
        calibration = dataclasses.replace(self.calibration, batches=self._inputs(state, self.calibration.texts, self.calibration.batches),
                                          heldout_batches=self.heldout(state))
        tokenizer = next((m.tokenizer for m in reversed(state.input_maps) if m.tokenizer is not None), self.tokenizer)
        return calibration, tokenizer

    def run(self, gm: torch.fx.GraphModule) -> tuple[CompileState, list[PassRecord]]:
        state = CompileState(gm=gm, lowering={}, outputs=run_batches(hidden_states(gm), self.calibration.heldout_batches))
        traced = self.fidelity(state.outputs)
        if traced.max_abs_error > EXACT_TOLERANCE:
            raise CheckFailed(
                f"the traced graph differs from the reference model by max-abs-error {traced.max_abs_error:.2e}"
                f" (tolerance {EXACT_TOLERANCE:g}).", field="trace",
                fix="report this model to bertpress; tracing must be exact.",
            )
        records: list[PassRecord] = []
        steps = self.recipe.steps
        for index, step in enumerate(steps):
            cls = get_pass(step.name)
            instance: Pass = cls(step.config)
            record = PassRecord(index, step.name, step.config.model_dump(mode="json"),
                                "exact" if instance.is_exact() else "lossy")
            self.emit("pass_start", index=index, total=len(steps), name=step.name)
            started = time.perf_counter()
            record.cost_before = self.cost(state).as_dict()
            state = self._run_one(instance, state, record)
            record.seconds = round(time.perf_counter() - started, 3)
            if record.status == "rolled_back" and step.config.on_fail == "skip":
                record.status = "skipped"
            records.append(record)
            self.emit("pass_end", record=record)
            if record.status == "rolled_back" and step.config.on_fail in ("stop", "defer"):
                raise PassCheckFailed(record, records, state)
        return state, records

    def _run_one(self, instance: Pass, state: CompileState, record: PassRecord) -> CompileState:
        snapshot = copy.deepcopy(state.gm)
        calibration, tokenizer = self._context_data(state)
        ctx = PassContext(structure_of=self.structures, calibration=calibration, reference=self.reference,
                          tokenizer=tokenizer, model_config=self.model_config,
                          lowering=copy.deepcopy(state.lowering), seed=self.recipe.file.calibration.seed,
                          base_dir=self.recipe.base_dir,
                          progress=lambda **info: self.emit("pass_progress", name=instance.name, **info),
                          budget=self.recipe.file.budget, fidelity=self._calibration_fidelity(state, record))
        key, replay = self._stored(instance, state, ctx, record)
        began = time.perf_counter()
        try:
            result = _replay(state.gm, replay) if replay is not None else instance.run(state.gm, ctx)
            ran_seconds = time.perf_counter() - began
        except PassRefused as refusal:  # the user's to fix (a config this model cannot take): exit 2
            # Named for the family member, since what a pass can do differs between them (ALBERT, DistilBERT, ...).
            raise PassRefused(f"on {type(self.reference).__name__}: {refusal.message}", file=self.recipe.source,
                              field=f"passes[{record.index}].{record.name}", fix=refusal.fix) from None
        except BertpressError:
            raise
        except Exception as exc:  # a bug or numerical blow-up inside the pass: roll back, report by name
            self.structures.invalidate()
            return self._roll_back(record, snapshot, state,
                                   f"the pass raised {type(exc).__name__}: {exc}", trace=traceback.format_exc(limit=3))
        self.structures.invalidate()
        record.details = result.details
        # Some passes learn only from the graph that their config is an identity (keep every head).
        record.kind = "exact" if instance.is_exact() else "lossy"
        if not result.modified:
            record.status = "unchanged"
            record.cost_after = record.cost_before
            return CompileState(result.graph_module, state.lowering, state.outputs, state.input_maps)
        candidate = CompileState(result.graph_module, _merge(state.lowering, result.lowering), [],
                                 state.input_maps + ([result.inputs] if result.inputs is not None else []))
        try:
            candidate.gm.graph.lint()
            record.checks["lint"] = "ok"
            candidate.outputs = run_batches(hidden_states(candidate.gm), self.heldout(candidate))
            against_reference = self.fidelity(candidate.outputs, candidate)
            self.structures(candidate.gm)  # the result must still be an analyzable BERT
        except Exception as exc:
            self.structures.invalidate()
            return self._roll_back(record, snapshot, state, f"the rewritten graph does not run: {type(exc).__name__}: {exc}")
        record.checks["finite"] = against_reference.finite
        record.checks["cosine"] = round(against_reference.cosine, 6)
        record.checks["cosine_min"] = round(against_reference.cosine_min, 6)
        record.checks["max_abs_error_vs_reference"] = against_reference.max_abs_error
        for name, value in (against_reference.metrics or {}).items():
            record.checks[name] = round(value, 6)
        if not against_reference.finite:
            return self._roll_back(record, snapshot, state, "the rewritten graph produced NaN or Inf")
        if instance.is_exact():
            step_error = self._exact_error(snapshot, state, candidate, result.inputs, record)
            record.checks["max_abs_error"] = step_error.max_abs_error
            record.checks["tolerance"] = EXACT_TOLERANCE
            if step_error.max_abs_error > EXACT_TOLERANCE:
                return self._roll_back(
                    record, snapshot, state,
                    f"exact rewrite changed the outputs: max-abs-error {step_error.max_abs_error:.3g} > {EXACT_TOLERANCE:g}")
        else:
            budget = self.recipe.file.budget
            record.checks["budget"] = {"metric": budget.metric, "min": budget.min}
            if budget.max is not None:
                record.checks["budget"]["max"] = budget.max
            achieved = against_reference.value(budget.metric)
            if not budget.passed(achieved):
                if instance.config.on_fail == "defer" and self._heals_later(record.index):
                    # Kept on the word of a later healing pass; it, and the final check after lowering, judge the budget.
                    record.checks["budget_deferred"] = budget.describe(achieved)
                else:
                    return self._roll_back(record, snapshot, state, f"fidelity budget broken: {budget.describe(achieved)}")
            if instance.heals:
                before = self.fidelity(state.outputs, state).value(budget.metric)
                record.checks[f"{budget.metric}_before"] = round(before, 6)
                worse = achieved > before if budget.metric in LOWER_IS_BETTER else achieved < before
                if worse:
                    return self._roll_back(
                        record, snapshot, state,
                        f"a healing pass lowered fidelity: held-out {budget.metric} {before:.4f} -> {achieved:.4f}")
        record.cost_after = self.cost(candidate).as_dict()
        if not instance.is_exact() and not instance.heals and instance.judged_by_cost:
            before, after = record.cost_before, record.cost_after
            slower = after["latency_ms"] > before["latency_ms"] * (1 + LATENCY_SLACK)
            if slower and after["bytes"] >= before["bytes"]:
                return self._roll_back(
                    record, snapshot, state,
                    f"the pass does not pay: estimated latency {before['latency_ms']:.2f} -> {after['latency_ms']:.2f} ms"
                    f" at batch {before['batch']} x seq {before['seq']} with no bytes saved ({before['bytes']:,} -> {after['bytes']:,})")
        record.status = "applied"
        if key is not None and replay is None:
            path, note = self.store.save(key, instance, snapshot, result, ran_seconds)
            record.store = {**(record.store or {}), "action": "stored" if path else "not stored", "key": key,
                            "note": note, **({"path": str(path)} if path else {})}
        return candidate

    def _stored(self, instance: Pass, state: CompileState, ctx: PassContext,
                record: PassRecord) -> tuple[str | None, Stored | None]:
        """The store key of a weights-only pass, and its stored result when there is one that fits."""
        if self.store is None or not instance.weights_only:
            return None, None
        try:
            key = self.store.key(instance, state.gm, ctx)
        except Exception as exc:  # the store is an optimization: without a key the pass simply runs
            record.store = {"action": "ran", "problem": f"no store key: {type(exc).__name__}: {exc}"}
            return None, None
        replay, problem = self.store.load(key, state.gm)
        if replay is not None:
            record.store = {"action": "replayed", "key": key, "path": str(replay.path), "stored_at": replay.created,
                            "original_seconds": round(replay.seconds, 3)}
            self.emit("pass_replayed", name=instance.name, original_seconds=replay.seconds)
        elif problem:
            record.store = {"action": "ran", "key": key, "problem": problem}
        return key, replay

    def _exact_error(self, snapshot, state: CompileState, candidate: CompileState, input_map: InputMap | None,
                     record: PassRecord):
        """Step error of an exact pass; after an input change, both graphs see the same tokens (dropped ones as [UNK])."""
        batches = self.heldout(state)
        if input_map is None:
            return compare(state.outputs, candidate.outputs, batches, self.pooling, task=self.task)
        tokens = sum(int(b["attention_mask"].sum()) for b in batches)
        lost = sum(int((~input_map.lossless(b) & b["attention_mask"].bool()).sum()) for b in batches)
        record.checks["heldout_tokens"] = tokens
        record.checks["heldout_tokens_out_of_interface"] = lost
        record.checks["heldout_oov_rate"] = round(lost / max(tokens, 1), 6)
        # Same tokens on both sides: ids mapped one by one, and the graph before sees [UNK] where the new one does.
        mapped = [input_map.map_batch(b) for b in batches]
        before = run_batches(hidden_states(snapshot), [input_map.restore(b) for b in mapped])
        return compare(before, run_batches(hidden_states(candidate.gm), mapped), mapped, self.pooling, task=self.task)

    def _roll_back(self, record: PassRecord, snapshot, state: CompileState, reason: str, trace: str | None = None) -> CompileState:
        record.status = "rolled_back"
        record.reason = reason
        if trace:
            record.details["traceback"] = trace
        record.cost_after = record.cost_before
        self.structures.invalidate()
        return CompileState(snapshot, state.lowering, state.outputs, state.input_maps)


# Lowering hints keyed by a name inside (output files, embedding tables), merged entry by entry.
MERGED_BY_NAME = ("files", "config", "embedding_precision", "int4_weights", "int4_tables")


def _replay(gm: torch.fx.GraphModule, stored: Stored) -> PassResult:
    """A weights-only pass's stored result applied to the graph it was computed from."""
    for name, tensor in stored.tensors.items():
        set_parameter(gm, name, tensor)
    return PassResult(gm, modified=True, details=stored.details)


def _merge(old: dict, new: dict) -> dict:
    merged = copy.deepcopy(old)
    for key, value in new.items():
        if isinstance(value, list) and isinstance(merged.get(key), list):
            merged[key] = sorted(set(merged[key]) | set(value))
        elif key in MERGED_BY_NAME and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}  # one entry per file / table: a later pass overrides that entry only
        else:
            merged[key] = value
    return merged


def _label_ids(labels: list | None, model_config) -> list | None:
    from .errors import CalibrationError

    if labels is None:
        return None
    try:
        return label_ids(labels, model_config)
    except ValueError as exc:
        raise CalibrationError(f"a held-out text's {exc}.", field="calibration.texts",
                               fix="label every line with one of the model's id2label names (or its class id).") from None


class PassCheckFailed(CheckFailed):
    """A pass broke its check and its recipe entry says stop."""

    def __init__(self, record: PassRecord, records: list[PassRecord], state: CompileState):
        self.record = record
        self.records = records
        self.state = state
        super().__init__(f"{record.name} was rolled back: {record.reason}.",
                         field=f"passes[{record.index}]",
                         fix="relax the recipe's budget, make the pass less aggressive, or set on_fail: skip on it.")
