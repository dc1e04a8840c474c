"""The base experiment config that every `configs/*.py` file builds on.

A config is data: every field has a default and a comment, and `lock` makes unknown or ill-typed
overrides (`--config.train.lr=abc`, `--config.trian.lr=1`) fail at start, naming the field.
`parse_arg("smoke,beta=0.2")` turns the `configs/x.py:ARG` suffix into a dict so one config file
can offer variants; `smoke` shrinks any config to a seconds-long CPU run.
"""

from __future__ import annotations

from ml_collections import ConfigDict, FieldReference

from prefjax import losses


def base_config() -> ConfigDict:
    """Defaults shared by all experiments (synthetic task, tiny Llama, DPO)."""
    c = ConfigDict()
    # algo: a prefjax.losses name (sft, reward_bt, dpo, ipo, simpo, orpo, mpo, ...); loss: its
    # hyperparameters, passed to prefjax.losses.get(algo, **loss) (see `set_algo`)
    set_algo(c, "dpo")
    c.seed = 0  # seeds model init, data order and dropout-free training RNG

    c.model = ConfigDict()
    c.model.source = "tiny"  # "tiny" (random init from the fields below) or a local HF folder
    c.model.init_from = ""  # an earlier run's workdir (its export) or an HF folder; "" = source
    c.model.arch = "llama"  # architecture of the "tiny" model: llama | gpt2
    c.model.vocab_size = 0  # 0 = the tokenizer's size
    c.model.hidden_size = 64  # d
    c.model.intermediate_size = 256  # f (MLP width)
    c.model.num_layers = 2
    c.model.num_heads = 4  # h
    c.model.num_kv_heads = 2  # k (grouped-query attention)
    c.model.max_position_embeddings = 128
    c.model.dtype = "float32"  # compute dtype: float32 | bfloat16 (weights stay float32)
    c.model.remat = False  # recompute each block in the backward pass to save activation memory
    # (remat=True is remat_policy="full"; a remat_policy other than "none" wins over it)
    # what each block keeps for the backward: none (everything, no remat) | full (only its input)
    # | nothing_saveable | dots_saveable | dots_with_no_batch_dims_saveable | save_qkv_proj
    c.model.remat_policy = "none"
    c.model.scan_layers = False  # stack the blocks and run them with one lax.scan (compile time
    # independent of depth; parameters get a leading "layers" axis)
    c.model.attention = "xla"  # attention implementation: xla | blockwise | cudnn | splash
    c.model.logps_chunk = 0  # vocabulary chunk of the log-softmax; 0 = no chunking

    c.reference = ConfigDict()
    # precomputed (dataset columns, computed once) | live (frozen model every step) | none
    c.reference.mode = "precomputed"
    c.reference.source = ""  # "" = the initial policy; or an HF folder / an earlier run's workdir
    # frozen models (reference, reward model) kept in: "" (as loaded) | float32 | bfloat16
    c.reference.param_dtype = ""
    # precomputed: cache the log-probs in workdir/ref_logps/<key> (key: reference weights, token
    # ids, truncation/collate settings), so a restart or resume reuses them
    c.reference.cache = True

    c.data = ConfigDict()
    # "synthetic", a local file/folder (json, jsonl, parquet, csv) or a hub name (online only)
    c.data.source = "synthetic"
    # auto | pairwise | hh | conversational | unpaired | completion | prompt_only
    c.data.format = "auto"
    c.data.eval_source = ""  # held-out file; "" = split eval_fraction off the training data
    c.data.eval_fraction = 0.05  # used when eval_source is empty (real data)
    c.data.on_bad_row = "error"  # error (fail fast, naming file/row/field) | skip (count, report)
    c.data.max_length = 64  # prompt + response tokens, the padded sequence length
    c.data.max_prompt_length = 24  # longer prompts keep their end
    c.data.max_response_length = 40  # longer responses are cut
    c.data.over_long = "truncate"  # truncate | drop | error, for rows longer than max_length
    # pack several sequences per row (segment ids, per-sequence positions; attention never
    # crosses sequences): exact, so on by default; applies to offline pairs / sequences on one
    # process without an extra row group (prefjax.data.packing), ignored elsewhere
    c.data.packing = True
    c.data.pack_row_multiple = 1  # packed rows per micro-batch rounded up to this (fewer shapes)
    c.data.num_train = 4096  # synthetic task: training examples generated
    c.data.num_eval = 256  # synthetic task: held-out prompts / pairs
    c.data.labeling = "bt"  # synthetic: bt (Bradley-Terry on r*) | argmax (deterministic)

    c.mpo = ConfigDict()  # MPO's reference-policy samples (the off-policy KL term, loss.alpha)
    c.mpo.ref_samples = "synthetic"  # synthetic (the task's reference generator) | completion file
    c.mpo.num_ref_samples = 4096  # samples drawn / read once before training
    c.mpo.samples_per_batch = 16  # reference-sample rows added to every batch

    c.online = ConfigDict()  # online algorithms (ppo, p3o, online_dpo): rollouts each step
    # oracle (synthetic task's r*) | a reward-model run dir / export | a function
    # `module:function` of (prompt_ids, tokens) -> scores, e.g. prefjax.data.verifiable:exact_match
    c.online.reward = "oracle"
    c.online.max_new_tokens = 8  # response slots per sample
    c.online.temperature = 1.0  # sampling temperature T (TRL's PPO default is 0.7)
    # truncated sampling (TRL's generation top_k / top_p): 0 / 1.0 = off. Only the draw is
    # truncated; every log-prob (sampler, old policy, reference) stays the full softmax at T
    c.online.top_k = 0
    c.online.top_p = 1.0
    # the rollout engine: KV-cache rows decoded at once; 0 = every sampled row at once, N =
    # continuous batching over N rows (a finished row takes the next sample of the queue), which
    # bounds the cache at N rows and changes no sample. prefill_buckets: with N > 0, a refill
    # prefills only the last p / 2^i prompt columns that hold the prompt (one program per bucket)
    c.online.cache_rows = 0
    c.online.prefill_buckets = 1
    # gather the parameters over mesh.fsdp once per rollout instead of every layer's weights at
    # every decode step (each device then holds the whole model for the rollout; see
    # prefjax.sampling.Sampler's gather_params)
    c.online.gather_params = False
    # score policy, old-policy and reference log-probs at T, i.e. from logits / T, the
    # distribution the samples came from (TRL's PPO/GRPO/RLOO); False = at T = 1 (TRL's online
    # DPO; prefjax before this field). Only matters when temperature != 1.
    c.online.logps_at_temperature = True
    c.online.epochs = 4  # optimizer passes over each rollout batch
    # updates per pass; each pass draws a fresh permutation of the rollout's rows (pairs stay
    # together) and cuts it into this many minibatches, as TRL does
    c.online.minibatches = 1
    # THE KL coefficient of every online algorithm: PPO's per-token penalty in the shaped reward,
    # P3O's KL term (its `loss.kl_coef` is an alias of this field, kept for old commands)
    c.online.kl_coef = 0.05
    c.online.kl_estimator = "k1"  # k1 | k2 | k3: PPO's per-token KL penalty and objective/kl
    # adaptive KL controller (Ziegler et al. 2019; PPO only): 0 = fixed kl_coef (TRL's PPO
    # today); > 0 = the target per-sequence KL; kl_coef is then the initial value (old TRL:
    # adap_kl_ctrl with target 6, horizon 10000, init 0.2)
    c.online.kl_target = 0.0
    c.online.kl_horizon = 10000.0  # controller horizon, in sampled sequences
    # PPO's value model: shared (a random scalar head on the policy's trunk; prefjax's default)
    # | reward (a separate trunk + head initialised from the online.reward reward model, as
    # InstructGPT and TRL do; twice the trained parameters)
    c.online.value_model = "shared"
    c.online.gamma = 1.0  # PPO GAE discount
    c.online.lam = 0.95  # PPO GAE lambda
    c.online.whiten_rewards = False  # PPO: rescale shaped rewards to unit variance
    c.online.missing_eos_penalty = 0.0  # subtracted from the score of a response without EOS
    # group algorithms (record samples_per_prompt None: grpo, rloo, reinforce_pp): k samples per
    # prompt, rows sample-major (row i*B + j is sample i of prompt j)
    c.online.num_generations = 4
    c.online.scale_rewards = "group"  # GRPO advantages / std over: group | batch | none (Dr. GRPO)
    c.online.dynamic_sampling = False  # DAPO: groups whose rewards are all equal train nothing
    c.online.kl_level = "sequence"  # RLOO / REINFORCE++: KL in the reward per sequence | token
    c.online.normalize_advantages = False  # RLOO: whiten the advantages over the batch

    c.eval = ConfigDict()  # sampled evaluation (reward and KL(pi || ref)) on held-out prompts
    c.eval.sample = False  # offline trainers: also sample (synthetic task's r*); online: always
    c.eval.num_prompts = 128  # held-out prompts (whole batches of train.batch_size)

    c.train = ConfigDict()
    c.train.batch_size = 32  # pairs (sequences for SFT) per optimizer step, global over hosts
    c.train.grad_accum = 1  # micro-batches per step (lax.scan); exact: the whole batch's loss
    c.train.num_steps = 200
    c.train.lr = 5e-4
    c.train.warmup_steps = 10  # linear warmup from 0
    c.train.schedule = "constant"  # constant | cosine (after warmup)
    c.train.optimizer = "adamw"  # adamw | rmsprop | sgd
    c.train.weight_decay = 0.0  # AdamW only (decoupled; TRL/HF default 0 too)
    # which parameters AdamW decays: hf (HF Trainer: not biases or LayerNorm/RMSNorm weights;
    # embeddings are decayed) | all (every parameter, optax.adamw's own default)
    c.train.weight_decay_mask = "hf"
    c.train.b1 = 0.9  # AdamW only
    c.train.b2 = 0.999  # AdamW only
    c.train.momentum = 0.0  # sgd only: heavy-ball momentum (0 = plain SGD, as torch and optax)
    c.train.moment_dtype = "float32"  # AdamW moments: float32 | bfloat16 (half the memory)
    c.train.max_grad_norm = 1.0  # 0 = no clipping
    c.train.log_every = 10
    c.train.eval_every = 50  # 0 = only at the end
    c.train.save_every = 50
    c.train.keep_checkpoints = 2
    c.train.best_metric = ""  # e.g. "eval/loss": also keep the best checkpoint by it
    # GB of arrays Orbax writes (and restores) at once per process: bounds the host memory a
    # save adds (Orbax's default, 96, copies the whole state at once)
    c.train.checkpoint_write_gb = 1
    c.train.export_hf = True  # write the final policy as an HF folder (save_hf) in workdir/export
    # peak FLOP/s of the whole mesh for the logged perf/mfu: 0 = the TPU chip table (plan.CHIPS)
    # times the devices, else one measured matmul; < 0 = no MFU
    c.train.peak_flops = 0.0

    c.lora = ConfigDict()  # LoRA adapters (prefjax.models.lora); the base stays frozen
    c.lora.rank = 0  # 0 = off (full fine-tuning); r > 0: adapters A [in, r], B [r, out]
    c.lora.alpha = 16.0  # the adapters' delta is scaled by alpha / r
    c.lora.rslora = False  # scale by alpha / sqrt(r) instead (rank-stabilized LoRA)
    # projections with adapters, comma-separated: llama q,k,v,o,gate,up,down; gpt2
    # q,k,v,o,fc,proj; or all
    c.lora.targets = "all"
    c.lora.export_adapter = True  # also write workdir/export_adapter, a PEFT adapter folder

    c.mesh = ConfigDict()
    c.mesh.data = -1  # -1 = all devices not used by the other axes
    c.mesh.fsdp = 1  # parameters and optimizer state sharded over this axis
    c.mesh.tensor = 1  # attention heads / MLP / vocabulary split over this axis
    c.mesh.strategy = "auto"  # auto (rules follow the mesh) | dp | fsdp | tp | fsdp_tp
    return c


