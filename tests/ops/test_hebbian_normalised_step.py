"""normalised_hebbian_step: one fused launch per decoded token, against the chunked
normalised_hebbian_attention (the same function of the whole sequence), on the PyTorch form
and the Triton kernel (interpreter on the CPU); grouped key/value heads read in place, strided
inputs, a -inf key leaves the state unchanged, and every refusal names its argument."""
import pytest
import torch
from helpers import assert_rel_close

from kernels import normalised_hebbian_attention
from kernels.hebbian import normalised_hebbian_step
from kernels.hebbian.normalised_step import normalised_step_torch

BACKENDS = ["torch", "triton"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("feature_map", ["elu", "relu"])
@pytest.mark.parametrize("groups", [1, 3])
def test_steps_equal_the_chunked_attention(backend, feature_map, groups):
    """T decode steps after a prompt equal one normalised_hebbian_attention over everything,
    with Hk = H / groups key heads (expanded for the reference) and V != K."""
    B, H, T0, T, K, V = 2, 6, 5, 4, 7, 9
    Hk = H // groups
    q = torch.randn(B, H, T0 + T, K)
    k, v = torch.randn(B, Hk, T0 + T, K), torch.randn(B, Hk, T0 + T, V)
    ke, ve = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    ref, _ = normalised_hebbian_attention(q.double(), ke.double(), ve.double(),
                                          feature_map=feature_map, backend="reference")
    with torch.no_grad():
        o0, S = normalised_hebbian_attention(q[:, :, :T0], ke[:, :, :T0], ve[:, :, :T0],
                                             feature_map=feature_map, output_final_state=True)
        ptr, outs = S.data_ptr(), []
        for t in range(T0, T0 + T):
            outs.append(normalised_hebbian_step(q[:, :, t], k[:, :, t], v[:, :, t], S,
                                                feature_map=feature_map, backend=backend))
    assert S.data_ptr() == ptr
    assert_rel_close(torch.stack(outs, 2), ref[:, :, T0:], 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_views_and_out_buffer(backend):
    """q, k, v as transposed views of one [B,1,3H,D] projection (how a model hands them over);
    o written into a [B,1,H,V] buffer's view; the kernel and the PyTorch form agree."""
    B, H, D = 3, 4, 16
    qkv = torch.randn(B, 1, 3 * H * D).view(B, 1, 3 * H, D)
    q, k, v = (qkv[:, :, i * H:(i + 1) * H].transpose(1, 2)[:, :, 0] for i in range(3))
    S0 = torch.rand(B, H, D, D + 1)
    S_ref = S0.clone()
    want = normalised_step_torch(q.contiguous(), k.contiguous(), v.contiguous(), S_ref)
    S, out = S0.clone(), torch.zeros(B, 1, H, D)
    with torch.no_grad():
        got = normalised_hebbian_step(q, k, v, S, backend=backend, out=out[:, 0])
    assert got.data_ptr() == out.data_ptr()
    assert_rel_close(out[:, 0], want, 1e-6)
    assert_rel_close(S, S_ref, 1e-6, name="state")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("feature_map", ["elu", "relu"])
def test_minus_inf_key_leaves_the_state(backend, feature_map):
    B, H, K = 2, 2, 8
    q, k, v = torch.randn(B, H, K), torch.randn(B, H, K), torch.randn(B, H, K)
    k[1] = float("-inf")
    S0 = torch.rand(B, H, K, K + 1)
    S = S0.clone()
    with torch.no_grad():
        o = normalised_hebbian_step(q, k, v, S, feature_map=feature_map, backend=backend)
    assert torch.equal(S[1], S0[1]) and not torch.equal(S[0], S0[0])
    assert torch.isfinite(o).all()


def test_bf16_inputs_on_triton_match_float32():
    B, H, K = 2, 2, 16
    q, k, v = (torch.randn(B, H, K).bfloat16() for _ in range(3))
    S0 = torch.rand(B, H, K, K + 1)
    S1, S2 = S0.clone(), S0.clone()
    with torch.no_grad():
        a = normalised_hebbian_step(q, k, v, S1, backend="triton")
        b = normalised_step_torch(q, k, v, S2)
    assert a.dtype == torch.bfloat16
    assert_rel_close(a.float(), b.float(), 1e-2)
    assert_rel_close(S1, S2, 1e-6, name="state")


def test_refusals_name_the_argument():
    q = torch.randn(1, 4, 8)
    S = torch.zeros(1, 4, 8, 9)
    with pytest.raises(ValueError, match="k: expected"):
        normalised_hebbian_step(q, torch.randn(1, 3, 8), torch.randn(1, 3, 8), S)
    with pytest.raises(ValueError, match="v: expected"):
        normalised_hebbian_step(q, q, torch.randn(1, 2, 8), S)
    with pytest.raises(ValueError, match="state: expected"):
        normalised_hebbian_step(q, q, q, torch.zeros(1, 4, 8, 8))
    with pytest.raises(ValueError, match="state: expected"):
        normalised_hebbian_step(q, q, q, S.double())
    with pytest.raises(ValueError, match="out: expected"):
        normalised_hebbian_step(q, q, q, S, out=torch.zeros(1, 4, 9))
    with pytest.raises(ValueError, match="feature_map"):
        normalised_hebbian_step(q, q, q, S, feature_map="softmax")
    with pytest.raises(ValueError, match="not differentiable"):
        normalised_hebbian_step(q.requires_grad_(), q, q, S)
