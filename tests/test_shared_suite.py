"""The shared transform suite: every optimizer in the registry, present and future.

Covers the checks optax applies to its contrib optimizers (optax's own test suite) plus ours.
An optimizer added to the registry is enrolled automatically; ``CONVERGENCE_LR`` only tunes the
learning rate of the convergence check (the default is used otherwise).
"""
from __future__ import annotations

import inspect

import chex
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_accel as oa
from optax_accel import _common as C

NAMES = oa.list_optimizers()
OPTAX_OWN = {"adamw", "sgd", "lion"}  # optax's aliases: not ours to validate

# Learning rates for the convergence check (parabola and Rosenbrock, 20k steps).
# Chosen from a scan over {1e-1, 3e-2, ..., 1e-4}; each passes both problems.
CONVERGENCE_LR = {
    "sgd": 1e-3, "accelerated_sgd": 1e-3, "accsgd": 1e-3, "mass_sgd": 1e-3, "agnes": 1e-4,
    "schedule_free_sgd": 3e-3, "lion": 3e-3, "mars_lion": 1e-3, "ademamix": 1e-2,
    "schedule_free_adamw": 1e-2, "schedule_free_ademamix": 3e-2, "simplified_ademamix": 1e-3,
}
DEFAULT_LR = 3e-3
# Optimizers whose every buffer is a short-memory momentum (set by mu_dtype / state_dtype).
SHORT_MEMORY_ONLY = {"sgd", "accelerated_sgd", "accsgd", "mass_sgd", "agnes", "lion", "mars_lion",
                     "am_sgd", "schedule_free_sgd"}


def make(name, learning_rate=1e-2, **kw):
  return oa.get_optimizer(name, learning_rate, **kw)


def evaluation_params(state, params):
  try:
    return oa.schedule_free_eval_params(state, params)
  except ValueError:
    return params


def _params(dtype=jnp.float32):
  return {"w": jnp.arange(12, dtype=jnp.float32).reshape(3, 4).astype(dtype) / 10,
          "b": jnp.full((5,), -0.3, dtype), "s": jnp.asarray(0.7, dtype)}


def _grads(params, seed=0):
  keys = jax.random.split(jax.random.key(seed), len(jax.tree.leaves(params)))
  leaves = [jax.random.normal(k, x.shape, jnp.float32).astype(x.dtype)
            for k, x in zip(keys, jax.tree.leaves(params))]
  return jax.tree.unflatten(jax.tree.structure(params), leaves)


# ----------------------------------------------------------------------------------------------
# optax contrib harness checks.


@pytest.mark.parametrize("name", NAMES)
def test_extra_kwargs_no_recompile(name):
  opt = make(name)
  params = _params()
  state = opt.init(params)
  update = jax.jit(opt.update)
  u1, s1 = update(_grads(params), state, params, unexpected_kwarg=1)
  u2, _ = update(_grads(params, 1), s1, params, unexpected_kwarg=2)
  assert update._cache_size() == 1
  chex.assert_tree_all_finite((u1, u2))


def _parabola():
  target = jnp.array([1.0, -1.0, 1.0])
  return jnp.array([-1.0, 10.0, 1.0]), lambda p: jnp.sum((p - target) ** 2), target


def _rosenbrock():
  return (jnp.array([-1.2, 1.0]),
          lambda p: (1 - p[0]) ** 2 + 100 * (p[1] - p[0] ** 2) ** 2, jnp.array([1.0, 1.0]))


_A = jnp.array([[2.0, 1.0], [1.0, 3.0]])
_T = jnp.array([[1.0, -1.0], [-1.0, 1.0]])


def _matrix():
  return jnp.zeros((2, 2)), lambda p: jnp.sum((_A @ p - _T) ** 2), jnp.linalg.solve(_A, _T)


def _mixed_pytree():
  target = {"a": jnp.asarray(0.5), "b": jnp.array([1.0, -2.0, 0.5]), "c": _T}
  loss = lambda p: sum(jnp.sum((p[k] - target[k]) ** 2) for k in target)  # noqa: E731
  return jax.tree.map(jnp.zeros_like, target), loss, target


