"""optax_accel: accelerated-SGD family, Schedule-Free, AdEMAMix, MARS, Adaptive Memory momentum and
MADA as composable optax transformations. See README.md and docs/ (conventions.md, api.md)."""
from optax_accel._common import get_diagnostics
from optax_accel.accelerated import (
    AcceleratedMomentumState,
    accelerated_sgd,
    accsgd,
    agnes,
    canonical_coefficients,
    mass_sgd,
    scale_by_accelerated_momentum,
)
from optax_accel.adaptive_memory import (
    AdaptiveMemoryState,
    adaptive_memory_momentum,
    am_adamw,
    am_sgd,
    scale_by_am_adam,
)
from optax_accel.ademamix import (
    ScaleByAdEMAMixState,
    ScaleBySimplifiedAdEMAMixState,
    ademamix,
    alpha_warmup_schedule,
    beta_warmup_schedule,
    scale_by_ademamix,
    scale_by_simplified_ademamix,
    simplified_ademamix,
)
from optax_accel.hypergradient import (
    HypergradientState,
    WithHypergradients,
    hypergradient_wrapper,
    per_name,
    per_name_sgd,
)
from optax_accel.mada import (
    MADA_DOMAIN,
    MADA_HYPER_LR,
    ScaleByMadaState,
    avgrad,
    frozen,
    hyperadam,
    mada,
    mada_hypergradients,
    mada_optimizer,
    scale_by_avgrad,
    scale_by_mada,
)
from optax_accel.mars import (
    ScaleByMarsState,
    lion,
    mars_adamw,
    mars_lion,
    scale_by_lion,
    scale_by_mars,
)
from optax_accel.registry import (
    OptimizerSpec,
    get_optimizer,
    get_spec,
    list_optimizers,
    register,
    state_dtype_argument,
)
from optax_accel.schedule_free import (
    ScheduleFreeState,
    is_schedule_free,
    schedule_free_adamw,
    schedule_free_ademamix,
    schedule_free_eval_params,
    schedule_free_sgd,
    schedule_free_wrapper,
)

__version__ = "0.1.0"
