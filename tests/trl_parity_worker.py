"""HF TRL's DPOTrainer on an HF folder and a pairs jsonl: every step's loss and metrics as JSON.

Runs in TRL's own environment (benchmarks/.venv-trl, `make bench-trl-env`), never in prefjax's;
tests/test_trl_parity.py starts it and runs prefjax's CLI on the same folder and jsonl:

    benchmarks/.venv-trl/bin/python tests/trl_parity_worker.py SPEC.json OUT.json

SPEC: {"model": folder, "data": jsonl, "runs": {name: {"loss_type", "beta", "lr", "steps",
"pairs", "optim"}}}; each run starts from the folder's weights. OUT: {name: {"loss": [...],
"grad_norm": [...], "rewards/margins": [...], "logps/chosen": [...], "logps/rejected": [...]},
"versions": {...}}, one entry per optimizer step. The loss is the value `compute_loss` returned
(float32, before the Trainer rounds it for its log); the metrics are TRL's own log of the step.

Setup, as configs/trl_parity.py describes: float32 policy and a live float32 reference loaded
from the folder, `per_device_train_batch_size` = every pair, constant learning rate without
warmup, no weight decay, clipping at 1, `optim` adamw_torch or sgd (torch.optim.SGD: no
momentum), no truncation (checked: TRL's first batch holds every token of every row).
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

METRICS = ("grad_norm", "rewards/margins", "logps/chosen", "logps/rejected")


def run_one(folder: str, data: str, spec: dict) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    rows = [json.loads(line) for line in Path(data).read_text().splitlines() if line.strip()]
    if len(rows) != spec["pairs"]:
        raise SystemExit(f"{data} has {len(rows)} pairs; the run needs one batch of "
                         f"{spec['pairs']} (every pair every step)")
    losses: list[float] = []
    logged: dict[str, list[float]] = {k: [] for k in METRICS}

    class Recording(DPOTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if model.training:
                losses.append(float((out[0] if return_outputs else out).detach()))
            return out

    class Log(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                for k in METRICS:
                    logged[k].append(float(logs[k]))

    load = lambda: AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)  # noqa: E731
    tok = AutoTokenizer.from_pretrained(folder)
    with tempfile.TemporaryDirectory() as tmp:
        args = DPOConfig(
            output_dir=tmp, per_device_train_batch_size=spec["pairs"], max_steps=spec["steps"],
            learning_rate=spec["lr"], lr_scheduler_type="constant", warmup_steps=0,
            weight_decay=0.0, max_grad_norm=1.0, optim=spec["optim"], beta=spec["beta"],
            loss_type=[spec["loss_type"]], max_length=None, precompute_ref_log_probs=False,
            bf16=False, fp16=False, use_cpu=True, logging_steps=1, save_strategy="no",
            eval_strategy="no", report_to=[], seed=0, dataloader_num_workers=0,
            disable_tqdm=True)
        trainer = Recording(model=load(), ref_model=load().eval(), args=args,
                            processing_class=tok, train_dataset=Dataset.from_list(rows),
                            callbacks=[Log()])
        batch = next(iter(trainer.get_train_dataloader()))
        real = int(batch["attention_mask"].sum())
        want = sum(len(r[k]) for r in trainer.train_dataset for k in ("prompt_ids", "chosen_ids",
                                                                       "rejected_ids"))
        want += sum(len(r["prompt_ids"]) for r in trainer.train_dataset)  # each row's prompt
        if real != want:
            raise SystemExit(f"TRL's batch holds {real} real tokens, the rows {want}: truncated?")
        trainer.train()
    if len(losses) != spec["steps"] or any(len(v) != spec["steps"] for v in logged.values()):
        raise SystemExit(f"expected {spec['steps']} steps, got {len(losses)} losses and "
                         f"{ {k: len(v) for k, v in logged.items()} } logged metrics")
    return {"loss": losses, **logged}


def main() -> None:
    spec_path, out_path = sys.argv[1:3]
    spec = json.loads(Path(spec_path).read_text())
    import torch
    import transformers
    import trl

    torch.set_num_threads(2)
    transformers.logging.set_verbosity_error()
    out = {name: run_one(spec["model"], spec["data"], run) for name, run in spec["runs"].items()}
    out["versions"] = {"trl": trl.__version__, "transformers": transformers.__version__,
                       "torch": torch.__version__}
    Path(out_path).write_text(json.dumps(out))


if __name__ == "__main__":
    main()
