"""Training configuration: flat dotted keys (``DEFAULTS``), presets, validation.

``build_config(preset, overrides)`` gives the full configuration of a run; ``--set key=value`` on
the command line becomes one override (values are parsed as JSON/Python literals;
``optim.kwargs.NAME=value`` passes a keyword to the optimizer).
"""
from __future__ import annotations

import ast
import dataclasses
import json
import math
import os
from typing import Any

import optax

import optax_accel as oa
from experiments.lm import data as data_lib
from experiments.lm import model as model_lib
from experiments.lm import recipes


class ConfigError(ValueError):
  """An invalid configuration (reported as one line by the CLI)."""


DEFAULTS: dict[str, Any] = {
    "model": "tiny",
    "model.compute_dtype": "float32",
    "model.remat": "none",  # "none", "block", "offload", "full" or "dots_saveable" (model.py)
    "model.loss_chunk": None,  # sequence positions per fused output-layer+loss chunk; None: preset's
    "model.dropout": None,  # rate in training (None: the model preset's, 0 for all of them)
    "model.bias": None,  # GPT-2's biases (None: the model preset's; LLaMA has none)
    "model.n_layer": None,  # blocks (None: the model preset's)
    "model.attention": None,  # "auto", "xla", "splash" (TPU kernel), "cudnn"; None: auto
    "model.scan_layers": None,  # "none", "loop" (one lax.scan over stacked blocks), "unrolled"
    "model.lookup_sharding": None,  # input embedding lookup: "vocab" or "d_model"; None: vocab
    "model.serial_loss_chunks": None,  # the loss chunks one after another (true); None: false
    "model.vocab_size": None,  # None: the data's (training), the preset's (AOT, benchmarks)
    "data.path": None,  # text file/folder, prepared shards, nanoGPT or llm.c; None: Shakespeare
    "data.tokenizer": "bytes",  # for text corpora: bytes, gpt2[:DIR], hf:PATH, sp:PATH
    "data.val_fraction": 0.1,  # for text corpora: the last fraction of the tokens
    "data.vocab_size": None,  # for uint32 llm.c shards (no vocabulary recorded)
    "data.sampling": "windows",  # "windows" (nanoGPT/MADA), "packed", "documents" (GaLore/AM)
    "data.prefetch": 2,  # batches prepared ahead on a background thread (0: none)
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
    # weight decay on: "matrices" (rank >= 2, not embeddings), "matrices+embeddings" (nanoGPT),
    # "all" or "none"
    "optim.decay": "matrices",
    "optim.clip": 1.0,  # global-norm clip, 0: off
    # Learned-hyperparameter optimizers (MADA, HyperAdam): form the hypergradient from the
    # "unclipped" gradient and clip only what the update sees (the official MADA code), or
    # from the "clipped" one (the clip chained in front, as for every other optimizer).
    "optim.hypergrad_grads": "unclipped",
    "optim.kwargs": {},
    "train.on_nan": "stop",  # non-finite loss/gradient: "stop" (exit 3) or "skip" the step
    "train.max_skips": 10,  # with on_nan=skip: stop after this many consecutive skipped steps
    "eval.interval": 50,
    "eval.tokens": 16_384,  # the fixed validation set: its first tokens (at most the split)
    # at the end, the loss without dropout over this many random train batches (nanoGPT's
    # estimate_loss, MADA's metric), "train_eval_loss" in the summary; 0: none
    "eval.train_batches": 0,
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
        "optim.weight_decay": 0.1, "eval.interval": 250, "eval.tokens": 2 ** 18},
    "gpt2-124m": {  # nanoGPT / MADA OpenWebText-style schedule (bring your own corpus)
        "model": "gpt2-124m", "model.compute_dtype": "bfloat16", "train.steps": 100_000,
        "train.batch_size": 480, "train.seq_len": 1024, "optim.lr": 6e-4, "optim.warmup": 2000,
        "optim.min_lr_ratio": 0.025, "eval.interval": 500, "eval.tokens": 2 ** 23,
        "train.grad_accum": "auto", "train.device_batch": 2, "mesh.fsdp": -1},
    "llama-60m": {
        "model": "llama-60m", "model.compute_dtype": "bfloat16", "train.steps": 10_000,
        "train.batch_size": 512, "train.seq_len": 256, "optim.lr": 1e-3, "optim.warmup": 1000,
        "eval.interval": 500, "eval.tokens": 2 ** 23,
        "train.grad_accum": "auto", "train.device_batch": 16, "mesh.fsdp": -1},
    "llama-100m": {
        "model": "llama-100m", "model.compute_dtype": "bfloat16", "train.steps": 20_000,
        "train.batch_size": 512, "train.seq_len": 256, "optim.lr": 1e-3, "optim.warmup": 1000,
        "eval.interval": 500, "eval.tokens": 2 ** 23,
        "train.grad_accum": "auto", "train.device_batch": 16, "mesh.fsdp": -1},
    "llama-1b": {  # TinyLlama-1.1B shape; 256 x 2048 tokens per step, pure FSDP, remat
        "model": "llama-1b", "model.compute_dtype": "bfloat16", "model.remat": "block",
        "train.steps": 50_000, "train.batch_size": 256, "train.seq_len": 2048, "optim.lr": 4e-4,
        "optim.warmup": 2000, "eval.interval": 1000, "eval.tokens": 2 ** 23,
        "train.grad_accum": "auto", "train.device_batch": 1, "mesh.fsdp": -1},
    # The papers' recipes (experiments/lm/recipes.py: sources and deviations).
    **{name: recipe.config for name, recipe in recipes.RECIPES.items()},
}


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


