"""BSBRAttention: against the float64 reference (kernels.bsbr.naive on the module's own
projections), gradients, causality, streaming equivalence, decode without re-running the prefix,
and clear errors."""
import math

import pytest
import torch

from helpers import assert_rel_close, run_pieces
from kernels.bsbr import naive
from bsbr import BankConfig, BSBRAttention, BSBRState
import bsbr.stream as stream_mod

D, H, C, M = 24, 3, 4, 5          # head dim 8, meta dim 5 (not powers of two)


def make(top_k=2, bank=None, dtype=torch.float64, **kw):
    return BSBRAttention(D, H, C, top_k=top_k, bank=bank, meta_dim=M, **kw).to(dtype)


def reference(attn: BSBRAttention, x: torch.Tensor) -> torch.Tensor:
    """The BSBR formula (`bsbr.attention` docstring) with the routed term scaled by the module's
    λ (local + λ·long), computed by the naive kernel references in float64 from the module's
    weights (no streaming, no bank, one dense call)."""
    x = x.double()
    B, T, _ = x.shape

    def proj(W, d):
        y = x @ W.weight.double().T
        if W.bias is not None:
            y = y + W.bias.double()
        return y.view(B, T, H, d).transpose(1, 2)

    K = D // H
    q, k, v = proj(attn.W_q, K), proj(attn.W_k, K), proj(attn.W_v, K)
    r, hk = proj(attn.W_r, M), proj(attn.W_h, M)
    plain = naive.bsbr_attention_ref(q, k, v, r, hk, chunk_size=C, top_k=attn.top_k)
    local = naive.chunk_local_attention_ref(q, k, v, chunk_size=C)
    o = local + attn.long_scale * (plain - local)
    o = o.transpose(1, 2).reshape(B, T, D)
    return o @ attn.W_o.weight.double().T + (0 if attn.W_o.bias is None
                                             else attn.W_o.bias.double())


@pytest.mark.parametrize("top_k", [None, 1, 3])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_float64_reference(top_k, bias):
    attn = make(top_k=top_k, dtype=torch.float32, bias=bias)
    x = torch.randn(2, 23, D)                       # T not a multiple of C
    assert_rel_close(attn(x), reference(attn, x), 1e-5)


