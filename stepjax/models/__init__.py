"""Models: the decoder-only transformer, value heads / critics, Hugging Face checkpoint import and export."""

from stepjax.models.transformer import (CACHE_AXES, KVCache, ModelConfig, RopeScaling, Transformer, cache_logical_axes,
                                        forward, get_config, init_cache, init_params, param_logical_axes,
                                        stack_layer_params, unstack_layer_params)
from stepjax.models.value import (Critic, PolicyWithValue, ValueConfig, ValueHead, add_value_head, build_models,
                                  init_critic_from_policy, init_models)
from stepjax.models.hf import (SUPPORTED_ARCHITECTURES, config_from_hf, config_to_hf, load_hf_checkpoint,
                               load_hf_config, save_hf_checkpoint)
