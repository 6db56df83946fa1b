"""How small and how faithful is the output of an embedding-compression recipe (default recipes/minilm-small.yaml)?

Measured in one run:
  * folder bytes: every file of the compiled output folder (model, tokenizer, configs, report) against
    the fp32 original, i.e. a plain fp32 ONNX export of the same model plus the files the compiler
    carries (tokenizer, configs, pooling), and against the original Hugging Face folder;
  * held-out in-domain cosine: the recipe's held-out slice (same seed, never used to pick the
    vocabulary), tokenized by the OUTPUT folder's tokenizer and run by ONNX Runtime, against the
    reference model on the original tokenization (mean-pooled sentence embeddings);
  * out-of-vocabulary rate: held-out tokens (original tokenization, special tokens excluded) that
    the pruned vocabulary does not have, and held-out words the new tokenizer turns into [UNK];
  * the same cosine on WordNet glosses, a domain the recipe never saw (for information).

Why the recipe needs 4-bit linears: 10x of the 91.6 MB fp32 export is 9.16 MB for every file. The six
encoder layers hold 10.6 M linear weights; at int8 (a byte each plus per-channel scales) they and the
pooler take ~10.9 MB, more than the whole budget before any embedding or tokenizer byte. At int4 with
blocks of 32 (half a byte per weight, a float16 scale and a 4-bit zero point per block) they take
~6.2 MB, leaving ~2.9 MB for the int8 tables of the kept vocabulary, the tokenizer and the configs.
Round-to-nearest 4-bit costs too much fidelity; GPTQ rounding on calibration text is what keeps the
budget. ``--encoder-precision`` measures what round-to-nearest precisions would cost (simulated on the
reference, embeddings untouched), for comparison.

Prints its tables and writes them to --results (default bench/results/small-model.md).

Usage: python bench/small_model.py [recipe.yaml] [--out DIR] [--results FILE] [--encoder-precision]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from compiler.calibration import prepare_calibration, wordnet_texts
from compiler.compile import compile_recipe
from compiler.frontend import CARRIED_FILES, example_inputs, load_model
from compiler.lowering import lower_to_onnx
from compiler.recipe import load_recipe
from compiler.runtime import session
from compiler.validation import pool

ROOT = Path(__file__).resolve().parent.parent


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def fp32_original(loaded, folder: Path) -> int:
    """A plain fp32 ONNX export of the unmodified model, plus the files a compile carries over."""
    lower_to_onnx(loaded.model, example_inputs(loaded.tokenizer), folder, quantize=None, fuse=True)
    for name in CARRIED_FILES:
        if (loaded.path / name).is_file():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(loaded.path / name, folder / name)
    return folder_bytes(folder)


def embed_reference(loaded, texts: list[str], max_length: int) -> torch.Tensor:
    out = []
    for start in range(0, len(texts), 32):
        enc = loaded.tokenizer(texts[start:start + 32], padding=True, truncation=True, max_length=max_length,
                               return_tensors="pt")
        with torch.no_grad():
            hidden = loaded.model(**enc)[0]
        out.append(pool(hidden, enc["attention_mask"]))
    return torch.cat(out)


def embed_output(folder: Path, texts: list[str], max_length: int, threads: int) -> torch.Tensor:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    runner = session(folder / "model.onnx", threads)
    names = [i.name for i in runner.get_inputs()]
    out = []
    for start in range(0, len(texts), 32):
        enc = tokenizer(texts[start:start + 32], padding=True, truncation=True, max_length=max_length, return_tensors="np")
        feed = {name: enc[name].astype(np.int64) if name in enc else np.zeros_like(enc["input_ids"], dtype=np.int64)
                for name in names}
        hidden = torch.from_numpy(runner.run(None, feed)[0])
        out.append(pool(hidden, torch.from_numpy(enc["attention_mask"])))
    return torch.cat(out)


def oov_rates(loaded, folder: Path, texts: list[str]) -> tuple[float, float]:
    from transformers import AutoTokenizer

    new = AutoTokenizer.from_pretrained(folder)
    vocab = set(new.get_vocab())
    old_tokens = [t for text in texts for t in loaded.tokenizer.tokenize(text)]
    words = [w for text in texts for w in text.split()]
    unk_words = sum(1 for w in words if new.unk_token in new.tokenize(w) and loaded.tokenizer.unk_token not in
                    loaded.tokenizer.tokenize(w))
    return sum(1 for t in old_tokens if t not in vocab) / len(old_tokens), unk_words / len(words)


def fake_quantize_blocks(weight: torch.Tensor, bits: int, block: int | None) -> torch.Tensor:
    """Symmetric round-to-nearest with one scale per block of ``block`` inputs (None: per output channel)."""
    rows, cols = weight.shape
    groups = weight.reshape(rows, cols // (block or cols), block or cols)
    top = 2 ** (bits - 1) - 1
    scale = groups.abs().amax(-1, keepdim=True).clamp(min=1e-12) / top
    return (torch.clamp(torch.round(groups / scale), -top - 1, top) * scale).reshape(rows, cols)


def encoder_precision_table(loaded, batches: list[dict[str, torch.Tensor]]) -> None:
    import copy

    def embed(model):
        with torch.no_grad():
            return torch.cat([pool(model(**b)[0], b["attention_mask"]) for b in batches])

    reference = embed(loaded.model)
    linears = [m for name, m in loaded.model.named_modules() if isinstance(m, torch.nn.Linear) and ".layer." in name]
    weights = sum(m.weight.numel() for m in linears)
    print("| encoder linear weights (simulated, weight-only) | MB on disk | held-out mean cosine | min |")
    print("|---|---:|---:|---:|")
    for bits, block in ((8, None), (5, 32), (4, 32), (4, 16)):
        model = copy.deepcopy(loaded.model)
        for module in [m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layer." in name]:
            module.weight.data = fake_quantize_blocks(module.weight.data, bits, block)
        cos = torch.nn.functional.cosine_similarity(reference, embed(model), dim=-1)
        scales = 4 * (weights // block if block else sum(m.weight.shape[0] for m in linears))
        label = f"int{bits} " + (f"block {block}" if block else "per channel")
        print(f"| {label} | {(weights * bits / 8 + scales) / 1e6:.2f} | {float(cos.mean()):.4f} | {float(cos.min()):.4f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", nargs="?", default=str(ROOT / "recipes" / "minilm-small.yaml"))
    parser.add_argument("--out", default=None, help="output folder (default: a temporary folder)")
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "results" / "small-model.md",
                        help="where the tables are written as well as printed (default bench/results/small-model.md)")
    parser.add_argument("--encoder-precision", action="store_true",
                        help="only measure the fidelity of lower encoder weight precisions (no compile)")
    args = parser.parse_args()
    command = " ".join(["python bench/small_model.py", *sys.argv[1:]])
    recipe = load_recipe(args.recipe)
    settings = recipe.file
    if args.encoder_precision:
        loaded = load_model(settings.model)
        cal = settings.calibration
        data = prepare_calibration(loaded.tokenizer, source=cal.texts, samples=cal.samples,
                                   validation_samples=cal.validation_samples, max_length=cal.max_length,
                                   batch_size=cal.batch_size, seed=cal.seed, model_max_length=loaded.max_length,
                                   base_dir=recipe.base_dir)
        encoder_precision_table(loaded, data.heldout_batches)
        return
    work = Path(tempfile.mkdtemp(prefix="bertpress-small-"))
    out = Path(args.out) if args.out else work / "compiled"

    started = time.perf_counter()
    result = compile_recipe(recipe, out, force=True)
    compile_seconds = time.perf_counter() - started
    if result.exit_code != 0:
        raise SystemExit(f"compile failed (exit {result.exit_code}): {result.report['failure']}")
    loaded = load_model(settings.model)
    original = fp32_original(loaded, work / "fp32")
    hf_folder = folder_bytes(loaded.path)
    compiled = folder_bytes(out)

    cal = settings.calibration
    data = prepare_calibration(loaded.tokenizer, source=cal.texts, samples=cal.samples,
                               validation_samples=cal.validation_samples, max_length=cal.max_length,
                               batch_size=cal.batch_size, seed=cal.seed, model_max_length=loaded.max_length,
                               base_dir=recipe.base_dir)
    heldout = data.heldout_texts
    threads = settings.target.threads
    in_domain = torch.nn.functional.cosine_similarity(
        embed_reference(loaded, heldout, cal.max_length), embed_output(out, heldout, cal.max_length, threads), dim=-1)
    glosses = random.Random(1).sample(wordnet_texts(), 500)
    other = torch.nn.functional.cosine_similarity(
        embed_reference(loaded, glosses, cal.max_length), embed_output(out, glosses, cal.max_length, threads), dim=-1)
    token_oov, word_unk = oov_rates(loaded, out, heldout)
    vocab_pass = next((p for p in result.report["passes"] if p["name"] == "prune-vocab"), None)

    lines: list[str] = []
    lines.append(f"# {Path(args.recipe).name}: compiled in {compile_seconds:.0f} s -> {out}\n")
    lines.append("| folder | bytes | ratio to fp32 original |")
    lines.append("|---|---:|---:|")
    lines.append(f"| original Hugging Face folder ({loaded.path.name}) | {hf_folder:,} | {hf_folder / original:.3f} |")
    lines.append(f"| fp32 original (ONNX export + carried files) | {original:,} | 1.000 |")
    lines.append(f"| compiled output (all files) | {compiled:,} | {compiled / original:.4f} ({original / compiled:.2f}x smaller) |")
    lines.append("")
    lines.append("| file in the output | bytes |")
    lines.append("|---|---:|")
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        lines.append(f"| {path.relative_to(out)} | {path.stat().st_size:,} |")
    lines.append("")
    lines.append("| held-out check (output tokenizer + ONNX Runtime vs reference) | texts | mean cosine | min cosine |")
    lines.append("|---|---:|---:|---:|")
    lines.append(f"| in-domain ({cal.texts}, held-out slice) | {len(heldout)} | {float(in_domain.mean()):.4f} | {float(in_domain.min()):.4f} |")
    lines.append(f"| other domain (WordNet glosses) | {len(glosses)} | {float(other.mean()):.4f} | {float(other.min()):.4f} |")
    lines.append("")
    if vocab_pass is not None:
        details = vocab_pass["details"]
        lines.append(f"tokens kept: {details['tokens_kept']:,} of {details['tokens_before']:,} "
                     f"(from {details['corpus_texts']:,} texts of {details['corpus']})")
    lines.append(f"held-out OOV: {token_oov:.2%} of tokens not in the kept vocabulary; {word_unk:.2%} of words become [UNK]")
    lines.append(f"compile's own final check: {result.report['final_check']}")

    text = "\n".join(lines) + "\n"
    print(text, end="")
    if args.results is not None:
        from compiler.report import environment
        from compiler.roofline import _cpu_name

        env = environment()
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(f"# {Path(args.recipe).name}: size and held-out fidelity (written by bench/small_model.py)\n\n"
                                f"Command: `{command}`; {_cpu_name()}, onnxruntime {env['onnxruntime']}, torch {env['torch']};"
                                f" load average after: {[round(x, 1) for x in os.getloadavg()]}. The compile took"
                                f" {compile_seconds:.0f} s.\n\n" + text.split("\n", 2)[2])
        print(f"wrote {args.results}")


if __name__ == "__main__":
    main()
