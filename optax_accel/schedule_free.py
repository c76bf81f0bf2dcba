"""Schedule-Free as a wrapper: accelerated SGD at the gradient point y plus weight averaging.

Defazio et al., "The Road Less Scheduled" (NeurIPS 2024, arXiv:2405.15682); reference code
facebookresearch/schedule_free. For steps t = 1, 2, ... with base direction u_t (computed at y_t),
learning rate gamma_t, interpolation b1 and z_1 = x_1 = y_1 = w_0:

    z_{t+1} = z_t - gamma_t u_t
    x_{t+1} = (1 - c_{t+1}) x_t + c_{t+1} z_{t+1}
    y_{t+1} = (1 - b1) z_{t+1} + b1 x_{t+1}
    c_{t+1} = w_t / sum_{i<=t} w_i,   w_t = t^r * (max_{i<=t} gamma_i)^weight_lr_power

Morwani et al. (arXiv:2502.02431) show this is accelerated SGD at y followed by averaging
(docs/schedule_free.md §2; tested as an identity in float64):

    M_t = (1 - c_t) M_{t-1} + gamma_t u_t,   y_{t+1} = y_t - (1-b1) gamma_t u_t - b1 c_{t+1} M_t
    x_{t+1} = (1 - rho_{t+1}) x_t + rho_{t+1} y_{t+1},   rho = c / (1 - b1 + b1 c)

Only z is stored (the params are y; x is recovered as (y - (1-b1) z)/b1 with the b1 applied at the
previous step, which keeps the recursion exact when b1 is scheduled or injected).
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_accel import _common as C
from optax_accel.ademamix import scale_by_ademamix


class ScheduleFreeState(NamedTuple):
  """State of ``schedule_free_wrapper``."""
  count: jax.Array  # int32, number of updates applied
  b1: jax.Array  # interpolation coefficient applied at the last step (used by eval params)
  max_lr: jax.Array  # running max of gamma
  weight_sum: jax.Array  # sum of averaging weights w_i
  averaging_weight: jax.Array  # c_{t+1} of the last step
  z: optax.Params
  base_state: optax.OptState

  def diagnostics(self) -> dict[str, jax.Array]:
    return {"sf_averaging_weight": self.averaging_weight, "sf_b1": self.b1,
            "sf_max_learning_rate": self.max_lr}


def _scalar_dtype(params: Any):
  """float32, or float64 when params are float64 (so float64 identities hold to 1e-10)."""
  leaves = [jnp.dtype(x.dtype) for x in jax.tree.leaves(params)]
  return jnp.float64 if any(d == jnp.float64 for d in leaves) else jnp.float32


def schedule_free_wrapper(
    base: optax.GradientTransformation,
    learning_rate: optax.ScalarOrSchedule,
    b1: optax.ScalarOrSchedule = 0.9,
    weight_lr_power: float = 2.0,
    r: float = 0.0,
    *,
    state_dtype: Any | None = None,
) -> optax.GradientTransformationExtraArgs:
  """Schedule-Free around a momentum-free base *direction* (e.g. ``optax.scale_by_rms``).

  Update rule (u_t the base direction at y_t, module docstring and docs/schedule_free.md)::

      z_{t+1} = z_t - gamma_t u_t
      x_{t+1} = (1 - c_{t+1}) x_t + c_{t+1} z_{t+1},  c_{t+1} = w_t / sum_{i<=t} w_i
      y_{t+1} = (1 - b1) z_{t+1} + b1 x_{t+1},        w_t = t^r max_{i<=t}(gamma_i)^p

  The returned updates are the full parameter step y_{t+1} - y_t (learning rate and sign
  included): do not chain ``scale_by_learning_rate`` after it. Params passed to ``update`` are
  the gradient point y; evaluate at ``schedule_free_eval_params(state, params)``.

  Differences from ``optax.contrib.schedule_free`` (docs/schedule_free.md §3): the learning rate
  is called with the same 0-based count for the z-step and the averaging weight (a warmup's first
  step is not a no-op when the schedule is positive at 0); the averaging weight has PyTorch's
  ``t**r`` factor; b1 may be scheduled or injected and the value applied is stored for the
  eval params; init works on ``jax.ShapeDtypeStruct``.

  Args:
    base: transformation producing a direction u_t (no learning rate, no sign flip, no momentum).
    learning_rate: gamma_t (scalar or schedule of the 0-based count).
    b1: interpolation coefficient in (0, 1) (scalar or schedule).
    weight_lr_power: p in w_t = t^r max_lr^p.
    r: polynomial averaging power.
    state_dtype: dtype of z (default: the params' dtype); a 16-bit z is written with
      stochastic rounding (docs/conventions.md, "Low-precision state").

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a ``ScheduleFreeState``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optax_accel as oa
    >>> opt = oa.schedule_free_wrapper(optax.identity(), learning_rate=0.1, b1=0.9)
    >>> y = jnp.array([1.0])
    >>> state = opt.init(y)
    >>> updates, state = opt.update(jnp.array([1.0]), state, y)
    >>> y = optax.apply_updates(y, updates)
    >>> print(y, oa.schedule_free_eval_params(state, y))  # y = 1 - 0.1, x = z = 1 - 0.1
    [0.9] [0.9]

  References:
    Defazio, Yang, Mehta, Mishchenko, Khaled, Cutkosky, *The Road Less Scheduled*, NeurIPS 2024,
    arXiv:2405.15682.
  """
  C.check_learning_rate(learning_rate)
  C.check_range("b1", b1, 0.0, 1.0, lo_open=True, hi_open=True)
  C.check_nonnegative("weight_lr_power", weight_lr_power)
  C.check_nonnegative("r", r)
  base = optax.with_extra_args_support(base)

  def init_fn(params):
    dtype = _scalar_dtype(params)
    zero = lambda: jnp.zeros([], dtype)  # distinct buffers, so the state can be donated  # noqa
    return ScheduleFreeState(
        count=C.count_init(), b1=jnp.asarray(C.at(b1, C.count_init()), dtype),
        max_lr=zero(), weight_sum=zero(), averaging_weight=zero(),
        z=jax.tree.map(lambda p: jnp.array(p, dtype=state_dtype or p.dtype, copy=True)
                       if not isinstance(p, jax.ShapeDtypeStruct)
                       else jax.ShapeDtypeStruct(p.shape, state_dtype or p.dtype,
                                                 sharding=p.sharding), params),
        base_state=base.init(params))

  def update_fn(updates, state, params=None, **extra_args):
    if params is None:
      raise ValueError("schedule_free_wrapper needs `params` (the gradient point y) in update.")
    dtype = state.max_lr.dtype
    step = (state.count + 1).astype(dtype)
    lr = jnp.asarray(C.at(learning_rate, state.count), dtype)
    b1_t = jnp.asarray(C.at(b1, state.count), dtype)
    max_lr = jnp.maximum(state.max_lr, lr)
    weight = step**r * max_lr**weight_lr_power
    weight_sum = state.weight_sum + weight
    ck = jnp.where(weight_sum > 0, weight / jnp.where(weight_sum > 0, weight_sum, 1), 0)

    direction, base_state = base.update(updates, state.base_state, params, **extra_args)

    # y_{t+1} = (1-b) z_{t+1} + b ((1-c) x_t + c z_{t+1}) with x_t = (y_t - (1-b') z_t) / b'
    # (b' = the b1 of the previous step), u used once. Writing z_t as z_{t+1} + lr u (u used
    # twice) split the step in two TPU kernels once the base has two state buffers (Schedule-
    # Free AdEMAMix: 44 B/param unstaged instead of 36). In this form XLA:CPU copies the donated
    # z (z_t is read after z is updated in place), as it does for optax.contrib's. Folding the
    # scalars into three coefficients, or storing gamma_t in the state, makes the TPU compiler
    # stage every operand through VMEM: 1.53x optax.adamw's bytes instead of 1.00x
    # (benchmarks/step_traffic.py; docs/performance.md).
    def step_leaf(y, z, u, leaf):
      z_new = z - lr * u
      x_old = (y - (1 - state.b1) * z) / state.b1
      y_new = b1_t * ((1 - ck) * x_old + ck * z_new) + (1 - b1_t) * z_new
      if z.dtype != y.dtype:  # a bfloat16 z: steps below its resolution still count
        z_new = C.stochastic_round(z_new, z.dtype, state.count, leaf)
      return (y_new - y).astype(y.dtype), z_new.astype(z.dtype)

    leaves = jax.tree.unflatten(jax.tree.structure(params), range(len(jax.tree.leaves(params))))
    out = jax.tree.map(step_leaf, params, state.z, direction, leaves)
    new_updates = jax.tree.map(lambda _, o: o[0], params, out)
    z = jax.tree.map(lambda _, o: o[1], params, out)
    return new_updates, ScheduleFreeState(
        count=optax.safe_increment(state.count), b1=C.recorded(b1, b1_t, state.b1), max_lr=max_lr,
        weight_sum=weight_sum, averaging_weight=ck, z=z, base_state=base_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def schedule_free_eval_params(state: optax.OptState, params: optax.Params) -> optax.Params:
  """The averaged iterate x = (y - (1 - b1) z) / b1, for evaluation and export.

  Finds every ``ScheduleFreeState`` inside nested ``chain`` / ``inject_hyperparams`` / ``masked``
  / ``multi_transform`` states and uses the b1 applied at the last step. Leaves not handled by
  a schedule-free transform (masked out) are returned unchanged. Leaves are paired by position,
  so a ``flax.nnx.Optimizer`` state and the model's ``nnx.Param`` state can be passed directly.

  Args:
    state: an optimizer state holding a ``ScheduleFreeState``.
    params: the trained parameters y.

  Returns:
    The parameters x at which to evaluate, with the structure of ``params``.

  Raises:
    ValueError: if ``state`` holds no schedule-free state, or ``params`` has another number of
      leaves than the state's z.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optax_accel as oa
    >>> opt = oa.schedule_free_sgd(1.0, b1=0.5)
    >>> y = jnp.array([0.0])
    >>> state = opt.init(y)
    >>> for _ in range(2):
    ...   updates, state = opt.update(jnp.array([1.0]), state, y)
    ...   y = optax.apply_updates(y, updates)
    >>> print(y, oa.schedule_free_eval_params(state, y))
    [-1.75] [-1.5]

  References:
    Defazio, Yang, Mehta, Mishchenko, Khaled, Cutkosky, *The Road Less Scheduled*, NeurIPS 2024,
    arXiv:2405.15682.
  """
  states = C.find_states(state, ScheduleFreeState)
  if not states:
    raise ValueError("No ScheduleFreeState found in `state`: not a schedule-free optimizer.")
  is_masked = lambda x: isinstance(x, optax.MaskedNode)  # noqa: E731
  for sf in states:
    b = jax.tree.leaves(sf.b1)[0]  # a scalar, possibly wrapped (e.g. in a Flax NNX variable)

    def average(z, y, b=b):
      return y if is_masked(z) else ((y - (1 - b) * z) / b).astype(y.dtype)

    z_leaves = jax.tree.leaves(sf.z, is_leaf=is_masked)
    y_leaves, treedef = jax.tree.flatten(params)
    if len(z_leaves) != len(y_leaves):
      raise ValueError(f"`params` has {len(y_leaves)} leaves, the schedule-free state "
                       f"{len(z_leaves)}: not the parameters this optimizer was built for.")
    # Paired leaf by leaf, so that containers of another type (e.g. flax.nnx.Optimizer's
    # OptVariable-wrapped state next to Param-wrapped parameters) need not match.
    params = jax.tree.unflatten(treedef, [average(z, y) for z, y in zip(z_leaves, y_leaves)])
  return params


def is_schedule_free(state: optax.OptState) -> bool:
  """True when ``state`` holds a ``ScheduleFreeState`` (anywhere in nested states).

  Its parameters are then the gradient point y, and :func:`schedule_free_eval_params` gives the
  ones to evaluate and export.

  Args:
    state: any optimizer state (chain, inject_hyperparams, masked, MultiSteps, ...).

  Returns:
    Whether a schedule-free transform is part of the optimizer.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optax_accel as oa
    >>> oa.is_schedule_free(oa.schedule_free_adamw(1e-3).init(jnp.zeros(2)))
    True
    >>> oa.is_schedule_free(optax.adamw(1e-3).init(jnp.zeros(2)))
    False
  """
  return bool(C.find_states(state, ScheduleFreeState))


def _with_warmup(learning_rate: optax.ScalarOrSchedule, warmup_steps: int):
  """PyTorch's schedule-free warmup: gamma * min(1, t / warmup_steps) at the 1-based step t."""
  C.check_steps("warmup_steps", warmup_steps, allow_none=False)
  if C.steps_off(warmup_steps):
    return learning_rate
  return lambda count: C.at(learning_rate, count) * C.warmup_fraction(count + 1, warmup_steps)


def _decay(weight_decay, mask):
  C.check_nonnegative("weight_decay", weight_decay)
  return optax.identity() if C.is_static_zero(weight_decay) else optax.add_decayed_weights(
      weight_decay, mask)


def schedule_free_sgd(
    learning_rate: optax.ScalarOrSchedule = 1.0,
    b1: optax.ScalarOrSchedule = 0.9,
    warmup_steps: int = 0,
    weight_decay: float = 0.0,
    r: float = 0.0,
    weight_lr_power: float = 2.0,
    *,
    mask: Any = None,
    state_dtype: Any | None = None,
) -> optax.GradientTransformationExtraArgs:
  """Schedule-Free SGD: the wrapper around u = g + weight_decay * y (decay at y, as the reference).

  Update rule: :func:`schedule_free_wrapper` with u_t = g_t + weight_decay y_t.

  Args:
    learning_rate: gamma (scalar or schedule of the 0-based count; the reference's default 1.0).
    b1: interpolation coefficient in (0, 1) (scalar or schedule).
    warmup_steps: linear warmup gamma min(1, t / warmup_steps) at the 1-based step t (PyTorch's).
    weight_decay: L2 decay added to the direction at y.
    r: polynomial averaging power.
    weight_lr_power: p in the averaging weights max_lr^p.
    mask: a pytree of booleans (or a function of the params) selecting the decayed leaves.
    state_dtype: dtype of z.

  Returns:
    The full optimizer; evaluate at :func:`schedule_free_eval_params`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax_accel as oa
    >>> opt = oa.schedule_free_sgd(0.1, warmup_steps=10)
    >>> state = opt.init({"w": jnp.zeros(3)})

  References:
    Defazio, Yang, Mehta, Mishchenko, Khaled, Cutkosky, *The Road Less Scheduled*, NeurIPS 2024,
    arXiv:2405.15682.
  """
  return schedule_free_wrapper(
      _decay(weight_decay, mask), _with_warmup(learning_rate, warmup_steps), b1,
      weight_lr_power, r, state_dtype=state_dtype)


def schedule_free_adamw(
    learning_rate: optax.ScalarOrSchedule = 0.0025,
    b1: optax.ScalarOrSchedule = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    warmup_steps: int = 0,
    weight_decay: float = 0.0,
    r: float = 0.0,
    weight_lr_power: float = 2.0,
    mask: Any = None,
    *,
    state_dtype: Any | None = None,
) -> optax.GradientTransformationExtraArgs:
  """Schedule-Free AdamW: u = g / (sqrt(v / (1 - b2^t)) + eps) + weight_decay * y.

  Update rule: :func:`schedule_free_wrapper` around an RMS-normalised direction; bias correction in
  the denominator, as the current reference code (schedulefree >= 1.3).

  Args:
    learning_rate: gamma (scalar or schedule of the 0-based count).
    b1: interpolation coefficient in (0, 1) (scalar or schedule).
    b2: second-moment decay in [0, 1).
    eps: added to the square root of the second moment.
    warmup_steps: linear warmup gamma min(1, t / warmup_steps) at the 1-based step t (PyTorch's).
    weight_decay: decay added to the direction at y.
    r: polynomial averaging power.
    weight_lr_power: p in the averaging weights max_lr^p.
    mask: a pytree of booleans (or a function of the params) selecting the decayed leaves.
    state_dtype: dtype of z (the second moment stays in the params' dtype, as optax's
      ``scale_by_rms``).

  Returns:
    The full optimizer; evaluate at :func:`schedule_free_eval_params`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optax_accel as oa
    >>> opt = oa.schedule_free_adamw(1e-2, warmup_steps=100, weight_decay=1e-4)
    >>> params = {"w": jnp.ones(3)}
    >>> state = opt.init(params)
    >>> updates, state = opt.update({"w": jnp.ones(3)}, state, params)
    >>> params = optax.apply_updates(params, updates)
    >>> eval_params = oa.schedule_free_eval_params(state, params)

  References:
    Defazio, Yang, Mehta, Mishchenko, Khaled, Cutkosky, *The Road Less Scheduled*, NeurIPS 2024,
    arXiv:2405.15682.
  """
  C.check_beta("b2", b2)
  C.check_nonnegative("eps", eps)
  base = optax.chain(optax.scale_by_rms(b2, eps, eps_in_sqrt=False, bias_correction=True),
                     _decay(weight_decay, mask))
  return schedule_free_wrapper(base, _with_warmup(learning_rate, warmup_steps), b1,
                               weight_lr_power, r, state_dtype=state_dtype)


def schedule_free_ademamix(
    learning_rate: optax.ScalarOrSchedule = 5e-4,
    b1: optax.ScalarOrSchedule = 0.9,
    b2: float = 0.999,
    b3: optax.ScalarOrSchedule = 0.9999,
    alpha: optax.ScalarOrSchedule = 5.0,
    eps: float = 1e-8,
    warmup_steps: int = 0,
    weight_decay: float = 0.0,
    r: float = 0.0,
    weight_lr_power: float = 2.0,
    mask: Any = None,
    *,
    state_dtype: Any | None = None,
) -> optax.GradientTransformationExtraArgs:
  """Schedule-Free around AdEMAMix with b1 = 0 (the base has no fast momentum; SF supplies it).

  Update rule: :func:`schedule_free_wrapper` with
  u = (g + alpha m2) / (sqrt(v_hat) + eps) + weight_decay y, m2 = EMA_b3(g), not bias corrected.
  Requested in facebookresearch/schedule_free#46; the defaults are ours: b3 = 0.9999 and alpha = 5
  as AdEMAMix, learning_rate = 5e-4 so that the long-run step (1 + alpha) lr is close to
  SF-AdamW's default 2.5e-3.

  Args:
    learning_rate: gamma (scalar or schedule of the 0-based count).
    b1: Schedule-Free interpolation coefficient in (0, 1) (scalar or schedule).
    b2: second-moment decay in [0, 1).
    b3: slow-EMA decay in [0, 1) (scalar or schedule).
    alpha: slow-EMA weight >= 0 (scalar or schedule).
    eps: added to the square root of the second moment.
    warmup_steps: linear learning-rate warmup (PyTorch's convention).
    weight_decay: decay added to the direction at y.
    r: polynomial averaging power.
    weight_lr_power: p in the averaging weights max_lr^p.
    mask: a pytree of booleans (or a function of the params) selecting the decayed leaves.
    state_dtype: dtype of z (m2 and v stay at least float32: docs/conventions.md).

  Returns:
    The full optimizer; evaluate at :func:`schedule_free_eval_params`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax_accel as oa
    >>> opt = oa.schedule_free_ademamix(5e-4, b3=0.999, alpha=2.0)
    >>> state = opt.init({"w": jnp.zeros(3)})

  References:
    Defazio, Yang, Mehta, Mishchenko, Khaled, Cutkosky, *The Road Less Scheduled*, NeurIPS 2024,
    arXiv:2405.15682.
    Pagliardini, Ablin, Grangier, *The AdEMAMix Optimizer*, ICLR 2025, arXiv:2409.03137.
  """
  base = optax.chain(
      scale_by_ademamix(b1=0.0, b2=b2, b3=b3, alpha=alpha, eps=eps, mu_dtype=state_dtype),
      _decay(weight_decay, mask))
  return schedule_free_wrapper(base, _with_warmup(learning_rate, warmup_steps), b1,
                               weight_lr_power, r, state_dtype=state_dtype)
