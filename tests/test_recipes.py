"""The papers' LM recipes (experiments/lm/recipes.py, issue 21): shapes, dropout, biases, decay
masks, the character tokenizer, the train-split estimate, and what ``compare --dry-run`` says.

TPU part (libtpu from the ``tpu-aot`` extra, in a subprocess): every recipe's step is lowered for
a v5e-16 at its depth and batch and found to be the very program whose deviceless compile is
committed in results/scale/recipes/ (the compile of a full depth takes minutes per recipe on a
2-core CPU); the dry run turns those compiler figures into its estimates.
"""
from __future__ import annotations

import json
import math
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("flax")

from flax import nnx  # noqa: E402

from experiments.lm import (
  compare,  # noqa: E402
  dry_run,  # noqa: E402
  recipes,  # noqa: E402
  tokenization,  # noqa: E402
)
from experiments.lm import config as config_lib  # noqa: E402
from experiments.lm import data as data_lib  # noqa: E402
from experiments.lm import model as model_lib  # noqa: E402
from experiments.lm import step as step_lib  # noqa: E402
from experiments.lm import train as train_lib  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
TPU_ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_ENABLE_COMPILATION_CACHE": "false",
           "PYTHONPATH": str(ROOT), "XLA_FLAGS": ""}


def _param_paths(cfg):
  model = nnx.eval_shape(lambda: model_lib.LanguageModel(config_lib.model_config(cfg),
                                                         nnx.Rngs(0)))
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  return params, {"/".join(str(getattr(k, "key", k)) for k in path): leaf
                  for path, leaf in jax.tree_util.tree_leaves_with_path(params)}


@pytest.mark.parametrize("name", sorted(recipes.RECIPES))
def test_recipe_has_the_reference_parameter_count_and_says_where_it_comes_from(name):
  recipe = recipes.RECIPES[name]
  cfg = config_lib.build_config(name)
  count = model_lib.parameter_count(config_lib.model_config(cfg))
  reference, where = recipe.params
  assert abs(count - reference) <= 0.01 * reference, (count, reference, where)
  assert recipe.source and recipe.deviations and recipe.tokens and where
  # The steps and batch are the source's token count (as recipe.tokens states it).
  stated = recipe.tokens.split("=")[1].split()[0]
  tokens = cfg["train.steps"] * cfg["train.batch_size"] * cfg["train.seq_len"]
  scale = {"B": 1e9, "M": 1e6}[stated[-1]]
  assert abs(tokens / scale - float(stated[:-1])) <= 0.01 * float(stated[:-1]), (tokens, stated)


def test_bias_free_gpt2_has_no_bias_and_the_mada_decay_mask_includes_the_embeddings():
  cfg = config_lib.build_config("mada-gpt2-owt")
  params, paths = _param_paths(cfg)
  assert not [p for p in paths if p.endswith("bias")]
  assert [p for p in _param_paths(config_lib.build_config("tiny"))[1] if p.endswith("bias")]
  assert cfg["optim.decay"] == "matrices+embeddings"
  mask = dict(zip(paths, jax.tree.leaves(step_lib.decay_mask(params, cfg["optim.decay"]))))
  assert mask["embed/embedding"] and mask["positions/embedding"]
  assert mask["blocks/0/attn/qkv/kernel"] and not mask["blocks/0/ln_1/scale"]
  default = dict(zip(paths, jax.tree.leaves(step_lib.decay_mask(params, "matrices"))))
  assert not default["embed/embedding"] and default["blocks/0/attn/qkv/kernel"]
  # And the optimizer decays the embedding: a zero gradient shrinks it by lr * wd.
  small = config_lib.build_config("tiny", {"optim.decay": "matrices+embeddings",
                                           "optim.clip": 0.0, "optim.warmup": 0,
                                           "optim.schedule": "constant"})
  program = step_lib.build_train_step(small)
  state = program.init()
  tx = program.tx
  zeros = jax.tree.map(jnp.zeros_like, state["params"])
  updates, _ = tx.update(zeros, tx.init(state["params"]), state["params"])
  embed, lr, wd = (state["params"]["embed"]["embedding"], small["optim.lr"],
                   small["optim.weight_decay"])
  np.testing.assert_allclose(updates["embed"]["embedding"], -lr * wd * embed, rtol=1e-5)
  np.testing.assert_array_equal(updates["ln_f"]["scale"], 0.0)


