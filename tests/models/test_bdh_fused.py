"""BDH's fused training pieces against their references: the q = k attention Function
(kernels.rope.qk_dense) against kernels.hebbian_attention, the gated decoder product against plain
autograd, dropout through the explicit keep mask, the in-place RoPE pass, the head-major layout
(no broadcast copy of a weight) and torch.compile of a training step."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from bdh import BDH, BDHConfig
from bdh.model import gated_decode
from kernels.rope import pair_freqs64, rope_dense_attention, rotate_neurons
from kernels.rope import rotate_reference as _rotate
from helpers import assert_rel_close
from kernels import hebbian_attention

SMALL = dict(n_layer=2, n_embd=32, n_head=2, mlp_internal_dim_multiplier=8)


def reference_attention(xs, v, start):
    q = rotate_neurons(xs, start)
    return hebbian_attention(q, q, v, strict=True, backend="reference")[0]


@pytest.mark.parametrize("head_major", [False, True])
@pytest.mark.parametrize("start", [0, 1_000_003])
def test_qk_attention_matches_hebbian_attention(head_major, start):
    B, nh, T, N, D = 3, 2, 13, 10, 6
    if head_major:      # the model's layout: a [B,nh,T,N] view of a contiguous [nh,B,T,N]
        xs = torch.randn(nh, B, T, N, dtype=torch.float64).transpose(0, 1)
    else:
        xs = torch.randn(B, nh, T, N, dtype=torch.float64)
    xs.requires_grad_(True)
    v = torch.randn(B, 1, T, D, dtype=torch.float64, requires_grad=True)
    do = torch.randn(B, nh, T, D, dtype=torch.float64)
    out = rope_dense_attention(xs, v, start)
    (out * do).sum().backward()
    gx, gv = xs.grad.clone(), v.grad.clone()
    xs.grad = v.grad = None
    ref = reference_attention(xs, v, start)
    (ref * do).sum().backward()
    assert out.shape == ref.shape == (B, nh, T, D)
    assert_rel_close(out, ref, 1e-12, "a")
    assert_rel_close(gx, xs.grad, 1e-12, "dxs")
    assert_rel_close(gv, v.grad, 1e-12, "dv")


def test_qk_attention_gradcheck():
    xs = torch.randn(2, 2, 7, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 1, 7, 3, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda a, b: rope_dense_attention(a, b, 5), (xs, v))


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_gated_decode_matches_autograd(p):
    nh, M, N, D = 3, 11, 14, 5
    xs = torch.randn(nh, M, N, dtype=torch.float64).relu().requires_grad_(True)
    ys = torch.randn(nh, M, N, dtype=torch.float64).relu().requires_grad_(True)
    dec = torch.randn(nh, N, D, dtype=torch.float64, requires_grad=True)
    keep = (torch.rand(nh, M, N) >= p) if p else None
    scale = 1 / (1 - p)
    dy = torch.randn(M, D, dtype=torch.float64)
    y = gated_decode(xs, ys, keep, scale, dec)
    (y * dy).sum().backward()
    got = [t.grad.clone() for t in (xs, ys, dec)]
    for t in (xs, ys, dec):
        t.grad = None
    xy = xs * ys * (keep.double() * scale if keep is not None else 1)
    ref = (xy @ dec).sum(0)
    (ref * dy).sum().backward()
    assert_rel_close(y, ref, 1e-12, "y")
    for g, t, name in zip(got, (xs, ys, dec), ("xs", "ys", "dec")):
        assert_rel_close(g, t.grad, 1e-12, f"d{name}")
    if keep is not None:            # the mask really drops: ys's gradient is 0 where dropped
        assert (got[1][~keep] == 0).all() and (got[1][keep] != 0).any()


def _train_loss_and_grads(model, idx, seed):
    torch.manual_seed(seed)
    _, loss = model(idx, idx)
    loss.backward()
    grads = {n.removeprefix("_orig_mod."): p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def test_dropout_masks_are_random_reproducible_and_checkpoint_safe():
    cfg = dict(SMALL, dropout=0.5, backend="dense")
    torch.manual_seed(0)
    model = BDH(BDHConfig(**cfg)).train()
    ckpt = BDH(BDHConfig(**cfg, gradient_checkpointing=True)).train()
    ckpt.load_state_dict(model.state_dict())
    idx = torch.randint(0, 256, (2, 24))
    l1, g1 = _train_loss_and_grads(model, idx, seed=7)
    l2, g2 = _train_loss_and_grads(ckpt, idx, seed=7)       # recomputation redraws the same mask
    l3, _ = _train_loss_and_grads(model, idx, seed=8)
    assert torch.allclose(l1, l2, rtol=1e-6, atol=0)
    for name, g in g1.items():
        assert_rel_close(g2[name], g, 1e-5, f"grad {name}")
    assert not torch.allclose(l1, l3)                          # another seed, another mask
    with torch.no_grad():
        model.eval()
        _, le = model(idx, idx)
    assert not torch.allclose(l1, le)                          # eval: no dropout


def test_inplace_rope_pass(kernel_device):
    from kernels.rope.triton_rotate import rope_rotate_triton
    x = torch.randn(2, 3, 9, 12, device=kernel_device)
    ref = _rotate(x.double(), 77, True)
    y = rope_rotate_triton(x, 77, True, pair_freqs64(12, x.device), inplace=True)
    assert y.data_ptr() == x.data_ptr()
    assert_rel_close(x, ref, 1e-5, "rotated in place")


class _Sizes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = (0, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.numel() > self.largest[0]:
                self.largest = (t.numel(), f"{func} -> {list(t.shape)}")
        return out


def test_no_broadcast_copy_of_a_weight():
    # torch.matmul([B,1,T,D], [nh,D,N]) materialises the weight broadcast to [B,nh,D,N]
    # (and a weight gradient as large). Pick sizes where that is the largest tensor possible
    # (the dense training path holds no [B,nh,N,D] state, which would be as large).
    B, T = 4, 6
    cfg = BDHConfig(n_layer=1, n_embd=16, n_head=2, mlp_internal_dim_multiplier=4,
                    vocab_size=64, dropout=0.0, backend="dense")
    model = BDH(cfg).train()
    idx = torch.randint(0, 64, (B, T))
    with _Sizes() as sizes:
        _, loss = model(idx, idx)
        loss.backward()
    broadcast_weight = B * cfg.n_head * cfg.n_embd * cfg.N
    assert sizes.largest[0] < broadcast_weight, sizes.largest


def test_torch_compile_training_step_matches_eager():
    """Dynamo + AOT autograd on a tiny BDH (graph capture, the custom Functions, the graph
    break around the fused attention). Inductor's C++ code generation is not run on the CPU:
    it takes minutes on a 2-core CI machine; the GPU benchmark compiles with inductor."""
    cfg = BDHConfig(**SMALL, dropout=0.0, backend="dense")
    torch.manual_seed(0)
    model = BDH(cfg).train()
    idx = torch.randint(0, 256, (2, 24))
    ref_loss, ref_grads = _train_loss_and_grads(model, idx, seed=1)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager")
    loss, grads = _train_loss_and_grads(compiled, idx, seed=1)
    torch._dynamo.reset()
    assert_rel_close(loss, ref_loss, 1e-6, "loss")
    for name, g in ref_grads.items():
        assert_rel_close(grads[name], g, 1e-5, f"grad {name}")
