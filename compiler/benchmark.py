"""``bertpress bench``: latency and throughput of a compiled model against a reference, interleaved in one run.

Both models run on the same synthetic batch (seeded token ids inside both vocabularies, every
position attended) in one process; each round times one run of every model, in an order that
rotates, so load changes on a shared machine hit both alike. Figures are medians and 90th
percentiles over the rounds; the ratio is the reference's median over the compiled model's. The
default reference is the plain fp32 export of the model the output was compiled from (no fusions,
no quantization), i.e. what ``torch.onnx.export`` would give you.
"""

from __future__ import annotations

import functools
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import ModelError
from .runtime import session


@dataclass
class Timing:
    name: str
    path: str
    seconds: list[float]
    batch: int

    def summary(self) -> dict:
        ordered = sorted(self.seconds)
        p90 = ordered[min(len(ordered) - 1, int(round(0.9 * (len(ordered) - 1))))]
        median = statistics.median(ordered)
        return {"name": self.name, "path": self.path, "runs": len(ordered), "median_ms": round(median * 1e3, 3),
                "p90_ms": round(p90 * 1e3, 3), "min_ms": round(ordered[0] * 1e3, 3),
                "throughput_per_s": round(self.batch / median, 2)}


def vocab_size(folder: Path, default: int = 30522) -> int:
    config = Path(folder) / "config.json"
    if config.is_file():
        return int(json.loads(config.read_text()).get("vocab_size", default))
    return default


def synthetic_batch(batch: int, seq: int, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Token ids drawn from the vocabulary (ids below 1000 are BERT's special and unused tokens), all attended."""
    rng = np.random.default_rng(seed)
    low = min(1000, max(vocab // 2, 1))
    return {"input_ids": rng.integers(low, vocab, size=(batch, seq), dtype=np.int64),
            "attention_mask": np.ones((batch, seq), dtype=np.int64),
            "token_type_ids": np.zeros((batch, seq), dtype=np.int64)}


def _feeds(sess, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {i.name: batch[i.name] for i in sess.get_inputs() if i.name in batch}


# Pause before each timed run when several models are interleaved. ONNX Runtime's intra-op workers keep
# spinning for a while after a run; on a machine with few cores the last model's spinning workers would steal
# the cores from the next one and inflate its time. Spinning stays on: it is what a deployed session does.
SETTLE_SECONDS = 0.2


def rotating_rounds(runs: dict[str, Callable[[], object]], *, rounds: int, warmup: int = 2,
                    settle: float = 0.0) -> dict[str, list[float]]:
    """Seconds of each run: ``warmup`` untimed rounds, then ``rounds`` rounds that call every run once, rotating who
    goes first so drift hits all alike; ``settle`` seconds of pause before each timed call (see SETTLE_SECONDS)."""
    names = list(runs)
    for _ in range(warmup):
        for name in names:
            runs[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            if settle:
                time.sleep(settle)
            start = time.perf_counter()
            runs[name]()
            times[name].append(time.perf_counter() - start)
    return times


def interleaved(models: dict[str, Path], batch: dict[str, np.ndarray], *, threads: int, rounds: int,
                warmup: int = 2) -> list[Timing]:
    """Time every model ``rounds`` times, one run of each per round, rotating who goes first (with a pause of
    SETTLE_SECONDS before each run, so one session's idle workers do not slow the next)."""
    sessions = {name: session(path, threads) for name, path in models.items()}
    size = int(next(iter(batch.values())).shape[0])
    runs = {name: functools.partial(sess.run, None, _feeds(sess, batch)) for name, sess in sessions.items()}
    seconds = rotating_rounds(runs, rounds=rounds, warmup=warmup, settle=SETTLE_SECONDS if len(runs) > 1 else 0.0)
    return [Timing(name, str(models[name]), seconds[name], size) for name in sessions]


def measure_latency(model_path: Path, *, batch: int, seq: int, threads: int, runs: int = 3, vocab: int = 30522) -> dict:
    """A brief measurement of one model (the compile driver's 'measured' figure next to the estimate)."""
    timing = interleaved({"model": Path(model_path)}, synthetic_batch(batch, seq, vocab), threads=threads,
                         rounds=runs, warmup=1)[0]
    return timing.summary()


def _model_file(path: Path) -> Path:
    path = Path(path)
    if path.is_file() and path.suffix == ".onnx":
        return path
    if (path / "model.onnx").is_file():
        return path / "model.onnx"
    raise ModelError(f"{path}: no model.onnx here.", field="OUTPUT_DIR",
                     fix="pass a folder written by `bertpress compile` (or an .onnx file with --against).")


def plain_reference(output_dir: Path, folder: Path) -> Path:
    """The plain fp32 ONNX export of the model ``output_dir`` was compiled from, written into ``folder``."""
    from .frontend import example_inputs, load_model, trace
    from .lowering import export_onnx

    report = Path(output_dir) / "report.json"
    if not report.is_file():
        raise ModelError(f"{output_dir}: no report.json, so the original model is unknown.", field="--against",
                         fix="pass --against with a reference folder or .onnx file.")
    spec = json.loads(report.read_text())["model"]["spec"]
    loaded = load_model(spec)
    example = example_inputs(loaded.tokenizer)
    gm = trace(loaded.model, example, max_length=loaded.max_length)
    return export_onnx(gm, example, Path(folder) / "reference.onnx")


def bench(output_dir: Path, *, against: Path | None = None, batch: int = 32, seq: int = 128, threads: int = 2,
          rounds: int = 20, warmup: int = 2) -> dict:
    """Compiled vs reference, interleaved; returns the figures as a JSON-ready dict."""
    output_dir = Path(output_dir)
    compiled = _model_file(output_dir)
    vocab = vocab_size(output_dir)
    with tempfile.TemporaryDirectory(prefix="bertpress-bench-") as tmp:
        if against is None:
            reference = plain_reference(output_dir, Path(tmp))
            reference_name = "plain fp32 export of the original model"
        else:
            reference = _model_file(Path(against))
            reference_name = str(against)
            vocab = min(vocab, vocab_size(Path(against) if Path(against).is_dir() else Path(against).parent))
        started = time.perf_counter()
        load = os.getloadavg()
        timings = interleaved({"compiled": compiled, "reference": reference}, synthetic_batch(batch, seq, vocab),
                              threads=threads, rounds=rounds, warmup=warmup)
        seconds = time.perf_counter() - started
        reference_bytes = Path(reference).stat().st_size
    rows = {t.name: t.summary() for t in timings}
    rows["reference"]["path"] = reference_name
    return {
        "batch": batch, "seq": seq, "threads": threads, "rounds": rounds, "warmup": warmup,
        "compiled": rows["compiled"], "reference": rows["reference"],
        "speedup_median": round(rows["reference"]["median_ms"] / rows["compiled"]["median_ms"], 3),
        "compiled_bytes": compiled.stat().st_size, "reference_bytes": reference_bytes,
        "load_average_before": [round(x, 2) for x in load], "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "seconds": round(seconds, 1),
    }
