"""kernels.deltanet: the chunked WY/UT form and the step against the token-by-token recurrence."""
import pytest
import torch
import torch.nn.functional as F
from helpers import assert_rel_close

from kernels.deltanet import (chunk_delta_rule_torch, delta_rule, delta_rule_recurrent,
                              delta_rule_step)


def _inputs(B=2, H=3, T=37, K=5, V=7, dtype=torch.float64, requires_grad=False):
    q = torch.randn(B, H, T, K, dtype=dtype)
    k = F.normalize(torch.randn(B, H, T, K, dtype=dtype), dim=-1)
    v = torch.randn(B, H, T, V, dtype=dtype)
    beta = torch.rand(B, H, T, dtype=dtype) * 0.9 + 0.05
    S0 = torch.randn(B, H, K, V, dtype=dtype)
    ts = [q, k, v, beta, S0]
    if requires_grad:
        for t in ts:
            t.requires_grad_(True)
    return ts


def _explicit_delta(q, k, v, beta, S0, scale):
    """A second, independent statement of the rule: S ← (I − β kᵀk) S + β kᵀ v, per (b, h)."""
    B, H, T, K = q.shape
    o = torch.zeros(B, H, T, v.shape[-1], dtype=q.dtype)
    S_all = S0.clone()
    for b in range(B):
        for h in range(H):
            S = S0[b, h].clone()
            for t in range(T):
                kt, vt = k[b, h, t][None], v[b, h, t][None]             # [1,K], [1,V]
                S = (torch.eye(K, dtype=q.dtype) - beta[b, h, t] * kt.T @ kt) @ S \
                    + beta[b, h, t] * kt.T @ vt
                o[b, h, t] = scale * (q[b, h, t][None] @ S)[0]
            S_all[b, h] = S
    return o, S_all


def test_recurrent_matches_explicit_matrix_form():
    q, k, v, beta, S0 = _inputs(B=2, H=2, T=9, K=3, V=4)
    o, S = delta_rule_recurrent(q, k, v, beta, scale=0.7, initial_state=S0)
    o_ref, S_ref = _explicit_delta(q, k, v, beta, S0, 0.7)
    assert_rel_close(o, o_ref, 1e-12, "o")
    assert_rel_close(S, S_ref, 1e-12, "S")


@pytest.mark.parametrize("T,chunk", [(37, 16), (16, 16), (5, 64), (70, 32)])
def test_chunked_equals_recurrent_fp64(T, chunk):
    q, k, v, beta, S0 = _inputs(T=T)
    o_ref, S_ref = delta_rule_recurrent(q, k, v, beta, scale=0.5, initial_state=S0)
    o, S = chunk_delta_rule_torch(q, k, v, beta, scale=0.5, initial_state=S0, chunk_size=chunk)
    assert_rel_close(o, o_ref, 1e-12, "o")
    assert_rel_close(S, S_ref, 1e-12, "S")


def test_chunked_float32_close_to_fp64_reference():
    q, k, v, beta, S0 = _inputs(T=45, K=6, V=10)
    o_ref, S_ref = delta_rule_recurrent(q, k, v, beta, initial_state=S0)
    o, S = delta_rule(*(t.float() for t in (q, k, v, beta)), initial_state=S0.float(),
                      output_final_state=True, chunk_size=16, backend="torch")
    assert o.dtype == torch.float32 and S.dtype == torch.float32
    assert_rel_close(o, o_ref, 1e-5, "o")
    assert_rel_close(S, S_ref, 1e-5, "S")


def test_chunked_gradients_match_recurrent():
    ins = _inputs(B=1, H=2, T=21, K=4, V=3, requires_grad=True)
    do = torch.randn(1, 2, 21, 3, dtype=torch.float64)
    dS = torch.randn(1, 2, 4, 3, dtype=torch.float64)
    grads = []
    for fn in (delta_rule_recurrent, lambda *a, **kw: chunk_delta_rule_torch(*a, chunk_size=8,
                                                                             **kw)):
        o, S = fn(*ins[:4], initial_state=ins[4])
        g = torch.autograd.grad((o * do).sum() + (S * dS).sum(), ins)
        grads.append(g)
    for name, a, b in zip(["q", "k", "v", "beta", "initial_state"], grads[1], grads[0]):
        assert_rel_close(a, b, 1e-10, f"d{name}")


