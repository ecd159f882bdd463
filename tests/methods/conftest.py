"""Method tests run on CPU with 8 fake devices, like the rest of the suite (set before jax loads)."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
