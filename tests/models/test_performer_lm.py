import dataclasses
import math
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from flaxlab.data import text
from flaxlab.models.performer_lm import (
    LMTask,
    PerformerLM,
    PerformerLMConfig,
    generate,
    performer_lm_preset,
    recurrent_logits,
)
from flaxlab.nn.attention import AttentionConfig

TINY = PerformerLMConfig(seq_len=160, hidden_size=32, num_layers=2, num_heads=2, mlp_dim=64)


@pytest.fixture(scope="module")
def model():
    return PerformerLM(TINY, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def forward():
    return nnx.jit(lambda m, t: m(t))


def random_tokens(seed, shape):
    return jax.random.randint(jax.random.key(seed), shape, 0, 256, dtype=jnp.int32)


def test_forward_shapes_and_parameter_names(model, forward):
    logits = forward(model, random_tokens(0, (2, 150)))
    assert logits.shape == (2, 150, 256) and logits.dtype == jnp.float32
    params = nnx.state(model, nnx.Param)
    assert params["posemb"][...].shape == (1, 160, 32)
    assert params["embed"]["embedding"][...].shape == (256, 32)
    assert params["head"]["kernel"][...].shape == (32, 256)


def test_future_bytes_do_not_change_past_logits(model, forward):
    tokens = random_tokens(1, (2, 150))
    changed = tokens.at[:, 100:].set(random_tokens(2, (2, 50)))
    a, b = forward(model, tokens), forward(model, changed)
    np.testing.assert_allclose(a[:, :100], b[:, :100], atol=1e-5)
    assert float(jnp.abs(a[:, 100:] - b[:, 100:]).max()) > 1e-2


@pytest.mark.parametrize("favor_kernel", ["softmax", "relu"])
def test_recurrent_logits_equal_parallel_logits(favor_kernel, model, forward):
    if favor_kernel == "softmax":
        m = model
    else:
        attention = AttentionConfig(kind="favor", num_features=16, favor_kernel="relu")
        m = PerformerLM(dataclasses.replace(TINY, attention=attention), rngs=nnx.Rngs(1))
    # 150 positions span two causal chunks (CPU chunk size 128).
    tokens = random_tokens(3, (2, 150))
    parallel = forward(m, tokens)
    recurrent = recurrent_logits(m, tokens)
    assert float(jnp.abs(parallel).max()) > 0.5  # the logits are not trivially equal
    np.testing.assert_allclose(recurrent, parallel, atol=1e-4, rtol=1e-4)


def test_lm_task_matches_a_numpy_cross_entropy():
    config = performer_lm_preset("tiny", seq_len=8, num_layers=1)
    task = LMTask(SimpleNamespace(family="performer_lm", model=config))
    model = task.init_model(nnx.Rngs(0))
    assert isinstance(model, PerformerLM)
    tokens = random_tokens(4, (3, 9))
    mask = jnp.asarray([True, False, True])

    @nnx.jit
    def run(m, tokens, mask):
        loss, metrics = task.loss(m, {"tokens": tokens}, nnx.Rngs(0))
        sums = task.evaluate(m, {"tokens": tokens, "mask": mask})
        return m(tokens[:, :-1]), loss, metrics, sums, task.predict(m, {"tokens": tokens})

    logits, loss, metrics, sums, predicted = run(model, tokens, mask)
    logits = np.asarray(logits, np.float64)
    targets = np.asarray(tokens[:, 1:])
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    per_token = -np.take_along_axis(log_probs, targets[..., None], -1)[..., 0]
    keep = np.asarray(mask)
    np.testing.assert_allclose(loss, per_token.mean(), rtol=1e-5)
    np.testing.assert_allclose(metrics["bits_per_byte"], per_token.mean() / math.log(2), rtol=1e-5)
    np.testing.assert_allclose(sums["loss"], per_token[keep].sum(), rtol=1e-5)
    np.testing.assert_allclose(
        sums["bits_per_byte"], per_token[keep].sum() / math.log(2), rtol=1e-5
    )
    assert float(sums["count"]) == 16
    assert float(sums["accuracy"]) == (logits.argmax(-1) == targets)[keep].sum()
    np.testing.assert_allclose(predicted["loss"], per_token.mean(1), rtol=1e-5)


def test_a_few_adam_steps_decrease_the_loss_on_stdlib_text():
    config = performer_lm_preset("tiny", seq_len=32)
    model = PerformerLM(config, rngs=nnx.Rngs(0))
    data = SimpleNamespace(path=None, batch_size=8, eval_batch_size=8, seed=0, seq_len=32)
    train_batches, _ = text.text_batches(data)
    optimizer = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)

    def mean_loss(m, tokens):
        logits = m(tokens[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    @nnx.jit
    def step(m, opt, tokens):
        loss, grads = nnx.value_and_grad(mean_loss)(m, tokens)
        opt.update(m, grads)
        return loss

    held_out = jnp.asarray(train_batches(10_000)["tokens"])
    before = float(nnx.jit(mean_loss)(model, held_out))
    for i in range(30):
        step(model, optimizer, jnp.asarray(train_batches(i)["tokens"]))
    after = float(nnx.jit(mean_loss)(model, held_out))
    assert before > 5.0 and after < before - 1.0, (before, after)


def test_generate_length_determinism_and_errors(model, forward):
    a = generate(model, b"def ", 12, jax.random.key(0))
    b = generate(model, b"def ", 12, jax.random.key(0))
    c = generate(model, b"def ", 12, jax.random.key(1))
    assert isinstance(a, bytes) and len(a) == 12 and a == b and a != c
    # Greedy decoding picks the argmax of the parallel forward's logits at every new position.
    greedy = generate(model, b"def ", 12, jax.random.key(0), temperature=0.0)
    full = jnp.asarray([list(b"def " + greedy)], jnp.int32)
    chosen = jnp.argmax(nnx.jit(lambda m, t: m(t))(model, full)[0, 3:15], axis=-1)
    assert bytes(np.asarray(chosen).astype(np.uint8).tolist()) == greedy
    with pytest.raises(ValueError, match="at most seq_len \\+ 1 = 161"):
        generate(model, b"ab", 160, jax.random.key(0))
    with pytest.raises(ValueError, match="at least one byte"):
        generate(model, b"", 3, jax.random.key(0))
    softmax_attention = dataclasses.replace(TINY, attention=AttentionConfig(kind="softmax"))
    softmax = nnx.eval_shape(lambda: PerformerLM(softmax_attention, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="needs attention.kind='favor'"):
        generate(softmax, b"a", 3, jax.random.key(0))


def test_config_validation_and_presets():
    assert performer_lm_preset("small").attention.kind == "favor"
    c = PerformerLMConfig(attention={"kind": "favor", "num_features": 8})
    assert c.attention == AttentionConfig(kind="favor", num_features=8)
    with pytest.raises(ValueError, match="unknown Performer LM preset 'huge'"):
        performer_lm_preset("huge")
    with pytest.raises(ValueError, match="hidden_size=30 is not divisible by num_heads=4"):
        PerformerLMConfig(hidden_size=30)
    with pytest.raises(ValueError, match="sequence length 20 exceeds seq_len=16"):
        PerformerLM(performer_lm_preset("tiny", seq_len=16), rngs=nnx.Rngs(0))(
            jnp.zeros((1, 20), jnp.int32)
        )
