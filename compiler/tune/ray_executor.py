"""``bertpress tune --executor ray``: the same search, its trials run by Ray Tune on a cluster.

The search's decisions stay in this process (:class:`compiler.tune.search.Search`: the strategy's Optuna
sampler, the cost-model screen, the records), plugged into Ray Tune as its Searcher, so a cluster runs
exactly the candidates the local executor would, several at once. Each trial asks for the recipe's
``target.threads`` CPUs. With a distill step, ASHA (asynchronous successive halving) stops trials whose short
distillation ranks low; each rung a trial reaches is a line in trials.jsonl. A trial that raises or whose
worker dies is recorded and run once more (Ray Tune's ``max_failures=1``); the driver carries on either way.

Trials write their output under the search's --out folder and the pass store under ``--store``: on a
cluster of several machines both must be paths every worker sees (a shared file system).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from ..errors import BertpressError
from .search import Outcome, Search, score

RUNG = "rung"  # Ray Tune's time attribute: how many distill rungs a trial has reported


def _trainable(config: dict) -> None:
    """Compile one candidate at each rung in turn, reporting after each (ASHA may stop it between rungs)."""
    for path in reversed(config["sys_path"]):
        if path not in sys.path and os.path.isdir(path):
            sys.path.insert(0, path)
    from ray import tune

    from compiler.tune.trial import run_trial

    history = []  # every rung's result so far, in each report: Ray Tune may hand the searcher only some reports
    for rung, spec in enumerate(config["specs"]):
        result = run_trial(spec)
        history.append(result)
        tune.report({"score": score(result, config["objective"], config["bound"], config["lower_is_better"]), RUNG: rung + 1,
                     "records": json.dumps(history)})
        if result["status"] != "ok":
            return


def _require_ray():
    try:
        import ray  # noqa: F401
        from ray import tune  # noqa: F401
    except ImportError:
        raise BertpressError("--executor ray needs Ray Tune, which is not installed.", field="--executor",
                             fix="pip install 'bertpress[ray]' (ray[tune] and optuna), or use --executor local.") from None


def _searcher_class():
    from ray.tune.search import Searcher

    class SearchAsSearcher(Searcher):
        """Ray Tune asks this for the next trial; the search answers (screening as results come in)."""

        def __init__(self, search: Search, sys_path: list[str]):
            super().__init__(metric="score", mode="max")
            self.search, self.sys_path = search, sys_path
            self.first = search.first_rung()
            self.live = {}  # trial id -> Pending of its first rung
            self.recorded = {}  # trial id -> rungs recorded

        def __getstate__(self):
            # Ray Tune pickles its searcher for an experiment restore; a search resumes from trials.jsonl instead
            # (--resume), so only the plain settings go into that copy.
            return {key: value for key, value in self.__dict__.items() if key not in ("search", "first", "live")}

        def save(self, checkpoint_path: str) -> None:
            """Nothing to save: a search resumes from its trials.jsonl (--resume), not from Ray's experiment state."""

        def restore(self, checkpoint_path: str) -> None:
            """See save."""

        def suggest(self, trial_id: str):
            search = self.search
            try:
                pending = next(self.first)
            except StopIteration:
                return Searcher.FINISHED
            self.live[trial_id] = pending
            search.emit("start", pending=pending, done=search.done_count(), total=search.planned, steps=search.rungs[0])
            return {"specs": [search.spec(pending.candidate, rung) for rung in range(len(search.rungs))],
                    "objective": search.tune.objective, "bound": search.bound, "lower_is_better": search.lower_is_better,
                    "sys_path": self.sys_path}

        def on_trial_result(self, trial_id: str, result: dict) -> None:
            pending = self.live.get(trial_id)
            if pending is None or "records" not in result:
                return
            for rung, record in enumerate(json.loads(result["records"])):
                if rung < self.recorded.get(trial_id, 0):
                    continue
                at = pending if rung == 0 else self.search.pending(pending.candidate, rung)
                at.attempt = pending.attempt
                self.search.complete(at, record)
                self.recorded[trial_id] = rung + 1

        def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
            if result:
                self.on_trial_result(trial_id, result)
            pending = self.live.pop(trial_id, None)
            if error and pending is not None:
                at = self._next_rung(trial_id, pending)
                record = self.search.failed_attempt(at, "the trial failed twice (see the Ray Tune logs under"
                                                        f" {self.search.out / 'ray'})", retrying=False)
                self.search._finish(at.candidate, at.rung, at.handle, record)

        def _next_rung(self, trial_id: str, pending):
            """The rung a failing trial was at: the first it had not reported."""
            rung = self.recorded.get(trial_id, 0)
            if rung == 0:
                return pending
            at = self.search.pending(pending.candidate, rung)
            at.attempt = pending.attempt
            return at

        def retried(self, trial_id: str, error: str) -> None:
            pending = self.live.get(trial_id)
            if pending is not None:
                self.search.failed_attempt(self._next_rung(trial_id, pending), error, retrying=True)
                pending.attempt += 1

    return SearchAsSearcher


def _retries_callback(searcher):
    from ray import tune

    class RecordRetries(tune.Callback):
        """Ray Tune calls on_trial_recover when a trial failed and will run again: that attempt is recorded."""

        def __init__(self):
            self.searcher = searcher

        def __getstate__(self):
            return {}

        def on_trial_recover(self, iteration, trials, trial, **info):
            error = getattr(trial, "error_file", None) or "see the Ray Tune logs"
            self.searcher.retried(trial.trial_id, f"the trial's worker failed ({error})")

    return RecordRetries()


def run_ray(search: Search, address: str | None = None) -> Outcome:
    _require_ray()
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    import compiler

    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
    sys_path = [os.getcwd(), str(Path(compiler.__file__).resolve().parent.parent)]
    searcher = _searcher_class()(search, sys_path)
    threads = int((search.space.data.get("target") or {}).get("threads", 2))
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    per_trial = min(threads, cpus)
    scheduler = None
    if len(search.rungs) > 1:
        scheduler = ASHAScheduler(time_attr=RUNG, metric="score", mode="max", max_t=len(search.rungs), grace_period=1,
                                  reduction_factor=search.tune.eta)
    tuner = tune.Tuner(
        tune.with_resources(_trainable, {"cpu": per_trial}),
        tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=-1,
                                    max_concurrent_trials=max(1, cpus // per_trial)),
        run_config=tune.RunConfig(name="bertpress-tune", storage_path=str((search.out / "ray").resolve()),
                                  failure_config=tune.FailureConfig(max_failures=1), verbose=0,
                                  callbacks=[_retries_callback(searcher)]))
    try:
        tuner.fit()
    finally:
        if started_here:
            ray.shutdown()
    return search.finish()
