"""Bad inputs to the kernels.bsbr entry points raise ValueError/TypeError naming the argument."""
import pytest
import torch

from kernels.bsbr import bsbr_attention, chunk_local_attention, chunk_states, routed_readout_step


def inputs(Tq=10, offset=0, K=12, V=20, M=5, n=0):
    Tk = Tq + offset
    x = dict(q=torch.randn(2, 3, Tq, K), k=torch.randn(2, 3, Tk, K), v=torch.randn(2, 3, Tk, V),
             r=torch.randn(2, 3, Tq, M), hk=torch.randn(2, 3, Tk, M))
    if n:
        x.update(bank_F=torch.randn(2, 3, n, K, V), bank_h=torch.randn(2, 3, n, M))
    return x


def raises(exc, *words, fn=bsbr_attention, **kw):
    with pytest.raises(exc) as e:
        fn(**kw)
    for w in words:
        assert w in str(e.value), f"{w!r} not in {e.value}"


@pytest.mark.parametrize("bad,exc,words", [
    (dict(chunk_size=0), ValueError, ("chunk_size", "0")),
    (dict(chunk_size=4.0), ValueError, ("chunk_size",)),
    (dict(top_k=0), ValueError, ("top_k", "0")),
    (dict(top_k=True), ValueError, ("top_k",)),
    (dict(offset=4), ValueError, ("offset", "[0, 4)")),
    (dict(offset=-1), ValueError, ("offset",)),
    (dict(backend="cuda"), ValueError, ("backend", "cuda")),
])
def test_bad_arguments(bad, exc, words):
    kw = dict(chunk_size=4)
    kw.update(bad)
    raises(exc, *words, **inputs(), **kw)


def test_bad_tensors():
    x = inputs()
    raises(ValueError, "k", "[2, 3, 13, 12]", **{**x, "k": torch.randn(2, 3, 10, 12)},
           chunk_size=4, offset=3)
    raises(ValueError, "v", **{**x, "v": torch.randn(2, 3, 9, 20)}, chunk_size=4)
    raises(ValueError, "hk", **{**x, "hk": torch.randn(2, 3, 10, 6)}, chunk_size=4)
    raises(ValueError, "r", **{**x, "r": torch.randn(2, 2, 10, 5)}, chunk_size=4)
    raises(ValueError, "q", **{**x, "q": torch.randn(3, 10, 12)}, chunk_size=4)
    raises(TypeError, "k", "float16", **{**x, "k": x["k"].half()}, chunk_size=4)
    raises(TypeError, "q", "int64", **{**x, "q": x["q"].long()}, chunk_size=4)
    raises(TypeError, "r", "list", **{**x, "r": [1.0]}, chunk_size=4)
    raises(ValueError, "device", "meta", **{**x, "r": x["r"].to("meta")}, chunk_size=4)


def test_bad_bank():
    x = inputs(n=2)
    raises(ValueError, "bank_h", **{**x, "bank_h": None}, chunk_size=4)
    raises(TypeError, "bank_F", "float16", **{**x, "bank_F": x["bank_F"].half()}, chunk_size=4)
    raises(ValueError, "bank_F", **{**x, "bank_F": torch.randn(2, 3, 2, 12, 21)}, chunk_size=4)
    raises(ValueError, "bank_h", **{**x, "bank_h": torch.randn(2, 3, 3, 5)}, chunk_size=4)


def test_triton_limits():
    x = inputs()
    raises(ValueError, "chunk_size", "257", **x, chunk_size=257, backend="triton")
    raises(TypeError, "q", "float64", **{n: t.double() for n, t in x.items()}, chunk_size=4,
           backend="triton")
    if not torch.cuda.is_available():
        raises(TypeError, "q", "bfloat16", "TRITON_INTERPRET",
               **{n: t.bfloat16() for n, t in x.items()}, chunk_size=4, backend="triton")
    raises(ValueError, "v", "300", fn=chunk_local_attention, q=x["q"], k=x["k"],
           v=torch.randn(2, 3, 10, 300), chunk_size=4, backend="triton")


def test_other_entry_points():
    x = inputs()
    raises(ValueError, "offset", fn=chunk_local_attention, q=x["q"], k=x["k"], v=x["v"],
           chunk_size=4, offset=5)
    raises(ValueError, "hk", fn=chunk_states, k=x["k"], v=x["v"], hk=x["hk"][:, :, :5],
           chunk_size=4)
    q, r = torch.randn(2, 3, 12), torch.randn(2, 3, 5)
    bF, bh = torch.randn(2, 3, 4, 12, 20), torch.randn(2, 3, 4, 5)
    raises(ValueError, "top_k", fn=routed_readout_step, q=q, r=r, bank_F=bF, bank_h=bh, top_k=0)
    raises(ValueError, "bank_F", fn=routed_readout_step, q=q, r=r, bank_F=None, bank_h=bh)
    raises(ValueError, "bank_h", fn=routed_readout_step, q=q, r=r, bank_F=bF,
           bank_h=torch.randn(2, 3, 4, 6))
    raises(ValueError, "r", fn=routed_readout_step, q=q, r=torch.randn(2, 5), bank_F=bF,
           bank_h=bh)
    raises(TypeError, "bank_F", fn=routed_readout_step, q=q, r=r, bank_F="F", bank_h=bh)
    raises(ValueError, "bank_F", fn=routed_readout_step, q=q, r=r,
           bank_F=torch.randn(2, 3, 4, 11, 20), bank_h=bh)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 0.0, -0.5, "x", True])
def test_bad_scale(bad):
    """scale, as long_scale: a finite number > 0 (None: 1/sqrt(K)), refused before any work."""
    x = inputs()
    raises(ValueError, "scale", repr(bad), **x, chunk_size=4, scale=bad)
    raises(ValueError, "scale", repr(bad), fn=chunk_local_attention, q=x["q"], k=x["k"],
           v=x["v"], chunk_size=4, scale=bad)
    raises(ValueError, "long_scale", repr(bad), **x, chunk_size=4, long_scale=bad)
