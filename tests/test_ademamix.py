"""AdEMAMix and Simplified-AdEMAMix vs NumPy float64 loops of docs/ademamix.md §1-2, optax.contrib, the
AdEMAMix(b1=0) = Simplified-AdEMAMix identity and the paper schedulers."""
from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import REFERENCE_STEPS, REFERENCE_TOL, max_abs_diff, run_optax
from references import half_life_beta

import optax_accel as oa

STEPS, TOL = REFERENCE_STEPS, REFERENCE_TOL


def ademamix_reference(w0, grad_fn, steps, *, lr, b1, b2, b3, alpha, eps, wd,
                       alpha_warmup=None, b3_warmup=None):
  """docs/ademamix.md §1; schedulers evaluated at the 0-based count k = t - 1 (optax convention)."""
  m1 = [np.zeros_like(x) for x in w0]
  m2 = [np.zeros_like(x) for x in w0]
  v = [np.zeros_like(x) for x in w0]
  w = [x.copy() for x in w0]
  out = []
  for t in range(1, steps + 1):
    k = t - 1
    alpha_t = alpha * min(k / alpha_warmup, 1.0) if alpha_warmup else alpha
    b3_t = half_life_beta(b1, b3, min(k / b3_warmup, 1.0)) if b3_warmup else b3
    g = grad_fn(t, w)
    m1 = [b1 * m + (1 - b1) * gi for m, gi in zip(m1, g)]
    m2 = [b3_t * m + (1 - b3_t) * gi for m, gi in zip(m2, g)]
    v = [b2 * vi + (1 - b2) * gi * gi for vi, gi in zip(v, g)]
    fast = [m / (1 - b1**t) for m in m1] if b1 > 0 else g
    w = [x - lr * ((f + alpha_t * s) / (np.sqrt(vi / (1 - b2**t)) + eps) + wd * x)
         for x, f, s, vi in zip(w, fast, m2, v)]
    out.append(w)
  return out


def simplified_reference(w0, grad_fn, steps, *, lr, b1, b2, alpha, eps, wd, b1_warmup=None,
                         b1_start=0.9, bias_correction1=False):
  m = [np.zeros_like(x) for x in w0]
  v = [np.zeros_like(x) for x in w0]
  w = [x.copy() for x in w0]
  n_sum, out = 0.0, []
  for t in range(1, steps + 1):
    b1_t = half_life_beta(b1_start, b1, min((t - 1) / b1_warmup, 1.0)) if b1_warmup else b1
    g = grad_fn(t, w)
    m = [b1_t * mi + gi for mi, gi in zip(m, g)]
    v = [b2 * vi + (1 - b2) * gi * gi for vi, gi in zip(v, g)]
    n_sum = b1_t * n_sum + 1
    norm = n_sum if bias_correction1 else 1.0
    w = [x - lr * ((alpha * gi + mi) / ((np.sqrt(vi / (1 - b2**t)) + eps) * norm) + wd * x)
         for x, gi, mi, vi in zip(w, g, m, v)]
    out.append(w)
  return out


@pytest.mark.parametrize("b1,warmups", [(0.9, (None, None)), (0.9, (50, 120)), (0.0, (None, None)),
                                        (0.0, (80, None))])
def test_ademamix_matches_reference(problem, b1, warmups):
  w0, grad_fn = problem
  hyper = dict(lr=0.01, b1=b1, b2=0.999, b3=0.999, alpha=5.0, eps=1e-8, wd=0.01)
  ref = ademamix_reference(w0, grad_fn, STEPS, alpha_warmup=warmups[0], b3_warmup=warmups[1],
                           **hyper)
  opt = oa.ademamix(0.01, b1, 0.999, 0.999, 5.0, 1e-8, weight_decay=0.01,
                    alpha_warmup=warmups[0], b3_warmup=warmups[1])
  assert max_abs_diff(run_optax(opt, w0, grad_fn, STEPS), ref) <= TOL


@pytest.mark.parametrize("warmup,bc1", [(None, False), (100, False), (60, True)])
def test_simplified_ademamix_matches_reference(problem, warmup, bc1):
  w0, grad_fn = problem
  ref = simplified_reference(w0, grad_fn, STEPS, lr=1e-3, b1=0.99, b2=0.95, alpha=2.0, eps=1e-8,
                             wd=0.01, b1_warmup=warmup, b1_start=0.9, bias_correction1=bc1)
  opt = oa.simplified_ademamix(1e-3, 0.99, 0.95, 2.0, 1e-8, weight_decay=0.01, b1_warmup=warmup,
                               b1_start=0.9, bias_correction1=bc1)
  assert max_abs_diff(run_optax(opt, w0, grad_fn, STEPS), ref) <= TOL


