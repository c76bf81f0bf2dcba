"""The training script never loses work or silently goes wrong: signals, kills at every moment of a
save, a full disk, locks, corrupted checkpoints, changed settings on resume, foreign or torn
metrics files, divergence and configuration errors (docs/guide.md, "What a run guarantees")."""
from __future__ import annotations

import json
import os
import pathlib
import shutil
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
STEPS = 120  # the reference run: checkpoints every 10 steps (the last 2 kept), eval every 40


def _env():  # read when a run starts: conftest sets the compilation cache after collection
  return {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}


def shared_corpus(shared: pathlib.Path) -> str:
  """The corpus of every run here, at one path for all workers (the checkpoints record it)."""
  path = shared / "train_safety_corpus.txt"
  if not path.exists():
    rng = np.random.default_rng(0)
    words = "the of and to in that is was he for it with as his on be at by had not".split()
    text = "\n".join(" ".join(rng.choice(words, size=12)) for _ in range(3000))
    temporary = path.with_suffix(f".{os.getpid()}")
    temporary.write_text(text)
    os.replace(temporary, path)
  return str(path)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  return shared_corpus(tmp_path_factory.getbasetemp().parent)


def _args(corpus, folder, steps=STEPS, **extra):
  sets = {"data.path": corpus, "train.steps": steps, "log.progress": False,
          "eval.interval": 40, "eval.tokens": 1024, "ckpt.dir": str(folder / "ckpt"),
          "ckpt.interval": 10, "log.metrics": str(folder / "metrics.jsonl"), **extra}
  return [x for k, v in sets.items() for x in ("--set", f"{k}={v}")]


def _command(args, fault=None):
  if fault:
    return [sys.executable, str(ROOT / "tests" / "fault_injection.py"), fault, *args]
  return [sys.executable, "-m", "experiments.lm.train", *args]


def _run(args, check_rc=None, fault=None):
  out = subprocess.run(_command(args, fault), cwd=ROOT, env=_env(), capture_output=True,
                       text=True, timeout=600, check=False)
  if check_rc is not None:
    assert out.returncode == check_rc, out.stderr[-3000:]
  return out


def _records(path):
  return [json.loads(line) for line in pathlib.Path(path).read_text().splitlines()]


def _steps(folder):
  return sorted(int(p.name) for p in (folder / "ckpt").iterdir() if p.name.isdigit())


def _last_line(err):
  return [line for line in err.splitlines() if line.strip()][-1]


def _checkpoint_params(folder, step):
  """The parameter leaves of the checkpoint of ``step`` in ``folder``/ckpt, as NumPy arrays."""
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  with ocp.CheckpointManager(folder / "ckpt") as manager:
    state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  return [np.asarray(x) for x in jax.tree.leaves(state["state"]["params"])]


def _trajectory(records):
  return [(r["step"], r["loss"], r.get("val_loss")) for r in records]


