"""Calibration text: where it comes from, how it is sampled, and the held-out slice that validates.

The builtin corpus is real prose that ships with Python itself (the reference-manual topics in
``pydoc_data``), so the main command works offline. WordNet's glosses (Debian package
``wordnet-base``) are a second, broader corpus of another domain, used as held-out text in benches.
Two more broaden distillation or measure fidelity away from it: the docstrings of Python's standard
library (technical prose that also ships with Python, written apart from the reference manual: two of
its sentences appear among the 1,569 of ``builtin:python-docs``) and the Debian package ``fortunes``
(quotations, jokes and sayings on some forty subjects: everyday English far from both). The fortunes come whole
and split by subject: ``builtin:fortunes-train`` (computers, politics, science, jokes, ...) to distill on, and
``builtin:fortunes-heldout`` (fourteen everyday-life subjects: people, love, work, food, ...) to measure on.
"""

from __future__ import annotations

import functools
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import CalibrationError

if TYPE_CHECKING:  # torch is imported where batches are made, so reading text sources (bertpress validate) needs none
    import torch

WORDNET_DIR = Path("/usr/share/wordnet")
FORTUNES_DIR = Path("/usr/share/games/fortunes")
JARGON_FILE = Path("/usr/share/dictd/jargon.dict.dz")
# The R package janeaustenr's data (Debian package r-cran-janeaustenr): a lazy-load database of six character vectors.
AUSTEN_DIR = Path("/usr/lib/R/site-library/janeaustenr/data")
_WORDS = re.compile(r"[A-Za-z]")


def _is_prose(text: str) -> bool:
    """A text the corpora keep: 6-80 words, mostly letters (not a heading, a table row or a line of code)."""
    return 6 <= len(text.split()) <= 80 and len(_WORDS.findall(text)) > len(text) / 2


def _prose_paragraphs(document: str) -> list[list[str]]:
    """The prose paragraphs of a plain-text document, each as its list of kept sentences (6-80 words, mostly letters)."""
    paragraphs: list[list[str]] = []
    for paragraph in re.split(r"\n\s*\n", document):
        lines = paragraph.splitlines()
        # Indented paragraphs are code samples or grammar productions, not prose.
        if not lines or lines[0].startswith((" ", "\t", ">>>")) or set(lines[-1].strip()) <= set("*=-~^"):
            continue
        text = " ".join(line.strip() for line in lines)
        sentences = []
        for sentence in re.split(r"(?<=[.!?])\s+(?=[A-Z])", text):
            if _is_prose(sentence):
                sentences.append(sentence)
        paragraphs.append(sentences)
    return paragraphs


def _python_docs_paragraphs() -> list[list[str]]:
    """Prose paragraphs of Python's reference documentation, each as its list of kept sentences."""
    import pydoc_data.topics

    return [sentences for topic in sorted(pydoc_data.topics.topics)
            for sentences in _prose_paragraphs(pydoc_data.topics.topics[topic])]


def python_docs_texts() -> list[str]:
    """Sentences of Python's reference documentation (``pydoc_data.topics``), code blocks dropped."""
    return [sentence for paragraph in _python_docs_paragraphs() for sentence in paragraph]


def python_docs_pairs() -> list[tuple[str, str]]:
    """Sentence pairs (a sentence, the next one in its paragraph) for two-segment inputs."""
    return [pair for paragraph in _python_docs_paragraphs() for pair in zip(paragraph, paragraph[1:])]


# Test suites, demos and GUI code: their docstrings are about the code around them, not documentation.
_DOCSTRING_SKIP = {"test", "idlelib", "site-packages", "dist-packages", "lib2to3", "tkinter", "turtledemo", "tests"}


def python_docstrings_texts() -> list[str]:
    """Sentences of the docstrings in Python's standard library sources (modules, classes, functions), in file order."""
    return list(_python_docstrings())


