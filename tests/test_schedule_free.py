"""Schedule-Free: reference z/x/y recursion, optax.contrib, the accelerated-SGD theorem, and the
four defects of optax.contrib.schedule_free (docs/schedule_free.md §3)."""
from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import REFERENCE_STEPS, REFERENCE_TOL, max_abs_diff, run_optax

import optax_accel as oa

STEPS, TOL = REFERENCE_STEPS, REFERENCE_TOL


def _step(count):
  """1-based step as a float of the default precision (float64 under x64)."""
  return jnp.asarray(count, jnp.result_type(float)) + 1


def sf_reference(w0, grad_fn, steps, *, lr, b1, warmup, r, p, wd, adam_b2=None, eps=1e-8):
  """PyTorch reference form (z, x, y), t 1-indexed; returns [(y_t, x_t)] after each step.

  ``b1`` and ``lr`` may be functions of the 1-based step.
  """
  z = [x.copy() for x in w0]
  x = [v.copy() for v in w0]
  y = [v.copy() for v in w0]
  v = [np.zeros_like(q) for q in w0]
  lr_max, weight_sum, out = 0.0, 0.0, []
  for t in range(1, steps + 1):
    beta = b1(t) if callable(b1) else b1
    gamma = lr(t) if callable(lr) else lr
    gamma = gamma * min(1.0, t / warmup) if warmup else gamma
    g = grad_fn(t, y)
    if adam_b2 is None:
      u = [gi + wd * yi for gi, yi in zip(g, y)]
    else:
      v = [adam_b2 * vi + (1 - adam_b2) * gi * gi for vi, gi in zip(v, g)]
      u = [gi / (np.sqrt(vi / (1 - adam_b2**t)) + eps) + wd * yi for gi, vi, yi in zip(g, v, y)]
    z = [zi - gamma * ui for zi, ui in zip(z, u)]
    lr_max = max(lr_max, gamma)
    weight = t**r * lr_max**p
    weight_sum += weight
    c = weight / weight_sum
    x = [(1 - c) * xi + c * zi for xi, zi in zip(x, z)]
    y = [(1 - beta) * zi + beta * xi for zi, xi in zip(z, x)]
    out.append((y, x))
  return out


def _record_y_and_x(params, state):
  x = oa.schedule_free_eval_params(state, params)
  return ([np.asarray(p) for p in params], [np.asarray(q) for q in x])


CASES = {
    "sgd": (dict(lr=0.05, b1=0.9, warmup=20, r=0.5, p=2.0, wd=0.01),
            lambda: oa.schedule_free_sgd(0.05, 0.9, warmup_steps=20, weight_decay=0.01, r=0.5)),
    "adamw": (dict(lr=0.02, b1=0.9, warmup=20, r=0.5, p=2.0, wd=0.01, adam_b2=0.999),
              lambda: oa.schedule_free_adamw(0.02, 0.9, 0.999, warmup_steps=20,
                                             weight_decay=0.01, r=0.5)),
}


def _rise_and_decay(step, xp=jnp):
  """A learning rate that rises for 20 steps and then decays (its running max != its value)."""
  return 0.05 * xp.minimum(1.0, step / 20) * 0.98 ** xp.maximum(step - 20, 0)


CASES["sgd_decaying_lr"] = (
    dict(lr=lambda t, xp=np: _rise_and_decay(t, xp), b1=0.9, warmup=0, r=0.5, p=2.0, wd=0.01),
    lambda: oa.schedule_free_sgd(lambda count: _rise_and_decay(_step(count)), 0.9,
                                 weight_decay=0.01, r=0.5))


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_reference_recursion(problem, case):
  w0, grad_fn = problem
  hyper, make = CASES[case]
  ref = sf_reference(w0, grad_fn, STEPS, **hyper)
  ours = run_optax(make(), w0, grad_fn, STEPS, record=_record_y_and_x)
  assert max_abs_diff(ours, ref) <= TOL


