"""Calibration text: builtin corpora, files, held-out slice, clear errors."""

from __future__ import annotations

import re

import pytest

import compiler.calibration as calibration
from compiler.calibration import AUSTEN_DIR, FORTUNES_DIR, JARGON_FILE, load_texts, prepare_calibration, python_docs_texts, python_docstrings_texts
from compiler.errors import CalibrationError


def test_builtin_corpus_is_real_python_documentation():
    texts = python_docs_texts()
    assert len(texts) > 1000
    assert any("exception" in t for t in texts)
    assert all(len(t.split()) >= 6 for t in texts)


def test_python_docstrings_are_standard_library_prose_apart_from_the_reference_manual():
    texts = python_docstrings_texts()
    assert len(set(texts)) > 10_000
    assert all(6 <= len(t.split()) <= 80 for t in texts)
    assert any("compression" in t for t in texts)  # zlib, bz2, lzma, ...
    assert not any(t.startswith(">>>") for t in texts)
    # A separate text of the same domain: almost none of its sentences are reference-manual sentences.
    assert len(set(texts) & set(python_docs_texts())) < 10
    assert load_texts("builtin:python-docstrings") == texts  # deterministic file order


@pytest.mark.skipif(not FORTUNES_DIR.is_dir(), reason="Debian package fortunes not installed")
def test_fortunes_are_whole_entries_without_their_attributions():
    texts = load_texts("builtin:fortunes")
    assert len(texts) > 10_000
    assert all(6 <= len(t.split()) <= 80 and "\n" not in t for t in texts)
    assert not any(t.startswith("--") for t in texts)
    assert "%" not in {t.strip() for t in texts}


@pytest.mark.skipif(not FORTUNES_DIR.is_dir(), reason="Debian package fortunes not installed")
def test_fortunes_split_by_subject_into_disjoint_training_and_heldout_texts():
    train, heldout, whole = (load_texts(f"builtin:{name}") for name in ("fortunes-train", "fortunes-heldout", "fortunes"))
    assert len(train) > 8_000 and len(heldout) > 4_000
    assert not set(train) & set(heldout)  # an entry filed under both kinds of subject stays on the held-out side
    assert set(train) | set(heldout) == set(whole)
    people = calibration._fortunes(lambda subject: subject == "people")
    assert people and set(people) <= set(heldout)
    computers = calibration._fortunes(lambda subject: subject == "computers")
    assert computers and set(computers) - set(heldout) <= set(train) and len(set(computers) & set(train)) > 500
    assert set(calibration.FORTUNES_HELDOUT_SUBJECTS) <= {p.name for p in FORTUNES_DIR.iterdir()}


def test_fortunes_read_only_the_fortunes_packages_own_subjects(monkeypatch, tmp_path):
    # fortunes-mario (Portuguese) and fortune-anarchism install into the same folder; they must not join the corpora.
    (tmp_path / "people").write_text("A friend is one who knows all about you and likes you anyway.\n%\n")
    (tmp_path / "people.dat").write_bytes(b"\0\1")
    (tmp_path / "mario.geral").write_text("Quem tem boca vai a Roma, mas quem tem carro chega mais depressa.\n%\n")
    (tmp_path / "anarchism").write_text("Every organization has more in common with every other organization.\n%\n")
    monkeypatch.setattr(calibration, "FORTUNES_DIR", tmp_path)
    assert load_texts("builtin:fortunes") == ["A friend is one who knows all about you and likes you anyway."]
    assert load_texts("builtin:fortunes-heldout") == load_texts("builtin:fortunes") and not load_texts("builtin:fortunes-train")


@pytest.mark.skipif(not JARGON_FILE.is_file(), reason="Debian package dict-jargon not installed")
def test_jargon_file_is_sentences_of_its_prose_without_markup():
    texts = load_texts("builtin:jargon")
    assert len(set(texts)) > 7_000
    assert all(6 <= len(t.split()) <= 80 and "\n" not in t for t in texts)
    assert not any(re.search(r"\{[^{}]*\}", t) for t in texts)  # cross-references' braces dropped, their words kept
    assert any(t.startswith("Sometimes used as an expression of disagreement") and "buy a VAX." in t for t in texts)
    assert not any(t.startswith(("00-database", "http")) for t in texts)  # the dictd header
    assert any("hacker" in t for t in texts) and any(t.startswith("Of all these, only foo and bar") for t in texts)
    # Another text than the corpora it joins: next to none of its sentences are fortunes or docstrings.
    assert len(set(texts) & set(python_docstrings_texts())) < 5


