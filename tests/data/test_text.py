import sysconfig
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from flaxlab.data import text


def make_config(**kw):
    base = dict(
        name="stdlib_text",
        path=None,
        eval_path=None,
        batch_size=4,
        eval_batch_size=8,
        seed=3,
        seq_len=16,
    )
    return SimpleNamespace(**{**base, **kw})


def test_split_is_by_file_and_texts_are_the_joined_files():
    assert not set(text.TRAIN_FILES) & set(text.VALIDATION_FILES)
    assert len(text.TRAIN_FILES) == 30 and len(text.VALIDATION_FILES) == 4
    root = Path(sysconfig.get_paths()["stdlib"])
    expected = b"\x00".join((root / f).read_bytes() for f in text.VALIDATION_FILES)
    valid = text.load_text("validation")
    assert valid.dtype == np.uint8 and valid.tobytes() == expected
    train = text.load_text("train")
    assert np.count_nonzero(train == text.SEPARATOR) == len(text.TRAIN_FILES) - 1
    assert train.tobytes().startswith((root / "os.py").read_bytes())


def test_train_batches_are_a_pure_function_of_seed_and_step():
    train, _ = text.text_batches(make_config())
    a, b = train(5), train(5)
    assert a["tokens"].shape == (4, 17) and a["tokens"].dtype == np.int32
    np.testing.assert_array_equal(a["tokens"], b["tokens"])
    assert not np.array_equal(a["tokens"], train(6)["tokens"])
    other_seed, _ = text.text_batches(make_config(seed=4))
    assert not np.array_equal(a["tokens"], other_seed(5)["tokens"])
    # Every window is a contiguous slice of the training text (independent reconstruction).
    data = text.load_text("train").tobytes()
    rng = np.random.default_rng([3, 5])
    starts = rng.integers(0, len(data) - 17 + 1, size=4)
    for row, start in zip(a["tokens"], starts):
        assert bytes(row.astype(np.uint8).tolist()) == data[start : start + 17]


def test_eval_covers_the_validation_text_once_with_padding_mask():
    config = make_config(seq_len=64, eval_batch_size=32)
    _, eval_iterator = text.text_batches(config)
    batches = list(eval_iterator())
    assert all(b["tokens"].shape == (32, 65) and b["mask"].shape == (32,) for b in batches)
    windows = np.concatenate([b["tokens"][b["mask"]] for b in batches])
    data = text.load_text("validation")
    num_windows = (len(data) - 1) // 64
    assert len(windows) == num_windows
    # Targets (bytes 1..L of each window) tile the text exactly once, in order.
    targets = windows[:, 1:].reshape(-1)
    np.testing.assert_array_equal(targets, data[1 : 1 + num_windows * 64])
    np.testing.assert_array_equal(windows[:, 0], data[0 : num_windows * 64 : 64])
    last = batches[-1]
    assert last["mask"].sum() == num_windows - 32 * (len(batches) - 1)
    # A second pass yields the same batches.
    again = list(eval_iterator())
    np.testing.assert_array_equal(again[0]["tokens"], batches[0]["tokens"])


def test_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="os.py.*does not exist"):
        text.load_text("train", str(tmp_path))
    with pytest.raises(ValueError, match="split must be 'train' or 'validation', got 'test'"):
        text.load_text("test")
    with pytest.raises(ValueError, match="does not exist"):
        text.stdlib_root(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="seq_len must be a positive integer, got 0"):
        text.text_batches(make_config(seq_len=0))
    with pytest.raises(ValueError, match="shorter than a window"):
        text.random_windows(np.zeros(5, np.uint8), 2, 8, 0, 0)


def test_custom_root_directory(tmp_path):
    for name in text.TRAIN_FILES + text.VALIDATION_FILES:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x = 1\n" * 10)
    train, eval_iterator = text.text_batches(make_config(path=str(tmp_path)))
    assert set(np.unique(train(0)["tokens"])) <= set(b"x = 1\n\x00")
    assert next(iter(eval_iterator()))["tokens"].shape == (8, 17)
