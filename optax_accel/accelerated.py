"""Accelerated SGD in canonical form and its named theoretical variants.

Canonical form (Morwani, Vyas, Zhang, Kakade 2025, "Connections between Schedule-Free Optimizers,
AdEMAMix, and Accelerated SGD Variants", arXiv:2502.02431; notation of docs/accelerated_sgd.md §1):

    m_t     = beta_t * m_{t-1} + u_t                     (m_0 = 0, "theory-style" momentum)
    w_{t+1} = w_t - a_t * u_t - b_t * m_t

``u_t`` is the incoming update (a gradient, or an already preconditioned direction). Heavy ball is
a = 0, Nesterov a = eta, b = eta*beta; *accelerated* SGD chooses the current-direction weight a_t
independently of the momentum coefficient beta_t.

``scale_by_accelerated_momentum`` returns the direction ``alpha_t * u_t + momentum_weight_t * m_t``,
so after ``optax.scale_by_learning_rate(eta)``: a = eta * alpha and b = eta * momentum_weight.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import optax

from optax_accel import _common as C


class AcceleratedMomentumState(NamedTuple):
  """State of ``scale_by_accelerated_momentum``."""
  count: jax.Array  # int32, number of updates applied
  beta: jax.Array  # momentum coefficient applied at the last step
  mu: optax.Updates  # theory-style momentum m_t

  def diagnostics(self) -> dict[str, jax.Array]:
    return {"momentum_beta": self.beta}


def scale_by_accelerated_momentum(
    beta: optax.ScalarOrSchedule = 0.9,
    alpha: optax.ScalarOrSchedule = 1.0,
    *,
    momentum_weight: optax.ScalarOrSchedule = 1.0,
    mu_dtype: Any | None = None,
) -> optax.GradientTransformationExtraArgs:
  """Canonical accelerated momentum: ``m = beta*m + u``; direction ``alpha*u + momentum_weight*m``.

  Update rule (u the incoming update, m_0 = 0)::

      m_t = beta_t m_{t-1} + u_t
      direction_t = alpha_t u_t + momentum_weight_t m_t

  After ``optax.scale_by_learning_rate(eta)`` this is accelerated SGD with current weight
  a = eta alpha and momentum weight b = eta momentum_weight (docs/accelerated_sgd.md §1).

  Args:
    beta: momentum coefficient beta_t in [0, 1] (scalar or schedule of the 0-based count).
    alpha: weight of the current direction, relative to ``momentum_weight`` (scalar or schedule).
    momentum_weight: weight of the momentum m_t (scalar or schedule), so that variants whose
      current weight does not divide the momentum weight (b_t = 0, schedules through zero) need
      no division.
    mu_dtype: dtype of the momentum buffer; it keeps that dtype after any number of updates.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; extra ``update`` kwargs are ignored.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax_accel as oa
    >>> tx = oa.scale_by_accelerated_momentum(beta=0.5, alpha=2.0)
    >>> state = tx.init(jnp.zeros(2))
    >>> direction, state = tx.update(jnp.ones(2), state)
    >>> direction, state = tx.update(jnp.ones(2), state)
    >>> print(direction)  # 2 * 1 + (0.5 * 1 + 1)
    [3.5 3.5]

  References:
    Morwani, Vyas, Zhang, Kakade, *Connections between Schedule-Free Optimizers, AdEMAMix, and
    Accelerated SGD Variants*, arXiv:2502.02431, 2025.
  """
  C.check_range("beta", beta, 0.0, 1.0)
  C.check_range("alpha", alpha)
  C.check_range("momentum_weight", momentum_weight)

  def init_fn(params):
    return AcceleratedMomentumState(
        count=C.count_init(), beta=C.scalar(0.0), mu=C.zeros(params, mu_dtype))

  def update_fn(updates, state, params=None):
    del params
    beta_t = C.at(beta, state.count)
    alpha_t = C.at(alpha, state.count)
    weight_t = C.at(momentum_weight, state.count)
    mu = jax.tree.map(lambda m, u: beta_t * m + u, state.mu, updates)
    direction = jax.tree.map(
        lambda u, m: (alpha_t * u + weight_t * m).astype(u.dtype), updates, mu)
    new_state = AcceleratedMomentumState(
        count=optax.safe_increment(state.count),
        beta=C.scalar(beta_t, state.beta.dtype),
        mu=C.cast_like(mu, state.mu))
    return direction, new_state

  return C.with_extra_args(init_fn, update_fn)


def accelerated_sgd(
    learning_rate: optax.ScalarOrSchedule,
    beta: optax.ScalarOrSchedule = 0.9,
    alpha: optax.ScalarOrSchedule = 1.0,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    mask: Any = None,
    *,
    mu_dtype: Any | None = None,
) -> optax.GradientTransformationExtraArgs:
  """Accelerated SGD: momentum with the current gradient's weight decoupled from beta.

  Update rule::

      m_t = beta_t m_{t-1} + g_t
      w_{t+1} = w_t - lr_t (alpha_t g_t + m_t) - lr_t weight_decay w_t

  In the canonical form a = lr alpha and b = lr: heavy ball is alpha = 0; Nesterov with step eta
  is lr = eta beta, alpha = 1 / beta; accelerated SGD chooses alpha independently of beta.

  Args:
    learning_rate: lr (scalar or schedule of the 0-based count).
    beta: momentum coefficient in [0, 1).
    alpha: weight of the current gradient relative to the momentum.
    weight_decay: decoupled weight decay (scaled by the learning rate).
    mask: a pytree of booleans (or a function of the params) selecting the decayed leaves.
    mu_dtype: dtype of the momentum buffer.

  Returns:
    The full optimizer (direction, weight decay, ``-learning_rate``).

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optax_accel as oa
    >>> opt = oa.accelerated_sgd(0.1, beta=0.9, alpha=0.5)
    >>> params = jnp.array([1.0, -2.0])
    >>> state = opt.init(params)
    >>> updates, state = opt.update(jnp.array([1.0, 1.0]), state, params)
    >>> print(optax.apply_updates(params, updates))  # w - 0.1 (0.5 g + g)
    [ 0.85 -2.15]

  References:
    Morwani, Vyas, Zhang, Kakade, *Connections between Schedule-Free Optimizers, AdEMAMix, and
    Accelerated SGD Variants*, arXiv:2502.02431, 2025.
  """
  C.check_beta("beta", beta)
  return C.full_optimizer(scale_by_accelerated_momentum(beta, alpha, mu_dtype=mu_dtype),
                          learning_rate, weight_decay, mask)


# ----------------------------------------------------------------------------------------------
# Named variants: each maps its original recursion onto the canonical form (docs/accelerated_sgd.md §2).


def _accsgd_coefficients(kappa: float, xi: float, small_const: float) -> tuple[float, float]:
  """AccSGD (Kidambi et al. 2018): beta = zeta*(1 - c^2 xi/kappa), b/a = (1-zeta)(c xi - 1)."""
  c = small_const
  b_mix = c * c * xi / kappa  # B = 1 - A
  zeta = c / (c + b_mix)
  return zeta * (1.0 - b_mix), (1.0 - zeta) * (c * xi - 1.0)


def accsgd(
    learning_rate: optax.ScalarOrSchedule,
    kappa: float = 1000.0,
    xi: float = 10.0,
    small_const: float = 0.7,
    *,
    mu_dtype: Any | None = None,
) -> optax.GradientTransformationExtraArgs:
  """AccSGD of Kidambi, Netrapalli, Jain, Kakade (ICLR 2018), in canonical form.

  Update rule of the official code (delta = ``learning_rate``, L = kappa delta / c,
  A = 1 - c^2 xi / kappa, B = 1 - A, zeta = c / (c + B))::

      wbar_{t+1} = A wbar_t + B (w_t - L g_t)
      w_{t+1} = zeta (w_t - delta g_t) + (1 - zeta) wbar_{t+1}

  Canonical: beta = zeta A, a = delta, b = (1 - zeta)(c xi - 1) delta (exact, tested).

  Args:
    learning_rate: the short step delta (scalar or schedule).
    kappa: long-step factor (condition-number estimate), > 0.
    xi: statistical advantage, > 0, with small_const^2 xi <= kappa.
    small_const: the constant c, > 0.
    mu_dtype: dtype of the momentum buffer.

  Returns:
    The full optimizer.

  Raises:
    ValueError: non-positive kappa, xi or small_const, or small_const^2 xi > kappa.

  Examples:
    >>> import optax_accel as oa
    >>> coeffs = oa.canonical_coefficients("accsgd")
    >>> print(round(coeffs["beta"], 4), round(coeffs["b"] / coeffs["a"], 4))
    0.9882 0.0417

  References:
    Kidambi, Netrapalli, Jain, Kakade, *On the insufficiency of existing momentum schemes for
    Stochastic Optimization*, ICLR 2018.
  """
  C.check_learning_rate(learning_rate)
  C.check_range("kappa", kappa, 0.0, lo_open=True)
  C.check_range("xi", xi, 0.0, lo_open=True)
  C.check_range("small_const", small_const, 0.0, lo_open=True)
  if C.all_concrete(kappa, xi, small_const) and small_const * small_const * xi > kappa:
    raise ValueError("`small_const`**2 * `xi` must not exceed `kappa` (A = 1 - c^2 xi/kappa >= 0), "
                     f"got {small_const}**2 * {xi} > {kappa}.")
  beta, b_over_a = _accsgd_coefficients(kappa, xi, small_const)
  return optax.chain(
      scale_by_accelerated_momentum(beta, 1.0, momentum_weight=b_over_a, mu_dtype=mu_dtype),
      optax.scale_by_learning_rate(learning_rate),
  )


def mass_sgd(
    learning_rate: optax.ScalarOrSchedule,
    alpha: float = 0.05,
    kappa_tilde: float = 12.0,
    *,
    mu_dtype: Any | None = None,
) -> optax.GradientTransformationExtraArgs:
  """MaSS of Liu & Belkin (ICLR 2020), in canonical form.

  Update rule (eta = ``learning_rate``, delta = eta / (alpha kappa_tilde); u is the gradient
  point)::

      w_{t+1} = u_t - eta g_t
      v_{t+1} = (1 - alpha) v_t + alpha u_t - delta g_t
      u_{t+1} = (alpha v_{t+1} + w_{t+1}) / (1 + alpha)

  Canonical: beta = (1 - alpha)/(1 + alpha), a = eta, b = eta (1/kappa_tilde - alpha)/(1 + alpha).

  Args:
    learning_rate: eta (scalar or schedule).
    alpha: in (0, 1).
    kappa_tilde: > 0.
    mu_dtype: dtype of the momentum buffer.

  Returns:
    The full optimizer.

  Examples:
    >>> import optax_accel as oa
    >>> print(round(oa.canonical_coefficients("mass")["beta"], 4))
    0.9048

  References:
    Liu, Belkin, *Accelerating SGD with momentum for over-parameterized learning*, ICLR 2020.
  """
  C.check_learning_rate(learning_rate)
  C.check_range("alpha", alpha, 0.0, 1.0, lo_open=True, hi_open=True)
  C.check_range("kappa_tilde", kappa_tilde, 0.0, lo_open=True)
  beta = (1.0 - alpha) / (1.0 + alpha)
  b_over_a = (1.0 / kappa_tilde - alpha) / (1.0 + alpha)
  return optax.chain(
      scale_by_accelerated_momentum(beta, 1.0, momentum_weight=b_over_a, mu_dtype=mu_dtype),
      optax.scale_by_learning_rate(learning_rate),
  )


def agnes(
    learning_rate: optax.ScalarOrSchedule,
    correction_lr: float,
    momentum: float = 0.99,
    *,
    mu_dtype: Any | None = None,
) -> optax.GradientTransformationExtraArgs:
  """AGNES of Gupta, Siegel, Wojtowytsch (NeurIPS 2024), in canonical form.

  Update rule (alpha = ``learning_rate``, eta = ``correction_lr``, rho = ``momentum``)::

      x'_n = x_n + alpha v_n
      x_{n+1} = x'_n - eta g(x'_n)
      v_{n+1} = rho (v_n - g(x'_n))

  The parameters optax sees are the extrapolated points x' (where gradients are taken).
  Canonical: beta = rho, a = eta, b = alpha rho.

  Args:
    learning_rate: alpha, the primary step (scalar or schedule).
    correction_lr: eta, the correction step (>= 0); eta = alpha is Nesterov.
    momentum: rho in [0, 1).
    mu_dtype: dtype of the momentum buffer.

  Returns:
    The full optimizer.

  Examples:
    >>> import optax_accel as oa
    >>> oa.canonical_coefficients("agnes", learning_rate=0.1, correction_lr=0.01, momentum=0.9)
    {'beta': 0.9, 'a': 0.01, 'b': 0.09000000000000001}

  References:
    Gupta, Siegel, Wojtowytsch, *Nesterov acceleration despite very noisy gradients*, NeurIPS 2024.
  """
  C.check_learning_rate(learning_rate)
  C.check_range("correction_lr", correction_lr, 0.0)
  C.check_beta("momentum", momentum)
  return optax.chain(
      scale_by_accelerated_momentum(
          momentum, correction_lr, momentum_weight=C.scaled(learning_rate, momentum),
          mu_dtype=mu_dtype),
      optax.scale(-1.0),
  )


# ----------------------------------------------------------------------------------------------
# The canonical coefficients of each variant (docs/accelerated_sgd.md §2).

_CANONICAL = {
    "heavy_ball": (dict(learning_rate=1.0, beta=0.9),
                   lambda learning_rate, beta: (beta, 0.0, learning_rate)),
    "nesterov": (dict(learning_rate=1.0, beta=0.9),
                 lambda learning_rate, beta: (beta, learning_rate, learning_rate * beta)),
    "accsgd": (dict(learning_rate=1.0, kappa=1000.0, xi=10.0, small_const=0.7),
               lambda learning_rate, kappa, xi, small_const: (
                   _accsgd_coefficients(kappa, xi, small_const)[0], learning_rate,
                   learning_rate * _accsgd_coefficients(kappa, xi, small_const)[1])),
    "mass": (dict(learning_rate=1.0, alpha=0.05, kappa_tilde=12.0),
             lambda learning_rate, alpha, kappa_tilde: (
                 (1 - alpha) / (1 + alpha), learning_rate,
                 learning_rate * (1 / kappa_tilde - alpha) / (1 + alpha))),
    "agnes": (dict(learning_rate=1.0, correction_lr=1.0, momentum=0.99),
              lambda learning_rate, correction_lr, momentum: (
                  momentum, correction_lr, learning_rate * momentum)),
    "lion": (dict(b1=0.9, b2=0.99),
             lambda b1, b2: (b2, 1 - b1 / b2, (b1 / b2) * (1 - b2))),
    "mars_approx": (dict(b1=0.95, gamma=0.025),
                    lambda b1, gamma: (b1, gamma, (1 - gamma) * (1 - b1))),
    "ademamix_b1_0": (dict(learning_rate=1.0, b3=0.9999, alpha=5.0),
                      lambda learning_rate, b3, alpha: (
                          b3, learning_rate, learning_rate * alpha * (1 - b3))),
    "simplified_ademamix": (dict(learning_rate=1.0, b1=0.99, alpha=0.0),
                            lambda learning_rate, b1, alpha: (
                                b1, learning_rate * alpha, learning_rate)),
    "schedule_free": (dict(learning_rate=1.0, b1=0.9, c_t=1.0, c_next=1.0),
                      lambda learning_rate, b1, c_t, c_next: (
                          1 - c_t, (1 - b1) * learning_rate, b1 * c_next * learning_rate)),
}


def canonical_coefficients(name: str, **hyperparams: float) -> dict[str, float]:
  """(beta, a, b) of ``m_t = beta m_{t-1} + u_t; w_{t+1} = w_t - a u_t - b m_t`` for a method.

  Names and hyperparameters (defaults in brackets; learning rates default to 1, so a and b are
  then per unit learning rate):

  * ``heavy_ball`` (learning_rate, beta=0.9), ``nesterov`` (learning_rate, beta=0.9)
  * ``accsgd`` (learning_rate, kappa=1000, xi=10, small_const=0.7)
  * ``mass`` (learning_rate, alpha=0.05, kappa_tilde=12)
  * ``agnes`` (learning_rate = AGNES alpha, correction_lr = eta, momentum = rho)
  * ``lion`` (b1=0.9, b2=0.99): the pre-sign vector, u = g; apply sign() after.
  * ``mars_approx`` (b1=0.95, gamma=0.025): MARS-approx's first moment without clipping,
    u = g; Adam's bias correction and denominator follow.
  * ``ademamix_b1_0`` (learning_rate, b3=0.9999, alpha=5): u = g; divide by sqrt(v_hat)+eps after.
  * ``simplified_ademamix`` (learning_rate, b1=0.99, alpha=0): same preconditioner.
  * ``schedule_free`` (learning_rate = gamma, b1, c_t, c_next): the y-space form of
    docs/schedule_free.md §2 at step t with constant gamma (beta = 1 - c_t, a = (1-b1) gamma,
    b = b1 c_{t+1} gamma; c_1 := 1).

  Args:
    name: one of the names above.
    **hyperparams: the method's hyperparameters (a subset of those listed).

  Returns:
    ``{"beta": beta, "a": a, "b": b}``.

  Raises:
    ValueError: unknown name or hyperparameter.

  Examples:
    >>> import optax_accel as oa
    >>> oa.canonical_coefficients("nesterov", learning_rate=0.1, beta=0.9)
    {'beta': 0.9, 'a': 0.1, 'b': 0.09000000000000001}

  References:
    Morwani et al., arXiv:2502.02431, 2025 (Table 1 and Section 4).
  """
  if name not in _CANONICAL:
    raise ValueError(f"`name` must be one of {tuple(_CANONICAL)}, got {name!r}.")
  defaults, formula = _CANONICAL[name]
  unknown = set(hyperparams) - set(defaults)
  if unknown:
    raise ValueError(f"Unknown hyperparameters {sorted(unknown)} for {name!r}; "
                     f"expected a subset of {sorted(defaults)}.")
  beta, a, b = formula(**{**defaults, **hyperparams})
  return {"beta": beta, "a": a, "b": b}
