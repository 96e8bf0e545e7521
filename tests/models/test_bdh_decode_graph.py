"""Decoding with the RoPE position on the device, and the CUDA-graph decode step
(glassbrain.cuda_graph, through bdh.decode.BDHDecoder) against eager decoding."""
import pytest
import torch

from kernels.rope import pair_freqs64, rotate_at, rotate_neurons
from kernels.rope import rotate_reference as _rotate
from kernels.rope.triton_rotate import rope_rotate_triton
from helpers import assert_rel_close, rel_err
from test_bdh_streaming import make_model      # small BDH, sharpened logits, backend torch

@pytest.mark.parametrize("start", [0, 7, 1_000_003])
def test_triton_rope_reads_the_position_from_the_device(kernel_device, poison_empty, start):
    x = torch.randn(1, 3, 1, 72, device=kernel_device)
    pos = torch.tensor([start], dtype=torch.int64, device=kernel_device)
    out = rope_rotate_triton(x, pos, False, pair_freqs64(72, x.device))
    assert_rel_close(out, _rotate(x.double(), start, False), 1e-5, "rotated at device position")


@pytest.mark.parametrize("start", [3, 999_999])
def test_rotate_at_equals_rotate_neurons(start):
    x = torch.randn(2, 2, 1, 16)
    out = rotate_at(x, torch.tensor([start]))
    assert_rel_close(out, rotate_neurons(x, start), 1e-6, "rotate_at")
    assert (out - rotate_neurons(x, start + 1)).abs().max() > 1e-3    # the position matters


@pytest.mark.parametrize("bad", [3, torch.tensor([3], dtype=torch.int32), torch.tensor([1, 2])])
def test_rotate_at_rejects_a_bad_position(bad):
    with pytest.raises(TypeError, match="position"):
        rotate_at(torch.randn(1, 1, 1, 8), bad)


def test_rope_positions_per_row_equal_each_row_alone():
    """One start position per row (a tuple: differentiable; a device tensor [B]: decoding), as
    BDH's attention rotates a batch of streams at different positions: each row as if alone,
    and the gradient is each row's inverse rotation."""
    model = make_model(backend="torch")
    starts = (3, 999_999, 0)
    xs = torch.randn(3, 2, 4, model.config.N, requires_grad=True)      # [B, nh, T, N]
    out = model.attn.rotate(xs, starts)
    g = torch.randn_like(out)
    out.backward(g)
    for b, s in enumerate(starts):
        assert_rel_close(out[b], rotate_neurons(xs[b:b + 1], s)[0], 1e-6, f"row {b}")
        assert_rel_close(xs.grad[b], _rotate(g[b].double(), s, True), 1e-6, f"grad row {b}")
    at = model.attn.rotate(xs.detach(), torch.tensor(starts))
    assert_rel_close(at, out, 1e-6, "device positions [B]")
    assert rel_err(out[0], rotate_neurons(xs[:1], 4)[0]) > 1e-3        # the position matters
    with pytest.raises(ValueError, match="start"):
        rotate_neurons(xs, (1, 2))


def test_generate_cuda_graph_argument_is_checked():
    model = make_model(backend="torch")
    idx = torch.randint(0, 256, (1, 4))
    with pytest.raises(ValueError, match="cuda_graph"):
        model.generate(idx, 4, top_k=1, cuda_graph="yes")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="cuda_graph=True"):
            model.generate(idx, 4, top_k=1, cuda_graph=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_graph_decoding_equals_eager_decoding_on_gpu(dtype):
    model = make_model(n_embd=64, mlp_internal_dim_multiplier=16, backend="auto")
    model = model.cuda().to(dtype)
    prompt = torch.randint(0, 256, (2, 40), device="cuda")
    eager, s_e = model.generate(prompt, 24, top_k=1, cuda_graph=False, return_state=True)
    graph, s_g = model.generate(prompt, 24, top_k=1, cuda_graph=True, return_state=True)
    assert torch.equal(graph, eager)
    assert s_g.position == s_e.position == 40 + 23
    for a, b in zip(s_g.layers, s_e.layers):
        assert_rel_close(a, b, 1e-5 if dtype == torch.float32 else 1e-2, "state")
    # sampling through the graph is reproducible with a seed
    a = model.generate(prompt, 16, top_k=5, seed=3, cuda_graph=True)
    b = model.generate(prompt, 16, top_k=5, seed=3, cuda_graph=False)
    assert torch.equal(a, b)


@pytest.mark.gpu
def test_repeated_graph_decoding_holds_no_memory():
    """Each generate(cuda_graph=True) builds and drops a captured graph: memory held afterwards must
    not grow with the number of calls (a new side stream per graph once left a 32 MiB cuBLAS
    workspace behind per call)."""
    import gc
    model = make_model(n_embd=64, mlp_internal_dim_multiplier=16, backend="auto").cuda()
    prompt = torch.randint(0, 256, (1, 20), device="cuda")
    model.generate(prompt, 8, top_k=1, cuda_graph=True)        # first: workspaces, kernels
    gc.collect()
    torch.cuda.synchronize()
    held = torch.cuda.memory_allocated()
    for _ in range(4):
        model.generate(prompt, 8, top_k=1, cuda_graph=True)
    gc.collect()
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == held
