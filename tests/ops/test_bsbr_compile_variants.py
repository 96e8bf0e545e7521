"""No BSBR kernel compiles anew for a new prompt length or decode position: the specialisation
key that Triton's JIT computes for every kernel launch (the constexpr values; each int argument
equal to 1 or divisible by 16, unless marked do_not_specialize; pointer dtypes and alignment;
the launch options) is the same set for every length of one length class (the power-of-two
bucket of kernels.launch.length_bucket), forward and backward, and for every decode step of
chunk_local_attention. Under the interpreter the key is computed as the JIT would (nothing is
compiled); on a GPU the same recorder sees the JITFunction launches."""
import inspect
import itertools

import pytest
import torch
from triton.backends.compiler import BaseBackend
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction, native_specialize_impl

from kernels.bsbr import bsbr_attention, chunk_local_attention
from kernels.launch import length_bucket

H, D, C = 1, 16, 16


def variant_key(kernel, args, kwargs):
    """The JIT's specialisation of one launch: per parameter its constexpr value or the
    (type, specialisation) Triton derives from the value; then the launch options."""
    fn = kernel.fn
    params = inspect.signature(fn).parameters
    names = list(params)
    dns = (kernel.kwargs.get("do_not_specialize") if isinstance(kernel, InterpretedFunction)
           else kernel.do_not_specialize) or ()
    dns = {names[i] if isinstance(i, int) else i for i in dns}
    bound = inspect.signature(fn).bind(*args, **{k: v for k, v in kwargs.items() if k in params})
    key = [fn.__name__]
    for name, value in bound.arguments.items():
        if "constexpr" in str(params[name].annotation):
            key.append((name, "constexpr", repr(value)))
        else:
            spec = native_specialize_impl(BaseBackend, value, False, name not in dns, True)
            key.append((name, *spec[:2]))
    key.append(tuple(sorted((k, repr(v)) for k, v in kwargs.items() if k not in params)))
    return tuple(key)


@pytest.fixture
def variants(monkeypatch):
    """The set of specialisation keys of every Triton kernel launched (cleared by the test)."""
    seen = set()
    for cls in (InterpretedFunction, JITFunction):
        real = cls.run

        def run(self, *args, grid, warmup, _real=real, **kwargs):
            seen.add(variant_key(self, args, kwargs))
            return _real(self, *args, grid=grid, warmup=warmup, **kwargs)
        monkeypatch.setattr(cls, "run", run)
    return seen


def fwd_bwd(T, top_k, device, cu_seqlens=None):
    x = [torch.randn(1, H, T, D, device=device, requires_grad=True) for _ in range(5)]
    o = bsbr_attention(*x, chunk_size=C, top_k=top_k, backend="triton", cu_seqlens=cu_seqlens)
    o.backward(torch.randn_like(o))


@pytest.mark.parametrize("lengths,top_k", [
    ((272, 375, 512), 2),                   # T % 16 == 0 or not; 17, 23, 32 chunks
    ((33, 50, 64), 8),                      # fewer chunks than top_k: 2, 3, 4
    ((33, 50, 64), None)])                  # dense routing: as many picks as chunks
def test_one_length_class_compiles_one_set_of_kernels(variants, kernel_device, lengths, top_k):
    assert len({length_bucket(T) for T in lengths}) == 1
    sets = []
    for T in lengths:
        variants.clear()
        fwd_bwd(T, top_k, kernel_device)
        sets.append(frozenset(variants))
    assert len(sets[0]) >= 10                       # the recorder saw the kernels
    for T, s in zip(lengths[1:], sets[1:]):
        assert s == sets[0], f"T = {T} compiles {len(s - sets[0])} variants T = {lengths[0]} " \
                             f"did not: {sorted(k[0] for k in s - sets[0])}"


def test_packed_batches_of_any_lengths_compile_one_set_of_kernels(variants, kernel_device):
    sets = []
    for lengths in ((90, 150), (256,), (16, 200, 31), (17, 1, 250)):
        cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32,
                          device=kernel_device)
        variants.clear()
        fwd_bwd(sum(lengths), 2, kernel_device, cu)
        sets.append(frozenset(variants))
    assert len(sets[0]) >= 10 and all(s == sets[0] for s in sets[1:])


def test_decode_steps_compile_one_local_kernel(variants, kernel_device):
    """A decode step's local attention (one query at offset = its place in the partial chunk)
    runs the same kernel at every offset, and the prefill's forward kernel too."""
    sets, chunk = [], 64
    for offset in (0, 1, 16, 37, chunk - 1):
        q = torch.randn(1, H, 1, D, device=kernel_device)
        k, v = (torch.randn(1, H, offset + 1, D, device=kernel_device) for _ in range(2))
        variants.clear()
        chunk_local_attention(q, k, v, chunk_size=chunk, offset=offset, backend="triton")
        sets.append(frozenset(variants))
    assert len(sets[0]) == 1 and all(s == sets[0] for s in sets[1:])
    variants.clear()
    x = [torch.randn(1, H, 100, D, device=kernel_device) for _ in range(3)]
    chunk_local_attention(*x, chunk_size=chunk, backend="triton")
    assert variants == sets[0]