def test_missing_jargon_file_says_which_package_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(calibration, "JARGON_FILE", tmp_path / "jargon.dict.dz")
    with pytest.raises(CalibrationError) as error:
        load_texts("builtin:jargon")
    message = str(error.value)
    assert "calibration.texts" in message and "apt-get install --no-install-recommends dict-jargon" in message


@pytest.mark.skipif(not (AUSTEN_DIR / "Rdata.rdb").is_file(), reason="Debian package r-cran-janeaustenr not installed")
def test_austen_is_the_sentences_of_her_six_novels():
    pytest.importorskip("rdata")
    texts = load_texts("builtin:austen")
    assert len(set(texts)) > 25_000
    assert all(6 <= len(t.split()) <= 80 and "\n" not in t and "_" not in t for t in texts)  # _italics_ unmarked
    assert "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want" \
           " of a wife." in texts  # Pride and Prejudice's first sentence, whole
    assert texts[0].startswith("Emma Woodhouse, handsome, clever, and rich")  # the novels in name order, Emma first
    assert not any(t.isupper() or t.startswith("CHAPTER") for t in texts)
    # A quotation's sentences keep their marks only where both ends are in the sentence.
    assert all(t.count('"') % 2 == 0 for t in texts)
    assert any(t.startswith('"') and t.endswith('"') for t in texts)
    if FORTUNES_DIR.is_dir():  # another text than the fortunes it would join: none of its sentences is a fortune
        assert not set(texts) & set(load_texts("builtin:fortunes"))


def test_missing_austen_says_which_package_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(calibration, "AUSTEN_DIR", tmp_path / "janeaustenr" / "data")
    with pytest.raises(CalibrationError) as error:
        load_texts("builtin:austen")
    message = str(error.value)
    assert "calibration.texts" in message and "apt-get install --no-install-recommends r-cran-janeaustenr" in message


def test_missing_fortunes_say_which_package_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(calibration, "FORTUNES_DIR", tmp_path / "absent")
    with pytest.raises(CalibrationError) as error:
        load_texts("builtin:fortunes")
    message = str(error.value)
    assert "calibration.texts" in message and "apt-get install fortunes" in message


def test_heldout_slice_is_disjoint_from_calibration(tiny):
    data = prepare_calibration(tiny.tokenizer, source="builtin", samples=64, validation_samples=16, max_length=32,
                               batch_size=8, seed=3, model_max_length=128)
    assert len(data.texts) == 64 and len(data.heldout_texts) == 16
    assert not set(data.texts) & set(data.heldout_texts)
    assert sum(b["input_ids"].shape[0] for b in data.heldout_batches) == 16


def test_sampling_is_seeded(tiny):
    kwargs = dict(source="builtin", samples=16, validation_samples=8, max_length=32, batch_size=8, model_max_length=128)
    a = prepare_calibration(tiny.tokenizer, seed=1, **kwargs)
    b = prepare_calibration(tiny.tokenizer, seed=1, **kwargs)
    c = prepare_calibration(tiny.tokenizer, seed=2, **kwargs)
    assert a.texts == b.texts and a.texts != c.texts


def test_txt_and_jsonl_files_and_folders(tmp_path):
    (tmp_path / "a.txt").write_text("first text here\n\nsecond text here\n")
    (tmp_path / "b.jsonl").write_text('{"text": "third"}\n{"text": "fourth"}\n')
    assert load_texts(str(tmp_path / "a.txt")) == ["first text here", "second text here"]
    assert load_texts(str(tmp_path / "b.jsonl")) == ["third", "fourth"]
    assert len(load_texts(str(tmp_path))) == 4


@pytest.mark.parametrize("name, content, message", [
    ("empty.txt", b"\n\n", "no texts"),
    ("latin.txt", "caf\xe9 cr\xe8me\n".encode("latin-1"), "not UTF-8"),
    ("bad.jsonl", b'{"text": 1}\n', "no string field 'text'"),
    ("data.csv", b"a,b\n", "only .txt and .jsonl"),
])
def test_bad_calibration_files_name_the_problem(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(CalibrationError, match=message) as info:
        load_texts(str(tmp_path / name))
    assert "calibration.texts" in info.value.render()


def test_long_texts_are_truncated_and_counted(tiny):
    import tempfile
    from pathlib import Path

    folder = Path(tempfile.mkdtemp())
    (folder / "long.txt").write_text("\n".join(f"text {i} " + "word " * 300 for i in range(40)))
    data = prepare_calibration(tiny.tokenizer, source=str(folder / "long.txt"), samples=16, validation_samples=8,
                               max_length=64, batch_size=8, seed=0, model_max_length=128)
    assert data.truncated == 24
    assert max(b["input_ids"].shape[1] for b in data.batches) == 64
