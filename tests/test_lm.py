"""The Flax LM training script: model sizes, learning, sharding, checkpoints, errors (stopping and
resuming: test_train_safety.py)."""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

pytest.importorskip("flax")
pytest.importorskip("orbax.checkpoint")

from helpers import refused_by_the_cli  # noqa: E402

import optax_accel as oa  # noqa: E402
from experiments.lm import config as config_lib  # noqa: E402
from experiments.lm import model as model_lib  # noqa: E402
from experiments.lm import step as step_lib  # noqa: E402
from experiments.lm import train as train_lib  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """A small deterministic English-like corpus (no network)."""
  rng = np.random.default_rng(0)
  words = ("the of and to in that is was he for it with as his on be at by had not "
           "thou thy thee lord king love night sweet death heart").split()
  text = "\n".join(" ".join(rng.choice(words, size=12)) + "." for _ in range(3000))
  path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
  path.write_text(text)
  return str(path)


def _cli(*args, env=None):
  out = subprocess.run([sys.executable, "-m", "experiments.lm.train", *args], cwd=ROOT,
                       capture_output=True, text=True, env={**os.environ, **(env or {})},
                       timeout=600, check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  return out


def _tiny(corpus, steps=20, **extra):
  sets = {"data.path": corpus, "train.steps": steps, "log.progress": False, "eval.interval": 10,
          "eval.tokens": 2048, **extra}
  return [x for k, v in sets.items() for x in ("--set", f"{k}={json.dumps(v) if not isinstance(v, str) else v}")]


@pytest.mark.parametrize("name", sorted(model_lib.PRESETS))
def test_preset_parameter_counts(name):
  expected = {"gpt2-124m": 124e6, "llama-60m": 58e6, "llama-100m": 100e6,
              "shakespeare-char": 10.8e6}
  count = model_lib.parameter_count(model_lib.PRESETS[name])  # eval_shape: nothing allocated
  if name in expected:
    assert abs(count - expected[name]) <= 0.01 * expected[name], count
  assert count > 0


def test_model_output_shapes():
  from flax import nnx  # pylint: disable=import-outside-toplevel
  for name in ("tiny", "tiny-llama"):
    model = model_lib.LanguageModel(model_lib.PRESETS[name], nnx.Rngs(0))
    assert model(jnp.zeros((2, 16), jnp.int32)).shape == (2, 16, 256)


def _matmul_dtypes(jaxpr):
  """The operand dtypes of every dot_general in a jaxpr, its sub-jaxprs (remat, custom VJPs,
  jit) included."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      found.append(tuple(str(v.aval.dtype) for v in eqn.invars))
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        sub = getattr(sub, "jaxpr", sub)
        if hasattr(sub, "eqns"):
          found += _matmul_dtypes(sub)
  return found


@pytest.mark.parametrize("name", ["tiny", "tiny-llama"])
@pytest.mark.parametrize("remat", ["none", "block"])
def test_every_matmul_of_a_bf16_model_runs_in_bf16(name, remat):
  """compute_dtype=bfloat16: every matmul of the loss and its gradient, the fused output layer
  included, takes bf16 operands (the final norm once returned float32, so the output layer ran
  in float32; the test found its six f32 matmuls then)."""
  from flax import nnx  # pylint: disable=import-outside-toplevel
  cfg = dataclasses.replace(model_lib.PRESETS[name], compute_dtype="bfloat16", remat=remat,
                            loss_chunk=32)
  model = model_lib.LanguageModel(cfg, nnx.Rngs(0))
  tokens = jnp.zeros((2, 64), jnp.int32)
  graphdef, params = nnx.split(model)
  loss = lambda p: nnx.merge(graphdef, p).loss(tokens, tokens)  # noqa: E731
  dtypes = _matmul_dtypes(jax.make_jaxpr(jax.value_and_grad(loss))(params).jaxpr)
  assert len(dtypes) >= 6 * cfg.n_layer, dtypes
  assert set(dtypes) == {("bfloat16", "bfloat16")}, dtypes


def test_rope_rotates_each_head_dimension_with_its_half_partner_as_the_float64_reference():
  """Rotate-half rotary embedding: dimension i and i + dim/2 rotated by position x base^(-2i/dim)
  (NumPy, float64), and attention scores that depend on the positions' difference only."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 5, 3, 8))
  seq, dim, base = 5, 8, 10_000.0
  angles = np.arange(seq)[:, None] * base ** (-np.arange(0, dim, 2) / dim)[None]
  cos, sin = np.cos(angles)[None, :, None], np.sin(angles)[None, :, None]
  first, second = x[..., :dim // 2], x[..., dim // 2:]
  want = np.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
  got = model_lib.rope(jnp.asarray(x, jnp.float32), base)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  # Heads first (batch, heads, seq, head_dim), as the splash path's projections give them.
  heads_first = model_lib.rope(jnp.asarray(x.swapaxes(1, 2), jnp.float32), base, seq_axis=2)
  np.testing.assert_allclose(heads_first, want.swapaxes(1, 2), rtol=1e-5, atol=1e-6)
  # <rope(q)_m, rope(k)_n> depends on m - n only: the same q and k at every position.
  q = np.broadcast_to(rng.normal(size=(1, 1, 1, dim)), (1, seq, 1, dim))
  k = np.broadcast_to(rng.normal(size=(1, 1, 1, dim)), (1, seq, 1, dim))
  rq, rk = (np.asarray(model_lib.rope(jnp.asarray(a, jnp.float32), base), np.float64)
            for a in (q, k))
  scores = np.einsum("qd,kd->qk", rq[0, :, 0], rk[0, :, 0])
  for shift in range(1, seq):
    np.testing.assert_allclose(np.diagonal(scores, -shift), scores[shift, 0], rtol=1e-5)


@pytest.mark.parametrize("name", ["tiny", "tiny-llama"])
def test_kernels_cast_while_sharded_change_no_loss_or_gradient(name):
  """step.cast_kernels casts the blocks' matmul weights to the compute dtype in their FSDP
  sharding (so the compiler gathers them and reduces their gradients in bf16); the model would
  cast them to the same values itself: loss and float32 gradients are bit for bit those without
  it. (Casting the output layer too rounded its float32 gradient to bf16: the test found it.)"""
  from flax import nnx  # pylint: disable=import-outside-toplevel
  cfg = dataclasses.replace(model_lib.PRESETS[name], compute_dtype="bfloat16", loss_chunk=32)
  graphdef, params = nnx.split(model_lib.LanguageModel(cfg, nnx.Rngs(0)), nnx.Param)
  params = nnx.to_pure_dict(params)
  mesh = jax.make_mesh((1, 8), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  shardings = step_lib.tree_sharding(params, mesh)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (8, 64)), jnp.int32)

  def loss(p, cast):
    if cast:
      p = step_lib.cast_kernels(p, cfg.dtype, shardings)
    return nnx.merge(graphdef, nnx.State(p)).loss(tokens, tokens)

  with jax.set_mesh(mesh):
    casted = jax.jit(lambda p: step_lib.cast_kernels(p, cfg.dtype, shardings))(params)
    plain, cast = (jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, c)
                   for c in (False, True))
  def block_kernel(path):
    return path[-1].key == "kernel" and path[0].key == "blocks"
  for path, leaf in jax.tree_util.tree_leaves_with_path(casted):
    assert leaf.dtype == (jnp.bfloat16 if block_kernel(path) else jnp.float32), path
  kernels = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(casted)
             if block_kernel(path)]
  assert len(kernels) >= 4 * cfg.n_layer
  assert all(k.sharding.is_equivalent_to(s, k.ndim) for k, s in zip(
      kernels, [s for path, s in jax.tree_util.tree_leaves_with_path(shardings)
                if block_kernel(path)]))
  assert float(plain[0]) == float(cast[0])
  for a, b in zip(jax.tree.leaves(plain[1]), jax.tree.leaves(cast[1])):
    assert a.dtype == b.dtype == jnp.float32
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", ["tiny", "tiny-llama"])
def test_norm_outputs_rounded_before_the_matmul_change_no_loss_or_gradient(name, monkeypatch):
  """The blocks round their norms' float32 output to the stream's dtype (model.normed) where the
  next matmul would round it anyway: bf16 loss and gradients bit for bit those of the plain norm."""
  from flax import nnx  # pylint: disable=import-outside-toplevel
  cfg = dataclasses.replace(model_lib.PRESETS[name], compute_dtype="bfloat16", loss_chunk=32)
  graphdef, params = nnx.split(model_lib.LanguageModel(cfg, nnx.Rngs(0)), nnx.Param)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (4, 64)), jnp.int32)
  loss = lambda p: nnx.merge(graphdef, p).loss(tokens, tokens)  # noqa: E731
  x = jnp.ones((2, 3, cfg.d_model), jnp.bfloat16)
  block = nnx.merge(graphdef, params).blocks[0]
  norm = block.ln_1 if name == "tiny" else block.attn_norm
  assert norm(x).dtype == jnp.float32  # what flax returns, so the rounding is ours
  assert model_lib.normed(norm, x).dtype == jnp.bfloat16
  rounded = jax.jit(jax.value_and_grad(loss))(params)
  monkeypatch.setattr(model_lib, "normed", lambda norm, x: norm(x))
  plain = jax.jit(jax.value_and_grad(loss))(params)
  assert float(rounded[0]) == float(plain[0])
  for a, b in zip(jax.tree.leaves(rounded[1]), jax.tree.leaves(plain[1])):
    np.testing.assert_array_equal(a, b)


