"""stepjax: step-level agentic RL of language-model agents in JAX."""

__version__ = "0.1.0"
