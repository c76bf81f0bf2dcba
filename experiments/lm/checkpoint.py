"""Verified Orbax checkpoints of the training state, and the locks that keep one run per folder.

A checkpoint is params + optimizer state + step, with JSON metadata: the run's config and id, the
data's identity (``TokenData.identity``) and a digest of every state leaf. Saving refuses a
non-finite state. Restoring reads the newest checkpoint, refuses one whose settings would change
the trajectory (``check_compatible``), verifies every leaf against its digest, and falls back to
the previous checkpoint when one is unreadable or does not match; the bad one is renamed
``<step>.unreadable`` or ``<step>.corrupt`` (never deleted) and said on stderr in one line.

Digests (``state_digests``) are of the values, not the files, one per leaf. A single-process run
(every array whole on its host) takes ``xxh3:``, the 64-bit xxHash3 of the leaf's bytes in C order
(xxHash3 reads some 10 GB/s on one core, so a digest costs a few percent of a save). A multi-host
run, whose processes hold only their own shards, takes ``sums:``, computed on the devices: two
sums modulo 2**32 of the leaf's bits (as 32-bit words) times odd position-dependent weights. Any
change confined to one 32-bit word changes both sums (an odd weight is invertible modulo 2**32),
so every single bit flip is caught; unrelated changes in several words go unseen with a chance
of about 2**-64. The sums are exact integer reductions, the same on any mesh or number of hosts.
Either kind verifies a checkpoint restored on another mesh; an ``xxh3:`` checkpoint restored by
several processes is said to be unverified (its leaves are whole on no host).
"""
from __future__ import annotations

import fcntl
import glob
import json
import os
import shutil
import socket
import sys
import tempfile
import time
import uuid

import jax
import jax.numpy as jnp
import numpy as np

# Settings a resume may change, with what the change means: they leave the trajectory so far as
# it was. Every other setting, and the data's identity, must equal the checkpoint's.
RESUMABLE_CHANGES = {
    "train.steps": "the learning-rate schedule follows the new length from here on",
    **dict.fromkeys(("mesh.fsdp", "train.grad_accum", "train.device_batch", "model.remat",
                     "model.loss_chunk", "model.lookup_sharding", "model.serial_loss_chunks"),
                    "the same mathematics; round-off may differ"),
    **dict.fromkeys(("train.stop_at", "eval.interval", "eval.tokens", "eval.train_batches",
                     "ckpt.interval", "ckpt.minutes", "ckpt.keep", "log.metrics", "log.overwrite",
                     "log.progress", "data.prefetch", "train.on_nan", "train.max_skips", "peak_flops",
                     "distributed", "distributed.coordinator", "distributed.num_processes",
                     "distributed.process_id"), ""),
}
UNSAID = ("ckpt.dir", "data.path")  # the same folder however spelled; the data: by identity


class CheckpointError(ValueError):
  """A missing, corrupt, locked or conflicting checkpoint directory (one line by the CLI)."""


def _short(error: Exception) -> str:
  return f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:200]}"


def _plain(value):
  return json.loads(json.dumps(value))  # as the metadata stores it: tuples become lists


def check_compatible(cfg, meta: dict, data_identity: dict) -> list[str]:
  """Refuses (CheckpointError naming the key) a resume whose settings or data differ from the
  checkpoint's in a way that changes the trajectory; returns notes on the harmless changes."""
  saved, where = meta["config"], cfg["ckpt.dir"]
  for key, value in cfg.items():
    if key in RESUMABLE_CHANGES or key in UNSAID or key not in saved:
      continue
    if _plain(value) != saved[key]:
      raise CheckpointError(f"checkpoint in {where} was made with {key}={saved[key]!r}, this run "
                            f"has {value!r}: that changes the trajectory (resume with the saved "
                            "value, or start a new ckpt.dir)")
  old = meta.get("data", {"path": saved.get("data.path")})
  new = _plain(data_identity) if "data" in meta else {"path": cfg["data.path"]}
  for field in sorted(set(old) | set(new)):
    if old.get(field) != new.get(field):
      raise CheckpointError(f"checkpoint in {where} was made with other data (data.path {field}: "
                            f"{old.get(field)!r}, this run's: {new.get(field)!r}); resume on "
                            "the same data, or start a new ckpt.dir")
  return [f"{key} {saved[key]!r} -> {cfg[key]!r}" + (f" ({note})" if note else "")
          for key, note in RESUMABLE_CHANGES.items()
          if key in saved and _plain(cfg[key]) != saved[key]]


# ----------------------------------------------------------------------------------------------
# Digests of the state, computed on the devices.

_MULTIPLIERS = (0x9E3779B1, 0x85EBCA77)  # odd: one weight sequence per sum


def _words(x: jax.Array) -> jax.Array:
  """The leaf's bits as uint32 words (a 64-bit element gives two, a 16-bit one is widened)."""
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  width = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
  return jax.lax.bitcast_convert_type(x, width).astype(jnp.uint32)