# (state dtype, problem): the four problems in bfloat16 state, where precision bites; parabola
# and Rosenbrock in float32 (the 2x2 and mixed problems add nothing there: CI budget).
CONVERGENCE_CASES = [(jnp.float32, _parabola), (jnp.float32, _rosenbrock)] + [
    (jnp.bfloat16, problem) for problem in (_parabola, _rosenbrock, _matrix, _mixed_pytree)]


@pytest.mark.parametrize("state_dtype, problem", CONVERGENCE_CASES,
                         ids=[f"{jnp.dtype(d).name}-{p.__name__.strip('_')}"
                              for d, p in CONVERGENCE_CASES])
@pytest.mark.parametrize("name", NAMES)
def test_convergence(name, state_dtype, problem):
  """optax's convergence problems, 20k steps, in float32 and bfloat16 state (the optimizer's
  mu_dtype / state_dtype): optax's tolerance, rtol = atol = 3e-2, at the evaluation point."""
  init, loss, target = problem()
  opt = make(name, CONVERGENCE_LR.get(name, DEFAULT_LR),
             **{oa.state_dtype_argument(name): state_dtype})

  def step(carry, _):
    params, state = carry
    updates, state = opt.update(jax.grad(loss)(params), state, params)
    return (optax.apply_updates(params, updates), state), None

  (params, state), _ = jax.jit(lambda c: jax.lax.scan(step, c, length=20_000))(
      (init, opt.init(init)))
  assert any(x.dtype == state_dtype for x in jax.tree.leaves(state) if x.ndim), "not applied"
  chex.assert_trees_all_close(evaluation_params(state, params), target, rtol=3e-2, atol=3e-2)
  optax.tree.map_params(opt, lambda p: p, state)  # states must support map_params


# Step counts given a value in the all-injected test (their defaults, None or 0, turn them off).
INJECTED_STEPS = {"alpha_warmup": 10, "b3_warmup": 10, "b1_warmup": 10, "warmup_steps": 10,
                  "freeze_steps": 2}


@pytest.mark.parametrize("name", NAMES)
def test_every_numeric_hyperparameter_injects_without_static_args(name):
  """optax injects every numeric argument by default, step counts included: each factory, with
  every numeric argument injected (warmups switched on), gives the plain call's updates and state
  over several steps."""
  factory = oa.get_spec(name).factory
  kwargs = {k: p.default for k, p in inspect.signature(factory).parameters.items()
            if isinstance(p.default, (int, float)) and not isinstance(p.default, bool)
            and k != "learning_rate"}
  kwargs.update({k: v for k, v in INJECTED_STEPS.items()
                 if k in inspect.signature(factory).parameters})
  # The plain call gets the float32 values that injection stores (1 - 0.999 and 1 - f32(0.999)
  # differ by 1.3e-5 relative, for optax's own Adam too): what is left is the computation.
  kwargs = {k: float(np.float32(v)) if isinstance(v, float) else v for k, v in kwargs.items()}
  lr = float(np.float32(1e-2))
  bare = factory(lr, **kwargs)
  injected = optax.inject_hyperparams(factory)(learning_rate=lr, **kwargs)
  params = _params()
  update_bare, update_injected = jax.jit(bare.update), jax.jit(injected.update)
  s_bare, s_inj = bare.init(params), injected.init(params)
  for step in range(12):
    grads = jax.tree.map(lambda g, k=step: g * (1 + 0.1 * k), _grads(params))
    u_bare, s_bare = update_bare(grads, s_bare, params)
    u_inj, s_inj = update_injected(grads, s_inj, params)
    chex.assert_trees_all_close(u_bare, u_inj, rtol=1e-5, atol=1e-7)
    chex.assert_trees_all_close(s_bare, s_inj.inner_state, rtol=1e-5, atol=1e-7)


