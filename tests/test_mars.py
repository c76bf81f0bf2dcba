"""MARS-approx vs a NumPy float64 loop of docs/mars.md §1, its accelerated-SGD identity, and Lion's."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import REFERENCE_STEPS, REFERENCE_TOL, max_abs_diff, run_optax

import optax_accel as oa

STEPS, TOL = REFERENCE_STEPS, REFERENCE_TOL


def mars_reference(w0, grad_fn, steps, *, lr, b1, b2, gamma, eps, wd, variant, clip_scope,
                   threshold=1.0):
  m = [np.zeros_like(x) for x in w0]
  v = [np.zeros_like(x) for x in w0]
  g_prev = [np.zeros_like(x) for x in w0]
  w = [x.copy() for x in w0]
  out = []
  for t in range(1, steps + 1):
    g = grad_fn(t, w)
    c = [gi + gamma * b1 / (1 - b1) * (gi - gp) for gi, gp in zip(g, g_prev)]
    if clip_scope == "tensor":
      c = [ci * min(1.0, threshold / np.linalg.norm(ci)) for ci in c]
    elif clip_scope == "global":
      norm = np.sqrt(sum(np.sum(ci * ci) for ci in c))
      c = [ci * min(1.0, threshold / norm) for ci in c]
    m = [b1 * mi + (1 - b1) * ci for mi, ci in zip(m, c)]
    if variant == "adamw":
      v = [b2 * vi + (1 - b2) * ci * ci for vi, ci in zip(v, c)]
      d = [(mi / (1 - b1**t)) / (np.sqrt(vi / (1 - b2**t)) + eps) for mi, vi in zip(m, v)]
    else:
      d = [np.sign(mi) for mi in m]
    w = [x - lr * (di + wd * x) for x, di in zip(w, d)]
    g_prev = g
    out.append(w)
  return out


@pytest.mark.parametrize("variant", ["adamw", "lion"])
@pytest.mark.parametrize("clip_scope", ["tensor", "global", "none"])
def test_mars_matches_reference(problem, variant, clip_scope):
  w0, grad_fn = problem
  ref = mars_reference(w0, grad_fn, STEPS, lr=3e-3, b1=0.95, b2=0.99, gamma=0.025, eps=1e-8,
                       wd=0.01, variant=variant, clip_scope=clip_scope)
  alias = oa.mars_adamw if variant == "adamw" else oa.mars_lion
  opt = alias(3e-3, 0.95, 0.99, 0.025, weight_decay=0.01, clip_scope=clip_scope)
  assert max_abs_diff(run_optax(opt, w0, grad_fn, STEPS), ref) <= TOL


def test_clipping_is_active_in_the_reference_problem(problem):
  """Guards the test above: the per-tensor clip must actually change c on this problem."""
  w0, grad_fn = problem
  clipped = mars_reference(w0, grad_fn, 20, lr=3e-3, b1=0.95, b2=0.99, gamma=0.025, eps=1e-8,
                           wd=0.0, variant="adamw", clip_scope="tensor")
  unclipped = mars_reference(w0, grad_fn, 20, lr=3e-3, b1=0.95, b2=0.99, gamma=0.025, eps=1e-8,
                             wd=0.0, variant="adamw", clip_scope="none")
  assert max_abs_diff(clipped, unclipped) > 1e-6


def test_unclipped_first_moment_is_gamma_g_plus_ema(problem):
  """docs/mars.md §1: without clipping, m_t = gamma g_t + (1 - gamma) EMA_b1(g)_t exactly."""
  w0, grad_fn = problem
  b1, gamma = 0.95, 0.025
  opt = oa.scale_by_mars(b1, gamma=gamma, clip_scope="none")
  ema = [np.zeros_like(x) for x in w0]
  worst = 0.0
  with jax.enable_x64(True):
    params = [jnp.asarray(x) for x in w0]
    state = opt.init(params)
    for t in range(1, STEPS + 1):
      g = grad_fn(t, w0)  # the identity holds for any gradient sequence
      _, state = opt.update([jnp.asarray(x) for x in g], state)
      ema = [b1 * e + (1 - b1) * gi for e, gi in zip(ema, g)]
      expected = [gamma * gi + (1 - gamma) * e for gi, e in zip(g, ema)]
      worst = max(worst, max_abs_diff([np.asarray(m) for m in state.mu], expected))
  assert worst <= TOL


def test_mars_canonical_coefficients_give_first_moment(problem):
  w0, grad_fn = problem
  c = oa.canonical_coefficients("mars_approx", b1=0.95, gamma=0.025)
  canonical = oa.scale_by_accelerated_momentum(c["beta"], c["a"], momentum_weight=c["b"])
  mars = oa.scale_by_mars(0.95, gamma=0.025, clip_scope="none")
  worst = 0.0
  with jax.enable_x64(True):
    params = [jnp.asarray(x) for x in w0]
    s_c, s_m = canonical.init(params), mars.init(params)
    for t in range(1, STEPS + 1):
      g = [jnp.asarray(x) for x in grad_fn(t, w0)]
      d, s_c = canonical.update(g, s_c)
      _, s_m = mars.update(g, s_m)
      worst = max(worst, max_abs_diff(d, s_m.mu))
  assert worst <= TOL


def test_lion_pre_sign_vector_is_accelerated_sgd(problem):
  """docs/mars.md §2: sign((b1/b2) m_t + (1 - b1/b2) g_t) with m the b2-EMA is optax's Lion direction."""
  w0, grad_fn = problem
  c = oa.canonical_coefficients("lion", b1=0.9, b2=0.99)
  canonical = optax.chain(
      oa.scale_by_accelerated_momentum(c["beta"], c["a"], momentum_weight=c["b"]),
      optax.GradientTransformation(
          lambda p: optax.EmptyState(), lambda u, s, p=None: (jax.tree.map(jnp.sign, u), s)),
      optax.scale_by_learning_rate(1e-3))
  lion = oa.lion(1e-3, b1=0.9, b2=0.99, weight_decay=0.0)
  assert max_abs_diff(run_optax(canonical, w0, grad_fn, STEPS),
                      run_optax(lion, w0, grad_fn, STEPS)) <= TOL


def test_state_bytes_and_no_second_moment_for_lion():
  params = {"w": jnp.ones((4, 4))}
  nbytes = lambda s: sum(x.nbytes for x in jax.tree.leaves(s) if x.ndim)  # noqa: E731
  assert nbytes(oa.scale_by_mars().init(params)) == 3 * 64
  lion_state = oa.scale_by_mars(variant="lion").init(params)
  assert lion_state.nu is None and nbytes(lion_state) == 2 * 64


@pytest.mark.parametrize("call,arg", [
    (lambda: oa.scale_by_mars(gamma=1.5), "gamma"),
    (lambda: oa.scale_by_mars(gamma=-0.1), "gamma"),
    (lambda: oa.scale_by_mars(clip_threshold=0.0), "clip_threshold"),
    (lambda: oa.scale_by_mars(variant="shampoo"), "variant"),
    (lambda: oa.scale_by_mars(clip_scope="layer"), "clip_scope"),
    (lambda: oa.scale_by_mars(b1=1.0), "b1"),
    (lambda: oa.mars_adamw(-1.0), "learning_rate"),
    (lambda: oa.mars_lion(1e-3, weight_decay=-1.0), "weight_decay"),
])
def test_bad_input(call, arg):
  with pytest.raises(ValueError, match=arg):
    call()
