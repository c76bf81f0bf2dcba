"""Every public factory's default hyperparameters, pinned (each checked against its reference).

A default is part of the method: ``schedule_free_adamw()`` is only Defazio et al.'s optimizer if
its learning rate, betas and averaging power are theirs. Sources: Schedule-Free's reference code
(SGD lr 1.0, AdamW lr 0.0025, b1 0.9, b2 0.999, weight_lr_power 2, r 0), AdEMAMix as in
apple/ml-ademamix's optax version and optax.contrib (b3 0.9999, alpha 5), Simplified-AdEMAMix's
reference code (lr 1e-4 is the caller's; b1 0.99, b2 0.95, alpha 0, min_beta1 0.9), MARS's
reference code (lr 3e-3, b1 0.95, b2 0.99, gamma 0.025, per-tensor clip at 1), AM (lam 0.1,
beta_max 0.9), MADA's Table (start at Adam: b3 0, rho = c = gamma = 1; b2 0.95 for the full
optimizer), the canonical-form defaults of docs/accelerated_sgd.md.
"""
from __future__ import annotations

import inspect

import pytest

import optax_accel as oa

DEFAULTS = {
    "accelerated_sgd": {"beta": 0.9, "alpha": 1.0, "weight_decay": 0.0},
    "scale_by_accelerated_momentum": {"beta": 0.9, "alpha": 1.0, "momentum_weight": 1.0},
    "accsgd": {"kappa": 1000.0, "xi": 10.0, "small_const": 0.7},
    "mass_sgd": {"alpha": 0.05, "kappa_tilde": 12.0},
    "agnes": {"momentum": 0.99},
    "schedule_free_wrapper": {"b1": 0.9, "weight_lr_power": 2.0, "r": 0.0},
    "schedule_free_sgd": {"learning_rate": 1.0, "b1": 0.9, "warmup_steps": 0, "weight_decay": 0.0,
                          "r": 0.0, "weight_lr_power": 2.0},
    "schedule_free_adamw": {"learning_rate": 0.0025, "b1": 0.9, "b2": 0.999, "eps": 1e-08,
                            "warmup_steps": 0, "weight_decay": 0.0, "r": 0.0,
                            "weight_lr_power": 2.0},
    "schedule_free_ademamix": {"learning_rate": 0.0005, "b1": 0.9, "b2": 0.999, "b3": 0.9999,
                               "alpha": 5.0, "eps": 1e-08, "warmup_steps": 0,
                               "weight_decay": 0.0, "r": 0.0, "weight_lr_power": 2.0},
    "ademamix": {"b1": 0.9, "b2": 0.999, "b3": 0.9999, "alpha": 5.0, "eps": 1e-08,
                 "eps_root": 0.0, "weight_decay": 0.0},
    "scale_by_ademamix": {"b1": 0.9, "b2": 0.999, "b3": 0.9999, "alpha": 5.0, "eps": 1e-08,
                          "eps_root": 0.0},
    "alpha_warmup_schedule": {"alpha_start": 0.0},
    "simplified_ademamix": {"b1": 0.99, "b2": 0.95, "alpha": 0.0, "eps": 1e-08, "eps_root": 0.0,
                            "weight_decay": 0.0, "b1_start": 0.9, "bias_correction1": False},
    "scale_by_simplified_ademamix": {"b1": 0.99, "b2": 0.95, "alpha": 0.0, "eps": 1e-08,
                                     "eps_root": 0.0, "b1_start": 0.9, "bias_correction1": False},
    "mars_adamw": {"learning_rate": 0.003, "b1": 0.95, "b2": 0.99, "gamma": 0.025, "eps": 1e-08,
                   "weight_decay": 0.0, "clip_threshold": 1.0, "clip_scope": "tensor"},
    "mars_lion": {"b1": 0.95, "b2": 0.99, "gamma": 0.025, "weight_decay": 0.0,
                  "clip_threshold": 1.0, "clip_scope": "tensor"},
    "scale_by_mars": {"b1": 0.95, "b2": 0.99, "gamma": 0.025, "eps": 1e-08, "variant": "adamw",
                      "clip_threshold": 1.0, "clip_scope": "tensor"},
    "adaptive_memory_momentum": {"lam": 0.1, "beta_max": 0.9, "granularity": "global",
                                 "beta_min": 0.0, "gap": "first_order"},
    "am_sgd": {"lam": 0.1, "beta_max": 0.9, "weight_decay": 0.0, "granularity": "global",
               "beta_min": 0.0, "lr_ratio": True},
    "am_adamw": {"b2": 0.999, "eps": 1e-08, "lam": 0.1, "beta_max": 0.9, "weight_decay": 0.0,
                 "granularity": "per_tensor", "beta_min": 0.0, "lr_ratio": True},
    "scale_by_am_adam": {"b2": 0.999, "eps": 1e-08, "lam": 0.1, "beta_max": 0.9,
                         "weight_decay": 0.0, "granularity": "per_tensor", "beta_min": 0.0},
    "avgrad": {"b1": 0.9, "b2": 0.999, "eps": 1e-08, "weight_decay": 0.0},
    "scale_by_avgrad": {"b1": 0.9, "b2": 0.999, "eps": 1e-08},
    "mada": {"b1": 0.9, "b2": 0.95, "b3": 0.0, "rho": 1.0, "c": 1.0, "gamma": 1.0,
             "weight_decay": 0.0, "eps": 1e-08, "hyper_momentum": 0.0, "freeze_steps": 0},
    "mada_optimizer": {"b1": 0.9, "b2": 0.95, "b3": 0.0, "rho": 1.0, "c": 1.0, "gamma": 1.0,
                       "weight_decay": 0.0, "eps": 1e-08, "closed_form_hypergradients": False},
    "scale_by_mada": {"b1": 0.9, "b2": 0.999, "b3": 0.0, "rho": 1.0, "c": 1.0, "gamma": 1.0,
                      "lion_b1": 0.95, "lion_b2": 0.98, "eps": 1e-08, "n_init_g_squared": True,
                      "lion_uses_updated_momentum": True, "bias_correct_n": False,
                      "hypergradient_buffers": False},
    "mada_hypergradients": {"eps": 1e-08, "lion_b1": 0.95, "lion_b2": 0.98,
                            "lion_uses_updated_momentum": True},
    "hyperadam": {"b1": 0.9, "b2": 0.999, "weight_decay": 0.0, "eps": 1e-08, "hyper_lr": 0.0001,
                  "hyper_momentum": 0.0, "freeze_steps": 0},
    "hypergradient_wrapper": {"freeze_steps": 0, "hyper_momentum": 0.0, "hypergrad_clip": 10.0,
                              "tangents": "forward"},
    "per_name_sgd": {"momentum": 0.0, "clip": 10.0},
}


def _defaults(function) -> dict:
  return {name: p.default for name, p in inspect.signature(function).parameters.items()
          if isinstance(p.default, (bool, int, float, str))}


@pytest.mark.parametrize("name", sorted(DEFAULTS))
def test_defaults(name):
  assert _defaults(getattr(oa, name)) == DEFAULTS[name]


def test_every_public_factory_with_defaults_is_pinned():
  public = {name for name in dir(oa) if not name.startswith("_")
            and inspect.isfunction(getattr(oa, name))
            and getattr(oa, name).__module__.startswith("optax_accel.")
            and _defaults(getattr(oa, name))}
  assert public - {"register"} == set(DEFAULTS)
