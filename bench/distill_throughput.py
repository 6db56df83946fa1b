"""Distillation throughput on a compressed MiniLM student: one distill setting against another.

Builds the student of bench/experiments/recipes/minilm-fast-h12.yaml (MiniLM with 2 blocks dropped, 1024 FFN neurons kept and
a rank-128 word table), then runs the same distillation (batch 16, max length 64, lr 5e-4, layer-wise +
attention losses, int8-aware) both ways, alternating, --repeats times each:
  * ``--compare bucket`` (default): random batches (`bucket: false`) against length-grouped ones (`bucket: true`);
  * ``--compare compile``: length-grouped batches in eager PyTorch against the same through torch.compile
    (`compile: true`); compile-time is in s/step and left out of the steady s/step (after the first 50 steps);
  * ``--compare deterministic``: length-grouped, compiled batches with torch's deterministic algorithms off (Inductor's
    atomic scatter-adds, see compiler.distillation.deterministic_kernels) against on (what distill runs).
Prints seconds per step (median over repeats), the share of computed tokens that were padding,
and held-out fidelity after training (minilm-fast's 256 held-out WordNet glosses, fp32 graph against
the original): a faster setting must buy speed, not lose fidelity. One run, ratios within it.

    python bench/distill_throughput.py [--compare bucket|compile|deterministic] [--steps 400] [--repeats 2] [--threads 2]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from compiler import distillation as kd  # noqa: E402
from compiler.calibration import prepare_calibration  # noqa: E402
from compiler.frontend import example_inputs, load_model, trace  # noqa: E402
from compiler.validation import compare, hidden_states, run_batches  # noqa: E402
from passes.distill import WARM_STEPS  # noqa: E402
from tests.helpers import run_pass  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compare", choices=("bucket", "compile", "deterministic"), default="bucket")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    loaded = load_model("builtin:minilm-l6")
    # minilm-fast's calibration: 512 WordNet glosses to calibrate on, 256 held out (seed 0).
    calibration = prepare_calibration(loaded.tokenizer, source="builtin:wordnet", samples=512, validation_samples=256,
                                      max_length=128, batch_size=16, seed=0, model_max_length=loaded.max_length)
    student = trace(loaded.model, example_inputs(loaded.tokenizer), max_length=loaded.max_length)
    run_pass("layer-drop", {"count": 2}, student, loaded, calibration)
    run_pass("prune-ffn", {"keep": 1024, "importance": "activation", "reconstruct": True, "calibration_batches": 8},
             student, loaded, calibration)
    run_pass("low-rank", {"target": "embeddings", "rank": 128}, student, loaded, calibration)
    heldout = calibration.heldout_batches
    reference = run_batches(hidden_states(loaded.model), heldout)
    before = compare(reference, run_batches(hidden_states(student), heldout), heldout).cosine

    options = {"steps": args.steps, "batch_size": 16, "max_length": 64, "lr": 5e-4, "warmup": 0.1, "schedule": "linear",
               "texts": "builtin:wordnet", "samples": 100_000, "layer_map": "kept", "qat": True,
               "losses": {"output": 1.0, "hidden": 1.0, "attention": 1.0}, "monitor_every": 10 * args.steps}
    runs: dict[bool, list[dict]] = {False: [], True: []}
    if args.compare in ("compile", "deterministic"):
        options["bucket"] = True
    if args.compare == "deterministic":
        options["compile"] = True
    labels = {"bucket": ("random", "length-grouped"), "compile": ("eager", "torch.compile"),
              "deterministic": ("atomic adds", "deterministic")}[args.compare]
    real_context = kd.deterministic_kernels

    def distill(gm, setting: bool) -> dict:
        if args.compare != "deterministic":
            return run_pass("distill", {**options, args.compare: setting}, gm, loaded, calibration).details
        kd.deterministic_kernels = real_context if setting else contextlib.nullcontext
        try:
            return run_pass("distill", options, gm, loaded, calibration).details
        finally:
            kd.deterministic_kernels = real_context

    load_before = os.getloadavg()
    started = time.perf_counter()
    for repeat in range(args.repeats):
        for setting in ((False, True) if repeat % 2 == 0 else (True, False)):
            gm = copy.deepcopy(student)
            details = distill(gm, setting)
            cosine = compare(reference, run_batches(hidden_states(gm), heldout), heldout).cosine
            steady = details.get("seconds_per_step_steady", details["seconds_per_step"])
            runs[setting].append({"s_per_step": details["seconds_per_step"], "steady": steady,
                                  "padding": details["padding_share"], "cosine": cosine})
            print(f"  repeat {repeat + 1}: {labels[setting]:14s} {details['seconds_per_step']:.3f} s/step"
                  f" ({steady:.3f} steady), padding {details['padding_share']:.1%}, held-out cosine {cosine:.4f}", flush=True)

    print(f"\nstudent (cosine {before:.4f} before distillation), {args.steps} steps of 16 WordNet glosses,"
          f" {args.threads} thread(s), {args.repeats} alternating repeats; load average before / after:"
          f" {[round(x, 1) for x in load_before]} / {[round(x, 1) for x in os.getloadavg()]};"
          f" whole run {time.perf_counter() - started:.0f} s")
    print(f"{args.compare:>15} | {'s/step (median)':>15} | {'steady s/step':>13} | {'padding':>7} | {'held-out cosine':>15}")
    medians, steady = {}, {}
    for setting in (False, True):
        rows = runs[setting]
        medians[setting] = statistics.median(r["s_per_step"] for r in rows)
        steady[setting] = statistics.median(r["steady"] for r in rows)
        print(f"{labels[setting]:>15} | {medians[setting]:15.3f} | {steady[setting]:13.3f} |"
              f" {statistics.mean(r['padding'] for r in rows):7.1%} | {statistics.mean(r['cosine'] for r in rows):15.4f}")
    print(f"steps per hour, {labels[True]} / {labels[False]}: {medians[False] / medians[True]:.2f}x"
          f" ({steady[False] / steady[True]:.2f}x after the first {WARM_STEPS} steps)")


if __name__ == "__main__":
    main()
