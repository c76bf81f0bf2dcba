"""AdEMAMix and Simplified-AdEMAMix, with the papers' schedulers and dtype-stable state.

AdEMAMix (Pagliardini, Ablin, Grangier, ICLR 2025, arXiv:2409.03137; apple/ml-ademamix), t >= 1:

    m1_t = b1 m1_{t-1} + (1-b1) g_t;   m2_t = b3(t) m2_{t-1} + (1-b3(t)) g_t;
    v_t  = b2 v_{t-1} + (1-b2) g_t^2
    direction = (m1_t / (1-b1^t) + alpha(t) m2_t) / (sqrt(v_t / (1-b2^t) + eps_root) + eps)

m2 is not bias corrected; with b1 = 0 there is no m1 buffer (m1 = g).

Simplified-AdEMAMix (Morwani et al. 2025, arXiv:2502.02431; DepenM/Simplified-AdEMAMix):

    m_t = b1(t) m_{t-1} + g_t   (theory-style, no (1-b1));   v_t as above
    direction = (alpha g_t + m_t) / (sqrt(v_t / (1-b2^t) + eps_root) + eps)   [/ N_t if bias_correction1]
    N_t = b1(t) N_{t-1} + 1

Schedule indexing: schedules are called with the 0-based count (optax's convention, as
``optax.contrib.ademamix``), so step t uses ``schedule(t-1)``. The PyTorch references evaluate
their schedulers at the 1-based step t: our warmups reach their target one step later.
The half-life scheduler uses ln(beta) exactly (PyTorch adds 1e-8 inside the log).
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_accel import _common as C

# ----------------------------------------------------------------------------------------------
# Schedulers.


def alpha_warmup_schedule(alpha: float, warmup_steps: int, alpha_start: float = 0.0
                          ) -> optax.Schedule:
  """AdEMAMix's alpha scheduler: linear from ``alpha_start`` (count 0) to ``alpha`` (count T).

  Args:
    alpha: final value (>= 0).
    warmup_steps: T, the count at which ``alpha`` is reached.
    alpha_start: value at count 0.

  Returns:
    A schedule of the 0-based count.

  Examples:
    >>> import optax_accel as oa
    >>> schedule = oa.alpha_warmup_schedule(8.0, 100)
    >>> print(float(schedule(50)), float(schedule(200)))
    4.0 8.0

  References:
    Pagliardini, Ablin, Grangier, *The AdEMAMix Optimizer: Better, Faster, Older*, ICLR 2025,
    arXiv:2409.03137.
  """
  C.check_nonnegative("alpha", alpha)
  C.check_nonnegative("alpha_start", alpha_start)
  C.check_steps("warmup_steps", warmup_steps, allow_none=False)
  return lambda count: alpha_start + (alpha - alpha_start) * C.warmup_fraction(count, warmup_steps)


def beta_warmup_schedule(beta_end: float, warmup_steps: int, beta_start: float) -> optax.Schedule:
  """AdEMAMix's beta3 scheduler: the half-life h(b) = ln(0.5)/ln(b) - 1 grows linearly.

  With a = min(count / T, 1)::

      beta(count) = exp(ln(beta_start) ln(beta_end) / ((1 - a) ln(beta_end) + a ln(beta_start)))

  Also used for Simplified-AdEMAMix's b1 warmup. Exactly ``beta_end`` from count T on.

  Args:
    beta_end: final value in (0, 1).
    warmup_steps: T.
    beta_start: value at count 0, in (0, 1).

  Returns:
    A schedule of the 0-based count.

  Examples:
    >>> import optax_accel as oa
    >>> schedule = oa.beta_warmup_schedule(0.9999, 1000, beta_start=0.9)
    >>> print(round(float(schedule(0)), 4), round(float(schedule(1000)), 4))
    0.9 0.9999

  References:
    Pagliardini, Ablin, Grangier, *The AdEMAMix Optimizer: Better, Faster, Older*, ICLR 2025,
    arXiv:2409.03137.
  """
  C.check_range("beta_end", beta_end, 0.0, 1.0, lo_open=True, hi_open=True)
  C.check_range("beta_start", beta_start, 0.0, 1.0, lo_open=True, hi_open=True)
  C.check_steps("warmup_steps", warmup_steps, allow_none=False)

  def schedule(count):
    # In the count's float precision, so that injected (array) betas give the same values.
    log_start, log_end = (jnp.log(C.as_float(b)) for b in (beta_start, beta_end))
    a = C.warmup_fraction(count, warmup_steps)
    beta = jnp.exp(log_start * log_end / ((1 - a) * log_end + a * log_start))
    return jnp.where(a >= 1.0, beta_end, beta)

  return schedule


# ----------------------------------------------------------------------------------------------
# Shared pieces.


def _second_moment_denominator(nu, b2, count, eps, eps_root):
  nu_hat = optax.tree.bias_correction(nu, b2, count)
  return jax.tree.map(lambda n: jnp.sqrt(n + eps_root) + eps, nu_hat)


def _half_life_warmup(name, target, warmup_steps, start, start_name):
  """``target`` as is, or grown from ``start`` over ``warmup_steps`` by the half-life scheduler."""
  if C.steps_off(warmup_steps):
    return target
  if callable(target):
    raise ValueError(f"`{name}` must be a float when `{name}_warmup` is given.")
  if C.all_concrete(target, start) and target <= start:
    raise ValueError(f"`{name}` must be greater than `{start_name}` with `{name}_warmup` (the "
                     f"warmup goes from {start_name} to {name}), got {name}={target}, "
                     f"{start_name}={start}.")
  return beta_warmup_schedule(target, warmup_steps, start)


def _check_common(b2, eps, eps_root, alpha):
  C.check_beta("b2", b2)
  C.check_nonnegative("eps", eps)
  C.check_nonnegative("eps_root", eps_root)
  C.check_nonnegative("alpha", alpha)


# ----------------------------------------------------------------------------------------------
# AdEMAMix.


class ScaleByAdEMAMixState(NamedTuple):
  """State of ``scale_by_ademamix``; ``m1`` is ``None`` when b1 == 0."""
  count: jax.Array
  b3: jax.Array  # slow-EMA coefficient applied at the last step
  alpha: jax.Array  # slow-EMA weight applied at the last step
  m1: optax.Updates | None
  m2: optax.Updates
  nu: optax.Updates

  def diagnostics(self) -> dict[str, jax.Array]:
    return {"ademamix_b3": self.b3, "ademamix_alpha": self.alpha}


def scale_by_ademamix(
    b1: float = 0.9,
    b2: float = 0.999,
    b3: optax.ScalarOrSchedule = 0.9999,
    alpha: optax.ScalarOrSchedule = 5.0,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    *,
    mu_dtype: Any | None = None,
) -> optax.GradientTransformationExtraArgs:
  """AdEMAMix direction: fast EMA + alpha * slow EMA, over Adam's denominator.

  Update rule (t >= 1)::

      m1_t = b1 m1_{t-1} + (1 - b1) g_t;   m2_t = b3_t m2_{t-1} + (1 - b3_t) g_t
      v_t = b2 v_{t-1} + (1 - b2) g_t^2
      direction = (m1_t / (1 - b1^t) + alpha_t m2_t) / (sqrt(v_t / (1 - b2^t) + eps_root) + eps)

  The default alpha is 5.0 in both the transform and the alias (optax.contrib uses 6.0 in its
  transform and 5.0 in its alias).

  Args:
    b1: fast-EMA decay in [0, 1); 0 drops the fast EMA (m1 = g, no buffer).
    b2: second-moment decay in [0, 1).
    b3: slow-EMA decay in [0, 1) (scalar or schedule of the 0-based count).
    alpha: slow-EMA weight >= 0 (scalar or schedule).
    eps: added to the square root of the second moment.
    eps_root: added inside the square root.
    mu_dtype: dtype of m1 (m2 and v stay at least float32: docs/conventions.md).

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax_accel as oa
    >>> tx = oa.scale_by_ademamix(alpha=5.0)
    >>> state = tx.init(jnp.zeros(2))
    >>> direction, state = tx.update(jnp.ones(2), state)
    >>> print(jnp.round(direction, 4))  # (1 + 5 * 1e-4) / 1 at the first step
    [1.0005 1.0005]

  References:
    Pagliardini, Ablin, Grangier, *The AdEMAMix Optimizer: Better, Faster, Older*, ICLR 2025,
    arXiv:2409.03137.
  """
  C.check_beta("b1", b1)
  C.check_range("b3", b3, 0.0, 1.0, hi_open=True)
  _check_common(b2, eps, eps_root, alpha)
  has_m1 = not C.is_static_zero(b1)

  def init_fn(params):
    return ScaleByAdEMAMixState(
        count=C.count_init(), b3=C.recorded_init(b3), alpha=C.recorded_init(alpha),
        m1=C.zeros(params, mu_dtype) if has_m1 else None,
        m2=C.accumulator_zeros(params), nu=C.accumulator_zeros(params))

  def update_fn(updates, state, params=None):
    del params
    b3_t = C.at(b3, state.count)
    alpha_t = C.at(alpha, state.count)
    count = optax.safe_increment(state.count)
    m2 = optax.tree.update_moment(updates, state.m2, b3_t, 1)
    nu = optax.tree.update_moment_per_elem_norm(updates, state.nu, b2, 2)
    if has_m1:
      m1 = optax.tree.update_moment(updates, state.m1, b1, 1)
      fast = optax.tree.bias_correction(m1, b1, count)
    else:
      m1, fast = None, updates
    denom = _second_moment_denominator(nu, b2, count, eps, eps_root)
    direction = jax.tree.map(lambda f, s, d, u: ((f + alpha_t * s) / d).astype(u.dtype),
                             fast, m2, denom, updates)
    return direction, ScaleByAdEMAMixState(
        count=count, b3=C.recorded(b3, b3_t, state.b3),
        alpha=C.recorded(alpha, alpha_t, state.alpha),
        m1=C.cast_like(m1, state.m1) if has_m1 else None,
        m2=C.cast_like(m2, state.m2), nu=C.cast_like(nu, state.nu))

  return C.with_extra_args(init_fn, update_fn)


def ademamix(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    b3: optax.ScalarOrSchedule = 0.9999,
    alpha: optax.ScalarOrSchedule = 5.0,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    mask: Any = None,
    *,
    alpha_warmup: int | None = None,
    b3_warmup: int | None = None,
    mu_dtype: Any | None = None,
) -> optax.GradientTransformationExtraArgs:
  """AdEMAMix with decoupled weight decay: w <- w - lr (direction + weight_decay w).

  Update rule: :func:`scale_by_ademamix`, then decoupled weight decay and the learning rate.

  Args:
    learning_rate: scalar or schedule of the 0-based count.
    b1: fast-EMA decay in [0, 1); 0 drops the fast EMA (m1 = g, no buffer).
    b2: second-moment decay in [0, 1).
    b3: slow-EMA decay in [0, 1) (scalar or schedule of the 0-based count).
    alpha: slow-EMA weight >= 0 (scalar or schedule).
    eps: added to the square root of the second moment.
    eps_root: added inside the square root.
    weight_decay: decoupled weight decay (scaled by the learning rate).
    mask: a pytree of booleans (or a function of the params) selecting the decayed leaves.
    alpha_warmup: T: alpha grows linearly from 0 over T steps (the paper: the run length).
    b3_warmup: T: b3 grows from b1 linearly in half-life over T steps.
    mu_dtype: dtype of m1 (m2 and v stay at least float32: docs/conventions.md).

  Returns:
    The full optimizer.

  Raises:
    ValueError: out-of-range coefficients, or a schedule given with its warmup.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optax_accel as oa
    >>> opt = oa.ademamix(1e-3, alpha=8.0, alpha_warmup=10_000, b3_warmup=10_000,
    ...                   weight_decay=0.1)
    >>> params = {"w": jnp.ones(3)}
    >>> state = opt.init(params)
    >>> updates, state = opt.update({"w": jnp.ones(3)}, state, params)
    >>> print(optax.apply_updates(params, updates)["w"])  # 1 - 1e-3 (1 + 0.1)
    [0.9989 0.9989 0.9989]

  References:
    Pagliardini, Ablin, Grangier, *The AdEMAMix Optimizer: Better, Faster, Older*, ICLR 2025,
    arXiv:2409.03137.
  """
  C.check_steps("alpha_warmup", alpha_warmup)
  C.check_steps("b3_warmup", b3_warmup)
  if not C.steps_off(alpha_warmup):
    if callable(alpha):
      raise ValueError("`alpha` must be a float when `alpha_warmup` is given.")
    alpha = alpha_warmup_schedule(alpha, alpha_warmup)
  b3 = _half_life_warmup("b3", b3, b3_warmup, b1, "b1")
  return C.full_optimizer(scale_by_ademamix(b1, b2, b3, alpha, eps, eps_root, mu_dtype=mu_dtype),
                          learning_rate, weight_decay, mask)


# ----------------------------------------------------------------------------------------------
# Simplified-AdEMAMix.


class ScaleBySimplifiedAdEMAMixState(NamedTuple):
  """State of ``scale_by_simplified_ademamix``."""
  count: jax.Array
  b1: jax.Array  # momentum coefficient applied at the last step
  alpha: jax.Array
  momentum_sum: jax.Array  # N_t = b1(t) N_{t-1} + 1 (used when bias_correction1)
  m: optax.Updates
  nu: optax.Updates

  def diagnostics(self) -> dict[str, jax.Array]:
    return {"simplified_ademamix_b1": self.b1, "simplified_ademamix_alpha": self.alpha}


def scale_by_simplified_ademamix(
    b1: optax.ScalarOrSchedule = 0.99,
    b2: float = 0.95,
    alpha: optax.ScalarOrSchedule = 0.0,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    *,
    b1_warmup: int | None = None,
    b1_start: float = 0.9,
    bias_correction1: bool = False,
    mu_dtype: Any | None = None,
) -> optax.GradientTransformationExtraArgs:
  """Simplified-AdEMAMix direction: one theory-style momentum plus alpha times the gradient.

  Update rule::

      m_t = b1_t m_{t-1} + g_t;   v_t = b2 v_{t-1} + (1 - b2) g_t^2
      direction = (alpha_t g_t + m_t) / (sqrt(v_t / (1 - b2^t) + eps_root) + eps)   [/ N_t]

  with N_t = b1_t N_{t-1} + 1 when ``bias_correction1``. optax.contrib has no b1 warmup.

  Args:
    b1: momentum coefficient in [0, 1) (scalar or schedule).
    b2: second-moment decay in [0, 1).
    alpha: weight of the current gradient >= 0 (scalar or schedule).
    eps: added to the square root of the second moment.
    eps_root: added inside the square root.
    b1_warmup: T: b1 grows from ``b1_start`` linearly in half-life over T steps (the reference's
      ``beta1_warmup``/``min_beta1``).
    b1_start: b1 at count 0 of the warmup.
    bias_correction1: divide by N_t (off by default, as the reference).
    mu_dtype: dtype of m (v stays at least float32: docs/conventions.md).

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax_accel as oa
    >>> tx = oa.scale_by_simplified_ademamix(b1=0.9, alpha=2.0)
    >>> state = tx.init(jnp.zeros(1))
    >>> for _ in range(2):
    ...   direction, state = tx.update(jnp.ones(1), state)
    >>> print(f"{float(direction[0]):.4f}")  # (2 + 0.9 + 1) / 1
    3.9000

  References:
    Morwani, Vyas, Zhang, Kakade, *Connections between Schedule-Free Optimizers, AdEMAMix, and
    Accelerated SGD Variants*, arXiv:2502.02431, 2025.
  """
  C.check_range("b1", b1, 0.0, 1.0, hi_open=True)
  _check_common(b2, eps, eps_root, alpha)
  C.check_steps("b1_warmup", b1_warmup)
  b1 = _half_life_warmup("b1", b1, b1_warmup, b1_start, "b1_start")

  def init_fn(params):
    return ScaleBySimplifiedAdEMAMixState(
        count=C.count_init(), b1=C.recorded_init(b1), alpha=C.recorded_init(alpha),
        momentum_sum=C.scalar(0.0), m=C.zeros(params, mu_dtype), nu=C.accumulator_zeros(params))

  def update_fn(updates, state, params=None):
    del params
    b1_t = C.at(b1, state.count)
    alpha_t = C.at(alpha, state.count)
    count = optax.safe_increment(state.count)
    m = jax.tree.map(lambda mm, g: b1_t * mm + g, state.m, updates)
    nu = optax.tree.update_moment_per_elem_norm(updates, state.nu, b2, 2)
    momentum_sum = b1_t * state.momentum_sum + 1
    norm = momentum_sum if bias_correction1 else 1.0
    denom = _second_moment_denominator(nu, b2, count, eps, eps_root)
    direction = jax.tree.map(lambda g, mm, d: ((alpha_t * g + mm) / (d * norm)).astype(g.dtype),
                             updates, m, denom)
    return direction, ScaleBySimplifiedAdEMAMixState(
        count=count, b1=C.recorded(b1, b1_t, state.b1),
        alpha=C.recorded(alpha, alpha_t, state.alpha),
        momentum_sum=C.scalar(momentum_sum), m=C.cast_like(m, state.m),
        nu=C.cast_like(nu, state.nu))

  return C.with_extra_args(init_fn, update_fn)


def simplified_ademamix(
    learning_rate: optax.ScalarOrSchedule,
    b1: optax.ScalarOrSchedule = 0.99,
    b2: float = 0.95,
    alpha: optax.ScalarOrSchedule = 0.0,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    mask: Any = None,
    *,
    b1_warmup: int | None = None,
    b1_start: float = 0.9,
    bias_correction1: bool = False,
    mu_dtype: Any | None = None,
) -> optax.GradientTransformationExtraArgs:
  """Simplified-AdEMAMix with decoupled weight decay: w <- w - lr (direction + weight_decay w).

  Update rule: :func:`scale_by_simplified_ademamix`, then decoupled weight decay and the learning
  rate. Exact relation (docs/ademamix.md §2, tested): AdEMAMix(b1=0, b3, alpha, lr, wd) equals
  this with b1 := b3, alpha := 1/(alpha (1-b3)), lr := lr alpha (1-b3), wd := wd/(alpha (1-b3)).

  Args:
    learning_rate: scalar or schedule of the 0-based count (typically ~100x smaller than Adam's).
    b1: momentum coefficient in [0, 1) (scalar or schedule).
    b2: second-moment decay in [0, 1).
    alpha: weight of the current gradient >= 0 (scalar or schedule).
    eps: added to the square root of the second moment.
    eps_root: added inside the square root.
    weight_decay: decoupled weight decay (scaled by the learning rate).
    mask: a pytree of booleans (or a function of the params) selecting the decayed leaves.
    b1_warmup: T: b1 grows from ``b1_start`` linearly in half-life over T steps.
    b1_start: b1 at count 0 of the warmup.
    bias_correction1: divide the numerator by N_t.
    mu_dtype: dtype of m (v stays at least float32: docs/conventions.md).

  Returns:
    The full optimizer.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax_accel as oa
    >>> opt = oa.simplified_ademamix(1e-5, b1=0.999, alpha=100.0, b1_warmup=5_000)
    >>> state = opt.init({"w": jnp.zeros(3)})

  References:
    Morwani, Vyas, Zhang, Kakade, *Connections between Schedule-Free Optimizers, AdEMAMix, and
    Accelerated SGD Variants*, arXiv:2502.02431, 2025.
  """
  return C.full_optimizer(
      scale_by_simplified_ademamix(b1, b2, alpha, eps, eps_root, b1_warmup=b1_warmup,
                                   b1_start=b1_start, bias_correction1=bias_correction1,
                                   mu_dtype=mu_dtype),
      learning_rate, weight_decay, mask)