def _loss_and_grad(cfg, dropout_key=None):
  """``cfg``'s model (seed 0) on 4 x 64 random tokens (seed 0), predicting its own input: the
  loss's value_and_grad over the parameters, and the parameters."""
  from flax import nnx  # pylint: disable=import-outside-toplevel
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (4, 64)), jnp.int32)
  graphdef, params = nnx.split(model_lib.LanguageModel(cfg, nnx.Rngs(0)), nnx.Param)
  return jax.value_and_grad(lambda p: nnx.merge(graphdef, p).loss(
      tokens, tokens, dropout_key=dropout_key)), params


@pytest.mark.parametrize("preset", ["tiny", "tiny-llama"])  # GPT-2 (biases, tied table), LLaMA
def test_blocks_scanned_over_stacked_weights_give_the_loops_loss_and_gradients(preset):
  """model.scan_layers "loop" (one lax.scan over the blocks' stacked weights, which lets the
  compiler plan one block's memory for all) and "unrolled" (the same scan unrolled, for counting)
  compute the Python loop's loss and gradients, with block remat and dropout on (one key per block
  in both), to float32 round-off (the compiler fuses a loop body differently; in bf16 the loss
  moved by 4e-7). The parameters keep their per-block layout: checkpoints are unchanged."""
  from flax import nnx  # pylint: disable=import-outside-toplevel
  results = {}
  for scan in ("none", "loop", "unrolled"):
    cfg = dataclasses.replace(model_lib.PRESETS[preset], remat="block", dropout=0.1,
                              scan_layers=scan)
    grad, params = _loss_and_grad(cfg, dropout_key=jax.random.key(1))
    results[scan] = jax.jit(grad)(params)
    assert len(nnx.to_pure_dict(params)["blocks"]) == cfg.n_layer
  assert jax.tree.structure(results["none"]) == jax.tree.structure(results["loop"])
  for scan in ("loop", "unrolled"):
    np.testing.assert_allclose(results[scan][0], results["none"][0], rtol=1e-6, err_msg=scan)
    for a, b in zip(jax.tree.leaves(results[scan][1]), jax.tree.leaves(results["none"][1])):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7, err_msg=scan)


