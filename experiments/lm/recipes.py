"""The papers' language-model runs as training presets, with their provenance and deviations.

Each :class:`Recipe` is a preset of :mod:`experiments.lm.config` (``--config NAME`` in
``experiments.lm.train``, ``--preset NAME`` in ``experiments.lm.compare``), a one-line
source, every deliberate or unavoidable difference from that source, the reference parameter
count and the token count. ``COMPARISONS`` names the compare presets that run them; their dry
runs (``compare --dry-run``) are committed in results/scale/recipes/. docs/reproductions.md gives
the commands from an empty machine, and the expected time.
"""
from __future__ import annotations

import dataclasses

MADA_OWT_HYPER_LR = {"b1": 1e-4, "b2": 1e-4, "b3": 0.02, "rho": 0.02, "c": 0.02, "gamma": 0.02}


@dataclasses.dataclass(frozen=True)
class Recipe:
  config: dict  # the preset's overrides of config.DEFAULTS
  source: str  # one line: paper, table, official code
  deviations: tuple[str, ...]  # every known difference from the source
  params: tuple[float, str]  # the reference parameter count and where it comes from
  tokens: str  # the training tokens, as the source states them


# The compare presets that run the recipes (experiments.lm.compare); their dry runs on a v5e-16
# (v5e:4x4) are committed in results/scale/recipes/ and checked by the tests.
COMPARISONS = ("mada-gpt2-owt", "mada-shakespeare-char", "am-llama-60m-c4", "am-llama-100m-c4",
               "accel-150m-c4")


_NANOGPT_DEVIATIONS = (
    "GELU in its tanh form (jax.nn.gelu); nanoGPT uses the exact erf form",
    "position embeddings initialised N(0, 0.01^2) (GPT-2's); nanoGPT draws them N(0, 0.02^2)",
    "random windows drawn by NumPy's generator from (seed, step): the same distribution as "
    "nanoGPT's torch.randint, not the same windows",
)

RECIPES = {
    "mada-gpt2-owt": Recipe(
        config={
            "model": "gpt2-124m", "model.bias": False, "model.vocab_size": 50304,
            "model.compute_dtype": "float32", "data.tokenizer": "gpt2", "data.sampling": "windows",
            "train.steps": 100_000, "train.batch_size": 480, "train.seq_len": 1024,
            "train.seed": 5000, "train.grad_accum": "auto", "train.device_batch": 6,
            "mesh.fsdp": -1, "optim.name": "adamw", "optim.lr": 6e-4, "optim.warmup": 2000,
            "optim.min_lr_ratio": 0.025, "optim.weight_decay": 0.1,
            "optim.decay": "matrices+embeddings", "optim.clip": 1.0,
            "optim.kwargs": {"b1": 0.9, "b2": 0.95, "eps": 1e-6},
            "eval.interval": 500, "eval.tokens": 2 ** 24},
        source="Ozkara et al. 2024 (MADA), Table 2 and App. C.2; official code "
               "amazon-science/mada_optimizer_search (train_ddp.py, config/train_gpt2_small.py)",
        deviations=_NANOGPT_DEVIATIONS + (
            "MADA's and HyperAdam's hypergradient: the official code forms it from one "
            "microbatch of the next step, scaled by 1/5 (its per-rank accumulation); ours from the "
            "whole accumulated gradient, with the hyper-learning rates divided by 5 (the closest "
            "analogue: MADA_OWT_HYPER_LR; optim.kwargs.hyper_lr restores the nominal 5e-4 / 0.1)",
            "validation: the whole val split in non-overlapping 1024-token windows, as the code; "
            "the split itself is prepare's (every 2000th document: --val-fraction 0.0005), not "
            "nanoGPT's shuffled train_test_split(seed 2357), so the val documents differ",
            "float32 parameters and matmuls at the platform's default precision (TF32 on "
            "Ampere/Hopper as in the paper; bf16 passes on TPU)",
            "Adan's coefficients are not stated in the paper: optax.adan's defaults (Xie et al.'s "
            "0.98, 0.92, 0.99) with the recipe's eps; Lion at the code's peak rate 1.5e-4 with "
            "optax's betas (0.9, 0.99)",
            "one seed (5000, the code's), as the paper: no noise estimate unless more are run",
        ),
        params=(124.37e6, "nanoGPT GPT-2 small, bias=False, vocabulary 50304 (123.59M without "
                "the position table, as nanoGPT prints it; the paper's '124M')"),
        tokens="100k steps x 480 x 1024 = 49.2B (the paper's '~492B' is a "
                                   "typo)"),
    "mada-shakespeare-char": Recipe(
        config={
            "model": "shakespeare-char", "model.bias": False, "model.dropout": 0.2,
            "model.vocab_size": 65, "model.compute_dtype": "float32", "data.tokenizer": "chars",
            "data.val_fraction": 0.1, "data.sampling": "windows", "train.steps": 5000,
            "train.batch_size": 64, "train.seq_len": 256, "train.seed": 1, "optim.lr": 1e-3,
            "optim.warmup": 100, "optim.min_lr_ratio": 0.1, "optim.weight_decay": 0.1,
            "optim.decay": "matrices+embeddings", "optim.clip": 1.0,
            "optim.kwargs": {"eps": 1e-8}, "eval.interval": 250, "eval.tokens": 2 ** 18,
            "eval.train_batches": 200},
        source="Ozkara et al. 2024 (MADA), Fig. 8 and App. C.2; official code train.py, "
               "config/train_shakespeare_char.py, grid_search.py (nanoGPT's shakespeare_char)",
        deviations=_NANOGPT_DEVIATIONS + (
            "corpus: tiny-shakespeare (karpathy/char-rnn input.txt, 1.1 MB) is not on PyPI: the "
            "user points data.path at it; the recipe's vocabulary of 65 refuses any other text",
            "the vocabulary is padded to 128 rows (masked out of softmax and loss): +24k "
            "parameters, 0.2%",
            "validation loss over the whole val split (nanoGPT: 200 random batches); the grid's "
            "metric, the train-split estimate, is nanoGPT's (200 random batches, no dropout)",
        ),
        params=(10.745e6, "nanoGPT's shakespeare_char model with vocabulary 65, position table "
                "included (nanoGPT prints 10.65M without it; the paper's '~10.7M')"),
        tokens="5000 steps x 64 x 256 = 82M characters (about 82 epochs)"),
}

