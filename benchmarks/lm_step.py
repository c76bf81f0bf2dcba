"""LM training-step throughput, MFU and the optimizer's share of the step time.

For a model preset and a few optimizers: the median time of the jitted training step (forward,
backward, optimizer update) and of the same step without the optimizer update (forward and
backward only; the gradient is consumed by a cheap reduction); the optimizer share is
1 - (gradient-only time / full step time). Tokens/s and MFU (6N + attention FLOPs per token,
peak FLOPs by device kind, or an AVX2 FMA estimate on CPU) come from the full step.

    python -m benchmarks.lm_step                                   # tiny, CPU
    python -m benchmarks.lm_step --config gpt2-124m --batch 16     # on an accelerator
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax
import numpy as np
import optax

from experiments import reporting
from experiments.lm import config as config_lib
from experiments.lm import model as model_lib
from experiments.lm import step as step_lib

OPTIMIZERS = ("adamw", "ademamix", "am_adamw", "mada")


def median_time(fn, *args, repeats: int) -> float:
  out = fn(*args)
  jax.block_until_ready(out)
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    out = fn(*args)
    jax.block_until_ready(out)
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="tiny")
  parser.add_argument("--batch", type=int, default=None)
  parser.add_argument("--seq-len", type=int, default=None)
  parser.add_argument("--dtype", default=None, help="compute dtype (float32 or bfloat16)")
  parser.add_argument("--repeats", type=int, default=20)
  parser.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS))
  parser.add_argument("--out", default="results/benchmarks/lm_step.md")
  args = parser.parse_args(argv)

  rows = []
  for name in args.optimizers:
    overrides = {"optim.name": name, "log.progress": False}
    if args.batch:
      overrides["train.batch_size"] = args.batch
    if args.seq_len:
      overrides["train.seq_len"] = args.seq_len
    if args.dtype:
      overrides["model.compute_dtype"] = args.dtype
    cfg = config_lib.build_config(args.config, overrides)
    program = step_lib.build_train_step(cfg)
    mc, graphdef = program.model_config, program.graphdef
    with jax.set_mesh(program.mesh):
      from flax import nnx  # pylint: disable=import-outside-toplevel

      @jax.jit
      def grad_only(params, inputs, targets):
        def loss_fn(p):
          return nnx.merge(graphdef, nnx.State(p)).loss(inputs[0], targets[0])
        loss, grads = jax.value_and_grad(loss_fn)(params)
        return loss, optax.tree.norm(grads)

      bs, seq = cfg["train.batch_size"], cfg["train.seq_len"]
      tokens = np.asarray(jax.random.randint(jax.random.key(0), (bs, seq + 1), 0,
                                             mc.vocab_size))
      inputs, targets = program.batch(lambda ids: (tokens[ids, :-1], tokens[ids, 1:]))
      holder = {"state": program.init()}

      def full(inputs, targets):
        holder["state"], stats = program.step(holder["state"], inputs, targets)
        return stats["loss"]

      t_full = median_time(full, inputs, targets, repeats=args.repeats)
      t_grad = median_time(grad_only, holder["state"]["params"], inputs, targets,
                           repeats=args.repeats)
      n_params = sum(int(x.size) for x in jax.tree.leaves(holder["state"]["params"]))
      tokens_per_s = bs * seq / t_full
      mfu = tokens_per_s * model_lib.flops_per_token(mc, n_params) / (
          step_lib.peak_flops(cfg) * jax.device_count())
      rows.append(dict(optimizer=name, step_ms=1e3 * t_full, grad_ms=1e3 * t_grad,
                       optimizer_share=max(0.0, 1 - t_grad / t_full), tokens_per_s=tokens_per_s,
                       mfu=mfu, params=n_params))
      print(rows[-1], file=sys.stderr)
  device = jax.devices()[0]
  table = [{"optimizer": r["optimizer"], "step ms": r["step_ms"], "fwd+bwd ms": r["grad_ms"],
            "optimizer share": r["optimizer_share"], "tokens/s": r["tokens_per_s"],
            "MFU": r["mfu"]} for r in rows]
  text = reporting.write_table(
      os.path.splitext(args.out)[0], table,
      title=f"LM step: {args.config} ({rows[0]['params'] / 1e6:.2f}M parameters)", notes=[
          f"device: {device.platform} {device.device_kind} x {jax.device_count()}",
          f"batch {bs} x {seq} tokens, compute dtype {cfg['model.compute_dtype']}; median of "
          f"{args.repeats} steps; MFU uses 6N + 12 L d T FLOPs/token and "
          f"{step_lib.peak_flops(cfg) / 1e9:.0f} GFLOP/s peak per device",
          "optimizer share = 1 - (forward+backward time) / (full step time)"])
  print(text)


if __name__ == "__main__":
  main()