def _weights(shape, multiplier: int) -> jax.Array:
  """Odd uint32 weights of the positions of ``shape`` (murmur3's finaliser of the flat index)."""
  index, stride = jnp.zeros(shape, jnp.uint32), 1
  for axis in reversed(range(len(shape))):
    index = index + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(stride % 2**32)
    stride *= shape[axis]
  h = index * jnp.uint32(multiplier) + jnp.uint32(1)
  h = (h ^ (h >> 16)) * jnp.uint32(0x7FEB352D)
  h = (h ^ (h >> 15)) * jnp.uint32(0x846CA68B)
  return (h ^ (h >> 16)) | jnp.uint32(1)


@jax.jit
def _all_finite(tree) -> jax.Array:
  return jnp.all(jnp.array([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
                            if jnp.issubdtype(x.dtype, jnp.inexact)] or [True]))


@jax.jit
def _device_sums(leaves):
  words = [_words(x) for x in leaves]
  return [jnp.stack([jnp.sum(w * _weights(w.shape, m), dtype=jnp.uint32) for m in _MULTIPLIERS])
          for w in words]


def _host_bytes(x) -> np.ndarray:
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  return np.ascontiguousarray(np.asarray(x))


def default_digest_kind() -> str:
  return "xxh3" if jax.process_count() == 1 else "sums"


def state_digests(tree, kind: str | None = None) -> dict[str, str]:
  """{leaf path: "<kind>:<16 hex digits>"} of a state pytree (kind: module docstring; default:
  ``xxh3`` in a single-process run, else ``sums``)."""
  kind = kind or default_digest_kind()
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  paths, leaves = [jax.tree_util.keystr(path) for path, _ in flat], [x for _, x in flat]
  if kind == "xxh3":
    import xxhash  # pylint: disable=import-outside-toplevel
    values = [xxhash.xxh3_64_hexdigest(_host_bytes(x)) for x in leaves]
  elif kind == "sums":
    values = ["".join(f"{int(v):08x}" for v in np.asarray(s)) for s in _device_sums(leaves)]
  else:
    raise ValueError(f"unknown digest kind {kind!r}")
  return {path: f"{kind}:{value}" for path, value in zip(paths, values, strict=True)}


def first_mismatch(tree, digests: dict[str, str]) -> str | None:
  """The path of the first leaf of ``tree`` whose digest differs from ``digests`` (or is absent).
  Raises LookupError when ``digests`` cannot be checked by this run (``xxh3`` on several hosts)."""
  kind = next(iter(digests.values()), "xxh3:").split(":")[0]
  if kind == "xxh3" and jax.process_count() > 1:
    raise LookupError("digested by one process, restored by several: its leaves are whole on no "
                      "host")
  actual = state_digests(tree, kind)
  return next((path for path, value in actual.items() if digests.get(path) != value), None)


# ----------------------------------------------------------------------------------------------
# Locks.


class Lock:
  """An exclusive advisory lock (``flock``) on the file ``path``, released when the process ends
  however it ends (even SIGKILL), so a stale lock cannot block the next run. Local and most
  network file systems honour it. ``what`` names the setting in the refusal; ``owner``: write
  this process's id into the file (a lock file of its own, not a file with content)."""

  def __init__(self, path: str, what: str, *, owner: bool = True):
    self.file = open(path, "a+")  # pylint: disable=consider-using-with
    try:
      fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      self.file.seek(0)
      holder = self.file.read().strip() if owner else ""
      self.file.close()
      raise CheckpointError(f"{what} is in use by another run{f' ({holder})' if holder else ''}; "
                            "wait for it to end or choose another (nothing was changed)") from None
    if owner:
      self.file.truncate(0)
      self.file.write(f"process {os.getpid()} on {socket.gethostname()}\n")
      self.file.flush()

  def close(self):
    self.file.close()  # closing releases the lock


# ----------------------------------------------------------------------------------------------
# The run's checkpoints.


def _sync(name: str):
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    multihost_utils.sync_global_devices(name)


def _new_run_id() -> str:
  run_id = np.frombuffer(uuid.uuid4().bytes[:8], np.uint8)
  if jax.process_count() > 1:  # every process names the run as process 0 does
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    run_id = np.asarray(multihost_utils.broadcast_one_to_all(run_id))
  return bytes(run_id.astype(np.uint8)).hex()


