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

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_accel import _common as C

# ----------------------------------------------------------------------------------------------
# Schedulers.


def alpha_warmup_schedule(alpha: float, warmup_steps: int, alpha_start: float = 0.0
                          ) -> optax.Schedule:
  """AdEMAMix's alpha scheduler: linear from ``alpha_start`` (count 0) to ``alpha`` (count T)."""
  C.check_nonnegative("alpha", alpha)
  C.check_nonnegative("alpha_start", alpha_start)
  C.check_steps("warmup_steps", warmup_steps, allow_none=False)
  return lambda count: alpha_start + (alpha - alpha_start) * C.warmup_fraction(count, warmup_steps)


def beta_warmup_schedule(beta_end: float, warmup_steps: int, beta_start: float) -> optax.Schedule:
  """AdEMAMix's beta3 scheduler: the half-life h(b) = ln(0.5)/ln(b) - 1 grows linearly.

  With a = min(count / T, 1):  beta(count) = f^-1((1-a) f(beta_start) + a f(beta_end)),
  f(b) = ln 0.5 / ln b - 1, f^-1(s) = 0.5^(1/(s+1)); equivalently
  beta = exp(ln(beta_start) ln(beta_end) / ((1-a) ln(beta_end) + a ln(beta_start))).
  Also used for Simplified-AdEMAMix's beta1 warmup. Exactly ``beta_end`` from count T on.
  """
  C.check_range("beta_end", beta_end, 0.0, 1.0, lo_open=True, hi_open=True)
  C.check_range("beta_start", beta_start, 0.0, 1.0, lo_open=True, hi_open=True)
  C.check_steps("warmup_steps", warmup_steps, allow_none=False)
  log_start, log_end = math.log(beta_start), math.log(beta_end)

  def schedule(count):
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
  if not warmup_steps:
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
  """AdEMAMix direction (module docstring). ``mu_dtype`` sets the dtype of m1, m2 and v.

  The default alpha is 5.0 in both the transform and the alias (optax.contrib uses 6.0 in its
  transform and 5.0 in its alias).
  """
  C.check_beta("b1", b1)
  C.check_range("b3", b3, 0.0, 1.0, hi_open=True)
  _check_common(b2, eps, eps_root, alpha)
  has_m1 = not C.is_static_zero(b1)

  def init_fn(params):
    return ScaleByAdEMAMixState(
        count=C.count_init(), b3=C.recorded_init(b3), alpha=C.recorded_init(alpha),
        m1=C.zeros(params, mu_dtype) if has_m1 else None,
        m2=C.zeros(params, mu_dtype), nu=C.zeros(params, mu_dtype))

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

  ``alpha_warmup=T`` makes alpha linear from 0 to ``alpha`` over T steps; ``b3_warmup=T`` makes
  b3 grow from ``b1`` to ``b3`` linearly in half-life over T steps (the paper's schedulers; the
  paper uses T = total steps). Both need float ``alpha``/``b3``.
  """
  C.check_steps("alpha_warmup", alpha_warmup)
  C.check_steps("b3_warmup", b3_warmup)
  if alpha_warmup:
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
  """Simplified-AdEMAMix direction (module docstring); one momentum buffer.

  ``b1_warmup=T`` grows b1 from ``b1_start`` to ``b1`` linearly in half-life over T steps
  (DepenM's ``beta1_warmup``/``min_beta1``); optax.contrib has no such warmup.
  ``bias_correction1`` divides by N_t (off by default, as the reference).
  """
  C.check_range("b1", b1, 0.0, 1.0, hi_open=True)
  _check_common(b2, eps, eps_root, alpha)
  C.check_steps("b1_warmup", b1_warmup)
  b1 = _half_life_warmup("b1", b1, b1_warmup, b1_start, "b1_start")

  def init_fn(params):
    return ScaleBySimplifiedAdEMAMixState(
        count=C.count_init(), b1=C.recorded_init(b1), alpha=C.recorded_init(alpha),
        momentum_sum=C.scalar(0.0), m=C.zeros(params, mu_dtype), nu=C.zeros(params, mu_dtype))

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

  Exact relation (docs/ademamix.md §2, tested): AdEMAMix(b1=0, b3, alpha, lr, wd) equals this with
  b1 := b3, alpha := 1/(alpha (1-b3)), lr := lr alpha (1-b3), wd := wd / (alpha (1-b3)).
  """
  return C.full_optimizer(
      scale_by_simplified_ademamix(b1, b2, alpha, eps, eps_root, b1_warmup=b1_warmup,
                                   b1_start=b1_start, bias_correction1=bias_correction1,
                                   mu_dtype=mu_dtype),
      learning_rate, weight_decay, mask)
