"""The LM input pipeline against what an accelerator consumes (issue 20's targets).

    JAX_PLATFORMS=cpu python -m benchmarks.input_pipeline          # -> results/benchmarks/input_pipeline.md

1. Batch assembly: tokens/s of the gpt2-124m preset's batch (480 x 1024) built from memory-mapped
   uint16 shards (synthetic GPT-2 ids, two shards, written to a temporary folder), for each
   sampling mode, rows only (numpy) and as the step's global array (``TrainStep.batch``'s
   ``global_batch`` on one CPU device), against the roofline tokens/s of gpt2-124m on v5e:4x4
   (``results/scale/table.md``: the rate a v5e-16 consumes).
2. The loop's own host time: ``train()`` around a trivial device program (the state is a scalar,
   the step adds one), gpt2-124m's batch and a prepared-shard corpus: every second of a step is
   batch handoff, metrics and checkpoint bookkeeping. Reported per step and as a share of the
   roofline step time of gpt2-124m on v5e:4x4.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import os
import pathlib
import platform
import tempfile
import time
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np

from experiments.lm import config as config_lib
from experiments.lm import data as data_lib
from experiments.lm import step as step_lib
from experiments.lm import train as train_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
BATCH, SEQ = 480, 1024


def roofline(config="gpt2-124m", topology="v5e:4x4") -> float:
  """Roofline step seconds of AdamW for ``config`` on ``topology`` (results/scale/table.csv)."""
  with open(ROOT / "results" / "scale" / "table.csv") as f:
    for row in csv.DictReader(f):
      if (row["config"], row["topology"], row["optimizer"]) == (config, topology, "adamw"):
        return float(row["roofline_step_s"])
  raise ValueError(f"{config} on {topology} is not in results/scale/table.csv")


def write_corpus(folder: pathlib.Path, tokens: int, rng) -> pathlib.Path:
  """Two train shards and one val shard of random GPT-2 ids with documents every ~1000 tokens,
  as ``experiments.lm.prepare`` writes them (llm.c shards + meta.json)."""
  import json  # pylint: disable=import-outside-toplevel
  splits = {}
  for split, sizes in (("train", (tokens // 2, tokens - tokens // 2)), ("val", (1 << 20,))):
    shards = []
    for i, size in enumerate(sizes):
      ids = rng.integers(0, 50256, size=size, dtype=np.uint16)
      starts = np.arange(0, size, 1000, dtype=np.int64)
      ids[starts[1:] - 1] = 50256
      name = f"tokens_{split}_{i:06d}"
      data_lib.write_llmc_shard(folder / f"{name}.bin", ids)
      np.save(folder / f"{name}.docs.npy", starts)
      shards.append({"file": f"{name}.bin", "documents_file": f"{name}.docs.npy",
                     "tokens": size, "documents": len(starts), "max_id": 50256, "blake2b": ""})
    splits[split] = {"shards": shards, "tokens": sum(sizes), "max_id": 50256}
  meta = {"tokenizer": {"spec": "gpt2", "vocab_size": 50257, "eot_id": 50256, "pad_id": 50256},
          "splits": splits}
  (folder / "meta.json").write_text(json.dumps(meta))
  return folder


def assembly(data, steps: int) -> list[dict]:
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "fsdp"))
  sharding = step_lib.batch_sharding(mesh)
  rows = np.arange(BATCH)
  out = []
  for mode in data_lib.SAMPLING:
    build = lambda step, mode=mode: data_lib.train_rows(data, mode, 0, step, rows, BATCH, SEQ)
    build(10_000)  # warm the code path (not the pages: every step reads new windows)
    t0 = time.perf_counter()
    for step in range(steps):
      build(step)
    host = (time.perf_counter() - t0) / steps
    t0 = time.perf_counter()
    for step in range(steps, 2 * steps):
      jax.block_until_ready(step_lib.global_batch(
          lambda ids, step=step, mode=mode: data_lib.train_rows(data, mode, 0, step, ids, BATCH,
                                                                SEQ), (1, BATCH, SEQ), sharding))
    device = (time.perf_counter() - t0) / steps
    out.append({"sampling": mode, "rows_ms": 1e3 * host, "rows_tokens_per_s": BATCH * SEQ / host,
                "global_array_ms": 1e3 * device, "global_tokens_per_s": BATCH * SEQ / device})
  return out


def loop_overhead(corpus: pathlib.Path, steps: int, prefetch: int, prebuilt: bool) -> float:
  """Median host seconds per step of train() around a trivial device program; ``prebuilt``: the
  rows of every step are one batch built beforehand (the loop's own time: handoff, metrics,
  checkpoint bookkeeping), else each step's rows are built as in training."""
  cfg = config_lib.build_config("gpt2-124m", {
      "data.path": str(corpus), "train.steps": steps, "train.grad_accum": 1, "mesh.fsdp": 1,
      "eval.interval": 10 ** 9, "eval.tokens": 1024, "log.progress": False,
      "data.prefetch": prefetch, "model.vocab_size": 50257})
  program = step_lib.build_train_step(cfg, jax.devices()[:1])  # shapes only: nothing allocated

  def trivial_step(state, inputs, targets):
    return {**state, "step": state["step"] + 1}, {"loss": state["params"] + inputs[0, 0, 0] * 0,
                                                   "grad_norm": state["params"]}

  trivial = dataclasses.replace(
      program, init=jax.jit(lambda: {"params": jnp.ones([]), "opt_state": (),
                                     "step": jnp.zeros([], jnp.int32)}),
      step=jax.jit(trivial_step, donate_argnums=(0,)),
      eval_sums=jax.jit(lambda state, inputs, targets: (jnp.zeros([]), jnp.sum(targets >= 0))))
  if prebuilt:
    data = data_lib.open_data(corpus)
    inputs, targets = data_lib.train_rows(data, "windows", 0, 0, np.arange(BATCH), BATCH, SEQ)
    with mock.patch.object(data_lib, "train_rows", lambda *args: (inputs[args[4]],
                                                                  targets[args[4]])):
      summary = train_lib.train(cfg, program=trivial)
  else:
    summary = train_lib.train(cfg, program=trivial)
  return BATCH * SEQ / summary["tokens_per_s"]


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--tokens", type=int, default=200_000_000, help="synthetic train tokens")
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--loop-steps", type=int, default=200)
  parser.add_argument("--out", default=str(ROOT / "results" / "benchmarks"))
  args = parser.parse_args(argv)
  step_s = roofline()
  consumed = BATCH * SEQ / step_s
  with tempfile.TemporaryDirectory() as tmp:
    corpus = write_corpus(pathlib.Path(tmp), args.tokens, np.random.default_rng(0))
    data = data_lib.open_data(corpus)
    rows = assembly(data, args.steps)
    overhead = {(depth, prebuilt): loop_overhead(corpus, args.loop_steps, depth, prebuilt)
                for prebuilt in (True, False) for depth in (2, 0)}
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "input_pipeline.csv"), "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
  lines = [
      "# LM input pipeline vs a v5e-16's consumption", "",
      "- command: `JAX_PLATFORMS=cpu python -m benchmarks.input_pipeline`",
      f"- run: {datetime.date.today()}, {platform.machine()} CPU ({os.cpu_count()} threads), "
      f"jax {jax.__version__}",
      f"- batch {BATCH} x {SEQ} (gpt2-124m preset) from {args.tokens / 1e6:.0f}M synthetic GPT-2 "
      "ids in two memory-mapped uint16 shards; each step reads new windows",
      f"- consumed by gpt2-124m on v5e:4x4 at its roofline step ({step_s:.4f} s, "
      f"results/scale/table.csv): {consumed / 1e6:.3f}M tokens/s; target >= 2x that",
      "", "| sampling | rows ms | rows tokens/s | as global array ms | global tokens/s | "
      "x v5e-16 consumption |", "|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['sampling']} | {r['rows_ms']:.1f} | {r['rows_tokens_per_s'] / 1e6:.2f}M | "
                 f"{r['global_array_ms']:.1f} | {r['global_tokens_per_s'] / 1e6:.2f}M | "
                 f"{r['global_tokens_per_s'] / consumed:.1f}x |")
  lines += ["", "## The loop's host time per step (trivial device program)", "",
            f"`train()` for {args.loop_steps} steps around a step that adds one to a scalar, same "
            "batch shape and corpus (windows), median over steps. *Prebuilt rows*: every step "
            "hands over one batch built beforehand, so a step's time is the loop's own (batch "
            "handoff to the device, metrics, checkpoint bookkeeping); target <= 2% of the roofline "
            "step. *Built each step*: the rows are read from the shards as in training; with "
            "prefetch this runs on the background thread, so on an accelerator it overlaps the "
            "device step instead of adding to it (here the device step is empty, so the step "
            "waits for it).", "",
            "| rows | data.prefetch | host ms per step | share of the v5e:4x4 roofline step |",
            "|---|---|---|---|"]
  for (depth, prebuilt), seconds in overhead.items():
    lines.append(f"| {'prebuilt' if prebuilt else 'built each step'} | {depth} | "
                 f"{1e3 * seconds:.2f} | {seconds / step_s:.2%} |")
  text = "\n".join(lines) + "\n"
  with open(os.path.join(args.out, "input_pipeline.md"), "w") as f:
    f.write(text)
  print(text)


if __name__ == "__main__":
  main()
