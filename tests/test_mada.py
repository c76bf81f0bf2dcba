"""MADA, AVGrad and the hypergradient wrapper vs NumPy float64 references (docs/mada.md)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import REFERENCE_STEPS, REFERENCE_TOL, max_abs_diff, run_optax, sharded_vs_unsharded

import optax_accel as oa

STEPS, TOL = REFERENCE_STEPS, REFERENCE_TOL


def mada_reference(w0, grad_fn, steps, *, lr, wd, b1, b2, b3, rho, c, gamma, eps=1e-8,
                   lion_b1=0.95, lion_b2=0.98, n_init_g_squared=True,
                   lion_uses_updated_momentum=True, bias_correct_n=False):
  """docs/mada.md §1 in the code's order, with decoupled decay x <- x - lr (U + wd x)."""
  zeros = lambda: [np.zeros_like(x) for x in w0]  # noqa: E731
  m, n, g_prev, ml = zeros(), zeros(), zeros(), zeros()
  v = [np.full_like(x, 1e-15) for x in w0]
  vbar = [np.full_like(x, 1e-15) for x in w0]
  w = [x.copy() for x in w0]
  out = []
  for t in range(1, steps + 1):
    g = grad_fn(t, w)
    new_w = []
    for i, gi in enumerate(g):
      diff = gi - g_prev[i]
      g_hat = gi + b3 * diff
      sign = np.sign(g_hat**2 - v[i])
      g_tilde2 = c * g_hat**2 + (1 - c) * (v[i] + g_hat**2 * sign)
      m[i] = b1 * m[i] + (1 - b1) * gi
      v[i] = b2 * v[i] + (1 - b2) * g_tilde2
      n_prev = n[i] + (gi * gi if (t == 1 and n_init_g_squared) else 0.0)
      n[i] = b3 * n_prev + (1 - b3) * diff
      g_prev[i] = gi
      if lion_uses_updated_momentum:
        ml[i] = lion_b2 * ml[i] + (1 - lion_b2) * gi
        u = lion_b1 * ml[i] + (1 - lion_b1) * gi
      else:
        u = lion_b1 * ml[i] + (1 - lion_b1) * gi
        ml[i] = lion_b2 * ml[i] + (1 - lion_b2) * gi
      vbar[i] = (v[i] + (t - 1) * vbar[i]) / t
      m_hat = m[i] / (1 - b1**t)
      v_hat = (rho * v[i] + (1 - rho) * vbar[i]) / (1 - b2**t)
      adan = n[i] / (1 - b3**t) if bias_correct_n else n[i]
      big_a = m_hat + b3 * adan
      update = gamma * big_a / (np.sqrt(v_hat) + eps) + (1 - gamma) * np.sign(u)
      new_w.append(w[i] - lr * (update + wd * w[i]))
    w = new_w
    out.append(w)
  return out


VERTICES = {
    "adam": dict(b1=0.9, b2=0.999, b3=0.0, rho=1.0, c=1.0, gamma=1.0),
    "avgrad": dict(b1=0.9, b2=0.999, b3=0.0, rho=0.0, c=1.0, gamma=1.0),
    "yogi": dict(b1=0.9, b2=0.99, b3=0.0, rho=1.0, c=0.0, gamma=1.0),
    "adan": dict(b1=0.9, b2=0.99, b3=0.5, rho=1.0, c=1.0, gamma=1.0),
    "lion": dict(b1=0.9, b2=0.99, b3=0.0, rho=1.0, c=1.0, gamma=0.0),
    "interior": dict(b1=0.8, b2=0.95, b3=0.3, rho=0.4, c=0.7, gamma=0.6),
}


@pytest.mark.parametrize("name", sorted(VERTICES))
def test_mada_matches_reference(problem, name):
  w0, grad_fn = problem
  coeffs = VERTICES[name]
  ref = mada_reference(w0, grad_fn, STEPS, lr=1e-2, wd=0.01, **coeffs)
  opt = oa.mada_optimizer(1e-2, weight_decay=0.01, **coeffs)
  assert max_abs_diff(run_optax(opt, w0, grad_fn, STEPS), ref) <= TOL


@pytest.mark.parametrize("switches", [
    dict(n_init_g_squared=False), dict(lion_uses_updated_momentum=False),
    dict(bias_correct_n=True)])
