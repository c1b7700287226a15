"""Environments: pure-JAX token environments (reset/step inside jit) and host (Python) environments."""