def _run_f32(opt, w0, grad_fn, steps=100):
  params = [jnp.asarray(x, jnp.float32) for x in w0]
  state = opt.init(params)
  update = jax.jit(opt.update)
  for t in range(1, steps + 1):
    updates, state = update([jnp.asarray(g, jnp.float32) for g in grad_fn(t, params)], state,
                            params)
    params = optax.apply_updates(params, updates)
  return params


def test_ademamix_matches_optax_contrib_with_schedules(problem):
  """Same semantics when schedules are evaluated at the same 0-based count."""
  w0, grad_fn = problem
  alpha = oa.alpha_warmup_schedule(5.0, 50)
  b3 = oa.beta_warmup_schedule(0.999, 80, 0.9)
  ours = oa.ademamix(1e-2, b3=b3, alpha=alpha, weight_decay=0.01)
  theirs = optax.contrib.ademamix(1e-2, b3=b3, alpha=alpha, weight_decay=0.01)
  assert max_abs_diff(_run_f32(ours, w0, grad_fn), _run_f32(theirs, w0, grad_fn)) <= 1e-6


def test_simplified_ademamix_matches_optax_contrib(problem):
  w0, grad_fn = problem
  ours = oa.simplified_ademamix(1e-3, alpha=2.0, weight_decay=0.01)
  theirs = optax.contrib.simplified_ademamix(1e-3, alpha=2.0, weight_decay=0.01)
  assert max_abs_diff(_run_f32(ours, w0, grad_fn), _run_f32(theirs, w0, grad_fn)) <= 1e-6


def test_ademamix_b1_0_equals_simplified_ademamix(problem):
  """docs/ademamix.md §2: AdEMAMix(b1=0, b3, alpha, lr, wd) = SimAdEMAMix(b3, 1/(alpha(1-b3)),
  lr alpha (1-b3), wd/(alpha(1-b3)))."""
  w0, grad_fn = problem
  lr, b3, alpha, wd = 0.01, 0.99, 8.0, 0.01
  scale = alpha * (1 - b3)
  a = oa.ademamix(lr, b1=0.0, b2=0.999, b3=b3, alpha=alpha, weight_decay=wd)
  s = oa.simplified_ademamix(lr * scale, b1=b3, b2=0.999, alpha=1 / scale, weight_decay=wd / scale)
  assert max_abs_diff(run_optax(a, w0, grad_fn, STEPS), run_optax(s, w0, grad_fn, STEPS)) <= TOL


def preconditioned(inner, b2=0.999, eps=1e-8):
  """inner(g) / (sqrt(v_hat) + eps) with v the EMA of g^2: the Adam preconditioner applied
  after a momentum combination of raw gradients."""

  def init(params):
    return (jnp.zeros([], jnp.int32), optax.tree.zeros_like(params), inner.init(params))

  def update(g, state, params=None):
    count, nu, inner_state = state
    count = count + 1
    nu = optax.tree.update_moment_per_elem_norm(g, nu, b2, 2)
    direction, inner_state = inner.update(g, inner_state, params)
    nu_hat = optax.tree.bias_correction(nu, b2, count)
    return jax.tree.map(lambda d, n: d / (jnp.sqrt(n) + eps), direction, nu_hat), (
        count, nu, inner_state)

  return optax.GradientTransformation(init, update)


@pytest.mark.parametrize("name,hyper,optimizer", [
    ("ademamix_b1_0", dict(learning_rate=0.01, b3=0.99, alpha=5.0),
     oa.ademamix(0.01, b1=0.0, b3=0.99, alpha=5.0)),
    ("simplified_ademamix", dict(learning_rate=1e-3, b1=0.99, alpha=2.0),
     oa.simplified_ademamix(1e-3, b1=0.99, b2=0.999, alpha=2.0)),
])
def test_canonical_coefficients_reproduce(problem, name, hyper, optimizer):
  w0, grad_fn = problem
  c = oa.canonical_coefficients(name, **hyper)
  canonical = optax.chain(
      preconditioned(oa.scale_by_accelerated_momentum(c["beta"], c["a"], momentum_weight=c["b"])),
      optax.scale(-1.0))
  assert max_abs_diff(run_optax(canonical, w0, grad_fn, STEPS),
                      run_optax(optimizer, w0, grad_fn, STEPS)) <= TOL


