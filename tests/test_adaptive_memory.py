"""Adaptive Memory momentum: the closed form (docs/adaptive_memory.md §1), AM-SGD / AM-AdamW vs NumPy float64
loops of docs/adaptive_memory.md §2-3, granularity, sharding, variants, bad input."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import REFERENCE_STEPS, REFERENCE_TOL, max_abs_diff, run_optax, sharded_vs_unsharded

import optax_accel as oa

STEPS, TOL = REFERENCE_STEPS, REFERENCE_TOL


# ----------------------------------------------------------------------------------------------
# The proximal subproblem, in NumPy.


def dual(beta, f_now, f_hat, g, d, lam, lr):
  """Paper eq. 11 (docs/adaptive_memory.md §1), the dual:
  (1-b) f + b f_hat - lr/(2(1+lam)) ||g + lam d + b (d - g)||^2."""
  v = g + lam * d + beta * (d - g)
  return (1 - beta) * f_now + beta * f_hat - lr / (2 * (1 + lam)) * np.sum(v * v)


def primal(s, f_now, f_hat, g, d, lam, lr):
  """max of the two planes + (1/2lr)||s||^2 + lam <d, s> + (lam/2lr)||s||^2."""
  model = max(f_now + g @ s, f_hat + d @ s)
  return model + (1 + lam) / (2 * lr) * s @ s + lam * d @ s


def beta_star(f_now, f_hat, g, d, lam, lr):
  """Paper eq. 12 (docs/adaptive_memory.md §1), clipped to [0, 1]."""
  delta = d - g
  return float(np.clip(((1 + lam) * (f_hat - f_now) / lr - delta @ (g + lam * d)) / (delta @ delta),
                       0.0, 1.0))


def _instances(n=20, dim=5, seed=0):
  rng = np.random.default_rng(seed)
  for _ in range(n):
    g, d = rng.normal(size=dim), rng.normal(size=dim)
    f_now = rng.normal()
    yield f_now, f_now + rng.normal(scale=2.0), g, d, rng.uniform(0, 1), rng.uniform(0.05, 1.0)


def test_closed_form_beta_maximises_the_dual():
  grid = np.linspace(0, 1, 100_001)
  for f_now, f_hat, g, d, lam, lr in _instances():
    b = beta_star(f_now, f_hat, g, d, lam, lr)
    v = g[None] + lam * d[None] + grid[:, None] * (d - g)[None]
    values = (1 - grid) * f_now + grid * f_hat - lr / (2 * (1 + lam)) * np.sum(v * v, axis=1)
    assert dual(b, f_now, f_hat, g, d, lam, lr) >= values.max() - 1e-12
    assert abs(b - grid[values.argmax()]) <= 1e-4  # the grid's argmax is next to beta*


def test_primal_minimiser_is_the_am_update():
  """s* = -lr (u + lam d)/(1 + lam), u = (1-b) g + b d, i.e. x - lr d_{t+1}; strong duality
  (primal(s*) == dual(b*)) certifies optimality, and random perturbations never do better."""
  rng = np.random.default_rng(1)
  for f_now, f_hat, g, d, lam, lr in _instances():
    b = beta_star(f_now, f_hat, g, d, lam, lr)
    d_next = ((b + lam) * d + (1 - b) * g) / (1 + lam)
    s_star = -lr * d_next
    p_star = primal(s_star, f_now, f_hat, g, d, lam, lr)
    assert p_star == pytest.approx(dual(b, f_now, f_hat, g, d, lam, lr), abs=1e-10)
    for _ in range(200):
      s = s_star + rng.normal(scale=10 ** rng.uniform(-6, 0), size=s_star.shape)
      assert primal(s, f_now, f_hat, g, d, lam, lr) >= p_star - 1e-12


def test_exact_gap_mode_uses_the_closed_form():
  """adaptive_memory_momentum(gap="exact") reproduces beta* with the measured losses."""
  lam, lr = 0.1, 0.05
  opt = oa.adaptive_memory_momentum(lam, beta_max=0.99, gap="exact", learning_rate=lr)
  with jax.enable_x64(True):
    rng = np.random.default_rng(3)
    g1, g2 = rng.normal(size=4), rng.normal(size=4)
    state = opt.init(jnp.zeros(4))
    _, state = opt.update(jnp.asarray(g1), state, value=2.0)  # d_1 = g_1
    f_now = 1.7
    _, state = opt.update(jnp.asarray(g2), state, value=f_now)
    expected = min(beta_star(f_now, 2.0, g2, g1, lam, lr), 0.99)
    assert 0 < expected < 0.99  # an interior solution, so the test checks the formula
    assert float(state.beta) == pytest.approx(expected, abs=1e-12)
    with pytest.raises(ValueError, match="value"):
      opt.update(jnp.asarray(g2), state)


# ----------------------------------------------------------------------------------------------
# Reference loops.


def _groups(leaves, granularity):
  return [list(range(len(leaves)))] if granularity == "global" else [[i] for i in
                                                                     range(len(leaves))]


def am_sgd_reference(w0, grad_fn, steps, *, lr, lam, beta_max, beta_min=0.0, wd=0.0,
                     granularity="global", restart=None, ratio=True):
  """docs/adaptive_memory.md §2; lr is a function of the 0-based count."""
  w = [x.copy() for x in w0]
  d, out, betas = None, [], []
  for t in range(1, steps + 1):
    g = [gi + wd * x for gi, x in zip(grad_fn(t, w), w)]
    if t == 1:
      d = [gi.copy() for gi in g]
    r = lr(t - 2) / lr(t - 1) if (ratio and t > 1) else 1.0
    new_d, step_betas = list(d), []
    for group in _groups(g, granularity):
      gd = sum(np.sum(g[i] * d[i]) for i in group)
      delta = [d[i] - g[i] for i in group]
      den = sum(np.sum(x * x) for x in delta)
      e = sum(np.sum(x * (g[i] + lam * d[i])) for x, i in zip(delta, group))
      beta = np.clip(((1 + lam) * r * gd - e) / den, beta_min, beta_max) if den > 0 else max(
          0.0, beta_min)
      if restart is not None:
        if beta < restart and t > 1:
          for i in group:
            d[i] = g[i].copy()
        beta = beta_max
      for i in group:
        new_d[i] = ((beta + lam) * d[i] + (1 - beta) * g[i]) / (1 + lam)
      step_betas.append(beta)
    d = new_d
    w = [x - lr(t - 1) * di for x, di in zip(w, d)]
    out.append(w)
    betas.append(step_betas)
  return out, betas


def am_adamw_reference(w0, grad_fn, steps, *, lr, b2, eps, lam, beta_max, wd, decay_mask,
                       granularity="per_tensor", beta_min=0.0, restart=None, ratio=True):
  """docs/adaptive_memory.md §3 with decoupled decay mu = wd on the leaves where decay_mask is True."""
  w = [x.copy() for x in w0]
  d = [np.zeros_like(x) for x in w0]
  v = [np.zeros_like(x) for x in w0]
  groups = _groups(w0, granularity)
  prod = [1.0] * len(groups)
  mu = [wd if m else 0.0 for m in decay_mask]
  out = []
  for t in range(1, steps + 1):
    g = grad_fn(t, w)
    v = [b2 * vi + (1 - b2) * gi * gi for vi, gi in zip(v, g)]
    r = lr(t - 2) / lr(t - 1) if (ratio and t > 1) else 1.0
    new_d, new_w = list(d), list(w)
    for k, group in enumerate(groups):
      c = 1 - beta_max * prod[k]
      p = {i: c * (np.sqrt(v[i] / (1 - b2**t)) + eps) for i in group}
      delta = {i: d[i] - g[i] for i in group}
      m = {i: 1 / (p[i] * (1 + lam * p[i])) for i in group}
      gap = r * sum(np.sum(g[i] * (d[i] / p[i] + mu[i] * w[i])) for i in group)
      num = gap - sum(np.sum(mu[i] * w[i] * delta[i]) for i in group) - sum(
          np.sum(delta[i] * m[i] * (g[i] + lam * p[i] * d[i])) for i in group)
      den = sum(np.sum(delta[i] * m[i] * delta[i]) for i in group)
      beta = np.clip(num / den, beta_min, beta_max) if den > 0 else max(0.0, beta_min)
      if t == 1:
        beta = beta_max
      if restart is not None:
        if beta < restart and t > 1:
          for i in group:
            d[i] = np.zeros_like(d[i])
            p[i] = p[i] / c * (1 - beta_max)
          prod[k] = 1.0
        beta = beta_max
      prod[k] *= beta
      for i in group:
        new_d[i] = ((1 - beta) * g[i] + (lam * p[i] + beta) * d[i]) / (1 + lam * p[i])
        new_w[i] = w[i] - lr(t - 1) * (new_d[i] / p[i] + mu[i] * w[i])
    d, w = new_d, new_w
    out.append(w)
  return out


def _warmup(base, steps=30):
  return lambda k: base * min(1.0, (k + 1) / steps)


def _jax_warmup(base, steps=30):
  return lambda k: base * jnp.minimum(1.0, (jnp.asarray(k, jnp.result_type(float)) + 1) / steps)


@pytest.mark.parametrize("granularity", ["global", "per_tensor"])
@pytest.mark.parametrize("variant", ["plain", "clip", "restart", "no_ratio"])
def test_am_sgd_matches_reference(problem, granularity, variant):
  w0, grad_fn = problem
  kw = dict(lam=0.1, beta_max=0.9, wd=0.01, granularity=granularity)
  extra = {"clip": dict(beta_min=0.3), "restart": dict(restart=0.5),
           "no_ratio": dict(ratio=False)}.get(variant, {})
  ref, betas = am_sgd_reference(w0, grad_fn, STEPS, lr=_warmup(0.05), **kw, **extra)
  opt = oa.am_sgd(_jax_warmup(0.05), 0.1, 0.9, weight_decay=0.01, granularity=granularity,
                  beta_min=extra.get("beta_min", 0.0), restart_threshold=extra.get("restart"),
                  lr_ratio=extra.get("ratio", True))
  assert max_abs_diff(run_optax(opt, w0, grad_fn, STEPS), ref) <= TOL
  flat = np.concatenate(betas)
  if variant == "plain":  # the test exercises both clips and the interior
    assert (flat == 0).any() or (flat < 0.9).any()
    assert (flat > 0).any()


@pytest.mark.parametrize("granularity", ["global", "per_tensor"])
@pytest.mark.parametrize("variant", ["plain", "clip", "restart"])
def test_am_adamw_matches_reference(problem, granularity, variant):
  w0, grad_fn = problem
  extra = {"clip": dict(beta_min=0.3), "restart": dict(restart=0.5)}.get(variant, {})
  ref = am_adamw_reference(w0, grad_fn, STEPS, lr=_warmup(0.01), b2=0.999, eps=1e-8, lam=0.1,
                           beta_max=0.9, wd=0.1, decay_mask=[True, False],
                           granularity=granularity, **extra)
  opt = oa.am_adamw(_jax_warmup(0.01), 0.999, 1e-8, 0.1, 0.9, weight_decay=0.1,
                    mask=[True, False], granularity=granularity,
                    beta_min=extra.get("beta_min", 0.0), restart_threshold=extra.get("restart"))
  assert max_abs_diff(run_optax(opt, w0, grad_fn, STEPS), ref) <= TOL


def _jax_float(count):
  return jnp.asarray(count, jnp.result_type(float))


def test_am_adamw_with_interior_beta_and_firing_restarts():
  """A problem where the closed-form beta is strictly inside (0, beta_max) on most steps (the
  iterates oscillate around the minimum: lr about 0.5, little noise), so every term of the beta
  formula matters, and where Restart fires; both frequencies asserted, both runs against the
  reference. The learning rate decays every step, so the gap's lr_{t-1}/lr_t factor is not 1."""
  from references import noisy_quadratic  # pylint: disable=import-outside-toplevel
  w0, grad_fn = noisy_quadratic(STEPS, noise_scale=0.01)
  common = dict(b2=0.999, eps=1e-8, lam=0.1, beta_max=0.9, wd=0.1, decay_mask=[True, False])
  record = lambda p, s: ([np.asarray(x) for x in p],  # noqa: E731
                         [float(b) for b in jax.tree.leaves(s[0].beta)], int(s[0].restarts))
  for restart in (None, 0.7):
    ref = am_adamw_reference(w0, grad_fn, STEPS, lr=lambda k: 0.5 * 0.997 ** k, restart=restart,
                             **common)
    opt = oa.am_adamw(lambda k: 0.5 * 0.997 ** _jax_float(k), 0.999, 1e-8, 0.1, 0.9,
                      weight_decay=0.1, mask=[True, False], restart_threshold=restart)
    ours = run_optax(opt, w0, grad_fn, STEPS, record=record)
    assert max_abs_diff([o[0] for o in ours], ref) <= TOL, restart
    if restart is None:
      betas = np.array([o[1] for o in ours[1:]])
      assert np.mean((betas > 1e-6) & (betas < 0.9 - 1e-6)) > 0.5
    else:
      assert ours[-1][2] >= 10, ours[-1][2]  # restarts fired (22 times)


