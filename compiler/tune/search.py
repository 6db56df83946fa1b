"""The search behind ``bertpress tune``: propose candidates, screen them with the cost model, compile the rest.

One :class:`Search` per run. It proposes candidates (exhaustive: every one, cheapest estimate first; random and
tpe: Optuna's samplers), estimates each with the cost model (:mod:`compiler.tune.screen`) and compiles only
those that can still win: a candidate whose estimate exceeds, by more than ``tune.margin``, the estimate of
one already within budget is recorded as "pruned". With a distill step, successive halving compiles every
candidate with a short distillation first and gives the longer ones only to the best 1/eta of each rung.
Executors (the local loop here, Ray in :mod:`compiler.tune.ray_executor`) only run trials; every decision
is taken here, so both give the same frontier for the same exhaustive search.

Everything is written to the output folder as it happens: one line per trial in trials.jsonl, which
``--resume`` reads back so a finished trial is never computed again.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from ..errors import BertpressError, CheckFailed, RecipeError
from ..output import raise_if_interrupted
from ..search_space import Candidate, SearchSpace, recipe_text
from .trial import run_trial, trial_env

DEFAULT_TRIALS = 20  # random and tpe, when tune.trials is not given
TERMINAL = {"ok", "check_failed", "pruned", "invalid", "failed", "stopped"}
MODEL_FILES_KEPT = ("report.json", "report.md")  # what a non-winning trial keeps of its output


def candidate_key(options: dict, steps: int | None) -> str:
    text = json.dumps({"options": options, "distill_steps": steps}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def shortfall(fidelity: float, bound: float, lower_is_better: bool) -> float:
    """How far a fidelity figure is on the wrong side of the budget's bound (<= 0: within it)."""
    return fidelity - bound if lower_is_better else bound - fidelity


def score(record: dict, objective: str, bound: float, lower_is_better: bool = False) -> float:
    """One number per result, higher is better: any candidate within budget (the faster or smaller, the higher)
    above any that is not (the closer to the budget, the higher). Successive halving and ASHA rank by it."""
    value = objective_value(record, objective)
    if record.get("meets_budget") and value is not None:
        return 1.0 + 1.0 / (1.0 + float(value))
    fidelity = record.get("fidelity")
    return -1.0 - max(shortfall(float(fidelity), bound, lower_is_better), 0.0) if fidelity is not None else -1e9


def objective_value(record: dict, objective: str) -> float | None:
    """What the search minimises for a compiled record: the compile's own latency estimate, or its file bytes; the
    screen's estimate for a compile that stopped before it costed or wrote its model (a pass broke the budget)."""
    if objective == "latency":
        value = record.get("compiled_estimated_latency_ms")
        return value if value is not None else record.get("estimated_latency_ms")
    value = record.get("size_bytes")
    return value if value is not None else record.get("estimated_bytes")


@dataclass
class Pending:
    """A candidate at a rung that passed the screen and is to be compiled."""

    candidate: Candidate
    rung: int
    key: str
    options: dict
    estimate: Any
    spec: dict
    handle: Any = None  # the sampler's trial, told the result
    attempt: int = 1


@dataclass
class Outcome:
    exit_code: int
    summary: dict = field(default_factory=dict)


