"""Variational Diffusion Models (Kingma, Salimans, Poole & Ho 2021, arXiv 2107.00630).

The family of the model registry: ``Config`` (:class:`VDMConfig`), ``Model`` (:class:`VDM`),
``Task`` (:class:`VDMTask`).

Example:
  >>> config = vdm_preset("digits")
  >>> model = VDM(config, rngs=nnx.Rngs(0))
  >>> loss, metrics = model.loss(images_uint8, labels, jax.random.key(1), deterministic=False)
  >>> samples = sample(model, jax.random.key(2), num=16, steps=100)  # uint8 [16, 8, 8, 1]
"""

from flaxlab.models.vdm.likelihood import ode_log_density, probability_flow_bpd
from flaxlab.models.vdm.maths import (
    VOCAB_SIZE,
    ancestral_step,
    antithetic_times,
    bits_per_dim,
    ddim_step,
    decoder_logits,
    diffusion_loss,
    discretise_times,
    encode,
    fourier_features,
    prior_loss,
    reconstruction_loss,
    timestep_embedding,
)
from flaxlab.models.vdm.model import (
    VDM,
    VDM_PRESETS,
    VDMConfig,
    bpd_confidence_interval,
    evaluate_bpd,
    evaluation_sums,
    vdm_preset,
)
from flaxlab.models.vdm.model import VDM as Model
from flaxlab.models.vdm.model import VDMConfig as Config
from flaxlab.models.vdm.sampling import SAMPLERS, image_grid, sample, sample_images
from flaxlab.models.vdm.schedules import (
    SCHEDULE_KINDS,
    FixedLinearSchedule,
    LearnedScalarSchedule,
    MonotoneNetSchedule,
    is_schedule_path,
    is_shape_path,
    make_schedule,
    weight_decay_mask,
    with_variance_gradient,
)
from flaxlab.models.vdm.task import VDMTask, VDMTaskConfig, to_pixels
from flaxlab.models.vdm.task import VDMTask as Task
from flaxlab.models.vdm.unet import ScoreUNet

__all__ = [
    "SAMPLERS",
    "SCHEDULE_KINDS",
    "VDM",
    "VDM_PRESETS",
    "VOCAB_SIZE",
    "Config",
    "FixedLinearSchedule",
    "LearnedScalarSchedule",
    "Model",
    "MonotoneNetSchedule",
    "ScoreUNet",
    "Task",
    "VDMConfig",
    "VDMTask",
    "VDMTaskConfig",
    "ancestral_step",
    "antithetic_times",
    "bits_per_dim",
    "bpd_confidence_interval",
    "ddim_step",
    "decoder_logits",
    "diffusion_loss",
    "discretise_times",
    "encode",
    "evaluate_bpd",
    "evaluation_sums",
    "fourier_features",
    "image_grid",
    "is_schedule_path",
    "is_shape_path",
    "make_schedule",
    "ode_log_density",
    "prior_loss",
    "probability_flow_bpd",
    "reconstruction_loss",
    "sample",
    "sample_images",
    "timestep_embedding",
    "to_pixels",
    "vdm_preset",
    "weight_decay_mask",
    "with_variance_gradient",
]
