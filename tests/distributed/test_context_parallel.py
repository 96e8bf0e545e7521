"""Context parallelism on 2 and 3 gloo processes: every rank's outputs and every gradient equal
one single-process call on the whole sequence, split unevenly (Hebbian: strict and inclusive,
with and without decay, with an initial state; BSBR: dense and top-k routing)."""
import pytest
import torch
from helpers import assert_rel_close
from ranks import run_ranks

from kernels import bsbr_attention, hebbian_attention
from kernels.distributed import bsbr_attention_cp, hebbian_attention_cp, split_lengths

TOL = 2e-5
B, H, K, V, M = 2, 3, 5, 7, 4
T = 37
HEBBIAN_CASES = [dict(strict=s, decay=d, shared_v=sv, chunk_size=16)
                 for s, d, sv in ((True, False, False), (True, True, True), (False, False, True),
                                  (False, True, False))]
CHUNK = 4
BSBR_CASES = [dict(top_k=None), dict(top_k=2)]
LENGTHS = {2: [23, 14], 3: [5, 0, 32]}              # uneven, one rank empty
BSBR_LENGTHS = {2: [16, 21], 3: [8, 12, 17]}       # every cut at a chunk boundary


def hebbian_inputs(case, seed):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, H, T, K, generator=g) for _ in range(2))
    v = torch.randn(B, 1 if case["shared_v"] else H, T, V, generator=g)
    decay = torch.rand(H, generator=g) * 0.2 + 0.75 if case["decay"] else None
    S0 = torch.randn(B, H, K, V, generator=g)
    do, dS = torch.randn(B, H, T, V, generator=g), torch.randn(B, H, K, V, generator=g)
    return dict(q=q, k=k, v=v, decay=decay, S0=S0, do=do, dS=dS)


def bsbr_inputs(seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, T, d, generator=g) for d in (K, K, V))
    r, hk = (torch.randn(B, H, T, M, generator=g) for _ in range(2))
    return dict(q=q, k=k, v=v, r=r, hk=hk, do=torch.randn(B, H, T, V, generator=g))


def _leaf(t):
    return None if t is None else t.clone().requires_grad_()


def _grads(named):
    """Gradients by name (an empty slice, a rank with no tokens, has no gradient: an empty one)."""
    return {n: (None if t is None else t.grad if t.numel() else torch.zeros_like(t))
            for n, t in named.items()}


def run_cases(rank, world):
    """Every case on this rank: outputs and gradients of its slice."""
    out = {"hebbian": [], "bsbr": []}
    lengths = LENGTHS[world]
    sl = slice(sum(lengths[:rank]), sum(lengths[:rank + 1]))
    for i, case in enumerate(HEBBIAN_CASES):
        x = hebbian_inputs(case, i)
        q, k, v = (_leaf(x[n][:, :, sl]) for n in "qkv")
        decay = _leaf(x["decay"])
        S0 = _leaf(x["S0"]) if rank == 0 else None
        o, S = hebbian_attention_cp(q, k, v, scale=0.7, strict=case["strict"], decay=decay,
                                    initial_state=S0, output_final_state=True,
                                    chunk_size=case["chunk_size"])
        loss = (o * x["do"][:, :, sl]).sum()
        if rank == world - 1:
            loss = loss + (S * x["dS"]).sum()
        loss.backward()
        out["hebbian"].append(dict(o=o.detach(), S=S.detach(), **_grads(
            dict(q=q, k=k, v=v, decay=decay, S0=S0))))
    lengths = BSBR_LENGTHS[world]
    sl = slice(sum(lengths[:rank]), sum(lengths[:rank + 1]))
    for i, case in enumerate(BSBR_CASES):
        x = bsbr_inputs(100 + i)
        ins = {n: _leaf(x[n][:, :, sl]) for n in ("q", "k", "v", "r", "hk")}
        o = bsbr_attention_cp(*ins.values(), chunk_size=CHUNK, top_k=case["top_k"],
                              long_scale=0.5)
        (o * x["do"][:, :, sl]).sum().backward()
        out["bsbr"].append(dict(o=o.detach(), **_grads(ins)))
    return out


@pytest.fixture(scope="module", params=[2, 3])
def ranked(request, tmp_path_factory):
    world = request.param
    return world, run_ranks(run_cases, world, tmp_path_factory.mktemp("cp"))