def set_algo(c: ConfigDict, algo: str, **loss) -> ConfigDict:
    """Point `c` at loss `algo`: `c.loss` becomes its full hyperparameter set (defaults updated
    by `loss`), so every hyperparameter is a typed, overridable field."""
    c.algo = algo
    hp = losses.defaults(algo)
    unknown = sorted(set(loss) - set(hp))
    if unknown:
        raise ValueError(f"loss {algo!r} has no hyperparameters {unknown}; it has {sorted(hp)}")
    hp.update(loss)
    # A None default becomes a typed placeholder, so `--config.loss.loss_weights='(1.0, 0.5)'`
    # can set it on a locked config; a list of loss types is a comma-separated string
    # (`--config.loss.loss_type=sigmoid,sft`), which `losses.get` splits.
    types = losses.hyperparameter_types(algo)
    c.loss = ConfigDict({k: FieldReference(None, field_type=types[k]) if v is None else
                         ",".join(v) if isinstance(v, list | tuple) and k == "loss_type" else v
                         for k, v in hp.items()})
    if "kl_coef" in hp and "online" in c:
        # one KL coefficient for every online algorithm: loss.kl_coef (P3O) becomes a reference
        # to online.kl_coef, so setting either name sets both and neither is silently ignored
        c.online.kl_coef = float(hp["kl_coef"]) if "kl_coef" in loss else c.online.kl_coef
        c.loss.kl_coef = c.online.get_ref("kl_coef")
    return c


