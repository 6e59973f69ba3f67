"""Test-wide setup: 8 simulated CPU devices, set before JAX is first imported.

Every test sees 8 CPU devices, so sharded code paths (mesh 2x2x2) are exercised
by the same suite that runs single-device code (which uses device 0).
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()
# Transformers must never reach the network from a test.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