def test_mada_quirk_switches(problem, switches):
  w0, grad_fn = problem
  coeffs = VERTICES["interior"]
  ref = mada_reference(w0, grad_fn, STEPS, lr=1e-2, wd=0.0, **coeffs, **switches)
  opt = optax.chain(oa.scale_by_mada(**coeffs, **switches), optax.scale(-1e-2))
  assert max_abs_diff(run_optax(opt, w0, grad_fn, STEPS), ref) <= TOL


def test_adam_vertex_equals_optax_adam(problem):
  w0, grad_fn = problem
  ours = run_optax(optax.chain(oa.scale_by_mada(0.9, 0.999), optax.scale(-1e-2)), w0, grad_fn,
                   STEPS)
  theirs = run_optax(optax.chain(optax.scale_by_adam(0.9, 0.999, eps=1e-8), optax.scale(-1e-2)),
                     w0, grad_fn, STEPS)
  assert max_abs_diff(ours, theirs) <= TOL  # v_0 = 1e-15 vs 0 is far below this


def test_true_lion_ordering_equals_optax_lion(problem):
  w0, grad_fn = problem
  ours = run_optax(optax.chain(oa.scale_by_mada(gamma=0.0, lion_uses_updated_momentum=False),
                               optax.scale(-1e-3)), w0, grad_fn, STEPS)
  theirs = run_optax(optax.chain(optax.scale_by_lion(0.95, 0.98), optax.scale(-1e-3)), w0,
                     grad_fn, STEPS)
  assert max_abs_diff(ours, theirs) <= TOL


def test_avgrad_equals_mada_at_rho_zero_with_all_buffers(problem):
  """scale_by_avgrad drops the unused buffers; dynamic coefficients keep them: same iterates."""
  w0, grad_fn = problem
  dynamic = {k: jnp.asarray(v) for k, v in VERTICES["avgrad"].items()}
  with jax.enable_x64(True):
    full = oa.scale_by_mada(**dynamic)
    assert full.init([jnp.zeros(3)]).lion_mu is not None
  ours = run_optax(optax.chain(oa.scale_by_avgrad(), optax.scale(-1e-2)), w0, grad_fn, STEPS)
  ref = mada_reference(w0, grad_fn, STEPS, lr=1e-2, wd=0.0, **VERTICES["avgrad"])
  assert max_abs_diff(ours, ref) <= TOL
  state = oa.scale_by_avgrad().init([jnp.zeros((4, 4))])
  assert sum(x.nbytes for x in jax.tree.leaves(state) if x.ndim) == 3 * 64


# ----------------------------------------------------------------------------------------------
# Hypergradients.


def _quadratic(dim=6, seed=0):
  rng = np.random.default_rng(seed)
  curvature = jnp.asarray(rng.uniform(0.2, 2.0, size=dim))
  centre = jnp.asarray(rng.normal(size=dim))
  return lambda x: 0.5 * jnp.sum(curvature * (x - centre) ** 2), jnp.asarray(rng.normal(size=dim))


def _history(opt, loss, x0, steps):
  """Params and states before each step: [(x_{t-1}, state_{t-1})] for t = 1..steps+1."""
  x, state, out = x0, opt.init(x0), []
  for _ in range(steps):
    out.append((x, state))
    updates, state = opt.update(jax.grad(loss)(x), state, x)
    x = optax.apply_updates(x, updates)
  out.append((x, state))
  return out


LR = lambda count: 1e-2 * 0.7 ** count  # noqa: E731  a decaying schedule


@pytest.mark.parametrize("case", ["mada", "mada_closed_form", "adam", "hyperadam",
                                  "mada_closed_form_late"])
