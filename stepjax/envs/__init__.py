"""Environments: pure-JAX token environments (reset/step inside jit; they subclass `base.Environment` and write
`step_env`, the base's `step` adds the step budget and the no-op after the end) and host (Python) environments."""
