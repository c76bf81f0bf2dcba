"""The LM step at scale: compiled for TPU slices (no TPU needed), and its CPU equivalences.

TPU part: the step of the training script, compiled deviceless for v5e:2x2 (4 chips) and v5e:4x4
(16 chips) in a subprocess (libtpu from the ``tpu-aot`` extra): per-chip FLOPs and temporaries
must fall with the chip count, no batch-sized activation may be replicated, and the optimizer
state must be sharded like the parameters. CPU part: gradient accumulation, rematerialisation and
the padded vocabulary change nothing.
"""
from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("flax")

from helpers import tpu_probe  # noqa: E402

from experiments.lm import config as config_lib  # noqa: E402
from experiments.lm import model as model_lib  # noqa: E402
from experiments.lm import step as step_lib  # noqa: E402
from experiments.lm import train as train_lib  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]

# (config, overrides, whether activations dominate the temporaries): batches that 4 and 16 chips
# divide, of sizes that no weight dimension has, so that a replicated activation is recognisable
# by its leading (batch, seq) dimensions. At batch 80 tiny's temporaries (~6 MB) are fixed-size
# buffers, not activations; at batch 1920 activations dominate (~300 MB on 4 chips) and must
# shrink with the chip count. (shakespeare-char at batch 96 shows the same in results/scale/;
# its two compiles took 2-5 minutes of the CI budget.)
SCALE_CASES = {
    "tiny-fsdp": ("tiny", ["train.batch_size=80", "mesh.fsdp=-1"], False),
    "tiny-activations": ("tiny", ["train.batch_size=1920"], True),
}


@pytest.mark.parametrize("case", sorted(SCALE_CASES))
def test_step_spreads_over_tpu_chips(case):
  config, overrides, activation_bound = SCALE_CASES[case]
  probes = tpu_probe(config, "v5e:2x2,v5e:4x4", *overrides)
  small, large = probes["v5e:2x2"], probes["v5e:4x4"]
  assert small["flops"] >= 3.5 * large["flops"] > 0, (small["flops"], large["flops"])
  if activation_bound:
    assert small["temp_bytes"] >= 3.0 * large["temp_bytes"] > 0, (small["temp_bytes"],
                                                                   large["temp_bytes"])
  for probe in (small, large):
    assert probe["replicated_batch_values"] == [], probe["replicated_batch_values"]
    assert probe["mismatched_state"] == [], probe["mismatched_state"]
  if "mesh.fsdp=-1" in overrides:
    assert large["sharded_params"] > 0


@pytest.mark.parametrize("name", ["schedule_free_adamw", "ademamix", "am_adamw", "mada",
                                  "hyperadam"])
def test_parameter_sized_optimizer_buffers_are_sharded_like_their_parameter(name):
  """No compile: the state sharding the step is built with (8 CPU devices, pure FSDP)."""
  cfg = config_lib.build_config("tiny", {"optim.name": name, "mesh.fsdp": -1,
                                        "train.batch_size": 8})
  program = step_lib.build_train_step(cfg)
  params = program.abstract_state["params"]
  specs = {leaf.shape: leaf.sharding.spec for leaf in jax.tree.leaves(params)}
  checked = 0
  for leaf in jax.tree.leaves(program.abstract_state["opt_state"]):
    if leaf.shape in specs:
      assert leaf.sharding.spec == specs[leaf.shape], (leaf.shape, leaf.sharding.spec)
      checked += leaf.ndim >= 2 and any(s is not None for s in leaf.sharding.spec)
  assert checked >= 2 * sum(leaf.ndim >= 2 for leaf in jax.tree.leaves(params)) - 2


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  rng = np.random.default_rng(1)
  text = " ".join(rng.choice("to be or not that is the question whether tis nobler".split(),
                             size=30_000))
  path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
  path.write_text(text)
  return str(path)


