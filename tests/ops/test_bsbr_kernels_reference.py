"""kernels.bsbr.naive, the oracle itself, against independent forms of the same math:
plain causal SDPA (one chunk), a per-token loop over candidates (top-k routing), dense routing,
causality perturbation, and stream continuation through `offset` and the bank."""
import math

import pytest
import torch
import torch.nn.functional as F

from helpers import assert_rel_close
from kernels.bsbr import (bsbr_attention, bsbr_attention_ref, chunk_local_attention_ref,
                          chunk_states_ref, routed_readout_step, routed_readout_step_ref)

f64 = torch.float64


def make(B, H, Tq, K, V, M, offset=0, n=0, dtype=f64):
    Tk = offset + Tq
    x = dict(q=torch.randn(B, H, Tq, K, dtype=dtype), k=torch.randn(B, H, Tk, K, dtype=dtype),
             v=torch.randn(B, H, Tk, V, dtype=dtype), r=torch.randn(B, H, Tq, M, dtype=dtype),
             hk=torch.randn(B, H, Tk, M, dtype=dtype))
    bank = dict(bank_F=torch.randn(B, H, n, K, V, dtype=dtype),
                bank_h=torch.randn(B, H, n, M, dtype=dtype)) if n else {}
    return x, bank


def loop_oracle(q, k, v, r, hk, *, C, top_k, offset=0, bank_F=None, bank_h=None):
    """Token by token, candidate by candidate: the contract read literally."""
    B, H, Tq, K = q.shape
    out = torch.zeros(B, H, Tq, v.shape[-1], dtype=f64)
    for b in range(B):
        for h in range(H):
            slots = []                                        # (F_j, h_j, usable_from_chunk)
            for j in range(0 if bank_F is None else bank_F.shape[2]):
                slots.append((bank_F[b, h, j], bank_h[b, h, j], -1))
            for j in range(k.shape[2] // C):
                s = slice(j * C, (j + 1) * C)
                slots.append((k[b, h, s].T @ v[b, h, s], hk[b, h, s].mean(0), j))
            for i in range(Tq):
                t = offset + i
                c = t // C
                keys = list(range(c * C, t + 1))
                a = torch.softmax(k[b, h, keys] @ q[b, h, i] / math.sqrt(K), 0)
                out[b, h, i] = a @ v[b, h, keys]
                cands = [(float(r[b, h, i] @ hj) / math.sqrt(r.shape[-1]), Fj)
                         for Fj, hj, cj in slots if cj < c]
                cands.sort(key=lambda x: -x[0])
                if top_k is not None:
                    cands = cands[:top_k]
                if cands:
                    p = torch.softmax(torch.tensor([s for s, _ in cands], dtype=f64), 0)
                    for pj, (_, Fj) in zip(p, cands):
                        out[b, h, i] += pj * (q[b, h, i] @ Fj)
    return out


@pytest.mark.parametrize("offset", [0, 3])
def test_one_chunk_is_causal_sdpa(offset):
    """chunk_size >= T and no bank: no long part, out = plain causal softmax attention."""
    x, _ = make(2, 3, 17, 12, 20, 5, offset=offset)
    o = bsbr_attention_ref(**x, chunk_size=32, offset=offset, top_k=2)
    # The call's queries are the last Tq of the Tk keys: causal SDPA over all keys, sliced.
    qpad = torch.cat([torch.randn(2, 3, offset, 12, dtype=f64), x["q"]], 2)
    ref = F.scaled_dot_product_attention(qpad, x["k"], x["v"], is_causal=True)[:, :, offset:]
    assert_rel_close(o, ref, 1e-12)
    assert_rel_close(chunk_local_attention_ref(x["q"], x["k"], x["v"], chunk_size=17 + offset,
                                               offset=offset), ref, 1e-12)


@pytest.mark.parametrize("top_k", [1, 2, None])
@pytest.mark.parametrize("offset,n", [(0, 0), (3, 2)])
def test_matches_token_loop(top_k, offset, n):
    x, bank = make(2, 2, 19, 6, 7, 5, offset=offset, n=n)
    o = bsbr_attention_ref(**x, **bank, chunk_size=4, top_k=top_k, offset=offset)
    ref = loop_oracle(**x, **bank, C=4, top_k=top_k, offset=offset)
    assert_rel_close(o, ref, 1e-12)


def test_top_k_at_least_candidates_is_dense():
    x, bank = make(1, 2, 23, 6, 7, 5, n=3)
    dense = bsbr_attention_ref(**x, **bank, chunk_size=4, top_k=None)
    for top_k in (3 + 23 // 4, 100):
        assert_rel_close(bsbr_attention_ref(**x, **bank, chunk_size=4, top_k=top_k), dense,
                         1e-13)
    # and a small top_k really differs (the test can fail)
    assert not torch.allclose(bsbr_attention_ref(**x, **bank, chunk_size=4, top_k=1), dense)


@pytest.mark.parametrize("top_k", [2, None])
def test_causality_perturbation(top_k):
    x, bank = make(1, 2, 29, 6, 7, 5, n=2)
    o = bsbr_attention_ref(**x, **bank, chunk_size=4, top_k=top_k)
    for t in (0, 9, 13, 28):
        y = {name: val.clone() for name, val in x.items()}
        for name in y:
            y[name][:, :, t] += torch.randn_like(y[name][:, :, t])
        o2 = bsbr_attention_ref(**y, **bank, chunk_size=4, top_k=top_k)
        assert torch.equal(o2[:, :, :t], o[:, :, :t]), f"token {t} moved an earlier output"
        assert not torch.allclose(o2[:, :, t:], o[:, :, t:])


@pytest.mark.parametrize("top_k", [1, 3, None])
@pytest.mark.parametrize("split", [1, 4, 7, 8, 13, 24])
def test_continuation_through_offset_and_bank(top_k, split):
    """Cut anywhere: the second piece gets bank = (initial bank, completed chunks of the
    first piece) and the partial chunk's k/v/hk as prefix; outputs equal one call, and the
    initial bank's slot weights add up across the pieces."""
    C, T = 4, 26
    x, bank = make(2, 2, T, 6, 7, 5, n=2)
    o, w = bsbr_attention_ref(**x, **bank, chunk_size=C, top_k=top_k, return_slot_weights=True)
    first = {n_: t[:, :, :split] for n_, t in x.items()}
    o1, w1 = bsbr_attention_ref(**first, **bank, chunk_size=C, top_k=top_k,
                                return_slot_weights=True)
    F1, h1 = chunk_states_ref(first["k"], first["v"], first["hk"], chunk_size=C)
    offset = split % C
    start = split - offset
    second = dict(q=x["q"][:, :, split:], r=x["r"][:, :, split:], k=x["k"][:, :, start:],
                  v=x["v"][:, :, start:], hk=x["hk"][:, :, start:])
    bank2 = dict(bank_F=torch.cat([bank["bank_F"], F1], 2),
                 bank_h=torch.cat([bank["bank_h"], h1], 2))
    o2, w2 = bsbr_attention_ref(**second, **bank2, chunk_size=C, top_k=top_k, offset=offset,
                                return_slot_weights=True)
    assert_rel_close(torch.cat([o1, o2], 2), o, 1e-12)
    assert_rel_close(w1 + w2[..., :2], w, 1e-12, "slot_weights")


def test_chunk_states_complete_chunks_only():
    x, _ = make(2, 3, 18, 6, 7, 5)
    Fs, hs = chunk_states_ref(x["k"], x["v"], x["hk"], chunk_size=4)
    assert Fs.shape == (2, 3, 4, 6, 7) and hs.shape == (2, 3, 4, 5)
    assert_rel_close(Fs[:, :, 2], x["k"][:, :, 8:12].transpose(-1, -2) @ x["v"][:, :, 8:12], 1e-13)
    assert_rel_close(hs[:, :, 3], x["hk"][:, :, 12:16].mean(2), 1e-13)
    assert chunk_states_ref(x["k"][:, :, :3], x["v"][:, :, :3], x["hk"][:, :, :3],
                            chunk_size=4)[0].shape == (2, 3, 0, 6, 7)


@pytest.mark.parametrize("top_k", [1, 3, None])
def test_step_equals_last_token_of_a_call(top_k):
    """A decode token at the start of a fresh chunk (offset 0, only the bank before it) reads
    the bank exactly like routed_readout_step."""
    x, bank = make(2, 2, 1, 6, 7, 5, n=5)
    o = bsbr_attention_ref(**x, **bank, chunk_size=4, top_k=top_k)
    local = x["v"][:, :, 0]                     # one key: the local part is v itself
    long, w = routed_readout_step_ref(x["q"][:, :, 0], x["r"][:, :, 0], **bank, top_k=top_k)
    assert_rel_close(local + long, o[:, :, 0], 1e-12)
    assert w.shape == (2, 2, 5)
    assert_rel_close(w.sum(-1), torch.ones(2, 2, dtype=f64), 1e-12)
    long_api, w_api = routed_readout_step(x["q"][:, :, 0], x["r"][:, :, 0], **bank, top_k=top_k)
    assert_rel_close(long_api, long, 1e-12)
    assert_rel_close(w_api, w, 1e-12)


def test_reference_backend_of_the_api():
    x, bank = make(1, 2, 10, 6, 7, 5, n=2)
    o = bsbr_attention(**x, **bank, chunk_size=4, top_k=2, backend="reference")
    assert_rel_close(o, bsbr_attention_ref(**x, **bank, chunk_size=4, top_k=2), 0.0)
