"""The training script with one fault injected, for tests/test_train_safety.py:

    python tests/fault_injection.py FAULT TRAIN_ARGS...

FAULT happens at the first checkpoint save the run reaches:

- ``kill-before-save``: SIGKILL as the save begins (nothing written);
- ``kill-before-commit``: SIGKILL once the state is written to Orbax's temporary folder, before
  the rename that commits it;
- ``kill-mid-delete``: SIGKILL after half the files of the oldest checkpoint are deleted (the new
  one is committed);
- ``disk-full``: the commit raises ``OSError(ENOSPC)``;
- ``signal-twice-in-save``: SIGINT arrives twice as the save begins (Ctrl-C pressed twice).

The hooks replace Orbax internals by name (orbax-checkpoint 0.12): if those move, the patch
fails loudly here rather than testing nothing.
"""
import errno
import os
import pathlib
import signal
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))


def _die():
  os.kill(os.getpid(), signal.SIGKILL)


def main():
  fault, args = sys.argv[1], sys.argv[2:]
  from orbax.checkpoint._src.path import atomicity, deleter  # pylint: disable=import-outside-toplevel

  from experiments.lm import checkpoint, train  # pylint: disable=import-outside-toplevel
  save = checkpoint.Checkpoints.save

  if fault in ("kill-before-save", "signal-twice-in-save"):
    def patched_save(self, state, step):
      if self.manager and self.step != step:
        if fault == "kill-before-save":
          _die()
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)
      return save(self, state, step)
    checkpoint.Checkpoints.save = patched_save
  elif fault in ("kill-before-commit", "disk-full"):
    async def finalize(self):
      del self
      if fault == "disk-full":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
      _die()
    assert hasattr(atomicity.AtomicRenameTemporaryPath, "finalize")
    atomicity.AtomicRenameTemporaryPath.finalize = finalize
  elif fault == "kill-mid-delete":
    def delete(self, step, target):
      del self, step
      files = sorted(p for p in pathlib.Path(target).rglob("*") if p.is_file())
      for path in files[:len(files) // 2]:
        path.unlink()
      _die()
    assert hasattr(deleter.StandardCheckpointDeleter, "_delete_step_permanently")
    deleter.StandardCheckpointDeleter._delete_step_permanently = delete  # pylint: disable=protected-access
  else:
    raise SystemExit(f"unknown fault {fault!r}")
  sys.exit(train.main(args))


if __name__ == "__main__":
  main()