def test_injected_step_counts_are_still_checked_where_concrete():
  for kwargs in ({"alpha_warmup": -5}, {"b3_warmup": 2.5}):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
      optax.inject_hyperparams(oa.ademamix)(learning_rate=1e-3, **kwargs).init(_params())


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "f32"])
@pytest.mark.parametrize("name", NAMES)
def test_update_dtype_equals_param_dtype(name, dtype):
  opt = make(name)
  params = _params(dtype)
  updates, _ = jax.jit(opt.update)(_grads(params), opt.init(params), params)
  chex.assert_trees_all_equal_dtypes(updates, params)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32],
                         ids=["bf16", "f16", "f32"])
@pytest.mark.parametrize("name", NAMES)
def test_state_stable_under_cond(name, dtype):
  """optax's check: update inside lax.cond against identity; state types must match exactly."""
  opt = make(name)
  params = _params(dtype)
  state = opt.init(params)

  @jax.jit
  def step(state, flag):
    return jax.lax.cond(flag, lambda s: opt.update(_grads(params), s, params, value=1.0)[1],
                        lambda s: s, state)

  new_state = step(state, True)
  chex.assert_trees_all_equal_shapes_and_dtypes(state, new_state)
  chex.assert_trees_all_equal_structs(state, new_state)


@pytest.mark.parametrize("name", NAMES)
def test_constant_schedule_equals_float(name):
  params = _params()
  run = lambda opt: jax.jit(opt.update)(_grads(params), opt.init(params), params)[0]  # noqa
  chex.assert_trees_all_close(run(make(name, 3e-3)),
                              run(make(name, optax.constant_schedule(3e-3))), rtol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "f32"])
@pytest.mark.parametrize("name", NAMES)
def test_multisteps(name, dtype):
  opt = optax.MultiSteps(make(name), every_k_schedule=4)
  params = _params(dtype)
  state = opt.init(params)
  updates, state = jax.jit(opt.update)(_grads(params), state, params)
  chex.assert_trees_all_equal_dtypes(updates, params)
  for leaf in jax.tree.leaves(updates):
    assert not np.any(np.asarray(leaf, np.float32))


# ----------------------------------------------------------------------------------------------
# Ours: state dtype, abstract init, sharding, random pytrees, validation.


@pytest.mark.parametrize("name", NAMES)
def test_bf16_state_stays_bf16_in_scan(name):
  arg = oa.state_dtype_argument(name)
  opt = make(name, **{arg: jnp.bfloat16})
  params = _params()
  state = opt.init(params)
  sized = [x for x in jax.tree.leaves(state) if x.shape == (3, 4)]
  assert sized and any(x.dtype == jnp.bfloat16 for x in sized), "no bf16 buffer"

  def step(carry, g):
    p, s = carry
    u, s = opt.update(g, s, p)
    return (optax.apply_updates(p, u), s), None

  grads = jax.tree.map(lambda x: jnp.stack([x] * 50), _grads(params))
  (_, final), _ = jax.jit(lambda c, g: jax.lax.scan(step, c, g))((params, state), grads)
  chex.assert_trees_all_equal_shapes_and_dtypes(state, final)
  # The long memories (second moments, slow EMAs, running averages) stay float32: in bfloat16
  # their per-step weight (1 - b2, 1 - b3, 1/t) is below resolution (docs/conventions.md).
  checked = 0
  for inner in C.iter_states(final):
    for field in ("nu", "nu_mean", "m2"):
      for leaf in jax.tree.leaves(getattr(inner, field, None)):
        assert leaf.dtype == jnp.float32, (name, type(inner).__name__, field, leaf.dtype)
        checked += 1
  assert checked or name in SHORT_MEMORY_ONLY, name


@pytest.mark.parametrize("name", NAMES)
def test_abstract_init(name):
  opt = make(name)
  params = _params()
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  expected = jax.eval_shape(opt.init, params)
  chex.assert_trees_all_equal_shapes_and_dtypes(jax.eval_shape(opt.init, abstract), expected)
  chex.assert_trees_all_equal_shapes_and_dtypes(opt.init(abstract), expected)  # direct init