# ----------------------------------------------------------------------------------------------
# Schedulers.


def test_beta_warmup_schedule_closed_form_monotone_and_target():
  sched = oa.beta_warmup_schedule(0.9999, 1000, 0.9)
  with jax.enable_x64(True):
    values = np.asarray([sched(k) for k in range(0, 1201, 50)])
    for k in (0, 10, 333, 999):
      assert float(sched(k)) == pytest.approx(half_life_beta(0.9, 0.9999, k / 1000), abs=1e-12)
    half_life = lambda b: np.log(0.5) / np.log(b) - 1  # noqa: E731
    np.testing.assert_allclose(half_life(float(sched(500))),
                               0.5 * (half_life(0.9) + half_life(0.9999)), rtol=1e-9)
  assert np.all(np.diff(values) >= 0)
  assert values[0] == pytest.approx(0.9)
  assert sched(1000) == np.float32(0.9999) and sched(5000) == np.float32(0.9999)  # exactly


def test_alpha_warmup_schedule_linear():
  sched = oa.alpha_warmup_schedule(8.0, 100)
  assert [float(sched(k)) for k in (0, 25, 100, 500)] == [0.0, 2.0, 8.0, 8.0]


# ----------------------------------------------------------------------------------------------
# State: no m1 when b1 == 0; bf16 stays bf16; diagnostics.


def test_no_fast_buffer_when_b1_is_zero():
  params = {"w": jnp.ones((4, 4))}
  with_m1 = oa.scale_by_ademamix(b1=0.9).init(params)
  without = oa.scale_by_ademamix(b1=0.0).init(params)
  assert with_m1.m1 is not None and without.m1 is None
  nbytes = lambda s: sum(x.nbytes for x in jax.tree.leaves(s) if x.ndim)  # noqa: E731
  assert nbytes(with_m1) == 3 * 64 and nbytes(without) == 2 * 64


def test_bf16_state_through_scan():
  opt = oa.ademamix(1e-3, mu_dtype=jnp.bfloat16, alpha_warmup=10, b3_warmup=10)
  params = {"w": jnp.ones((3, 4)), "b": jnp.zeros(4)}
  state = opt.init(params)

  def step(carry, _):
    p, s = carry
    u, s = opt.update(jax.tree.map(lambda x: 0.1 * x + 0.2, p), s, p)
    return (optax.apply_updates(p, u), s), None

  (_, final), _ = jax.lax.scan(step, (params, state), length=50)
  ade = final[0]
  for leaf in jax.tree.leaves(ade.m1):
    assert leaf.dtype == jnp.bfloat16
  for leaf in jax.tree.leaves((ade.m2, ade.nu)):  # the long memories (docs/conventions.md)
    assert leaf.dtype == jnp.float32
  chex.assert_trees_all_equal_shapes_and_dtypes(state, final)
  diag = oa.get_diagnostics(final)
  assert float(diag["ademamix_alpha"]) == 5.0 and float(diag["ademamix_b3"]) == pytest.approx(0.9999)


@pytest.mark.parametrize("call,arg", [
    (lambda: oa.ademamix(1e-3, b1=0.9, b3=0.9, b3_warmup=10), "b3"),
    (lambda: oa.ademamix(1e-3, b1=0.95, b3=0.9, b3_warmup=10), "b3"),
    (lambda: oa.ademamix(1e-3, alpha=-1.0), "alpha"),
    (lambda: oa.ademamix(1e-3, b1=1.0), "b1"),
    (lambda: oa.ademamix(1e-3, b2=-0.1), "b2"),
    (lambda: oa.ademamix(1e-3, b3=1.0), "b3"),
    (lambda: oa.ademamix(1e-3, eps=-1.0), "eps"),
    (lambda: oa.ademamix(1e-3, alpha_warmup=-5), "alpha_warmup"),
    (lambda: oa.ademamix(1e-3, alpha=optax.constant_schedule(1.0), alpha_warmup=5), "alpha"),
    (lambda: oa.simplified_ademamix(1e-3, b1=0.9, b1_start=0.95, b1_warmup=10), "b1"),
    (lambda: oa.simplified_ademamix(1e-3, alpha=-2.0), "alpha"),
    (lambda: oa.simplified_ademamix(-1e-3), "learning_rate"),
    (lambda: oa.beta_warmup_schedule(1.0, 10, 0.9), "beta_end"),
    (lambda: oa.alpha_warmup_schedule(1.0, -1), "warmup_steps"),
])
def test_bad_input(call, arg):
  with pytest.raises(ValueError, match=arg):
    call()
