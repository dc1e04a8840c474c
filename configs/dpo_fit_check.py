"""DPO with a live reference at real shapes, for the TPU fit-check (no weights needed).

    python -m prefjax.plan --config=configs/dpo_fit_check.py:shape=qwen2_5_0_5b --topology=v5e:2x2
    python -m prefjax.plan --config=configs/dpo_fit_check.py:shape=llama3_8b --topology=v5e:4x8
    python -m prefjax.plan --config=configs/dpo_fit_check.py:shape=llama3_70b --topology=v5p:4x4x4

`shape` names a config.json under configs/shapes/ (Qwen2.5-0.5B, Llama-3-8B, Llama-3-70B
shapes); 64 pairs of 2048 tokens per step, bf16 compute, remat, chunked log-softmax, FSDP over
every chip. The per-device figures these commands gave are in docs/fit_check.md. To train for
real, point `model.source` at a checkpoint folder with the same config.json and set the data
fields. `:smoke` swaps in the tiny synthetic model so the config also runs in seconds on CPU.
"""

from pathlib import Path

from prefjax.config import apply_smoke, base_config, parse_arg, set_algo

SHAPES = Path(__file__).resolve().parent / "shapes"


def get_config(arg=None):
    a = parse_arg(arg, smoke=False, shape="llama3_8b", beta=0.1)
    c = base_config()
    set_algo(c, "dpo", beta=a.beta)
    shape = SHAPES / f"{a.shape}.json"
    if not shape.is_file():
        known = sorted(p.stem for p in SHAPES.glob("*.json"))
        raise ValueError(f"configs/dpo_fit_check.py: unknown shape {a.shape!r}; known: {known}")
    c.model.source = str(shape)  # a config.json: enough for the fit-check, not for training
    c.model.dtype = "bfloat16"
    c.model.remat = True
    c.model.logps_chunk = 8192  # never materialize float32 [b, t, vocab] logits
    c.reference.mode = "live"
    c.data.source = "/path/to/pairs.jsonl"
    c.data.max_length = 2048
    c.data.max_prompt_length = 1024
    c.data.max_response_length = 1024
    c.train.batch_size = 64
    c.train.lr = 5e-7
    c.train.warmup_steps = 150
    c.train.num_steps = 2000
    c.mesh.data = 1
    c.mesh.fsdp = -1  # parameters, optimizer state and batch rows over every chip
    if a.smoke:
        apply_smoke(c)
        c.model.source, c.data.source = "tiny", "synthetic"
        c.model.dtype, c.model.logps_chunk = "float32", 0
        c.data.max_length, c.data.max_prompt_length, c.data.max_response_length = 64, 24, 40
    return c