@pytest.fixture(scope="module")
def straight(corpus, tmp_path_factory):
  """The reference: STEPS steps in one go, run once for all pytest-xdist workers (a folder under
  the session's shared temporary root, built under a lock by the first worker that needs it)."""
  import fcntl  # pylint: disable=import-outside-toplevel
  shared = tmp_path_factory.getbasetemp().parent
  folder = shared / "straight_run"
  with open(shared / "straight_run.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not (folder / "done").exists():
      shutil.rmtree(folder, ignore_errors=True)
      out = _run(_args(corpus, folder), check_rc=0)
      last = out.stdout.strip().splitlines()[-1]
      assert str(folder / "ckpt") in last and str(folder / "metrics.jsonl") in last
      (folder / "done").touch()
  assert _steps(folder) == [STEPS - 10, STEPS]
  return folder


def _signal_after(args, metrics, sig, records, lock_check=None):
  """Starts a run, sends ``sig`` once the metrics file holds ``records`` lines (first stopping
  the process for ``lock_check()`` while it holds its locks); returns (exit code, stderr)."""
  proc = subprocess.Popen(_command(args), cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 300
  while time.time() < deadline and len(_records(metrics)) < records:
    time.sleep(0.02)
  if lock_check:
    proc.send_signal(signal.SIGSTOP)
    try:
      lock_check()
    finally:
      proc.send_signal(signal.SIGCONT)
  proc.send_signal(sig)
  _, err = proc.communicate(timeout=300)
  return proc.returncode, err


def test_every_interruption_resumes_bitwise_identical_to_a_straight_run(
    corpus, straight, tmp_path, capfd):
  """One run through every stop a cluster deals out, resumed after each: train.stop_at, Ctrl-C
  twice inside a save, SIGTERM (preemption), SIGHUP (a closed terminal), SIGKILL as a save
  begins, before it commits and while the oldest checkpoint is deleted, and a full disk. Each
  stop's exit code, last line and checkpoints are checked; the end has exactly the losses,
  validation losses and final parameters of the straight run. While the SIGTERM run holds its
  locks (stopped), a second run on its ckpt.dir, and one on its metrics file, are refused. At
  the end, the corpus edited in place (same size) is refused on resume."""
  from experiments.lm import train  # pylint: disable=import-outside-toplevel
  data = tmp_path / "corpus.txt"  # this run's own copy: edited at the end
  shutil.copy(corpus, data)
  args, metrics = _args(str(data), tmp_path), tmp_path / "metrics.jsonl"
  stops, lock_refusals = {}, []

  def record(name, code, err):
    stops[name] = (code, err, _steps(tmp_path))

  def second_runs():  # in this process, while the run is stopped holding its locks
    for extra in (["--resume"], ["--set", f"ckpt.dir={tmp_path / 'other'}",
                                 "--set", "log.overwrite=true"]):
      code = train.main(args + extra)
      lock_refusals.append((code, _last_line(capfd.readouterr().err)))

  out = _run(args + ["--set", "train.stop_at=15"], check_rc=0)
  record("stop_at", out.returncode, out.stderr)
  out = _run(args + ["--resume"], fault="signal-twice-in-save")
  record("signal-twice-in-save", out.returncode, out.stderr)
  for sig in (signal.SIGTERM, signal.SIGHUP):
    code, err = _signal_after(args + ["--resume"], metrics, sig, len(_records(metrics)) + 12,
                              second_runs if sig == signal.SIGTERM else None)
    record(sig.name, code, err)
  for fault in ("kill-before-save", "kill-before-commit", "kill-mid-delete", "disk-full"):
    out = _run(args + ["--resume"], fault=fault)
    record(fault, out.returncode, out.stderr)
  out = _run(args + ["--resume"], check_rc=0)
  record("end", out.returncode, out.stderr)

  assert stops["stop_at"][2] == [10, 15]
  code, err, kept = stops["signal-twice-in-save"]
  assert code == 128 + signal.SIGINT and kept == [15, 20], err[-2000:]
  assert "SIGINT again: a checkpoint is being written" in err
  assert _last_line(err).startswith("interrupted: SIGINT at step 20") and "--resume" in err
  previous = 20
  for name in ("SIGTERM", "SIGHUP"):
    code, err, kept = stops[name]
    assert code == 128 + signal.Signals[name], err[-2000:]
    assert _last_line(err).startswith(f"interrupted: {name}"), err[-2000:]
    assert previous + 12 <= kept[-1] < STEPS - 30, (name, kept)  # saved where it stopped
    previous = kept[-1]
  assert [code for code, _ in lock_refusals] == [2, 2], lock_refusals
  assert [line.startswith("error: ") and "in use by another run" in line
          for _, line in lock_refusals] == [True, True], lock_refusals
  assert "ckpt.dir" in lock_refusals[0][1] and "log.metrics" in lock_refusals[1][1]
  before = stops["SIGHUP"][2]
  for fault in ("kill-before-save", "kill-before-commit"):
    code, err, kept = stops[fault]
    assert code == -signal.SIGKILL and kept == before, (fault, err[-2000:], kept)
  code, err, kept = stops["kill-mid-delete"]
  committed = (before[-1] // 10 + 1) * 10
  assert code == -signal.SIGKILL and kept == [*before, committed], (err[-2000:], kept)
  code, err, kept = stops["disk-full"]
  assert code == 2 and kept == [*before, committed], (err[-2000:], kept)
  line = _last_line(err)
  assert line.startswith(f"error: saving step {committed + 10} ") and "No space left" in line
  assert f"steps: {before[0]}, {before[1]}, {committed}" in line, line
  assert not [p for p in (tmp_path / "ckpt").iterdir() if "tmp" in p.name]  # partial: removed
  assert stops["end"][2] == [STEPS - 10, STEPS]

  resumed, expected = _records(metrics), _records(straight / "metrics.jsonl")
  assert _trajectory(resumed) == _trajectory(expected)
  assert len({r["run"] for r in resumed}) == 1 and resumed[0]["run"] != expected[0]["run"]
  for x, y in zip(_checkpoint_params(straight, STEPS), _checkpoint_params(tmp_path, STEPS),
                  strict=True):
    np.testing.assert_array_equal(x, y)

  text = data.read_text()
  data.write_text(text.replace(" of ", " fo ", 1))  # same size, other content
  code, lines = refused_by_the_cli(args + ["--set", f"train.steps={STEPS + 10}", "--resume"],
                                   capfd)
  assert code == 2 and "other data (data.path digest" in lines[-1], lines


# ----------------------------------------------------------------------------------------------
# Checkpoints that prove they are intact.


def _largest_file(step_dir):
  return max((p for p in (step_dir / "state").rglob("*") if p.is_file()),
             key=lambda p: p.stat().st_size)


def test_bit_flips_in_a_checkpoint_are_detected_and_the_previous_one_restored(
    corpus, straight, tmp_path, capfd):
  """One bit flipped at each of 16 positions of the largest file of the last checkpoint, restored
  as --resume does (here on 8 devices; saved on 1): no flip goes unseen. A flip that changes a
  restored value is caught by its leaf's digest (`<step>.corrupt`, the leaf named) unless Orbax
  already fails to read the file (`<step>.unreadable`), and the previous checkpoint is restored;
  a flip in bytes that hold no value restores the saved state exactly. A name already taken by an
  earlier fallback gets a suffix. Then a real resume from one flipped copy continues exactly as
  the straight run did."""
  from experiments.lm import checkpoint as checkpoint_lib  # pylint: disable=import-outside-toplevel
  from experiments.lm import train  # pylint: disable=import-outside-toplevel
  from experiments.lm.step import build_train_step  # pylint: disable=import-outside-toplevel
  cfg = config_lib.build_config("tiny", _args(corpus, straight)[1::2])
  data = train.open_data(cfg)
  cfg = {**cfg, "model.vocab_size": data.vocab_size}
  abstract = build_train_step(cfg).abstract_state
  saved = _checkpoint_params(straight, STEPS)
  size = _largest_file(straight / "ckpt" / str(STEPS)).stat().st_size
  outcomes = {"corrupt": 0, "unreadable": 0, "unchanged": 0}
  flips = [(position, 1 << (i % 8)) for i, position in
           enumerate(np.linspace(0, size - 1, 16).astype(int))]
  for i, flip in enumerate(flips):
    copy = _flipped_copy(straight, tmp_path / f"flip{i}", *flip)
    (copy / "ckpt" / f"{STEPS}.corrupt").mkdir()  # an earlier fallback's: the name is taken
    checkpoints = checkpoint_lib.Checkpoints({**cfg, "ckpt.dir": str(copy / "ckpt")}, True,
                                             data.identity)
    try:
      state = checkpoints.restore(abstract)
    finally:
      checkpoints.close()
    err = capfd.readouterr().err
    if checkpoints.step == STEPS:
      restored = [np.asarray(x) for x in jax.tree.leaves(state["params"])]
      assert all(np.array_equal(x, y) for x, y in zip(saved, restored, strict=True)), i
      outcomes["unchanged"] += 1
      continue
    assert checkpoints.step == STEPS - 10, (i, err)
    line = next(x for x in err.splitlines() if x.startswith(f"warning: checkpoint {STEPS} "))
    kind = "corrupt" if "is corrupt" in line else "unreadable"
    moved = copy / "ckpt" / (f"{STEPS}.corrupt.2" if kind == "corrupt" else f"{STEPS}.unreadable")
    assert moved.is_dir() and str(moved) in line, (line, sorted(os.listdir(copy / "ckpt")))
    assert f"resuming from step {STEPS - 10}" in line, line
    if kind == "corrupt":
      assert "(state['" in line and "does not match its digest" in line, line
      corrupting = flip
    outcomes[kind] += 1
  print("bit flips:", outcomes)
  assert outcomes["corrupt"] >= 8, outcomes  # most flips land in values

  run = _flipped_copy(straight, tmp_path / "resumed", *corrupting)
  out = _run(_args(corpus, run) + ["--resume"], check_rc=0)
  assert "is corrupt (state['" in out.stderr and f"resuming from step {STEPS - 10}" in out.stderr
  assert _trajectory(_records(run / "metrics.jsonl")) == _trajectory(
      _records(straight / "metrics.jsonl"))


def _flipped_copy(source, destination, position: int, bit: int):
  """A copy of the run ``source`` with one bit of its last checkpoint's largest file flipped."""
  copy = _copy_run(source, destination)
  target = _largest_file(copy / "ckpt" / str(STEPS))
  raw = bytearray(target.read_bytes())
  raw[position] ^= bit
  target.write_bytes(bytes(raw))
  return copy


def test_digests_catch_any_one_word_change_and_do_not_depend_on_the_mesh():
  """Both digest kinds (xxh3 of the host bytes, the devices' weighted sums) change when one bit
  of a leaf flips (f32, bf16 and int32 leaves, first, middle and last byte, low and high bit),
  naming that leaf; and give the same digests for the leaves sharded over 8 devices."""
  from experiments.lm import checkpoint as checkpoint_lib  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  tree = {"b": np.asarray(rng.standard_normal(24), jax.numpy.bfloat16),
          "k": np.arange(40, dtype=np.int32), "step": np.int32(7),
          "w": rng.standard_normal((16, 24)).astype(np.float32)}
  mesh = jax.make_mesh((8,), ("x",))
  sharded = {**tree, "w": jax.device_put(tree["w"], jax.NamedSharding(mesh, jax.P("x", None))),
             "k": jax.device_put(tree["k"], jax.NamedSharding(mesh, jax.P("x")))}
  for kind in ("xxh3", "sums"):
    digests = checkpoint_lib.state_digests(tree, kind)
    assert all(d.startswith(f"{kind}:") for d in digests.values()), digests
    assert checkpoint_lib.state_digests(sharded, kind) == digests, kind
    assert checkpoint_lib.first_mismatch(sharded, digests) is None
    for leaf in ("b", "k", "w"):
      flat = np.asarray(tree[leaf]).reshape(-1).view(np.uint8)
      for byte in (0, len(flat) // 2, len(flat) - 1):
        for bit in (0, 7):
          flipped = flat.copy()
          flipped[byte] ^= 1 << bit
          changed = {**tree, leaf: flipped.view(tree[leaf].dtype).reshape(tree[leaf].shape)}
          assert checkpoint_lib.first_mismatch(changed, digests) == f"['{leaf}']", (kind, leaf)


# ----------------------------------------------------------------------------------------------
# What a resume accepts.


def _copy_run(source, destination):
  shutil.copytree(source / "ckpt", destination / "ckpt", ignore=shutil.ignore_patterns(".lock"))
  shutil.copy(source / "metrics.jsonl", destination / "metrics.jsonl")
  return destination


def _files(folder):
  return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*"))
          if p.is_file() and p.name != ".lock"}


@pytest.mark.parametrize("change", [
    "train.seed=1", "optim.clip=0", "optim.decay=all", "optim.lr=0.01", "optim.kwargs.b1=0.8",
    "data.val_fraction=0.2", "train.batch_size=8", "optim.name=mada", "model=tiny-llama",
    "data.path=ANOTHER"])
def test_a_resume_that_would_change_the_trajectory_is_refused(corpus, straight, tmp_path, capfd,
                                                              change):
  """Every setting but the harmless ones (RESUMABLE_CHANGES) and the data's identity must match
  the checkpoint's: one line naming the key, the run's files unchanged. (The same corpus path
  with other content: the end of the interruption test.)"""
  run = _copy_run(straight, tmp_path / "run")
  if change == "data.path=ANOTHER":
    other = tmp_path / "corpus.txt"
    other.write_text(pathlib.Path(corpus).read_text())  # the same text at another path
    change = f"data.path={other}"
  before = _files(run)
  code, lines = refused_by_the_cli(_args(corpus, run) + ["--set", change, "--resume"], capfd)
  key = change.split("=")[0].removeprefix("optim.kwargs.")
  assert code == 2 and lines[-1].startswith("error: checkpoint in") and key in lines[-1], lines
  assert _files(run) == before


def test_a_new_run_on_a_folder_with_checkpoints_is_refused(corpus, straight, tmp_path, capfd):
  """A run without --resume on a ckpt.dir that holds checkpoints is refused in one line (a
  resume was meant, or another folder), and the folder is left as it was."""
  run = _copy_run(straight, tmp_path / "run")
  before = _files(run)
  code, lines = refused_by_the_cli(_args(corpus, run, **{"log.metrics": tmp_path / "new.jsonl"}),
                                   capfd)
  assert code == 2 and "already holds checkpoints; pass --resume" in lines[-1], lines
  assert _files(run) == before and not (tmp_path / "new.jsonl").exists()


def test_a_resume_keeps_only_its_own_metrics(corpus, straight, tmp_path, capfd):
  """--resume pointed at another run's metrics file (or a record without a step) is refused and
  the file left as it was; a torn last line (a kill mid-write) is dropped and said; harmless
  changes (more steps, eval and logging settings) are accepted and said; the records before the
  resumed step are kept, those after it cut."""
  from experiments.lm import train  # pylint: disable=import-outside-toplevel
  run = _copy_run(straight, tmp_path / "run")
  for foreign in ('{"run": "another", "step": 1, "loss": 2.0}\n', '{"loss": 2.0}\n'):
    other = tmp_path / "other.jsonl"
    other.write_text(foreign)
    code, lines = refused_by_the_cli(_args(corpus, run, **{"log.metrics": other}) + ["--resume"],
                                     capfd)
    assert code == 2 and "holds records of another run" in lines[-1], lines
    assert other.read_text() == foreign
  metrics = run / "metrics.jsonl"
  with open(metrics, "a") as f:
    f.write('{"step": 121, "run": "')  # torn
  shutil.rmtree(run / "ckpt" / str(STEPS))  # resume from STEPS - 10: records after it are cut
  code = train.main(
      _args(corpus, run, STEPS + 10, **{"eval.interval": 7, "train.stop_at": STEPS - 8,
                                        "log.progress": 0}) + ["--resume"])
  err = capfd.readouterr().err
  assert code == 0, err[-3000:]
  assert f"last line of {metrics} is torn" in err
  assert f"train.steps {STEPS} -> {STEPS + 10} (the learning-rate schedule" in err
  assert "eval.interval 40 -> 7" in err
  records = _records(metrics)
  assert [r["step"] for r in records] == list(range(1, STEPS - 7))
  assert records[:STEPS - 10] == _records(straight / "metrics.jsonl")[:STEPS - 10]


def test_a_run_that_stops_before_its_first_record_leaves_no_metrics_file(tmp_path):
  """The metrics file is created (and locked) before the work starts; a run that ends before
  writing a record removes it again, so the same command can be rerun without log.overwrite."""
  from experiments.lm import train  # pylint: disable=import-outside-toplevel
  path = tmp_path / "logs" / "metrics.jsonl"
  log = train.MetricsLog(config_lib.build_config("tiny", {"log.metrics": str(path)}), False)
  assert path.exists()
  log.close()
  assert not path.exists()


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


@pytest.mark.parametrize("setting", [
    "optim.lr=-0.003", "optim.lr=abc", "optim.lr=nan", "optim.clip=-1", "optim.min_lr_ratio=-3",
    "eval.interval=0", "ckpt.interval=0", "ckpt.keep=0", "ckpt.keep=-1",
    "model.compute_dtype=bogus", "train.batch_size=true", "optim.kwargs.b1=1.5",
    "optim.kwargs.b1=[1,2]", "optim.kwargs=5", "train.on_nan=ignore", "model.remat=all",
    "train.grad_accum=3", "log.overwrite=no", "log.progress=off", "distributed=n",
    "train.seed=-1", "train.seed=1.5", "train.stop_at=0", "train.device_batch=-1",
    "train.stop_at=abc", "distributed=abc", "peak_flops=abc", "peak_flops=-1", "data.path=5",
    "log.metrics=5", "log.metrics=DIR", "ckpt.dir=FILE", "ckpt.dir=/proc/no/such"])
def test_bad_settings_give_one_error_line(corpus, tmp_path, setting, capfd):
  (tmp_path / "file").write_text("")
  setting = setting.replace("DIR", str(tmp_path)).replace("FILE", str(tmp_path / "file"))
  code, lines = refused_by_the_cli(_args(corpus, tmp_path, 5, **{"optim.name": "ademamix"})
                                   + ["--set", setting], capfd)
  assert code == 2 and lines[-1].startswith("error: "), lines
  assert setting.split("=")[0].split(".")[-1] in lines[-1], lines[-1]
  assert not (tmp_path / "metrics.jsonl").exists()


def test_words_for_yes_no_and_none_mean_what_they_say(monkeypatch, tmp_path):
  """Booleans are true/false (any case) or 1/0; "none" selects the documented "none" option;
  "~" in a path is the home folder."""
  monkeypatch.setenv("HOME", str(tmp_path))
  cfg = config_lib.build_config("tiny", [
      "log.overwrite=TRUE", "log.progress=0", "distributed=false", "optim.decay=none",
      "model.remat=None", "ckpt.dir=~/run", "log.metrics=~/run/m.jsonl", "data.path=~/corpus"])
  assert (cfg["log.overwrite"], cfg["log.progress"], cfg["distributed"]) == (True, False, False)
  assert (cfg["optim.decay"], cfg["model.remat"]) == ("none", "none")
  assert cfg["ckpt.dir"] == str(tmp_path / "run") and cfg["data.path"] == str(tmp_path / "corpus")
  assert cfg["log.metrics"] == str(tmp_path / "run" / "m.jsonl")


def test_help_lists_every_config_key_with_its_default():
  out = _run(["--help"], check_rc=0).stdout
  for key, value in config_lib.DEFAULTS.items():
    assert f"{key} = {value!r}" in out
