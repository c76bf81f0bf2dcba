"""Name -> :class:`OptimizerSpec` (factory and facts), for scripts, sweeps and tests."""
from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable
from typing import Any

import optax

from optax_accel import _common as C
from optax_accel.accelerated import accelerated_sgd, accsgd, agnes, mass_sgd
from optax_accel.adaptive_memory import am_adamw, am_sgd
from optax_accel.ademamix import ademamix, simplified_ademamix
from optax_accel.mada import avgrad, hyperadam, mada
from optax_accel.mars import mars_adamw, mars_lion
from optax_accel.schedule_free import schedule_free_adamw, schedule_free_ademamix, schedule_free_sgd


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
  """What a script needs to know about a registered optimizer, without guessing from its name.

  Attributes:
    name: the registry name.
    factory: ``factory(learning_rate, **kwargs)`` builds the full optimizer.
    state_dtype_arg: keyword that sets the dtype of the large state buffers (``mu_dtype``,
      ``state_dtype``, ...), or None.
    owns_warmup: takes ``warmup_steps`` itself and wants a constant ``learning_rate``
      (Schedule-Free: the averaging weights depend on the learning rate it sees).
    schedule_free: the parameters it trains are the gradient point y; evaluate and export
      ``schedule_free_eval_params(state, params)`` instead.
    learns_hyperparameters: learns coefficients during training (hypergradients), so its
      state holds a ``HypergradientState``.
    takes_weight_decay, takes_mask: whether the factory has ``weight_decay`` / a decay ``mask``
      (read off its signature).
  """
  name: str
  factory: Callable[..., optax.GradientTransformation]
  state_dtype_arg: str | None = "mu_dtype"
  owns_warmup: bool = False
  schedule_free: bool = False
  learns_hyperparameters: bool = False

  @property
  def takes_weight_decay(self) -> bool:
    return "weight_decay" in inspect.signature(self.factory).parameters

  @property
  def takes_mask(self) -> bool:
    return "mask" in inspect.signature(self.factory).parameters


def _validated(factory: Callable[..., optax.GradientTransformation], betas=(),
               nonnegative=()) -> Callable[..., optax.GradientTransformation]:
  """``factory`` (one of optax's own) with our construction-time checks of its arguments."""
  signature = inspect.signature(factory)

  @functools.wraps(factory)
  def build(*args, **kwargs):
    arguments = signature.bind(*args, **kwargs)
    arguments.apply_defaults()
    C.check_learning_rate(arguments.arguments["learning_rate"])
    for name in betas:
      C.check_beta(name, arguments.arguments[name])
    for name in nonnegative:
      C.check_nonnegative(name, arguments.arguments[name])
    return factory(*arguments.args, **arguments.kwargs)

  return build


_adamw = _validated(optax.adamw, ("b1", "b2"), ("eps", "eps_root", "weight_decay"))
_lion = _validated(optax.lion, ("b1", "b2"), ("weight_decay",))


@functools.partial(_validated, betas=("momentum",))
def _sgd(learning_rate, momentum=0.9, nesterov=False, *, accumulator_dtype=None):
  """optax.sgd with heavy-ball momentum 0.9 by default (``nesterov`` optional)."""
  return optax.sgd(learning_rate, momentum=momentum, nesterov=nesterov,
                   accumulator_dtype=accumulator_dtype)


def _agnes(learning_rate, correction_lr=None, momentum=0.99, *, mu_dtype=None):
  """AGNES with ``correction_lr`` defaulting to ``learning_rate`` (NAG) for grid use."""
  return agnes(learning_rate, learning_rate if correction_lr is None else correction_lr,
               momentum, mu_dtype=mu_dtype)


def _check_spec(spec: OptimizerSpec) -> None:
  """The keywords a spec names must be arguments of its factory."""
  parameters = inspect.signature(spec.factory).parameters
  if spec.owns_warmup and "warmup_steps" not in parameters:
    raise ValueError(f"OptimizerSpec {spec.name!r}: `owns_warmup` but the factory has no "
                     "`warmup_steps`.")
  if spec.state_dtype_arg is not None and spec.state_dtype_arg not in parameters:
    raise ValueError(f"OptimizerSpec {spec.name!r}: the factory has no `{spec.state_dtype_arg}`.")


def _specs(*specs: OptimizerSpec) -> dict[str, OptimizerSpec]:
  for spec in specs:
    _check_spec(spec)
  return {spec.name: spec for spec in specs}