def test_scheduled_b1_eval_params_exact(problem):
  """Defect 3: with b1 injected and scheduled, eval params use the b1 actually applied."""
  w0, grad_fn = problem
  b1_of_step = lambda t: 0.5 + 0.4 * min(1.0, t / 100)  # noqa: E731
  ref = sf_reference(w0, grad_fn, STEPS, lr=0.05, b1=b1_of_step, warmup=0, r=0.0, p=2.0, wd=0.0)
  opt = optax.inject_hyperparams(oa.schedule_free_sgd, static_args=("warmup_steps",))(
      learning_rate=0.05, b1=lambda count: 0.5 + 0.4 * jnp.minimum(1.0, _step(count) / 100))
  ours = run_optax(opt, w0, grad_fn, STEPS, record=_record_y_and_x)
  assert max_abs_diff(ours, ref) <= TOL


@pytest.mark.parametrize("case", ["sgd", "adamw"])
def test_matches_optax_contrib(problem, case):
  w0, grad_fn = problem
  params = [jnp.asarray(x, jnp.float32) for x in w0]
  if case == "sgd":
    ours, theirs = oa.schedule_free_sgd(0.05, weight_decay=0.01), optax.contrib.schedule_free_sgd(
        0.05, weight_decay=0.01)
  else:
    ours = oa.schedule_free_adamw(0.01, weight_decay=0.01)
    theirs = optax.contrib.schedule_free_adamw(0.01, weight_decay=0.01)

  def run(opt):
    p, s = params, opt.init(params)
    for t in range(1, 51):
      u, s = opt.update([jnp.asarray(g, jnp.float32) for g in grad_fn(t, p)], s, p)
      p = optax.apply_updates(p, u)
    return p, optax.contrib.schedule_free_eval_params(
        optax.tree.get(s, "z") and s, p) if opt is theirs else oa.schedule_free_eval_params(s, p)

  (y1, x1), (y2, x2) = run(ours), run(theirs)
  assert max_abs_diff(y1, y2) <= 1e-6
  assert max_abs_diff(x1, x2) <= 1e-6


def _averaging_weights(lr, warmup, r, p, steps):
  """c_{t+1} computed at step t = 1..steps (index t), with c_1 := 1 at index 0."""
  c = np.ones(steps + 2)
  lr_max, weight_sum = 0.0, 0.0
  for t in range(1, steps + 1):
    gamma = lr(t) if callable(lr) else lr
    gamma = gamma * min(1.0, t / warmup) if warmup else gamma
    lr_max = max(lr_max, gamma)
    weight = t**r * lr_max**p
    weight_sum += weight
    c[t] = weight / weight_sum
  return c


@pytest.mark.parametrize("case", sorted(CASES))
def test_theorem_schedule_free_is_accelerated_sgd_plus_averaging(problem, case):
  """docs/schedule_free.md §2: y follows canonical accelerated SGD with beta_t = 1 - c_t, current weight
  (1 - b1) gamma_t, momentum weight b1 c_{t+1}; x is the rho-average of y. Every step, 1e-10."""
  w0, grad_fn = problem
  hyper, make = CASES[case]
  lr, b1, warmup, r, p, wd = (hyper[k] for k in ("lr", "b1", "warmup", "r", "p", "wd"))
  c = _averaging_weights(lr, warmup, r, p, STEPS)
  # Table index is the 0-based count k: step t = k + 1 uses c_t = c[k] (c_1 := 1), c_{t+1} = c[k+1].
  # NumPy tables, turned into jnp arrays inside the traced schedules (float64 there).
  c_t = np.concatenate([[1.0], c[1:STEPS + 1]])
  c_next = c[1:STEPS + 2]
  def gamma(k):
    value = lr(_step(k), jnp) if callable(lr) else lr
    return value * jnp.minimum(1.0, _step(k) / warmup) if warmup else value
  if "adam_b2" in hyper:
    precondition = optax.scale_by_rms(hyper["adam_b2"], 1e-8, eps_in_sqrt=False,
                                      bias_correction=True)
  else:
    precondition = optax.identity()
  accelerated = optax.chain(
      precondition, optax.add_decayed_weights(wd),  # u_t (decay at y)
      optax.scale_by_schedule(gamma),  # gamma_t u_t: M_t is in parameter units
      oa.scale_by_accelerated_momentum(beta=lambda k: 1.0 - jnp.asarray(c_t)[k], alpha=1.0 - b1,
                                       momentum_weight=lambda k: b1 * jnp.asarray(c_next)[k]),
      optax.scale(-1.0))

  averaged = {"x": [np.asarray(w) for w in w0]}  # x_t, carried between calls

  def record_with_average(params, state):
    k = int(state[3].count) - 1  # the canonical transform's count after this step
    rho = c_next[k] / (1 - b1 + b1 * c_next[k])
    x = [(1 - rho) * xi + rho * np.asarray(y) for xi, y in zip(averaged["x"], params)]
    averaged["x"] = x
    return ([np.asarray(y) for y in params], x)

  accel = run_optax(accelerated, w0, grad_fn, STEPS, record=record_with_average)
  sf = run_optax(make(), w0, grad_fn, STEPS, record=_record_y_and_x)
  per_step = [max_abs_diff(a, s) for a, s in zip(accel, sf)]
  assert max(per_step) <= TOL, max(per_step)


