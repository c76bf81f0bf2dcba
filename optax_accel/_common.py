"""Shared helpers: hyperparameter validation, schedules, dtype-stable moments, diagnostics.

Every transform in optax_accel uses these, so that validation messages, schedule indexing and
state dtypes behave the same way everywhere.

Schedule convention: a ``ScalarOrSchedule`` coefficient is called with the 0-based count of
updates already applied (optax's convention), i.e. step t = 1, 2, ... uses ``schedule(t - 1)``.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

# ----------------------------------------------------------------------------------------------
# Validation (at construction time). Learning-rate schedules are checked at the probe steps
# below (0, the usual warmup ends and horizons); other schedules and traced values are only known
# at run time and pass unchecked.

SCHEDULE_PROBE_STEPS = sorted({0, *(10 ** k for k in range(7)), *(2 ** k for k in range(1, 21)),
                               *(k * 10 ** e for k in (2, 3, 5) for e in range(2, 6))})


def _concrete_float(value: Any) -> float | None:
  """The value as a Python float, or None if it is a schedule, a tracer or not a scalar."""
  if callable(value) or isinstance(value, jax.core.Tracer):
    return None
  try:
    arr = np.asarray(value)
  except Exception:  # pylint: disable=broad-except
    return None
  if arr.ndim != 0 or not np.issubdtype(arr.dtype, np.number):
    return None
  return float(arr)


def all_concrete(*values: Any) -> bool:
  """True when every value is a concrete scalar (not a schedule or a traced array)."""
  return all(_concrete_float(v) is not None for v in values)


def check_range(name: str, value: Any, lo: float | None = None, hi: float | None = None, *,
                lo_open: bool = False, hi_open: bool = False) -> None:
  """Raise ValueError naming ``name`` unless ``value`` is finite and inside the interval.

  Schedules and traced values are accepted unchecked (see :func:`check_learning_rate`). A string,
  a sequence or any other non-scalar raises TypeError: it is not a number, even when it reads
  like one.
  """
  if isinstance(value, (str, bytes)):
    raise TypeError(f"`{name}` must be a number or a schedule, got the string {value!r}.")
  v = _concrete_float(value)
  if v is None:
    if callable(value) or isinstance(value, jax.core.Tracer):
      return
    raise TypeError(f"`{name}` must be a number or a schedule, got {value!r}.")
  left = "(" if lo_open else "["
  right = ")" if hi_open else "]"
  interval = f"{left}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{right}"
  ok = math.isfinite(v)
  if ok and lo is not None:
    ok = v > lo if lo_open else v >= lo
  if ok and hi is not None:
    ok = v < hi if hi_open else v <= hi
  if not ok:
    raise ValueError(f"`{name}` must be finite and in {interval}, got {value!r}.")


def check_learning_rate(value: Any, name: str = "learning_rate") -> None:
  """A learning rate: finite and >= 0; a schedule must be so at every ``SCHEDULE_PROBE_STEPS``
  step (one that cannot be called with a plain step count is accepted unchecked)."""
  check_range(name, value, 0.0)
  if not callable(value):
    return
  for step in SCHEDULE_PROBE_STEPS:
    try:
      at_step = value(step)
    except Exception:  # pylint: disable=broad-except
      return
    check_range(f"{name} (schedule at step {step})", at_step, 0.0)


def check_beta(name: str, value: Any) -> None:
  """A decay rate: in [0, 1)."""
  check_range(name, value, 0.0, 1.0, hi_open=True)


def check_nonnegative(name: str, value: Any) -> None:
  check_range(name, value, 0.0)


def check_choice(name: str, value: Any, choices: Iterable[str]) -> None:
  choices = tuple(choices)
  if value not in choices:
    raise ValueError(f"`{name}` must be one of {choices}, got {value!r}.")


def check_steps(name: str, value: Any, *, allow_none: bool = True) -> None:
  """A step count: a non-negative int (or None when allowed). An injected value (a JAX array,
  as ``optax.inject_hyperparams`` passes every numeric argument) is checked where it is concrete
  and accepted unchecked where it is traced, like a schedule."""
  if value is None and allow_none:
    return
  if isinstance(value, jax.core.Tracer):
    return
  if isinstance(value, jax.Array) and value.ndim == 0:
    number = float(value)
    if number >= 0 and number == int(number):
      return
  elif not isinstance(value, bool) and isinstance(value, (int, np.integer)) and value >= 0:
    return
  raise ValueError(f"`{name}` must be a non-negative int, got {value!r}.")


def steps_off(value: Any) -> bool:
  """True when a step count switches its feature off for good: None, or a static 0. An injected
  count is never off at construction: it may be any value at run time (0 then acts as off)."""
  return value is None or (isinstance(value, (int, np.integer)) and value == 0)


def is_static(value: Any, target: float) -> bool:
  """True only for a Python/NumPy scalar equal to ``target``.

  JAX arrays (e.g. hyperparameters injected by ``optax.inject_hyperparams`` or learned by
  ``hypergradient_wrapper``) are treated as dynamic, so that ``init`` and a traced ``update``
  always agree on the state structure.
  """
  if isinstance(value, (jax.Array, jax.core.Tracer)) or callable(value):
    return False
  return _concrete_float(value) == target


def is_static_zero(value: Any) -> bool:
  return is_static(value, 0.0)


# ----------------------------------------------------------------------------------------------
# Schedules.


def at(value: Any, count: jax.Array) -> Any:
  """Evaluates a ``ScalarOrSchedule`` at the 0-based ``count``."""
  return value(count) if callable(value) else value


def as_float(count: jax.Array) -> jax.Array:
  """A step count as a float of the default precision (float64 when x64 is enabled).

  JAX computes ``int32 / int`` in float32 even under x64; schedules that must be exact in float64
  convert the count first.
  """
  return jnp.asarray(count, jnp.result_type(float))


def warmup_fraction(count: jax.Array, warmup_steps: int | jax.Array) -> jax.Array:
  """min(count / warmup_steps, 1) in the default float precision (1 when warmup_steps == 0);
  ``warmup_steps`` may be an injected (traced) count."""
  if isinstance(warmup_steps, (int, np.integer)):
    return jnp.minimum(as_float(count) / max(warmup_steps, 1), 1.0)
  steps = as_float(warmup_steps)
  return jnp.where(steps > 0, jnp.minimum(as_float(count) / jnp.maximum(steps, 1.0), 1.0), 1.0)


def mix(weight: Any, a: Any, b: Any) -> Any:
  """weight a + (1 - weight) b; a static weight of 1 (0) gives exactly a (b) even where the other
  operand is infinite (no 0 * inf = NaN: an overflowing g^2 saturates as in optax's Adam).

  A dynamic weight (learned, injected) keeps the plain formula, so that its derivative stays
  a - b at the ends of its range (hypergradients differentiate through it)."""
  if is_static(weight, 1.0):
    return a
  if is_static_zero(weight):
    return b
  return weight * a + (1 - weight) * b


def scaled(value: Any, factor: Any) -> Any:
  """``value * factor`` for a scalar or a schedule (the result is a scalar or a schedule)."""
  if callable(value):
    return lambda count: value(count) * factor
  return value * factor


# ----------------------------------------------------------------------------------------------
# State helpers.


def is_python_number(value: Any) -> bool:
  return isinstance(value, (int, float, np.number)) and not isinstance(value, bool)


def recorded_init(value: Any) -> jax.Array:
  """Initial state entry recording a ``ScalarOrSchedule`` hyperparameter (see :func:`recorded`)."""
  return scalar(value if is_python_number(value) else 0.0)


def recorded(value: Any, applied: Any, previous: jax.Array) -> jax.Array:
  """The state entry recording the value of hyperparameter ``value`` applied at this step.

  A Python number is recorded once by :func:`recorded_init` and passed through unchanged, so
  the compiled step writes nothing for it: writing such a scalar output next to the elementwise
  update made the TPU compiler stage every operand through VMEM (1.5x the bytes of optax's
  version; benchmarks/step_traffic.py). Schedules and traced values are stored each step."""
  return previous if is_python_number(value) else scalar(applied, previous.dtype)


def stored_input(tree: Any, count: jax.Array) -> Any:
  """``tree``, a step input kept unchanged in the state (the raw gradient), as a computed value.

  A state entry that is a step input as it is gets its own copy kernel (the gradients are not
  donated, so XLA copies them into the state's buffer after fusion: one more read and write of
  every leaf). Selected by a condition on the step count that always holds (``count >= 0``), it
  is a computed value, written by the update kernel that already reads the gradient. Exact:
  every element is ``tree``'s. Used where it measured better compiled for TPU (MADA, HyperAdam);
  MARS stores its gradient as it is, because there the TPU compiler then staged more and moved
  more bytes over HBM (benchmarks/step_traffic.py; docs/performance.md §2).
  """
  keep = count >= 0
  return jax.tree.map(lambda x: jnp.where(keep, x, jnp.zeros([], x.dtype)), tree)


def zeros(params: Any, dtype: Any = None) -> Any:
  """Zeros like ``params``; with ``dtype`` given, that dtype. Works on ShapeDtypeStruct."""
  return optax.tree.zeros_like(params, dtype=dtype)


def accumulator_zeros(params: Any) -> Any:
  """Zeros like ``params`` in at least float32 (whatever ``mu_dtype``), for the buffers with a
  long memory: second moments, slow EMAs and running averages. Their per-step weight (1 - b2 =
  1e-3, 1 - b3 = 1e-4, 1/t) is below bfloat16's resolution (2**-8), so in bfloat16 they stop
  moving (docs/conventions.md, "Low-precision state"). Works on ShapeDtypeStruct."""
  return jax.tree.map(
      lambda p: jnp.zeros_like(p, dtype=jnp.promote_types(p.dtype, jnp.float32)), params)


def stochastic_round(x: jax.Array, dtype: Any, count: jax.Array, leaf: int) -> jax.Array:
  """``x`` in ``dtype``; to bfloat16, rounded stochastically (up with probability equal to the
  dropped fraction), so an iterate whose steps are below bfloat16's resolution still moves by
  them on average. The random bits are a pure function of (``count``, ``leaf``): no key in the
  state, the same on any mesh. Other dtypes are rounded to nearest."""
  if jnp.dtype(dtype) != jnp.bfloat16:
    return x.astype(dtype)
  key = jax.random.fold_in(jax.random.fold_in(jax.random.key(0), count), leaf)
  bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
  noise = jax.random.bits(key, x.shape, jnp.uint32) >> 16  # below bfloat16's 16 kept bits
  kept = (bits + noise) & jnp.uint32(0xFFFF0000)
  finite = jnp.isfinite(x)  # NaN/Inf keep their bits (the noise could turn Inf into NaN)
  rounded = jax.lax.bitcast_convert_type(jnp.where(finite, kept, bits), jnp.float32)
  return rounded.astype(jnp.bfloat16)


def cast_like(new: Any, old: Any) -> Any:
  """Casts each leaf of ``new`` to the dtype of the matching leaf of ``old`` (dtype-stable state)."""
  return jax.tree.map(lambda n, o: n.astype(o.dtype) if n is not None else None, new, old)


def count_init() -> jax.Array:
  return jnp.zeros([], jnp.int32)


def scalar(value: Any, dtype: Any = None) -> jax.Array:
  """A scalar state entry; by default of the default float precision (float64 under x64)."""
  return jnp.asarray(value, dtype=dtype or jnp.result_type(float))


def tree_vdot(a: Any, b: Any) -> jax.Array:
  """Real inner product over a whole pytree, accumulated in float32 or wider."""
  return sum((leaf_vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))),
             jnp.zeros([], jnp.float32))


def leaf_vdot(x: jax.Array, y: jax.Array) -> jax.Array:
  """sum(x * y), the products formed in float32 or wider (no f16/bf16 overflow of x * y)."""
  acc = jnp.promote_types(jnp.result_type(x, y), jnp.float32)
  return jnp.sum(x.astype(acc) * y.astype(acc))


def saturating_square(x: jax.Array) -> jax.Array:
  """x * x, saturated at the dtype's largest finite value instead of overflowing to inf.

  Used for squared-gradient terms that later meet a convex mix or a difference, where an inf
  would give 0 * inf or inf - inf = NaN: a saturated second moment only shrinks the step."""
  return jnp.minimum(x * x, jnp.finfo(x.dtype).max)


def saturate(x: jax.Array) -> jax.Array:
  """min(x, the dtype's largest finite value): keeps a non-negative moment finite."""
  return jnp.minimum(x, jnp.finfo(x.dtype).max)


def fused_sums(terms: list) -> tuple:
  """Sums of several same-shaped arrays in one variadic reduction (one pass, one kernel)."""
  dims = tuple(range(terms[0].ndim))
  zeros = tuple(jnp.zeros([], t.dtype) for t in terms)
  return jax.lax.reduce(tuple(terms), zeros, lambda a, b: tuple(x + y for x, y in zip(a, b)),
                        dims)


def full_optimizer(direction: optax.GradientTransformation,
                   learning_rate: optax.ScalarOrSchedule, weight_decay: Any = 0.0,
                   mask: Any = None) -> optax.GradientTransformationExtraArgs:
  """The aliases' pattern: direction, decoupled weight decay, then ``-learning_rate``."""
  check_learning_rate(learning_rate)
  check_nonnegative("weight_decay", weight_decay)
  return optax.chain(direction, optax.add_decayed_weights(weight_decay, mask),
                     optax.scale_by_learning_rate(learning_rate))


def with_extra_args(init_fn: Callable, update_fn: Callable
                    ) -> optax.GradientTransformationExtraArgs:
  """Wraps an ``update(updates, state, params)`` so that extra keyword args are ignored."""

  def update(updates, state, params=None, **extra_args):
    del extra_args
    return update_fn(updates, state, params)

  return optax.GradientTransformationExtraArgs(init_fn, update)


# ----------------------------------------------------------------------------------------------
# Diagnostics.


def named_scalars(prefix: str, tree: Any) -> dict[str, jax.Array]:
  """Flattens a pytree of scalars into {"prefix/path": value}; a bare scalar gives {prefix: v}."""
  if isinstance(tree, (jax.Array, np.ndarray, float, int)):
    return {prefix: jnp.asarray(tree)}
  out = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    out[f"{prefix}/{jax.tree_util.keystr(path, simple=True, separator='/')}"] = leaf
  return out


def get_diagnostics(state: Any) -> dict[str, jax.Array]:
  """The interpretable scalars of every optax_accel state found anywhere inside ``state``.

  Walks nested ``chain`` tuples, ``inject_hyperparams``, ``masked``, ``MultiSteps`` and our own
  wrapper states. Each of our states contributes through its ``diagnostics()`` method (current
  momentum coefficient, averaging weight, learned coefficients, ...); the scalar hyperparameters
  of an ``inject_hyperparams`` state are included under their own names (e.g. "learning_rate").
  A name met twice gets a numeric suffix ("b1", "b1_1", ...).

  Args:
    state: any optimizer state.

  Returns:
    ``{name: scalar}``, ready to log.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optax_accel as oa
    >>> opt = optax.inject_hyperparams(oa.am_sgd)(learning_rate=0.1)
    >>> state = opt.init(jnp.zeros(2))
    >>> sorted(oa.get_diagnostics(state))
    ['am_beta', 'am_restarts', 'beta_max', 'beta_min', 'lam', 'learning_rate', 'weight_decay']
  """
  out: dict[str, jax.Array] = {}

  def add(name, value):
    key, i = name, 1
    while key in out:
      key, i = f"{name}_{i}", i + 1
    out[key] = value

  for node in iter_states(state):
    diag = getattr(node, "diagnostics", None)
    if callable(diag) and isinstance(node, tuple):
      for k, v in diag().items():
        add(k, v)
    if isinstance(node, (optax.InjectHyperparamsState, optax.InjectStatefulHyperparamsState)):
      for k, v in node.hyperparams.items():
        if jnp.ndim(v) == 0:
          add(k, v)
  return out


def iter_states(state: Any):
  """Every node of a nested optimizer state (tuples, NamedTuples, lists, dicts), pre-order."""
  yield state
  children = state.values() if isinstance(state, dict) else (
      state if isinstance(state, (tuple, list)) else ())
  for child in children:
    yield from iter_states(child)


def find_states(state: Any, cls: type) -> list:
  """All sub-states of type ``cls`` inside nested tuples/lists/dicts (chain, inject, masked...)."""
  return [node for node in iter_states(state) if isinstance(node, cls)]
