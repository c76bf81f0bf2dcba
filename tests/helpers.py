"""Helpers to drive optax_accel transforms in the tests."""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax

# The float64 reference tests: steps per run and the largest allowed |ours - reference|.
REFERENCE_STEPS = 200
REFERENCE_TOL = 1e-10


def run_optax(opt, w0, grad_fn, steps, record=None):
  """Runs ``opt`` for ``steps`` steps in float64 on list-of-array params.

  ``grad_fn(t, w)`` gives the gradient at 1-based step t. Returns a list, one entry per step, of
  ``record(params, state)`` (default: the params after the step, as NumPy arrays).
  """
  record = record or (lambda p, s: [np.asarray(x) for x in p])
  with jax.enable_x64(True):
    params = [jnp.asarray(x, jnp.float64) for x in w0]
    state = opt.init(params)
    update = jax.jit(opt.update)
    out = []
    for t in range(1, steps + 1):
      grads = [jnp.asarray(g) for g in grad_fn(t, [np.asarray(x) for x in params])]
      updates, state = update(grads, state, params)
      params = optax.apply_updates(params, updates)
      out.append(record(params, state))
  return out


def max_abs_diff(a, b) -> float:
  """Max |a - b| over nested lists of arrays."""
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb)
  return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
             for x, y in zip(la, lb))


_SHARDED = textwrap.dedent("""
    import os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax, jax.numpy as jnp, numpy as np, optax
    import optax_accel as oa
    mesh = jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Explicit,))
    rng = np.random.default_rng(0)
    host = {"w": jnp.asarray(rng.normal(size=(64, 16)), jnp.float32),
            "b": jnp.asarray(rng.normal(size=(16,)), jnp.float32)}
    loss = lambda p: sum(jnp.sum((x - 0.5) ** 2 * (1 + jnp.arange(x.size).reshape(x.shape) % 3))
                         for x in jax.tree.leaves(p))

    def run(params):
      opt = eval(sys.argv[1])
      state = opt.init(params)
      def step(p, s):
        updates, s = opt.update(jax.grad(loss)(p), s, p)
        return optax.apply_updates(p, updates), s
      step = jax.jit(step)
      for _ in range(30):
        params, state = step(params, state)
      return params
    plain = run(host)
    with jax.set_mesh(mesh):
      sharded = jax.tree.map(lambda x, s: jax.device_put(x, jax.NamedSharding(mesh, s)), host,
                             {"w": jax.P("x", None), "b": jax.P("x")})
      result = run(sharded)
    assert result["w"].sharding.spec == jax.P("x", None), result["w"].sharding
    print("MAXDIFF", max(float(jnp.max(jnp.abs(a - b)))
                         for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(result))))
""")


def sharded_vs_unsharded(optimizer_source: str) -> float:
  """Max |params| difference after 30 steps of ``eval(optimizer_source)`` on 8 fake CPU devices
  (parameters sharded over a mesh) vs one device; runs in a fresh process."""
  out = subprocess.run([sys.executable, "-c", _SHARDED, optimizer_source], capture_output=True,
                       text=True, timeout=300, check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  return float(out.stdout.split("MAXDIFF")[1])


def refused_by_the_cli(args, capfd):
  """Runs the training script's entry point (``experiments.lm.train.main``) in this process on
  arguments it must refuse before training: (exit code, non-empty stderr lines). No subprocess:
  each would spend seconds importing; the CLI's own exit codes are checked by the stop/resume
  test of test_train_safety.py."""
  from experiments.lm import train  # pylint: disable=import-outside-toplevel
  code = train.main(args)
  return code, [line for line in capfd.readouterr().err.splitlines() if line.strip()]


def tpu_probe(config, topologies, *overrides) -> dict:
  """tests/tpu_probe.py's figures (topology -> figures) of ``config``'s step compiled deviceless
  for ``topologies`` (comma-separated), in a subprocess: libtpu loads once per call."""
  import pytest  # pylint: disable=import-outside-toplevel
  pytest.importorskip("libtpu", reason="needs the tpu-aot extra (libtpu), as .ci/run installs")
  root = pathlib.Path(__file__).resolve().parents[1]
  out = subprocess.run(
      [sys.executable, str(root / "tests" / "tpu_probe.py"), config, topologies, *overrides],
      cwd=root, capture_output=True, text=True, timeout=900, check=False,
      env={**os.environ, "JAX_PLATFORMS": "cpu", "JAX_ENABLE_COMPILATION_CACHE": "false",
           "PYTHONPATH": str(root), "XLA_FLAGS": ""})
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])
