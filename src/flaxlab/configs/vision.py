"""Presets for image classification on the bundled digits: ViT and MLP-Mixer."""

from __future__ import annotations

import dataclasses

from flaxlab.models.classification import ClassificationConfig
from flaxlab.models.mixer import MixerConfig
from flaxlab.models.vit import ViTConfig
from flaxlab.models.vmoe import MoeConfig, VMoEConfig
from flaxlab.optim.factory import OptimizerConfig, SGDConfig
from flaxlab.train.config import DataConfig, ExperimentConfig, InitConfig, TrainConfig

DIGITS_DATA = DataConfig(name="digits", batch_size=64, eval_batch_size=360, crop_padding=1)
DIGITS_OPTIMIZER = OptimizerConfig(
    name="adamw", learning_rate=3e-3, warmup_steps=100, weight_decay=0.05, grad_clip_norm=1.0
)
DIGITS_TRAIN = TrainConfig(steps=2000, log_every=100, eval_every=500, checkpoint_every=500)
DIGITS_TASK = ClassificationConfig(label_smoothing=0.1)


def vit_digits() -> ExperimentConfig:
    """A small ViT on the bundled 8x8 digits (patch 2, 4 layers, width 64, mean pooling).

    Command: ``flaxlab train vit-digits``. 2,500 AdamW steps of batch 64 at a peak learning rate
    of 2e-3; the position embedding starts from a 2-D sine-cosine table (``posemb_init=
    "sincos2d"``) instead of N(0, 0.02). Expected: 99.44% test accuracy in about 65 seconds
    on 2 cores (measured, seed 0); over seeds 0, 1, 2: 99.44%, 99.44%, 96.67% (mean 98.52%).
    """
    model = ViTConfig(
        num_classes=10,
        image_size=(8, 8),
        num_channels=1,
        patch_size=(2, 2),
        hidden_size=64,
        num_layers=4,
        num_heads=4,
        mlp_dim=128,
        classifier="gap",
        posemb_init="sincos2d",
    )
    return ExperimentConfig(
        family="vit",
        model=model,
        task=DIGITS_TASK,
        data=DIGITS_DATA,
        optimizer=dataclasses.replace(DIGITS_OPTIMIZER, learning_rate=2e-3),
        train=dataclasses.replace(DIGITS_TRAIN, steps=2500),
        description="ViT (patch 2, width 64, 4 layers) on the bundled 8x8 digits",
    )


def mixer_digits() -> ExperimentConfig:
    """A small MLP-Mixer on the bundled 8x8 digits (patch 2, 4 blocks, width 64).

    Command: ``flaxlab train mixer-digits``. Expected: 99.17% test accuracy (2,000 steps, the
    same schedule as ``vit-digits``) in about 40 seconds on 2 cores (measured, seed 0).
    """
    model = MixerConfig(
        num_classes=10,
        image_size=(8, 8),
        num_channels=1,
        patch_size=(2, 2),
        hidden_size=64,
        num_blocks=4,
        tokens_mlp_dim=64,
        channels_mlp_dim=128,
    )
    return ExperimentConfig(
        family="mixer",
        model=model,
        task=DIGITS_TASK,
        data=DIGITS_DATA,
        optimizer=DIGITS_OPTIMIZER,
        train=DIGITS_TRAIN,
        description="MLP-Mixer (patch 2, width 64, 4 blocks) on the bundled 8x8 digits",
    )


def vmoe_digits() -> ExperimentConfig:
    """V-MoE on the bundled 8x8 digits: vit-digits with 4-expert top-2 MoE MLPs in blocks 1, 3.

    Command: ``flaxlab train vmoe-digits``. Expected: 96.67% test accuracy (2,000 steps) in about
    a minute on 2 cores (measured, seed 0). Change the routing at evaluation time without
    retraining: ``flaxlab eval WORKDIR --set model.moe.num_selected_experts=1``.
    """
    base = vit_digits()
    # Measured with the reference's N(0, 0.02) position embedding and 2,000 steps.
    fields = dict(dataclasses.asdict(base.model), posemb_init="normal")
    model = VMoEConfig(
        **fields, moe=MoeConfig(layers=(1, 3), num_experts=4, num_selected_experts=2)
    )
    return dataclasses.replace(
        base,
        family="vmoe",
        model=model,
        optimizer=DIGITS_OPTIMIZER,
        train=DIGITS_TRAIN,
        description="V-MoE (vit-digits with 4 experts, top-2, in blocks 1 and 3) on the digits",
    )


def vit_finetune() -> ExperimentConfig:
    """Fine-tune a released ViT on your folder of images: the ViT paper's transfer recipe.

    Command: ``flaxlab train vit-finetune --set init.checkpoint=ViT-B_16.npz
    --set data.source=folder:DIR`` (``DIR/<class>/<image>``; a ``DIR/train`` + ``DIR/test``
    layout is used as such, else 10% of each class is held out), then
    ``flaxlab predict runs/vit-finetune --data NEW_IMAGES`` labels a folder (CSV + .npz).
    The model is the one the checkpoint describes (any ViT or hybrid, either naming
    generation, or a flaxlab ViT run), at 384 pixels (the position embedding is resized on
    load), with a new zero-initialised head of as many classes as ``DIR`` has. SGD with
    momentum 0.9, global-norm clipping at 1, 100 linear warm-up steps then cosine decay from
    0.01, batch 64 as 8 accumulated micro-batches of 8, no weight decay, 1,000 steps; the
    evaluation resizes the shorter side and crops the centre. Expected: the paper's transfer
    accuracies need its ImageNet-21k checkpoints and many hours on an accelerator; on 2 CPU
    cores a ViT-B/16 step at 384 pixels takes seconds, so try ``Ti/16`` or ``S/32`` checkpoints
    or ``--set data.image_size=224`` there.
    """
    model = ViTConfig.variant("B/16", num_classes=2, image_size=384)
    return ExperimentConfig(
        family="vit",
        model=model,
        task=ClassificationConfig(),
        data=DataConfig(
            name="image_folder",
            batch_size=64,
            eval_batch_size=64,
            image_size=(384, 384),
            flip=True,
        ),
        optimizer=OptimizerConfig(
            name="sgd",
            learning_rate=0.01,
            warmup_steps=100,
            decay="cosine",
            weight_decay=0.0,
            grad_clip_norm=1.0,
            grad_accum_steps=8,
            sgd=SGDConfig(momentum=0.9),
        ),
        train=TrainConfig(steps=1000, log_every=20, eval_every=250, checkpoint_every=250),
        init=InitConfig(model_from_checkpoint=True),
        description="Fine-tune a released ViT on a folder of images (the ViT paper's recipe)",
    )
