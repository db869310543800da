"""The embedded corpus is byte-identical everywhere, varied, and cached once."""

import hashlib

import pytest

from research import corpus


@pytest.fixture(scope="module")
def default_corpus() -> str:
    return corpus.generate_corpus()


def test_default_matches_pinned_sha256(default_corpus):
    assert hashlib.sha256(default_corpus.encode("utf-8")).hexdigest() == corpus.CORPUS_SHA256


def test_default_size_and_document_format(default_corpus):
    assert len(default_corpus.encode("utf-8")) >= 3_000_000
    docs = default_corpus.split("\n\n")
    assert len(docs) > 1_000
    assert all(doc.strip() and not doc.startswith("\n") and not doc.endswith("\n") for doc in docs)


def test_default_has_several_genres_and_unicode(default_corpus):
    markers = ("The town of ", "Q: ", "A: ", " + ", " = ", "def ", "name: ", "Shopping list",
               "English: ", "said", "—")
    for marker in markers:
        assert marker in default_corpus, marker
    assert any(ch in default_corpus for ch in "ëéöí")  # accented Latin
    assert any(ord(ch) > 0x3000 for ch in default_corpus)  # CJK / Hangul
    assert "вода" in default_corpus


def test_deterministic_and_seed_dependent():
    a = corpus.generate_corpus(seed=0, num_bytes=20_000)
    assert a == corpus.generate_corpus(seed=0, num_bytes=20_000)
    assert a != corpus.generate_corpus(seed=1, num_bytes=20_000)


def test_stops_at_first_document_boundary_after_num_bytes():
    text = corpus.generate_corpus(seed=3, num_bytes=10_000)
    assert len(text.encode("utf-8")) >= 10_000
    shorter = text[:text.rindex("\n\n")]
    assert len(shorter.encode("utf-8")) < 10_000
    assert corpus.generate_corpus(seed=3, num_bytes=30_000).startswith(text + "\n\n")


def test_embedded_corpus_path_writes_once(tmp_path):
    path = corpus.embedded_corpus_path(tmp_path)
    assert path == tmp_path / "corpus" / f"embedded-{corpus.CORPUS_SHA256[:12]}.txt"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == corpus.CORPUS_SHA256
    mtime = path.stat().st_mtime_ns
    assert corpus.embedded_corpus_path(str(tmp_path)) == path
    assert path.stat().st_mtime_ns == mtime
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp files left
