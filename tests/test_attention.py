"""The attention kernels (issue 25, in progress): Pallas splash attention against the XLA path.

The kernel, in Pallas's interpret mode on CPU, gives the XLA path's loss and update under a mesh
of 8 devices (it runs per device through ``shard_map``); bad settings are refused; the kernel's
FLOPs, which the TPU cost analysis cannot see, are counted analytically.
"""
from __future__ import annotations

import jax
import numpy as np
import pytest

pytest.importorskip("flax")

from experiments.lm import aot  # noqa: E402
from experiments.lm import config as config_lib  # noqa: E402
from experiments.lm import step as step_lib  # noqa: E402

SMALL = {"model.n_layer": 1, "train.seq_len": 128, "train.batch_size": 8, "optim.clip": 0.0}


def test_splash_attention_gives_the_xla_paths_loss_and_update():
  tokens = np.random.default_rng(0).integers(0, 256, (1, 8, 128)).astype(np.int32)
  results = {}
  for attention in ("xla", "splash"):
    program = step_lib.build_train_step(config_lib.build_config(
        "shakespeare-char", {**SMALL, "model.attention": attention}))
    with jax.set_mesh(program.mesh):
      jaxpr = str(jax.make_jaxpr(program.step)(program.abstract_state, tokens, tokens))
    assert ("pallas_call" in jaxpr) == (attention == "splash")
    state = program.init()
    first = float(program.eval_sums(state, tokens, tokens)[0])
    new, stats = program.step(state, tokens, tokens)
    results[attention] = first, float(stats["grad_norm"]), jax.device_get(new["params"])
  (loss_x, norm_x, params_x), (loss_s, norm_s, params_s) = results["xla"], results["splash"]
  assert program.mesh.size == 8
  assert loss_s == pytest.approx(loss_x, rel=1e-5) and norm_s == pytest.approx(norm_x, rel=1e-5)
  for a, b in zip(jax.tree.leaves(params_x), jax.tree.leaves(params_s)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("overrides, message", [
    ({"model.attention": "flash"}, "attention must be one of"),
    ({"model.attention": "splash", "model.dropout": 0.1}, "no dropout"),
    ({"model.attention": "splash", "train.seq_len": 100}, "multiple of 128"),
])
def test_bad_attention_settings_are_refused(overrides, message):
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.model_config(config_lib.build_config("shakespeare-char", overrides))


def test_kernel_flops_are_counted_analytically():
  mc = config_lib.model_config(config_lib.build_config("shakespeare-char",
                                                       {"model.attention": "splash"}))
  assert aot.kernel_flops(mc, 1024, 256, 4) == 12 * 6 * 384 * 256 * 1024 / 4
  remat = config_lib.model_config(config_lib.build_config(
      "shakespeare-char", {"model.attention": "splash", "model.remat": "block"}))
  assert aot.kernel_flops(remat, 1024, 256, 4) == 16 * 6 * 384 * 256 * 1024 / 4
  xla = config_lib.model_config(config_lib.build_config("shakespeare-char"))
  assert aot.kernel_flops(xla, 1024, 256, 4) == 0.0
