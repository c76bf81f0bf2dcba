"""Optimizer step time and state memory, as ratios to optax.adamw measured in the same run.

For every optimizer in the registry (plus optax.contrib's AdEMAMix and Schedule-Free AdamW for
comparison) on a GPT-2-shaped parameter pytree: the median time of one jitted step
(update + apply_updates, params and state donated), optimizer-state bytes per parameter, and the
ideal bytes moved per parameter (read params and grads, write params, read and write every
parameter-sized state buffer). Absolute times are printed for context only; compare ratios.

    python -m benchmarks.optimizer_step                 # ~14M parameters (GPT-2 shape, 6x384)
    python -m benchmarks.optimizer_step --size 124m     # GPT-2 small shape
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import optax

import optax_accel as oa
from experiments import reporting

SIZES = {  # (layers, width, vocab, context)
    "2block": (2, 768, 8192, 1024),  # GPT-2 124M's block shapes, two blocks (quick compiles)
    "15m": (6, 384, 8192, 256),
    "124m": (12, 768, 50257, 1024),
}
CONTRIB = {
    "optax.contrib.ademamix": lambda lr: optax.contrib.ademamix(lr),
    "optax.contrib.schedule_free_adamw": lambda lr: optax.contrib.schedule_free_adamw(lr),
}


def gpt2_shaped_params(layers: int, width: int, vocab: int, context: int, seed: int = 0):
  """A pytree with GPT-2's tensor shapes (embeddings, per-block attention/MLP/LayerNorms)."""
  key = jax.random.key(seed)
  shapes = {"wte": (vocab, width), "wpe": (context, width), "ln_f": {"scale": (width,),
                                                                      "bias": (width,)}}
  for i in range(layers):
    shapes[f"block_{i}"] = {
        "ln_1": {"scale": (width,), "bias": (width,)}, "ln_2": {"scale": (width,), "bias": (width,)},
        "attn": {"qkv": (width, 3 * width), "qkv_bias": (3 * width,), "proj": (width, width),
                 "proj_bias": (width,)},
        "mlp": {"fc": (width, 4 * width), "fc_bias": (4 * width,), "proj": (4 * width, width),
                "proj_bias": (width,)}}
  leaves, treedef = jax.tree.flatten(shapes, is_leaf=lambda x: isinstance(x, tuple))
  keys = jax.random.split(key, len(leaves))
  return jax.tree.unflatten(treedef, [0.02 * jax.random.normal(k, s) for k, s in zip(keys, leaves)])


def tree_bytes(tree) -> int:
  return sum(x.nbytes for x in jax.tree.leaves(tree))


def param_sized_bytes(state, params) -> int:
  sizes = {x.size for x in jax.tree.leaves(params) if x.size > 1}
  return sum(x.nbytes for x in jax.tree.leaves(state) if x.size in sizes)


def make_step(opt):
  def step(params, state, grads):
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state
  return jax.jit(step, donate_argnums=(0, 1))


def measure(factories, params, grads, rounds: int, steps_per_round: int):
  """Interleaved rounds (every optimizer once per round) so drift hits all alike."""
  runs = {}
  for name, factory in factories.items():
    opt = factory(1e-3)
    step = make_step(opt)
    p = jax.tree.map(jnp.copy, params)
    s = opt.init(p)
    state_bytes = tree_bytes(s)
    sized = param_sized_bytes(s, params)
    for _ in range(3):  # compile and warm up
      p, s = step(p, s, grads)
    jax.block_until_ready(p)
    runs[name] = dict(step=step, p=p, s=s, times=[], state_bytes=state_bytes, sized=sized)
  for _ in range(rounds):
    for run in runs.values():
      p, s = run["p"], run["s"]
      start = time.perf_counter()
      for _ in range(steps_per_round):
        p, s = run["step"](p, s, grads)
      jax.block_until_ready((p, s))
      run["times"].append((time.perf_counter() - start) / steps_per_round)
      run["p"], run["s"] = p, s
  return runs


