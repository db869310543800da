"""Loading, splitting, packing and the stateless, resumable batch order; config errors vs data errors."""

import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from configs import get_config
from models.config import ConfigError
from research import corpus, data
from research.data import DataError
from research.input_pipeline import build_datasets


def test_load_text_embedded(tmp_path):
    text = data.load_text("embedded", tmp_path)
    assert text == corpus.embedded_corpus_path(tmp_path).read_text(encoding="utf-8")
    assert text.startswith(corpus.generate_corpus(num_bytes=1_000))


def test_load_text_file(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("Zoë ate.\n\nJosé slept.", encoding="utf-8")
    assert data.load_text(str(path), tmp_path / "cache") == "Zoë ate.\n\nJosé slept."


def test_load_text_directory_sorted_and_filtered(tmp_path):
    root = tmp_path / "docs"
    (root / "b").mkdir(parents=True)
    (root / "b" / "z.md").write_text("second", encoding="utf-8")
    (root / "c.py").write_text("third", encoding="utf-8")
    (root / "a.txt").write_text("first", encoding="utf-8")
    (root / "skip.bin").write_bytes(b"\x00\x01")
    assert data.load_text(str(root), tmp_path / "cache") == "first\n\nsecond\n\nthird"


@pytest.mark.parametrize("source", ["foo", "", "/no/such/path.txt"])
def test_load_text_bad_source(tmp_path, source):
    """A source that names nothing is a bad config value: a ConfigError naming data.source."""
    with pytest.raises(ConfigError, match=r"^data.source=.*not 'embedded', an existing file"):
        data.load_text(source, tmp_path)


def test_load_text_empty(tmp_path):
    """A folder with no text is bad data, not a bad config value."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "blank.txt").write_text(" \n\n ")
    with pytest.raises(DataError, match=r"^data.source='.*empty': no text found \(allowed suffixes: .txt") as err:
        data.load_text(str(tmp_path / "empty"), tmp_path)
    assert not isinstance(err.value, ConfigError) and "\n" not in str(err.value)


@pytest.mark.parametrize("in_folder", [False, True])
def test_load_text_not_utf8_names_the_file(tmp_path, in_folder):
    root = tmp_path / "docs"
    root.mkdir()
    (root / "a.txt").write_text("fine", encoding="utf-8")
    (root / "b.txt").write_bytes(b"caf\xe9 latin-1")
    source = root if in_folder else root / "b.txt"
    where = f"data.source='{source}': " + (f"{root / 'b.txt'}: " if in_folder else "")
    with pytest.raises(DataError) as err:
        data.load_text(str(source), tmp_path)
    assert str(err.value) == where + "not UTF-8 text (invalid byte 0xe9 at offset 3)"


def test_load_text_binary_file(tmp_path):
    """An image given as the corpus: one line naming it, the first bad byte and where it is."""
    png = tmp_path / "logo.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + np.random.default_rng(0).bytes(4096))
    with pytest.raises(DataError) as err:
        data.load_text(str(png), tmp_path)
    assert str(err.value) == f"data.source='{png}': not UTF-8 text (invalid byte 0x89 at offset 0)"


@pytest.mark.parametrize("case", ["name too long", "read fails"])
def test_load_text_unreadable_source(tmp_path, case):
    """What the OS refuses is a DataError naming data.source and the OS's reason, not an OSError."""
    if case == "name too long":
        source, reason = str(tmp_path / ("x" * 300)), "File name too long"
    else:  # a regular file whose reading fails (reading this process's memory from address 0)
        source, reason = "/proc/self/mem", "Input/output error"
        if not Path(source).is_file():
            pytest.skip("no /proc/self/mem")
    with pytest.raises(DataError) as err:
        data.load_text(source, tmp_path)
    assert str(err.value) == f"data.source={source!r}: {reason}"


def test_split_documents():
    text = "\n\none\ntwo\n\n\n  \nthree\n   \n    indented\n\n"
    assert data.split_documents(text) == ["one\ntwo", "three", "    indented"]


def test_train_val_split_deterministic_and_disjoint():
    docs = [f"doc {i}" for i in range(100)]
    train, val = data.train_val_split(docs, 0.1, seed=0)
    assert (train, val) == data.train_val_split(docs, 0.1, seed=0)
    assert (train, val) != data.train_val_split(docs, 0.1, seed=1)
    assert len(val) == 10 and len(train) == 90
    assert sorted(train + val) == sorted(docs)
    assert data.train_val_split(docs[:2], 0.01, seed=0)[1] != []
    assert data.train_val_split(docs[:2], 0.99, seed=0)[0] != []


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.5])
def test_train_val_split_bad_fraction(fraction):
    with pytest.raises(ConfigError, match="data.val_fraction"):
        data.train_val_split(["a", "b"], fraction, seed=0)


def test_train_val_split_needs_two_documents():
    with pytest.raises(DataError, match=r"^data: 1 document\(s\); a train/val split needs at least 2 "):
        data.train_val_split(["only one"], 0.1, seed=0)


