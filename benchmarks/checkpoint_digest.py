"""What verified checkpoints cost: save and restore of a gpt2-124m AdamW state with and without the
per-leaf digests (issue 23's target: <= 1.10x on this CPU).

    JAX_PLATFORMS=cpu python -m benchmarks.checkpoint_digest   # -> results/benchmarks/checkpoint_digest.md

The state has the training script's structure and sizes (params + AdamW moments + step, the
gpt2-124m preset with GPT-2's vocabulary padded to 50304), filled with random values, on one
CPU device. *Without* is what the script did before digests: a finiteness check, then the Orbax
save; restore is the Orbax restore alone. *With* adds the digests of a single-process run
(``checkpoint.state_digests``: xxHash3 of each leaf's bytes) to the save's metadata and, at
restore, recomputes and compares them (``checkpoint.first_mismatch``). The multi-host kind
(``sums``, on the devices) is timed on its own: it is what a pod pays, at HBM bandwidth
there. Each figure is the median of ``--repeats`` rounds, the two variants alternating, each into an
emptied folder after ``os.sync()`` (no earlier writeback in the timing).
"""
from __future__ import annotations

import argparse
import csv
import datetime
import os
import pathlib
import platform
import shutil
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp

from experiments.lm import checkpoint as checkpoint_lib
from experiments.lm import config as config_lib
from experiments.lm import step as step_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def gpt2_state():
  cfg = config_lib.build_config("gpt2-124m", {"model.vocab_size": 50304, "mesh.fsdp": 1,
                                              "train.grad_accum": 1})
  abstract = step_lib.build_train_step(cfg, jax.devices()[:1]).abstract_state
  keys = iter(jax.random.split(jax.random.key(0), len(jax.tree.leaves(abstract))))

  def fill(x):
    if jnp.issubdtype(x.dtype, jnp.floating):
      return jax.random.normal(next(keys), x.shape, x.dtype) * 0.02
    return jnp.zeros(x.shape, x.dtype)
  state = jax.tree.map(fill, abstract)
  return jax.block_until_ready(state), abstract


def _manager(folder):
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  return ocp, ocp.CheckpointManager(folder, options=ocp.CheckpointManagerOptions(
      enable_async_checkpointing=False))


def save_seconds(state, folder, digests: bool) -> float:
  ocp, manager = _manager(folder)
  start = time.perf_counter()
  assert bool(checkpoint_lib._all_finite(state))  # pylint: disable=protected-access
  meta = {"digests": checkpoint_lib.state_digests(state)} if digests else {}
  manager.save(1, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                          meta=ocp.args.JsonSave(meta)))
  manager.wait_until_finished()
  seconds = time.perf_counter() - start
  manager.close()
  return seconds


def restore_seconds(abstract, folder, digests: bool) -> float:
  ocp, manager = _manager(folder)
  start = time.perf_counter()
  restored = manager.restore(1, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
  if digests:
    assert checkpoint_lib.first_mismatch(restored["state"], restored["meta"]["digests"]) is None
  jax.block_until_ready(restored["state"])
  seconds = time.perf_counter() - start
  manager.close()
  return seconds


def _range(values) -> str:
  return f"{min(values):.2f}-{max(values):.2f}"


def _seconds(function, *args) -> float:
  start = time.perf_counter()
  function(*args)
  return time.perf_counter() - start


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--out", default=str(ROOT / "results" / "benchmarks"))
  args = parser.parse_args(argv)
  state, abstract = gpt2_state()
  n_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
  n_params = sum(x.size for x in jax.tree.leaves(state["params"]))
  checkpoint_lib._all_finite(state)  # pylint: disable=protected-access; compiled untimed
  times = {(op, d): [] for op in ("save", "restore") for d in (False, True)}
  with tempfile.TemporaryDirectory() as tmp:
    for round_ in range(args.repeats + 1):  # round 0 warms Orbax and the file cache
      for digests in ((False, True) if round_ % 2 else (True, False)):
        folder = pathlib.Path(tmp) / "checkpoint"
        os.sync()  # the previous round's writeback does not land in this one's timing
        saved = save_seconds(state, folder, digests)
        os.sync()
        restored = restore_seconds(abstract, folder, digests)
        shutil.rmtree(folder)
        if round_:
          times["save", digests].append(saved)
          times["restore", digests].append(restored)
  digest_only = {}
  for kind in ("xxh3", "sums"):
    checkpoint_lib.state_digests(state, kind)  # the sums' program compiles here
    digest_only[kind] = statistics.median(_seconds(checkpoint_lib.state_digests, state, kind)
                                          for _ in range(args.repeats))
  rows = []
  for op in ("save", "restore"):
    without, with_ = (statistics.median(times[op, d]) for d in (False, True))
    rows.append({"operation": op, "without_s": without, "with_digests_s": with_,
                 "ratio": with_ / without, "without_range_s": _range(times[op, False]),
                 "with_range_s": _range(times[op, True])})
  rows += [{"operation": f"digests only ({kind})", "without_s": 0.0, "with_digests_s": seconds,
            "ratio": float("nan"), "without_range_s": "", "with_range_s": ""}
           for kind, seconds in digest_only.items()]
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "checkpoint_digest.csv"), "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
  lines = ["# Verified checkpoints: the cost of per-leaf digests", "",
           "- command: `JAX_PLATFORMS=cpu python -m benchmarks.checkpoint_digest`",
           f"- run: {datetime.date.today()}, {platform.machine()} CPU ({os.cpu_count()} threads), "
           f"jax {jax.__version__}, orbax-checkpoint {_orbax_version()}",
           f"- state: gpt2-124m + AdamW, {n_params / 1e6:.1f}M parameters, "
           f"{n_bytes / 2 ** 30:.2f} GiB in {len(jax.tree.leaves(state))} leaves, one CPU device; "
           f"median of {args.repeats} rounds, local disk (page cache warm)",
           "- target: with digests <= 1.10x without", "",
           "| operation | without digests s (range) | with digests s (range) | ratio | "
           "xxh3 digests alone, share |", "|---|---|---|---|---|"]
  lines += [f"| {r['operation']} | {r['without_s']:.2f} ({r['without_range_s']}) | "
            f"{r['with_digests_s']:.2f} ({r['with_range_s']}) | {r['ratio']:.3f}x | "
            f"{digest_only['xxh3'] / r['without_s']:.1%} |" for r in rows[:2]]
  lines += ["", "The rounds vary more than the digests cost: the ratio is within that spread; the "
            "digests' own time (next table) is the cost."]
  lines += ["", "The digests alone, per kind (``state_digests``; the same state):", "",
            "| kind | used by | seconds | GB/s |", "|---|---|---|---|",
            *(f"| {kind} | {who} | {digest_only[kind]:.2f} | "
              f"{n_bytes / digest_only[kind] / 1e9:.1f} |" for kind, who in (
                  ("xxh3", "single-process runs (host bytes)"),
                  ("sums", "multi-host runs (on the devices)")))]
  text = "\n".join(lines) + "\n"
  with open(os.path.join(args.out, "checkpoint_digest.md"), "w") as f:
    f.write(text)
  print(text)


def _orbax_version() -> str:
  from importlib import metadata  # pylint: disable=import-outside-toplevel
  return metadata.version("orbax-checkpoint")


if __name__ == "__main__":
  main()
