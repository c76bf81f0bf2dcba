"""Helpers to drive optax_accel transforms in the tests."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax


def run_optax(opt, w0, grad_fn, steps, record=None):
  """Runs ``opt`` for ``steps`` steps in float64 on list-of-array params.

  ``grad_fn(t, w)`` gives the gradient at 1-based step t. Returns a list, one entry per step, of
  ``record(params, state)`` (default: the params after the step, as NumPy arrays).
  """
  record = record or (lambda p, s: [np.asarray(x) for x in p])
  with jax.enable_x64(True):
    params = [jnp.asarray(x, jnp.float64) for x in w0]
    state = opt.init(params)
    update = jax.jit(opt.update)
    out = []
    for t in range(1, steps + 1):
      grads = [jnp.asarray(g) for g in grad_fn(t, [np.asarray(x) for x in params])]
      updates, state = update(grads, state, params)
      params = optax.apply_updates(params, updates)
      out.append(record(params, state))
  return out


def max_abs_diff(a, b) -> float:
  """Max |a - b| over nested lists of arrays."""
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb)
  return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
             for x, y in zip(la, lb))
