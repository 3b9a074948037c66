"""LiT: locked-image text tuning (Zhai et al. 2021) with zero-shot classification.

The family of the model registry: ``Config`` (:class:`LiTConfig`), ``Model`` (:class:`LiT`),
``Task`` (:class:`LiTTask`).
"""

from flaxlab.models.lit.losses import sigmoid_contrastive_loss, softmax_contrastive_loss
from flaxlab.models.lit.model import (
    LOSSES,
    LiT,
    LiTConfig,
    normalize,
    zero_shot_classifier,
    zero_shot_logits,
)
from flaxlab.models.lit.model import LiT as Model
from flaxlab.models.lit.model import LiTConfig as Config
from flaxlab.models.lit.task import (
    DIGIT_NAMES,
    EVAL_TEMPLATES,
    TRAIN_TEMPLATES,
    LiTTask,
    LiTTaskConfig,
    prompts,
    tokenize_prompts,
    zero_shot,
)
from flaxlab.models.lit.task import LiTTask as Task
from flaxlab.models.lit.text import (
    ByteTokenizer,
    SentencePieceTokenizer,
    TextConfig,
    TextTransformer,
    make_tokenizer,
)

__all__ = [
    "DIGIT_NAMES",
    "EVAL_TEMPLATES",
    "LOSSES",
    "TRAIN_TEMPLATES",
    "ByteTokenizer",
    "Config",
    "LiT",
    "LiTConfig",
    "LiTTask",
    "LiTTaskConfig",
    "Model",
    "SentencePieceTokenizer",
    "Task",
    "TextConfig",
    "TextTransformer",
    "make_tokenizer",
    "normalize",
    "prompts",
    "sigmoid_contrastive_loss",
    "softmax_contrastive_loss",
    "tokenize_prompts",
    "zero_shot",
    "zero_shot_classifier",
    "zero_shot_logits",
]
