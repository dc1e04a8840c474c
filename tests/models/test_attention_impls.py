"""Every attention implementation against independent references (float64 NumPy forward, a plain
autodiff softmax for gradients), and the blockwise one's O(t) saved activations."""

from __future__ import annotations

import contextlib
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prefjax.models import attention
from prefjax.models import cache as kvc

CPU_IMPLS = ("xla", "blockwise")


def allowed_np(key_mask, q_start, t, window):
    """bool [b, t, s] by explicit loops over (row, query, key)."""
    b, s = key_mask.shape
    a = np.zeros((b, t, s), bool)
    for r in range(b):
        for i in range(t):
            slot = q_start + i
            for j in range(s):
                a[r, i, j] = (key_mask[r, j] != 0 and j <= slot
                              and (window is None or j > slot - window))
    return a


def attention_np(q, k, v, allowed, scale):
    """float64 masked softmax attention; a row with no visible key averages v uniformly."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    g = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
    z = np.einsum("bthd,bshd->bhts", q, k) * scale
    z = np.where(allowed[:, None], z, -np.inf)
    none = ~allowed.any(-1)[:, None, :, None]  # [b, 1, t, 1]
    z = np.where(none, 0.0, z)
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhts,bshd->bthd", p, v)


def attention_plain(q, k, v, allowed, scale):
    """Softmax attention differentiated by plain autodiff (no custom VJP)."""
    g = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
    z = jnp.einsum("bthd,bshd->bhts", q, k) * scale
    z = jnp.where(allowed[:, None], z, jnp.finfo(jnp.float32).min)
    return jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(z, axis=-1), v)


def _mask(b, s, zeros):
    m = np.ones((b, s), np.int32)
    for r, sl in zeros:
        m[r, sl] = 0
    return m


# name: (b, t, s, h, kh, d, key_mask, q_start, window, block_q, block_k)
CASES = {
    "right_padding": (2, 11, 11, 2, 2, 8, _mask(2, 11, [(0, slice(7, None))]), 0, None, 4, 3),
    "left_padding": (2, 11, 11, 2, 2, 8, _mask(2, 11, [(1, slice(0, 3))]), 0, None, 4, 3),
    "padded_row": (2, 9, 9, 2, 2, 8, _mask(2, 9, [(1, slice(None))]), 0, None, 4, 4),
    "gqa": (2, 13, 13, 4, 2, 8, _mask(2, 13, [(0, slice(0, 4)), (1, slice(10, None))]), 0, None,
            5, 6),
    "window": (2, 13, 13, 4, 2, 8, _mask(2, 13, [(0, slice(0, 4))]), 0, 3, 5, 4),
    "decode": (2, 3, 20, 4, 2, 8, _mask(2, 20, [(0, slice(0, 11)), (1, slice(12, None))]), 9,
               None, 2, 8),
    "decode_window": (2, 3, 20, 4, 2, 8, _mask(2, 20, [(0, slice(0, 11)), (1, slice(12, None))]),
                      9, 2, 2, 8),
    "default_blocks": (1, 7, 7, 2, 1, 8, _mask(1, 7, [(0, slice(5, None))]), 0, None, 128, 256),
}


def _inputs(b, t, s, h, kh, d, dtype=jnp.float32, seed=0):
    ks = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(ks[0], (b, t, h, d), dtype)
    k = jax.random.normal(ks[1], (b, s, kh, d), dtype)
    v = jax.random.normal(ks[2], (b, s, kh, d), dtype)
    w = jax.random.normal(ks[3], (b, t, h, d), jnp.float32)  # a random linear functional
    return q, k, v, w


def _attend(impl, key_mask, q_start, window, bq, bk, scale):
    return lambda q, k, v: attention.attend(q, k, v, key_mask=jnp.asarray(key_mask),
                                            q_start=q_start, window=window, scale=scale,
                                            impl=impl, block_q=bq, block_k=bk)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_matches_reference_f32(impl, case):
    b, t, s, h, kh, d, key_mask, q_start, window, bq, bk = CASES[case]
    q, k, v, w = _inputs(b, t, s, h, kh, d)
    scale = d ** -0.5
    allowed = allowed_np(key_mask, q_start, t, window)
    f = _attend(impl, key_mask, q_start, window, bq, bk, scale)
    out, got = _value_and_grads(f, w, q, k, v)
    np.testing.assert_allclose(out, attention_np(q, k, v, allowed, scale), rtol=1e-5, atol=1e-5)
    _, want = _value_and_grads(
        lambda q, k, v: attention_plain(q, k, v, jnp.asarray(allowed), scale), w, q, k, v)
    for name, g, r in zip("qkv", got, want):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5, err_msg=f"d{name}")


def _value_and_grads(fn, w, *args):
    """fn(q, k, v) and the gradients of sum(w * fn) for q, k, v, in one jitted call."""
    def both(*args):
        o, vjp = jax.vjp(fn, *args)
        return o, vjp(w.astype(o.dtype))
    return jax.jit(both)(*args)


def test_reference_helpers_agree_with_cache():
    """The NumPy mask and the closed form of an empty row are the contract cache.py defines."""
    b, t, s, h, kh, d, key_mask, q_start, window, *_ = CASES["decode_window"]
    allowed = allowed_np(key_mask, q_start, t, window)
    np.testing.assert_array_equal(kvc.causal_allowed(jnp.asarray(key_mask), q_start, t, window),
                                  allowed)
    np.testing.assert_array_equal(
        attention.no_visible_key(jnp.asarray(key_mask), q_start, t, window), ~allowed.any(-1))
    q, k, v, _ = _inputs(b, t, s, h, kh, d)
    assert (~allowed.any(-1)).sum() >= 2  # the case has rows with no visible key
    o = kvc.attend(q, k, v, jnp.asarray(allowed), d ** -0.5)
    r, i = np.argwhere(~allowed.any(-1))[0]
    np.testing.assert_allclose(o[r, i], np.repeat(np.mean(v[r], axis=0), h // kh, axis=0),
                               rtol=1e-5, atol=1e-6)


def test_blockwise_decodes_with_traced_q_start():
    """Under jit with the cache index traced (one compile for every step), as sampling runs."""
    b, s, h, kh, d = 2, 24, 4, 2, 8
    key_mask = _mask(b, s, [(0, slice(0, 5)), (1, slice(16, None))])
    _, k, v, _ = _inputs(b, 1, s, h, kh, d)
    f = jax.jit(lambda q, i: attention.attend(q, k, v, key_mask=jnp.asarray(key_mask), q_start=i,
                                              scale=0.3, impl="blockwise", block_k=8))
    for i in (0, 4, 7, 15, 23):
        q = jax.random.normal(jax.random.key(i), (b, 1, h, d))
        np.testing.assert_allclose(f(q, jnp.int32(i)),
                                   attention_np(q, k, v, allowed_np(key_mask, i, 1, None), 0.3),
                                   rtol=1e-5, atol=1e-5, err_msg=f"q_start={i}")
    assert f._cache_size() == 1


@pytest.mark.parametrize("impl", [*CPU_IMPLS, "splash"])
@pytest.mark.parametrize("t", [1, 3])
def test_cached_attention_runs_every_impl_with_a_traced_index(impl, t):
    """`attend_cached` over head-major cache buffers under jit (the index traced, as in the
    sampler's loop), for a decode step (t = 1) and a multi-token write (t = 3), equals the
    float64 reference. Splash, traced for a TPU, cannot take a traced q_start: a decode step
    reads the cache with "xla" and a longer query runs "blockwise" (both run here on CPU)."""
    b, s, h, kh, d, window = 2, 20, 4, 2, 8, None
    key_mask = _mask(b, s, [(0, slice(0, 5)), (1, slice(12, None))])
    q, k, v, _ = _inputs(b, t, s, h, kh, d)
    kc, vc = k.swapaxes(1, 2), v.swapaxes(1, 2)  # the cache's layout [b, kh, s, d]
    f = jax.jit(lambda q, kc, vc, i: attention.attend_cached(
        q, kc, vc, key_mask=jnp.asarray(key_mask), q_start=i, window=window, scale=d ** -0.5,
        impl=impl))
    with attention.compiling_for("tpu") if impl == "splash" else contextlib.nullcontext():
        for i in (4, 9):
            np.testing.assert_allclose(
                f(q, kc, vc, jnp.int32(i)),
                attention_np(q, k, v, allowed_np(key_mask, i, t, window), d ** -0.5),
                rtol=1e-5, atol=1e-5, err_msg=f"q_start={i}")
        if t == 1:  # a decode step copies no cached key: no [b, s, kh, d] array in its program
            hlo = f.lower(q, kc, vc, jnp.int32(4)).compile().as_text()
            assert not re.search(rf"f32\[{b},{s},{kh},{d}\]", hlo), impl


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_bfloat16(impl):
    b, t, s, h, kh, d, key_mask, q_start, window, bq, bk = CASES["gqa"]
    q, k, v, w = _inputs(b, t, s, h, kh, d, dtype=jnp.bfloat16)
    f = _attend(impl, key_mask, q_start, window, bq, bk, d ** -0.5)
    o, got = _value_and_grads(f, w, q, k, v)
    assert o.dtype == jnp.bfloat16
    allowed = allowed_np(key_mask, q_start, t, window)
    np.testing.assert_allclose(np.asarray(o, np.float32),
                               attention_np(q, k, v, allowed, d ** -0.5), atol=3e-2)
    up = [x.astype(jnp.float32) for x in (q, k, v)]
    _, want = _value_and_grads(
        lambda q, k, v: attention_plain(q, k, v, jnp.asarray(allowed), d ** -0.5), w, *up)
    for name, g, r in zip("qkv", got, want):
        assert g.dtype == jnp.bfloat16
        err = np.abs(np.asarray(g, np.float32) - np.asarray(r)).max()
        assert err <= 3e-2 * np.abs(np.asarray(r)).max(), f"d{name}: {err}"


def _saved(impl, capsys, t, h=4, d=8):
    """Element counts of the residuals jax.grad saves for one attention call."""
    q = jnp.ones((1, t, h, d))
    key_mask = jnp.ones((1, t), jnp.int32)
    f = _attend(impl, key_mask, 0, None, 16, 32, d ** -0.5)
    capsys.readouterr()
    jax.ad_checkpoint.print_saved_residuals(lambda q, k, v: jnp.sum(f(q, k, v)), q, q, q)
    shapes = re.findall(r"^\w+\[([\d,]*)\]", capsys.readouterr().out, re.M)
    assert shapes, "print_saved_residuals printed nothing"
    return [int(np.prod([int(n) for n in sh.split(",") if n])) for sh in shapes]


def test_blockwise_saves_o_t_residuals(capsys):
    t, h, d = 64, 4, 8
    xla, blockwise = _saved("xla", capsys, t), _saved("blockwise", capsys, t)
    assert max(xla) >= h * t * t  # the reference keeps the [h, t, s] probabilities
    assert max(blockwise) <= t * h * d  # q, k, v, o: [t, h, d]; logsumexp [h, t]
    assert sum(blockwise) <= 8 * t * h * d


def _temp_bytes(impl, t, h=4, d=16):
    x = jax.ShapeDtypeStruct((1, t, h, d), jnp.float32)
    f = _attend(impl, jnp.ones((1, t), jnp.int32), 0, None, 32, 64, d ** -0.5)
    step = jax.jit(jax.grad(lambda q, k, v: jnp.sum(f(q, k, v)), (0, 1, 2)))
    return step.lower(x, x, x).compile().memory_analysis().temp_size_in_bytes


def test_temp_memory_grows_linearly_for_blockwise():
    """Doubling t: XLA's compiled gradient temporaries grow ~4x ([t, s]), blockwise's < 2.2x."""
    xla = _temp_bytes("xla", 512) / _temp_bytes("xla", 256)
    blockwise = _temp_bytes("blockwise", 512) / _temp_bytes("blockwise", 256)
    assert xla > 3.5, xla
    assert blockwise < 2.2, blockwise


def test_bad_input_fails_with_names():
    q, k, v, _ = _inputs(1, 4, 4, 2, 2, 8)
    ok = dict(key_mask=jnp.ones((1, 4)), q_start=0, scale=0.3)
    with pytest.raises(ValueError, match="impl='flash' is not one of"):
        attention.attend(q, k, v, **ok, impl="flash")
    with pytest.raises(ValueError, match="impl='flash' is not one of"):  # a decode step too
        attention.attend_cached(q[:, :1], k.swapaxes(1, 2), v.swapaxes(1, 2), **ok,
                                impl="flash")
    with pytest.raises(ValueError, match="key_mask must be"):
        attention.attend(q, k, v, **(ok | dict(key_mask=jnp.ones((1, 5)))))
    with pytest.raises(ValueError, match="multiple of kv heads"):
        attention.attend(jnp.ones((1, 4, 3, 8)), k, v, **ok)
    with pytest.raises(ValueError, match="impl='cudnn' needs a GPU backend"):
        attention.attend(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), v.astype(jnp.bfloat16),
                         **ok, impl="cudnn")
    with pytest.raises(ValueError, match="impl='splash' needs a TPU backend"):
        attention.attend(q, k, v, **ok, impl="splash")
    with attention.compiling_for("tpu"):
        with pytest.raises(ValueError, match="multiples of 128"):
            attention.attend(q, k, v, **ok, impl="splash")
        with pytest.raises(ValueError, match="concrete .*q_start"):
            jax.jit(lambda i: attention.attend(q, k, v, **(ok | dict(q_start=i)),
                                               impl="splash")).lower(jnp.int32(0))
    with attention.compiling_for("gpu"), pytest.raises(ValueError, match="bfloat16 or float16"):
        attention.attend(q, k, v, **ok, impl="cudnn")


def test_splash_compiles_for_a_tpu_topology(monkeypatch):
    """No TPU here: AOT-compile forward and backward for v5e (the Mosaic kernels lower); the
    numbers can only be checked on a TPU."""
    # libtpu is a test dependency (setup.cfg `test` extra): missing, this fails instead of skipping
    import libtpu  # noqa: F401

    # libtpu's machine-wide lock file would fail this test while another process holds it
    monkeypatch.setenv("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    devices = topologies.get_topology_desc(topology_name="v5e:2x2", platform="tpu").devices
    one = jax.sharding.Mesh(np.array(devices[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
    four = jax.sharding.Mesh(np.array(devices).reshape(2, 1, 2), ("data", "fsdp", "tensor"))
    b, t, h, kh, d = 2, 256, 4, 2, 128

    def loss(q, k, v, m, window):
        o = attention.attend(q, k, v, key_mask=m, q_start=0, window=window, scale=d ** -0.5,
                             impl="splash")
        return jnp.sum(o.astype(jnp.float32))

    for mesh, window in ((one, None), (one, 64), (four, None)):
        rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
        x, kv, m = (jax.ShapeDtypeStruct(shape, dtype, sharding=rows) for shape, dtype in (
            ((b, t, h, d), jnp.bfloat16), ((b, t, kh, d), jnp.bfloat16), ((b, t), jnp.int32)))
        step = jax.jit(jax.value_and_grad(functools.partial(loss, window=window), (0, 1, 2)))
        with jax.set_mesh(mesh), attention.compiling_for("tpu"):
            lowered = step.lower(x, kv, kv, m)
        assert "tpu_custom_call" in lowered.as_text()
        lowered.compile()


def _wrapper_case(impl_fn, case):
    """A kernel wrapper (masks, layout, scale, rows with no visible key) on CPU, f32, 1e-5."""
    b, t, s, h, kh, d, key_mask, q_start, window = case
    q, k, v, w = _inputs(b, t, s, h, kh, d)
    allowed = allowed_np(key_mask, q_start, t, window)
    assert (~allowed.any(-1)).any()  # every case has rows with no visible key
    out, got = _value_and_grads(
        lambda q, k, v: impl_fn(q, k, v, jnp.asarray(key_mask), q_start, window, d ** -0.5),
        w, q, k, v)
    assert_matches_reference(out, got, w, q, k, v, allowed)


@pytest.mark.parametrize("case", ["gqa", "decode_window"])
def test_cudnn_wrapper_through_xla(case):
    """The cuDNN path's mask, patch and layout, with jax.nn.dot_product_attention's XLA backend
    standing in for cuDNN (the kernel itself needs a GPU)."""
    b, t, s, h, kh, d, key_mask, q_start, window, *_ = CASES[case]
    key_mask = key_mask.copy()
    key_mask[0, :2] = 0  # rows with no visible key
    with attention.compiling_for("gpu"):
        _wrapper_case(functools.partial(attention._cudnn, implementation="xla"),
                      (b, t, s, h, kh, d, key_mask, q_start, window))


@pytest.mark.parametrize(("window", "s", "q_start"), [(None, 128, 0), (7, 256, 128)])
def test_splash_interpreted_on_cpu(window, s, q_start):
    """Splash's Pallas kernels in interpret mode (slow, so 128-query tiles and few of them)."""
    key_mask = _mask(2, s, [(0, slice(0, q_start + 20)), (1, slice(q_start + 100, None))])
    with attention.compiling_for("tpu"):
        _wrapper_case(functools.partial(attention._splash, interpret=True),
                      (2, 128, s, 2, 1, 128, key_mask, q_start, window))


def test_splash_runs_per_shard_on_a_mesh():
    """Under a (data=2, tensor=2) mesh splash runs in shard_map on local rows and heads (a Pallas
    call is opaque to GSPMD), interpreted on 4 CPU devices; equal to the unsharded reference."""
    assert jax.device_count() >= 4, "tests/conftest.py simulates 8 CPU devices"
    mesh = jax.make_mesh((2, 1, 2), ("data", "fsdp", "tensor"), devices=jax.devices()[:4],
                         axis_types=(jax.sharding.AxisType.Auto,) * 3)
    b, t, h, kh, d = 2, 128, 4, 2, 128
    key_mask = _mask(b, t, [(0, slice(0, 20)), (1, slice(100, None))])
    q, k, v, w = _inputs(b, t, t, h, kh, d)
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
    q, k, v, m = (jax.device_put(x, rows) for x in (q, k, v, jnp.asarray(key_mask)))
    with jax.set_mesh(mesh), attention.compiling_for("tpu"):
        out, got = _value_and_grads(
            lambda q, k, v: attention._splash(q, k, v, m, 0, None, d ** -0.5, interpret=True),
            w, q, k, v)
    assert out.sharding.spec == jax.sharding.PartitionSpec("data", None, "tensor")
    allowed = allowed_np(key_mask, 0, t, None)
    assert_matches_reference(out, got, w, q, k, v, allowed)


def assert_matches_reference(out, grads, w, q, k, v, allowed):
    """`out` equals the float64 NumPy attention and `grads` (of q, k, v) plain autodiff's, to
    1e-5, for the visibility `allowed` [b, t, s] and scale d^-1/2."""
    scale = q.shape[-1] ** -0.5
    np.testing.assert_allclose(out, attention_np(q, k, v, allowed, scale), rtol=1e-5, atol=1e-5)
    _, want = _value_and_grads(
        lambda q, k, v: attention_plain(q, k, v, jnp.asarray(allowed), scale), w, q, k, v)
    for name, g, r in zip("qkv", grads, want):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5, err_msg=f"d{name}")