def test_dropout_is_on_in_training_only_and_drawn_from_seed_and_step():
  batch = np.random.default_rng(0).integers(0, 256, (1, 8, 64)).astype(np.int32)
  programs = {rate: step_lib.build_train_step(config_lib.build_config(
      "tiny", {"model.dropout": rate, "optim.clip": 0.0})) for rate in (0.0, 0.2)}
  states = {rate: p.init() for rate, p in programs.items()}
  evals = {rate: float(p.eval_sums(states[rate], batch, batch)[0]) for rate, p in programs.items()}
  assert evals[0.0] == evals[0.2]  # evaluation: no dropout
  losses = {rate: float(p.step(p.init(), batch, batch)[1]["loss"]) for rate, p in programs.items()}
  assert abs(losses[0.2] - losses[0.0]) > 1e-3, losses  # training: dropout
  program = programs[0.2]
  again = float(program.step(program.init(), batch, batch)[1]["loss"])
  assert again == losses[0.2]  # the same step of the same seed draws the same masks
  later = program.init()
  later["step"] = later["step"] + 1
  assert float(program.step(later, batch, batch)[1]["loss"]) != losses[0.2]
  with pytest.raises(config_lib.ConfigError, match="dropout"):
    config_lib.model_config(config_lib.build_config("tiny", {"model.dropout": 1.0}))
  with pytest.raises(config_lib.ConfigError, match="LLaMA has no biases"):
    config_lib.model_config(config_lib.build_config("tiny-llama", {"model.bias": True}))


def test_character_tokenizer_is_the_corpus_alphabet_and_the_recipe_refuses_other_texts(tmp_path):
  text = "First Citizen:\nBefore we proceed any further, hear me speak.\n" * 40
  corpus = tmp_path / "input.txt"
  corpus.write_text(text)
  data = data_lib.open_data(str(corpus), tokenizer="chars", val_fraction=0.1)
  alphabet = "".join(sorted(set(text)))
  assert data.vocab_size == len(alphabet)
  tokenizer = tokenization.get_tokenizer("chars:" + alphabet)
  cut = int(len(text) * 0.9)
  np.testing.assert_array_equal(data.splits["train"].shards[0], tokenizer.encode(text[:cut]))
  assert tokenizer.decode(tokenizer.encode(text[:50])) == text[:50]
  with pytest.raises(tokenization.TokenizerError, match="not in the chars"):
    tokenizer.encode("Z")
  with pytest.raises(tokenization.TokenizerError, match="built from a text corpus"):
    tokenization.get_tokenizer("chars")
  # The recipe's vocabulary is tiny-shakespeare's 65: the complete works (more) are refused.
  cfg = config_lib.build_config("mada-shakespeare-char", {"train.steps": 1})
  with pytest.raises(data_lib.DataError, match="vocabulary 65"):
    train_lib.train(cfg)


def test_train_split_estimate_is_the_final_train_loss_of_the_recipe(tmp_path):
  cfg = config_lib.build_config("tiny", {"train.steps": 4, "eval.interval": 4,
                                         "eval.train_batches": 3, "log.progress": False})
  summary = train_lib.train(cfg)
  program = step_lib.build_train_step({**cfg, "model.vocab_size": 256})
  data = train_lib.open_data(cfg)
  expected = train_lib.train_split_loss(program, data, summary["state"])
  assert summary["train_eval_loss"] == pytest.approx(expected, rel=1e-6)
  assert math.isfinite(expected) and expected != summary["val_loss"]
  assert summary["history"][-1]["train_eval_loss"] == summary["train_eval_loss"]


