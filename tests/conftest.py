"""Every way of running the suite (make test, plain `python -m pytest tests/...`, an IDE) sees 8 fake CPU devices, so
the mesh tests run instead of skipping. This runs before any test module imports jax."""

import os

_FLAG = "--xla_force_host_platform_device_count=8"
# The suite is mostly XLA compilation of small programs: LLVM's cheapest code generation compiles them faster (the
# same HLO and XLA passes; only the machine code is less optimized). Set XLA_FLAGS yourself to test at full level.
_FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG + " " + _FAST_COMPILE).strip()

import jax  # noqa: E402  (after the flag)
import pytest  # noqa: E402


@pytest.fixture
def eight_devices():
  """Mesh tests use this: a failure, not a skip, when the 8 fake devices are missing."""
  assert jax.device_count() == 8, f"expected 8 fake CPU devices (tests/conftest.py), got {jax.device_count()}"
