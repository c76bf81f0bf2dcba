"""MARS-approx (Yuan, Liu, Wu, Zhou, Gu, ICML 2025, arXiv:2411.10438; AGI-Arena/MARS) and Lion.

MARS-approx, with g_0 = 0 and the previous step's gradient in place of a second evaluation:

    c_t  = g_t + gamma * b1/(1-b1) * (g_t - g_{t-1})
    ct_t = clip(c_t)              # c * min(1, clip_threshold/||c||): per tensor (official),
                                  # over the whole tree ("global", levanter/optax PRs) or "none"
    m_t  = b1 m_{t-1} + (1-b1) ct_t
    adamw: v_t = b2 v_{t-1} + (1-b2) ct_t^2   (v from the clipped c, as the official code)
           direction = (m_t/(1-b1^t)) / (sqrt(v_t/(1-b2^t)) + eps)
    lion:  direction = sign(m_t)

Without clipping m_t = gamma g_t + (1-gamma) EMA_b1(g)_t: accelerated SGD with a = gamma,
b = (1-gamma)(1-b1) (Morwani et al. 2025). Lion is optax's (``optax.lion``/``scale_by_lion``).
The official code routes 1-D parameters to plain AdamW by default; do that with
``optax.multi_transform`` if wanted (not done here).
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_accel import _common as C

lion = optax.lion
scale_by_lion = optax.scale_by_lion

_VARIANTS = ("adamw", "lion")
_CLIP_SCOPES = ("tensor", "global", "none")


class ScaleByMarsState(NamedTuple):
  """State of ``scale_by_mars``; ``nu`` is ``None`` for the Lion variant."""
  count: jax.Array
  correction_norm: jax.Array  # global norm of c_t before clipping (0 if clip_scope == "none")
  mu: optax.Updates
  nu: optax.Updates | None
  prev_grad: optax.Updates

  def diagnostics(self) -> dict[str, jax.Array]:
    return {"mars_correction_norm": self.correction_norm}


def _clip(tree, threshold, scope):
  """Returns (clipped tree, global norm of the input); the norm is 0 for scope "none" (not
  computed, to save a pass over the gradients)."""
  if scope == "none":
    return tree, jnp.zeros([], jnp.float32)
  squares = [C.leaf_vdot(c, c) for c in jax.tree.leaves(tree)]
  global_norm = jnp.sqrt(sum(squares, jnp.zeros([], jnp.float32)))
  factor = lambda norm: jnp.where(norm > threshold, threshold / jnp.where(norm > 0, norm, 1), 1.0)  # noqa
  if scope == "global":
    factors = [factor(global_norm)] * len(squares)
  else:
    factors = [factor(jnp.sqrt(sq)) for sq in squares]
  leaves = [c * f.astype(c.dtype) for c, f in zip(jax.tree.leaves(tree), factors)]
  return jax.tree.unflatten(jax.tree.structure(tree), leaves), global_norm


def scale_by_mars(
    b1: float = 0.95,
    b2: float = 0.99,
    gamma: float = 0.025,
    eps: float = 1e-8,
    *,
    variant: str = "adamw",
    clip_threshold: float = 1.0,
    clip_scope: str = "tensor",
    mu_dtype: Any | None = None,
) -> optax.GradientTransformationExtraArgs:
  """MARS-approx direction: a variance-reduced gradient, clipped, in Adam or Lion.

  Update rule (g_0 = 0)::

      c_t = g_t + gamma b1 / (1 - b1) (g_t - g_{t-1});   ct_t = clip(c_t)
      m_t = b1 m_{t-1} + (1 - b1) ct_t
      adamw: v_t = b2 v_{t-1} + (1 - b2) ct_t^2;
             direction = (m_t / (1 - b1^t)) / (sqrt(v_t / (1 - b2^t)) + eps)
      lion:  direction = sign(m_t)

  Args:
    b1: first-moment decay in [0, 1).
    b2: second-moment decay in [0, 1) (unused by the Lion variant).
    gamma: correction scale in [0, 1].
    eps: added to the square root of the second moment.
    variant: "adamw" or "lion".
    clip_threshold: tau > 0 in c * min(1, tau / ||c||).
    clip_scope: "tensor" (one norm per leaf, the reference code), "global" (the whole tree) or
      "none".
    mu_dtype: dtype of m and the stored previous gradient (v stays at least float32:
      docs/conventions.md).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` (state ``ScaleByMarsState``).

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax_accel as oa
    >>> tx = oa.scale_by_mars(variant="lion")
    >>> state = tx.init(jnp.zeros(2))
    >>> direction, state = tx.update(jnp.array([0.3, -2.0]), state)
    >>> print(direction)
    [ 1. -1.]

  References:
    Yuan, Liu, Wu, Zhou, Gu, *MARS: Unleashing the Power of Variance Reduction for Training Large
    Models*, ICML 2025, arXiv:2411.10438.
  """
  C.check_beta("b1", b1)
  C.check_beta("b2", b2)
  C.check_range("gamma", gamma, 0.0, 1.0)
  C.check_nonnegative("eps", eps)
  C.check_choice("variant", variant, _VARIANTS)
  C.check_choice("clip_scope", clip_scope, _CLIP_SCOPES)
  C.check_range("clip_threshold", clip_threshold, 0.0, lo_open=True)
  use_nu = variant == "adamw"

  def init_fn(params):
    return ScaleByMarsState(
        count=C.count_init(), correction_norm=C.scalar(0.0), mu=C.zeros(params, mu_dtype),
        nu=C.accumulator_zeros(params) if use_nu else None, prev_grad=C.zeros(params, mu_dtype))

  def update_fn(updates, state, params=None):
    del params
    scale = gamma * b1 / (1 - b1)
    correction = jax.tree.map(lambda g, gp: g + scale * (g - gp), updates, state.prev_grad)
    clipped, correction_norm = _clip(correction, clip_threshold, clip_scope)
    count = optax.safe_increment(state.count)
    mu = optax.tree.update_moment(clipped, state.mu, b1, 1)
    if use_nu:
      nu = optax.tree.update_moment_per_elem_norm(clipped, state.nu, b2, 2)
      mu_hat = optax.tree.bias_correction(mu, b1, count)
      nu_hat = optax.tree.bias_correction(nu, b2, count)
      direction = jax.tree.map(lambda m, v: m / (jnp.sqrt(v) + eps), mu_hat, nu_hat)
    else:
      nu = None
      direction = jax.tree.map(jnp.sign, mu)
    direction = C.cast_like(direction, updates)
    return direction, ScaleByMarsState(
        count=count, correction_norm=C.scalar(correction_norm),
        mu=C.cast_like(mu, state.mu), nu=C.cast_like(nu, state.nu) if use_nu else None,
        prev_grad=C.cast_like(updates, state.prev_grad))

  return C.with_extra_args(init_fn, update_fn)


def _mars(learning_rate, b1, b2, gamma, eps, weight_decay, mask, **scale_kwargs):
  return C.full_optimizer(scale_by_mars(b1, b2, gamma, eps, **scale_kwargs), learning_rate,
                          weight_decay, mask)


def mars_adamw(
    learning_rate: optax.ScalarOrSchedule = 3e-3,
    b1: float = 0.95,
    b2: float = 0.99,
    gamma: float = 0.025,
    eps: float = 1e-8,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    mask: Any = None,
    *,
    clip_threshold: float = 1.0,
    clip_scope: str = "tensor",
    mu_dtype: Any | None = None,
) -> optax.GradientTransformationExtraArgs:
  """MARS-AdamW (the reference code's defaults); weight decay lr-coupled as the reference code.

  Update rule: :func:`scale_by_mars` (variant "adamw"), then decoupled weight decay and the
  learning rate. The reference routes 1-D parameters to plain AdamW; do that with
  ``optax.multi_transform`` if wanted.

  Args:
    learning_rate: scalar or schedule of the 0-based count.
    b1: first-moment decay in [0, 1).
    b2: second-moment decay in [0, 1).
    gamma: correction scale in [0, 1].
    eps: added to the square root of the second moment.
    weight_decay: decoupled weight decay (scaled by the learning rate).
    mask: a pytree of booleans (or a function of the params) selecting the decayed leaves.
    clip_threshold: tau > 0 in c * min(1, tau / ||c||).
    clip_scope: "tensor" (one norm per leaf, the reference code), "global" (the whole tree) or
      "none".
    mu_dtype: dtype of m and the stored previous gradient (v stays at least float32:
      docs/conventions.md).

  Returns:
    The full optimizer.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax_accel as oa
    >>> opt = oa.mars_adamw(6e-3, weight_decay=1e-2)
    >>> state = opt.init({"w": jnp.zeros((4, 4))})

  References:
    Yuan, Liu, Wu, Zhou, Gu, *MARS: Unleashing the Power of Variance Reduction for Training Large
    Models*, ICML 2025, arXiv:2411.10438.
  """
  return _mars(learning_rate, b1, b2, gamma, eps, weight_decay, mask, variant="adamw",
               clip_threshold=clip_threshold, clip_scope=clip_scope, mu_dtype=mu_dtype)


def mars_lion(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.95,
    b2: float = 0.99,
    gamma: float = 0.025,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    mask: Any = None,
    *,
    clip_threshold: float = 1.0,
    clip_scope: str = "tensor",
    mu_dtype: Any | None = None,
) -> optax.GradientTransformationExtraArgs:
  """MARS-Lion: the sign of the MARS first moment.

  Update rule: :func:`scale_by_mars` (variant "lion"), then decoupled weight decay and the
  learning rate. ``b2`` is validated but unused (the reference MARS-Lion update has no second
  moment); it is kept for a signature parallel to :func:`mars_adamw`.

  Args:
    learning_rate: scalar or schedule of the 0-based count.
    b1: first-moment decay in [0, 1).
    b2: unused (validated).
    gamma: correction scale in [0, 1].
    weight_decay: decoupled weight decay (scaled by the learning rate).
    mask: a pytree of booleans (or a function of the params) selecting the decayed leaves.
    clip_threshold: tau > 0 in c * min(1, tau / ||c||).
    clip_scope: "tensor" (one norm per leaf, the reference code), "global" (the whole tree) or
      "none".
    mu_dtype: dtype of m and the stored previous gradient (v stays at least float32:
      docs/conventions.md).

  Returns:
    The full optimizer.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax_accel as oa
    >>> opt = oa.mars_lion(1e-4)
    >>> state = opt.init({"w": jnp.zeros((4, 4))})

  References:
    Yuan, Liu, Wu, Zhou, Gu, *MARS: Unleashing the Power of Variance Reduction for Training Large
    Models*, ICML 2025, arXiv:2411.10438.
  """
  return _mars(learning_rate, b1, b2, gamma, 0.0, weight_decay, mask, variant="lion",
               clip_threshold=clip_threshold, clip_scope=clip_scope, mu_dtype=mu_dtype)