def test_long_scale_default_plain_and_errors():
    """λ defaults to 1/(√K·C); λ = 1 is the plain sum; both match the reference, and
    they differ (the routed term is really scaled)."""
    assert make().long_scale == pytest.approx((D // H) ** -0.5 / C)
    assert make(scale=0.5).long_scale == pytest.approx(0.5 / C)
    x = torch.randn(2, 19, D, dtype=torch.float64)
    default, plain = make(), make(long_scale=1.0)
    plain.load_state_dict(default.state_dict())
    y_default, y_plain = default(x), plain(x)
    assert_rel_close(y_plain, reference(plain, x), 1e-10)
    assert_rel_close(y_default, reference(default, x), 1e-10)
    assert (y_default - y_plain).abs().max() > 1e-2
    for bad in (0, -1.0, True, "1", float("inf")):
        with pytest.raises(ValueError, match="long_scale"):
            make(long_scale=bad)


def test_gradients_match_float64():
    attn32 = make(top_k=2, dtype=torch.float32)
    attn64 = make(top_k=2)
    attn64.load_state_dict({k: v.double() for k, v in attn32.state_dict().items()})
    x = torch.randn(2, 19, D)
    dy = torch.randn(2, 19, D)
    x32, x64 = x.clone().requires_grad_(), x.double().requires_grad_()
    (attn32(x32) * dy).sum().backward()
    (attn64(x64) * dy.double()).sum().backward()
    assert_rel_close(x32.grad, x64.grad, 1e-4, "dx")
    for (name, p32), p64 in zip(attn32.named_parameters(), attn64.parameters()):
        assert p32.grad is not None and p32.grad.abs().sum() > 0, name
        assert_rel_close(p32.grad, p64.grad, 1e-4, f"d{name}")


@pytest.mark.parametrize("top_k", [None, 2])
def test_causal_at_every_position(top_k):
    attn = make(top_k=top_k)
    T = 17
    x = torch.randn(2, T, D, dtype=torch.float64)
    y = attn(x)
    for t in range(T):
        x2 = x.clone()
        x2[:, t] += torch.randn(2, D, dtype=torch.float64)
        y2 = attn(x2)
        assert torch.equal(y2[:, :t], y[:, :t]), f"position {t} leaks into the past"
        assert not torch.allclose(y2[:, t], y[:, t]), f"position {t} does not see itself"


@pytest.mark.parametrize("bank", [None, BankConfig(slots_per_level=(16, 2, 2))])
@pytest.mark.parametrize("cuts", [[0, 1, 4, 5, 11, 12, 13, 30, 31, 37],
                                  [0, 3, 8, 9, 22, 37], [0, 37]])
def test_streaming_pieces_equal_one_call(bank, cuts):
    attn = make(top_k=2, bank=bank)
    x = torch.randn(2, 37, D, dtype=torch.float64)
    y = attn(x)
    ys, st = run_pieces(attn, x, cuts)
    assert_rel_close(ys, y, 1e-12, "pieces")
    assert st.position == 37 and st.fill == 37 % C and st.bank.n == 37 // C


@pytest.mark.parametrize("top_k", [None, 2])
def test_token_by_token_equals_one_call(top_k):
    attn = make(top_k=top_k)
    x = torch.randn(2, 26, D, dtype=torch.float64)
    y = attn(x)
    with torch.no_grad():
        ys, _ = run_pieces(attn, x, list(range(27)))
    assert_rel_close(ys, y, 1e-12, "token by token")
    ys, _ = run_pieces(attn, x, list(range(27)))            # with autograd on, too
    assert_rel_close(ys, y, 1e-12, "token by token (grad)")


@pytest.mark.parametrize("backend", ["torch", "triton", "reference"])
def test_backends_match_reference_when_streamed_and_differentiated(backend):
    """Every kernels.bsbr backend (Triton under the interpreter on the CPU), float32."""
    attn = make(top_k=2, dtype=torch.float32, backend=backend,
                bank=BankConfig(slots_per_level=(8, 2, 1)))
    x = torch.randn(2, 19, D, requires_grad=True)
    y = attn(x)
    assert_rel_close(y, reference(attn, x), 1e-5)
    with torch.no_grad():
        ys, _ = run_pieces(attn, x, [0, 3, 4, 11, 12, 13, 19])
    assert_rel_close(ys, y, 1e-5, "pieces")
    dy = torch.randn_like(y)
    (y * dy).sum().backward()
    x64 = x.detach().double().requires_grad_(True)
    (reference(attn, x64) * dy.double()).sum().backward()
    assert_rel_close(x.grad, x64.grad, 1e-4, "dx")


@pytest.mark.gpu
def test_bf16_on_gpu_streams_and_decodes():
    attn = make(top_k=2, dtype=torch.float32, bank=BankConfig(slots_per_level=(4, 2, 1))).cuda()
    x = torch.randn(2, 45, D, device="cuda")
    y32 = attn(x)
    attn_bf = make(top_k=2, dtype=torch.float32,
                   bank=BankConfig(slots_per_level=(4, 2, 1))).cuda().to(torch.bfloat16)
    attn_bf.load_state_dict(attn.state_dict())
    with torch.no_grad():
        y = attn_bf(x.bfloat16())
        ys, st = run_pieces(attn_bf, x.bfloat16(), [0, 16, 17])
        for t in range(17, 20):
            _, st = attn_bf(x[:, t:t + 1].bfloat16(), state=st, return_state=True)
    assert_rel_close(y, y32, 2e-2)
    assert_rel_close(ys, y32[:, :17], 2e-2)
    assert st.position == 20


def test_float32_streaming_matches_reference():
    attn = make(top_k=2, dtype=torch.float32)
    x = torch.randn(3, 21, D)
    ys, _ = run_pieces(attn, x, [0, 2, 3, 10, 21])
    assert_rel_close(ys, reference(attn, x), 1e-5)


def test_decode_never_reruns_the_prefix(monkeypatch):
    """A one-token call sees at most C keys (the partial chunk and itself) and reads the
    bank through routed_readout_step; bsbr_attention is not called at all."""
    attn = make(top_k=2)
    x = torch.randn(1, 30, D, dtype=torch.float64)
    y_ref = attn(x)
    _, st = attn(x[:, :29], return_state=True)
    seen = {}
    kb = stream_mod.kb
    real_local, real_step = kb.chunk_local_attention, kb.routed_readout_step

    def local(q, k, v, **kw):
        seen["keys"] = k.shape[2]
        return real_local(q, k, v, **kw)

    def step(q, r, F, h, top_k, **kw):
        seen["slots"] = F.shape[2]
        return real_step(q, r, F, h, top_k, **kw)

    def forbidden(*a, **kw):
        raise AssertionError("bsbr_attention called for a one-token decode")

    monkeypatch.setattr(kb, "chunk_local_attention", local)
    monkeypatch.setattr(kb, "routed_readout_step", step)
    monkeypatch.setattr(kb, "bsbr_attention", forbidden)
    with torch.no_grad():
        y, st2 = attn(x[:, 29:], state=st, return_state=True)
    assert seen == {"keys": 29 % C + 1, "slots": 29 // C}
    assert_rel_close(y, y_ref[:, 29:], 1e-12)
    assert st2.position == 30


def test_state_passed_in_is_not_modified():
    attn = make(top_k=2, bank=BankConfig(slots_per_level=(2, 2, 1)))
    x = torch.randn(2, 33, D, dtype=torch.float64)
    _, st = attn(x[:, :30], return_state=True)
    before = st.clone()
    attn(x[:, 30:], state=st, return_state=True)
    for a, b in [(st.k, before.k), (st.v, before.v), (st.hk, before.hk), (st.bank.F, before.bank.F),
                 (st.bank.h, before.bank.h), (st.bank.salience, before.bank.salience)]:
        assert torch.equal(a, b)
    assert st.position == 30 and st.bank.levels == before.bank.levels


def test_gradients_flow_through_the_state():
    """Backprop through a streamed sequence (no detach) equals backprop through one call."""
    attn = make(top_k=2)
    x = torch.randn(2, 22, D, dtype=torch.float64)
    dy = torch.randn(2, 22, D, dtype=torch.float64)
    (attn(x) * dy).sum().backward()
    g_one = [p.grad.clone() for p in attn.parameters()]
    attn.zero_grad()
    ys, _ = run_pieces(attn, x, [0, 5, 6, 17, 22])
    (ys * dy).sum().backward()
    for g, p in zip(g_one, attn.parameters()):
        assert_rel_close(p.grad, g, 1e-12)


def test_chunk_size_one_and_head_dim_one():
    attn = BSBRAttention(3, 3, 1, top_k=None).double()
    x = torch.randn(2, 9, 3, dtype=torch.float64)
    ys, st = run_pieces(attn, x, [0, 1, 4, 9])
    assert_rel_close(ys, attn(x), 1e-12)
    assert st.bank.n == 9 and st.k.shape[2] == 0


def test_exact_state_grows_one_slot_per_chunk():
    attn = make()
    x = torch.randn(1, 20, D, dtype=torch.float64)
    _, s1 = attn(x[:, :8], return_state=True)
    _, s2 = attn(x[:, 8:], state=s1, return_state=True)
    K = D // H
    slot = H * (K * K + M + 1) * 8                     # F, h and salience per head, float64
    assert s2.nbytes() - s1.nbytes() == 3 * slot
    assert isinstance(s2, BSBRState) and s2.batch_size == 1


def test_bad_input_raises_clearly():
    with pytest.raises(ValueError, match="d_model.*multiple of n_head = 5.*24"):
        BSBRAttention(24, 5, 4)
    with pytest.raises(ValueError, match="chunk_size.*>= 1.*0"):
        BSBRAttention(24, 3, 0)
    with pytest.raises(ValueError, match="top_k.*>= 1.*0"):
        BSBRAttention(24, 3, 4, top_k=0)
    with pytest.raises(TypeError, match="chunk_size"):
        BSBRAttention(24, 3, 4.0)
    with pytest.raises(ValueError, match="backend"):
        BSBRAttention(24, 3, 4, backend="cuda")
    with pytest.raises(TypeError, match="bank"):
        BSBRAttention(24, 3, 4, bank="big")
    attn = make()
    with pytest.raises(ValueError, match=r"x: expected shape \[B,T,D\] with D = 24, got \[2, 5\]"):
        attn(torch.randn(2, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"x: expected shape.*got \[2, 5, 23\]"):
        attn(torch.randn(2, 5, 23, dtype=torch.float64))
    with pytest.raises(ValueError, match="T >= 1"):
        attn(torch.randn(2, 0, D, dtype=torch.float64))
    with pytest.raises(TypeError, match="x: expected a floating tensor"):
        attn(torch.ones(2, 5, D, dtype=torch.long))
    x = torch.randn(2, 6, D, dtype=torch.float64)
    _, st = attn(x, return_state=True)
    with pytest.raises(ValueError, match="batch size 3.*got batch size 2"):
        attn(torch.randn(3, 2, D, dtype=torch.float64), state=st)
    other = make(bank=BankConfig(slots_per_level=(4, 2, 2)))
    with pytest.raises(ValueError, match="different configuration.*bank"):
        other(x, state=st)
    other = BSBRAttention(D, H, 6, meta_dim=M).double()
    with pytest.raises(ValueError, match="chunk_size: state has 4, module has 6"):
        other(x, state=st)
    with pytest.raises(TypeError, match="state: expected a BSBRState"):
        attn(x, state={"k": 1})


def test_default_scale_is_one_over_sqrt_head_dim():
    attn = make(dtype=torch.float32)
    attn2 = make(dtype=torch.float32, scale=1.0 / math.sqrt(D // H))
    attn2.load_state_dict(attn.state_dict())
    x = torch.randn(1, 11, D)
    assert torch.equal(attn(x), attn2(x))


@pytest.mark.parametrize("bank", [None, BankConfig(slots_per_level=(2, 1))])
def test_stream_in_place_equals_the_functional_state(bank):
    """bsbr_stream(inplace=True) writes the next state into the given one: the same outputs
    and state as the functional path, token by token across chunk completions, merges and
    archive folds; a bounded bank and the partial-chunk buffers keep their tensors."""
    attn = make(top_k=2, bank=bank)
    x = torch.randn(2, 41, D, dtype=torch.float64)
    def heads(t):                                     # [B,T,H·d] -> [B,H,T,d]
        return t.view(2, 41, H, -1).transpose(1, 2)

    q, k, v = (heads(W(x)) for W in (attn.W_q, attn.W_k, attn.W_v))
    r, hk = heads(attn.W_r(x)), heads(attn.W_h(x))
    functional, inplace = attn.init_state(2), attn.init_state(2)
    kept = [t.data_ptr() for t in (inplace.bank.F, inplace.bank.salience, inplace.k, inplace.hk)]
    with torch.no_grad():
        for a, b in zip([0, 7] + list(range(8, 41)), [7] + list(range(8, 42))):
            piece = [t[:, :, a:b] for t in (q, k, v, r, hk)]
            o1, functional = stream_mod.bsbr_stream(*piece[:3], functional, attn.spec,
                                                    r=piece[3], hk=piece[4])
            o2, same = stream_mod.bsbr_stream(*piece[:3], inplace, attn.spec, r=piece[3],
                                              hk=piece[4], inplace=True)
            assert same is inplace and torch.equal(o1, o2), f"tokens {a}:{b}"
    for a, b in [(functional.bank.F, inplace.bank.F), (functional.bank.h, inplace.bank.h),
                 (functional.bank.salience, inplace.bank.salience)]:
        assert torch.equal(a, b)
    f = functional.fill
    assert f == inplace.fill == 41 % C and functional.bank.levels == inplace.bank.levels
    assert torch.equal(functional.k[:, :, :f], inplace.k[:, :, :f])
    if bank is not None:
        assert inplace.bank.levels[0] == bank.n_levels                 # the archive is in use
        assert [t.data_ptr() for t in (inplace.bank.F, inplace.bank.salience, inplace.k,
                                        inplace.hk)] == kept


def test_constructor_arguments_are_documented():
    doc = BSBRAttention.__init__.__doc__
    assert all(name in doc for name in ("chunk_size", "top_k", "bank", "meta_dim", "long_scale"))
