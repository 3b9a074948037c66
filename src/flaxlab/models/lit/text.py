"""The text tower of LiT: tokenizers without TensorFlow and a transformer that pools a sequence.

Tokenization follows big_vision's "sticky EOS" convention (``text_transformer.py``): a text's
tokens, then the end-of-sequence token repeated up to the fixed length, so the last position
always holds EOS and the tower pools it. Two tokenizers:

* :class:`ByteTokenizer` (built in): UTF-8 bytes, token ``byte + 2``; ``1`` is EOS.
* :class:`SentencePieceTokenizer`: a user's SentencePiece ``.model`` (the ``text`` extra).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flaxlab.models.common import resolve_dtype
from flaxlab.nn.transformer import Encoder

POOLS = ("last", "first")


class ByteTokenizer:
    """UTF-8 bytes: token ``b + 2`` for byte ``b``; ``EOS = 1`` ends and pads every text."""

    eos = 1
    vocab_size = 258

    def encode(self, text: str) -> list[int]:
        return [b + 2 for b in text.encode("utf-8")]

    def __call__(self, texts: Sequence[str], max_len: int) -> np.ndarray:
        """``int32 [len(texts), max_len]``: each text (cut to ``max_len - 1``), then EOS."""
        return _sticky_eos([self.encode(t) for t in texts], max_len, self.eos)


class SentencePieceTokenizer:
    """A SentencePiece model file's pieces, with its EOS as the sticky end token."""

    def __init__(self, model_file: str):
        try:
            import sentencepiece  # type: ignore[import-not-found]
        except ImportError as error:
            raise ImportError(
                "a SentencePiece tokenizer needs the 'text' extra: pip install 'flaxlab[text]'"
            ) from error
        self.processor = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
        self.vocab_size = int(self.processor.get_piece_size())
        self.eos = int(self.processor.eos_id())
        if self.eos < 0:
            raise ValueError(f"SentencePiece model {model_file!r} has no EOS piece")

    def encode(self, text: str) -> list[int]:
        return list(self.processor.encode(text))

    def __call__(self, texts: Sequence[str], max_len: int) -> np.ndarray:
        return _sticky_eos([self.encode(t) for t in texts], max_len, self.eos)


def _sticky_eos(token_lists: list[list[int]], max_len: int, eos: int) -> np.ndarray:
    if max_len < 2:
        raise ValueError(f"max_len={max_len} must be >= 2 (a token and EOS)")
    out = np.full((len(token_lists), max_len), eos, np.int32)
    for i, tokens in enumerate(token_lists):
        tokens = tokens[: max_len - 1]
        out[i, : len(tokens)] = tokens
    return out


def make_tokenizer(spec: str) -> ByteTokenizer | SentencePieceTokenizer:
    """``"bytes"`` or the path of a SentencePiece ``.model`` file."""
    if spec == "bytes":
        return ByteTokenizer()
    if spec.endswith(".model"):
        return SentencePieceTokenizer(spec)
    raise ValueError(f"tokenizer={spec!r}; accepted: 'bytes' or a SentencePiece .model file")


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """The text tower: a pre-LN transformer over tokens, pooled, projected to the shared width.

    Attributes:
      tokenizer: ``bytes`` (built in) or a SentencePiece ``.model`` path.
      max_len: tokens per text (EOS included).
      hidden_size, num_layers, num_heads, mlp_dim: transformer shape.
      pool: ``last`` (the sticky EOS, as the reference) or ``first``.
      dropout_rate: dropout in the transformer while training.
      dtype: computation dtype.
    """

    tokenizer: str = "bytes"
    max_len: int = 16
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    mlp_dim: int = 256
    pool: str = "last"
    dropout_rate: float = 0.0
    dtype: str = "float32"

    def __post_init__(self):
        if self.pool not in POOLS:
            raise ValueError(f"text.pool={self.pool!r}; accepted: {list(POOLS)}")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"text.hidden_size={self.hidden_size} is not divisible by "
                f"text.num_heads={self.num_heads}"
            )
        if self.max_len < 2:
            raise ValueError(f"text.max_len={self.max_len} must be >= 2")
        resolve_dtype(self.dtype)

    @property
    def vocab_size(self) -> int:
        return make_tokenizer(self.tokenizer).vocab_size


class TextTransformer(nnx.Module):
    """``tokens [B, L] -> [B, out_dim]``: embedding + position embedding (``N(0, 1/width)``),
    the encoder (final LayerNorm included), the pooled position, a dense head."""

    def __init__(self, config: TextConfig, out_dim: int, *, rngs: nnx.Rngs):
        self.config = c = config
        dtype = resolve_dtype(c.dtype)
        self.embed = nnx.Embed(c.vocab_size, c.hidden_size, rngs=rngs)
        scale = c.hidden_size**-0.5
        self.posemb = nnx.Param(
            nnx.initializers.normal(stddev=scale)(rngs.params(), (1, c.max_len, c.hidden_size))
        )
        self.encoder = Encoder(
            c.hidden_size,
            c.num_layers,
            c.num_heads,
            c.mlp_dim,
            dropout_rate=c.dropout_rate,
            dtype=dtype,
            rngs=rngs,
        )
        self.head = nnx.Linear(c.hidden_size, out_dim, dtype=dtype, rngs=rngs)

    def __call__(self, tokens: jax.Array, *, deterministic=True, rngs=None) -> jax.Array:
        c = self.config
        if tokens.ndim != 2 or tokens.shape[1] != c.max_len:
            raise ValueError(f"tokens must be int [batch, {c.max_len}], got {tokens.shape}")
        x = self.embed(tokens) + self.posemb[...]
        x = self.encoder(x.astype(resolve_dtype(c.dtype)), deterministic=deterministic, rngs=rngs)
        x = x[:, -1] if c.pool == "last" else x[:, 0]
        return self.head(x).astype(jnp.float32)
