import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flaxlab.data import load_cifar, load_digits, load_image_folder, load_npz


def test_digits_split_is_fixed_and_stratified():
    train, test = load_digits("train"), load_digits("test")
    assert (len(train), len(test)) == (1437, 360)
    assert train.images.shape[1:] == (8, 8, 1) and train.images.dtype == np.uint8
    assert train.images.max() == 255 and train.images.min() == 0
    assert np.bincount(test.labels).min() >= 35  # stratified: every class ~36 times
    np.testing.assert_array_equal(load_digits("test").images, test.images)  # deterministic
    with pytest.raises(ValueError, match="digits split 'val' is unknown"):
        load_digits("val")


def test_image_folder(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {}
    for name in ("cat", "dog"):
        (tmp_path / name).mkdir()
        for i in range(3):
            a = rng.integers(0, 256, size=(6, 5, 3), dtype=np.uint8)
            Image.fromarray(a).save(tmp_path / name / f"{i}.png")
            arrays[(name, i)] = a
    (tmp_path / "dog" / "notes.txt").write_text("ignored")
    ds = load_image_folder(tmp_path)
    assert ds.class_names == ("cat", "dog")
    assert ds.images.shape == (6, 6, 5, 3)
    np.testing.assert_array_equal(ds.labels, [0, 0, 0, 1, 1, 1])
    np.testing.assert_array_equal(ds.images[4], arrays[("dog", 1)])
    grey = load_image_folder(tmp_path, image_size=(4, 4), channels=1)
    assert grey.images.shape == (6, 4, 4, 1)
    Image.fromarray(np.zeros((7, 7, 3), np.uint8)).save(tmp_path / "cat" / "big.png")
    with pytest.raises(ValueError, match=r"has shape \(7, 7, 3\).*image_size"):
        load_image_folder(tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        load_image_folder(tmp_path / "nope")


def test_cifar10_batches(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    written = {}
    for name, n in (("data_batch_1", 4), ("data_batch_2", 3), ("test_batch", 2)):
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = list(rng.integers(0, 10, size=n))
        with open(root / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": labels}, f)
        written[name] = (data, labels)
    train, test = load_cifar(root, "train"), load_cifar(root, "test")
    assert train.images.shape == (7, 32, 32, 3) and test.images.shape == (2, 32, 32, 3)
    data, labels = written["data_batch_2"]
    # Channel-major rows of 1024 red, then green, then blue values.
    np.testing.assert_array_equal(train.images[4, 0, 1], data[0, [1, 1025, 2049]])
    np.testing.assert_array_equal(train.labels[4:], labels)
    with pytest.raises(ValueError, match="holds no CIFAR python batches"):
        load_cifar(tmp_path)


def test_cifar100_batches(tmp_path):
    for split, n in (("train", 3), ("test", 2)):
        with open(tmp_path / split, "wb") as f:
            pickle.dump({b"data": np.zeros((n, 3072), np.uint8), b"fine_labels": [99] * n}, f)
    ds = load_cifar(tmp_path, "test")
    assert ds.num_classes == 100 and len(ds) == 2 and ds.labels.tolist() == [99, 99]


def test_npz(tmp_path):
    images = np.arange(2 * 4 * 4, dtype=np.uint8).reshape(2, 4, 4)
    np.savez(tmp_path / "d.npz", image=images, label=np.array([0, 2]))
    ds = load_npz(tmp_path / "d.npz")
    assert ds.images.shape == (2, 4, 4, 1) and ds.num_classes == 3
    np.savez(tmp_path / "f.npz", image=images.astype(np.float32), label=np.array([0, 2]))
    with pytest.raises(ValueError, match="must be uint8.*float32"):
        load_npz(tmp_path / "f.npz")
    with pytest.raises(ValueError, match="has no array 'label'; it holds \\['image', 'y'\\]"):
        np.savez(tmp_path / "g.npz", image=images, y=np.array([0, 2]))
        load_npz(tmp_path / "g.npz")


class RunsACommand:
    """A pickle payload that calls os.system when unpickled (what a crafted batch can do)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_a_crafted_cifar_batch_is_refused_without_running_its_code(tmp_path):
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    marker = tmp_path / "pwned"
    with open(root / "data_batch_1", "wb") as f:
        pickle.dump({b"data": RunsACommand(marker), b"labels": [0]}, f)
    (root / "test_batch").write_bytes((root / "data_batch_1").read_bytes())
    with pytest.raises(ValueError, match=r"data_batch_1' is not an official CIFAR batch: .*system"):
        load_cifar(root, "train")
    assert not marker.exists()
    # Only arrays of pixels pass: an object array is refused too.
    with open(root / "data_batch_1", "wb") as f:
        pickle.dump({b"data": np.array([marker], dtype=object), b"labels": [0]}, f)
    with pytest.raises(ValueError, match="data_batch_1"):
        load_cifar(root, "train")


def test_nothing_else_in_flaxlab_unpickles():
    import flaxlab

    src = Path(flaxlab.__file__).parent
    users = sorted(
        str(p.relative_to(src))
        for p in src.rglob("*.py")
        if "pickle.load" in p.read_text() or "Unpickler" in p.read_text()
    )
    assert users == ["data/sources.py"]
