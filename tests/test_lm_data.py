"""The training script on token data: shards = text, vocabulary from the metadata, a validation set
that does not depend on the topology, prefetching and padded documents that change nothing."""
from __future__ import annotations

import jax
import numpy as np
import pytest

pytest.importorskip("flax")
pytest.importorskip("orbax.checkpoint")

from helpers import refused_by_the_cli  # noqa: E402

from experiments.lm import config as config_lib  # noqa: E402
from experiments.lm import data as data_lib  # noqa: E402
from experiments.lm import prepare as prepare_lib  # noqa: E402
from experiments.lm import step as step_lib  # noqa: E402
from experiments.lm import train as train_lib  # noqa: E402


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  """Twelve documents of 40-400 lines (one per file)."""
  root = tmp_path_factory.mktemp("texts")
  rng = np.random.default_rng(0)
  words = "the of and to in that is was he for it with as his thou thy lord king love".split()
  for i in range(12):
    lines = int(rng.integers(40, 400))
    (root / f"doc{i:02d}.txt").write_text(
        "\n".join(" ".join(rng.choice(words, size=10)) for _ in range(lines)))
  return root


@pytest.fixture(scope="module")
def shards(folder, tmp_path_factory):
  out = {}
  for tokenizer in ("bytes", "gpt2"):
    if tokenizer == "gpt2":
      pytest.importorskip("tiktoken")
    out[tokenizer] = tmp_path_factory.mktemp("shards") / tokenizer
    assert prepare_lib.main(["--input", str(folder), "--tokenizer", tokenizer, "--out",
                             str(out[tokenizer]), "--workers", "1", "--no-progress"]) == 0
  return out


def _train(path, steps=8, **overrides):
  cfg = config_lib.build_config("tiny", {"data.path": str(path), "train.steps": steps,
                                         "log.progress": False, "eval.interval": 4,
                                         "eval.tokens": 2048, **overrides})
  summary = train_lib.train(cfg)
  return summary


def _losses(summary):
  return [(r["loss"], r.get("val_loss")) for r in summary["history"]]


def test_training_from_shards_equals_training_from_the_text_with_or_without_prefetch(folder,
                                                                                     shards):
  """Memory-mapped byte shards with batches prefetched on a thread train exactly as the text read
  into memory with batches built in the loop (bitwise): neither the source nor the thread
  changes a batch."""
  assert _losses(_train(shards["bytes"], **{"data.prefetch": 3})) == _losses(
      _train(folder, **{"data.prefetch": 0}))


def test_model_vocabulary_comes_from_the_metadata(shards):
  summary = _train(shards["gpt2"], steps=2, **{"eval.interval": 2})
  embed = summary["state"]["params"]["embed"]["embedding"]
  assert embed.shape[0] == 50304  # GPT-2's 50257, padded to a multiple of 128
  assert np.isfinite(summary["val_loss"]) and summary["val_loss"] < 11.5


def test_validation_loss_is_the_same_on_1_2_and_8_devices(folder):
  """Same state, 1, 2 and 8 devices with the microbatch following the device count (2 rows per
  device): the validation set and its per-token mean do not change."""
  cfg = config_lib.build_config("tiny", {"data.path": str(folder), "eval.tokens": 5000,
                                         "train.grad_accum": "auto", "train.device_batch": 2})
  data = train_lib.open_data(cfg)
  cfg = {**cfg, "model.vocab_size": data.vocab_size}
  losses, params = [], []
  for n in (1, 2, 8):
    program = step_lib.build_train_step(cfg, jax.devices()[:n])
    assert program.micro_batch == 2 * n
    with jax.set_mesh(program.mesh):
      state = program.init()
      losses.append(train_lib.validation_loss(program, data, state))
    params.append(jax.tree.map(np.asarray, state["params"]))
  for other in params[1:]:
    for x, y in zip(jax.tree.leaves(params[0]), jax.tree.leaves(other)):
      np.testing.assert_array_equal(x, y)
  np.testing.assert_allclose(losses[1:], [losses[0]] * 2, rtol=1e-6)
  assert 5.0 < losses[0] < 6.0  # ln 256 = 5.55 at initialisation


