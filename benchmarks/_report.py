"""What every benchmark JSON shares: the machine description and the atomic-enough write."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import jax


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (platform.processor() is often empty)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def machine(**extra) -> dict:
    """Platform, CPU, JAX backend and devices, plus `extra` facts a benchmark adds."""
    return dict(platform=platform.platform(), cpu_model=cpu_model(), cpu_count=os.cpu_count(),
                backend=jax.default_backend(), devices=[str(d) for d in jax.devices()[:1]],
                device_count=jax.device_count(), jax=jax.__version__, **extra)


def write(result: dict, out: str | os.PathLike) -> Path:
    """`result` as indented JSON at `out` (parents created); prints where it went."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return out
