"""The embedded known-reward task: a 32-token language, a noisy reference policy, and r*(x, y).

Vocabulary (ids fixed): 0 `<pad>`, 1 `<bos>`, 2 `<eos>`, 3 `<unk>`, 4 `user`, 5 `assistant`,
6-8 the operations `copy`, `rev`, `shift`, 9 `=`, 10-31 the symbols `a`..`v`. Text is the words
joined by spaces; `make_tokenizer()` is a real `PreTrainedTokenizerFast` (word level, BOS added
before a prompt, a tiny chat template) that decodes ids back to that text.

Prompt x: `op s_1 .. s_k =` with op uniform over the three operations, k uniform in 2..5, the
symbols uniform with replacement (at most 7 tokens, 8 with BOS). Its target t(x) is the symbols
copied, reversed, or each shifted to the next letter (v wraps to a).

Ground-truth reward of a response y (its tokens up to the first `<eos>` or `<pad>`, length L):
    r*(x, y) = W_MATCH * #{j < min(L, k): y_j = t_j} / k
             - W_LEN * min(|L - k|, k) / k
             + W_EOS * [y stops at <eos>]
so r* lies in [-0.5, 1.25], is graded (credit per correct position), and only the exact target
followed by `<eos>` attains the maximum 1.25. Text responses (as stored in the datasets, where the
pipeline appends EOS) count as stopped. `reward_from_ids` (NumPy, per row) and `reward_jnp`
(batched, jit-able, for online training) implement the same formula independently.

Reference policy (the SFT data): writes each target token correctly with probability 0.7 (copy),
0.55 (rev) or 0.4 (shift), otherwise a uniformly random symbol; its length is k with probability
0.7, k - 1 (last token dropped) with 0.15, k + 1 (a random extra symbol) with 0.15; it always
stops. Its rewards spread widely (mean about 0.75, std 0.32; 14% of samples are optimal), and the
optimum (the exact target, easy for a 2-layer model) has -log pi_ref(t(x) | x) between 1.0 and
4.6 nats (2.4 on average), so the policy must move far from the reference to reach it.

Preference pairs: two reference responses to one prompt (resampled until their texts differ);
`labeling="bt"` prefers the first with probability sigmoid((r1 - r2) / temperature),
`labeling="argmax"` prefers the higher reward (pairs with equal rewards are resampled).
"""

from __future__ import annotations

import datasets
import jax.numpy as jnp
import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from prefjax.data.preference import prepare_preference_data

SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")
OPS = ("copy", "rev", "shift")
SYMBOLS = tuple("abcdefghijklmnopqrstuv")
VOCAB = SPECIALS + ("user", "assistant") + OPS + ("=",) + SYMBOLS
TOKEN_ID = {w: i for i, w in enumerate(VOCAB)}
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
OP0, SYM0, NSYM = TOKEN_ID["copy"], TOKEN_ID["a"], len(SYMBOLS)
W_MATCH, W_LEN, W_EOS = 1.0, 0.5, 0.25
MIN_K, MAX_K = 2, 5
MAX_PROMPT_TOKENS, MAX_RESPONSE_TOKENS = MAX_K + 3, MAX_K + 2  # with BOS / with EOS
ACCURACY = {"copy": 0.7, "rev": 0.55, "shift": 0.4}
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] }} {{ m['content'] }} "
    "{% if m['role'] == 'assistant' %}{{ eos_token }} {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}assistant {% endif %}"
)


