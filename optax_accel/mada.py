"""MADA: the meta-adaptive parameterized optimizer, and AVGrad (Ozkara, Yuan, Cevher, Hauswirth,
Chen, ICML 2024, arXiv:2401.08893; official code amazon-science/mada_optimizer_search).

One step of ``scale_by_mada`` in the official code's order (docs/mada.md §1), t >= 1:

    gh   = g + b3 (g - g_prev)
    s    = sign(gh^2 - v_{t-1});   gt2 = c gh^2 + (1 - c)(v_{t-1} + gh^2 s)     (c: Adam <-> Yogi)
    m_t  = b1 m + (1 - b1) g;   v_t = b2 v + (1 - b2) gt2;   n_t = b3 n + (1 - b3)(g - g_prev)
    m^L  = 0.98 m^L + 0.02 g;   u_t = 0.95 m^L + 0.05 g                     (Lion branch)
    vbar_t = (v_t + (t - 1) vbar_{t-1}) / t                                 (AVGrad running mean)
    A = m_t / (1 - b1^t) + b3 n_t;   vh = (rho v_t + (1 - rho) stop_grad(vbar_t)) / (1 - b2^t)
    direction = gamma A / (sqrt(vh) + eps) + (1 - gamma) sign(u_t)

Vertices: Adam (b3=0, rho=c=gamma=1), AVGrad (rho=0), Yogi-form second moment (c=0), Adan-like
(b3>0), Lion (gamma=0). The running mean is detached (no hypergradient through it), as in the
ICML code; v and vbar start at 1e-15 as there. The code's quirks are switches (docs/mada.md §2):
``n_init_g_squared`` (n_0 = g_1^2, default True as the code), ``lion_uses_updated_momentum``
(default True as the code; False = true Lion ordering), ``bias_correct_n`` (default False as
the code). Buffers are allocated only for the branches the coefficients can reach: a Python
``b3 == 0`` drops n and g_prev, ``rho == 1`` drops vbar, ``gamma == 1`` drops the Lion momentum
(learned coefficients are arrays, so every buffer is kept).
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_accel import _common as C
from optax_accel.hypergradient import (
  HypergradientState,
  WithHypergradients,
  hypergradient_wrapper,
  per_name,
)

_V_INIT = 1e-15  # the official code's initial v and vbar


class ScaleByMadaState(NamedTuple):
  """State of ``scale_by_mada``; ``None`` marks a buffer its static coefficients never use."""
  count: jax.Array
  mu: optax.Updates  # m
  nu: optax.Updates  # v
  nu_mean: optax.Updates | None  # vbar (AVGrad running mean)
  adan: optax.Updates | None  # n
  prev_grad: optax.Updates | None  # g_{t-1}
  lion_mu: optax.Updates | None  # m^L
  grad_diff: optax.Updates | None = None  # g_t - g_{t-1}   (closed-form hypergradients only)
  g_tilde2: optax.Updates | None = None  # gt2_t            (closed-form hypergradients only)


def _check_coefficients(b1, b2, b3, rho, c, gamma, eps):
  C.check_beta("b1", b1)
  C.check_beta("b2", b2)
  C.check_beta("b3", b3)
  for name, value in (("rho", rho), ("c", c), ("gamma", gamma)):
    C.check_range(name, value, 0.0, 1.0)
  C.check_nonnegative("eps", eps)


def scale_by_mada(
    b1: Any = 0.9,
    b2: Any = 0.999,
    b3: Any = 0.0,
    rho: Any = 1.0,
    c: Any = 1.0,
    gamma: Any = 1.0,
    *,
    lion_b1: float = 0.95,
    lion_b2: float = 0.98,
    eps: float = 1e-8,
    n_init_g_squared: bool = True,
    lion_uses_updated_momentum: bool = True,
    bias_correct_n: bool = False,
    hypergradient_buffers: bool = False,
    mu_dtype: Any | None = None,
) -> optax.GradientTransformationExtraArgs:
  """MADA's parameterised direction; coefficients are floats or traced (learned) arrays.

  Update rule (official code's order, docs/mada.md §1)::

      gh = g + b3 (g - g_prev);  s = sign(gh^2 - v);  gt2 = c gh^2 + (1 - c)(v + gh^2 s)
      m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) gt2;  n = b3 n + (1 - b3)(g - g_prev)
      vbar_t = (v_t + (t - 1) vbar_{t-1}) / t
      A = m / (1 - b1^t) + b3 n;  vh = (rho v + (1 - rho) stop_grad(vbar)) / (1 - b2^t)
      direction = gamma A / (sqrt(vh) + eps) + (1 - gamma) sign(u),  u the Lion vector

  Args:
    b1: first-moment decay (float or traced array).
    b2: second-moment decay.
    b3: Adan-like weight of g_t - g_{t-1}; a Python 0 drops its buffers.
    rho: Adam (1) <-> AVGrad (0); a Python 1 drops the running mean.
    c: Adam (1) <-> Yogi-form second moment (0).
    gamma: Adam family (1) <-> Lion (0); a Python 1 drops the Lion momentum.
    lion_b1: Lion's interpolation constant (the code's 0.95).
    lion_b2: Lion's momentum decay (the code's 0.98).
    eps: added to the square root.
    n_init_g_squared: the code's n_0 = g_1^2 (True) or n_0 = 0.
    lion_uses_updated_momentum: the code's order (True) or true Lion's (False).
    bias_correct_n: divide n by (1 - b3^t) (the code does not).
    hypergradient_buffers: keep g_t - g_{t-1} and gt2_t, all that :func:`mada_hypergradients`
      needs besides the state.
    mu_dtype: dtype of the momenta (v and vbar stay at least float32: docs/conventions.md).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` (state ``ScaleByMadaState``).

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax_accel as oa
    >>> tx = oa.scale_by_mada(b1=0.9, b2=0.999)  # the Adam vertex
    >>> state = tx.init(jnp.zeros(2))
    >>> direction, state = tx.update(jnp.array([2.0, -2.0]), state)
    >>> print(jnp.round(direction, 4))
    [ 1. -1.]

  References:
    Ozkara, Yuan, Cevher, Hauswirth, Chen, *MADA: Meta-Adaptive Optimizers through hyper-gradient
    Descent*, ICML 2024, arXiv:2401.08893.
  """
  _check_coefficients(b1, b2, b3, rho, c, gamma, eps)
  C.check_beta("lion_b1", lion_b1)
  C.check_beta("lion_b2", lion_b2)
  has_adan = not C.is_static_zero(b3)
  has_mean = not C.is_static(rho, 1.0)
  has_lion = not C.is_static(gamma, 1.0)

  def init_fn(params):
    zeros = lambda: C.zeros(params, mu_dtype)  # noqa: E731
    tiny = lambda: jax.tree.map(lambda z: z + jnp.asarray(_V_INIT, z.dtype),  # noqa: E731
                                C.accumulator_zeros(params))
    return ScaleByMadaState(
        count=C.count_init(), mu=zeros(), nu=tiny(), nu_mean=tiny() if has_mean else None,
        adan=zeros() if has_adan else None, prev_grad=zeros() if has_adan else None,
        lion_mu=zeros() if has_lion else None,
        grad_diff=zeros() if hypergradient_buffers else None,
        g_tilde2=zeros() if hypergradient_buffers else None)

  def update_fn(updates, state, params=None):
    del params
    treedef = jax.tree.structure(updates)
    flat = lambda tree: treedef.flatten_up_to(tree) if tree is not None else [None] * len(g)  # noqa
    g = treedef.flatten_up_to(updates)
    count = optax.safe_increment(state.count)
    t = C.as_float(count)
    first = C.as_float(state.count == 0)
    bc1, bc2 = 1 - b1**t, 1 - b2**t
    out = {k: [] for k in ("direction", "mu", "nu", "nu_mean", "adan", "prev_grad", "lion_mu",
                           "grad_diff", "g_tilde2")}
    for gi, m, v, vbar, n, gp, ml in zip(g, flat(state.mu), flat(state.nu), flat(state.nu_mean),
                                         flat(state.adan), flat(state.prev_grad),
                                         flat(state.lion_mu)):
      diff = gi - gp if has_adan else 0.0
      stored_g = C.stored_input(gi, count)
      g_hat = gi + b3 * diff
      # Squares and second moments saturate at the dtype's max (C.saturating_square): with a
      # learned (traced) c or rho, an inf would meet 0 * inf or inf - inf in the mixes.
      g_hat2 = C.saturating_square(g_hat)
      sign = jnp.sign(g_hat2 - v)
      g_tilde2 = C.saturate(C.mix(c, g_hat2, C.saturate(v + g_hat2 * sign)))
      m_new = b1 * m + (1 - b1) * gi
      v_new = C.saturate(b2 * v + (1 - b2) * g_tilde2)
      numerator = m_new / bc1
      if has_adan:
        n_prev = n + first * C.saturating_square(gi) if n_init_g_squared else n  # lazy n_0 = g_1^2
        n_new = b3 * n_prev + (1 - b3) * diff
        numerator = numerator + b3 * (n_new / (1 - b3**t) if bias_correct_n else n_new)
        out["adan"].append(n_new)
        out["prev_grad"].append(stored_g)
      if has_mean:
        vbar_new = vbar + (v_new - vbar) / t  # = (v_new + (t - 1) vbar) / t, without overflow
        second = C.mix(rho, v_new, jax.lax.stop_gradient(vbar_new))
        out["nu_mean"].append(vbar_new)
      else:
        second = v_new
      direction = gamma * numerator / (jnp.sqrt(second / bc2) + eps)
      if has_lion:
        ml_new = lion_b2 * ml + (1 - lion_b2) * gi
        lion_input = ml_new if lion_uses_updated_momentum else ml
        direction = direction + (1 - gamma) * jnp.sign(lion_b1 * lion_input + (1 - lion_b1) * gi)
        out["lion_mu"].append(ml_new)
      out["direction"].append(direction.astype(gi.dtype))
      out["mu"].append(m_new)
      out["nu"].append(v_new)
      out["grad_diff"].append(diff if has_adan else stored_g)
      out["g_tilde2"].append(g_tilde2)

    def pack(key, old):
      return None if old is None else C.cast_like(jax.tree.unflatten(treedef, out[key]), old)

    return jax.tree.unflatten(treedef, out["direction"]), ScaleByMadaState(
        count=count, mu=pack("mu", state.mu), nu=pack("nu", state.nu),
        nu_mean=pack("nu_mean", state.nu_mean), adan=pack("adan", state.adan),
        prev_grad=pack("prev_grad", state.prev_grad), lion_mu=pack("lion_mu", state.lion_mu),
        grad_diff=pack("grad_diff", state.grad_diff), g_tilde2=pack("g_tilde2", state.g_tilde2))

  return C.with_extra_args(init_fn, update_fn)


def mada_hypergradients(state: ScaleByMadaState, next_grads: optax.Updates, q: dict,
                        learning_rate: Any, names=("b1", "b2", "b3", "rho", "c", "gamma"), *,
                        eps: float = 1e-8, lion_b1: float = 0.95, lion_b2: float = 0.98,
                        lion_uses_updated_momentum: bool = True) -> dict[str, jax.Array]:
  """Closed-form one-step hypergradients h_j = <g_{t+1}, d Delta_t / d q_j> of MADA.

  h_j = -lr_t <g_{t+1}, dU_t / dq_j>, with the partials of docs/mada.md §3. ``state`` is the
  state after step t (built with ``hypergradient_buffers=True``), ``q`` all six coefficients used
  at step t, ``names`` those to differentiate (their buffers must exist: a coefficient fixed at a
  static vertex, e.g. rho = 1, prunes the buffers only its own partial needs). Uses the exact
  rewrites m_{t-1} - g = (m_t - g)/b1, v_{t-1} = (v_t - (1-b2) gt2)/b2, b3 (n_{t-1} - d) = n_t - d,
  so b1 must stay positive (MADA's box: b1 >= 0.01). The running mean is held fixed (detached).

  Args:
    state: the ``ScaleByMadaState`` after step t.
    next_grads: g_{t+1}.
    q: the six coefficients applied at step t.
    learning_rate: the learning rate (scalar or schedule) of step t.
    names: coefficients to differentiate.
    eps: as in :func:`scale_by_mada`.
    lion_b1: as in :func:`scale_by_mada`.
    lion_b2: as in :func:`scale_by_mada`.
    lion_uses_updated_momentum: as in :func:`scale_by_mada`.

  Returns:
    ``{name: h}``, scalars; zeros before the first step.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax_accel as oa
    >>> q = dict(b1=0.9, b2=0.999, b3=0.0, rho=1.0, c=1.0, gamma=1.0)
    >>> tx = oa.scale_by_mada(**q, hypergradient_buffers=True)
    >>> _, state = tx.update(jnp.ones(2), tx.init(jnp.zeros(2)))
    >>> h = oa.mada_hypergradients(state, jnp.ones(2), q, 0.1, names=("b2",))
    >>> print(f"{float(h['b2']):.4f}")  # positive: a smaller b2 would have lowered the loss
    0.0013

  References:
    Ozkara, Yuan, Cevher, Hauswirth, Chen, *MADA: Meta-Adaptive Optimizers through hyper-gradient
    Descent*, ICML 2024, arXiv:2401.08893.
  """
  b1, b2, b3, rho, c, gamma = (q[k] for k in ("b1", "b2", "b3", "rho", "c", "gamma"))
  t = C.as_float(jnp.maximum(state.count, 1))
  lr = C.at(learning_rate, jnp.maximum(state.count - 1, 0))
  bc1, bc2 = 1 - b1**t, 1 - b2**t
  treedef = jax.tree.structure(next_grads)
  flat = lambda tree: [None] * treedef.num_leaves if tree is None else treedef.flatten_up_to(  # noqa
      tree)
  totals = {k: jnp.zeros([], jnp.float32) for k in names}
  for g_next, m, v, vbar, n, g, ml, d, gt2 in zip(*map(flat, (
      next_grads, state.mu, state.nu, state.nu_mean, state.adan, state.prev_grad, state.lion_mu,
      state.grad_diff, state.g_tilde2))):
    if g is None:  # no Adan branch: grad_diff holds g_t itself and d = 0
      g, d, n = d, 0.0, 0.0
    vbar = v if vbar is None else vbar  # rho is fixed at 1
    v_prev = (v - (1 - b2) * gt2) / b2
    g_hat = g + b3 * d
    g_hat2 = C.saturating_square(g_hat)
    sign = jnp.sign(g_hat2 - v_prev)
    mixed = C.mix(rho, v, vbar)
    v_hat = mixed / bc2
    big_a = m / bc1 + b3 * n
    denom = jnp.sqrt(v_hat) + eps
    u_a = gamma / denom
    u_v = -gamma * big_a / (denom * denom * 2 * jnp.sqrt(v_hat))
    dv_dg2 = rho * (1 - b2) / bc2  # d v_hat / d gt2

    def lion_sign(ml=ml, g=g):
      lion_m = ml if lion_uses_updated_momentum else (ml - (1 - lion_b2) * g) / lion_b2
      return jnp.sign(lion_b1 * lion_m + (1 - lion_b1) * g)

    partials = {
        "gamma": lambda: big_a / denom - lion_sign(),
        "b1": lambda: u_a * ((m - g) / (b1 * bc1) + m * t * b1**(t - 1) / bc1**2),
        "b2": lambda: u_v * (rho * (v - gt2) / (b2 * bc2) + mixed * t * b2**(t - 1) / bc2**2),
        "b3": lambda: u_a * (2 * n - d) + u_v * dv_dg2 * 2 * g_hat * d * (c + (1 - c) * sign),
        "rho": lambda: u_v * (v - vbar) / bc2,
        "c": lambda: u_v * dv_dg2 * (g_hat2 - v_prev - g_hat2 * sign),
    }
    sums = C.fused_sums([g_next * partials[k]() for k in names])
    totals = {k: totals[k] + s for k, s in zip(names, sums)}
  started = state.count > 0
  return {k: jnp.where(started, -lr * total, 0.0) for k, total in totals.items()}


def scale_by_avgrad(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, *,
                    mu_dtype: Any | None = None) -> optax.GradientTransformationExtraArgs:
  """AVGrad's direction: Adam with v replaced by the running mean of its EMA.

  Update rule (MADA paper eq. 5, as the code runs it)::

      m_t = b1 m + (1 - b1) g;  v_t = b2 v + (1 - b2) g^2;  vbar_t = (v_t + (t - 1) vbar_{t-1}) / t
      direction = (m_t / (1 - b1^t)) / (sqrt(vbar_t / (1 - b2^t)) + eps)

  MADA at rho = 0, b3 = 0, c = gamma = 1; state m, v, vbar (12 bytes/param in f32).

  Args:
    b1: first-moment decay in [0, 1).
    b2: second-moment decay in [0, 1).
    eps: added to the square root.
    mu_dtype: dtype of m (v and vbar stay at least float32: docs/conventions.md).

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax_accel as oa
    >>> tx = oa.scale_by_avgrad()
    >>> direction, _ = tx.update(jnp.array([3.0]), tx.init(jnp.zeros(1)))
    >>> print(jnp.round(direction, 4))
    [1.]

  References:
    Ozkara, Yuan, Cevher, Hauswirth, Chen, *MADA: Meta-Adaptive Optimizers through hyper-gradient
    Descent*, ICML 2024, arXiv:2401.08893.
  """
  return scale_by_mada(b1, b2, 0.0, 0.0, 1.0, 1.0, eps=eps, mu_dtype=mu_dtype)


def avgrad(learning_rate: optax.ScalarOrSchedule, b1: float = 0.9, b2: float = 0.999,
           eps: float = 1e-8, weight_decay: optax.ScalarOrSchedule = 0.0, mask: Any = None, *,
           mu_dtype: Any | None = None) -> optax.GradientTransformationExtraArgs:
  """AVGrad with decoupled weight decay (AdamW-style).

  Update rule: :func:`scale_by_avgrad`, then decoupled weight decay and the learning rate.

  Args:
    learning_rate: scalar or schedule of the 0-based count.
    b1: first-moment decay in [0, 1).
    b2: second-moment decay in [0, 1).
    eps: added to the square root.
    weight_decay: decoupled weight decay (scaled by the learning rate).
    mask: a pytree of booleans (or a function of the params) selecting the decayed leaves.
    mu_dtype: dtype of m (v and vbar stay at least float32: docs/conventions.md).

  Returns:
    The full optimizer.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax_accel as oa
    >>> opt = oa.avgrad(1e-3, weight_decay=0.1)
    >>> state = opt.init({"w": jnp.zeros(3)})

  References:
    Ozkara, Yuan, Cevher, Hauswirth, Chen, *MADA: Meta-Adaptive Optimizers through hyper-gradient
    Descent*, ICML 2024, arXiv:2401.08893.
  """
  return C.full_optimizer(scale_by_avgrad(b1, b2, eps, mu_dtype=mu_dtype), learning_rate,
                          weight_decay, mask)


def mada_optimizer(learning_rate: optax.ScalarOrSchedule, b1: Any = 0.9, b2: Any = 0.95,
                   b3: Any = 0.0, rho: Any = 1.0, c: Any = 1.0, gamma: Any = 1.0,
                   weight_decay: optax.ScalarOrSchedule = 0.0, mask: Any = None, *,
                   eps: float = 1e-8, closed_form_hypergradients: bool = False,
                   mu_dtype: Any | None = None) -> optax.GradientTransformationExtraArgs:
  """The full MADA step with fixed coefficients: x <- x - lr (direction + weight_decay x).

  Update rule: :func:`scale_by_mada`, then decoupled weight decay and the learning rate. It is the
  inner factory of :func:`mada` (whose coefficients are learned), and MADA-FS when called with
  ``frozen(state)``. With ``closed_form_hypergradients`` the result also carries
  ``hypergradients(state, next_grads, q)`` (:func:`mada_hypergradients`; weight decay does not
  depend on q), which ``hypergradient_wrapper(..., tangents="closed_form")`` uses instead of
  stored tangents.

  Args:
    learning_rate: scalar or schedule of the 0-based count.
    b1: first-moment decay (float or traced array).
    b2: second-moment decay.
    b3: Adan-like weight of g_t - g_{t-1}; a Python 0 drops its buffers.
    rho: Adam (1) <-> AVGrad (0); a Python 1 drops the running mean.
    c: Adam (1) <-> Yogi-form second moment (0).
    gamma: Adam family (1) <-> Lion (0); a Python 1 drops the Lion momentum.
    weight_decay: decoupled weight decay (scaled by the learning rate).
    mask: a pytree of booleans (or a function of the params) selecting the decayed leaves.
    eps: added to the square root.
    closed_form_hypergradients: keep the two buffers the closed-form hypergradients need and
      return a ``WithHypergradients``.
    mu_dtype: dtype of the momenta (v and vbar stay at least float32: docs/conventions.md).

  Returns:
    The full optimizer (a ``WithHypergradients`` when ``closed_form_hypergradients``).

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax_accel as oa
    >>> opt = oa.mada_optimizer(1e-3, b1=0.8, b2=0.99, rho=0.3, gamma=0.9)  # MADA-FS
    >>> state = opt.init({"w": jnp.zeros(3)})

  References:
    Ozkara, Yuan, Cevher, Hauswirth, Chen, *MADA: Meta-Adaptive Optimizers through hyper-gradient
    Descent*, ICML 2024, arXiv:2401.08893.
  """
  direction = scale_by_mada(b1, b2, b3, rho, c, gamma, eps=eps, mu_dtype=mu_dtype,
                            hypergradient_buffers=closed_form_hypergradients)
  full = C.full_optimizer(direction, learning_rate, weight_decay, mask)
  if not closed_form_hypergradients:
    return full
  coefficients = dict(b1=b1, b2=b2, b3=b3, rho=rho, c=c, gamma=gamma)  # the learned ones = q
  def hypergradients(state, next_grads, q):
    (mada_state,) = C.find_states(state, ScaleByMadaState)
    return mada_hypergradients(mada_state, next_grads, coefficients, learning_rate, tuple(q),
                               eps=eps)

  return WithHypergradients(full.init, full.update, hypergradients)


# The official code's projection boxes and hyper-learning rates (OWT runs; docs/mada.md §4).
MADA_DOMAIN = {"b1": (0.01, 0.99), "b2": (0.501, 0.99), "b3": (0.0, 0.99), "rho": (0.0, 1.0),
               "c": (0.0, 1.0), "gamma": (0.0, 1.0)}
MADA_HYPER_LR = {"b1": 5e-4, "b2": 5e-4, "b3": 1e-1, "rho": 1e-1, "c": 1e-1, "gamma": 1e-1}


def mada(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.95,
    b3: float = 0.0,
    rho: float = 1.0,
    c: float = 1.0,
    gamma: float = 1.0,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    mask: Any = None,
    *,
    eps: float = 1e-8,
    hyper_lr: Any | None = None,
    hyper_momentum: float = 0.0,
    freeze_steps: int = 0,
    clip_norm: float | None = None,
    mu_dtype: Any | None = None,
) -> optax.GradientTransformationExtraArgs:
  """MADA: the six coefficients learned by one-step hypergradient descent.

  Update rule: the parameter step of :func:`mada_optimizer` with the current coefficients q; before
  it, q <- project(q - hyper_lr clip(h)), h the closed-form hypergradient of the previous step
  (docs/mada.md §3). Defaults from the paper's GPT-2/OpenWebText setup: hyper-lrs 5e-4 for b1, b2
  and 1e-1 for the others (``MADA_HYPER_LR``), plain SGD, each hypergradient clipped to
  ``|h| <= 10``, the code's boxes (``MADA_DOMAIN``). The paper starts from Adam (b3 = 0,
  rho = c = gamma = 1) on Shakespeare and from AVGrad + Adan (rho = 0, b3 = 0.9) on OpenWebText.

  Args:
    learning_rate: scalar or schedule of the 0-based count.
    b1: initial b1.
    b2: initial b2.
    b3: initial b3.
    rho: initial rho.
    c: initial c.
    gamma: initial gamma.
    weight_decay: decoupled weight decay (scaled by the learning rate).
    mask: a pytree of booleans (or a function of the params) selecting the decayed leaves.
    eps: added to the square root.
    hyper_lr: a float for every coefficient, or a dict updating ``MADA_HYPER_LR``.
    hyper_momentum: heavy-ball momentum of the hyper-optimizer.
    freeze_steps: the coefficients stay fixed for this many steps.
    clip_norm: global-norm clip of the gradient the parameter update sees; the hypergradient
      uses the raw gradient, as the official code (None: no clipping inside).
    mu_dtype: dtype of the momenta (v and vbar stay at least float32: docs/conventions.md).

  Returns:
    The full optimizer; its state holds a ``HypergradientState`` (``learned/*`` diagnostics).

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optax_accel as oa
    >>> opt = oa.mada(1e-2, rho=0.0, b3=0.9)
    >>> params = {"w": jnp.ones(3)}
    >>> state = opt.init(params)
    >>> for _ in range(3):
    ...   updates, state = opt.update({"w": params["w"]}, state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> sorted(oa.frozen(state))
    ['b1', 'b2', 'b3', 'c', 'gamma', 'rho']

  References:
    Ozkara, Yuan, Cevher, Hauswirth, Chen, *MADA: Meta-Adaptive Optimizers through hyper-gradient
    Descent*, ICML 2024, arXiv:2401.08893.
  """
  learned = dict(b1=b1, b2=b2, b3=b3, rho=rho, c=c, gamma=gamma)
  return hypergradient_wrapper(
      mada_optimizer, learnable=tuple(learned),
      hyper_lr=per_name(hyper_lr, tuple(learned), MADA_HYPER_LR), domain=MADA_DOMAIN,
      hyper_momentum=hyper_momentum, freeze_steps=freeze_steps, tangents="closed_form",
      clip_norm=clip_norm, static_args=("mask", "eps", "mu_dtype"))(
          learning_rate, weight_decay=weight_decay, mask=mask, eps=eps, mu_dtype=mu_dtype,
          closed_form_hypergradients=True, **learned)


def hyperadam(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    *,
    eps: float = 1e-8,
    hyper_lr: Any = 1e-4,
    hyper_momentum: float = 0.0,
    freeze_steps: int = 0,
    mask: Any = None,
    clip_norm: float | None = None,
    mu_dtype: Any | None = None,
) -> optax.GradientTransformationExtraArgs:
  """HyperAdam: AdamW with b1 and b2 learned by hypergradient descent.

  Update rule: as the official code runs it, MADA at the Adam vertex (b3 = 0, rho = c = gamma = 1,
  fixed, so their buffers are not allocated) with only b1, b2 learned by the closed-form partials.
  Boxes b1 in [0.01, 0.99] (the code's) and b2 in [0.501, 0.9999] (the code clamps b2 to 0.99
  for GPT runs; the wider box keeps the API default 0.999 inside it). v starts at 1e-15.

  Args:
    learning_rate: scalar or schedule of the 0-based count.
    b1: initial b1.
    b2: initial b2.
    weight_decay: decoupled weight decay (scaled by the learning rate).
    eps: added to the square root.
    hyper_lr: learning rate of the hyper-optimizer (a float or a dict name -> float).
    hyper_momentum: heavy-ball momentum of the hyper-optimizer.
    freeze_steps: the coefficients stay fixed for this many steps.
    mask: a pytree of booleans (or a function of the params) selecting the decayed leaves.
    clip_norm: global-norm clip of the gradient the parameter update sees; the hypergradient
      uses the raw gradient, as the official code (None: no clipping inside).
    mu_dtype: dtype of the momenta (v and vbar stay at least float32: docs/conventions.md).

  Returns:
    The full optimizer; its state holds a ``HypergradientState``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax_accel as oa
    >>> opt = oa.hyperadam(1e-3, hyper_lr=1e-4)
    >>> state = opt.init({"w": jnp.zeros(3)})
    >>> sorted(oa.get_diagnostics(state))[:2]
    ['hypergrad/b1', 'hypergrad/b2']

  References:
    Ozkara, Yuan, Cevher, Hauswirth, Chen, *MADA: Meta-Adaptive Optimizers through hyper-gradient
    Descent*, ICML 2024, arXiv:2401.08893.
  """
  return hypergradient_wrapper(
      mada_optimizer, learnable=("b1", "b2"), hyper_lr=hyper_lr,
      domain={"b1": (0.01, 0.99), "b2": (0.501, 0.9999)}, hyper_momentum=hyper_momentum,
      freeze_steps=freeze_steps, tangents="closed_form", clip_norm=clip_norm)(
          learning_rate, b1=b1, b2=b2, b3=0.0, rho=1.0, c=1.0, gamma=1.0,
          weight_decay=weight_decay, mask=mask, eps=eps, mu_dtype=mu_dtype,
          closed_form_hypergradients=True)


def frozen(state: optax.OptState) -> dict[str, float]:
  """MADA-FS: the learned coefficients at the end of a run, as floats.

  ``optax_accel.mada_optimizer(lr, **frozen(state))`` (or ``scale_by_mada(**frozen(state))``)
  re-runs them as a fixed optimizer.

  Args:
    state: a state holding a ``HypergradientState`` (anywhere in nested states).

  Returns:
    ``{name: value}`` of the learned coefficients.

  Raises:
    ValueError: if ``state`` holds no hypergradient state.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax_accel as oa
    >>> oa.frozen(oa.hyperadam(1e-3, b1=0.8).init(jnp.zeros(2)))["b1"]
    0.800000011920929

  References:
    Ozkara, Yuan, Cevher, Hauswirth, Chen, *MADA: Meta-Adaptive Optimizers through hyper-gradient
    Descent*, ICML 2024, arXiv:2401.08893.
  """
  states = C.find_states(state, HypergradientState)
  if not states:
    raise ValueError("No HypergradientState in `state`: not a hypergradient-trained optimizer.")
  return {k: float(v) for k, v in states[0].hyperparams.items()}
