"""Presets for LiT (locked-image text tuning) on the bundled digits."""

from __future__ import annotations

from flaxlab.configs.vision import vit_digits
from flaxlab.data.config import DataConfig
from flaxlab.models.lit import LiTConfig, TextConfig
from flaxlab.optim.factory import OptimizerConfig
from flaxlab.train.config import ExperimentConfig, TrainConfig


def lit_digits() -> ExperimentConfig:
    """LiT on the digits: a text tower tuned against the locked image tower of a vit-digits run.

    Command: ``flaxlab train lit-digits`` (it trains ``vit-digits`` into
    ``runs/lit-digits/image_tower`` first unless ``--set model.image_checkpoint=RUN``), then
    ``flaxlab zeroshot runs/lit-digits --classes zero,one,two,three,four,five,six,seven,eight,nine
    --image digit.png``. Captions are six templates of the label ("a photo of the number seven",
    "handwritten 7", ...); zero-shot evaluation prompts with three other templates. A byte-level
    text transformer (2 layers of width 64, 32 bytes) learns in 1,000 AdamW steps of 64 pairs.
    Expected: 98.61% zero-shot test accuracy (chance 10%; the locked tower's supervised accuracy
    is 99.44%) in about 2.2 minutes on 2 cores for both stages (measured, seed 0).
    """
    return ExperimentConfig(
        family="lit",
        model=LiTConfig(
            image_family="vit",
            image=vit_digits().model,
            locked=True,
            text=TextConfig(max_len=32, hidden_size=64, num_layers=2, num_heads=4, mlp_dim=256),
            loss="softmax",
        ),
        data=DataConfig(name="digits_captions", batch_size=64, eval_batch_size=360),
        optimizer=OptimizerConfig(
            name="adamw", learning_rate=1e-3, warmup_steps=100, weight_decay=0.01
        ),
        train=TrainConfig(steps=1000, log_every=100, eval_every=250, checkpoint_every=250),
        description="LiT: a text tower tuned against a locked vit-digits image tower",
    )
