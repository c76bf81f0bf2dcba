"""Finite gradients give finite parameters wherever optax.adamw's stay finite, for every registered
optimizer: g^2 overflowing f32 (gradients of 1e20) and f16 parameters with gradients of 300 (g^2
overflows f16). Squared-gradient terms saturate (C.saturating_square) or overflow to an inf that
only shrinks the step, as in optax's Adam; they never meet 0 * inf or inf - inf. Diagnostics are
never NaN (a norm whose square overflows reads inf)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
import pytest

import optax_accel as oa

CASES = {"f32, g = 1e20": (jnp.float32, 1e20), "f16, g = 300": (jnp.float16, 300.0)}


def _run(name, dtype, value):
  params = {"w": jnp.ones((4, 4), dtype), "b": jnp.ones((3,), dtype)}
  grads = jax.tree.map(lambda p: jnp.full_like(p, value), params)
  opt = oa.get_optimizer(name, 1e-3)
  state = opt.init(params)
  for _ in range(3):
    updates, state = opt.update(grads, state, params, value=jnp.float32(1.0))
    params = optax.apply_updates(params, updates)
  return params, oa.get_diagnostics(state)


def _all_finite(tree):
  return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("case", list(CASES))
def test_adamw_stays_finite(case):
  assert _all_finite(_run("adamw", *CASES[case])[0])


@pytest.mark.parametrize("name", oa.list_optimizers())
@pytest.mark.parametrize("case", list(CASES))
def test_overflowing_square_gives_finite_parameters(case, name):
  params, diagnostics = _run(name, *CASES[case])
  assert _all_finite(params), name
  for key, value in diagnostics.items():
    assert not bool(jnp.any(jnp.isnan(value))), (name, key)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_stored_gradient_is_the_gradient_bit_for_bit(dtype):
  """C.stored_input (MADA's and HyperAdam's stored g, written by the update kernel) changes no bit:
  NaN, inf and -0 included, at the first step and at a saturated step count."""
  from optax_accel import _common as C  # pylint: disable=import-outside-toplevel
  g = jnp.array([jnp.nan, -jnp.inf, jnp.inf, -0.0, 0.0, 1.5, -3e-8], dtype)
  bits = lambda x: jax.lax.bitcast_convert_type(x, jnp.uint16 if x.itemsize == 2 else jnp.uint32)  # noqa
  for count in (0, jnp.iinfo(jnp.int32).max):
    stored = jax.jit(C.stored_input)({"g": g}, jnp.int32(count))["g"]
    assert stored.dtype == g.dtype
    assert jnp.array_equal(bits(stored), bits(g)), (count, stored)
