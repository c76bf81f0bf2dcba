"""Accelerated SGD: canonical transform and named variants vs NumPy float64 loops of the
original recursions (docs/accelerated_sgd.md §2)."""
from __future__ import annotations

import jax
import numpy as np
import optax
import pytest
from helpers import REFERENCE_STEPS, REFERENCE_TOL, max_abs_diff, run_optax

import optax_accel as oa

STEPS, TOL = REFERENCE_STEPS, REFERENCE_TOL


def accsgd_reference(w0, grad_fn, lr, kappa, xi, c, steps):
  long_step = kappa * lr / c
  a_mix = 1 - c * c * xi / kappa
  b_mix = 1 - a_mix
  zeta = c / (c + b_mix)
  w = [x.copy() for x in w0]
  wbar = [x.copy() for x in w0]
  out = []
  for t in range(1, steps + 1):
    g = grad_fn(t, w)
    wbar = [a_mix * wb + b_mix * (x - long_step * gi) for wb, x, gi in zip(wbar, w, g)]
    w = [zeta * (x - lr * gi) + (1 - zeta) * wb for x, gi, wb in zip(w, g, wbar)]
    out.append(w)
  return out


def mass_reference(w0, grad_fn, lr, alpha, kappa_tilde, steps):
  delta = lr / (alpha * kappa_tilde)
  u = [x.copy() for x in w0]
  v = [x.copy() for x in w0]
  out = []
  for t in range(1, steps + 1):
    g = grad_fn(t, u)
    w_new = [x - lr * gi for x, gi in zip(u, g)]
    v = [(1 - alpha) * vi + alpha * x - delta * gi for vi, x, gi in zip(v, u, g)]
    u = [(alpha * vi + wi) / (1 + alpha) for vi, wi in zip(v, w_new)]
    out.append(u)
  return out


def agnes_reference(w0, grad_fn, alpha, eta, rho, steps):
  x_prime = [x.copy() for x in w0]
  v = [np.zeros_like(x) for x in w0]
  out = []
  for t in range(1, steps + 1):
    g = grad_fn(t, x_prime)
    x = [xp - eta * gi for xp, gi in zip(x_prime, g)]
    v = [rho * (vi - gi) for vi, gi in zip(v, g)]
    x_prime = [xi + alpha * vi for xi, vi in zip(x, v)]
    out.append(x_prime)
  return out


def canonical_reference(w0, grad_fn, beta, a, b, steps, weight_decay=0.0, lr=1.0):
  """m = beta m + g; w <- w - a g - b m - lr*wd*w (decoupled decay)."""
  w = [x.copy() for x in w0]
  m = [np.zeros_like(x) for x in w0]
  out = []
  for t in range(1, steps + 1):
    g = grad_fn(t, w)
    m = [beta * mi + gi for mi, gi in zip(m, g)]
    w = [x - a * gi - b * mi - lr * weight_decay * x for x, gi, mi in zip(w, g, m)]
    out.append(w)
  return out


def test_accsgd_matches_kidambi_recursion(problem):
  w0, grad_fn = problem
  ref = accsgd_reference(w0, grad_fn, 0.05, 1000.0, 10.0, 0.7, STEPS)
  ours = run_optax(oa.accsgd(0.05), w0, grad_fn, STEPS)
  assert max_abs_diff(ours, ref) <= TOL


def test_mass_matches_liu_belkin_recursion(problem):
  w0, grad_fn = problem
  ref = mass_reference(w0, grad_fn, 0.1, 0.05, 12.0, STEPS)
  ours = run_optax(oa.mass_sgd(0.1), w0, grad_fn, STEPS)
  assert max_abs_diff(ours, ref) <= TOL


def test_agnes_matches_gupta_recursion(problem):
  w0, grad_fn = problem
  ref = agnes_reference(w0, grad_fn, alpha=0.02, eta=0.1, rho=0.9, steps=STEPS)
  ours = run_optax(oa.agnes(0.02, 0.1, 0.9), w0, grad_fn, STEPS)
  assert max_abs_diff(ours, ref) <= TOL


def test_accelerated_sgd_matches_canonical_form(problem):
  w0, grad_fn = problem
  lr, beta, alpha, wd = 0.03, 0.95, 4.0, 0.01
  ref = canonical_reference(w0, grad_fn, beta, lr * alpha, lr, STEPS, weight_decay=wd, lr=lr)
  ours = run_optax(oa.accelerated_sgd(lr, beta, alpha, weight_decay=wd), w0, grad_fn, STEPS)
  assert max_abs_diff(ours, ref) <= TOL


def test_accelerated_sgd_defaults(problem):
  """beta 0.9, alpha 1 and no weight decay unless asked for."""
  w0, grad_fn = problem
  lr = 0.03
  ref = canonical_reference(w0, grad_fn, 0.9, lr * 1.0, lr, STEPS)
  ours = run_optax(oa.accelerated_sgd(lr), w0, grad_fn, STEPS)
  assert max_abs_diff(ours, ref) <= TOL


