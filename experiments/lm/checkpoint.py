"""Orbax checkpoints of the training state: save (finite states only), and restore with fallback."""
from __future__ import annotations

import os
import sys
import time

import jax
import jax.numpy as jnp

# Settings a checkpoint's state depends on: resuming with another value is refused.
TRAJECTORY_KEYS = ("model", "model.vocab_size", "optim.name", "train.batch_size", "train.seq_len",
                   "data.sampling")


class CheckpointError(ValueError):
  """A missing, corrupt or conflicting checkpoint directory (one line by the CLI)."""



def checkpoint_manager(cfg):
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  options = ocp.CheckpointManagerOptions(
      enable_async_checkpointing=False,
      preservation_policy=ocp.checkpoint_managers.LatestN(cfg["ckpt.keep"]))
  return ocp.CheckpointManager(os.path.abspath(cfg["ckpt.dir"]), options=options), ocp


def _short(error: Exception) -> str:
  return f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:200]}"


def check_compatible(cfg, saved: dict):
  for key in TRAJECTORY_KEYS:
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


@jax.jit
def _all_finite(tree) -> jax.Array:
  return jnp.all(jnp.array([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


class Checkpoints:
  """A run's checkpoint directory (``ckpt.dir``; none: nothing is saved): the newest readable
  state at resume, a finite state saved at each ``save``."""

  def __init__(self, cfg, resume: bool):
    self.cfg, self.manager, self.ocp = cfg, None, None
    self.step, self.time = None, time.monotonic()  # the last saved (or restored) step
    if cfg["ckpt.dir"]:
      self.manager, self.ocp = checkpoint_manager(cfg)
      if not resume and self.manager.all_steps():
        raise CheckpointError(f"{cfg['ckpt.dir']} already holds checkpoints; pass --resume or "
                              "choose a new ckpt.dir (nothing was overwritten)")
    elif resume:
      raise CheckpointError("--resume needs ckpt.dir")

  def restore(self, abstract):
    state = restore(self.cfg, self.manager, self.ocp, abstract)
    self.step = int(state["step"])
    return state

  def due(self, step: int) -> bool:
    """A save is due after ``step`` by ``ckpt.interval`` or ``ckpt.minutes``."""
    return (step % self.cfg["ckpt.interval"] == 0
            or time.monotonic() - self.time >= 60 * self.cfg["ckpt.minutes"])

  def save(self, state, step: int):
    if not self.manager or self.step == step:
      return
    if not bool(_all_finite(state)):
      print(f"warning: the state at step {step} is not finite; not saved (checkpoint "
            f"{self.step} kept)", file=sys.stderr)
      return
    ocp = self.ocp
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        meta=ocp.args.JsonSave({"config": self.cfg, "step": step})), force=True)
    self.manager.wait_until_finished()
    self.step, self.time = step, time.monotonic()

  def where(self) -> str:
    if self.step:
      return f"last checkpoint: step {self.step} in {self.cfg['ckpt.dir']}"
    return "no checkpoint saved" + ("" if self.manager else " (ckpt.dir is not set)")

  def close(self):
    if self.manager:
      self.manager.wait_until_finished()
      self.manager.close()