@functools.cache
def _python_docstrings() -> tuple[str, ...]:
    # Parsing the whole standard library takes 10-40 s, and a compile reads the corpus once per pass that names it.
    import ast
    import sysconfig

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts: list[str] = []
    for path in sorted(stdlib.rglob("*.py")):
        if _DOCSTRING_SKIP & set(path.relative_to(stdlib).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue  # a few files are deliberately broken (bad-syntax fixtures) or not UTF-8
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    texts += [sentence for paragraph in _prose_paragraphs(doc) for sentence in paragraph]
    return tuple(texts)


# The fortunes' subjects on everyday life, which bertpress's own recipes never train on: bench/compare.py measures
# fidelity on them (builtin:fortunes-heldout) while a recipe may distill on the other subjects (builtin:fortunes-train:
# computers, politics, science, jokes, ...). Split by subject, not at random, so the measure is of topics unseen.
FORTUNES_HELDOUT_SUBJECTS = ("education", "food", "kids", "law", "literature", "love", "medicine", "men-women", "people",
                             "pets", "songs-poems", "sports", "wisdom", "work")


# The subjects the Debian package fortunes ships (fortunes 1:1.99.1). Other packages (fortune-anarchism, fortunes-mario
# in Portuguese, ...) install files into the same folder; naming the package's own keeps the corpora the same whatever
# else is installed.
FORTUNES_SUBJECTS = ("art", "computers", "cookie", "debian", "definitions", "disclaimer", "drugs", "education", "ethnic",
                     "food", "fortunes", "goedel", "humorists", "kids", "knghtbrd", "law", "linux", "linuxcookie",
                     "literature", "love", "magic", "medicine", "men-women", "miscellaneous", "news", "paradoxum",
                     "people", "perl", "pets", "platitudes", "politics", "pratchett", "riddles", "science",
                     "songs-poems", "sports", "startrek", "tao", "wisdom", "work", "zippy")


def _fortunes(keep) -> list[str]:
    if not FORTUNES_DIR.is_dir():
        raise CalibrationError(
            f"the fortunes are not installed ({FORTUNES_DIR} is missing).", field="calibration.texts",
            fix="install the Debian package fortunes (apt-get install fortunes) or use texts: builtin.",
        )
    texts: list[str] = []
    for path in sorted(FORTUNES_DIR.iterdir()):
        # Each subject is a plain file of entries separated by '%' lines, beside its index (.dat) and a link (.u8).
        if path.name not in FORTUNES_SUBJECTS or not path.is_file() or not keep(path.name):
            continue
        for entry in re.split(r"^%$", path.read_text(encoding="utf-8", errors="replace"), flags=re.MULTILINE):
            lines = [line.strip() for line in entry.splitlines() if line.strip()]
            lines = [line for line in lines if not line.startswith(("--", "- "))]  # attributions
            text = " ".join(" ".join(lines).split())
            if _is_prose(text):
                texts.append(text)
    return texts


def fortunes_texts() -> list[str]:
    """The entries of the Debian package ``fortunes`` (one text each, whitespace joined, attribution lines dropped)."""
    return _fortunes(lambda subject: True)


def fortunes_train_texts() -> list[str]:
    """The fortunes of every subject but the everyday-life ones of FORTUNES_HELDOUT_SUBJECTS (computers, politics,
    science, jokes, ...), for distillation; an entry that also appears under a held-out subject is left out."""
    heldout = set(fortunes_heldout_texts())
    return [text for text in _fortunes(lambda subject: subject not in FORTUNES_HELDOUT_SUBJECTS) if text not in heldout]


def fortunes_heldout_texts() -> list[str]:
    """The fortunes of the everyday-life subjects FORTUNES_HELDOUT_SUBJECTS (people, love, work, food, ...)."""
    return _fortunes(lambda subject: subject in FORTUNES_HELDOUT_SUBJECTS)


def jargon_texts() -> list[str]:
    """The sentences of the Jargon File (Debian package ``dict-jargon``, public domain): some 2,300 entries of hacker
    slang, explained in casual modern English prose (history, people, jokes, working life), one sentence each."""
    import gzip

    if not JARGON_FILE.is_file():
        raise CalibrationError(
            f"the Jargon File is not installed ({JARGON_FILE} is missing).", field="calibration.texts",
            fix="install the Debian package dict-jargon (apt-get install --no-install-recommends dict-jargon) or use"
                " texts: builtin.",
        )
    texts: list[str] = []
    with gzip.open(JARGON_FILE, "rt", encoding="utf-8", errors="replace") as dictionary:  # dictzip is gzip
        document = dictionary.read()
    # dictd format: a headword at column 0, its pronunciation line, then paragraphs indented by four spaces.
    for paragraph in re.split(r"\n\s*\n", document):
        lines = paragraph.splitlines()
        if not lines or not all(line.startswith("    ") for line in lines):
            continue  # headwords, the database header, and the deeper-indented examples and quoted code
        if any(line.startswith("     ") for line in lines):
            continue
        text = " ".join(" ".join(line.strip() for line in lines).split())
        while (plain := re.sub(r"\{([^{}]*)\}", r"\1", text)) != text:  # cross-references: {glob}, {{VAX}} -> glob, VAX
            text = plain
        text = re.sub(r"^(\d+\.\s+)?(\[[^\]]*\]\s*)?", "", text)  # sense number, [etymology or usage label]
        for sentence in re.split(r"(?<=[.!?])\s+(?=[A-Z])", text):
            if _is_prose(sentence):
                texts.append(sentence)
    return texts


# A sentence ends at . ! or ? (a closing quotation mark may follow) before a capital, but not after Mr. Mrs. Dr. St.
_AUSTEN_SENTENCE_END = re.compile(r"(?<!\bMr\.)(?<!\bMrs\.)(?<!\bDr\.)(?<!\bSt\.)(?<=[.!?])\s+(?=[\"'(]?[A-Z])"
                                  r"|(?<=[.!?][\"'])\s+(?=[\"'(]?[A-Z])")


def austen_texts() -> list[str]:
    """The sentences of Jane Austen's six novels (R package janeaustenr, Debian package r-cran-janeaustenr; the Project
    Gutenberg texts, public domain): narrative and dialogue in early-19th-century English about people, families,
    money and marriage, some 27,700 sentences in book order (Emma, Mansfield Park, Northanger Abbey, Persuasion, Pride
    and Prejudice, Sense and Sensibility)."""
    import gzip
    import warnings
    import zlib

    index, database = AUSTEN_DIR / "Rdata.rdx", AUSTEN_DIR / "Rdata.rdb"
    if not (index.is_file() and database.is_file()):
        raise CalibrationError(
            f"Jane Austen's novels are not installed ({index} is missing).", field="calibration.texts",
            fix="install the Debian package r-cran-janeaustenr (apt-get install --no-install-recommends"
                " r-cran-janeaustenr) or use texts: builtin.",
        )
    try:
        import rdata
    except ImportError:
        raise CalibrationError(
            "reading Jane Austen's novels (an R data file) needs the Python package rdata, which is not installed.",
            field="calibration.texts", fix="pip install 'bertpress[corpora]' (or pip install rdata), or use texts: builtin.",
        ) from None

    def unserialize(raw: bytes):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # rdata warns that a bare serialization has no RDS header
            return rdata.conversion.convert(rdata.parser.parse_data(raw))

    # A lazy-load database: the index is a gzipped serialization of {name: (offset, length)} into the database, whose
    # every entry is a 4-byte big-endian length and a zlib stream of one serialized object.
    blob = database.read_bytes()
    texts: list[str] = []
    for name, (offset, length) in sorted(unserialize(gzip.decompress(index.read_bytes()))["variables"].items()):
        lines = unserialize(zlib.decompress(blob[int(offset) + 4:int(offset) + int(length)]))
        for paragraph in re.split(r"\n\s*\n", "\n".join(str(line) for line in lines)):
            text = " ".join(paragraph.replace("_", "").split())  # _italics_ markup
            if text.isupper():
                continue  # titles and chapter headings
            for sentence in _AUSTEN_SENTENCE_END.split(text):
                if sentence.count('"') % 2:  # a quotation's first or last sentence: drop its unmatched mark
                    sentence = sentence.strip('"')
                    if sentence.count('"') % 2:  # one opened or closed inside it
                        sentence = sentence.replace('"', "")
                if _is_prose(sentence):
                    texts.append(sentence)
    return texts


def _require_wordnet() -> None:
    if not (WORDNET_DIR / "data.noun").is_file():
        raise CalibrationError(
            f"WordNet is not installed ({WORDNET_DIR}/data.noun is missing).", field="calibration.texts",
            fix="install the Debian package wordnet-base (apt-get install wordnet-base) or use texts: builtin.",
        )


def wordnet_texts() -> list[str]:
    """WordNet glosses and their quoted usage examples (real English phrases from many domains)."""
    _require_wordnet()
    texts: list[str] = []
    for part in ("noun", "verb", "adj", "adv"):
        for line in (WORDNET_DIR / f"data.{part}").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("  ") or "|" not in line:
                continue  # the licence header
            gloss = line.split("|", 1)[1].strip()
            for piece in gloss.split(";"):
                piece = piece.strip().strip('"').strip()
                if len(piece.split()) >= 4:
                    texts.append(piece)
    return texts


def wordnet_pairs() -> list[tuple[str, str]]:
    """Sentence pairs (a WordNet gloss, one of its quoted usage examples) for two-segment inputs."""
    _require_wordnet()
    pairs: list[tuple[str, str]] = []
    for part in ("noun", "verb", "adj", "adv"):
        for line in (WORDNET_DIR / f"data.{part}").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("  ") or "|" not in line:
                continue
            pieces = [p.strip() for p in line.split("|", 1)[1].split(";") if p.strip()]
            glosses = [p for p in pieces if not p.startswith('"')]
            examples = [p.strip('"').strip() for p in pieces if p.startswith('"')]
            if glosses and len(glosses[0].split()) >= 4:
                pairs += [(glosses[0], example) for example in examples if len(example.split()) >= 4]
    return pairs


BUILTIN_CORPORA = {"builtin": python_docs_texts, "builtin:python-docs": python_docs_texts, "builtin:wordnet": wordnet_texts,
                   "builtin:python-docstrings": python_docstrings_texts, "builtin:fortunes": fortunes_texts,
                   "builtin:fortunes-train": fortunes_train_texts, "builtin:fortunes-heldout": fortunes_heldout_texts,
                   "builtin:jargon": jargon_texts, "builtin:austen": austen_texts,
                   # Two-segment corpora (tuples of texts, tokenized as pairs) for sentence-pair passes.
                   "builtin:python-docs-pairs": python_docs_pairs, "builtin:wordnet-pairs": wordnet_pairs}


def _read_file(path: Path) -> list[str]:
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise CalibrationError(
            f"is not UTF-8 text (byte {exc.start} cannot be decoded).", file=str(path), field="calibration.texts",
            fix="convert the file to UTF-8 (e.g. iconv -f latin1 -t utf-8).",
        ) from None
    return [text for text, _ in _records(path, raw)]


def _records(path: Path, raw: str) -> list[tuple[str | tuple[str, str], object]]:
    """(text, label) per line: a .jsonl line's "text" (with its "text_pair", a two-segment tuple) and its "label"
    (or per-token "labels"), None when it has none; a .txt line has no label."""
    if path.suffix == ".jsonl":
        texts = []
        for number, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise CalibrationError(f"line {number} is not JSON: {exc.msg}.", file=str(path),
                                       field="calibration.texts", fix="write one JSON object per line.") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise CalibrationError(f"line {number} has no string field 'text'.", file=str(path),
                                       field="calibration.texts", fix='write lines like {"text": "..."}.')
            pair = record.get("text_pair")
            if pair is not None and not isinstance(pair, str):
                raise CalibrationError(f"line {number} has a 'text_pair' that is not a string.", file=str(path),
                                       field="calibration.texts", fix='write lines like {"text": "...", "text_pair": "..."}.')
            texts.append(((record["text"], pair) if pair is not None else record["text"],
                          record.get("label", record.get("labels"))))
        return texts
    return [(line.strip(), None) for line in raw.splitlines() if line.strip()]


def load_labels(source: str, base_dir: Path | None = None) -> dict:
    """text -> label of a labeled .jsonl source (a file or the .jsonl files of a folder); {} for any other source."""
    if source.startswith("builtin"):
        return {}
    path = Path(source).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    files = sorted(p for p in path.rglob("*.jsonl") if p.is_file()) if path.is_dir() else [path]
    labels = {}
    for file in files:
        if file.suffix == ".jsonl" and file.is_file():
            labels.update({text: label for text, label in _records(file, file.read_text(encoding="utf-8"))
                           if label is not None})
    return labels


def load_texts(source: str, base_dir: Path | None = None) -> list[str]:
    """All texts of a calibration source, in file order."""
    if source in BUILTIN_CORPORA:
        return BUILTIN_CORPORA[source]()
    if source.startswith("builtin"):
        raise CalibrationError(f"unknown builtin corpus {source!r}.", field="calibration.texts",
                               fix=f"use one of {sorted(BUILTIN_CORPORA)} or a file path.")
    path = Path(source).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl") and p.is_file())
        if not files:
            raise CalibrationError("has no .txt or .jsonl files.", file=str(path), field="calibration.texts",
                                   fix="put one text per line in .txt files, or use texts: builtin.")
        texts = [text for file in files for text in _read_file(file)]
    elif path.is_file():
        if path.suffix not in (".txt", ".jsonl"):
            raise CalibrationError(f"has suffix {path.suffix!r}; only .txt and .jsonl are read.", file=str(path),
                                   field="calibration.texts", fix="rename it or convert it to one text per line.")
        texts = _read_file(path)
    else:
        raise CalibrationError("does not exist.", file=str(path), field="calibration.texts",
                               fix="give a .txt/.jsonl file or folder (relative to the recipe) or texts: builtin.")
    if not texts:
        raise CalibrationError("has no texts (it is empty or only blank lines).", file=str(path),
                               field="calibration.texts", fix="add one text per line.")
    return texts


@dataclass
class CalibrationData:
    """Tokenized calibration texts and a disjoint held-out slice used only for validation."""

    texts: list[str]
    heldout_texts: list[str]
    batches: list[dict[str, torch.Tensor]]
    heldout_batches: list[dict[str, torch.Tensor]]
    truncated: int  # how many texts were longer than max_length
    max_length: int | None = None  # tokens per text; a pass that changes the tokenizer re-tokenizes to it
    # The held-out texts' labels (a labeled .jsonl source: a class name or id each, or per-token lists), else None.
    # Only validation reads them: passes calibrate and distill on the texts alone.
    heldout_labels: list | None = None


def _segments(text: str | tuple[str, str]) -> tuple[str, ...]:
    return tuple(text) if isinstance(text, (tuple, list)) else (text,)


def tokenize_batches(tokenizer, texts: list[str], max_length: int, batch_size: int) -> list[dict[str, torch.Tensor]]:
    # A (text, pair) tuple tokenizes as two segments (token_type_ids 0 and 1), like any HF pair input.
    import torch

    batches = []
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(texts[start:start + batch_size], padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt")
        batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        batch["token_type_ids"] = enc["token_type_ids"] if "token_type_ids" in enc else torch.zeros_like(enc["input_ids"])
        batches.append(batch)
    return batches


def sample_calibration_texts(source: str, *, samples: int, validation_samples: int, seed: int,
                             base_dir: Path | None = None) -> tuple[list[str], list[str]]:
    """The seeded calibration sample of ``source`` and its held-out slice (disjoint), before any tokenizing."""
    texts = list(dict.fromkeys(load_texts(source, base_dir)))  # de-duplicated, order kept
    if len(texts) < validation_samples + 8:
        raise CalibrationError(
            f"has only {len(texts)} distinct texts; {validation_samples} are held out for validation and at least 8 are"
            " needed for calibration.", field="calibration.texts",
            fix="add more texts or lower calibration.validation_samples.",
        )
    picked = random.Random(seed).sample(texts, min(samples + validation_samples, len(texts)))
    return picked[validation_samples:], picked[:validation_samples]


def prepare_calibration(tokenizer, *, source: str, samples: int, validation_samples: int, max_length: int,
                        batch_size: int, seed: int, model_max_length: int, base_dir: Path | None = None) -> CalibrationData:
    calibration, heldout = sample_calibration_texts(source, samples=samples, validation_samples=validation_samples,
                                                    seed=seed, base_dir=base_dir)
    picked = heldout + calibration
    length = min(max_length, model_max_length)
    truncated = sum(1 for text in picked if len(tokenizer(*_segments(text))["input_ids"]) > length)
    return CalibrationData(
        texts=calibration, heldout_texts=heldout,
        batches=tokenize_batches(tokenizer, calibration, length, batch_size),
        heldout_batches=tokenize_batches(tokenizer, heldout, length, batch_size),
        truncated=truncated, max_length=length, heldout_labels=_labels_of(heldout, load_labels(source, base_dir)),
    )


def _labels_of(texts: list, labels: dict) -> list | None:
    return [labels[text] for text in texts] if labels and all(text in labels for text in texts) else None