def test_an_unknown_scan_setting_is_refused():
  with pytest.raises(config_lib.ConfigError, match="scan_layers"):
    step_lib.build_train_step(config_lib.build_config("tiny", {"model.scan_layers": "yes"}))


@pytest.mark.parametrize("scan", ["none", "loop"])
def test_offloaded_residuals_give_blocks_loss_and_gradients_from_host_memory(scan):
  """remat "offload" is remat "block" with the kept values in pinned host memory: the same loss
  and gradients bit for bit, and the differentiated program puts values in host memory only under
  "offload" (scanned: each block's input, named BLOCK_INPUT; the XLA attention path of this CPU
  run names no kernel residuals, so unscanned there is nothing to move). The jaxpr shows the
  placement; CPU's lowering drops it (the TPU compile in results/scale/peer/ shows its effect)."""
  results, to_host = {}, {}
  for remat in ("block", "offload"):
    grad, params = _loss_and_grad(dataclasses.replace(model_lib.PRESETS["tiny-llama"],
                                                      remat=remat, scan_layers=scan))
    results[remat] = jax.jit(grad)(params)
    to_host[remat] = sum("<host>" in line and "device_put" in line
                         for line in str(jax.make_jaxpr(grad)(params)).splitlines())
  for a, b in zip(jax.tree.leaves(results["offload"]), jax.tree.leaves(results["block"])):
    np.testing.assert_array_equal(a, b)
  assert to_host["block"] == 0
  assert (to_host["offload"] > 0) == (scan == "loop"), to_host


