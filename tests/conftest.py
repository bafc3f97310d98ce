"""Test set-up: 8 fake CPU devices so mesh / sharding tests run on one machine.

This must run before JAX initialises its backends, which is why it lives here.
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