def parse_arg(arg: str | None, **defaults) -> ConfigDict:
    """Parse `"smoke,beta=0.2,name=x"` over `defaults` (bare words become True; values take the
    type of their default)."""
    out = ConfigDict(dict(defaults))
    for part in filter(None, (arg or "").split(",")):
        key, eq, value = part.partition("=")
        key = key.strip()
        if key not in defaults:  # a typo must not silently run the default experiment
            raise ValueError(f"unknown config argument {key!r} in {arg!r}; this config takes "
                             f"{sorted(defaults)}")
        if not eq:
            out[key] = True
            continue
        default = defaults.get(key)
        if isinstance(default, bool):
            out[key] = value.lower() in ("1", "true", "yes")
        elif default is not None:
            out[key] = type(default)(value)
        else:
            out[key] = value
    return out


def apply_smoke(c: ConfigDict) -> ConfigDict:
    """Shrink any config to a seconds-long CPU run (same code paths, tiny sizes)."""
    c.model.hidden_size = min(c.model.hidden_size, 32)
    c.model.intermediate_size = min(c.model.intermediate_size, 64)
    c.model.num_layers = 1
    c.data.num_train = min(c.data.num_train, 256)
    c.data.num_eval = min(c.data.num_eval, 32)
    c.mpo.num_ref_samples = min(c.mpo.num_ref_samples, 64)
    c.mpo.samples_per_batch = min(c.mpo.samples_per_batch, 4)
    c.online.epochs = min(c.online.epochs, 2)
    c.eval.num_prompts = min(c.eval.num_prompts, 16)
    c.train.batch_size = min(c.train.batch_size, 8)
    c.train.num_steps = min(c.train.num_steps, 6)
    c.train.warmup_steps = min(c.train.warmup_steps, 2)
    c.train.log_every = 2
    c.train.eval_every = 3
    c.train.save_every = 3
    return c


def lock(c: ConfigDict) -> ConfigDict:
    """Freeze the field set and types so overrides with unknown names or bad types fail loudly."""
    c.lock()
    return c