def is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


# Baselines of the papers' tables that optax implements and optax_accel does not wrap (no state
# dtype knob: outside the library's registry and its contracts), usable as optim.name here.
BASELINE_OPTIMIZERS = {"adan": oa.OptimizerSpec("adan", optax.adan, state_dtype_arg=None)}
DECAY_MODES = ("matrices", "matrices+embeddings", "all", "none")  # step.decay_mask
BOOLEAN_KEYS = ("log.overwrite", "log.progress", "distributed")
PATH_KEYS = ("data.path", "ckpt.dir", "log.metrics")  # "~" is expanded


def _boolean(key: str, value) -> bool:
  """true/false (any case) or 1/0: a word such as "no" is refused, not read as true."""
  if isinstance(value, bool) or value in (0, 1):
    return bool(value)
  raise ConfigError(f"{key} must be true or false (or 1/0), got {value!r}")


def _optional_int(cfg, key: str, low: int, high: int | None = None):
  value = cfg[key]
  if value is not None and (not is_int(value) or value < low or (high and value >= high)):
    bounds = f"in [{low}, {high})" if high else f">= {low}"
    raise ConfigError(f"{key} must be an integer {bounds} or none, got {value!r}")


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
    if key.startswith("optim.kwargs.") and isinstance(cfg["optim.kwargs"], dict):
      cfg["optim.kwargs"][key.removeprefix("optim.kwargs.")] = value
    elif key in cfg:
      cfg[key] = value
    else:
      raise ConfigError(f"unknown config key {key!r}; valid keys: {', '.join(DEFAULTS)}")
  for key in BOOLEAN_KEYS:
    cfg[key] = _boolean(key, cfg[key])
  for key in PATH_KEYS:
    if cfg[key] is not None:
      if not isinstance(cfg[key], str) or not cfg[key]:
        raise ConfigError(f"{key} must be a path or none, got {cfg[key]!r}")
      cfg[key] = os.path.expanduser(cfg[key])
  if not isinstance(cfg["optim.kwargs"], dict):
    raise ConfigError("optim.kwargs must be a mapping such as {\"b1\": 0.9} (or set "
                      f"optim.kwargs.NAME=VALUE), got {cfg['optim.kwargs']!r}")
  if cfg["model"] not in model_lib.PRESETS:
    raise ConfigError(f"unknown model {cfg['model']!r}; choose one of "
                      f"{', '.join(model_lib.PRESETS)}")
  names = oa.list_optimizers() + sorted(BASELINE_OPTIMIZERS)
  if cfg["optim.name"] not in names:
    raise ConfigError(f"unknown optimizer {cfg['optim.name']!r}; choose one of "
                      f"{', '.join(names)}")
  for key in ("train.steps", "train.batch_size", "train.seq_len", "eval.tokens",
              "eval.interval", "ckpt.interval", "ckpt.keep", "train.max_skips"):
    if not is_int(cfg[key]) or cfg[key] <= 0:
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
  for key in ("data.prefetch", "eval.train_batches"):
    if not is_int(cfg[key]) or cfg[key] < 0:
      raise ConfigError(f"{key} must be an integer >= 0, got {cfg[key]!r}")
  for key in ("model.vocab_size", "model.n_layer", "data.vocab_size", "train.stop_at", "train.device_batch",
              "distributed.num_processes"):
    _optional_int(cfg, key, 1)
  _optional_int(cfg, "distributed.process_id", 0)
  if not is_int(cfg["train.seed"]) or not 0 <= cfg["train.seed"] < 2 ** 32:
    raise ConfigError(f"train.seed must be an integer in [0, 2**32), got {cfg['train.seed']!r}")
  peak = cfg["peak_flops"]
  if peak is not None and (isinstance(peak, bool) or not isinstance(peak, (int, float))
                           or not math.isfinite(peak) or peak <= 0):
    raise ConfigError(f"peak_flops must be a positive number or none, got {peak!r}")
  if cfg["distributed.coordinator"] is not None and not isinstance(
      cfg["distributed.coordinator"], str):
    raise ConfigError("distributed.coordinator must be host:port or none, got "
                      f"{cfg['distributed.coordinator']!r}")
  if not is_int(cfg["optim.warmup"]) or cfg["optim.warmup"] < 0:
    raise ConfigError(f"optim.warmup must be an integer >= 0, got {cfg['optim.warmup']!r}")
  choices = {"optim.schedule": ("cosine", "constant"), "optim.decay": DECAY_MODES,
             "train.on_nan": ("stop", "skip"), "model.remat": tuple(model_lib.REMAT_POLICIES),
             "optim.hypergrad_grads": ("unclipped", "clipped"),
             "data.sampling": data_lib.SAMPLING}
  for key, allowed in choices.items():
    if cfg[key] is None and "none" in allowed:  # --set optim.decay=none parses as None
      cfg[key] = "none"
    if cfg[key] not in allowed:
      raise ConfigError(f"{key} must be one of {', '.join(map(repr, allowed))}, "
                        f"got {cfg[key]!r}")
  return cfg


def model_config(cfg) -> model_lib.ModelConfig:
  base = model_lib.PRESETS[cfg["model"]]
  changes = {"compute_dtype": cfg["model.compute_dtype"], "remat": cfg["model.remat"]}
  if cfg["model.vocab_size"] is not None:
    changes["vocab_size"] = cfg["model.vocab_size"]
  for key in ("loss_chunk", "dropout", "bias", "n_layer", "attention", "scan_layers",
              "lookup_sharding", "serial_loss_chunks"):
    if cfg[f"model.{key}"] is not None:
      changes[key] = cfg[f"model.{key}"]
  try:
    mc = dataclasses.replace(base, **changes)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  if mc.attention == "splash" and cfg["train.seq_len"] % model_lib.SPLASH_BLOCK:
    raise ConfigError(f"model.attention=splash needs train.seq_len a multiple of "
                      f"{model_lib.SPLASH_BLOCK}, got {cfg['train.seq_len']}")
  if cfg["train.seq_len"] > mc.context:
    raise ConfigError(f"train.seq_len {cfg['train.seq_len']} exceeds the model context "
                      f"{mc.context}")
  return mc