def test_recipe_presets_plan_the_papers_runs_and_refuse_cpu_scale():
  _, planned, _ = compare.plan("mada-gpt2-owt", "full")
  assert [p.run.label for p in planned] == list(compare.MADA_TABLE2)
  assert [p.run.paper for p in planned] == list(compare.MADA_TABLE2.values())
  lion = next(p for p in planned if p.run.optimizer == "lion")
  assert config_lib.build_config("mada-gpt2-owt", lion.settings)["optim.kwargs"] == {
      "b1": 0.9, "b2": 0.99}
  _, grid, _ = compare.plan("mada-shakespeare-char", "full")
  assert len(grid) == 3 * 275 and {p.seed for p in grid} == {1}
  _, accel, _ = compare.plan("accel-150m-c4", "full")
  tokens = {p.batch: p.steps * p.batch * 512 for p in accel}
  assert set(tokens) == {64, 2048} and len(set(tokens.values())) == 1  # equal token budgets
  with pytest.raises(config_lib.ConfigError, match="paper recipe"):
    compare.plan("mada-gpt2-owt", "cpu")


def test_a_recipe_comparison_runs_and_sets_the_papers_numbers_beside_ours(tmp_path):
  """MADA's Table 2 comparison, shrunk to a tiny model and 3 steps, with two of its optimizers
  (Lion: the one whose keywords differ); the claims on all six from given losses."""
  small = {"model": "tiny", "model.vocab_size": None, "model.compute_dtype": "float32",
           "train.steps": 3, "train.batch_size": 8, "train.seq_len": 32, "train.grad_accum": 1,
           "mesh.fsdp": 1, "eval.interval": 3, "eval.tokens": 256, "optim.warmup": 1}
  rows = compare.run_preset("mada-gpt2-owt", "full", out=str(tmp_path), overrides_extra=small,
                            optimizers=("adamw", "lion"))
  assert [(r["run"], r["paper"]) for r in rows] == [("Adam", "2.8956"), ("Lion", "2.8892")]
  assert all(math.isfinite(r["final val loss"]) for r in rows)
  assert "2.8956" in (tmp_path / "table.md").read_text()
  stats = {(k, 480): compare.V.Stat.of([v]) for k, v in compare.MADA_TABLE2.items()}
  verdicts = [c["verdict"] for c in compare.PRESETS["mada-gpt2-owt"].claims(stats)]
  assert verdicts == ["reproduced"] * 3  # the paper's own numbers reproduce its claims
  stats[("MADA", 480)] = compare.V.Stat.of([2.90])
  assert compare.PRESETS["mada-gpt2-owt"].claims(stats)[0]["verdict"] != "reproduced"


def test_assumed_gpu_estimate_is_the_models_flops_at_40_percent_mfu():
  _, planned, _ = compare.plan("mada-gpt2-owt", "full", optimizers=("adamw",))
  row, = dry_run.dry_run("mada-gpt2-owt", planned, assume="H100:1", cache_dir=None)
  cfg = config_lib.build_config("mada-gpt2-owt")
  n = model_lib.parameter_count(config_lib.model_config(cfg))
  tokens = 100_000 * 480 * 1024
  flops = (6 * (n - 1024 * 768) + 12 * 12 * 768 * 1024) * tokens
  train_h = flops / (495e12 * 0.4) / 3600  # float32: the H100's TF32 peak
  validation = 200 * 2 ** 24 / (3 * tokens)  # 200 passes over (at most) 2^24 tokens, forward
  assert row["tokens"] == tokens
  assert row["wall_h_at_40pct_mfu"] == pytest.approx(train_h * (1 + validation), rel=1e-9)
  _, bf16, _ = compare.plan("mada-gpt2-owt", "full", optimizers=("adamw",),
                            overrides_extra={"model.compute_dtype": "bfloat16"})
  fast, = dry_run.dry_run("mada-gpt2-owt", bf16, assume="H100:1", cache_dir=None)
  assert 29 < fast["wall_h_at_40pct_mfu"] < 32  # in bf16, the "about 30 h on one H100"
  assert fast["wall_h_at_40pct_mfu"] == pytest.approx(row["wall_h_at_40pct_mfu"] * 495 / 989)
  with pytest.raises(config_lib.ConfigError, match="--assume"):
    dry_run.dry_run("mada-gpt2-owt", planned, assume="H100", cache_dir=None)


