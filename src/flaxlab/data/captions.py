"""Captioned digits for LiT: the bundled digits with a caption choice per training example.

Training batches are the digits pipeline's (``image``, ``label``, augmentation as configured)
plus ``caption``: a random non-negative int32 per example, a pure function of
``(seed, step)``, that the LiT task turns into one of its caption templates for the image's
class. Evaluation batches are the digits test split's.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from flaxlab.data.factory import make_data


def captioned_digits(config):
    """The data-source function of ``data.name=digits_captions``."""
    train_batches, eval_iterator = make_data(dataclasses.replace(config, name="digits"))

    def captioned(step: int) -> dict[str, np.ndarray]:
        batch = dict(train_batches(step))
        rng = np.random.default_rng([config.seed, step, 5])
        batch["caption"] = rng.integers(0, 2**31 - 1, len(batch["label"]), dtype=np.int32)
        return batch

    return captioned, eval_iterator