def _train(corpus, **overrides):
  cfg = config_lib.build_config("tiny", {"data.path": corpus, "train.steps": 6,
                                        "train.batch_size": 32, "log.progress": False,
                                        "eval.interval": 3, "eval.tokens": 1024, **overrides})
  summary = train_lib.train(cfg)
  return [r["loss"] for r in summary["history"]], summary["state"]["params"]


def _assert_same(a, b, tol=1e-5, what=""):
  np.testing.assert_allclose(a[0], b[0], rtol=tol, atol=tol, err_msg=what)
  for x, y in zip(jax.tree.leaves(a[1]), jax.tree.leaves(b[1])):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=tol, atol=tol, err_msg=what)


def test_microbatches_equal_one_large_batch(corpus):
  """4 microbatches of 8 = one batch of 32 (8 CPU devices): the optimizer sees the same mean
  gradient and loss. Accumulation precedes the optimizer, so one optimizer serves: AM-AdamW,
  whose beta reads the whole gradient and whose value= gets the mean loss."""
  one = _train(corpus, **{"optim.name": "am_adamw"})
  accumulated = _train(corpus, **{"optim.name": "am_adamw", "train.grad_accum": 4})
  _assert_same(one, accumulated)


def test_rematerialisation_changes_nothing(corpus):
  plain = _train(corpus)
  for remat in ("block", "full", "dots_saveable"):
    _assert_same(plain, _train(corpus, **{"model.remat": remat}), what=f"model.remat={remat}")


@pytest.mark.parametrize("arch", ["tiny", "tiny-llama"])
@pytest.mark.parametrize("chunk, masked", [(0, False), (16, False), (16, True)])
def test_padded_vocabulary_loss_equals_unpadded(arch, chunk, masked):
  """Vocabulary 200 is padded to 256; the fused chunked loss and its gradient equal optax's
  cross-entropy over the 200 real logits. Masked (padded documents): targets -1 carry no loss and
  ``scale`` x the sum over the rest equals the mean over the real targets."""
  import optax  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  cfg = model_lib.ModelConfig(**{**model_lib.PRESETS[arch].__dict__, "vocab_size": 200,
                                 "loss_chunk": chunk})
  assert cfg.padded_vocab == 256
  graphdef, params = nnx.split(model_lib.LanguageModel(cfg, nnx.Rngs(0)), nnx.Param)
  tokens = jax.random.randint(jax.random.key(1), (3, 64), 0, 200)
  targets = jnp.roll(tokens, -1, axis=1)
  valid = jnp.ones(targets.shape, bool)
  if masked:  # rows padded after 40, 9 and 64 real targets
    valid = jnp.arange(64)[None] < jnp.array([40, 9, 64])[:, None]
    targets = jnp.where(valid, targets, -1)
  scale = 1.0 / jnp.sum(valid) if masked else None

  def fused(p):
    return nnx.merge(graphdef, p).loss(tokens, targets, scale)

  def reference(p):
    logits = nnx.merge(graphdef, p)(tokens)
    assert logits.shape == (3, 64, 200)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(targets, 0))
    return jnp.sum(jnp.where(valid, losses, 0.0)) / jnp.sum(valid)

  (a, grad_a), (b, grad_b) = jax.value_and_grad(fused)(params), jax.value_and_grad(reference)(params)
  np.testing.assert_allclose(a, b, rtol=1e-6)
  for x, y in zip(jax.tree.leaves(grad_a), jax.tree.leaves(grad_b)):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7)


def test_grad_accum_auto_and_bad_values():
  cfg = config_lib.build_config("tiny", {"train.batch_size": 64, "train.grad_accum": "auto",
                                        "train.device_batch": 2})
  assert step_lib.gradient_accumulation(cfg, 8) == 4
  for bad in (0, 3, -1, "x", True):
    with pytest.raises(config_lib.ConfigError, match="grad_accum"):
      step_lib.gradient_accumulation({**cfg, "train.grad_accum": bad}, 8)
