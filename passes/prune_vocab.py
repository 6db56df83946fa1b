"""prune-vocab: keep only the word-embedding rows a domain corpus uses, renumber token ids, rewrite the tokenizer.

Rewrites the word-embedding table (or, after ``low-rank: {target: embeddings}``, its factorized
table) to the rows of the kept tokens: the special tokens, every token the domain corpus tokenizes
to (at least ``min_count`` times), optionally the ``keep_top`` most frequent tokens of a general
corpus, every single-character token and every Latin-alphabet token (``keep_latin``). Kept tokens keep
their relative order, so [PAD] stays id 0.
The pass returns the new tokenizer (vocab.txt, tokenizer.json, tokenizer_config.json, written into
the output folder by the driver) and an :class:`InputMap` carrying it, so the manager re-tokenizes
its held-out (and calibration) texts as a user of the output would and later passes calibrate in
the new ids; the map also renumbers old ids one by one (dropped tokens become [UNK]) for the exact check.

Exact on in-vocabulary text: the manager checks it to 1e-4 on the held-out texts, with the dropped
tokens replaced by [UNK] for the graph before it too (``InputMap.restore``), and reports the share
of held-out tokens that were dropped (the out-of-vocabulary rate); the recipe's budget, checked
against the reference on the lowered model, covers what [UNK] costs. Needs the BERT structure, a fast
WordPiece tokenizer and the calibration text. The reference keeps the old ids, so passes that feed
one batch to both the reference and the graph (importance by gradient, distillation) run before it.
"""

from __future__ import annotations

import json
import random
import tempfile
from collections import Counter
from pathlib import Path

import torch

from compiler.calibration import load_texts
from compiler.graph_edit import get_tensor, remove_dead_code, set_parameter
from compiler.pass_infra import InputMap, Pass, PassContext, PassResult, register_pass
from compiler.tasks import task_of_model
from passes.options import PRUNE_VOCAB

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt")


def _latin(token: str) -> bool:
    """Whether a vocabulary entry is a Latin-alphabet, digit or punctuation piece (not a placeholder like [unused3])."""
    if token.startswith("[") and token.endswith("]") and len(token) > 2:
        return False
    return all(ord(c) < 0x250 for c in token)