def test_streaming_split_equals_one_call():
    q, k, v, beta, S0 = _inputs(T=30)
    o_full, S_full = delta_rule(q, k, v, beta, initial_state=S0, output_final_state=True,
                                chunk_size=8, backend="torch")
    o1, S1 = delta_rule(q[:, :, :11], k[:, :, :11], v[:, :, :11], beta[:, :, :11],
                        initial_state=S0, output_final_state=True, chunk_size=8, backend="torch")
    o2, S2 = delta_rule(q[:, :, 11:], k[:, :, 11:], v[:, :, 11:], beta[:, :, 11:],
                        initial_state=S1, output_final_state=True, chunk_size=8, backend="torch")
    assert_rel_close(torch.cat([o1, o2], 2), o_full, 1e-12)
    assert_rel_close(S2, S_full, 1e-12)


def test_step_equals_recurrent_and_keeps_given_state():
    q, k, v, beta, S0 = _inputs(T=6)
    o_ref, S_ref = delta_rule_recurrent(q, k, v, beta, scale=0.3, initial_state=S0)
    S, S0_copy = S0, S0.clone()
    for t in range(6):
        o, S = delta_rule_step(q[:, :, t], k[:, :, t], v[:, :, t], beta[:, :, t], S, scale=0.3)
        assert_rel_close(o, o_ref[:, :, t], 1e-12, f"o[{t}]")
    assert_rel_close(S, S_ref, 1e-12, "S")
    assert torch.equal(S0, S0_copy)


def test_causality_perturbation():
    q, k, v, beta, S0 = _inputs(T=25)
    o, _ = delta_rule(q, k, v, beta, chunk_size=16, backend="torch")
    t = 13
    v2, k2 = v.clone(), k.clone()
    v2[:, :, t] += 1.0
    k2[:, :, t] = F.normalize(torch.randn_like(k2[:, :, t]), dim=-1)
    o2, _ = delta_rule(q, k2, v2, beta, chunk_size=16, backend="torch")
    assert torch.equal(o[:, :, :t], o2[:, :, :t])
    assert not torch.allclose(o[:, :, t:], o2[:, :, t:])


def test_bad_inputs_raise():
    q, k, v, beta, S0 = _inputs(T=4)
    with pytest.raises(ValueError, match="k: expected shape"):
        delta_rule(q, k[:, :, :3], v, beta)
    with pytest.raises(ValueError, match="beta"):
        delta_rule(q, k, v, beta[:, :1])
    with pytest.raises(TypeError, match="v: expected a floating"):
        delta_rule(q, k, v.long(), beta)
    with pytest.raises(ValueError, match="initial_state"):
        delta_rule(q, k, v, beta, initial_state=S0[:, :, :2])
    with pytest.raises(ValueError, match="backend"):
        delta_rule(q, k, v, beta, backend="cuda")
    with pytest.raises(ValueError, match="chunk_size"):
        delta_rule(q, k, v, beta, chunk_size=0)
    with pytest.raises(ValueError, match="state"):
        delta_rule_step(q[:, :, 0], k[:, :, 0], v[:, :, 0], beta[:, :, 0], None)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="fla"):
            delta_rule(q, k, v, beta, backend="fla")


@pytest.mark.gpu
def test_auto_backend_on_cuda_matches_reference():
    q, k, v, beta, S0 = _inputs(B=2, H=4, T=200, K=64, V=64)
    o_ref, S_ref = delta_rule_recurrent(q, k, v, beta, scale=0.125, initial_state=S0)
    cu = [t.float().cuda() for t in (q, k, v, beta, S0)]
    o, S = delta_rule(*cu[:4], scale=0.125, initial_state=cu[4], output_final_state=True)
    assert_rel_close(o, o_ref, 1e-3, "o")
    assert_rel_close(S, S_ref, 1e-3, "S")


@pytest.mark.gpu
def test_auto_backend_bf16_on_cuda_matches_reference():
    """16-bit CUDA inputs take fla's kernel when fla is installed (our chunked form otherwise);
    float32 ones always take ours (fla refuses them)."""
    q, k, v, beta, S0 = _inputs(B=2, H=4, T=200, K=64, V=64)
    o_ref, S_ref = delta_rule_recurrent(q, k, v, beta, scale=0.125, initial_state=S0)
    cu = [t.to("cuda", torch.bfloat16) for t in (q, k, v, beta)] + [S0.float().cuda()]
    o, S = delta_rule(*cu[:4], scale=0.125, initial_state=cu[4], output_final_state=True)
    assert o.dtype == torch.bfloat16 and S.dtype == torch.float32
    assert_rel_close(o, o_ref, 3e-2, "o")
    assert_rel_close(S, S_ref, 3e-2, "S")