class _Proposer:
    """The candidates to try at the first rung, in order: the strategy's sampler."""

    def __init__(self, space: SearchSpace, estimate: Callable[[Candidate], Any]):
        self.space = space
        tune = space.tune
        self.strategy = tune.strategy
        self.limit = tune.trials if tune.trials is not None else (space.size if tune.strategy == "exhaustive" else DEFAULT_TRIALS)
        self.asked = 0
        if self.strategy == "exhaustive":
            every = list(space.candidates())
            value = {c: estimate(c).objective(tune.objective) for c in every}
            # Cheapest estimate first (candidates that cannot be built last), so the first one within budget
            # screens out every candidate estimated dearer.
            self.order = sorted(every, key=lambda c: (value[c] is None, value[c] if value[c] is not None else 0, c.picks))
            return
        try:
            import optuna
        except ImportError:
            raise RecipeError(f"strategy {tune.strategy} samples with Optuna, which is not installed.", file=space.file,
                              field="tune.strategy", fix="pip install 'bertpress[tune]' (or optuna), or use strategy: exhaustive.") from None
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        if self.strategy == "random":
            sampler = optuna.samplers.RandomSampler(seed=tune.seed)
        else:
            # Optuna 5 reads a trial's constraint from Trial.set_constraint; Optuna 4 from a constraints_func.
            legacy = {} if hasattr(optuna.trial.Trial, "set_constraint") else \
                {"constraints_func": lambda t: t.user_attrs.get("constraint", (0.0,))}
            sampler = optuna.samplers.TPESampler(seed=tune.seed, **legacy)
        self.study = optuna.create_study(direction="minimize", sampler=sampler)
        self.distributions = {}
        for number, dim in enumerate(space.dimensions):
            if dim.range is not None and all(isinstance(v, int) for v in dim.range):
                dist = optuna.distributions.IntDistribution(dim.range[0], dim.range[0] + (len(dim.choices) - 1) * dim.range[2], step=dim.range[2])
            elif dim.range is not None:
                dist = optuna.distributions.FloatDistribution(dim.range[0], dim.choices[-1], step=dim.range[2])
            else:
                dist = optuna.distributions.CategoricalDistribution(list(range(len(dim.choices))))
            self.distributions[f"d{number}"] = dist

    def __iter__(self) -> Iterator[tuple[Candidate, Any]]:
        if self.strategy == "exhaustive":
            for candidate in self.order[:self.limit]:
                self.asked += 1
                yield candidate, None
            return
        seen: set = set()
        while self.asked < self.limit and len(seen) < self.space.size:
            trial = self.study.ask(self.distributions)
            picks = []
            for number, dim in enumerate(self.space.dimensions):
                value = trial.params[f"d{number}"]
                picks.append(int(round((value - dim.range[0]) / dim.range[2])) if dim.range is not None else int(value))
            candidate = Candidate(tuple(picks))
            seen.add(candidate)
            self.asked += 1
            yield candidate, trial

    def tell(self, handle, record: dict, objective: str, bound: float, lower_is_better: bool) -> None:
        if handle is None:
            return
        import optuna

        if record["status"] in ("invalid", "failed"):
            self.study.tell(handle, state=optuna.trial.TrialState.FAIL)
            return
        if record["status"] == "pruned":
            value = record.get("estimated_latency_ms") if objective == "latency" else record.get("estimated_bytes")
            _constrain(handle, 0.0)
        else:
            value = objective_value(record, objective)
            fidelity = record.get("fidelity")
            _constrain(handle, shortfall(fidelity, bound, lower_is_better) if fidelity is not None else 1.0)
        if value is None:
            self.study.tell(handle, state=optuna.trial.TrialState.FAIL)
        else:
            self.study.tell(handle, float(value))


def _constrain(handle, value: float) -> None:
    """A trial's budget shortfall (<= 0: feasible), where the installed Optuna's TPE reads it."""
    if hasattr(handle, "set_constraint"):
        handle.set_constraint("budget_shortfall", value)
    else:
        handle.set_user_attr("constraint", (value,))


