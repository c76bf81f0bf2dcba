"""Name -> optimizer factory, for scripts, sweeps and the shared test suite."""
from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any, Callable, Optional

import optax

from optax_accel import _common as C
from optax_accel.adaptive_memory import am_adamw, am_sgd
from optax_accel.accelerated import accelerated_sgd, accsgd, agnes, mass_sgd
from optax_accel.ademamix import ademamix, simplified_ademamix
from optax_accel.mada import avgrad, hyperadam, mada
from optax_accel.mars import mars_adamw, mars_lion
from optax_accel.schedule_free import (
    schedule_free_ademamix, schedule_free_adamw, schedule_free_sgd)


@dataclasses.dataclass(frozen=True)
class _Entry:
  factory: Callable[..., optax.GradientTransformation]
  dtype_arg: Optional[str]  # keyword that sets the dtype of the large state buffers


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


_REGISTRY: dict[str, _Entry] = {
    "adamw": _Entry(_adamw, "mu_dtype"),
    "sgd": _Entry(_sgd, "accumulator_dtype"),
    "lion": _Entry(_lion, "mu_dtype"),
    "accelerated_sgd": _Entry(accelerated_sgd, "mu_dtype"),
    "accsgd": _Entry(accsgd, "mu_dtype"),
    "mass_sgd": _Entry(mass_sgd, "mu_dtype"),
    "agnes": _Entry(_agnes, "mu_dtype"),
    "schedule_free_sgd": _Entry(schedule_free_sgd, "state_dtype"),
    "schedule_free_adamw": _Entry(schedule_free_adamw, "state_dtype"),
    "schedule_free_ademamix": _Entry(schedule_free_ademamix, "state_dtype"),
    "ademamix": _Entry(ademamix, "mu_dtype"),
    "simplified_ademamix": _Entry(simplified_ademamix, "mu_dtype"),
    "mars_adamw": _Entry(mars_adamw, "mu_dtype"),
    "mars_lion": _Entry(mars_lion, "mu_dtype"),
    "am_sgd": _Entry(am_sgd, "mu_dtype"),
    "am_adamw": _Entry(am_adamw, "mu_dtype"),
    "avgrad": _Entry(avgrad, "mu_dtype"),
    "mada": _Entry(mada, "mu_dtype"),
    "hyperadam": _Entry(hyperadam, "mu_dtype"),
}


def register(name: str, factory: Callable[..., optax.GradientTransformation],
             dtype_arg: Optional[str] = "mu_dtype") -> None:
  """Adds an optimizer ``factory(learning_rate, **kwargs)`` under ``name``."""
  if name in _REGISTRY:
    raise ValueError(f"`name` {name!r} is already registered.")
  _REGISTRY[name] = _Entry(factory, dtype_arg)


def list_optimizers() -> list[str]:
  """Registered names, sorted."""
  return sorted(_REGISTRY)


def _entry(name: str) -> _Entry:
  if name not in _REGISTRY:
    raise ValueError(f"Unknown optimizer `name` {name!r}; valid names: {', '.join(list_optimizers())}.")
  return _REGISTRY[name]


def get_optimizer(name: str, learning_rate: optax.ScalarOrSchedule, **kwargs: Any
                  ) -> optax.GradientTransformation:
  """The full optimizer ``name`` (direction, weight decay, learning rate).

  Raises:
    ValueError: unknown ``name`` (the message lists the valid ones) or invalid hyperparameters.
    TypeError: a keyword the optimizer does not take.
  """
  return _entry(name).factory(learning_rate, **kwargs)


def state_dtype_argument(name: str) -> Optional[str]:
  """The keyword of optimizer ``name`` that sets its state dtype (``mu_dtype``, ...)."""
  return _entry(name).dtype_arg
