"""Run the split form of a decouple-attention model: cache one segment's states, score many others.

A compile whose recipe has ``decouple-attention`` writes, next to the drop-in ``model.onnx``:

- ``lower.onnx`` (``input_ids, attention_mask, token_type_ids`` of one segment -> ``hidden_states``
  after the decoupled layers) and
- ``upper.onnx`` (``hidden_states, attention_mask`` of the concatenated segments ->
  ``last_hidden_state``, ``pooler_output``).

Reranking one query against many passages then costs one lower pass per passage, done once and
cached (:meth:`SplitEncoder.cache_passages`), plus per query one lower pass over the query alone
and the upper layers over every (query, passage) pair (:meth:`SplitEncoder.pairs`)::

    encoder = SplitEncoder.from_folder("out/minilm-deformer")
    cache = encoder.cache_passages(passages, max_length=96)      # once
    result = encoder.pairs("how do I sort a list?", cache)        # per query
    result.pooled  # [N, hidden] pair embeddings (feed them to the task's scoring head)

The pair ``(query, passage)`` gives the same outputs on its real tokens as ``model.onnx`` on the
tokenizer's pair encoding ``[CLS] query [SEP] passage [SEP]`` (the compile checks this, see
``compiler/lowering/split.py``): lower layers never look across segments and restart positions per
segment, and the upper layers do not use positions, so where padding sits does not matter.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .runtime import session


@dataclass
class CachedSegments:
    """Lower-layer states of segment-B texts, computed once."""

    states: np.ndarray  # [N, S, H] float32
    attention_mask: np.ndarray  # [N, S] int64


@dataclass
class PairOutputs:
    last_hidden_state: np.ndarray  # [N, S_query + S_passage, H]
    attention_mask: np.ndarray  # [N, S_query + S_passage]
    pooler_output: np.ndarray | None

    @property
    def pooled(self) -> np.ndarray:
        """Mean-pooled pair embeddings over real tokens (sentence-transformers' pooling)."""
        weights = self.attention_mask[..., None].astype(np.float32)
        return (self.last_hidden_state * weights).sum(1) / np.maximum(weights.sum(1), 1e-9)


class SplitModel:
    """ONNX Runtime sessions of lower.onnx and upper.onnx and how they compose."""

    def __init__(self, lower_path: Path, upper_path: Path, threads: int = 2):
        self.lower = session(Path(lower_path), threads)
        self.upper = session(Path(upper_path), threads)

    def encode_segment(self, input_ids: np.ndarray, attention_mask: np.ndarray, token_type_ids: np.ndarray) -> np.ndarray:
        """Lower-layer states of a batch of single segments (each with its own token type)."""
        feeds = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
        return self.lower.run(None, {k: np.ascontiguousarray(v, dtype=np.int64) for k, v in feeds.items()})[0]

    def joint(self, states: np.ndarray, attention_mask: np.ndarray) -> list[np.ndarray]:
        """Upper layers over concatenated segment states."""
        return self.upper.run(None, {"hidden_states": np.ascontiguousarray(states, dtype=np.float32),
                                     "attention_mask": np.ascontiguousarray(attention_mask, dtype=np.int64)})

    def compose(self, input_ids: np.ndarray, attention_mask: np.ndarray, token_type_ids: np.ndarray) -> list[np.ndarray]:
        """What model.onnx computes on a tokenized batch, by encoding every row's segments apart."""
        batch, seq = input_ids.shape
        states = None
        for row in range(batch):
            real = attention_mask[row] != 0
            for segment in np.unique(token_type_ids[row][real]):
                where = np.flatnonzero(real & (token_type_ids[row] == segment))
                part = self.encode_segment(input_ids[row, where][None], np.ones((1, len(where)), np.int64),
                                           np.full((1, len(where)), segment, np.int64))[0]
                if states is None:
                    states = np.zeros((batch, seq, part.shape[-1]), np.float32)
                states[row, where] = part
        return self.joint(states, attention_mask)


class SplitEncoder:
    """A tokenizer plus a :class:`SplitModel`: cache passages once, then encode queries against them."""

    def __init__(self, model: SplitModel, tokenizer):
        self.model = model
        self.tokenizer = tokenizer

    @classmethod
    def from_folder(cls, folder: Path, threads: int = 2) -> "SplitEncoder":
        from transformers import AutoTokenizer

        folder = Path(folder)
        return cls(SplitModel(folder / "lower.onnx", folder / "upper.onnx", threads),
                   AutoTokenizer.from_pretrained(folder, local_files_only=True))

    def _second_segments(self, texts: list[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
        # Tokenize as the second half of a pair, so special tokens and truncation are the pair
        # encoding's own (for BERT: "passage [SEP]"), then keep only the segment-1 tokens.
        enc = self.tokenizer([""] * len(texts), texts, truncation="only_second", max_length=max_length + 8)
        rows = [[t for t, s in zip(ids, types) if s == 1][:max_length]
                for ids, types in zip(enc["input_ids"], enc["token_type_ids"])]
        width = max(len(r) for r in rows)
        ids = np.full((len(rows), width), self.tokenizer.pad_token_id or 0, np.int64)
        mask = np.zeros((len(rows), width), np.int64)
        for i, row in enumerate(rows):
            ids[i, :len(row)] = row
            mask[i, :len(row)] = 1
        return ids, mask

    def cache_passages(self, texts: list[str], max_length: int = 256, batch_size: int = 32) -> CachedSegments:
        """Lower-layer states of each text as segment B (token type 1); compute once, reuse for every query."""
        ids, mask = self._second_segments(texts, max_length)
        states = [self.model.encode_segment(ids[i:i + batch_size], mask[i:i + batch_size],
                                            np.ones_like(ids[i:i + batch_size]))
                  for i in range(0, len(texts), batch_size)]
        return CachedSegments(np.concatenate(states), mask)

    def encode_query(self, query: str, max_length: int = 64) -> np.ndarray:
        """Lower-layer states of the query as segment A ([CLS] query [SEP], token type 0): [1, S, H]."""
        enc = self.tokenizer([query], truncation=True, max_length=max_length, return_tensors="np")
        ids = enc["input_ids"].astype(np.int64)
        return self.model.encode_segment(ids, np.ones_like(ids), np.zeros_like(ids))

    def pairs(self, query: str | np.ndarray, cache: CachedSegments, max_length: int = 64) -> PairOutputs:
        """Joint outputs of (query, passage) for every cached passage; the query's lower states are computed once."""
        query_states = self.encode_query(query, max_length) if isinstance(query, str) else query
        n = len(cache.states)
        states = np.concatenate([np.broadcast_to(query_states, (n, *query_states.shape[1:])), cache.states], axis=1)
        mask = np.concatenate([np.ones((n, query_states.shape[1]), np.int64), cache.attention_mask], axis=1)
        outputs = self.model.joint(states, mask)
        return PairOutputs(outputs[0], mask, outputs[1] if len(outputs) > 1 else None)