def _canonical_optimizer(coeffs):
  return optax.chain(
      oa.scale_by_accelerated_momentum(coeffs["beta"], coeffs["a"], momentum_weight=coeffs["b"]),
      optax.scale(-1.0))


@pytest.mark.parametrize("name,hyper,optimizer", [
    ("heavy_ball", dict(learning_rate=0.05, beta=0.9), optax.sgd(0.05, momentum=0.9)),
    ("nesterov", dict(learning_rate=0.05, beta=0.9), optax.sgd(0.05, momentum=0.9, nesterov=True)),
    ("accsgd", dict(learning_rate=0.05), oa.accsgd(0.05)),
    ("mass", dict(learning_rate=0.1), oa.mass_sgd(0.1)),
    ("agnes", dict(learning_rate=0.02, correction_lr=0.1, momentum=0.9), oa.agnes(0.02, 0.1, 0.9)),
])
def test_canonical_coefficients_reproduce_optimizer(problem, name, hyper, optimizer):
  w0, grad_fn = problem
  coeffs = oa.canonical_coefficients(name, **hyper)
  ours = run_optax(_canonical_optimizer(coeffs), w0, grad_fn, STEPS)
  theirs = run_optax(optimizer, w0, grad_fn, STEPS)
  assert max_abs_diff(ours, theirs) <= TOL


def test_accsgd_defaults_match_spec_table():
  c = oa.canonical_coefficients("accsgd")
  assert c["a"] == 1.0  # learning rate 1 by default: a and b per unit learning rate
  assert c["beta"] == pytest.approx(0.98818, abs=1e-5)
  assert c["b"] / c["a"] == pytest.approx(0.04171, abs=1e-5)
  c = oa.canonical_coefficients("mass")
  assert c["a"] == 1.0
  assert c["beta"] == pytest.approx(0.9048, abs=1e-4)
  assert c["b"] / c["a"] == pytest.approx(0.0317, abs=1e-4)


@pytest.mark.parametrize("name,expected", [
    # The documented defaults (learning rates 1), (beta, a, b) worked out by hand from the
    # canonical forms of docs/accelerated_sgd.md.
    ("heavy_ball", (0.9, 0.0, 1.0)),
    ("nesterov", (0.9, 1.0, 0.9)),
    ("agnes", (0.99, 1.0, 0.99)),
    ("lion", (0.99, 1 - 0.9 / 0.99, 0.9 / 0.99 * 0.01)),
    ("mars_approx", (0.95, 0.025, 0.975 * 0.05)),
    ("ademamix_b1_0", (0.9999, 1.0, 5.0 * 1e-4)),
    ("simplified_ademamix", (0.99, 0.0, 1.0)),
    ("schedule_free", (0.0, 0.1, 0.9)),
])
def test_canonical_coefficients_defaults(name, expected):
  c = oa.canonical_coefficients(name)
  assert (c["beta"], c["a"], c["b"]) == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_time_varying_coefficients_follow_schedules():
  beta = lambda count: 0.5 + 0.1 * count  # noqa: E731
  opt = oa.scale_by_accelerated_momentum(beta, alpha=lambda count: 2.0 * count)
  params = {"w": jax.numpy.ones(3)}
  state = opt.init(params)
  g = {"w": jax.numpy.ones(3)}
  d1, state = opt.update(g, state)
  d2, state = opt.update(g, state)
  np.testing.assert_allclose(d1["w"], 0.0 * 1 + 1.0)  # m_1 = g, alpha_0 = 0
  np.testing.assert_allclose(d2["w"], 2.0 * 1 + (0.6 * 1 + 1))  # m_2 = 0.6 m_1 + g
  assert oa.get_diagnostics(state)["momentum_beta"] == pytest.approx(0.6)


@pytest.mark.parametrize("call,arg", [
    (lambda: oa.scale_by_accelerated_momentum(beta=1.5), "beta"),
    (lambda: oa.accelerated_sgd(0.1, beta=-0.1), "beta"),
    (lambda: oa.accelerated_sgd(0.1, weight_decay=-1.0), "weight_decay"),
    (lambda: oa.accsgd(0.1, kappa=0.0), "kappa"),
    (lambda: oa.accsgd(0.1, kappa=10.0, xi=100.0), "kappa"),
    (lambda: oa.mass_sgd(0.1, alpha=1.0), "alpha"),
    (lambda: oa.agnes(0.1, -1.0), "correction_lr"),
    (lambda: oa.agnes(0.1, 0.1, momentum=1.0), "momentum"),
    (lambda: oa.canonical_coefficients("nope"), "name"),
    (lambda: oa.canonical_coefficients("lion", beta=0.1), "beta"),
])
def test_bad_input(call, arg):
  with pytest.raises(ValueError, match=arg):
    call()
