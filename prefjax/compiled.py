"""Reading a compiled program's text (`jit(f).lower(...).compile().as_text()`): which while
loop carries an array of a given shape, and which collectives run inside it.

Memory and traffic of a program are properties of what the compiler made of it, not of the
Python that traced it; benchmarks and tests read them here, from the optimized HLO.
"""

from __future__ import annotations

import math
import re

BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "pred": 1, "s8": 1, "u8": 1,
         "f64": 8, "s64": 8, "u64": 8}
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
_COMPUTATION = re.compile(r"^(?:ENTRY )?(%[\w.\-]+) ", re.M)
_CALLED = re.compile(r"(?:body|condition|calls|to_apply)=(%[\w.\-]+)"
                     r"|branch_computations=\{([^}]*)\}")
# an op with one array result (XLA CPU's collectives, and those inside the TPU compiler's async
# collective fusions); the tuple results of `*-start` ops are not counted
_RESULT = re.compile(r"=\s+(\w+)\[([\d,]*)\][^ ]*\s+(" + "|".join(COLLECTIVES) + r")\(")


def computations(hlo: str) -> dict[str, str]:
    """Every computation's text, by name (`%region_3.12`, ...)."""
    starts = [(m.group(1), m.start()) for m in _COMPUTATION.finditer(hlo)]
    ends = [s for _, s in starts[1:]] + [len(hlo)]
    return {name: hlo[s:e] for (name, s), e in zip(starts, ends)}


def whiles(hlo: str) -> dict[str, str]:
    """{body computation's name: the type of what that `while` carries} for every `while`."""
    found = {}
    for line in hlo.splitlines():
        body = re.search(r"body=(%[\w.\-]+)", line) if " while(" in line else None
        if body:
            found[body.group(1)] = line.split(" while(")[0]
    return found


def loop_carrying(hlo: str, shape: str) -> str:
    """The body computation's name of the outermost `while` among those whose carried tuple
    holds the most arrays matching `shape` (a regex over `dtype[dims]`, e.g.
    r"\\w+\\[32,2,767,64\\]"): the loop that holds the others (a decode loop, not the layer
    scan or refill loop inside it), i.e. the one whose body reaches the most computations."""
    counts = {body: len(re.findall(shape, carried)) for body, carried in whiles(hlo).items()}
    most = max(counts.values(), default=0)
    if not most:
        raise ValueError(f"no while loop of the program carries an array like {shape}")
    comps = computations(hlo)
    return max((b for b, n in counts.items() if n == most),
               key=lambda b: len(reachable(comps, b)))


def reachable(comps: dict[str, str], root: str) -> list[str]:
    """`root` and every computation it calls, directly or not (each once)."""
    seen, todo = [], [root]
    while todo:
        name = todo.pop()
        if name in seen or name not in comps:
            continue
        seen.append(name)
        for single, several in _CALLED.findall(comps[name]):
            todo.extend([single] if single else re.findall(r"%[\w.\-]+", several))
    return seen


def collectives(hlo: str, root: str) -> dict[str, dict[str, int]]:
    """{kind: {"ops": n, "bytes": result bytes}} of the collectives in `root` and what it
    calls. A computation called several times (a scanned layer's body) is counted once."""
    comps = computations(hlo)
    out = {k: {"ops": 0, "bytes": 0} for k in COLLECTIVES}
    for name in reachable(comps, root):
        for dtype, dims, kind in _RESULT.findall(comps[name]):
            out[kind]["ops"] += 1
            out[kind]["bytes"] += BYTES.get(dtype, 4) * math.prod(
                int(d) for d in dims.split(",") if d)
    return out