def test_pack_documents_appends_eos():
    stream = data.pack_documents([[5, 6], np.array([7]), []], eos_id=0)
    assert stream.dtype == np.int32
    np.testing.assert_array_equal(stream, [5, 6, 0, 7, 0, 0])


def _dataset(num_tokens=101, seq_len=4, batch_size=3, seed=0) -> data.PackedDataset:
    return data.PackedDataset(np.arange(num_tokens), seq_len, batch_size, seed)


def test_batch_shape_and_shift():
    ds = _dataset()
    assert ds.num_windows == 25
    batch = ds.batch(7)
    assert batch.shape == (3, 5) and batch.dtype == np.int32
    # The stream is 0, 1, 2, ...: each window starts at a multiple of seq_len and the
    # targets batch[:, 1:] are the inputs batch[:, :-1] shifted by one token.
    assert np.all(batch[:, 0] % 4 == 0)
    np.testing.assert_array_equal(batch[:, 1:], batch[:, :-1] + 1)


def test_batch_is_pure_function_of_seed_and_step():
    np.testing.assert_array_equal(_dataset().batch(5), _dataset().batch(5))
    assert not np.array_equal(_dataset(seed=0).batch(0), _dataset(seed=1).batch(0))


def test_every_window_once_per_epoch():
    ds = _dataset(num_tokens=4 * 24 + 1, batch_size=3)  # 24 windows = 8 steps per epoch
    for epoch in range(2):
        starts = np.concatenate([ds.batch(s)[:, 0] for s in range(8 * epoch, 8 * epoch + 8)])
        assert sorted(starts // 4) == list(range(24))
    assert ds.epoch_of(7) == 0 and ds.epoch_of(8) == 1


def test_batches_straddle_epoch_boundary():
    ds = _dataset(num_tokens=4 * 10 + 1, batch_size=3)  # 10 windows: step 3 spans epochs 0 and 1
    flat = np.concatenate([ds.batch(s)[:, 0] // 4 for s in range(10)])  # 3 full epochs
    for epoch in range(3):
        assert sorted(flat[10 * epoch:10 * (epoch + 1)]) == list(range(10))


def test_resume_reproduces_uninterrupted_run():
    running = _dataset(seed=3)
    uninterrupted = [running.batch(s) for s in range(20)]
    data._epoch_order.cache_clear()  # a restarted process starts with an empty cache
    for step in (0, 8, 19):
        np.testing.assert_array_equal(_dataset(seed=3).batch(step), uninterrupted[step])


def test_eval_batches_sequential():
    ds = _dataset()  # 25 windows of 3: 8 full batches
    batches = list(ds.eval_batches(None))
    assert len(batches) == 8
    np.testing.assert_array_equal(np.concatenate(batches)[:, 0], np.arange(24) * 4)
    assert len(list(ds.eval_batches(2))) == 2
    np.testing.assert_array_equal(next(ds.eval_batches(1)), batches[0])


def test_too_short_stream_raises():
    with pytest.raises(DataError, match=r"12 tokens.*batch_size=3 x seq_len=4 needs at least 13"):
        _dataset(num_tokens=12)
    _dataset(num_tokens=13)
    with pytest.raises(DataError, match=r"^tokens: expected a 1-D integer array, got shape \(2, 2\)"):
        data.PackedDataset(np.zeros((2, 2), np.int32), 1, 1)
    with pytest.raises(ConfigError, match=r"^seq_len=0: expected a positive integer$"):
        data.PackedDataset(np.arange(10), 0, 1)


def test_training_stream_is_what_encode_gives(cache_dir):
    """Prompts are encoded as training text was: each document is encode(doc) (no bos) followed by eos."""
    cfg = get_config("smoke").data
    cfg = dataclasses.replace(cfg, cache_dir=cache_dir)
    tokenizer, train, _ = build_datasets(cfg, get_config("smoke").model.vocab_size, seed=0)
    text = data.load_text(cfg.source, cfg.cache_dir).encode("utf-8")[:cfg.max_bytes].decode("utf-8", "ignore")
    docs, _ = data.train_val_split(data.split_documents(text), cfg.val_fraction, cfg.split_seed)
    first, second = tokenizer.encode(docs[0]), tokenizer.encode(docs[1])
    assert first[0] != tokenizer.bos_id and tokenizer.bos_id not in train.tokens
    expected = [*first, tokenizer.eos_id, *second, tokenizer.eos_id]
    np.testing.assert_array_equal(train.tokens[:len(expected)], expected)


def test_train_command_line_reports_a_data_error_in_one_line(tmp_path):
    (tmp_path / "corpus.txt").write_text("one document, no blank line to split it\n")
    proc = subprocess.run([sys.executable, "-m", "research.train", "--config", "smoke", "--no-progress",
                           "--set", f"data.source={tmp_path / 'corpus.txt'}", "--set", f"data.cache_dir={tmp_path}",
                           "--out", str(tmp_path / "run")],
                          capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: data: 1 document(s); a train/val split needs at least 2 (documents are separated by blank lines)"]
