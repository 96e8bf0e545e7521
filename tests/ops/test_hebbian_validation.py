"""Bad inputs to the Hebbian entry points raise ValueError/TypeError naming the argument, for
every backend (the checks run before dispatch), the Triton one included."""
import pytest
import torch

from kernels import hebbian_attention, hebbian_step

B, H, T, K, V = 2, 3, 5, 8, 6


def good():
    return dict(q=torch.randn(B, H, T, K), k=torch.randn(B, H, T, K), v=torch.randn(B, H, T, V))


ATTN_CASES = [
    # (what to change, expected error, a phrase the message must hold)
    (dict(k=torch.randn(B, H, T, K + 1)), ValueError, "k: expected shape"),
    (dict(q=torch.randn(B, H, T)), ValueError, "q: expected 4 dims"),
    (dict(v=torch.randn(B, 2, T, V)), ValueError, "v: expected shape"),
    (dict(v=torch.randn(B, H, T + 1, V)), ValueError, "v: expected shape"),
    (dict(q=torch.randn(B, H, T, 0), k=torch.randn(B, H, T, 0)), ValueError, "K must be >= 1"),
    (dict(v=torch.randn(B, H, T, 0)), ValueError, "v: the value dimension V"),
    (dict(q=torch.ones(B, H, T, K, dtype=torch.int64)), TypeError, "q: expected a floating"),
    (dict(v=torch.ones(B, H, T, V, dtype=torch.int32)), TypeError, "v: expected a floating"),
    (dict(k=torch.randn(B, H, T, K, dtype=torch.float16)), TypeError, "k: expected dtype"),
    (dict(q=[1.0]), TypeError, "q: expected a torch.Tensor"),
    (dict(initial_state=torch.randn(B, H, K, V, dtype=torch.float16)), TypeError,
     "initial_state: expected dtype torch.float32"),
    (dict(initial_state=torch.randn(B, H, V, K)), ValueError, "initial_state: expected shape"),
    (dict(decay=torch.full((H + 1,), 0.9)), ValueError, "decay: expected shape"),
    (dict(decay=torch.full((H,), 1.5)), ValueError, "decay: every entry"),
    (dict(decay=torch.zeros(H)), ValueError, "decay: every entry"),
    (dict(chunk_size=48), ValueError, "chunk_size"),
    (dict(v=torch.randn(B, H, T, V, device="meta")), ValueError, "one device"),
]


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("change,err,phrase", ATTN_CASES,
                         ids=[c[2].split(":")[0] + f"-{i}" for i, c in enumerate(ATTN_CASES)])
def test_attention_rejects(backend, change, err, phrase):
    kw = good()
    kw.update(change)
    q, k, v = kw.pop("q"), kw.pop("k"), kw.pop("v")
    with pytest.raises(err, match=phrase):
        hebbian_attention(q, k, v, backend=backend, **kw)


def test_attention_rejects_unknown_backend():
    with pytest.raises(ValueError, match="backend"):
        hebbian_attention(**good(), backend="cuda")


STEP_CASES = [
    (dict(state=torch.randn(B, H, K, V, dtype=torch.float64)), TypeError, "state: expected dtype"),
    (dict(state=torch.randn(B, H, K, V + 1)), ValueError, "state: expected shape"),
    (dict(state=None), ValueError, "state: hebbian_step needs"),
    (dict(k=torch.randn(B, H, K + 2)), ValueError, "k: expected shape"),
    (dict(v=torch.randn(B, 2, V)), ValueError, "v: expected shape"),
    (dict(v=torch.randn(B, H, 0)), ValueError, "K and V must be >= 1"),
    (dict(q=torch.ones(B, H, K, dtype=torch.int32)), TypeError, "q: expected a floating"),
    (dict(decay=torch.full((H,), 0.0)), ValueError, "decay: every entry"),
    (dict(state=torch.randn(B, H, K, V, device="meta")), ValueError, "one device"),
]


@pytest.mark.parametrize("change,err,phrase", STEP_CASES,
                         ids=[c[2].split(":")[0] + f"-{i}" for i, c in enumerate(STEP_CASES)])
def test_step_rejects(change, err, phrase):
    kw = dict(q=torch.randn(B, H, K), k=torch.randn(B, H, K), v=torch.randn(B, 1, V),
              state=torch.randn(B, H, K, V), decay=None)
    kw.update(change)
    with pytest.raises(err, match=phrase):
        hebbian_step(kw["q"], kw["k"], kw["v"], kw["state"], decay=kw["decay"],
                     backend="triton")


def test_step_rejects_noncontiguous_state():
    state = torch.randn(B, H, V, K).transpose(-1, -2)
    with pytest.raises(ValueError, match="state: expected a contiguous"):
        hebbian_step(torch.randn(B, H, K), torch.randn(B, H, K), torch.randn(B, H, V), state,
                     backend="triton")
