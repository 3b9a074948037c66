import numpy as np
import pytest

from flaxlab.data import (
    ImageDataset,
    TrainBatches,
    batch_indices,
    eval_batches,
    random_crop,
    to_float_images,
)


def dataset(n=10):
    images = np.arange(n, dtype=np.uint8).repeat(4).reshape(n, 2, 2, 1)
    return ImageDataset(images, np.arange(n, dtype=np.int32) % 3, ("a", "b", "c"))


def test_batches_are_a_pure_function_of_seed_and_step():
    batches = TrainBatches(dataset(), batch_size=4, seed=3, crop_padding=1)
    again = TrainBatches(dataset(), batch_size=4, seed=3, crop_padding=1)
    for step in (0, 5, 2):
        a, b = batches(step), again(step)
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])
    assert not np.array_equal(batch_indices(3, 0, 4, 10), batch_indices(4, 0, 4, 10))


def test_each_epoch_visits_every_example_once():
    idx = np.concatenate([batch_indices(0, s, 4, 10) for s in range(5)])  # 2 epochs
    assert sorted(idx[:10]) == list(range(10)) and sorted(idx[10:]) == list(range(10))
    assert not np.array_equal(idx[:10], idx[10:])  # reshuffled each epoch


def test_random_crop_matches_numpy_padding_and_slicing():
    rng_images = np.random.default_rng(0).integers(0, 256, size=(5, 4, 3, 2), dtype=np.uint8)
    out = random_crop(rng_images, np.random.default_rng(7), padding=2)
    rng = np.random.default_rng(7)
    dy, dx = rng.integers(0, 5, 5), rng.integers(0, 5, 5)
    for i in range(5):
        padded = np.pad(rng_images[i], ((2, 2), (2, 2), (0, 0)))
        np.testing.assert_array_equal(out[i], padded[dy[i] : dy[i] + 4, dx[i] : dx[i] + 3])


def test_float_images_span_minus_one_to_one():
    x = to_float_images(np.array([0, 255], np.uint8))
    np.testing.assert_allclose(x, [-1.0, 1.0])
    assert x.dtype == np.float32


def test_eval_batches_cover_every_example_once_with_a_mask():
    batches = list(eval_batches(dataset(10), 4))
    assert [b["image"].shape[0] for b in batches] == [4, 4, 4]
    assert sum(int(b["mask"].sum()) for b in batches) == 10
    labels = np.concatenate([b["label"][b["mask"]] for b in batches])
    np.testing.assert_array_equal(labels, np.arange(10) % 3)


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="batch_size=0"):
        TrainBatches(dataset(), batch_size=0)
    with pytest.raises(ValueError, match="must be uint8.*float32"):
        ImageDataset(np.zeros((1, 2, 2, 1), np.float32), np.zeros(1, np.int32), ("a",))
    with pytest.raises(ValueError, match=r"shape \[N, H, W, C\].*\(2, 2\)"):
        ImageDataset(np.zeros((2, 2), np.uint8), np.zeros(2, np.int32), ("a",))