def _tpu(args, timeout=900):
  pytest.importorskip("libtpu", reason="needs the tpu-aot extra (libtpu), as .ci/run installs")
  out = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                       timeout=timeout, check=False, env=TPU_ENV)
  assert out.returncode == 0, out.stderr[-3000:]
  return out.stdout


def test_each_recipe_is_the_program_whose_compile_is_committed_and_its_dry_run_adds_up(
    tmp_path):
  """Every recipe's step, lowered today for v5e:4x4 at the recipe's depth and batch, has the
  digest of a committed deviceless compile (results/scale/recipes/): the program the figures are
  of is this one, and it compiled and fit. The dry run's estimates are those figures' arithmetic."""
  committed = pathlib.Path(ROOT, dry_run.CACHE)
  cache = tmp_path / "cache"
  cache.mkdir()
  for path in committed.glob("*.json"):
    (cache / path.name).write_text(path.read_text())
  out = json.loads(_tpu([str(ROOT / "tests" / "recipe_probe.py"), str(cache)])
                   .strip().splitlines()[-1])
  assert set(out) == set(recipes.COMPARISONS)
  for preset, rows in out.items():
    _, planned, _ = compare.plan(preset, "full", optimizers=("adamw",))
    assert len(rows) == len({p.batch for p in planned})
    for row in rows:
      assert row["source"] == "cached", (preset, row, "stale results/scale/recipes: rerun "
                                         "compare --dry-run --topology v5e:4x4")
      model = config_lib.build_config(compare.PRESETS[preset].config)["model"]
      figures = json.loads((cache / f"{model}_adamw_{row['program']}.json").read_text())
      assert figures["fits"] and row["fits"] and figures["chips"] == 16
      assert figures["grad_accum"] * figures["microbatch"] == row["batch"]
      cfg = config_lib.build_config(compare.PRESETS[preset].config,
                                    next(p.settings for p in planned if p.batch == row["batch"]))
      assert row["tokens"] == cfg["train.steps"] * row["batch"] * cfg["train.seq_len"]
      assert row["roofline_step_s"] == pytest.approx(figures["roofline_step_s"], rel=1e-12)
      assert row["memory_gib"] == pytest.approx(figures["hbm_gib"], rel=1e-12)
      wall = dry_run.wall_seconds(cfg, figures, figures["microbatch"]) / 3600
      assert row["wall_h_roofline"] == pytest.approx(wall, rel=1e-12)
      assert cfg["train.steps"] * figures["roofline_step_s"] / 3600 < wall
  assert sorted(p.name for p in cache.iterdir()) == sorted(p.name for p in committed.glob("*.json"))


def test_program_digests_do_not_depend_on_where_jax_is_installed(monkeypatch):
  """A Pallas kernel's serialized body (base64 in the lowered text) names its source file by
  absolute path; two installs of the same program must digest alike, other programs not."""
  import base64  # pylint: disable=import-outside-toplevel

  def lowered(prefix, op="dot"):
    body = f"MLIR {prefix}/jax/experimental/pallas/ops/tpu/kernel.py {op}".encode()
    return ('custom_call @tpu_custom_call {backend_config = "{\\22custom_call_config\\22: '
            '{\\22body\\22: \\22' + base64.b64encode(body).decode() + '\\22}}"}')

  here = dry_run._portable(lowered(os.path.dirname(os.path.dirname(jax.__file__))))
  assert base64.b64encode(b"MLIR").decode() not in here  # the body was replaced
  monkeypatch.setattr(jax, "__file__", "/elsewhere/site-packages/jax/__init__.py")
  assert dry_run._portable(lowered("/elsewhere/site-packages")) == here
  assert dry_run._portable(lowered("/elsewhere/site-packages", op="exp")) != here
