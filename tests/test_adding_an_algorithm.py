"""docs/adding_an_algorithm.md stays true: its loss file, registration and config, extracted
from the page, train on the synthetic task in :smoke size through `prefjax.main.run`."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "adding_an_algorithm.md"


def blocks() -> dict[str, str]:
    """`{file header: code}` of the page's python blocks that start with `# file: ...`."""
    out = {}
    for code in re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S):
        first, _, rest = code.partition("\n")
        if first.startswith("# file: "):
            out[first[len("# file: "):].split(" ")[0]] = rest
    return out


def test_the_worked_example_trains_from_a_config(tmp_path, monkeypatch):
    from prefjax import losses
    from prefjax.config import lock
    from prefjax.losses import records
    from prefjax.main import run
    from prefjax.metrics import read_metrics

    code = blocks()
    assert set(code) == {"prefjax/losses/slic.py", "registration", "configs/slic_synthetic.py"}
    module = types.ModuleType("prefjax.losses.slic")
    module.__file__ = str(tmp_path / "slic.py")
    exec(compile(code["prefjax/losses/slic.py"], module.__file__, "exec"), module.__dict__)
    monkeypatch.setitem(sys.modules, "prefjax.losses.slic", module)
    # the registration adds one entry to each registry: undone after the test
    monkeypatch.setattr(losses, "_REGISTRY", dict(losses._REGISTRY))
    monkeypatch.setattr(records, "RECORDS", dict(records.RECORDS))
    exec(code["registration"], {})
    config: dict = {}
    exec(code["configs/slic_synthetic.py"], config)

    c = lock(config["get_config"]("smoke"))
    assert c.algo == "slic" and c.loss.delta == 1.0
    final = run(c, str(tmp_path / "run"))
    recs = read_metrics(tmp_path / "run")
    assert recs[-1]["step"] == c.train.num_steps
    assert all(np.isfinite(r["slic/hinge"]) for r in recs)
    assert np.isfinite(final["loss"]) and "slic/nll" in final
    assert (tmp_path / "run" / "export" / "config.json").exists()
