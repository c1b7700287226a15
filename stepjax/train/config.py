"""What a learner is configured by: the optimizer (`OptimConfig`) and one update (`UpdateConfig`).

Both are frozen dataclasses, validated on construction (and by `dataclasses.replace`): a bad field is one ValueError
line naming it, before anything compiles. Both are hashable, so compiled programs are cached on them.
"""

from __future__ import annotations

import dataclasses

from stepjax import checks
from stepjax import credit as credit_lib
from stepjax import losses
from stepjax import sharding as sharding_lib
from stepjax.models.value import ValueConfig

SCHEDULES = ("constant", "warmup_constant", "cosine")
STATE_DTYPES = ("float32", None)


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """AdamW with global-norm clipping and one schedule shape for two peak learning rates (actor and critic).

  schedule: "constant"; "warmup_constant" (linear 0 -> lr over warmup_steps, then lr); "cosine" (linear warmup,
    then cosine decay to 0 at total_steps). Steps count optimizer steps (epochs x minibatches per update), and
    a skipped (non-finite) minibatch does not advance them.
  weight_decay: decoupled, applied to matrices only (kernels, embeddings; not norms, biases or the value head).
  max_grad_norm: clip the global norm of all gradients (actor and critic together); None disables clipping.
  state_dtype: "float32": the optimizer computes in float32 and keeps both Adam moments in float32 whatever the
    params' dtype (gradients, clipping and the step are cast up; the step is rounded to the param dtype once, when
    applied); with float32 params it changes nothing. None: the moments and the step follow the params' dtype
    (pure bfloat16 with bfloat16 params: half the optimizer memory, but b2 = 0.999 rounds to 1 in bfloat16, so the
    second moment never decays; `optim` has the arithmetic).
  """

  actor_lr: float = 1e-6
  critic_lr: float = 1e-5
  weight_decay: float = 0.0
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  max_grad_norm: float | None = 1.0
  schedule: str = "constant"
  warmup_steps: int = 0
  total_steps: int | None = None
  state_dtype: str | None = "float32"

  def __post_init__(self):
    self.validate()

  def validate(self) -> "OptimConfig":
    with checks.section("optim"):
      checks.check_number(self.actor_lr, "actor_lr", lambda v: v >= 0, ">= 0")
      checks.check_number(self.critic_lr, "critic_lr", lambda v: v >= 0, ">= 0")
      checks.check_number(self.weight_decay, "weight_decay", lambda v: v >= 0, ">= 0")
      checks.check_number(self.b1, "b1", lambda v: 0 <= v < 1, "in [0, 1)")
      checks.check_number(self.b2, "b2", lambda v: 0 <= v < 1, "in [0, 1)")
      checks.check_number(self.eps, "eps", lambda v: v > 0, "> 0")
      checks.check_number(self.max_grad_norm, "max_grad_norm", lambda v: v > 0, "> 0", optional=True)
      checks.check_choice(self.schedule, "schedule", SCHEDULES)
      checks.check_int(self.warmup_steps, "warmup_steps", 0)
      if self.schedule == "cosine":
        if self.total_steps is None:
          checks.fail("total_steps", "required by schedule 'cosine' (the step where the learning rate reaches 0)")
        checks.check_int(self.total_steps, "total_steps", self.warmup_steps + 1)
      else:
        checks.check_int(self.total_steps, "total_steps", 1, optional=True)
      checks.check_choice(self.state_dtype, "state_dtype", STATE_DTYPES,
                          " (None: the Adam moments follow the params' dtype)")
    return self


@dataclasses.dataclass(frozen=True)
class LossSide:
  """The part of an `UpdateConfig` that shapes the optimization program. The estimator enters only through the level
  it reads the critic at, so a sweep over estimators of one critic level compiles the optimizer loop once."""

  critic: str | None
  policy_loss: losses.PolicyLossConfig
  value: ValueConfig
  value_coef: float
  value_clip: float | None
  kl_coef: float
  kl_kind: str
  entropy_coef: float
  epochs: int
  minibatches: int


