"""The learner: configs, optimizer, train state and shardings, the RL update, SFT, whole-run loops and checkpoints.

    config       OptimConfig, UpdateConfig (validated on construction), check_update_batch
    optim        make_optimizer (clip, then AdamW with an actor and a critic learning rate), learning_rate_schedule
    state        TrainState, StateSpec (the compile-cache key), init_train_state / init_sft_state, shardings
    update       make_update(...) -> update(state, batch): critic values, credit, epochs x minibatches
    sft          sft_loss, make_sft_update, make_sft_iteration, make_sft_run (the one SFT warm-start driver)
    loop         make_train_iteration, make_train, make_evaluate, make_host_train_iteration, rollout_metrics
    checkpoint   orbax checkpoints with exact resume

`from stepjax import train; train.make_train(...)` reaches everything public.
"""

from stepjax.train.checkpoint import (abstract_state, checkpoint_metadata, make_checkpoint_manager,
                                      restore_checkpoint, save_checkpoint)
from stepjax.train.config import SCHEDULES, LossSide, OptimConfig, UpdateConfig, check_update_batch
from stepjax.train.loop import (check_env_rollout, make_evaluate, make_host_train_iteration, make_train,
                                make_train_iteration, rollout_metrics, task_pool_keys)
from stepjax.train.optim import ACTOR, CRITIC, learning_rate_schedule, make_optimizer, param_labels
from stepjax.train.sft import make_sft_iteration, make_sft_run, make_sft_update, sft_loss
from stepjax.train.state import (StateSpec, TrainState, init_sft_state, init_state, init_train_state, policy_trunk,
                                 state_shardings, train_state_shardings)
from stepjax.train.update import CRITIC_READOUT, check_halt, make_update
