"""Adaptive Memory momentum: AM-SGD and AM-AdamW (Topollai & Choromanska, AISTATS 2026,
arXiv:2510.04988), as reconstructed in docs/adaptive_memory.md.

The momentum coefficient beta_t is the dual multiplier of a two-plane proximal model
(gradient plane and momentum plane), solved in closed form each step. With a diagonal
preconditioner P (P = I for AM-SGD), weight decay mu (decoupled, AdamW only), delta = d_t - g_t
and M = 1 / (P (1 + lam P)):

    beta_t  = clip( [ r * g.(d/P + mu x) - mu x.delta - delta.M(g + lam P d) ] / delta.M delta,
                    beta_min, beta_max )                         (0 when delta.M delta == 0)
    d_{t+1} = ((1 - beta_t) g + (lam P + beta_t) d) / (1 + lam P)
    direction = d_{t+1} / P

The first term is the first-order estimate of the function-value gap (f(x_{t-1}) - f(x_t))/eta_t
(docs/adaptive_memory.md §2), with r = eta_{t-1}/eta_t when the learning-rate schedule is given
(``lr_ratio``; r = 1 otherwise). For AM-SGD it simplifies to
beta = clip((1 + lam) r g.d / ||d - g||^2 - (d - g).(g + lam d) / ||d - g||^2) =
clip((1 + lam) ||g||^2 / ||d - g||^2 - lam) at r = 1.

AM-AdamW (docs/adaptive_memory.md §3): P_t = c_t (sqrt(v_t / (1 - b2^t)) + eps), c_t = 1 - beta_max prod_{i<t} beta_i
(product-of-betas bias correction), v the usual EMA of g^2. The gap uses the current P_t in place of
P_{t-1} (no extra buffer: state = AdamW's d and v plus scalars).

First step: AM-SGD takes d_0 = g_0 (so d_1 = g_0); AM-AdamW takes d_0 = 0 with beta_1 = beta_max,
which reproduces AdamW's bias-corrected first step.
Variants (docs/adaptive_memory.md §4): Clip = ``beta_min > 0``; Restart = ``restart_threshold=tau``: beta is fixed at
beta_max, and whenever the AM coefficient falls below tau the memory restarts as at the first step.
``granularity``: "global" (one beta from reductions over all parameters; a cross-device
all-reduce under sharding) or "per_tensor" (one beta per leaf).
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_accel import _common as C

_GRANULARITIES = ("global", "per_tensor")
_GAPS = ("first_order", "exact")


class AdaptiveMemoryState(NamedTuple):
  """State of the AM transforms; ``nu`` and ``beta_prod`` are ``None`` for AM-SGD."""
  count: jax.Array
  beta: Any  # beta_t applied at the last step: a scalar (global) or a pytree of scalars
  restarts: jax.Array  # number of restarts (Restart variant)
  d: optax.Updates  # the momentum / memory direction d_t
  nu: optax.Updates | None  # second moment (AM-AdamW)
  beta_prod: Any  # prod of past betas, for the bias correction (AM-AdamW)
  prev_value: jax.Array  # f(x_{t-1}), for gap="exact" (0 otherwise)

  def diagnostics(self) -> dict[str, jax.Array]:
    return {**C.named_scalars("am_beta", self.beta), "am_restarts": self.restarts}


def _check(lam, beta_max, beta_min, granularity, restart_threshold):
  C.check_nonnegative("lam", lam)
  C.check_beta("beta_max", beta_max)
  C.check_range("beta_min", beta_min, 0.0, 1.0)
  if C.all_concrete(beta_min, beta_max) and beta_min > beta_max:
    raise ValueError(f"`beta_min` must not exceed `beta_max`, got {beta_min} > {beta_max}.")
  C.check_choice("granularity", granularity, _GRANULARITIES)
  if restart_threshold is not None:
    C.check_range("restart_threshold", restart_threshold, 0.0, 1.0)


def _lr_ratio(learning_rate, count):
  """eta_{t-1} / eta_t at the 0-based count (1 without a schedule or where eta_t == 0)."""
  if learning_rate is None or not callable(learning_rate):
    return 1.0
  now = C.at(learning_rate, count)
  before = C.at(learning_rate, jnp.maximum(count - 1, 0))
  return jnp.where(now > 0, before / jnp.where(now > 0, now, 1), 1.0)


def _am_core(grads, d, precond, decay, params, *, lam, beta_min, beta_max, restart_threshold,
             granularity, ratio, first_step, first_beta, exact_gap=None):
  """Closed-form beta for lists of leaves (module docstring).

  ``precond``: list of P leaves or None (P = I); ``decay``: list of mu per leaf or None.
  ``first_beta``: beta reported at the first step. ``exact_gap``: the measured
  (f(x_{t-1}) - f(x_t)) / eta_t, replacing the first-order estimate (global granularity only).
  Returns (beta list, restart-flag list), one entry per leaf.
  """
  acc = lambda x: x.astype(jnp.promote_types(x.dtype, jnp.float32))  # noqa: E731
  gaps, numerators, denominators = [], [], []
  for i, (g, dd) in enumerate(zip(grads, d)):
    g, dd = acc(g), acc(dd)
    p = 1.0 if precond is None else precond[i]
    delta = dd - g
    metric = 1.0 / (p * (1.0 + lam * p))
    step_direction = dd / p  # (x_{t-1} - x_t) / eta_{t-1}
    # delta.M(g + lam P d), written so that an overflowing P (v = inf) gives 0, not inf * 0.
    terms = [g * step_direction, delta * (metric * g + lam * dd / (1.0 + lam * p)),
             delta * metric * delta]
    if decay is not None:
      mu_x = decay[i] * acc(params[i])
      terms += [g * mu_x, mu_x * delta]
    sums = C.fused_sums(terms)
    gap = sums[0] if decay is None else sums[0] + sums[3]
    numerator = -sums[1] if decay is None else -sums[1] - sums[4]
    gaps.append(ratio * gap)
    numerators.append(numerator)
    denominators.append(sums[2])
  if granularity == "global":
    zero = jnp.zeros([], jnp.float32)
    gap = sum(gaps, zero) if exact_gap is None else exact_gap
    groups = [(gap + sum(numerators, zero), sum(denominators, zero))] * len(grads)
  else:
    groups = [(gp + n, den) for gp, n, den in zip(gaps, numerators, denominators)]

  betas, restarted = [], []
  for numerator, denominator in groups:
    safe = jnp.where(denominator > 0, denominator, 1.0)
    beta = jnp.clip(jnp.where(denominator > 0, numerator / safe, 0.0), beta_min, beta_max)
    beta = jnp.where(first_step, first_beta, beta)
    if restart_threshold is None:
      restarted.append(jnp.zeros([], bool))
    else:
      restarted.append(jnp.logical_and(beta < restart_threshold, jnp.logical_not(first_step)))
      beta = jnp.asarray(beta_max, beta.dtype)
    betas.append(beta)
  return betas, restarted


def adaptive_memory_momentum(
    lam: float = 0.1,
    beta_max: float = 0.9,
    *,
    granularity: str = "global",
    beta_min: float = 0.0,
    restart_threshold: float | None = None,
    learning_rate: optax.ScalarOrSchedule | None = None,
    gap: str = "first_order",
    mu_dtype: Any | None = None,
) -> optax.GradientTransformationExtraArgs:
  """AM-SGD's direction d_{t+1}: EMA momentum whose coefficient is solved in closed form each step.

  Update rule (delta = d_t - g_t, r = lr_{t-1} / lr_t; docs/adaptive_memory.md §2)::

      beta_t = clip(((1 + lam) r g.d - delta.(g + lam d)) / ||delta||^2, beta_min, beta_max)
      d_{t+1} = ((beta_t + lam) d_t + (1 - beta_t) g_t) / (1 + lam)

  (beta_t = 0 where delta = 0; the first step takes d_0 = g_0.)

  Args:
    lam: proximal weight lambda >= 0 (paper: 0.1).
    beta_max: upper clip of beta_t, in [0, 1) (paper: 0.9).
    granularity: "global" (one beta from reductions over all parameters) or "per_tensor".
    beta_min: lower clip of beta_t (the Clip variant when > 0).
    restart_threshold: tau of the Restart variant (None: off).
    learning_rate: the schedule the direction will be scaled by; only used for the factor r of the
      gap estimate (None: r = 1), and required by ``gap="exact"``.
    gap: "first_order" (the paper's stochastic estimate g.(x_{t-1} - x_t)) or "exact": the
      deterministic closed form (paper eq. 12) with the measured f(x_{t-1}) - f(x_t); then
      ``update`` needs the loss at the current params as ``value=`` (global granularity only).
    mu_dtype: dtype of the memory buffer d.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` (state ``AdaptiveMemoryState``).

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax_accel as oa
    >>> tx = oa.adaptive_memory_momentum()
    >>> state = tx.init(jnp.zeros(2))
    >>> d, state = tx.update(jnp.array([1.0, 0.0]), state)
    >>> d, state = tx.update(jnp.array([1.0, 0.5]), state)
    >>> print(oa.get_diagnostics(state)["am_beta"])  # (1.1 * 1.25 / 0.25 - 0.1) clipped
    0.9

  References:
    Topollai, Choromanska, *Adaptive Memory Momentum via a Model-Based Framework for Deep Learning
    Optimization*, AISTATS 2026, arXiv:2510.04988.
  """
  _check(lam, beta_max, beta_min, granularity, restart_threshold)
  C.check_choice("gap", gap, _GAPS)
  if gap == "exact" and (learning_rate is None or granularity != "global"):
    raise ValueError('`gap`="exact" needs `learning_rate` and `granularity`="global".')

  def init_fn(params):
    return AdaptiveMemoryState(
        count=C.count_init(), beta=_per_group(params, granularity, 0.0),
        restarts=C.count_init(), d=C.zeros(params, mu_dtype), nu=None, beta_prod=None,
        prev_value=C.scalar(0.0))

  def update_fn(updates, state, params=None, value=None, **extra_args):
    del params, extra_args
    exact_gap = None
    if gap == "exact":
      if value is None:
        raise ValueError('adaptive_memory_momentum(gap="exact") needs the loss as `value=`.')
      exact_gap = (state.prev_value - value) / C.at(learning_rate, state.count)
    treedef = jax.tree.structure(updates)
    g = treedef.flatten_up_to(updates)
    d = treedef.flatten_up_to(state.d)  # zeros at the first step
    first = state.count == 0
    betas, restarted = _am_core(
        g, d, None, None, None, lam=lam, beta_min=beta_min, beta_max=beta_max,
        restart_threshold=restart_threshold, granularity=granularity,
        ratio=_lr_ratio(learning_rate, state.count), first_step=first, first_beta=0.0,
        exact_gap=exact_gap)
    new_d = []
    for gi, di, beta, restart in zip(g, d, betas, restarted):
      # d_1 = g_1 (d_0 := g_0); a restart starts over the same way. Scalar coefficients only:
      # an array-level select would materialise a copy of d.
      reset = jnp.logical_or(first, restart)
      keep = jnp.where(reset, 0.0, (beta + lam) / (1 + lam))
      take = jnp.where(reset, 1.0, (1 - beta) / (1 + lam))
      new_d.append(keep * di + take * gi)
    direction = jax.tree.unflatten(treedef, [n.astype(gi.dtype) for n, gi in zip(new_d, g)])
    new_state = _state(state, treedef, betas, restarted, new_d, granularity)
    if value is not None:
      new_state = new_state._replace(prev_value=C.scalar(value))
    return direction, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _per_group(params, granularity, value):
  """A scalar (global) or a pytree of scalars like ``params`` (per_tensor), all ``value``."""
  if granularity == "global":
    return C.scalar(value)
  return jax.tree.map(lambda _: C.scalar(value), params)


def _pack(values, treedef, granularity, fallback):
  """Per-leaf scalars -> the state's scalar (global) or pytree (per_tensor) form."""
  if granularity == "per_tensor":
    return jax.tree.unflatten(treedef, [C.scalar(v) for v in values])
  return C.scalar(values[0]) if values else fallback


def _state(state, treedef, betas, restarted, new_d, granularity, nu=None, beta_prod=None):
  """The next state (prev_value is carried over; the SGD transform sets it)."""
  restarts = state.restarts
  if restarted:
    restarts = restarts + jnp.any(jnp.stack(restarted)).astype(jnp.int32)
  return AdaptiveMemoryState(
      count=optax.safe_increment(state.count),
      beta=_pack(betas, treedef, granularity, state.beta), restarts=restarts,
      d=C.cast_like(jax.tree.unflatten(treedef, new_d), state.d), nu=nu, beta_prod=beta_prod,
      prev_value=state.prev_value)


def scale_by_am_adam(
    b2: float = 0.999,
    eps: float = 1e-8,
    lam: float = 0.1,
    beta_max: float = 0.9,
    *,
    weight_decay: float = 0.0,
    mask: Any = None,
    granularity: str = "per_tensor",
    beta_min: float = 0.0,
    restart_threshold: float | None = None,
    learning_rate: optax.ScalarOrSchedule | None = None,
    mu_dtype: Any | None = None,
) -> optax.GradientTransformationExtraArgs:
  """AM-AdamW's preconditioned direction P_t^{-1} d_{t+1} (docs/adaptive_memory.md §3).

  Update rule (P_t = c_t (sqrt(v_hat_t) + eps), c_t = 1 - beta_max prod_{i<t} beta_i,
  M = 1 / (P (1 + lam P)), delta = d_t - g_t, mu the weight decay)::

      beta_t = clip((r g.(d/P + mu x) - mu x.delta - delta.M(g + lam P d)) / delta.M delta)
      d_{t+1} = d_t + (1 - beta_t)(g_t - d_t) / (1 + lam P_t);   direction = d_{t+1} / P_t

  ``weight_decay`` and ``mask`` enter only the closed-form beta (the decoupled decay itself is
  applied by the alias with ``optax.add_decayed_weights``, which must use the same values).

  Args:
    b2: second-moment decay in [0, 1).
    eps: added to the square root of the second moment.
    lam: proximal weight lambda >= 0 (paper: 0.1).
    beta_max: upper clip of beta_t, in [0, 1) (paper: 0.9).
    weight_decay: the decoupled weight decay mu the alias applies.
    mask: the alias's weight-decay mask.
    granularity: "per_tensor" (default) or "global".
    beta_min: lower clip of beta_t (the Clip variant when > 0).
    restart_threshold: tau of the Restart variant (None: off).
    learning_rate: the schedule, for the factor r of the gap estimate (None: r = 1).
    mu_dtype: dtype of d (v stays at least float32: docs/conventions.md).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` (state ``AdaptiveMemoryState``).

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax_accel as oa
    >>> tx = oa.scale_by_am_adam(lam=0.0)
    >>> state = tx.init(jnp.zeros(2))
    >>> direction, state = tx.update(jnp.array([1.0, -1.0]), state)
    >>> print(jnp.round(direction, 4))  # at lam = 0, AdamW's first step: sign(g)
    [ 1. -1.]

  References:
    Topollai, Choromanska, *Adaptive Memory Momentum via a Model-Based Framework for Deep Learning
    Optimization*, AISTATS 2026, arXiv:2510.04988.
  """
  _check(lam, beta_max, beta_min, granularity, restart_threshold)
  C.check_beta("b2", b2)
  C.check_nonnegative("eps", eps)
  C.check_nonnegative("weight_decay", weight_decay)

  def init_fn(params):
    return AdaptiveMemoryState(
        count=C.count_init(), beta=_per_group(params, granularity, 0.0), restarts=C.count_init(),
        d=C.zeros(params, mu_dtype), nu=C.accumulator_zeros(params),
        beta_prod=_per_group(params, granularity, 1.0), prev_value=C.scalar(0.0))

  def update_fn(updates, state, params=None):
    treedef = jax.tree.structure(updates)
    g = treedef.flatten_up_to(updates)
    count = optax.safe_increment(state.count)
    first = state.count == 0
    prods = ([state.beta_prod] * len(g) if granularity == "global"
             else treedef.flatten_up_to(state.beta_prod))
    correction = [1 - beta_max * bp for bp in prods]

    def second_moment(grads, nu_prev):
      """v_t and the preconditioner leaves P_t."""
      nu = optax.tree.update_moment_per_elem_norm(grads, nu_prev, b2, 2)
      nu_hat = treedef.flatten_up_to(optax.tree.bias_correction(nu, b2, count))
      return nu, [c * (jnp.sqrt(v) + eps) for c, v in zip(correction, nu_hat)]

    _, precond = second_moment(updates, state.nu)
    decay = None
    if not C.is_static_zero(weight_decay):
      if params is None:
        raise ValueError("scale_by_am_adam with weight_decay needs `params` in update.")
      masked = mask(params) if callable(mask) else mask
      flags = [True] * len(g) if masked is None else treedef.flatten_up_to(masked)
      decay = [weight_decay if f else 0.0 for f in flags]
    flat_params = None if params is None else treedef.flatten_up_to(params)
    d = treedef.flatten_up_to(state.d)
    betas, restarted = _am_core(
        g, d, precond, decay, flat_params, lam=lam, beta_min=beta_min, beta_max=beta_max,
        restart_threshold=restart_threshold, granularity=granularity,
        ratio=_lr_ratio(learning_rate, state.count), first_step=first, first_beta=beta_max)
    # The update pass computes v_t and P_t again, from inputs behind an optimization barrier
    # (so not merged with the first): each pass then reads v_{t-1} and forms v_t in its own
    # kernel, where one shared v_t would be a kernel of its own, written and read twice more
    # (docs/performance.md §2). Same operations on the same values: bitwise the same P_t.
    g_update, nu_prev = jax.lax.optimization_barrier((g, state.nu))
    nu, precond = second_moment(jax.tree.unflatten(treedef, g_update), nu_prev)
    # Restart: memory and bias correction start over, as at the first step (scalar factors only).
    keep = [jnp.where(r, 0.0, 1.0) for r in restarted]
    precond = [p * jnp.where(r, (1 - beta_max) / c, 1.0)
               for r, p, c in zip(restarted, precond, correction)]
    prods = [jnp.where(r, 1.0, bp) * b for r, bp, b in zip(restarted, prods, betas)]
    # d_{t+1} = ((1 - b) g + (lam P + b) d) / (1 + lam P) = d + (1 - b)(g - d) / (1 + lam P):
    # the second form stays finite when P overflows to inf (then d_{t+1} = d, a zero step).
    new_d = [k * di + (1 - b) * (gi - k * di) / (1 + lam * p)
             for gi, di, p, b, k in zip(g_update, d, precond, betas, keep)]
    direction = jax.tree.unflatten(
        treedef, [(n / p).astype(gi.dtype) for n, p, gi in zip(new_d, precond, g)])
    beta_prod = _pack(prods, treedef, granularity, state.beta_prod)
    return direction, _state(state, treedef, betas, restarted, new_d, granularity,
                             nu=C.cast_like(nu, state.nu), beta_prod=beta_prod)

  return C.with_extra_args(init_fn, update_fn)


def am_sgd(
    learning_rate: optax.ScalarOrSchedule,
    lam: float = 0.1,
    beta_max: float = 0.9,
    weight_decay: float = 0.0,
    *,
    granularity: str = "global",
    beta_min: float = 0.0,
    restart_threshold: float | None = None,
    lr_ratio: bool = True,
    mu_dtype: Any | None = None,
) -> optax.GradientTransformationExtraArgs:
  """AM-SGD (AM-MGD): x <- x - lr d_{t+1}, EMA-form momentum with an adaptive beta_t.

  Update rule: :func:`adaptive_memory_momentum`, then the learning rate. Weight decay is coupled L2
  (added to g before beta is computed), as PyTorch SGD's ``weight_decay`` that the paper's MGD
  baseline uses (docs/adaptive_memory.md §2).

  Args:
    learning_rate: scalar or schedule of the 0-based count.
    lam: proximal weight lambda >= 0 (paper: 0.1).
    beta_max: upper clip of beta_t, in [0, 1) (paper: 0.9).
    weight_decay: coupled L2 weight decay.
    granularity: "global" (default) or "per_tensor".
    beta_min: lower clip of beta_t (the Clip variant when > 0).
    restart_threshold: tau of the Restart variant (None: off).
    lr_ratio: use lr_{t-1} / lr_t in the gap estimate when ``learning_rate`` is a schedule.
    mu_dtype: dtype of the memory buffer d.

  Returns:
    The full optimizer.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optax_accel as oa
    >>> opt = oa.am_sgd(0.1)
    >>> params = jnp.array([1.0, 2.0])
    >>> state = opt.init(params)
    >>> updates, state = opt.update(params, state, params)  # gradient of |x|^2 / 2
    >>> print(optax.apply_updates(params, updates))
    [0.9 1.8]

  References:
    Topollai, Choromanska, *Adaptive Memory Momentum via a Model-Based Framework for Deep Learning
    Optimization*, AISTATS 2026, arXiv:2510.04988.
  """
  C.check_learning_rate(learning_rate)
  C.check_nonnegative("weight_decay", weight_decay)
  return optax.chain(
      optax.add_decayed_weights(weight_decay) if not C.is_static_zero(weight_decay)
      else optax.identity(),
      adaptive_memory_momentum(lam, beta_max, granularity=granularity, beta_min=beta_min,
                               restart_threshold=restart_threshold,
                               learning_rate=learning_rate if lr_ratio else None,
                               mu_dtype=mu_dtype),
      optax.scale_by_learning_rate(learning_rate),
  )


def am_adamw(
    learning_rate: optax.ScalarOrSchedule,
    b2: float = 0.999,
    eps: float = 1e-8,
    lam: float = 0.1,
    beta_max: float = 0.9,
    weight_decay: float = 0.0,
    mask: Any = None,
    *,
    granularity: str = "per_tensor",
    beta_min: float = 0.0,
    restart_threshold: float | None = None,
    lr_ratio: bool = True,
    mu_dtype: Any | None = None,
) -> optax.GradientTransformationExtraArgs:
  """AM-AdamW: x <- (1 - lr wd) x - lr P^{-1} d_{t+1} (docs/adaptive_memory.md §3).

  Update rule: :func:`scale_by_am_adam`, then decoupled weight decay and the learning rate.
  ``beta_max`` defaults to the paper text's 0.9 (a third-party port uses 0.89 = 0.9 - 0.1 lam).
  State = AdamW's (d, v) plus scalars.

  Args:
    learning_rate: scalar or schedule of the 0-based count.
    b2: second-moment decay in [0, 1).
    eps: added to the square root of the second moment.
    lam: proximal weight lambda >= 0 (paper: 0.1).
    beta_max: upper clip of beta_t, in [0, 1) (paper: 0.9).
    weight_decay: decoupled weight decay (scaled by the learning rate).
    mask: a pytree of booleans (or a function of the params) selecting the decayed leaves.
    granularity: "per_tensor" (default) or "global".
    beta_min: lower clip of beta_t (the Clip variant when > 0).
    restart_threshold: tau of the Restart variant (None: off).
    lr_ratio: use lr_{t-1} / lr_t in the gap estimate when ``learning_rate`` is a schedule.
    mu_dtype: dtype of d (v stays at least float32: docs/conventions.md).

  Returns:
    The full optimizer.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax_accel as oa
    >>> opt = oa.am_adamw(1e-3, weight_decay=0.1)
    >>> state = opt.init({"w": jnp.zeros((4, 4))})

  References:
    Topollai, Choromanska, *Adaptive Memory Momentum via a Model-Based Framework for Deep Learning
    Optimization*, AISTATS 2026, arXiv:2510.04988.
  """
  return C.full_optimizer(
      scale_by_am_adam(b2, eps, lam, beta_max, weight_decay=weight_decay, mask=mask,
                       granularity=granularity, beta_min=beta_min,
                       restart_threshold=restart_threshold,
                       learning_rate=learning_rate if lr_ratio else None, mu_dtype=mu_dtype),
      learning_rate, weight_decay, mask)
