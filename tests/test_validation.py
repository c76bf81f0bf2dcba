"""Every registered optimizer, optax's re-exports included, refuses bad learning rates at
construction: negative, NaN, infinite, a schedule that goes negative or NaN, or a string."""
from __future__ import annotations

import math

import optax
import pytest

import optax_accel as oa

BAD_LEARNING_RATES = {
    "negative": -1e-3,
    "nan": math.nan,
    "inf": math.inf,
    "negative schedule": optax.linear_schedule(0.0, -1e-3, 100),
    "schedule negative after warmup": optax.warmup_cosine_decay_schedule(0.0, 1e-3, 50, 1000,
                                                                         end_value=-1e-4),
    "nan schedule": optax.constant_schedule(math.nan),
}


@pytest.mark.parametrize("name", oa.list_optimizers())
@pytest.mark.parametrize("case", sorted(BAD_LEARNING_RATES))
def test_bad_learning_rate_is_refused_naming_it(name, case):
  with pytest.raises(ValueError, match="learning_rate"):
    oa.get_optimizer(name, BAD_LEARNING_RATES[case])


@pytest.mark.parametrize("name", oa.list_optimizers())
def test_string_learning_rate_is_refused(name):
  with pytest.raises((TypeError, ValueError), match="learning_rate"):
    oa.get_optimizer(name, "1e-3")


@pytest.mark.parametrize("name", oa.list_optimizers())
def test_good_schedule_is_accepted(name):
  oa.get_optimizer(name, optax.warmup_cosine_decay_schedule(0.0, 1e-3, 50, 1000))


@pytest.mark.parametrize("name,kwargs", [("adamw", {"b1": 1.5}), ("adamw", {"eps": -1.0}),
                                         ("lion", {"b2": 1.0}), ("sgd", {"momentum": -0.1}),
                                         ("adamw", {"weight_decay": -0.1})])
def test_optax_reexports_validate_their_coefficients(name, kwargs):
  with pytest.raises(ValueError, match=next(iter(kwargs))):
    oa.get_optimizer(name, 1e-3, **kwargs)