def test_am_adamw_first_step_is_adamw_first_step():
  params = {"w": jnp.array([1.0, -2.0, 0.5])}
  g = {"w": jnp.array([0.3, -0.1, 2.0])}
  ours, _ = oa.am_adamw(1e-2, lam=0.0).update(g, oa.am_adamw(1e-2, lam=0.0).init(params), params)
  theirs, _ = optax.adamw(1e-2, b1=0.9, weight_decay=0.0).update(
      g, optax.adamw(1e-2, weight_decay=0.0).init(params), params)
  np.testing.assert_allclose(ours["w"], theirs["w"], rtol=1e-6)


def test_granularity_single_tensor_equal_several_differ(problem):
  w0, grad_fn = problem
  one = [w0[0]]
  one_grad = lambda t, w: grad_fn(t, w + [w0[1]])[:1]  # noqa: E731
  runs = {gr: run_optax(oa.am_sgd(0.05, granularity=gr), one, one_grad, 50)
          for gr in ("global", "per_tensor")}
  assert max_abs_diff(runs["global"], runs["per_tensor"]) <= TOL
  runs = {gr: run_optax(oa.am_sgd(0.05, granularity=gr), w0, grad_fn, 50)
          for gr in ("global", "per_tensor")}
  assert max_abs_diff(runs["global"], runs["per_tensor"]) > 1e-4