# ----------------------------------------------------------------------------------------------
# optax.contrib's defects (docs/schedule_free.md §3) are absent; schedule-free specifics of optax's tests.


def _params():
  return {"w": jnp.array([1.0, -2.0, 3.0]), "s": jnp.asarray(0.5)}


def test_eval_params_found_in_nested_chain_and_inject():
  params = _params()
  grads = jax.tree.map(lambda x: 0.3 * x + 0.1, params)
  plain = oa.schedule_free_adamw(0.1)
  nested = optax.chain(optax.clip_by_global_norm(100.0),
                       optax.inject_hyperparams(oa.schedule_free_adamw,
                                                static_args=("warmup_steps",))(0.1))
  results = []
  for opt in (plain, nested):
    p, s = params, opt.init(params)
    for _ in range(3):
      u, s = opt.update(grads, s, p)
      p = optax.apply_updates(p, u)
    results.append(oa.schedule_free_eval_params(s, p))
  # float32; inject_hyperparams stores hyperparameters as f32 arrays (optax uses rtol 1e-5 here).
  chex.assert_trees_all_close(results[0], results[1], rtol=1e-5)


def test_eval_params_under_masked_leave_other_leaves():
  params = _params()
  opt = optax.masked(oa.schedule_free_sgd(0.1), {"w": True, "s": False})
  state = opt.init(params)
  u, state = opt.update(jax.tree.map(jnp.ones_like, params), state, params)
  p = optax.apply_updates(params, u)
  x = oa.schedule_free_eval_params(state, p)
  np.testing.assert_allclose(x["s"], p["s"])
  assert not np.allclose(x["w"], params["w"])


def test_eval_params_without_schedule_free_state_raises():
  with pytest.raises(ValueError, match="ScheduleFreeState"):
    oa.schedule_free_eval_params(optax.adam(1e-3).init(_params()), _params())


def test_warmup_first_step_is_not_a_noop():
  params = _params()
  opt = oa.schedule_free_adamw(1.0, warmup_steps=10)
  updates, state = opt.update(jax.tree.map(jnp.ones_like, params), opt.init(params), params)
  assert float(optax.tree.norm(updates)) > 0
  assert float(oa.get_diagnostics(state)["sf_max_learning_rate"]) == pytest.approx(0.1)


def test_abstract_init_of_wrapper():
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _params())
  opt = oa.schedule_free_wrapper(optax.scale_by_rms(), 0.1, state_dtype=jnp.bfloat16)
  shapes = jax.eval_shape(opt.init, abstract)
  assert shapes.z["w"].dtype == jnp.bfloat16 and shapes.z["w"].shape == (3,)


