"""The source of a record's extra row group (reference-policy samples) as a tokenized dataset.

`config[section].ref_samples`: generate (sampled once from the reference on the training
prompts, stored in `workdir/ref_samples` so a resumed run reuses them), synthetic (the synthetic
task's reference-policy generator), or a completion-format file.
"""

from __future__ import annotations

import logging

import jax
import numpy as np
from flax import nnx
from ml_collections import ConfigDict

from prefjax import parallel
from prefjax.losses.records import Algorithm
from prefjax.paths import as_path
from prefjax.train import build

log = logging.getLogger(__name__)


def extra_rows_dataset(c: ConfigDict, rec: Algorithm, tokenizer, train_ds, reference, workdir: str,
                       *, mesh=None):
    """The tokenized extra rows; `reference` is a module or a zero-argument function making it
    (called only when rows are generated and not already stored)."""
    import datasets

    from prefjax.data import load_preference_data, tokenize_dataset
    from prefjax.data import synthetic as syn

    section, d = c[rec.extra_rows.section], c.data
    where = f"{rec.extra_rows.section}.ref_samples"
    if section.ref_samples == "generate":
        path = as_path(workdir) / "ref_samples"
        if (path / "dataset_info.json").exists():
            return datasets.load_from_disk(str(path))
        model = reference() if callable(reference) and not isinstance(reference, nnx.Module) \
            else reference
        ds = generate_samples(model, train_ds, num=section.num_ref_samples,
                              batch_size=c.train.batch_size, seed=c.seed,
                              max_new_tokens=min(d.max_response_length,
                                                 d.max_length - d.max_prompt_length),
                              tokenizer=tokenizer, prompt_len=d.max_prompt_length, mesh=mesh,
                              eos_id=build.eos_ids(tokenizer, build.init_source(c)))
        if parallel.is_main_process():
            ds.save_to_disk(str(path))  # written whole, then visible (datasets writes a tmp dir)
        return ds
    if section.ref_samples == "synthetic":
        ds = syn.make_sft_dataset(section.num_ref_samples, c.seed + 20_000)
    elif section.ref_samples:
        ds = load_preference_data(section.ref_samples, format="completion",
                                  on_bad_row=d.on_bad_row)
    else:
        raise ValueError(f"algo {rec.name!r} with these loss settings needs extra rows: set "
                         f"{where} to generate | synthetic | a completion-format file")
    ds, _ = tokenize_dataset(ds, tokenizer, max_length=d.max_length,
                             max_prompt_length=d.max_prompt_length,
                             max_response_length=d.max_response_length, over_long=d.over_long)
    return ds


def generate_samples(model: nnx.Module, prompts_ds, *, num: int, batch_size: int, seed: int,
                     max_new_tokens: int, tokenizer, prompt_len: int, mesh=None,
                     eos_id: int | tuple[int, ...] | None = None):
    """`num` rows {prompt_ids, completion_ids}: one temperature-1 sample from `model` per
    prompt of `prompts_ds` (its `prompt_ids` column, cycled in a seeded order); a response
    ends at any of `eos_id` (default: the tokenizer's EOS).

    With several processes each samples its share of every prompt batch and the shares are
    joined on the mesh (`parallel.global_batch`); every process ends with the same rows."""
    import datasets

    from prefjax.data import collate_prompts
    from prefjax.sampling import sample

    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id if eos_id is None else eos_id
    order = np.random.default_rng([seed, 3]).permutation(len(prompts_ds))
    order = np.resize(order, -(-num // batch_size) * batch_size)
    key = jax.random.key(seed + 3)
    pi, pc = parallel.process_index(), parallel.process_count()
    rows: dict[str, list] = {"prompt_ids": [], "completion_ids": []}
    for i in range(0, len(order), batch_size):
        picked = prompts_ds.select([int(j) for j in order[i:i + batch_size]])["prompt_ids"]
        mine = np.array_split(np.arange(len(picked)), pc)[pi]
        batch = collate_prompts([{"prompt_ids": picked[int(j)]} for j in mine], pad_id=pad,
                                seq_len=prompt_len)
        if mesh is not None:
            batch = parallel.global_batch(batch, mesh)
        s = sample(model, batch["input_ids"], batch["attention_mask"],
                   jax.random.fold_in(key, i), max_new_tokens=max_new_tokens, eos_id=eos,
                   pad_id=pad, mesh=mesh)
        tokens, lengths = parallel.host_values(s.tokens), parallel.host_values(s.lengths)
        for p, t, n in zip(picked, tokens, lengths):
            rows["prompt_ids"].append(list(p))
            rows["completion_ids"].append(t[:n].tolist())
    log.info("sampled %d reference responses (mean length %.1f)", num,
             np.mean([len(r) for r in rows["completion_ids"][:num]]))
    return datasets.Dataset.from_dict({k: v[:num] for k, v in rows.items()})
