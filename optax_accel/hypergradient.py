"""Learning any optimizer's hyperparameters by one-step hypergradient descent.

Baydin et al. (ICLR 2018) for the learning rate; Chandra et al. ("Gradient descent: the ultimate
optimizer", NeurIPS 2022) and MADA (Ozkara et al., ICML 2024) for any coefficient. With
x_t = x_{t-1} + Delta_t(q) the full update of the wrapped optimizer, the hypergradient at step t is

    h_t = d f_t(x_{t-1}) / d q = < g_t, d Delta_{t-1} / d q >

with everything but the last update held fixed (docs/mada.md §3). Within one step, in the
official MADA code's order: h_t from the stored tangents, the hyper-optimizer step on q (default:
per-name SGD, each |h| clipped to 10), projection onto the domain, then the parameter update with
the new q and its tangents d Delta_t / d q (forward mode, one ``jax.jvp`` per learned name; see
``_update_with_tangents``), stored for the next step.

Mechanisms (docs/mada.md §3): ``tangents="forward"`` (default, any optimizer; option A) stores
one tangent per learned name (k parameter-sized buffers in the params' dtype) and differentiates
the inner update forward in q, one jvp per name each step; the hypergradient is then k inner
products (a global reduction: an all-reduce under sharding). ``tangents="closed_form"`` (option
C) asks the inner optimizer for <g_{t+1}, d Delta_t / d q> directly from its post-update state
(``WithHypergradients``, e.g. ``mada_optimizer(..., closed_form_hypergradients=True)``): no
tangents, no linearisation.
Non-finite hypergradients skip the hyper-update for that step (q and the hyper-optimizer state
stay as they were); the step is counted in ``nonfinite_skips`` and its hypergradients are stored
(and logged) as 0, so learned values and their diagnostics are never NaN.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_accel import _common as C


class WithHypergradients(optax.GradientTransformationExtraArgs):
  """A full optimizer that also computes its own one-step hypergradients in closed form.

  ``hypergradients(state, next_grads, q) -> {name: <next_grads, d Delta / d q_name>}``, where
  ``state`` is the optimizer state after the step whose update Delta was computed with ``q``.
  """

  def __new__(cls, init, update, hypergradients):
    obj = super().__new__(cls, init, update)
    obj.hypergradients = hypergradients
    return obj


class HypergradientState(NamedTuple):
  """State of ``hypergradient_wrapper``."""
  count: jax.Array
  hyperparams: dict  # the learned values, already projected onto their domain
  hypergradients: dict  # h_t of the last step (before clipping); 0 where h_t was not finite
  hyper_state: optax.OptState
  tangents: dict  # name -> d Delta_{t-1} / d q_name, param-shaped
  inner_state: optax.OptState
  nonfinite_skips: jax.Array  # hyper-steps skipped because a hypergradient was not finite

  def diagnostics(self) -> dict[str, jax.Array]:
    return {**{f"learned/{k}": v for k, v in self.hyperparams.items()},
            **{f"hypergrad/{k}": v for k, v in self.hypergradients.items()},
            "hypergrad/nonfinite_skips": self.nonfinite_skips}


def per_name(value: Any, names: Sequence[str], defaults: dict | None = None) -> dict:
  """A per-name setting as a dict: a dict updates ``defaults``, a scalar applies to every name,
  None keeps ``defaults``.

  Args:
    value: a dict name -> setting, one setting for every name, or None.
    names: the names a scalar ``value`` applies to.
    defaults: the settings ``value`` updates (default: none).

  Returns:
    A new dict name -> setting (``defaults`` is not changed).

  Examples:
    >>> from optax_accel.hypergradient import per_name
    >>> per_name(0.1, ["b1", "b2"])
    {'b1': 0.1, 'b2': 0.1}
    >>> per_name({"b2": 0.5}, ["b1", "b2"], defaults={"b1": 0.1, "b2": 0.1})
    {'b1': 0.1, 'b2': 0.5}
  """
  out = dict(defaults or {})
  if isinstance(value, dict):
    out.update(value)
  elif value is not None:
    out.update({n: value for n in names})
  return out


def per_name_sgd(hyper_lr: Any, names: Sequence[str], *, momentum: float = 0.0,
                 clip: float | None = 10.0) -> optax.GradientTransformation:
  """The official MADA code's hyper-optimizer over a dict of scalars.

  Update rule, per name::

      h <- h min(1, clip / (|h| + 1e-6));   b <- momentum b + h  (b_0 = 0);   q <- q - hyper_lr b

  Args:
    hyper_lr: a float for every name, or a dict name -> float.
    names: the learned names.
    momentum: heavy-ball momentum (may be traced, e.g. under inject_hyperparams).
    clip: bound on each ``|h|`` (None: no clipping).

  Returns:
    An ``optax.GradientTransformation`` over ``{name: scalar}``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax_accel as oa
    >>> tx = oa.per_name_sgd({"b1": 0.1, "b2": 0.01}, ("b1", "b2"), clip=1.0)
    >>> h = {"b1": jnp.array(5.0), "b2": jnp.array(0.5)}
    >>> step, _ = tx.update(h, tx.init(h))
    >>> print(round(float(step["b1"]), 4), round(float(step["b2"]), 4))
    -0.1 -0.005

  References:
    Baydin, Cornish, Martinez Rubio, Schmidt, Wood, *Online Learning Rate Adaptation with
    Hypergradient Descent*, ICLR 2018. Chandra, Xie, Ragan-Kelley, Meijer, *Gradient Descent: The
    Ultimate Optimizer*, NeurIPS 2022. Ozkara et al., *MADA*, ICML 2024, arXiv:2401.08893.
  """
  rates = per_name(hyper_lr, names)
  stages = []
  if clip is not None:
    stages.append(optax.stateless(lambda h, p=None: jax.tree.map(
        lambda x: x * jnp.minimum(1.0, clip / (jnp.abs(x) + 1e-6)), h)))
  stages.append(optax.trace(momentum))  # momentum may be traced (inject_hyperparams)
  stages.append(optax.stateless(lambda h, p=None: {k: -rates[k] * v for k, v in h.items()}))
  return optax.chain(*stages)


def _validate(inner_factory, learnable, rates, domain, freeze_steps, bound):
  params = inspect.signature(inner_factory).parameters
  for name in learnable:
    if name not in params:
      raise ValueError(f"`learnable` name {name!r} is not an argument of {inner_factory.__name__}.")
  for name in learnable:
    if name not in rates:
      raise ValueError(f"`hyper_lr` has no entry for {name!r}.")
    C.check_nonnegative(f"hyper_lr[{name!r}]", rates[name])
  for name, (lo, hi) in (domain or {}).items():
    if name not in learnable:
      raise ValueError(f"`domain` names {name!r}, which is not in `learnable`.")
    if not lo < hi:
      raise ValueError(f"`domain` for {name!r} must have lo < hi, got ({lo}, {hi}).")
  C.check_steps("freeze_steps", freeze_steps, allow_none=False)
  for name in learnable:
    value = bound[name]
    if isinstance(value, jax.core.Tracer):  # e.g. under inject_hyperparams: only init uses it
      continue
    if callable(value) or not C.all_concrete(value):
      raise ValueError(f"The initial value of learnable {name!r} must be a number, got {value!r}.")
    lo, hi = (domain or {}).get(name, (-float("inf"), float("inf")))
    if not lo <= float(value) <= hi:
      raise ValueError(f"The initial value of {name!r} ({value}) is outside its `domain` "
                       f"[{lo}, {hi}].")


def _clip_by_global_norm(tree, max_norm):
  clipped, _ = optax.clip_by_global_norm(max_norm).update(tree, optax.EmptyState())
  return clipped


def _hyper_step(h, state, hyper_opt, boxes, freeze_steps):
  """Steps 2-3: one hyper-optimizer step on q, projected onto the boxes; skipped (q and the
  hyper-optimizer state kept) while frozen or when any h is not finite.
  Returns (q, hyper_state, finite)."""
  step, hyper_state = hyper_opt.update(h, state.hyper_state, state.hyperparams)
  finite = jnp.all(jnp.stack([jnp.isfinite(v) for v in h.values()]))
  ok = jnp.logical_and(state.count >= freeze_steps, finite)
  q = {n: jnp.where(ok, jnp.clip(v + step[n], *boxes[n]), v)
       for n, v in state.hyperparams.items()}
  hyper_state = jax.tree.map(lambda new, old: jnp.where(ok, new, old), hyper_state,
                             state.hyper_state)
  return q, hyper_state, finite


def _update_with_tangents(inner_update, inputs, q, old_tangents):
  """Step 4 with stored tangents: the inner update at q and d(update)/dq_name for every name,
  one forward-mode ``jax.jvp`` per name. Returns (updates, inner_state, tangents).

  How the work is split decides the bytes the compiled step moves (benchmarks/step_traffic.py,
  around optax.adam, unstaged TPU v5e; ideal 32 + 8 k B/param for k names; docs/performance.md):

  - one name: the jvp also gives the update and the inner state. XLA then forms the new state
    and the tangent in one kernel, and the parameter update in a second that reads the new state
    back (48 B/param, ideal 40).
  - several names: the update and the inner state by a plain call (a kernel that also applies
    the update, as the inner optimizer alone compiles), and every tangent from jvps that read the
    step's inputs from behind one optimization barrier, so that they form one more kernel that
    reads the inputs again and writes the k tangents (44 + 8 k B/param: 60 for two names). Taking
    the primal from the first jvp, as for one name, added a kernel per further name (68 for two),
    and without the barrier XLA merged the primal work so that the new state was written, read
    back and copied (84 and 20 copies at two GPT-2 blocks).
  """
  names = list(q)
  bases = {name: {m: jnp.asarray(float(m == name), q[m].dtype) for m in q} for name in names}
  if len(names) == 1:
    (new_updates, inner_state), (tangent, _) = jax.jvp(
        lambda q_: inner_update(q_, inputs), (q,), (bases[names[0]],))
    tangents = {names[0]: tangent}
  else:
    new_updates, inner_state = inner_update(q, inputs)
    behind_barrier = jax.lax.optimization_barrier(inputs)
    tangents = {name: jax.jvp(lambda q_: inner_update(q_, behind_barrier), (q,),
                              (bases[name],))[1][0] for name in names}
  return new_updates, inner_state, {name: C.cast_like(tangents[name], old_tangents[name])
                                    for name in names}


def hypergradient_wrapper(
    inner_factory: Callable[..., optax.GradientTransformation],
    learnable: Sequence[str],
    hyper_lr: Any,
    *,
    domain: dict | None = None,
    hyper_optimizer: optax.GradientTransformation | None = None,
    freeze_steps: int = 0,
    static_args: Sequence[str] = (),
    hyper_momentum: float = 0.0,
    hypergrad_clip: float | None = 10.0,
    tangents: str = "forward",
    clip_norm: float | None = None,
) -> Callable[..., optax.GradientTransformationExtraArgs]:
  """Wraps ``inner_factory`` so that its ``learnable`` hyperparameters are learned.

  Update rule (docs/mada.md §3), with Delta the inner optimizer's update::

      h_t = <g_t, d Delta_{t-1} / d q>            (one global reduction per name)
      q <- project(q + hyper_optimizer(h_t))      (skipped while frozen or if h is not finite)
      Delta_t = inner_factory(q).update(g_t, ...)

  Used like ``optax.inject_hyperparams``: ``hypergradient_wrapper(optax.adam, ("b1", "b2"),
  1e-4)(learning_rate=1e-3)``. ``inner_factory(**hyperparams)`` must build the FULL optimizer
  (its updates are what ``optax.apply_updates`` adds to the params), e.g. ``optax.sgd``,
  ``optax.adamw``, ``oa.ademamix``, ``oa.am_adamw``; it is rebuilt every step with the current
  values (arguments in ``static_args``, bools, strings and schedules are passed through as given).

  Args:
    inner_factory: the optimizer factory.
    learnable: names of float arguments of ``inner_factory`` to learn.
    hyper_lr: learning rate of the hyper-optimizer, a float or a dict name -> float (>= 0).
    domain: name -> (lo, hi) box; learned values are projected onto it after every hyper-step
      and stored projected (the hypergradient is taken at the projected value).
    hyper_optimizer: an optax transformation over the dict of learned values (default:
      ``per_name_sgd(hyper_lr, learnable, momentum=hyper_momentum, clip=hypergrad_clip)``).
    freeze_steps: the hyper-update is skipped for the first ``freeze_steps`` steps.
    static_args: arguments that must never be traced (like ``inject_hyperparams``'s); only the
      learnable ones are, so this just guards against naming one of them.
    hyper_momentum: momentum of the default hyper-optimizer.
    hypergrad_clip: bound on each ``|h|`` of the default hyper-optimizer (None: off).
    tangents: "forward" (stored forward-mode tangents, any optimizer) or "closed_form" (the
      inner optimizer is a ``WithHypergradients``; nothing parameter-sized is stored here).
    clip_norm: clip the gradient the inner optimizer sees to this global norm, while the
      hypergradient is formed from the raw gradient, as the official MADA code does (None: no
      clipping here; chaining ``optax.clip_by_global_norm`` in front clips both).

  Returns:
    A factory with ``inner_factory``'s signature, returning an
    ``optax.GradientTransformationExtraArgs`` whose state is a ``HypergradientState``.

  Raises:
    ValueError: no learnable name, a learnable name that is not an argument of
      ``inner_factory``, a domain with lo >= hi, an initial value outside its domain or not a
      number, a negative ``hyper_lr``.

  Examples:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optax_accel as oa
    >>> opt = oa.hypergradient_wrapper(optax.sgd, ("learning_rate",), 1e-3)(0.1)
    >>> loss = lambda x: jnp.sum(x ** 2)
    >>> x = jnp.ones(3)
    >>> state = opt.init(x)
    >>> for _ in range(5):
    ...   updates, state = opt.update(jax.grad(loss)(x), state, x)
    ...   x = optax.apply_updates(x, updates)
    >>> bool(state.hyperparams["learning_rate"] > 0.1)  # the loss wants a larger step
    True

  References:
    Baydin, Cornish, Martinez Rubio, Schmidt, Wood, *Online Learning Rate Adaptation with
    Hypergradient Descent*, ICLR 2018. Chandra, Xie, Ragan-Kelley, Meijer, *Gradient Descent: The
    Ultimate Optimizer*, NeurIPS 2022. Ozkara et al., *MADA*, ICML 2024, arXiv:2401.08893.
  """
  learnable = tuple(learnable)
  if not learnable:
    raise ValueError("`learnable` must name at least one hyperparameter to learn.")
  signature = inspect.signature(inner_factory)
  C.check_choice("tangents", tangents, ("forward", "closed_form"))
  if clip_norm is not None:
    C.check_range("clip_norm", clip_norm, 0.0, lo_open=True)
  closed_form = tangents == "closed_form"
  # Only learned values are traced; every other argument is passed through unchanged, so
  # ``static_args`` (kept for parity with inject_hyperparams) just must not name a learnable.
  both = set(static_args) & set(learnable)
  if both:
    raise ValueError(f"`static_args` and `learnable` share {sorted(both)}.")

  def factory(*args, **kwargs) -> optax.GradientTransformationExtraArgs:
    bound = signature.bind(*args, **kwargs)
    bound.apply_defaults()
    values = dict(bound.arguments)
    rates = per_name(hyper_lr, learnable)
    _validate(inner_factory, learnable, rates, domain, freeze_steps, values)
    fixed = {k: v for k, v in values.items() if k not in learnable}
    hyper_opt = hyper_optimizer or per_name_sgd(rates, learnable, momentum=hyper_momentum,
                                                clip=hypergrad_clip)
    boxes = {n: (domain or {}).get(n, (-jnp.inf, jnp.inf)) for n in learnable}

    def build(q):
      return optax.with_extra_args_support(inner_factory(**fixed, **q))

    probe = inner_factory(**fixed, **{n: values[n] for n in learnable})  # validates every arg
    if closed_form and not isinstance(probe, WithHypergradients):
      raise ValueError('`tangents`="closed_form" needs an inner optimizer that is a '
                       f"WithHypergradients; {inner_factory.__name__} returned {type(probe)}.")

    def init_fn(params):
      dtype = C.as_float(0).dtype
      q = {n: jnp.asarray(values[n], dtype) for n in learnable}
      return HypergradientState(
          count=C.count_init(), hyperparams=q,
          hypergradients={n: jnp.zeros([], dtype) for n in learnable},
          hyper_state=hyper_opt.init(q),
          tangents={} if closed_form else {n: optax.tree.zeros_like(params) for n in learnable},
          inner_state=build(q).init(params), nonfinite_skips=C.count_init())

    def update_fn(updates, state, params=None, **extra_args):
      # 1. h_t = <g_t, d Delta_{t-1} / d q>, a global reduction per name.
      if closed_form:
        h = inner_factory(**fixed, **state.hyperparams).hypergradients(
            state.inner_state, updates, state.hyperparams)
      else:
        h = {n: C.tree_vdot(updates, state.tangents[n]) for n in learnable}
      h = {n: jnp.asarray(h[n], state.hyperparams[n].dtype) for n in learnable}
      q, hyper_state, finite = _hyper_step(h, state, hyper_opt, boxes, freeze_steps)

      # 4. the parameter update with the new q (linearised in q for the next hypergradient).
      grads = updates if clip_norm is None else _clip_by_global_norm(updates, clip_norm)

      def inner_update(q_, inputs):
        return tuple(build(q_).update(*inputs, **extra_args))

      inputs = (grads, state.inner_state, params)
      if closed_form:
        (new_updates, inner_state), tangents = inner_update(q, inputs), {}
      else:
        new_updates, inner_state, tangents = _update_with_tangents(inner_update, inputs, q,
                                                                   state.tangents)
      # Traced hyperparameters can promote the inner state and updates (optax casts with the
      # betas' dtype); keep both dtype-stable.
      new_updates = C.cast_like(new_updates, updates)
      inner_state = C.cast_like(inner_state, state.inner_state)
      return new_updates, HypergradientState(
          count=optax.safe_increment(state.count), hyperparams=q,
          hypergradients={n: jnp.where(jnp.isfinite(v), v, 0.0) for n, v in h.items()},
          hyper_state=hyper_state, tangents=tangents, inner_state=inner_state,
          nonfinite_skips=state.nonfinite_skips + jnp.logical_not(finite).astype(jnp.int32))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)

  return factory