def test_zero_learning_rate_keeps_eval_params_at_init():
  params = _params()
  opt = oa.schedule_free_sgd(0.0)
  p, s = params, opt.init(params)
  for _ in range(3):
    u, s = opt.update(jax.tree.map(jnp.ones_like, p), s, p)
    p = optax.apply_updates(p, u)
  chex.assert_trees_all_close(oa.schedule_free_eval_params(s, p), params)


def test_donate_argnums():
  params = _params()
  opt = oa.schedule_free_adamw(0.1)

  @jax.jit
  def step(p, s, g):
    u, s = opt.update(g, s, p)
    return optax.apply_updates(p, u), s

  step = jax.jit(step, donate_argnums=(0, 1))
  p, s = params, opt.init(params)
  for _ in range(3):
    p, s = step(p, s, jax.tree.map(jnp.ones_like, p))
  chex.assert_tree_all_finite(p)


def test_scalar_params_keep_shape_and_dtype():
  params = {"s": jnp.asarray(0.5, jnp.bfloat16)}
  opt = oa.schedule_free_sgd(0.1)
  u, s = opt.update({"s": jnp.asarray(1.0, jnp.bfloat16)}, opt.init(params), params)
  assert u["s"].shape == () and u["s"].dtype == jnp.bfloat16
  assert s.z["s"].dtype == jnp.bfloat16


def test_update_without_params_raises():
  opt = oa.schedule_free_sgd(0.1)
  with pytest.raises(ValueError, match="params"):
    opt.update(_params(), opt.init(_params()))


@pytest.mark.parametrize("call,arg", [
    (lambda: oa.schedule_free_sgd(0.1, b1=0.0), "b1"),
    (lambda: oa.schedule_free_sgd(0.1, b1=1.0), "b1"),
    (lambda: oa.schedule_free_sgd(-0.1), "learning_rate"),
    (lambda: oa.schedule_free_sgd(0.1, warmup_steps=-1), "warmup_steps"),
    (lambda: oa.schedule_free_sgd(0.1, warmup_steps=2.5), "warmup_steps"),
    (lambda: oa.schedule_free_adamw(0.1, eps=-1e-8), "eps"),
    (lambda: oa.schedule_free_adamw(0.1, b2=1.0), "b2"),
    (lambda: oa.schedule_free_adamw(0.1, weight_decay=-0.1), "weight_decay"),
    (lambda: oa.schedule_free_wrapper(optax.identity(), 0.1, r=-1.0), "r"),
])
def test_bad_input(call, arg):
  with pytest.raises(ValueError, match=arg):
    call()


def test_eval_params_and_diagnostics_under_flax_nnx_optimizer():
  """flax.nnx.Optimizer wraps the state in OptVariables and the parameters in Params: the
  averaged x and the diagnostics are those of the plain optax run."""
  nnx = pytest.importorskip("flax.nnx")

  class Model(nnx.Module):

    def __init__(self, rngs):
      self.dense = nnx.Linear(3, 2, rngs=rngs)

    def __call__(self, x):
      return self.dense(x)

  model, x = Model(nnx.Rngs(0)), jnp.linspace(-1.0, 1.0, 12).reshape(4, 3)
  tx = oa.schedule_free_adamw(1e-2, warmup_steps=2)
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  state = tx.init(params)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  loss = lambda m: jnp.sum(m(x) ** 2)  # noqa: E731
  for _ in range(3):
    grads = nnx.grad(loss)(model)
    updates, state = tx.update(nnx.to_pure_dict(grads), state, params)
    params = optax.apply_updates(params, updates)
    optimizer.update(model, grads)
  expected = oa.schedule_free_eval_params(state, params)
  got = oa.schedule_free_eval_params(optimizer.opt_state, nnx.state(model, nnx.Param))
  for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(got)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-6, atol=1e-7)
  diagnostics = oa.get_diagnostics(optimizer.opt_state)
  for key, value in oa.get_diagnostics(state).items():
    assert float(jnp.asarray(jax.tree.leaves(diagnostics[key])[0])) == pytest.approx(float(value))
