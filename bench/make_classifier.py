"""Fine-tune the packaged all-MiniLM-L6-v2 into a real text classifier, for the task-model bench (bench/task_compare.py).

Corpus: WordNet 3.0 noun glosses (Debian package wordnet-base, /usr/share/wordnet; WordNet 3.0 licence: use, copy,
modify and distribute for any purpose, with Princeton's copyright notice kept), each labeled with its synset's
lexicographer file (its "supersense"): the task is to tell from a definition alone whether the word it defines is an
animal, an artifact, a body part, a food, a location, a person, a plant or a substance. Per class, seeded:
``--heldout`` glosses are held out (the labeled split every bench figure is measured on) and up to ``--train``
glosses train the classifier; the two are disjoint and no gloss text appears in both.

Writes to --out (default out/minilm-supersense): the Hugging Face folder (BertForSequenceClassification with
id2label / label2id, safetensors, tokenizer), train.jsonl and heldout.jsonl ({"text", "label"} lines, label the class
name), and finetune.json (settings, seconds, held-out accuracy of the PyTorch model).

    OMP_NUM_THREADS=2 python bench/make_classifier.py [--out out/minilm-supersense] [--epochs 1] [--threads 2]

finetune.json records the steps and the seconds they took.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from compiler.frontend import resolve_model_path

WORDNET_NOUNS = Path("/usr/share/wordnet/data.noun")
# Lexicographer file numbers of WordNet 3.0 (lexnames) -> the class names the classifier predicts.
CLASSES = {"05": "noun.animal", "06": "noun.artifact", "08": "noun.body", "13": "noun.food",
           "15": "noun.location", "18": "noun.person", "20": "noun.plant", "27": "noun.substance"}


def labeled_glosses() -> dict[str, list[str]]:
    """Each class's distinct glosses (the definition, without the quoted usage examples), in file order."""
    if not WORDNET_NOUNS.is_file():
        sys.exit(f"error: {WORDNET_NOUNS} is missing; install the Debian package wordnet-base (apt-get install wordnet-base).")
    by_class: dict[str, list[str]] = {name: [] for name in CLASSES.values()}
    seen: set[str] = set()
    for line in WORDNET_NOUNS.read_text(encoding="utf-8", errors="replace").splitlines():
        if line.startswith("  ") or "|" not in line:
            continue  # the licence header
        lexfile = line.split()[1]
        if lexfile not in CLASSES:
            continue
        pieces = [p.strip() for p in line.split("|", 1)[1].split(";") if p.strip()]
        definition = next((p for p in pieces if not p.startswith('"')), None)
        if definition and len(definition.split()) >= 3 and definition not in seen:
            seen.add(definition)
            by_class[CLASSES[lexfile]].append(definition)
    return by_class


def split(by_class: dict[str, list[str]], train: int, heldout: int, seed: int) -> tuple[list[dict], list[dict]]:
    rng = random.Random(seed)
    train_rows, heldout_rows = [], []
    for label, texts in sorted(by_class.items()):
        texts = list(texts)
        rng.shuffle(texts)
        heldout_rows += [{"text": t, "label": label} for t in texts[:heldout]]
        train_rows += [{"text": t, "label": label} for t in texts[heldout:heldout + train]]
    rng.shuffle(train_rows)
    rng.shuffle(heldout_rows)
    return train_rows, heldout_rows


def accuracy(model, tokenizer, rows: list[dict], label2id: dict, max_length: int) -> float:
    model.eval()
    right = 0
    with torch.no_grad():
        for start in range(0, len(rows), 64):
            chunk = rows[start:start + 64]
            enc = tokenizer([r["text"] for r in chunk], padding=True, truncation=True, max_length=max_length,
                            return_tensors="pt")
            predicted = model(**enc).logits.argmax(-1)
            right += sum(int(p) == label2id[r["label"]] for p, r in zip(predicted, chunk))
    return right / len(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "out" / "minilm-supersense"))
    parser.add_argument("--train", type=int, default=1000, help="training glosses per class (at most)")
    parser.add_argument("--heldout", type=int, default=200, help="held-out glosses per class")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    train_rows, heldout_rows = split(labeled_glosses(), args.train, args.heldout, args.seed)
    labels = sorted(CLASSES.values())
    label2id = {name: i for i, name in enumerate(labels)}
    source = resolve_model_path("builtin:minilm-l6")
    tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
    model = AutoModelForSequenceClassification.from_pretrained(
        source, local_files_only=True, num_labels=len(labels), id2label=dict(enumerate(labels)), label2id=label2id)

    steps = math.ceil(len(train_rows) * args.epochs / args.batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    warmup = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.0, (steps - s) / max(1, steps - warmup))))
    print(f"{len(train_rows)} training / {len(heldout_rows)} held-out glosses, {len(labels)} classes, {steps} steps", flush=True)
    started = time.perf_counter()
    order: list[dict] = []
    rng = random.Random(args.seed + 1)
    model.train()
    for step in range(steps):
        if len(order) < args.batch_size:
            more = list(train_rows)
            rng.shuffle(more)
            order += more
        chunk, order = order[:args.batch_size], order[args.batch_size:]
        enc = tokenizer([r["text"] for r in chunk], padding=True, truncation=True, max_length=args.max_length,
                        return_tensors="pt")
        target = torch.tensor([label2id[r["label"]] for r in chunk])
        loss = torch.nn.functional.cross_entropy(model(**enc).logits, target)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        if step % 50 == 0 or step == steps - 1:
            print(f"step {step + 1}/{steps} loss {loss.item():.4f} ({time.perf_counter() - started:.0f} s)", flush=True)
    seconds = time.perf_counter() - started
    held = accuracy(model, tokenizer, heldout_rows, label2id, args.max_length)
    print(f"held-out accuracy {held:.4f} after {seconds:.0f} s", flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    for name, rows in (("train.jsonl", train_rows), ("heldout.jsonl", heldout_rows)):
        (out / name).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (out / "finetune.json").write_text(json.dumps({
        "base": "builtin:minilm-l6", "corpus": f"{WORDNET_NOUNS} (WordNet 3.0, Debian wordnet-base; WordNet 3.0 licence)",
        "classes": labels, "train": len(train_rows), "heldout": len(heldout_rows), "settings": vars(args),
        "steps": steps, "seconds": round(seconds, 1), "heldout_accuracy": held}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
