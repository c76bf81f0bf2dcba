"""The training script never loses work or silently goes wrong (signals, divergence, checkpoints,
metrics, configuration errors)."""
from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

pytest.importorskip("flax")
pytest.importorskip("orbax.checkpoint")

from helpers import refused_by_the_cli  # noqa: E402

from experiments.lm import config as config_lib  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _env():  # read when a run starts: conftest sets the compilation cache after collection
  return {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  rng = np.random.default_rng(0)
  words = "the of and to in that is was he for it with as his on be at by had not".split()
  path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
  path.write_text("\n".join(" ".join(rng.choice(words, size=12)) for _ in range(3000)))
  return str(path)


def _args(corpus, tmp_path, steps=40, **extra):
  sets = {"data.path": corpus, "train.steps": steps, "log.progress": False,
          "eval.interval": 1000, "eval.tokens": 1024, "ckpt.dir": str(tmp_path / "ckpt"),
          "log.metrics": str(tmp_path / "metrics.jsonl"), **extra}
  return [x for k, v in sets.items() for x in ("--set", f"{k}={v}")]


def _run(args, check_rc=None):
  out = subprocess.run([sys.executable, "-m", "experiments.lm.train", *args], cwd=ROOT, env=_env(),
                       capture_output=True, text=True, timeout=600, check=False)
  if check_rc is not None:
    assert out.returncode == check_rc, out.stderr[-3000:]
  return out


def _records(path):
  return [json.loads(line) for line in pathlib.Path(path).read_text().splitlines()]


def _steps(tmp_path):
  return sorted(int(p.name) for p in (tmp_path / "ckpt").iterdir() if p.name.isdigit())


def _interrupt(args, metrics, sig, after=20):
  """Starts a run, sends ``sig`` once ``after`` steps are logged; returns (exit code, stderr)."""
  proc = subprocess.Popen([sys.executable, "-m", "experiments.lm.train", *args], cwd=ROOT,
                          env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 300
  while time.time() < deadline and (not metrics.exists() or len(_records(metrics)) < after):
    time.sleep(0.05)
  proc.send_signal(sig)
  _, err = proc.communicate(timeout=300)
  return proc.returncode, err


def _checkpoint_params(folder, step):
  """The parameter leaves of the checkpoint of ``step`` in ``folder``/ckpt, as NumPy arrays."""
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  with ocp.CheckpointManager(folder / "ckpt") as manager:
    state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  return [np.asarray(x) for x in jax.tree.leaves(state["state"]["params"])]


def test_a_stopped_run_resumes_bitwise_identical_to_a_straight_run(corpus, tmp_path):
  """SIGINT (Ctrl-C), SIGTERM (preemption) and train.stop_at mid-run: the step finishes and the
  state is saved (a signal: exit code 128+signum with a one-line hint); --resume then gives
  exactly the losses, validation loss and final parameters of the run made straight through.
  That run keeps the default checkpoints (every 100 steps, the last 2, and the final step),
  which its losses do not depend on. One test: one straight run."""
  steps = 250
  straight = tmp_path / "straight"
  out = _run(_args(corpus, straight, steps), check_rc=0)
  assert _steps(straight) == [200, 250]  # default ckpt.interval 100, ckpt.keep 2
  last = out.stdout.strip().splitlines()[-1]
  assert str(straight / "ckpt") in last and str(straight / "metrics.jsonl") in last
  expected = _records(straight / "metrics.jsonl")
  assert expected[-1]["val_loss"] is not None
  expected_params = _checkpoint_params(straight, steps)
  for how in ("SIGINT", "SIGTERM", "stop_at"):
    run = tmp_path / how
    args = _args(corpus, run, steps, **{"ckpt.interval": 10_000})
    if how == "stop_at":
      _run(args + ["--set", "train.stop_at=100"], check_rc=0)
      stopped_at = 100
    else:
      sig = signal.Signals[how]
      code, err = _interrupt(args, run / "metrics.jsonl", sig)
      assert code == 128 + sig, err[-2000:]
      last = [line for line in err.splitlines() if line.strip()][-1]
      assert last.startswith("interrupted: ") and "--resume" in last, err[-2000:]
      stopped_at = len(_records(run / "metrics.jsonl"))
    assert 20 <= stopped_at < steps and _steps(run) == [stopped_at], how
    _run(args + ["--resume"], check_rc=0)
    resumed = _records(run / "metrics.jsonl")
    assert [r["step"] for r in resumed] == list(range(1, steps + 1)), how
    assert [(r["loss"], r.get("val_loss")) for r in resumed] == [
        (r["loss"], r.get("val_loss")) for r in expected], how
    for x, y in zip(expected_params, _checkpoint_params(run, steps), strict=True):
      np.testing.assert_array_equal(x, y, err_msg=how)


def test_ckpt_keep_must_be_positive(corpus, tmp_path, capfd):
  for keep in (0, -1):
    code, err = refused_by_the_cli(_args(corpus, tmp_path / f"k{keep}", 5, **{"ckpt.keep": keep}),
                                   capfd)
    assert code == 2 and "ckpt.keep" in err[-1], err


def test_divergence_stops_and_keeps_the_last_finite_checkpoint(corpus, tmp_path):
  out = _run(_args(corpus, tmp_path, 40, **{"optim.lr": 1000, "ckpt.interval": 2,
                                            "ckpt.keep": 2}), check_rc=3)
  assert out.stderr.splitlines()[-1].startswith("error: diverged")
  kept = _steps(tmp_path)
  assert kept and max(kept) < 40
  for step in kept:
    assert all(np.all(np.isfinite(x)) for x in _checkpoint_params(tmp_path, step)), step


def test_skip_mode_skips_non_finite_steps_up_to_a_bound(corpus, tmp_path):
  out = _run(_args(corpus, tmp_path, 40, **{"optim.lr": 1000, "train.on_nan": "skip",
                                            "train.max_skips": 3}), check_rc=3)
  assert "train.on_nan=skip" in out.stderr.splitlines()[-1]
  records = _records(tmp_path / "metrics.jsonl")
  assert sum(r.get("skipped", 0) for r in records) == 4  # 3 skipped, the 4th stops the run


def test_corrupt_latest_checkpoint_falls_back_to_the_previous_one(corpus, tmp_path):
  _run(_args(corpus, tmp_path, 20, **{"ckpt.interval": 10}), check_rc=0)
  for item in (tmp_path / "ckpt" / "20" / "state").rglob("*"):
    if item.is_file():
      item.write_bytes(b"garbage")
  out = _run(_args(corpus, tmp_path, 30, **{"ckpt.interval": 10}) + ["--resume"], check_rc=0)
  assert "checkpoint 20" in out.stderr and "unreadable" in out.stderr and "step 10" in out.stderr
  assert (tmp_path / "ckpt" / "20.unreadable").exists()  # kept for inspection
  assert [r["step"] for r in _records(tmp_path / "metrics.jsonl")] == list(range(1, 31))


def test_refusals_leave_a_finished_run_as_it_was(corpus, tmp_path, capfd):
  """--resume with another optimizer is refused before restoring; a new run that would write to
  an existing metrics file is refused (log.overwrite). The run's files stay as they were."""
  _run(_args(corpus, tmp_path, 5), check_rc=0)
  before = (tmp_path / "metrics.jsonl").read_text()
  another_optimizer = _args(corpus, tmp_path, 10, **{"optim.name": "mada"}) + ["--resume"]
  code, err = refused_by_the_cli(another_optimizer, capfd)
  assert code == 2 and "optim.name" in err[-1], err
  same_metrics = _args(corpus, tmp_path, 5, **{"ckpt.dir": str(tmp_path / "other")})
  code, err = refused_by_the_cli(same_metrics, capfd)
  assert code == 2 and "log.overwrite" in err[-1], err
  assert _steps(tmp_path) == [5] and (tmp_path / "metrics.jsonl").read_text() == before


@pytest.mark.parametrize("setting", [
    "optim.lr=-0.003", "optim.lr=abc", "optim.lr=nan", "optim.clip=-1", "optim.min_lr_ratio=-3",
    "eval.interval=0", "ckpt.interval=0", "model.compute_dtype=bogus", "train.batch_size=true",
    "optim.kwargs.b1=1.5", "train.on_nan=ignore", "model.remat=all", "train.grad_accum=3"])
def test_bad_settings_give_one_error_line(corpus, tmp_path, setting, capfd):
  code, lines = refused_by_the_cli(_args(corpus, tmp_path, 5, **{"optim.name": "ademamix"})
                         + ["--set", setting], capfd)
  assert code == 2 and lines[-1].startswith("error: "), lines
  assert setting.split("=")[0].split(".")[-1] in lines[-1], lines[-1]


def test_help_lists_every_config_key_with_its_default():
  out = _run(["--help"], check_rc=0).stdout
  for key, value in config_lib.DEFAULTS.items():
    assert f"{key} = {value!r}" in out