def test_padded_documents_loss_is_per_token_whatever_the_microbatching(tmp_path):
  """data.sampling=documents: the step's loss is the mean over real tokens, so 4 microbatches of
  8 rows = one batch of 32 (documents of 8 to 120 bytes, pads masked)."""
  rng = np.random.default_rng(2)
  for i in range(200):
    (tmp_path / f"{i:03d}.txt").write_text("ab cd ef " * int(rng.integers(1, 14)))
  settings = {"data.sampling": "documents", "train.seq_len": 64, "train.batch_size": 32}
  data = train_lib.open_data(config_lib.build_config("tiny", {"data.path": str(tmp_path)}))
  targets = data_lib.train_rows(data, "documents", 0, 0, np.arange(32), 32, 64)[1]
  assert 0.2 < np.mean(targets < 0) < 0.8  # a fair share of padding in every step
  one = _train(tmp_path, steps=4, **settings)
  four = _train(tmp_path, steps=4, **settings, **{"train.grad_accum": 4})
  np.testing.assert_allclose([r["loss"] for r in one["history"]],
                             [r["loss"] for r in four["history"]], rtol=1e-5)
  assert one["history"][0]["loss"] > 5.0


@pytest.mark.parametrize("case", ["vocab", "truncated", "documents", "missing"])
def test_bad_data_gives_one_error_line_before_training(case, folder, shards, tmp_path, capfd):
  path = {"vocab": shards["gpt2"], "missing": tmp_path / "none", "truncated": tmp_path / "cut",
          "documents": tmp_path / "short"}[case]
  if case == "documents":  # thirty documents, each shorter than seq_len
    path.mkdir()
    for i in range(30):
      (path / f"{i}.txt").write_text(f"line {i} of a short text")
  if case == "truncated":
    import shutil  # pylint: disable=import-outside-toplevel
    shutil.copytree(shards["bytes"], path)
    shard = next(path.glob("tokens_val_*.bin"))
    shard.write_bytes(shard.read_bytes()[:-3])
  sets = {"data.path": path, "train.steps": 3, "log.progress": "false",
          "log.metrics": tmp_path / "m.jsonl"}
  if case == "vocab":
    sets["model.vocab_size"] = 256
  if case == "documents":
    sets.update({"data.sampling": "documents", "train.seq_len": 64})
  args = [x for k, v in sets.items() for x in ("--set", f"{k}={v}")]
  code, lines = refused_by_the_cli(args, capfd)
  assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), lines
  assert {"vocab": "token id 50256", "truncated": "truncated", "documents": "longer than every",
          "missing": "does not exist"}[case] in lines[0]
  assert not (tmp_path / "m.jsonl").exists()



def test_each_device_shard_is_built_from_its_own_rows():
  """The batch's rows are asked for per device shard (a process builds only its devices' rows):
  on 8 devices, a batch of 16 in 2 microbatches is 8 calls of 2 rows, row a * 8 + m at (a, m)."""
  cfg = config_lib.build_config("tiny", {"train.batch_size": 16, "train.grad_accum": 2})
  program = step_lib.build_train_step(cfg)
  seq, calls = cfg["train.seq_len"], []

  def rows(ids):
    calls.append(sorted(ids.tolist()))
    column = np.repeat(ids[:, None], seq, axis=1).astype(np.int32)
    return column, -column

  inputs, targets = program.batch(rows)
  assert len(calls) == 8 and all(len(c) == 2 for c in calls)
  assert sorted(sum(calls, [])) == list(range(16))
  expected = np.arange(16).reshape(2, 8)[..., None] * np.ones(seq, np.int32)
  np.testing.assert_array_equal(np.asarray(inputs), expected)
  np.testing.assert_array_equal(np.asarray(targets), -expected)