@pytest.fixture(scope="module")
def mesh():
  if jax.device_count() < 8:
    pytest.fail("conftest.py must give 8 CPU devices (XLA_FLAGS set before JAX starts)")
  return jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Explicit,))


@pytest.mark.parametrize("name", NAMES)
def test_sharding_types_stable(name, mesh):
  opt = make(name)
  spec = {"w": jax.P(), "b": jax.P(), "s": jax.P(), "m": jax.P("x", None)}
  host = {**_params(), "m": jnp.ones((16, 4), jnp.float32)}
  with jax.set_mesh(mesh):
    params = jax.tree.map(lambda x, s: jax.device_put(x, jax.NamedSharding(mesh, s)), host, spec)
    state = jax.jit(opt.init)(params)
    abstract = jax.eval_shape(opt.init, jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), params))
    grads = jax.tree.map(lambda g, p: jax.device_put(g, p.sharding), _grads(params), params)
    _, new_state = jax.jit(opt.update)(grads, state, params)
    types = lambda t: jax.tree.map(jax.typeof, t)  # noqa: E731
    assert types(state) == types(new_state)
    chex.assert_trees_all_equal_shapes_and_dtypes(abstract, state)


def _random_tree(draw_leaf):
  return st.recursive(
      draw_leaf, lambda children: st.dictionaries(
          st.text("abcdef", min_size=1, max_size=3), children, max_size=3),
      max_leaves=6)


_leaf = st.sampled_from([(), (0,), (3,), (2, 3), (1, 0, 2)])


@pytest.mark.parametrize("name", NAMES)
@hypothesis.settings(max_examples=5, deadline=None, database=None)
@hypothesis.given(shapes=_random_tree(_leaf))
def test_random_pytrees(name, shapes):
  is_shape = lambda x: isinstance(x, tuple) and all(isinstance(i, int) for i in x)  # noqa
  params = jax.tree.map(lambda s: jnp.full(s, 0.5, jnp.float32), shapes, is_leaf=is_shape)
  opt = make(name)
  state = opt.init(params)
  updates, state = opt.update(jax.tree.map(lambda p: p * 0.1 + 0.01, params), state, params)
  chex.assert_trees_all_equal_shapes_and_dtypes(updates, params)
  chex.assert_tree_all_finite(updates)


@pytest.mark.parametrize("name", sorted(set(NAMES) - OPTAX_OWN))
@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf")])
def test_invalid_learning_rate(name, bad):
  with pytest.raises(ValueError, match="learning_rate"):
    make(name, bad)


@pytest.mark.parametrize("name", sorted(set(NAMES) - OPTAX_OWN))
def test_invalid_beta_named(name):
  sig = inspect.signature(oa.get_spec(name).factory)
  betas = [n for n in ("b1", "b2", "beta", "momentum") if n in sig.parameters]
  for beta_name in betas:
    with pytest.raises(ValueError, match=beta_name):
      make(name, **{beta_name: 1.5})


def test_unknown_optimizer_lists_valid_names():
  with pytest.raises(ValueError, match="adamw"):
    oa.get_optimizer("adam_typo", 1e-3)


@pytest.mark.parametrize("name", NAMES)
def test_nan_gradients_skipped_by_apply_if_finite(name):
  """The documented NaN/Inf policy: transforms propagate non-finite values (as optax does);
  ``optax.apply_if_finite`` skips such steps and leaves params and the inner state unchanged."""
  opt = optax.apply_if_finite(make(name), max_consecutive_errors=3)
  params = _params()
  state = opt.init(params)
  bad = jax.tree.map(lambda g: g.at[...].set(jnp.nan), _grads(params))
  updates, new_state = jax.jit(opt.update)(bad, state, params)
  for leaf in jax.tree.leaves(updates):
    assert not np.any(np.asarray(leaf))
  chex.assert_trees_all_equal(new_state.inner_state, state.inner_state)
  assert int(new_state.notfinite_count) == 1
