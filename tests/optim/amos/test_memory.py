"""Amos's slot memory against AdamW's on the paper's BERT-base tree (nothing allocated)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from flaxlab.optim import amos, default_eta_fn, default_shape_fn


def bert_base_structs(vocab=30522, hidden=768, layers=12, mlp=3072, positions=512):
    """BERT-base encoder + MLM head with jestimator's parameter names, as shape structs."""

    def dense(fan_in, fan_out):
        return {"kernel": (fan_in, fan_out), "bias": (fan_out,)}

    norm = {"scale": (hidden,), "bias": (hidden,)}
    block = {
        "attention_block": {n: dense(hidden, hidden) for n in ("query", "key", "value", "output")}
        | {"layer_norm": norm},
        "mlp_block": {"dense1": dense(hidden, mlp), "dense2": dense(mlp, hidden)}
        | {"layer_norm": norm},
    }
    shapes = {
        "embedder_block": {
            "token_embed": {"embedding": (vocab, hidden)},
            "position_embed": {"embedding": (positions, hidden)},
            "segment_embed": {"embedding": (2, hidden)},
            "layer_norm": norm,
        },
        "encoder_block": {f"layer_{i}": block for i in range(layers)},
        "mlm_head": {"dense": dense(hidden, hidden), "layer_norm": norm, "bias": (vocab,)},
    }
    is_shape = lambda x: isinstance(x, tuple) and all(isinstance(d, int) for d in x)
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, jnp.float32), shapes, is_leaf=is_shape)


def state_bytes(tx, params) -> int:
    state = jax.eval_shape(tx.init, params)
    return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(state))


def test_bert_base_tree_has_the_known_size_and_half_of_adamws_slot_memory():
    params = bert_base_structs()
    # BERT-base encoder (~85M) + embeddings (~24M) + MLM head; 12 blocks of 7.09M each.
    assert sum(math.prod(x.shape) for x in jax.tree.leaves(params)) == 109_514_298
    adamw = state_bytes(optax.adamw(1e-3, weight_decay=0.01), params)

    def ratio(momentum):
        tx = amos(0.005, default_eta_fn, default_shape_fn, momentum=momentum, clip_value=1.0)
        return state_bytes(tx, params) / adamw

    # The paper's measurement: 50.1% with factored slots and momentum 0.9.
    assert ratio(0.9) == pytest.approx(0.501, abs=5e-4)
    assert ratio(None) < 0.002