class Checkpoints:
  """A run's checkpoint directory (``ckpt.dir``; none: nothing is saved): checked writable and
  locked at construction, the newest verified state at ``restore``, a finite state at ``save``.

  ``run_id`` names the run (new, or the checkpoint's after ``restore``); ``notes`` lists the
  harmless setting changes of a resume.
  """

  def __init__(self, cfg, resume: bool, data_identity: dict):
    self.cfg, self.data_identity, self.manager, self.lock = cfg, data_identity, None, None
    self.step, self.time = None, time.monotonic()  # the last saved (or restored) step
    self.run_id, self.notes = None if resume else _new_run_id(), []  # resume: the checkpoint's
    if not cfg["ckpt.dir"]:
      if resume:
        raise CheckpointError("--resume needs ckpt.dir")
      return
    self.directory = directory = os.path.abspath(cfg["ckpt.dir"])
    if os.path.exists(directory) and not os.path.isdir(directory):
      raise CheckpointError(f"ckpt.dir {directory} is not a directory")
    try:
      os.makedirs(directory, exist_ok=True)
      tempfile.TemporaryFile(dir=directory).close()
    except OSError as e:
      raise CheckpointError(f"ckpt.dir {directory} is not writable ({e.strerror})") from None
    if jax.process_index() == 0:
      self.lock = Lock(os.path.join(directory, ".lock"), f"ckpt.dir {directory}")
    import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
    self.ocp = ocp
    self.manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(
        enable_async_checkpointing=False,
        preservation_policy=ocp.checkpoint_managers.LatestN(cfg["ckpt.keep"])))
    if not resume and self.manager.all_steps():
      self.close()
      raise CheckpointError(f"{directory} already holds checkpoints; pass --resume or choose a "
                            "new ckpt.dir (nothing was overwritten)")

  def restore(self, abstract):
    """The newest readable, compatible and verified checkpoint, restored into ``abstract``
    (ShapeDtypeStructs with shardings); bad ones are set aside (module docstring)."""
    ocp, steps = self.ocp, sorted(self.manager.all_steps(), reverse=True)
    if not steps:
      raise CheckpointError(f"no checkpoint to resume from in {self.directory}")
    failures = []
    for step in steps:
      try:
        meta = self.manager.restore(step, args=ocp.args.Composite(
            meta=ocp.args.JsonRestore()))["meta"]
      except Exception as e:  # pylint: disable=broad-except
        failures.append((step, "unreadable", f"unreadable ({_short(e)})"))
        continue
      self.notes = check_compatible(self.cfg, meta, self.data_identity)
      try:
        state = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract)))["state"]
      except Exception as e:  # pylint: disable=broad-except
        failures.append((step, "unreadable", f"unreadable ({_short(e)})"))
        continue
      try:
        leaf = first_mismatch(state, meta["digests"])
      except (KeyError, LookupError) as e:
        why = "an older save without digests" if isinstance(e, KeyError) else e.args[0]
        print(f"warning: checkpoint {step} is not verified ({why})", file=sys.stderr)
        leaf = None
      if leaf is not None:
        failures.append((step, "corrupt", f"corrupt (state{leaf} does not match its digest)"))
        continue
      self._set_aside(failures, f"resuming from step {step}")
      self.step, self.run_id = int(state["step"]), meta.get("run")
      return state
    self._set_aside(failures, "no checkpoint left")
    raise CheckpointError(f"no readable checkpoint in {self.directory} (tried steps "
                          f"{', '.join(map(str, steps))}; last: {failures[-1][2]})")

  def _set_aside(self, failures, outcome: str):
    """Renames each bad checkpoint to <step>.<reason>[.n] (process 0) and says so, one line each."""
    for step, reason, why in failures:
      path = target = os.path.join(self.directory, str(step))
      if jax.process_index() == 0:
        target, n = f"{path}.{reason}", 1
        while os.path.exists(target):
          n += 1
          target = f"{path}.{reason}.{n}"
        os.rename(path, target)
      print(f"warning: checkpoint {step} in {self.directory} is {why}; moved to {target}; "
            f"{outcome}", file=sys.stderr)
    if failures:
      _sync("checkpoints set aside")
      self.manager.reload()

  def due(self, step: int) -> bool:
    """A save is due after ``step`` by ``ckpt.interval`` or ``ckpt.minutes``."""
    return (step % self.cfg["ckpt.interval"] == 0
            or time.monotonic() - self.time >= 60 * self.cfg["ckpt.minutes"])

  def save(self, state, step: int):
    """Saves a finite ``state`` as ``step`` with its digests. A failed save (a full disk, a lost
    mount) removes its partial folder, keeps every older checkpoint and raises CheckpointError."""
    if not self.manager or self.step == step:
      return
    if not bool(_all_finite(state)):
      print(f"warning: the state at step {step} is not finite; not saved (checkpoint "
            f"{self.step} kept)", file=sys.stderr)
      return
    ocp = self.ocp
    meta = {"config": self.cfg, "step": step, "run": self.run_id, "data": self.data_identity,
            "digests": state_digests(state)}
    try:
      self.manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)
      self.manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      if jax.process_index() == 0:
        for partial in glob.glob(os.path.join(self.directory, f"{step}.orbax-checkpoint-tmp*")):
          shutil.rmtree(partial, ignore_errors=True)
      kept = ", ".join(sorted((n for n in os.listdir(self.directory) if n.isdigit()), key=int))
      raise CheckpointError(f"saving step {step} to {self.directory} failed ({_short(e)}); the "
                            f"checkpoints before it are kept (steps: {kept}); stopped") from None
    self.step, self.time = step, time.monotonic()

  def where(self) -> str:
    if self.step:
      return f"last checkpoint: step {self.step} in {self.cfg['ckpt.dir']}"
    return "no checkpoint saved" + ("" if self.manager else " (ckpt.dir is not set)")

  def close(self):
    try:
      if self.manager:
        self.manager.close()
    finally:
      if self.lock:
        self.lock.close()
