"""An Equinox model trains exactly as the same linen model: same values, same keys."""

import equinox as eqx
import flax.linen as nn
import jax
import numpy as np
import optax

import regjax.equinox as rq
import regjax.linen as rl

IN, HIDDEN, OUT, BATCH, STEPS, RATE, MOMENTUM = 6, 16, 3, 32, 5, 0.3, 0.9


class LinenMLP(nn.Module):
  @nn.compact
  def __call__(self, x, *, train: bool, key=None):
    x = nn.Dense(HIDDEN, use_bias=False, name="dense1")(x)  # a bias before BN has no gradient
    x = rl.BatchNorm(momentum=MOMENTUM, name="bn")(x, use_running_average=not train)
    x = nn.relu(x)
    x = rl.Dropout(RATE, name="drop")(x, deterministic=not train, rng=key)
    return nn.Dense(OUT, name="dense2")(x)


class EqxMLP(eqx.Module):
  dense1: eqx.nn.Linear
  bn: rq.BatchNorm
  drop: rq.Dropout
  dense2: eqx.nn.Linear

  def __init__(self, key):
    k1, k2 = jax.random.split(key)
    self.dense1 = eqx.nn.Linear(IN, HIDDEN, use_bias=False, key=k1)
    self.bn = rq.BatchNorm(HIDDEN, "batch", momentum=MOMENTUM)
    self.drop = rq.Dropout(RATE)
    self.dense2 = eqx.nn.Linear(HIDDEN, OUT, key=k2)

  def __call__(self, x, state, *, key=None):
    """A batch ``(BATCH, IN)``: the layers per example under vmap, dropout on the batch."""
    h = jax.vmap(self.dense1)(x)
    h, state = jax.vmap(self.bn, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(h, state)
    h = self.drop(jax.nn.relu(h), key=key)  # one key, the linen module's mask
    return jax.vmap(self.dense2)(h), state


def _loss(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def _with_linen_values(model, params):
  """The Equinox model holding the linen parameters (``weight`` is ``kernel.T``)."""
  return eqx.tree_at(
    lambda m: (m.dense1.weight, m.bn.weight, m.bn.bias, m.dense2.weight, m.dense2.bias),
    model,
    (
      params["dense1"]["kernel"].T,
      params["bn"]["scale"],
      params["bn"]["bias"],
      params["dense2"]["kernel"].T,
      params["dense2"]["bias"],
    ),
  )


def test_equinox_and_linen_models_train_alike():
  data_key, init_key = jax.random.split(jax.random.key(0))
  xs = jax.random.normal(data_key, (STEPS, BATCH, IN)) * 2.0 + 1.0
  ys = jax.random.randint(jax.random.key(1), (STEPS, BATCH), 0, OUT)
  step_keys = [jax.random.fold_in(jax.random.key(2), i) for i in range(STEPS)]
  optimizer = optax.adam(1e-2)

  linen = LinenMLP()
  variables = linen.init(init_key, xs[0], train=False)
  params, batch_stats = variables["params"], variables["batch_stats"]

  @jax.jit
  def linen_step(params, batch_stats, opt_state, x, y, key):
    def loss_fn(params):
      logits, updates = linen.apply(
        {"params": params, "batch_stats": batch_stats},
        x,
        train=True,
        key=key,
        mutable=["batch_stats"],
      )
      return _loss(logits, y), updates["batch_stats"]

    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), batch_stats, opt_state, loss

  model, state = eqx.nn.make_with_state(EqxMLP)(jax.random.key(5))
  model = _with_linen_values(model, params)

  @eqx.filter_jit
  def eqx_step(model, state, opt_state, x, y, key):
    def loss_fn(model):
      logits, new_state = model(x, state, key=key)
      return _loss(logits, y), new_state

    (loss, state), grads = eqx.filter_value_and_grad(loss_fn, has_aux=True)(model)
    updates, opt_state = optimizer.update(grads, opt_state, eqx.filter(model, eqx.is_array))
    return eqx.apply_updates(model, updates), state, opt_state, loss

  linen_opt = optimizer.init(params)
  eqx_opt = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
  for i in range(STEPS):
    params, batch_stats, linen_opt, linen_loss = linen_step(
      params, batch_stats, linen_opt, xs[i], ys[i], step_keys[i]
    )
    model, state, eqx_opt, eqx_loss = eqx_step(model, state, eqx_opt, xs[i], ys[i], step_keys[i])
    np.testing.assert_allclose(float(eqx_loss), float(linen_loss), rtol=1e-5)

  expected = _with_linen_values(model, params)
  for ours, theirs in zip(
    jax.tree_util.tree_leaves(eqx.filter(model, eqx.is_array)),
    jax.tree_util.tree_leaves(eqx.filter(expected, eqx.is_array)),
    strict=True,
  ):
    np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), rtol=1e-5, atol=1e-5)
  stats = state.get(model.bn.state_index)
  for name in ("mean", "var"):
    np.testing.assert_allclose(
      np.asarray(stats[name]), np.asarray(batch_stats["bn"][name]), rtol=1e-5, atol=1e-5
    )
  # Inference: linen's eval mode and eqx.nn.inference_mode agree too.
  x = xs[0]
  linen_eval = linen.apply({"params": params, "batch_stats": batch_stats}, x, train=False)
  eqx_eval, _ = eqx.nn.inference_mode(model)(x, state)
  np.testing.assert_allclose(np.asarray(eqx_eval), np.asarray(linen_eval), rtol=1e-5, atol=1e-5)