def test_hypergradient_equals_autodiff_of_unrolled_step(case):
  """h_t = d f(x_{t-1}(q)) / dq, x_{t-1} = x_{t-2} + Delta(q; g_{t-1}, state_{t-2}), under a
  decaying learning rate (so that Delta must use lr_{t-1}, the rate of the step it came from)."""
  with jax.enable_x64(True):
    loss, x0 = _quadratic()
    if case == "mada":
      coeffs = VERTICES["interior"]
      opt = oa.hypergradient_wrapper(oa.mada_optimizer, tuple(coeffs), 1e-3,
                                     hypergrad_clip=None)(LR, **coeffs)
      inner = lambda q: oa.mada_optimizer(LR, **q)  # noqa: E731
    elif case.startswith("mada_closed_form"):
      coeffs = VERTICES["interior"]
      opt = oa.hypergradient_wrapper(oa.mada_optimizer, tuple(coeffs), 1e-3, hypergrad_clip=None,
                                     tangents="closed_form")(
                                         LR, closed_form_hypergradients=True, **coeffs)
      inner = lambda q: oa.mada_optimizer(LR, closed_form_hypergradients=True, **q)  # noqa
    elif case == "hyperadam":  # closed form at the Adam vertex, with pruned buffers
      opt = oa.hyperadam(LR, b1=0.9, b2=0.99)
      inner = lambda q: oa.mada_optimizer(  # noqa: E731
          LR, b3=0.0, rho=1.0, c=1.0, gamma=1.0, closed_form_hypergradients=True, **q)
    else:
      opt = oa.hypergradient_wrapper(optax.adam, ("b1", "b2"), 1e-3, hypergrad_clip=None)(
          LR, b1=0.9, b2=0.99)
      inner = lambda q: optax.adam(LR, **q)  # noqa: E731
    # "late": after 40 steps g^2 < v in some coordinates, so Yogi's sign(g_hat^2 - v) takes both
    # values (early on it is +1 everywhere and the sign's branch of the closed form goes untested).
    steps = 40 if case.endswith("late") else 6
    history = _history(opt, loss, x0, steps)
    if case.endswith("late"):
      inner_state = history[steps - 1][1].inner_state[0]
      g = jax.grad(loss)(history[steps - 1][0])
      g_hat = g + coeffs["b3"] * (g - inner_state.prev_grad)
      assert set(np.sign(np.asarray(g_hat**2 - inner_state.nu)).tolist()) == {-1.0, 1.0}
    for t in ((2, 3, 5, 6) if steps == 6 else (steps - 1, steps)):
      # t = 2: the first hypergradient (of step 1, bias corrections at t = 1)
      x_prev2, state_prev2 = history[t - 2]  # before step t-1
      q = history[t - 1][1].hyperparams  # the q step t-1 used (updated within that step)

      def unrolled(q_):
        updates, _ = inner(q_).update(jax.grad(loss)(x_prev2), state_prev2.inner_state, x_prev2)
        return loss(optax.apply_updates(x_prev2, updates))

      expected = jax.grad(unrolled)(q)
      got = history[t][1].hypergradients
      for name in q:
        np.testing.assert_allclose(got[name], expected[name], rtol=1e-6, atol=1e-12)
    if case == "mada_closed_form":  # MADA's 6 buffers + 2 for hypergradients, no tangents
      state = history[-1][1]
      assert state.tangents == {}
      sized = [x for x in jax.tree.leaves(state) if x.shape == x0.shape]
      assert len(sized) == 8


def mada_partials(g, g_prev, m_prev, v_prev, n_prev, vbar_prev, ml_prev, t, q, eps=1e-8):
  """docs/mada.md §3 closed forms of dU_t/dq (vbar_t held fixed), NumPy, one tensor."""
  b1, b2, b3, rho, c, gamma = (q[k] for k in ("b1", "b2", "b3", "rho", "c", "gamma"))
  d = g - g_prev
  g_hat = g + b3 * d
  s = np.sign(g_hat**2 - v_prev)
  g_tilde2 = c * g_hat**2 + (1 - c) * (v_prev + g_hat**2 * s)
  m = b1 * m_prev + (1 - b1) * g
  v = b2 * v_prev + (1 - b2) * g_tilde2
  n = b3 * n_prev + (1 - b3) * d
  vbar = (v + (t - 1) * vbar_prev) / t
  ml = 0.98 * ml_prev + 0.02 * g
  u = 0.95 * ml + 0.05 * g
  bc1, bc2 = 1 - b1**t, 1 - b2**t
  big_p = rho * v + (1 - rho) * vbar
  v_hat = big_p / bc2
  big_a = m / bc1 + b3 * n
  big_d = np.sqrt(v_hat) + eps
  u_a = gamma / big_d
  u_v = -gamma * big_a / (big_d**2 * 2 * np.sqrt(v_hat))
  return {
      "gamma": big_a / big_d - np.sign(u),
      "b1": u_a * ((m_prev - g) / bc1 + m * t * b1**(t - 1) / bc1**2),
      "b2": u_v * (rho * (v_prev - g_tilde2) / bc2 + big_p * t * b2**(t - 1) / bc2**2),
      "b3": u_a * (n + b3 * (n_prev - d)) + u_v * rho * (1 - b2) / bc2 * 2 * g_hat * d * (
          c + (1 - c) * s),
      "rho": u_v * (v - vbar) / bc2,
      "c": u_v * rho * (1 - b2) / bc2 * (g_hat**2 - v_prev - g_hat**2 * s),
  }