def copy_bandwidth(params, repeats: int = 20) -> float:
  """Bytes/s of a jitted copy of the whole pytree (read + write), the device's practical peak."""
  copy = jax.jit(lambda t: jax.tree.map(lambda x: x * 1.0000001, t))
  out = copy(params)
  jax.block_until_ready(out)
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    out = copy(params)
    jax.block_until_ready(out)
    times.append(time.perf_counter() - start)
  return 2 * tree_bytes(params) / statistics.median(times)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--size", choices=sorted(SIZES), default="15m")
  parser.add_argument("--rounds", type=int, default=15)
  parser.add_argument("--steps-per-round", type=int, default=3)
  parser.add_argument("--only", nargs="*", help="registry names to include (adamw always is)")
  parser.add_argument("--out", default="results/benchmarks/optimizer_step")
  args = parser.parse_args(argv)

  params = gpt2_shaped_params(*SIZES[args.size])
  grads = jax.tree.map(lambda x: 0.01 * jnp.ones_like(x), params)
  n = sum(x.size for x in jax.tree.leaves(params))
  names = [m for m in oa.list_optimizers()
           if not args.only or m in args.only or m in ("adamw", "sgd")]
  factories = {m: (lambda lr, m=m: oa.get_optimizer(m, lr)) for m in names}
  if not args.only:
    factories.update(CONTRIB)
  print(f"{n / 1e6:.1f}M parameters, {len(factories)} optimizers, device {jax.devices()[0]}",
        file=sys.stderr)
  runs = measure(factories, params, grads, args.rounds, args.steps_per_round)

  param_bytes, grad_bytes = tree_bytes(params), tree_bytes(grads)
  ideal = {k: (2 * param_bytes + grad_bytes + 2 * r["sized"]) / n for k, r in runs.items()}
  median = {k: statistics.median(r["times"]) for k, r in runs.items()}
  rows = []
  for name, run in runs.items():
    ideal_ratio = ideal[name] / ideal["adamw"]
    time_ratio = median[name] / median["adamw"]
    rows.append(dict(
        optimizer=name, time_ratio=time_ratio, sgd_ratio=median[name] / median["sgd"],
        ideal_ratio=ideal_ratio,
        target=1.10 * ideal_ratio, ok=time_ratio <= 1.10 * ideal_ratio,
        state_bytes=run["state_bytes"] / n, ideal_bytes=ideal[name], median_ms=1e3 * median[name]))
  bandwidth = copy_bandwidth(params)

  device = jax.devices()[0]
  table = [{"optimizer": r["optimizer"], "time / adamw": r["time_ratio"],
            "time / sgd(momentum 0.9)": r["sgd_ratio"], "ideal bytes / adamw": r["ideal_ratio"],
            "target": r["target"], "within target": "yes" if r["ok"] else "NO",
            "state bytes/param": r["state_bytes"], "ideal bytes/param": r["ideal_bytes"],
            "median ms (context)": r["median_ms"]} for r in rows]
  stem = os.path.splitext(args.out)[0]
  text = reporting.write_table(
      stem, table, title=f"Optimizer step benchmark ({args.size}: {n / 1e6:.1f}M parameters, "
      "GPT-2 shapes, f32)", notes=[
          f"device: {device.platform} {device.device_kind}; optax {optax.__version__}",
          f"method: median over {args.rounds} interleaved rounds of {args.steps_per_round} "
          "jitted steps (update + apply, params and state donated); ratios are to optax.adamw "
          "in this run.",
          "target: time ratio <= 1.10 x (ideal bytes / adamw's ideal bytes). The targets are "
          "about memory bandwidth on an accelerator; on CPU, XLA runs many optimizers compute- "
          "or kernel-count-bound, so CPU ratios overstate the cost of multi-buffer updates.",
          f"measured copy bandwidth: {bandwidth / 1e9:.1f} GB/s; adamw achieves "
          f"{ideal['adamw'] * n / median['adamw'] / 1e9:.1f} GB/s of its ideal traffic."])
  plot(rows, stem + ".png", f"{args.size}, {device.platform}")
  print(text)


def plot(rows, path, title):
  """Measured time ratio beside the ideal-bytes ratio, per optimizer (skipped without matplotlib)."""
  try:
    import matplotlib  # pylint: disable=import-outside-toplevel
  except ImportError:
    return
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  names = [r["optimizer"] for r in rows]
  y = range(len(rows))
  fig, ax = plt.subplots(figsize=(8, 0.3 * len(rows) + 1.5))
  ax.barh([i + 0.2 for i in y], [r["time_ratio"] for r in rows], height=0.4,
          label="measured step time / adamw")
  ax.barh([i - 0.2 for i in y], [r["ideal_ratio"] for r in rows], height=0.4,
          label="ideal bytes / adamw")
  ax.set_yticks(list(y), names, fontsize=8)
  ax.invert_yaxis()
  ax.axvline(1.0, color="grey", lw=0.5)
  ax.set(xlabel="ratio to optax.adamw (same run)", title=f"optimizer step ({title})")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


if __name__ == "__main__":
  main()