def make_tokenizer() -> PreTrainedTokenizerFast:
    """The task's word-level tokenizer (BOS before prompts, chat template for message data)."""
    tok = Tokenizer(models.WordLevel(dict(TOKEN_ID), unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", BOS_ID)])
    out = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
        unk_token="<unk>", model_max_length=64)
    out.chat_template = CHAT_TEMPLATE
    return out


def target(prompt_words: list[str]) -> list[str]:
    """t(x): the response that earns the maximum reward (without its EOS)."""
    op = next((w for w in prompt_words if w in OPS), "copy")
    s = [w for w in prompt_words if w in SYMBOLS]
    if op == "rev":
        return s[::-1]
    if op == "shift":
        return [SYMBOLS[(SYMBOLS.index(w) + 1) % NSYM] for w in s]
    return s


def sample_prompt(rng: np.random.Generator) -> list[str]:
    """One prompt as words: `op s_1 .. s_k =`."""
    k = int(rng.integers(MIN_K, MAX_K + 1))
    return [OPS[rng.integers(len(OPS))], *(SYMBOLS[i] for i in rng.integers(NSYM, size=k)), "="]


def sample_reference(prompt_words: list[str], rng: np.random.Generator) -> list[str]:
    """One response of the reference policy (words, without EOS)."""
    t = target(prompt_words)
    acc = ACCURACY[next((w for w in prompt_words if w in OPS), "copy")]
    out = [w if rng.random() < acc else SYMBOLS[rng.integers(NSYM)] for w in t]
    u = rng.random()
    if u < 0.15 and len(out) > 1:
        out = out[:-1]
    elif u > 0.85:
        out.append(SYMBOLS[rng.integers(NSYM)])
    return out


def reward_from_ids(prompt_ids, response_ids) -> np.ndarray | float:
    """r*(x, y) from token ids: 1-D inputs give a float, 2-D `[b, p]`, `[b, t]` give float64 [b].

    Padding anywhere in the prompt is ignored; the response ends at its first EOS or pad.
    """
    p, y = np.asarray(prompt_ids), np.asarray(response_ids)
    if p.ndim == 2:
        return np.array([_reward_row(a, b) for a, b in zip(p, y)], np.float64)
    return _reward_row(p, y)


def _reward_row(p: np.ndarray, y: np.ndarray) -> float:
    words = [VOCAB[i] if 0 <= i < len(VOCAB) else "<unk>" for i in p.tolist()]
    t = [TOKEN_ID[w] for w in target(words)]
    k = len(t)
    stops = [j for j, v in enumerate(y.tolist()) if v in (EOS_ID, PAD_ID)]
    n = stops[0] if stops else len(y)
    ended = bool(stops) and int(y[n]) == EOS_ID
    hits = sum(int(y[j]) == t[j] for j in range(min(n, k)))
    d = max(k, 1)
    return W_MATCH * hits / d - W_LEN * min(abs(n - k), k) / d + W_EOS * float(ended)


def reward_jnp(prompt_ids, response_ids) -> jnp.ndarray:
    """Batched r*(x, y) in jnp: prompt ids `[b, p]` (any padding), response ids `[b, t]` -> [b]."""
    p = jnp.asarray(prompt_ids, jnp.int32)
    y = jnp.asarray(response_ids, jnp.int32)
    b, t = y.shape
    width = max(p.shape[1], t)
    is_sym = (p >= SYM0) & (p < SYM0 + NSYM)
    k = is_sym.sum(-1)
    # The j-th symbol of each prompt, wherever it sits (one-hot over its rank among symbols).
    rank = jnp.cumsum(is_sym, -1) - 1
    pick = is_sym[:, :, None] & (rank[:, :, None] == jnp.arange(width)[None, None, :])
    s = jnp.sum(jnp.where(pick, p[:, :, None], 0), axis=1)  # [b, width]
    is_op = (p >= OP0) & (p < OP0 + len(OPS))
    op = jnp.where(is_op.any(-1), jnp.take_along_axis(
        p, jnp.argmax(is_op, -1)[:, None], axis=1)[:, 0] - OP0, 0)
    rev = jnp.take_along_axis(
        s, jnp.clip(k[:, None] - 1 - jnp.arange(width)[None, :], 0, width - 1), axis=1)
    shift = (s - SYM0 + 1) % NSYM + SYM0
    tgt = jnp.where(op[:, None] == 1, rev, jnp.where(op[:, None] == 2, shift, s))[:, :t]
    stop = (y == EOS_ID) | (y == PAD_ID)
    n = jnp.where(stop.any(-1), jnp.argmax(stop, -1), t)
    ended = (n < t) & (jnp.take_along_axis(y, jnp.minimum(n, t - 1)[:, None], 1)[:, 0] == EOS_ID)
    scored = jnp.arange(t)[None, :] < jnp.minimum(n, k)[:, None]
    hits = jnp.sum(scored & (y == tgt), -1)
    d = jnp.maximum(k, 1).astype(jnp.float32)
    r = W_MATCH * hits / d - W_LEN * jnp.minimum(jnp.abs(n - k), k) / d + W_EOS * ended
    return r.astype(jnp.float32)


def reward_of_samples(prompt_ids, tokens) -> jnp.ndarray:
    """r* of sampled responses `tokens` [b, n] (a sampler's output: pad after EOS) -> [b].

    A sampled pad id in the middle of a response is an ordinary wrong token here (scored as
    <unk>), not the end of the response as `reward_jnp` would read it; the pads after a row's EOS
    are never reached, and a row without EOS has no pads.
    """
    y = jnp.asarray(tokens, jnp.int32)
    return reward_jnp(prompt_ids, jnp.where(y == PAD_ID, UNK_ID, y))


def reward_from_text(prompt: str, response: str) -> float:
    """r*(x, y) of text as stored in the datasets (the response counts as stopped)."""
    return float(_reward_row(np.asarray(_word_ids(prompt), np.int64),
                             np.asarray(_word_ids(response) + [EOS_ID], np.int64)))


def _word_ids(text: str) -> list[int]:
    return [TOKEN_ID.get(w, UNK_ID) for w in text.split()]


def _text(words: list[str]) -> str:
    return " ".join(words)


def make_prompt_dataset(n: int, seed: int) -> datasets.Dataset:
    """`n` prompts (format prompt_only), for online algorithms and evaluation."""
    rng = np.random.default_rng([seed, 0])
    rows = {"prompt": [_text(sample_prompt(rng)) for _ in range(n)]}
    return prepare_preference_data(datasets.Dataset.from_dict(rows),
                                   source=f"synthetic:prompts(n={n}, seed={seed})")


def make_sft_dataset(n: int, seed: int) -> datasets.Dataset:
    """`n` (prompt, reference-policy completion) rows with their reward (format completion)."""
    rng = np.random.default_rng([seed, 1])
    rows: dict[str, list] = {"prompt": [], "completion": [], "reward": []}
    for _ in range(n):
        x = sample_prompt(rng)
        y = sample_reference(x, rng)
        rows["prompt"].append(_text(x))
        rows["completion"].append(_text(y))
        rows["reward"].append(reward_from_text(_text(x), _text(y)))
    return prepare_preference_data(datasets.Dataset.from_dict(rows),
                                   source=f"synthetic:sft(n={n}, seed={seed})")


def make_preference_dataset(n: int, seed: int, labeling: str = "bt",
                            temperature: float = 0.2) -> datasets.Dataset:
    """`n` labelled pairs of reference responses (format pairwise) with both rewards."""
    if labeling not in ("bt", "argmax"):
        raise ValueError(f"labeling must be 'bt' or 'argmax', got {labeling!r}")
    if labeling == "bt" and not temperature > 0:
        raise ValueError(f"temperature must be > 0 for Bradley-Terry labels, got {temperature}")
    rng = np.random.default_rng([seed, 2])
    rows: dict[str, list] = {k: [] for k in
                             ("prompt", "chosen", "rejected", "chosen_reward", "rejected_reward")}
    while len(rows["prompt"]) < n:
        x = _text(sample_prompt(rng))
        for _ in range(64):
            y1, y2 = (_text(sample_reference(x.split(), rng)) for _ in range(2))
            r1, r2 = reward_from_text(x, y1), reward_from_text(x, y2)
            if y1 != y2 and (labeling == "bt" or r1 != r2):
                break
        else:
            continue  # a prompt whose samples keep coinciding: draw another prompt
        if labeling == "bt":
            first = rng.random() < 1.0 / (1.0 + np.exp(-(r1 - r2) / temperature))
        else:
            first = r1 > r2
        (c, rc), (rj, rr) = ((y1, r1), (y2, r2)) if first else ((y2, r2), (y1, r1))
        for key, v in zip(rows, (x, c, rj, rc, rr)):
            rows[key].append(v)
    return prepare_preference_data(
        datasets.Dataset.from_dict(rows),
        source=f"synthetic:preference(n={n}, seed={seed}, labeling={labeling})")


# ---- per-token error labels (token-level credit assignment, experiments/token_credit.py) ----
#
# r*(x, y) scores a response position by position against t(x) + <eos>: a symbol at j < k earns
# W_MATCH / k when y_j = t_j, and the response's end is penalised (length term) or rewarded (EOS
# term) unless it stops with <eos> exactly at position k. So position j of a response is an
# error when
#   * j < min(L, k) and y_j != t_j                      (a wrong symbol),
#   * j = L < k                                         (it stops early: the <eos>/<pad> there),
#   * k <= j < L                                        (every extra token past the target),
#   * j = k = L and y does not stop with <eos> there    (a missing <eos>: a <pad>, or nothing),
# with L and "stops with <eos>" read exactly as r* reads them (the first <eos> or <pad> ends the
# response). A response has no error iff r* attains its maximum 1.25; its first error is the
# smallest such j. A missing <eos> after a response whose ids end without one lies one past the
# last id (j = len(y)): `token_errors` cannot mark it, `first_error` returns len(y).


def token_errors(prompt_ids, response_ids) -> np.ndarray:
    """Per-token error labels of responses, consistent with r* (definition above).

    1-D `prompt_ids` [p], `response_ids` [n] give bool [n]; 2-D `[b, p]`, `[b, n]` give bool
    [b, n]. True marks a position where the response departs from t(x) + <eos>; positions after
    the response's end (past its <eos> or first <pad>) are False.
    """
    p, y = np.asarray(prompt_ids), np.asarray(response_ids)
    if p.ndim == 2:
        if y.ndim != 2 or len(p) != len(y):
            raise ValueError(f"token_errors: prompt_ids {p.shape} and response_ids {y.shape} "
                             "must both be 2-D with the same number of rows")
        out = np.zeros(y.shape, bool)
        for i, (a, b) in enumerate(zip(p, y)):
            out[i] = _errors_row(a, b)[0]
        return out
    return _errors_row(p, y)[0]


def first_error(prompt_ids, response_ids) -> int | np.ndarray:
    """Index of a response's first error (definition above), -1 when it has none (r* = 1.25).

    A response whose ids are all correct but end without <eos> returns len(response_ids): the
    missing <eos> would come one past its last id. 1-D inputs give an int, 2-D `[b, p]`, `[b, n]`
    give int64 [b].
    """
    p, y = np.asarray(prompt_ids), np.asarray(response_ids)
    if p.ndim == 2:
        return np.array([_first_error_row(a, b) for a, b in zip(p, y)], np.int64)
    return _first_error_row(p, y)


def _errors_row(p: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, int]:
    """(error mask [n], position of a missing <eos> past the end or -1) of one response."""
    words = [VOCAB[i] if 0 <= i < len(VOCAB) else "<unk>" for i in p.tolist()]
    t = [TOKEN_ID[w] for w in target(words)]
    k, ids = len(t), y.tolist()
    stops = [j for j, v in enumerate(ids) if v in (EOS_ID, PAD_ID)]
    n = stops[0] if stops else len(ids)
    ended = bool(stops) and ids[n] == EOS_ID
    err = np.zeros(len(ids), bool)
    for j in range(min(n, k)):
        err[j] = ids[j] != t[j]
    err[k:n] = True  # extra tokens (empty unless n > k)
    past = -1
    if n < k or not ended:  # stops early, or at/after k without <eos>
        j = min(n, k)
        if j < len(ids):
            err[j] = True
        else:
            past = j
    return err, past


def _first_error_row(p: np.ndarray, y: np.ndarray) -> int:
    err, past = _errors_row(p, y)
    hit = np.flatnonzero(err)
    return int(hit[0]) if len(hit) else past