def test_hypergradient_equals_closed_forms():
  with jax.enable_x64(True):
    loss, x0 = _quadratic(seed=1)
    coeffs = VERTICES["interior"]
    lr = 1e-2
    opt = oa.hypergradient_wrapper(oa.mada_optimizer, tuple(coeffs), 1e-3,
                                   hypergrad_clip=None)(lr, **coeffs)
    history = _history(opt, loss, x0, 5)
    t = 4  # the update of step t, differentiated, contracted with g_{t+1}
    x_before, state_before = history[t - 1]
    inner = state_before.inner_state[0]  # ScaleByMadaState before step t
    g = np.asarray(jax.grad(loss)(x_before))
    partials = mada_partials(
        g, np.asarray(inner.prev_grad), np.asarray(inner.mu), np.asarray(inner.nu),
        np.asarray(inner.adan), np.asarray(inner.nu_mean), np.asarray(inner.lion_mu), t,
        {k: float(v) for k, v in history[t][1].hyperparams.items()})
    g_next = np.asarray(jax.grad(loss)(history[t][0]))
    got = history[t + 1][1].hypergradients
    for name, partial in partials.items():
      np.testing.assert_allclose(got[name], -lr * np.sum(g_next * partial), rtol=1e-6,
                                 atol=1e-14)


def test_baydin_sgd_hd_reproduced_exactly(problem):
  """alpha_t = alpha_{t-1} + beta g_t . g_{t-1}, then x <- x - alpha_t g_t (Baydin et al.)."""
  w0, grad_fn = problem
  beta, alpha0 = 1e-3, 0.01
  alpha, w, g_prev, ref = alpha0, [x.copy() for x in w0], None, []
  for t in range(1, STEPS + 1):
    g = grad_fn(t, w)
    if g_prev is not None:
      alpha = alpha + beta * sum(np.sum(a * b) for a, b in zip(g, g_prev))
    w = [x - alpha * gi for x, gi in zip(w, g)]
    g_prev = g
    ref.append((w, alpha))
  opt = oa.hypergradient_wrapper(optax.sgd, ("learning_rate",), beta, hypergrad_clip=None)(alpha0)
  ours = run_optax(opt, w0, grad_fn, STEPS,
                   record=lambda p, s: ([np.asarray(x) for x in p],
                                        float(s.hyperparams["learning_rate"])))
  assert max_abs_diff(ours, ref) <= TOL


def test_projection_freeze_and_nan():
  loss, x0 = _quadratic()
  opt = oa.hypergradient_wrapper(optax.adam, ("b1", "b2"), 10.0, domain={
      "b1": (0.5, 0.95), "b2": (0.9, 0.999)}, freeze_steps=3)(1e-2, b1=0.9, b2=0.99)
  x, state = x0, opt.init(x0)
  for step in range(20):
    updates, state = opt.update(jax.grad(loss)(x), state, x)
    x = optax.apply_updates(x, updates)
    q = state.hyperparams  # float32: compare with the float32 bounds
    assert np.float32(0.5) <= q["b1"] <= np.float32(0.95)
    assert np.float32(0.9) <= q["b2"] <= np.float32(0.999)
    if step < 3:
      assert float(q["b1"]) == pytest.approx(0.9) and float(q["b2"]) == pytest.approx(0.99)
    elif step == 3:  # the first step after freeze_steps = 3 updates already moves q
      assert float(q["b1"]) != pytest.approx(0.9)
  assert float(state.hyperparams["b1"]) != pytest.approx(0.9)  # it moved after the freeze
  before = state
  _, after = opt.update(jnp.full_like(x0, jnp.nan), state, x)
  for name in ("b1", "b2"):
    assert float(after.hypergradients[name]) == 0.0  # logged as 0, not NaN
    assert float(after.hyperparams[name]) == float(before.hyperparams[name])
  assert int(before.nonfinite_skips) == 0 and int(after.nonfinite_skips) == 1
  assert oa.get_diagnostics(after)["hypergrad/nonfinite_skips"] == 1