@dataclasses.dataclass(frozen=True)
class UpdateConfig:
  """What one `update` optimizes.

  credit: the advantage estimator (`credit.CreditConfig`). policy_loss: `losses.PolicyLossConfig` (its agg_mode
    also aggregates the KL term). value: `ValueConfig`; kind must be "head" or "separate" for an estimator that
    reads a critic (`credit.estimator_spec(name).critic`) and None for the critic-free ones (a value head would get
    no loss).
  value_coef: weight of the value loss (at the estimator's critic level: per step or per action token).
  value_clip: PPO value clipping around the values the advantages were computed with; None disables it.
  kl_coef, kl_kind: KL to the frozen reference policy (`losses.KL_KINDS`); kl_coef = 0 keeps no reference.
  entropy_coef: weight of the entropy bonus (the mean entropy over action tokens is subtracted from the loss).
  epochs x minibatches: optimizer steps per update; minibatches must divide the batch size.
  halt_on_nonfinite: `check_halt` raises when a minibatch was skipped for a non-finite loss or gradient.
  """

  credit: credit_lib.CreditConfig = dataclasses.field(default_factory=credit_lib.CreditConfig)
  policy_loss: losses.PolicyLossConfig = dataclasses.field(default_factory=losses.PolicyLossConfig)
  value: ValueConfig = dataclasses.field(default_factory=ValueConfig)
  value_coef: float = 0.5
  value_clip: float | None = None
  kl_coef: float = 0.0
  kl_kind: str = "low_var_kl"
  entropy_coef: float = 0.0
  epochs: int = 1
  minibatches: int = 1
  halt_on_nonfinite: bool = False

  def __post_init__(self):
    self.validate()

  @property
  def critic(self) -> str | None:
    """"step", "token" or None: the level the estimator reads the critic at."""
    return credit_lib.critic_level(self.credit.estimator)

  @property
  def with_ref(self) -> bool:
    """Whether the update keeps a frozen reference policy (for the KL term)."""
    return self.kl_coef > 0

  def loss_side(self) -> LossSide:
    return LossSide(critic=self.critic, policy_loss=self.policy_loss, value=self.value, value_coef=self.value_coef,
                    value_clip=self.value_clip, kl_coef=self.kl_coef, kl_kind=self.kl_kind,
                    entropy_coef=self.entropy_coef, epochs=self.epochs, minibatches=self.minibatches)

  def validate(self) -> "UpdateConfig":
    with checks.section("update"):
      for name, kind in (("credit", credit_lib.CreditConfig), ("policy_loss", losses.PolicyLossConfig),
                         ("value", ValueConfig)):
        if not isinstance(getattr(self, name), kind):
          checks.fail(name, f"expected a {kind.__name__}, got {type(getattr(self, name)).__name__}")
      for name in ("policy_loss", "value"):
        with checks.section(name):  # their messages name the field inside the sub-config
          getattr(self, name).validate()
      estimator = self.credit.estimator
      if self.critic is not None and self.value.kind is None:
        checks.fail("value.kind", f"estimator {estimator!r} reads a critic; use 'head' or 'separate', not None")
      if self.critic is None and self.value.kind is not None:
        checks.fail("value.kind", f"estimator {estimator!r} reads no critic, so a {self.value.kind!r} critic would "
                    "get no loss; use None")
      checks.check_number(self.value_coef, "value_coef", lambda v: v >= 0, ">= 0")
      checks.check_number(self.value_clip, "value_clip", lambda v: v >= 0, ">= 0", optional=True)
      checks.check_number(self.kl_coef, "kl_coef", lambda v: v >= 0, ">= 0")
      checks.check_choice(self.kl_kind, "kl_kind", losses.KL_KINDS)
      checks.check_number(self.entropy_coef, "entropy_coef")
      checks.check_int(self.epochs, "epochs", 1)
      checks.check_int(self.minibatches, "minibatches", 1)
      checks.check_bool(self.halt_on_nonfinite, "halt_on_nonfinite")
    return self


def check_update_batch(update_config: UpdateConfig, batch_size: int, mesh=None) -> None:
  """Batch-shape checks that need the batch: one clear line before anything compiles."""
  minibatches = update_config.minibatches
  if batch_size % minibatches:
    checks.fail("update.minibatches", f"{minibatches} does not divide the batch size {batch_size}")
  if mesh is not None:
    sharding_lib.check_batch_divisible(batch_size, mesh, "batch_size")
    # Each minibatch is split over the data axes too.
    sharding_lib.check_batch_divisible(batch_size // minibatches, mesh,
                                       f"update.minibatches: the minibatch size (batch {batch_size} / {minibatches})")