# Adaptive Memory (Topollai & Choromanska 2025, Table 6): the paper's code is not released; the
# setup is GaLore's template (Zhao et al. 2024, github.com/jiaweizzhao/GaLore), which the paper's
# LLaMA sizes and "1B tokens of C4-en" follow.
_AM_CONFIG = {
    "model.compute_dtype": "bfloat16", "data.sampling": "documents", "train.steps": 7630,
    "train.batch_size": 512, "train.seq_len": 256, "optim.name": "adamw", "optim.lr": 1e-3,
    "optim.warmup": 1000, "optim.min_lr_ratio": 0.1, "optim.weight_decay": 0.0,
    "optim.decay": "none", "optim.clip": 0.0, "model.vocab_size": 32000,
    "eval.interval": 1000, "eval.tokens": 10_000_000, "train.grad_accum": "auto",
    "train.device_batch": 32, "mesh.fsdp": -1}
_AM_DEVIATIONS = (
    "the paper's code is not released: GaLore's LLaMA template is assumed (T5 tokenizer, "
    "documents truncated and padded, cosine to 0.1x, warmup 1000, no clipping, no weight decay)",
    "rows hold seq_len + 1 = 257 tokens (256 predictions) where GaLore's hold 256 (255); a "
    "truncated document ends without its </s>, where T5's tokenizer truncates before adding it",
    "parameters in float32 with bf16 matmuls; GaLore casts the whole model to bf16",
    "the warmup regime of Table 6's numbers is not stated: both are run, the numbers are set "
    "beside the warmup rows",
    "the C4 validation subset is prepare's first eval.tokens tokens (10M, GaLore's amount) of "
    "C4-en's validation split in document order",
)
for _size, _count in (("60m", 58.07e6), ("100m", 99.99e6)):
  RECIPES[f"am-llama-{_size}-c4"] = Recipe(
      config={"model": f"llama-{_size}", **_AM_CONFIG},
      source="Topollai & Choromanska 2025 (Adaptive Memory momentum), Table 6, LLaMA-"
             f"{_size.upper()} on C4-en, 1B tokens; GaLore's LLaMA configs and training loop",
      deviations=_AM_DEVIATIONS,
      params=(_count, f"GaLore's configs/llama_{_size}.json (vocabulary 32000, untied)"),
      tokens="7630 steps x 512 x 256 = 1.0B")

# Morwani et al. 2025: a 150M model at 32k and 1M tokens per step, up to 15B tokens; codebase,
# data, shape and sequence length are not published. The same group's earlier optimizer study
# (Zhao et al., "Deconstructing what makes a good optimizer for language models", 2024) trained on
# C4 with the T5 tokenizer, packed, context 512: that setup is offered at both batch sizes, with an
# equal token budget (3.3B, Chinchilla's 20 tokens per parameter).
_ACCEL_DEVIATIONS = (
    "the paper publishes no codebase, data, shape, sequence length or token counts: C4-en with "
    "the T5 tokenizer, packed windows of 512 (Zhao et al. 2024's setup), a LLaMA shape of 150M "
    "and 3.3B tokens per run are our choices",
    "learning rates are not tuned per optimizer (the paper sweeps half-decade grids): each "
    "optimizer's rate comes from the rule in experiments.lm.compare",
)
for _name, _batch, _steps in (("32k", 64, 100_000), ("1m", 2048, 3125)):
  RECIPES[f"accel-150m-c4-{_name}"] = Recipe(
      config={"model": "llama-150m", "model.compute_dtype": "bfloat16",
              "data.sampling": "packed", "train.steps": _steps, "train.batch_size": _batch,
              "train.seq_len": 512, "optim.lr": 1e-3, "optim.warmup": _steps // 50,
              "optim.min_lr_ratio": 0.1, "optim.weight_decay": 0.1, "optim.clip": 1.0,
              "eval.interval": max(500, _steps // 20), "eval.tokens": 2 ** 23,
              "train.grad_accum": "auto", "train.device_batch": 8, "mesh.fsdp": -1},
      source="Morwani et al. 2025 (accelerated SGD and its disguises), Figs. 1-3: 150M model, "
             f"{_name.upper()} tokens per step; setup of Zhao et al. 2024 (not published)",
      deviations=_ACCEL_DEVIATIONS,
      params=(150e6, "the paper's nominal '150m' (shape not published)"),
      tokens=f"{_steps} steps x {_batch} x 512 = {_steps * _batch * 512 / 1e9:.2f}B")