def test_frozen_gives_the_learned_coefficients():
  loss, x0 = _quadratic()
  opt = oa.mada(1e-2)
  x, state = x0, opt.init(x0)
  for _ in range(5):
    updates, state = opt.update(jax.grad(loss)(x), state, x)
    x = optax.apply_updates(x, updates)
  nested = optax.chain(optax.clip_by_global_norm(1.0), opt).init(x0)
  assert oa.frozen(nested)["b2"] == pytest.approx(0.95)  # found inside a chain
  coeffs = oa.frozen(state)
  assert set(coeffs) == {"b1", "b2", "b3", "rho", "c", "gamma"}
  assert coeffs["b1"] == pytest.approx(float(state.hyperparams["b1"]))
  oa.scale_by_mada(**coeffs)  # MADA-FS re-runs them as a fixed optimizer
  diag = oa.get_diagnostics(state)
  assert {"learned/b1", "learned/rho", "hypergrad/rho"} <= set(diag)
  injected = oa.get_diagnostics(optax.inject_hyperparams(oa.mada, static_args="freeze_steps")(
      learning_rate=0.01, b1=0.9).init(x0))
  assert {"b1", "learned/b1"} <= set(injected) and "b1_1" not in injected  # no name collision
  with pytest.raises(ValueError, match="HypergradientState"):
    oa.frozen(optax.adam(1e-3).init(x0))


def test_mada_under_sharding_matches_unsharded():
  """The hypergradient is a global reduction: sharded parameters give the same iterates."""
  assert sharded_vs_unsharded("oa.mada(0.01)") <= 1e-6


def test_under_scan_and_jit():
  loss, x0 = _quadratic()
  opt = oa.mada(1e-2)

  def step(carry, _):
    x, state = carry
    updates, state = opt.update(jax.grad(loss)(x), state, x)
    return (optax.apply_updates(x, updates), state), state.hyperparams["rho"]

  (_, state), rhos = jax.jit(lambda c: jax.lax.scan(step, c, length=50))((x0, opt.init(x0)))
  assert rhos.shape == (50,) and np.all(np.isfinite(rhos))
  assert float(state.hyperparams["rho"]) <= 1.0


@pytest.mark.parametrize("call,arg", [
    (lambda: oa.hypergradient_wrapper(optax.sgd, ("lr",), 1e-3)(0.1), "lr"),
    (lambda: oa.hypergradient_wrapper(optax.adam, ("b1",), 1e-3, domain={"b1": (0.9, 0.5)})(
        1e-3), "b1"),
    (lambda: oa.hypergradient_wrapper(optax.adam, ("b1",), 1e-3, domain={"b1": (0.0, 0.5)})(
        1e-3, b1=0.9), "b1"),
    (lambda: oa.hypergradient_wrapper(optax.adam, ("b1",), -1e-3)(1e-3), "hyper_lr"),
    (lambda: oa.hypergradient_wrapper(optax.adam, ("b1",), {"b1": -1.0})(1e-3), "hyper_lr"),
    (lambda: oa.hypergradient_wrapper(optax.adam, ("b1",), 1e-3, freeze_steps=-1)(1e-3),
     "freeze_steps"),
    (lambda: oa.hypergradient_wrapper(optax.adam, ("b1",), 1e-3, static_args=("b1",)), "b1"),
    (lambda: oa.hypergradient_wrapper(optax.adam, ("b1",), 1e-3, tangents="closed_form")(1e-3),
     "closed_form"),
    (lambda: oa.hypergradient_wrapper(optax.adam, ("b1",), 1e-3, tangents="reverse"), "tangents"),
    (lambda: oa.hypergradient_wrapper(optax.adam, (), 1e-3), "learnable"),
    (lambda: oa.mada(1e-3, b1=0.995), "b1"),
    (lambda: oa.mada(1e-3, rho=1.5), "rho"),
    (lambda: oa.mada(-1e-3), "learning_rate"),
    (lambda: oa.scale_by_mada(c=-0.5), "c"),
    (lambda: oa.avgrad(1e-3, b2=1.0), "b2"),
    (lambda: oa.hyperadam(1e-3, b1=0.999), "b1"),
])
def test_bad_input(call, arg):
  with pytest.raises(ValueError, match=arg):
    call()


