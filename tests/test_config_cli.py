"""Loss hyperparameters that TRL writes as lists or leaves as None are settable from the CLI."""

import json
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import ConfigDict

from prefjax import losses
from tests.losses import reference_np as ref_np
from tests.losses.test_dpo import out_of, pair_data

# absl registers the `--config.x` override flags only inside app.run: parse in a subprocess
# exactly as prefjax.main does (same flag definition, lock_config=True)
_PARSE = """
import json
from absl import app
from ml_collections import config_flags
C = config_flags.DEFINE_config_file("config", None, "", lock_config=True)
app.run(lambda argv: print(json.dumps({"algo": C.value.algo, "loss": C.value.loss.to_dict()})))
"""


def parse(*overrides):
    p = subprocess.run([sys.executable, "-c", _PARSE, "--config=configs/dpo_synthetic.py",
                        *overrides], capture_output=True, text=True, timeout=120)
    if p.returncode:
        raise ValueError(p.stderr[-2000:])
    d = json.loads(p.stdout.strip().splitlines()[-1])
    loss = d["loss"]
    if isinstance(loss.get("loss_weights"), list):  # JSON has no tuples
        loss["loss_weights"] = tuple(loss["loss_weights"])
    return ConfigDict({"algo": d["algo"], "loss": ConfigDict(loss)})


def test_loss_type_list_and_loss_weights_from_the_command_line():
    c = parse("--config.loss.loss_type=sigmoid,sft", "--config.loss.loss_weights=(1.0, 0.5)")
    assert c.loss.loss_type == "sigmoid,sft" and c.loss.loss_weights == (1.0, 0.5)
    fn = losses.get(c.algo, **c.loss.to_dict())
    assert fn.keywords["loss_type"] == ("sigmoid", "sft")
    pi, ref, ln = pair_data(0)
    got = fn(out_of(pi, ln), {"ref_logps": jnp.asarray(ref)})[0]
    beta = c.loss.beta
    want = (ref_np.dpo(pi, ref, ln, beta=beta, loss_type="sigmoid")
            + 0.5 * ref_np.dpo(pi, ref, ln, beta=beta, loss_type="sft"))
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_unset_loss_weights_stay_none_and_wrong_types_fail():
    c = parse()
    assert c.loss.loss_weights is None and c.loss.loss_type == "sigmoid"
    assert losses.get(c.algo, **c.loss.to_dict()).keywords["loss_weights"] is None
    for value in ("abc", "(1.0, 2.0)"):  # not numbers; two weights for one loss type
        bad = parse(f"--config.loss.loss_weights={value}")
        with pytest.raises(ValueError, match="hyperparameter loss_weights=.* is invalid"):
            losses.get(bad.algo, **bad.loss.to_dict())
    with pytest.raises(ValueError, match="loss_type"):
        losses.get("dpo", loss_type="sigmoid,nope")