class Search:
    def __init__(self, space: SearchSpace, out_dir: Path, *, resume: bool = False, executor: str = "local",
                 store: str | None = None, on_event: Callable[..., None] | None = None):
        self.space = space
        self.tune = space.tune
        self.out = Path(out_dir)
        self.executor = executor
        self.rungs = space.rung_steps()
        self.emit = on_event or (lambda kind, **payload: None)
        self.started = time.monotonic()
        self.env = trial_env()
        if store is not None:
            self.env["BERTPRESS_PASS_STORE"] = str(Path(store).resolve())
        from ..tasks import LOWER_IS_BETTER

        budget = space.data.get("budget") or {}
        self.metric = budget.get("metric", "cosine")
        self.lower_is_better = self.metric in LOWER_IS_BETTER
        self.bound = float(budget["max"] if self.lower_is_better else budget.get("min", 0.98))
        self._kept: str | None = None  # key of the trial whose whole output is kept (the best so far)
        self._prepare(resume)
        self._screen = None
        self._estimates: dict[Candidate, Any] = {}
        self.results: dict[tuple[Candidate, int], dict] = {}  # final record of each candidate at each rung
        self.best_estimate: dict[int, float] = {}  # per rung: lowest estimate of a candidate within budget
        self.compiled = 0
        self.reused = 0
        self.proposer: _Proposer | None = None
        self.planned = 0

    # -- output folder --------------------------------------------------------------------------------

    def _prepare(self, resume: bool) -> None:
        trials = self.out / "trials.jsonl"
        manifest = self.out / "tune.json"
        self.previous: dict[str, dict] = {}
        if resume and trials.is_file():
            stored = json.loads(manifest.read_text()) if manifest.is_file() else {}
            if stored.get("space") != self.space.digest():
                raise BertpressError(f"{self.out} holds a search of another recipe (or of an edited one).",
                                     field="--resume", fix="resume with the recipe that started it, or tune into a new --out.")
            for line in trials.read_text().splitlines():
                try:
                    record = json.loads(line)
                except ValueError:
                    continue  # a line cut short by a kill: that trial runs again
                if record.get("status") in TERMINAL and not record.get("retried"):
                    self.previous[record["key"]] = record
        elif trials.exists():
            raise BertpressError(f"{self.out} already holds a search (trials.jsonl).", field="--out",
                                 fix="add --resume to continue it, or choose another --out.")
        self.out.mkdir(parents=True, exist_ok=True)
        best_dir, summary = self.out / "best", self.out / "frontier.json"
        if resume and (best_dir / "model.onnx").is_file() and summary.is_file():  # back where a trial's output lives
            key = ((json.loads(summary.read_text()).get("best") or {}).get("key"))
            if key and key in self.previous:
                shutil.rmtree(self.out / "trials" / key, ignore_errors=True)
                os.replace(best_dir, self.out / "trials" / key)
                self._kept = key
        for name in ("frontier.json", "frontier.png", "best.yaml"):
            (self.out / name).unlink(missing_ok=True)
        shutil.rmtree(self.out / "best", ignore_errors=True)
        manifest.write_text(json.dumps({"space": self.space.digest(), "recipe": self.space.file}, indent=2) + "\n")
        self._trials_file = trials.open("a", encoding="utf-8")

    def _write(self, record: dict) -> None:
        self._trials_file.write(json.dumps(record, sort_keys=True, default=str) + "\n")
        self._trials_file.flush()
        os.fsync(self._trials_file.fileno())

    # -- screening --------------------------------------------------------------------------------------

    def recipe_data(self, candidate: Candidate, rung: int) -> dict:
        return self.space.materialize(candidate, self.rungs[rung])

    def estimate(self, candidate: Candidate):
        if candidate not in self._estimates:
            raise_if_interrupted()  # screening many candidates takes a while: Ctrl-C stops here too
            from ..recipe import load_recipe_text
            from .screen import Estimate, Screen

            try:
                recipe = load_recipe_text(recipe_text(self.recipe_data(candidate, 0)), file=self.space.file,
                                          base_dir=self.space.base_dir)
            except BertpressError as error:
                self._estimates[candidate] = Estimate(problem=error.render())
                return self._estimates[candidate]
            if self._screen is None:
                self.emit("status", message="loading the model and tracing it for the cost model")
                self._screen = Screen(recipe)
            self._estimates[candidate] = self._screen.estimate(recipe)
        return self._estimates[candidate]

    def _dominated(self, value: float | None, rung: int) -> bool:
        best = self.best_estimate.get(rung)
        return value is not None and best is not None and value > best * (1 + self.tune.margin)

    def _base(self, candidate: Candidate, rung: int) -> dict:
        options = candidate.options(self.space)
        estimate = self.estimate(candidate)
        return {"key": candidate_key(options, self.rungs[rung]), "options": options, "rung": rung,
                "distill_steps": self.rungs[rung], "estimated_latency_ms": None if estimate.latency_ms is None
                else round(estimate.latency_ms, 4), "estimated_bytes": estimate.bytes, "executor": self.executor}

    def _screened(self, candidate: Candidate, rung: int, handle) -> Pending | None:
        """Record a candidate that needs no compile (done before, cannot be built, or dominated); else what to compile."""
        base = self._base(candidate, rung)
        estimate = self.estimate(candidate)
        value = estimate.objective(self.tune.objective)
        previous = self.previous.get(base["key"])
        if previous is not None:
            self.reused += 1
            self._finish(candidate, rung, handle, {**previous, "reused": True}, write=False)
            return None
        if estimate.problem is not None:
            self._finish(candidate, rung, handle, {**base, "status": "invalid", "meets_budget": False,
                                                    "reason": estimate.problem, "seconds": 0.0})
            return None
        if self._dominated(value, rung):
            reason = (f"estimated {self.tune.objective} {value:.4g} exceeds {self.best_estimate[rung]:.4g}, the estimate"
                      f" of a candidate within budget, by more than the margin {self.tune.margin:g}")
            self._finish(candidate, rung, handle, {**base, "status": "pruned", "meets_budget": None, "reason": reason,
                                                    "seconds": 0.0})
            return None
        return Pending(candidate, rung, base["key"], base["options"], estimate, self.spec(candidate, rung), handle)

    def spec(self, candidate: Candidate, rung: int) -> dict:
        """What a trial needs to compile ``candidate`` at ``rung``: plain data, for any executor."""
        key = candidate_key(candidate.options(self.space), self.rungs[rung])
        return {"text": recipe_text(self.recipe_data(candidate, rung)), "file": self.space.file,
                "base_dir": str(self.space.base_dir), "out": str((self.out / "trials" / key).resolve()),
                "env": self.env, "key": key}

    def pending(self, candidate: Candidate, rung: int) -> Pending:
        """A later rung of a candidate that an executor's own scheduler (ASHA) promoted."""
        base = self._base(candidate, rung)
        return Pending(candidate, rung, base["key"], base["options"], self.estimate(candidate), self.spec(candidate, rung))

    # -- the rungs ----------------------------------------------------------------------------------------

    def _out_of_time(self) -> bool:
        limit = self.tune.time_limit
        return limit is not None and time.monotonic() - self.started > limit

    def first_rung(self) -> Iterator[Pending]:
        """The candidates to compile at the first rung, screened as results come in (``complete`` between yields)."""
        self.emit("status", message=f"search space: {self.space.size} candidates over {len(self.space.dimensions)} options"
                                    f" ({self.tune.strategy}); screening with the cost model")
        self.proposer = _Proposer(self.space, self.estimate)
        self.planned = min(self.proposer.limit, self.space.size)
        for candidate, handle in self.proposer:
            if self._out_of_time():
                self.emit("status", message=f"time_limit {self.tune.time_limit:g} s reached: no new candidates")
                return
            repeated = self.results.get((candidate, 0))
            if repeated is not None:  # a sampler may propose a candidate again: it is told the same result
                self.proposer.tell(handle, repeated, self.tune.objective, self.bound, self.lower_is_better)
                continue
            pending = self._screened(candidate, 0, handle)
            if pending is not None:
                yield pending

    def later_rung(self, rung: int) -> Iterator[Pending]:
        """Successive halving: the best 1/eta of the last rung's compiled candidates, with more distill steps."""
        ranked = [(c, r) for (c, n), r in self.results.items() if n == rung - 1 and r["status"] in ("ok", "check_failed")]
        ranked.sort(key=lambda item: (-score(item[1], self.tune.objective, self.bound, self.lower_is_better), item[0].picks))
        keep = math.ceil(len(ranked) / self.tune.eta) if ranked else 0
        promoted = sorted((c for c, _ in ranked[:keep]),
                          key=lambda c: (self.estimate(c).objective(self.tune.objective) or 0.0, c.picks))
        self.planned += len(promoted)
        self.emit("status", message=f"rung {rung + 1}/{len(self.rungs)}: {len(promoted)} of {len(ranked)} candidates"
                                    f" go on to {self.rungs[rung]} distill steps")
        for candidate, _ in ranked[keep:]:
            self.results[(candidate, rung - 1)]["halted"] = True
        for candidate in promoted:
            if self._out_of_time():
                return
            pending = self._screened(candidate, rung, None)
            if pending is not None:
                yield pending

    def complete(self, pending: Pending, result: dict) -> None:
        record = {**self._base(pending.candidate, pending.rung), **result, "attempt": pending.attempt}
        self.compiled += 1
        self._finish(pending.candidate, pending.rung, pending.handle, record)

    def failed_attempt(self, pending: Pending, error: str, *, retrying: bool) -> dict:
        """Record a trial that raised or whose worker died; the executor retries it once."""
        record = {**self._base(pending.candidate, pending.rung), "status": "failed", "meets_budget": False,
                  "reason": error, "attempt": pending.attempt, "retried": retrying, "seconds": None}
        if retrying:
            self._write(record)
            self.emit("trial", record=record, done=self.done_count(), total=self.planned, best=self.best_record())
        return record

    def _finish(self, candidate: Candidate, rung: int, handle, record: dict, write: bool = True) -> None:
        self.results[(candidate, rung)] = record
        if write:
            self._write(record)
        if record.get("meets_budget"):
            value = self.estimate(candidate).objective(self.tune.objective)
            if value is not None:
                self.best_estimate[rung] = min(self.best_estimate.get(rung, math.inf), value)
        if rung == 0 and self.proposer is not None:
            self.proposer.tell(handle, record, self.tune.objective, self.bound, self.lower_is_better)
        self._tidy(record)
        self.emit("trial", record=record, done=self.done_count(), total=self.planned, best=self.best_record())

    def done_count(self) -> int:
        return len(self.results)

    # -- results ------------------------------------------------------------------------------------------

    def final_records(self) -> list[dict]:
        """Each candidate's record at the highest rung it reached."""
        highest: dict[Candidate, dict] = {}
        for (candidate, rung), record in sorted(self.results.items(), key=lambda item: item[0][1]):
            highest[candidate] = record
        return list(highest.values())

    def best_record(self) -> dict | None:
        full = len(self.rungs) - 1
        within = [r for (c, n), r in self.results.items() if n == full and r.get("meets_budget")
                  and objective_value(r, self.tune.objective) is not None]
        if not within:
            return None
        sign = 1 if self.lower_is_better else -1
        return min(within, key=lambda r: (objective_value(r, self.tune.objective), sign * (r.get("fidelity") or 0), r["key"]))

    def _tidy(self, record: dict) -> None:
        """Keep the whole output of the best trial only; the others keep their report."""
        best = self.best_record()
        keep = best["key"] if best is not None else None
        stale = {record["key"]} | ({self._kept} if keep is not None else set())
        for key in stale - {keep, self._kept if keep is None else None, None}:
            folder = self.out / "trials" / key
            if folder.is_dir():
                for path in folder.iterdir():
                    if path.name not in MODEL_FILES_KEPT:
                        shutil.rmtree(path) if path.is_dir() else path.unlink()
        self._kept = keep if keep is not None else self._kept

    def finish(self) -> Outcome:
        from .frontier import frontier, plot

        self._trials_file.close()
        records = self.final_records()
        points, contenders = frontier(records, self.tune.objective, self.tune.margin, self.lower_is_better)
        best = self.best_record()
        statuses: dict[str, int] = {}
        for record in records:
            statuses[record["status"]] = statuses.get(record["status"], 0) + 1
        summary = {
            "recipe": self.space.file, "objective": self.tune.objective, "strategy": self.tune.strategy,
            "executor": self.executor, "batch": self.tune.batch, "seq": self.tune.seq,
            "budget": {"metric": self.metric, "max" if self.lower_is_better else "min": self.bound},
            "candidates": self.space.size, "considered": len(records), "statuses": statuses,
            "compiles": sum(1 for r in self.results.values() if r["status"] in ("ok", "check_failed")),
            "compiled_this_run": self.compiled, "reused_from_previous_run": self.reused,
            "distill_rungs": self.rungs, "contenders": len(contenders),
            "frontier": points, "best": None if best is None else {k: best[k] for k in ("key", "options") if k in best}
                                                                  | {"record": best},
            "seconds": round(time.monotonic() - self.started, 1),
        }
        (self.out / "frontier.json").write_text(json.dumps(summary, indent=2, sort_keys=True, default=str) + "\n")
        plot(records, points, self.tune.objective, self.bound, self.lower_is_better, best, self.out / "frontier.png")
        if best is None:
            return Outcome(1, summary)
        candidate = next(c for (c, n), r in self.results.items() if r is best)
        text = recipe_text(self.recipe_data(candidate, len(self.rungs) - 1))
        header = (f"# bertpress tune: the best of {summary['considered']} candidates of {self.space.file}"
                  f" ({self.tune.objective} at batch {self.tune.batch} x seq {self.tune.seq}, budget"
                  f" {self.metric} {'<=' if self.lower_is_better else '>='} {self.bound}); frontier.json has the rest.\n")
        (self.out / "best.yaml").write_text(header + text, encoding="utf-8")
        trial_dir = self.out / "trials" / best["key"]
        if (trial_dir / "model.onnx").is_file():
            os.replace(trial_dir, self.out / "best")
            (self.out / "trials" / best["key"]).mkdir()
            for name in MODEL_FILES_KEPT:
                shutil.copyfile(self.out / "best" / name, self.out / "trials" / best["key"] / name)
        else:  # its output was not kept (a resumed search): compile it again, replaying the pass store
            self.emit("status", message="compiling best.yaml into best/")
            result = run_trial({"text": text, "file": str(self.out / "best.yaml"), "base_dir": str(self.space.base_dir),
                                "out": str(self.out / "best"), "env": self.env})
            if result["status"] != "ok":
                raise CheckFailed(f"best.yaml did not compile again as its trial did: {result.get('reason')}",
                                  field="best", fix="report this to bertpress; a trial must reproduce.")
        return Outcome(0, summary)


def run_local(search: Search) -> Outcome:
    """Trials one after the other in this process; a trial that raises is recorded and tried once more."""
    for rung in range(len(search.rungs)):
        pendings = search.first_rung() if rung == 0 else search.later_rung(rung)
        for pending in pendings:
            raise_if_interrupted()
            search.emit("start", pending=pending, done=search.done_count(), total=search.planned, steps=search.rungs[pending.rung])
            while True:
                try:
                    result = run_trial(pending.spec)
                except (KeyboardInterrupt, SystemExit):
                    raise
                except Exception as exc:
                    retrying = pending.attempt == 1
                    record = search.failed_attempt(pending, f"{type(exc).__name__}: {exc}", retrying=retrying)
                    if retrying:
                        pending.attempt += 1
                        continue
                    search._finish(pending.candidate, pending.rung, pending.handle, record)
                    break
                search.complete(pending, result)
                break
    return search.finish()
