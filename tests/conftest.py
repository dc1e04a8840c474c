"""Test-wide settings: 8 simulated CPU devices (set before jax is imported), float32 matmuls,
one persistent XLA compilation cache per test session."""

import os
import shutil
import tempfile
import uuid
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Dozens of tests run the same smoke configs through the CLI in fresh processes, and compiling
# the train step is most of such a run (a 3-step DPO smoke run: 15 s cold, 7.5 s warm). The
# cache lives for one session only (a fresh directory; xdist workers inherit the controller's
# environment, so they and the processes they launch share it) and never outlives it. A
# positive size limit turns on the cache's file lock, so concurrent writers and readers never
# see half-written entries. Tests that measure peak memory turn it off in their subprocesses.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _CACHE = Path(tempfile.gettempdir()) / f"prefjax-test-xla-cache-{uuid.uuid4().hex[:12]}"
    os.environ["JAX_COMPILATION_CACHE_DIR"] = str(_CACHE)
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
    os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(16 << 30))
else:
    _CACHE = None

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def pytest_sessionfinish(session):
    # only the process that made the cache removes it (the xdist controller, after its workers)
    if _CACHE is not None and "PYTEST_XDIST_WORKER" not in os.environ:
        shutil.rmtree(_CACHE, ignore_errors=True)