_SCHEDULE_FREE = dict(state_dtype_arg="state_dtype", owns_warmup=True, schedule_free=True)
_REGISTRY: dict[str, OptimizerSpec] = _specs(
    OptimizerSpec("adamw", _adamw),
    OptimizerSpec("sgd", _sgd, "accumulator_dtype"),
    OptimizerSpec("lion", _lion),
    OptimizerSpec("accelerated_sgd", accelerated_sgd),
    OptimizerSpec("accsgd", accsgd),
    OptimizerSpec("mass_sgd", mass_sgd),
    OptimizerSpec("agnes", _agnes),
    OptimizerSpec("schedule_free_sgd", schedule_free_sgd, **_SCHEDULE_FREE),
    OptimizerSpec("schedule_free_adamw", schedule_free_adamw, **_SCHEDULE_FREE),
    OptimizerSpec("schedule_free_ademamix", schedule_free_ademamix, **_SCHEDULE_FREE),
    OptimizerSpec("ademamix", ademamix),
    OptimizerSpec("simplified_ademamix", simplified_ademamix),
    OptimizerSpec("mars_adamw", mars_adamw),
    OptimizerSpec("mars_lion", mars_lion),
    OptimizerSpec("am_sgd", am_sgd),
    OptimizerSpec("am_adamw", am_adamw),
    OptimizerSpec("avgrad", avgrad),
    OptimizerSpec("mada", mada, learns_hyperparameters=True),
    OptimizerSpec("hyperadam", hyperadam, learns_hyperparameters=True),
)


def register(spec_or_name: OptimizerSpec | str,
             factory: Callable[..., optax.GradientTransformation] | None = None,
             dtype_arg: str | None = "mu_dtype") -> None:
  """Adds an optimizer to the registry.

  Args:
    spec_or_name: an :class:`OptimizerSpec`, or a name (then ``factory`` is required).
    factory: ``factory(learning_rate, **kwargs)`` building the full optimizer.
    dtype_arg: keyword of ``factory`` setting its state dtype (None: none).

  Raises:
    ValueError: the name is already registered, or the spec names a keyword (state dtype,
      warmup) that the factory does not take.

  Examples:
    >>> import optax
    >>> import optax_accel as oa
    >>> oa.register("adamw", optax.adamw)  # e.g. oa.register("nadam", optax.nadam)
    Traceback (most recent call last):
    ...
    ValueError: `name` 'adamw' is already registered.
  """
  spec = spec_or_name if isinstance(spec_or_name, OptimizerSpec) else OptimizerSpec(
      spec_or_name, factory, dtype_arg)
  if spec.name in _REGISTRY:
    raise ValueError(f"`name` {spec.name!r} is already registered.")
  _check_spec(spec)
  _REGISTRY[spec.name] = spec


def list_optimizers() -> list[str]:
  """Registered names, sorted.

  Returns:
    The names accepted by :func:`get_optimizer` and :func:`get_spec`.

  Examples:
    >>> import optax_accel as oa
    >>> "mada" in oa.list_optimizers()
    True
  """
  return sorted(_REGISTRY)


def get_spec(name: str) -> OptimizerSpec:
  """The :class:`OptimizerSpec` of optimizer ``name``: its factory and the facts scripts need.

  Args:
    name: a registered name.

  Returns:
    The :class:`OptimizerSpec`.

  Raises:
    ValueError: unknown ``name`` (the message lists the valid ones).

  Examples:
    >>> import optax_accel as oa
    >>> spec = oa.get_spec("schedule_free_adamw")
    >>> spec.schedule_free, spec.owns_warmup, spec.state_dtype_arg
    (True, True, 'state_dtype')
  """
  if name not in _REGISTRY:
    raise ValueError(f"Unknown optimizer `name` {name!r}; valid names: "
                     f"{', '.join(list_optimizers())}.")
  return _REGISTRY[name]


def get_optimizer(name: str, learning_rate: optax.ScalarOrSchedule, **kwargs: Any
                  ) -> optax.GradientTransformation:
  """The full optimizer ``name`` (direction, weight decay, learning rate).

  Args:
    name: a registered name (:func:`list_optimizers`).
    learning_rate: scalar or schedule of the 0-based count.
    **kwargs: the optimizer's other arguments.

  Returns:
    The optimizer, an ``optax.GradientTransformation``.

  Raises:
    ValueError: unknown ``name`` (the message lists the valid ones) or invalid hyperparameters.
    TypeError: a keyword the optimizer does not take.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax_accel as oa
    >>> opt = oa.get_optimizer("ademamix", 1e-3, alpha=8.0, weight_decay=0.1)
    >>> state = opt.init({"w": jnp.zeros(3)})
  """
  return get_spec(name).factory(learning_rate, **kwargs)


def state_dtype_argument(name: str) -> str | None:
  """The keyword of optimizer ``name`` that sets its state dtype (``mu_dtype``, ...).

  Args:
    name: a registered name.

  Returns:
    The keyword, or None.

  Examples:
    >>> import optax_accel as oa
    >>> oa.state_dtype_argument("sgd")
    'accumulator_dtype'
  """
  return get_spec(name).state_dtype_arg