class TokenIdMap(InputMap):
    """Renumbers token ids: kept tokens get their new id, dropped ones the new [UNK]."""

    def __init__(self, kept: torch.Tensor, old_vocab: int, unknown: int, tokenizer):
        self.kept = kept
        self.old_to_new = torch.full((old_vocab,), unknown, dtype=torch.long)
        self.old_to_new[kept] = torch.arange(len(kept))
        self.known = torch.zeros(old_vocab, dtype=torch.bool)
        self.known[kept] = True
        self.tokenizer = tokenizer

    def map_batch(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {**batch, "input_ids": self.old_to_new[batch["input_ids"]]}

    def restore(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {**batch, "input_ids": self.kept[batch["input_ids"]]}

    def lossless(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.known[batch["input_ids"]]


@register_pass
class PruneVocab(Pass):
    """Keep only the vocabulary a domain corpus uses; renumber ids and rewrite the tokenizer."""

    declaration = PRUNE_VOCAB
    kind = "exact"
    requires = ("structure", "calibration", "tokenizer")

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        cfg = self.config
        task = task_of_model(ctx.reference)
        if task in ("token-classification", "question-answering"):
            raise self.refuse(f"prune-vocab rewrites the tokenizer, so a {task} model's per-token outputs would no longer"
                              " line up with the tokens a user's labels or answer spans refer to.",
                              fix="remove prune-vocab (quantize-embeddings shrinks the table without retokenizing).")
        tokenizer = ctx.tokenizer
        spec = self._tokenizer_spec(tokenizer)
        embeddings = ctx.structure(gm).embeddings
        table = get_tensor(gm, embeddings.word_weight)
        readers = [n for n in gm.graph.nodes if n.op == "get_attr" and n.target == embeddings.word_weight]
        if len(readers) != 1 or len(readers[0].users) != 1:
            raise self.refuse(f"the word-embedding table {embeddings.word_weight} is read by more than the lookup"
                              " (tied weights); pruning its rows would change the other reader.",
                              fix="untie the weights or leave out prune-vocab.")
        vocab = len(spec["model"]["vocab"])
        if vocab != table.shape[0]:
            raise self.refuse(f"the tokenizer has {vocab} tokens but the word-embedding table has {table.shape[0]} rows.",
                              fix="use the tokenizer the model was trained with.")

        texts, source = self._corpus(ctx)
        counts = Counter(i for ids in tokenizer(texts, add_special_tokens=False)["input_ids"] for i in ids)
        keep = {i for i, n in counts.items() if n >= cfg.min_count}
        corpus_tokens = len(keep)
        keep |= set(tokenizer.all_special_ids)
        keep |= {t["id"] for t in spec.get("added_tokens", [])}
        extra = {}
        if cfg.keep_top:
            general = load_texts(cfg.frequency_texts, ctx.base_dir)
            ranked = Counter(i for ids in tokenizer(general, add_special_tokens=False)["input_ids"] for i in ids)
            top = {i for i, _ in ranked.most_common(cfg.keep_top)}
            extra["keep_top_added"] = len(top - keep)
            keep |= top
        if cfg.keep_characters:
            prefix = spec["model"].get("continuing_subword_prefix", "##")
            chars = {i for token, i in spec["model"]["vocab"].items()
                     if len(token) == 1 or (token.startswith(prefix) and len(token) == len(prefix) + 1)}
            extra["characters_added"] = len(chars - keep)
            keep |= chars
        if cfg.keep_latin:
            latin = {i for token, i in spec["model"]["vocab"].items() if _latin(token)}
            extra["latin_added"] = len(latin - keep)
            keep |= latin
        kept = torch.tensor(sorted(keep), dtype=torch.long)

        set_parameter(gm, embeddings.word_weight, table[kept])
        remove_dead_code(gm)
        files, new_tokenizer = self._rewrite_tokenizer(tokenizer, spec, kept)
        unknown = int(torch.searchsorted(kept, torch.tensor(tokenizer.unk_token_id)))
        details = {"corpus": source, "corpus_texts": len(texts), "corpus_tokens": sum(counts.values()),
                   "tokens_before": vocab, "tokens_kept": len(kept), "tokens_from_corpus": corpus_tokens, **extra,
                   "table": [len(kept), int(table.shape[1])], "weights_before": int(table.numel()),
                   "weights_after": len(kept) * int(table.shape[1]),
                   "note": "held-out tokens outside the kept vocabulary map to [UNK]; the manager's check reports their share"}
        lowering = {"files": files, "config": {"vocab_size": len(kept)}}
        return PassResult(gm, modified=True, details=details, lowering=lowering,
                          inputs=TokenIdMap(kept, vocab, unknown, new_tokenizer))

    def _tokenizer_spec(self, tokenizer) -> dict:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise self.refuse("the tokenizer is not a fast (tokenizers) tokenizer, so its vocabulary cannot be rewritten.",
                              fix="add tokenizer.json to the model folder or leave out prune-vocab.")
        spec = json.loads(backend.to_str())
        kind = spec["model"].get("type")
        if kind != "WordPiece":
            # BPE merges and unigram scores refer to tokens by string; dropping tokens breaks them.
            raise self.refuse(f"prune-vocab supports WordPiece tokenizers (BERT); this one is {kind}.",
                              fix="leave out prune-vocab for this model.")
        return spec

    def _corpus(self, ctx: PassContext) -> tuple[list[str], str]:
        cfg = self.config
        heldout = set(ctx.calibration.heldout_texts)
        if cfg.texts is None:
            texts, source = list(ctx.calibration.texts), "calibration"
        else:
            sources = [cfg.texts] if isinstance(cfg.texts, str) else cfg.texts
            texts = list(dict.fromkeys(t for name in sources for t in load_texts(name, ctx.base_dir)))
            source = cfg.texts
        # Validation must see text the vocabulary was not chosen from.
        texts = [t for t in texts if t not in heldout]
        if cfg.samples is not None and cfg.samples < len(texts):
            texts = random.Random(ctx.seed).sample(texts, cfg.samples)
        if not texts:
            raise self.refuse(f"the domain corpus {source!r} has no texts outside the held-out slice.",
                              fix="give prune-vocab a corpus with texts (texts: ...).")
        return texts, source

    def _rewrite_tokenizer(self, tokenizer, spec: dict, kept: torch.Tensor) -> tuple[dict[str, str], object]:
        """The tokenizer files for the kept ids, and the tokenizer loaded from them."""
        from transformers import AutoTokenizer

        new_id = {int(old): new for new, old in enumerate(kept.tolist())}
        by_id = {i: token for token, i in spec["model"]["vocab"].items()}
        tokens = [by_id[int(old)] for old in kept.tolist()]
        spec = json.loads(json.dumps(spec))
        spec["model"]["vocab"] = {token: i for i, token in enumerate(tokens)}
        for added in spec.get("added_tokens", []):
            added["id"] = new_id[added["id"]]
        _renumber_post_processor(spec.get("post_processor"), new_id)
        if spec.get("padding") and "pad_id" in spec["padding"]:
            spec["padding"]["pad_id"] = new_id[spec["padding"]["pad_id"]]
        with tempfile.TemporaryDirectory(prefix="bertpress-vocab-") as tmp:
            folder = Path(tmp)
            tokenizer.save_pretrained(folder)
            # Compact: the file ships in a size-constrained output folder (indenting it costs ~40%).
            (folder / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False, separators=(",", ":")),
                                                   encoding="utf-8")
            (folder / "vocab.txt").write_text("".join(token + "\n" for token in tokens), encoding="utf-8")
            config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
            if "added_tokens_decoder" in config:
                config["added_tokens_decoder"] = {str(new_id[int(i)]): value
                                                  for i, value in config["added_tokens_decoder"].items()}
            # Machine-specific load options must not ship in the output folder.
            for key in ("is_local", "local_files_only"):
                config.pop(key, None)
            (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n",
                                                          encoding="utf-8")
            files = {name: (folder / name).read_text(encoding="utf-8") for name in TOKENIZER_FILES}
            loaded = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        return files, loaded


def _renumber_post_processor(processor: dict | None, new_id: dict[int, int]) -> None:
    """Point the [CLS]/[SEP] ids of a tokenizers post-processor at the new vocabulary, in place."""
    if not processor:
        return
    for child in processor.get("processors", []):  # Sequence of processors
        _renumber_post_processor(child, new_id)
    for special in processor.get("special_tokens", {}).values():  # TemplateProcessing
        special["ids"] = [new_id[i] for i in special["ids"]]
    for key in ("cls", "sep"):  # BertProcessing / RobertaProcessing: [token, id]
        if isinstance(processor.get(key), list):
            processor[key] = [processor[key][0], new_id[processor[key][1]]]