def test_serial_loss_chunks_change_nothing_but_the_order():
  """model.serial_loss_chunks: an optimization barrier between the loss's chunks (so that the
  compiler cannot overlap them) and the same loss and gradients."""
  results, barriers = {}, {}
  for serial in (False, True):
    grad, params = _loss_and_grad(dataclasses.replace(model_lib.PRESETS["tiny-llama"],
                                                      loss_chunk=16, serial_loss_chunks=serial))
    results[serial] = jax.jit(grad)(params)
    barriers[serial] = str(jax.make_jaxpr(grad)(params)).count("optimization_barrier")
  assert barriers == {False: 0, True: 3}  # between 4 chunks of 16
  np.testing.assert_allclose(results[True][0], results[False][0], rtol=1e-6)
  for a, b in zip(jax.tree.leaves(results[True][1]), jax.tree.leaves(results[False][1])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  with pytest.raises(config_lib.ConfigError, match="serial_loss_chunks"):
    config_lib.model_config(config_lib.build_config("tiny", {"model.serial_loss_chunks": "yes"}))


def test_embedding_lookup_sharded_over_d_model_changes_nothing(corpus):
  """model.lookup_sharding=d_model (8 CPU devices, pure FSDP; the table resharded over its columns
  for the lookup) trains as the vocabulary-sharded lookup does; an unknown value is refused."""
  def run(**overrides):
    cfg = config_lib.build_config("tiny", {"data.path": corpus, "train.steps": 4,
                                          "train.batch_size": 16, "mesh.fsdp": -1,
                                          "log.progress": False, **overrides})
    summary = train_lib.train(cfg)
    return [r["loss"] for r in summary["history"]], summary["state"]["params"]
  (vocab_losses, vocab_params), (d_losses, d_params) = run(), run(
      **{"model.lookup_sharding": "d_model"})
  np.testing.assert_allclose(d_losses, vocab_losses, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(d_params), jax.tree.leaves(vocab_params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
  with pytest.raises(config_lib.ConfigError, match="lookup_sharding"):
    step_lib.build_train_step(config_lib.build_config("tiny", {"model.lookup_sharding": "rows"}))


@pytest.mark.parametrize("optimizer", ["adamw", "ademamix"])
def test_loss_falls_on_tiny_preset(corpus, optimizer):
  """ln(256) = 5.55 at init; 80 steps must bring the training loss down by at least 1.5 nats."""
  cfg = config_lib.build_config("tiny", {"data.path": corpus, "train.steps": 80,
                                        "optim.name": optimizer, "log.progress": False,
                                        "optim.kwargs": {"b3": 0.999} if optimizer == "ademamix"
                                        else {}})
  summary = train_lib.train(cfg)
  first = summary["history"][0]["loss"]
  assert first > 5.0 and summary["train_loss"] < first - 1.5, (first, summary["train_loss"])


def test_sharded_matches_single_device(corpus, tmp_path):
  """8 fake CPU devices, (data 4, fsdp 2) mesh, vs one device: same losses to 1e-5."""
  runs = {}
  for name, devices, fsdp in (("single", 1, 1), ("sharded", 8, 2)):
    log = tmp_path / f"{name}.jsonl"
    _cli(*_tiny(corpus, 20, **{"mesh.fsdp": fsdp}), "--set", f"log.metrics={log}",
         env={"XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"})
    runs[name] = [json.loads(x)["loss"] for x in log.read_text().splitlines()]
  np.testing.assert_allclose(runs["sharded"], runs["single"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", oa.list_optimizers())
def test_optimizer_state_round_trips_through_orbax(name, tmp_path):
  """Save at step k, restore into a freshly built abstract state, continue: identical."""
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  params = {"w": jnp.linspace(-1, 1, 12).reshape(3, 4), "b": jnp.zeros(4)}
  loss = lambda p: jnp.sum((p["w"] @ jnp.ones(4) - 1.0) ** 2) + jnp.sum((p["b"] - 0.5) ** 2)  # noqa
  opt = oa.get_optimizer(name, 1e-2)

  @jax.jit
  def step(p, s):
    value, grads = jax.value_and_grad(loss)(p)
    updates, s = opt.update(grads, s, p, value=value)
    return optax.apply_updates(p, updates), s

  p, s = params, opt.init(params)
  for _ in range(3):
    p, s = step(p, s)
  manager = ocp.CheckpointManager(tmp_path, options=ocp.CheckpointManagerOptions(
      enable_async_checkpointing=False))
  manager.save(3, args=ocp.args.StandardSave({"params": p, "opt_state": s}))
  manager.wait_until_finished()
  fresh = {"params": params, "opt_state": opt.init(params)}
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), fresh)
  restored = manager.restore(3, args=ocp.args.StandardRestore(abstract))
  p2, s2 = restored["params"], restored["opt_state"]
  assert jax.tree.structure(s2) == jax.tree.structure(s)
  for _ in range(3):
    p, s = step(p, s)
    p2, s2 = step(p2, s2)
  for x, y in zip(jax.tree.leaves((p, s)), jax.tree.leaves((p2, s2))):
    np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("case", ["preset", "optimizer", "key", "missing_ckpt", "corrupt_ckpt",
                                  "empty_corpus", "seq_len"])
def test_bad_input_gives_one_clear_line(corpus, tmp_path, case, capfd):
  empty = tmp_path / "empty.txt"
  empty.write_text("   \n")
  tiny = (tmp_path / "tiny.txt")
  tiny.write_text("abc " * 10)
  args = {
      "preset": ["--config", "nope"],
      "optimizer": _tiny(corpus, 5, **{"optim.name": "adamz"}),
      "key": _tiny(corpus, 5, **{"optim.learning_rate": 0.1}),
      "missing_ckpt": _tiny(corpus, 5, **{"ckpt.dir": str(tmp_path / "none")}) + ["--resume"],
      "corrupt_ckpt": _tiny(corpus, 5, **{"ckpt.dir": str(tmp_path / "corrupt")}) + ["--resume"],
      "empty_corpus": _tiny(str(empty), 5),
      "seq_len": _tiny(str(tiny), 5),
  }[case]
  if case == "corrupt_ckpt":
    step_dir = tmp_path / "corrupt" / "5"
    step_dir.mkdir(parents=True)
    (step_dir / "state").mkdir()
    (step_dir / "state" / "garbage").write_text("not a checkpoint")
  code, lines = refused_by_the_cli(args, capfd)
  assert code == 2 and lines[-1].startswith("error: "), lines


def test_two_processes_with_jax_distributed_match_single_process(corpus, tmp_path):
  """Two local processes (1 CPU device each) joined by jax.distributed.initialize on localhost
  train and validate like one process with 2 devices."""
  import socket  # pylint: disable=import-outside-toplevel
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
  common = _tiny(corpus, 10)
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
  procs = [subprocess.Popen(
      [sys.executable, "-m", "experiments.lm.train", *common, "--set", "distributed=true",
       "--set", f"distributed.coordinator=127.0.0.1:{port}", "--set",
       "distributed.num_processes=2", "--set", f"distributed.process_id={i}", "--set",
       f"log.metrics={tmp_path / 'multi.jsonl'}"], cwd=ROOT, env=env,
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  for proc in procs:
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
  _cli(*common, "--set", f"log.metrics={tmp_path / 'single.jsonl'}",
       env={"XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
  multi, single = ([json.loads(x) for x in (tmp_path / f).read_text().splitlines()]
                   for f in ("multi.jsonl", "single.jsonl"))
  assert len(multi) == 10 and "val_loss" in multi[-1]
  # Each process built only its own device's rows of every batch (and of the validation set).
  np.testing.assert_allclose([r["loss"] for r in multi], [r["loss"] for r in single], rtol=1e-6)
  np.testing.assert_allclose(multi[-1]["val_loss"], single[-1]["val_loss"], rtol=1e-6)


def test_hypergradients_are_formed_from_unclipped_gradients_unless_told():
  """MADA/HyperAdam get the clip inside (``clip_norm``: the update sees clipped gradients, the
  hypergradient the raw ones, as the official code); ``optim.hypergrad_grads=clipped`` chains
  the clip in front as for every other optimizer."""
  params = {"w": jnp.ones((3, 4))}
  for grads_for_h, clipped_in_front in (("unclipped", False), ("clipped", True)):
    cfg = config_lib.build_config("tiny", {"optim.name": "hyperadam", "optim.clip": 0.5,
                                          "optim.hypergrad_grads": grads_for_h})
    state = step_lib.make_optimizer(cfg, params).init(params)
    assert isinstance(state[0], optax.EmptyState) == clipped_in_front, grads_for_h
    assert isinstance(state, oa.HypergradientState) != clipped_in_front, grads_for_h
  adamw = config_lib.build_config("tiny", {"optim.name": "adamw", "optim.clip": 0.5})
  assert isinstance(step_lib.make_optimizer(adamw, params).init(params)[0], optax.EmptyState)
  with pytest.raises(config_lib.ConfigError, match="optim.hypergrad_grads"):
    config_lib.build_config("tiny", {"optim.hypergrad_grads": "raw"})
