"""regjax.diagnostics on an Equinox model: a clear TypeError (not supported yet)."""

import equinox as eqx
import jax
import jax.numpy as jnp
import pytest

import regjax.equinox as rq
from regjax import diagnostics


def _model():
  key = jax.random.key(0)
  return eqx.nn.make_with_state(eqx.nn.Sequential)(
    [eqx.nn.Linear(3, 4, key=key), rq.BatchNorm(4, "batch"), rq.Dropout(0.5)]
  )


@pytest.mark.parametrize("fn", [diagnostics.variance_shift, diagnostics.recalibrate_batch_stats])
@pytest.mark.parametrize(
  "make",
  [lambda: _model()[0], lambda: eqx.nn.make_with_state(eqx.nn.BatchNorm)(4, "b", mode="batch")[0]],
)
def test_an_equinox_model_with_batch_norm_raises_a_clear_type_error(fn, make):
  batches = [jnp.ones((8, 3))]
  with pytest.raises(TypeError, match=r"Equinox models are not supported yet\. The probe must see"):
    fn(make(), batches)
  with pytest.raises(TypeError, match=r"Equinox models are not supported yet"):
    fn(make(), {}, batches)


def test_an_equinox_wrapped_function_still_takes_the_linen_form():
  # eqx.filter_jit wraps a function in an eqx.Module; it holds no BatchNorm, so it is
  # left to the linen form, whose own checks then apply.
  apply_fn = eqx.filter_jit(lambda variables, x: x)
  with pytest.raises(TypeError, match=r"`variables` must be the linen variables dict"):
    diagnostics.variance_shift(apply_fn, None, [jnp.ones((2, 3))])
