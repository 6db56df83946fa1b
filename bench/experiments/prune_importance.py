"""Compare head/neuron importance scores for structured pruning of all-MiniLM-L6-v2, side by side.

Prunes MiniLM to --heads heads and --ffn FFN neurons per layer with each importance setting,
calibrating on the builtin corpus (Python docs) and measuring mean / min cosine of the mean-pooled
embedding to the reference on held-out WordNet glosses (another domain, never calibrated on), in
fp32 and with int8 as quantize-linear simulates it in PyTorch (the ORT-lowered model is checked by
the compile itself). Prints one table from one run.

    python bench/experiments/prune_importance.py [--heads 8] [--ffn 1024] [--heldout 128] [--calibration-batches 8]
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from compiler.calibration import prepare_calibration  # noqa: E402
from compiler.frontend import example_inputs, load_model, trace  # noqa: E402
from compiler.validation import compare, hidden_states, run_batches  # noqa: E402
from tests.helpers import run_pass  # noqa: E402

# (head importance, FFN importance, FFN fix-up: none | bias (mean compensation) | refit (least squares))
SETTINGS = [("l1", "l1", "none"), ("l1", "activation", "none"), ("gradient", "activation", "none"),
            ("entropy", "activation", "none"), ("entropy", "activation", "bias"), ("l1", "activation", "refit"),
            ("gradient", "activation", "refit"), ("entropy", "activation", "refit")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--ffn", type=int, default=1024)
    parser.add_argument("--heldout", type=int, default=128)
    parser.add_argument("--calibration-batches", type=int, default=8)
    args = parser.parse_args()

    loaded = load_model("builtin:minilm-l6")
    base = trace(loaded.model, example_inputs(loaded.tokenizer), max_length=loaded.max_length)
    calibration = prepare_calibration(loaded.tokenizer, source="builtin", samples=256, validation_samples=8,
                                      max_length=128, batch_size=16, seed=0, model_max_length=loaded.max_length)
    heldout = prepare_calibration(loaded.tokenizer, source="builtin:wordnet", samples=8,
                                  validation_samples=args.heldout, max_length=128, batch_size=32, seed=1,
                                  model_max_length=loaded.max_length).heldout_batches
    reference = run_batches(hidden_states(loaded.model), heldout)
    print(f"MiniLM-L6 -> {args.heads} heads / {args.ffn} FFN neurons per layer; held-out WordNet cosine"
          f" ({args.heldout} texts), calibration: {args.calibration_batches} x 16 Python-docs texts")
    print(f"{'heads':>9} {'ffn':>11} {'ffn fix':>9} | {'fp32 mean':>9} {'fp32 min':>8} | {'int8 mean':>9} {'int8 min':>8} | seconds")
    for head_importance, ffn_importance, refit in SETTINGS:
        started = time.perf_counter()
        gm = copy.deepcopy(base)
        batches = args.calibration_batches
        run_pass("prune-heads", {"keep": args.heads, "importance": head_importance, "calibration_batches": batches},
                 gm, loaded, calibration)
        run_pass("prune-ffn", {"keep": args.ffn, "importance": ffn_importance, "reconstruct": refit == "refit",
                               "compensate_bias": refit == "bias", "calibration_batches": batches}, gm, loaded, calibration)
        seconds = time.perf_counter() - started
        fp32 = compare(reference, run_batches(hidden_states(gm), heldout), heldout)
        run_pass("quantize-linear", {"dtype": "int8"}, gm, loaded, calibration)
        int8 = compare(reference, run_batches(hidden_states(gm), heldout), heldout)
        print(f"{head_importance:>9} {ffn_importance:>11} {refit:>9} | {fp32.cosine:9.4f} {fp32.cosine_min:8.4f} |"
              f" {int8.cosine:9.4f} {int8.cosine_min:8.4f} | {seconds:.0f}", flush=True)


if __name__ == "__main__":
    main()