@pytest.mark.parametrize("name", ["mada", "hyperadam"])
def test_hypergradient_is_formed_from_the_unclipped_gradient(name):
  """``clip_norm`` clips what the update sees, not the hypergradient (the official code). With
  the hyper-step off both runs share the state after step 2, and h_3 = -lr <g_3, dU_2/dq> is
  linear in g_3: from the raw g_3 it is ||g_3|| / clip times the one from the clipped g_3.
  (At step 2 the b1 partial is 0: the bias-corrected m_1 does not depend on b1.)"""
  factory = getattr(oa, name)
  clip = 0.5
  x = jnp.linspace(-1.0, 1.0, 6)
  grads = (3.0 * jnp.cos(3 * x) + 1.0, 4.0 * jnp.sin(2 * x) - 2.0, 5.0 * x ** 2 - 1.5)
  inside = factory(1e-2, hyper_lr=0.0, clip_norm=clip)
  outside = optax.chain(optax.clip_by_global_norm(clip), factory(1e-2, hyper_lr=0.0))
  h = {}
  for label, opt in (("inside", inside), ("outside", outside)):
    state = opt.init(x)
    for g in grads:
      _, state = opt.update(g, state, x)
    h[label] = {k: float(v) for k, v in oa.get_diagnostics(state).items()
                if k.startswith("hypergrad/") and k != "hypergrad/nonfinite_skips"}
  ratio = float(jnp.linalg.norm(grads[-1])) / clip
  assert ratio > 5
  for key, value in h["outside"].items():
    assert value != 0.0, key
    assert h["inside"][key] == pytest.approx(ratio * value, rel=1e-5), key


def test_clip_norm_must_be_positive():
  with pytest.raises(ValueError, match="clip_norm"):
    oa.mada(1e-3, clip_norm=0.0)


def test_mada_defaults_are_the_official_owt_settings():
  """Hyper-learning rates, boxes and the per-coefficient clip |h| <= 10 of the official code's
  GPT-2/OpenWebText runs (docs/mada.md §4), pinned by value and by one hyper-step."""
  assert oa.MADA_HYPER_LR == {"b1": 5e-4, "b2": 5e-4, "b3": 0.1, "rho": 0.1, "c": 0.1,
                              "gamma": 0.1}
  assert oa.MADA_DOMAIN == {"b1": (0.01, 0.99), "b2": (0.501, 0.99), "b3": (0.0, 0.99),
                            "rho": (0.0, 1.0), "c": (0.0, 1.0), "gamma": (0.0, 1.0)}
  opt = oa.mada(1.0, b1=0.5, b2=0.8, b3=0.5, rho=0.5, c=0.5, gamma=0.5)
  x = jnp.linspace(-1.0, 1.0, 8)
  grads = [1e3 * jnp.sin(3.0 * x + k) for k in range(3)]
  state = opt.init(x)
  for g in grads[:2]:
    _, state = opt.update(g, state, x)
  before = {k: float(v) for k, v in state.hyperparams.items()}
  _, after = opt.update(grads[2], state, x)
  for name, rate in oa.MADA_HYPER_LR.items():
    h = float(after.hypergradients[name])
    clipped = h * min(1.0, 10.0 / (abs(h) + 1e-6))
    lo, hi = oa.MADA_DOMAIN[name]
    expected = min(max(before[name] - rate * clipped, lo), hi)
    assert float(after.hyperparams[name]) == pytest.approx(expected, rel=1e-6, abs=1e-7), name
  assert sum(abs(float(h)) > 10 for h in after.hypergradients.values()) >= 2  # the clip acts
