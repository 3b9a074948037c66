"""flaxlab: VDM, Amos + JEstimator, ViT/MLP-Mixer, V-MoE and Performer FAVOR+ in JAX + Flax NNX.

``import flaxlab`` makes the subpackages available: ``flaxlab.nn`` (layers and their maths),
``flaxlab.models`` (model families), ``flaxlab.optim`` (optimizers), ``flaxlab.train`` (the
estimator), ``flaxlab.data`` (sources and pipelines) and ``flaxlab.configs`` (presets).
"""

__version__ = "0.1.0"

from flaxlab import configs, data, models, nn, optim, train  # noqa: E402

__all__ = ["__version__", "configs", "data", "models", "nn", "optim", "train"]