def test_degenerate_d_equals_g_gives_beta_zero_without_nan():
  opt = oa.adaptive_memory_momentum()
  params = {"w": jnp.ones(3), "b": jnp.zeros(2)}
  g = jax.tree.map(lambda x: jnp.full_like(x, 0.5), params)
  state = opt.init(params)
  for _ in range(3):  # constant gradient: d_t == g_t every step
    direction, state = opt.update(g, state)
  assert float(state.beta) == 0.0
  np.testing.assert_allclose(direction["w"], 0.5)
  assert "am_beta" in oa.get_diagnostics(state)


def test_per_tensor_betas_in_diagnostics():
  params = {"a": jnp.ones(3), "b": jnp.ones(2)}
  opt = oa.am_adamw(1e-3)
  state = opt.init(params)
  _, state = opt.update(jax.tree.map(lambda x: x * 0.1, params), state, params)
  diag = oa.get_diagnostics(state)
  assert {"am_beta/a", "am_beta/b", "am_restarts"} <= set(diag)
  assert float(diag["am_beta/a"]) == pytest.approx(0.9)


def test_state_bytes_match_adamw_and_sgd():
  params = {"w": jnp.ones((8, 8))}
  nbytes = lambda s: sum(x.nbytes for x in jax.tree.leaves(s) if x.ndim)  # noqa: E731
  assert nbytes(oa.am_adamw(1e-3).init(params)) == nbytes(optax.adamw(1e-3).init(params))
  assert nbytes(oa.am_sgd(1e-3).init(params)) == 4 * 64


def test_global_beta_under_sharding_matches_unsharded():
  assert sharded_vs_unsharded('oa.am_sgd(0.01, granularity="global")') <= 1e-6


@pytest.mark.parametrize("call,arg", [
    (lambda: oa.am_sgd(0.1, lam=-0.1), "lam"),
    (lambda: oa.am_sgd(0.1, beta_max=1.0), "beta_max"),
    (lambda: oa.am_sgd(0.1, beta_max=-0.1), "beta_max"),
    (lambda: oa.am_adamw(0.1, beta_min=0.95), "beta_min"),
    (lambda: oa.am_adamw(0.1, granularity="layer"), "granularity"),
    (lambda: oa.am_adamw(0.1, b2=1.0), "b2"),
    (lambda: oa.am_adamw(-0.1), "learning_rate"),
    (lambda: oa.adaptive_memory_momentum(gap="exact"), "gap"),
    (lambda: oa.adaptive_memory_momentum(gap="second_order"), "gap"),
    (lambda: oa.am_sgd(0.1, restart_threshold=1.5), "restart_threshold"),
])
def test_bad_input(call, arg):
  with pytest.raises(ValueError, match=arg):
    call()