def _cat(results, kind, i, name):
    return torch.cat([r[kind][i][name] for r in results], 2)


@pytest.mark.parametrize("i", range(len(HEBBIAN_CASES)))
def test_hebbian_cp_equals_one_call(ranked, i):
    world, results = ranked
    case = HEBBIAN_CASES[i]
    x = hebbian_inputs(case, i)
    q, k, v, decay, S0 = (_leaf(x[n]) for n in ("q", "k", "v", "decay", "S0"))
    o, S = hebbian_attention(q, k, v, scale=0.7, strict=case["strict"], decay=decay,
                             initial_state=S0, output_final_state=True,
                             chunk_size=case["chunk_size"])
    ((o * x["do"]).sum() + (S * x["dS"]).sum()).backward()
    assert_rel_close(_cat(results, "hebbian", i, "o"), o, TOL, "o")
    assert_rel_close(results[-1]["hebbian"][i]["S"], S, TOL, "final state (last rank)")
    for name, t in (("q", q), ("k", k), ("v", v)):
        assert_rel_close(_cat(results, "hebbian", i, name), t.grad, TOL, f"d{name}")
    assert_rel_close(results[0]["hebbian"][i]["S0"], S0.grad, TOL, "d initial_state")
    if decay is not None:      # replicated: each rank holds its tokens' part
        assert_rel_close(sum(r["hebbian"][i]["decay"] for r in results), decay.grad, TOL,
                         "d decay")
    # Each rank's state is the state after its last token (a prefix call's final state).
    lengths = LENGTHS[world]
    for rank in range(world - 1):
        end = sum(lengths[:rank + 1])
        _, S_cut = hebbian_attention(x["q"][:, :, :end], x["k"][:, :, :end],
                                     x["v"][:, :, :end], scale=0.7, strict=case["strict"],
                                     decay=x["decay"], initial_state=x["S0"],
                                     output_final_state=True)
        assert_rel_close(results[rank]["hebbian"][i]["S"], S_cut, TOL, f"state after {rank}")


@pytest.mark.parametrize("i", range(len(BSBR_CASES)))
def test_bsbr_cp_equals_one_call(ranked, i):
    _, results = ranked
    x = bsbr_inputs(100 + i)
    ins = {n: _leaf(x[n]) for n in ("q", "k", "v", "r", "hk")}
    o = bsbr_attention(*ins.values(), chunk_size=CHUNK, top_k=BSBR_CASES[i]["top_k"],
                       long_scale=0.5)
    (o * x["do"]).sum().backward()
    assert_rel_close(_cat(results, "bsbr", i, "o"), o, TOL, "o")
    for name, t in ins.items():
        assert_rel_close(_cat(results, "bsbr", i, name), t.grad, TOL, f"d{name}")


def refusals(rank, world):
    """Bad inputs on one rank raise on every rank, before any rank waits in a collective."""
    seen = []
    q = torch.randn(1, 2, 6, 4)
    v = torch.randn(1, 2, 6, 3)
    attempts = [
        lambda: hebbian_attention_cp(q, q, v, initial_state=torch.zeros(1, 2, 4, 3)),
        lambda: hebbian_attention_cp(q, q, v[..., :2] if rank == 1 else v),
        lambda: bsbr_attention_cp(q, q, v, q, q, chunk_size=4),      # 6 tokens: not a cut
    ]
    for attempt in attempts:
        try:
            attempt()
            seen.append(None)
        except ValueError as e:
            seen.append(str(e))
    return seen


def test_bad_inputs_raise_on_every_rank(tmp_path):
    seen = run_ranks(refusals, 2, tmp_path)
    assert "initial_state" in seen[1][0] and "rank(s) [1]" in seen[0][0]
    assert "V: every rank must pass the same value, got [3, 2]" in seen[0][1] == seen[1][1]
    assert "rank 0 holds 6 tokens, not a multiple of chunk_size=4" in seen[0][2] == seen[1][2]


def test_split_lengths_cut_at_multiples():
    assert split_lengths(37, 3) == [13, 12, 12]
    assert split_lengths(37, 3, multiple=4) == [12, 12, 13]
    assert split_lengths(5, 3, multiple=4) == [4, 0, 1]
    with pytest.raises(ValueError, match="world: expected an int >= 1, got 0"):
        split_lengths(8, 0)
