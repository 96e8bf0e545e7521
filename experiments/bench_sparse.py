"""Sparse against dense BDH decoding: the "sparse" item of `experiments.bench_bdh`.

    python -m experiments.bench_sparse [--checkpoint PATH] [--out DIR]

(the same as ``python -m experiments.bench_bdh --items sparse``; on a CPU a smoke of a tiny
model, 10 to 20 s, measured on a 2-core CPU shared with other work).

For each weight set (a trained checkpoint from `experiments.train` when --checkpoint is given,
and random weights, labelled as such), each prompt length and each batch size:

* the prompt goes once through the chunked kernel (`model.generate(prompt, 0, return_state)`);
* from a copy of that state, a `bdh.decode.BDHDecoder` decodes greedily, replaying a captured
  CUDA graph of the dense step, and from other copies one of the sparse step
  (`bdh.sparse_decode`), with its fused layer kernels and with the unfused ones (each launch
  passed per call, `SparseDecodeLaunch`); the first step of each runs eagerly and captures the
  graph (untimed), the next ``new_tokens`` are timed;
* tok/s counts every sequence of the batch (B · new_tokens / seconds);
* "same tokens" compares the two greedy continuations (they differ only by float32 summation
  order, so a near-tie in the logits can flip a token and everything after it);
* the density is measured while decoding: a `SparsityProbe` over ``density_tokens`` eager steps
  from the same state, the mean over layers of the fraction of xs and xy entries > 0 (the sparse
  step reads the state rows of RoPE(xs) ≠ 0, a superset of xs's pairs, and the decoder rows of
  xy ≠ 0).

A trained model reads text: its prompts are windows of the corpus's validation split. Random
weights read random bytes. On the CPU the same code runs eagerly (no graphs) on a tiny model.
"""
from __future__ import annotations

import dataclasses

import torch

from .harness import PeakMemory, cuda_kernel_profile


def make_prompts(B: int, P: int, device, text: bytes | None, seed: int = 0) -> torch.Tensor:
    """[B, P] byte ids: B windows of ``text`` (evenly spaced) or, without text, random bytes."""
    g = torch.Generator().manual_seed(seed)
    if text is None:
        return torch.randint(0, 256, (B, P), generator=g).to(device)
    if len(text) < P:
        text = text * (P // len(text) + 1)
    data = torch.frombuffer(bytearray(text), dtype=torch.uint8).long()
    starts = torch.linspace(0, len(data) - P, B).long()
    return torch.stack([data[s:s + P] for s in starts.tolist()]).to(device)


def _decoder(model, state, sparse: bool, launch, eager: bool = False):
    """A `BDHDecoder` on a copy of ``state``: the sparse step (``launch``: its
    `SparseDecodeLaunch`) or the dense one, captured in a CUDA graph on CUDA unless ``eager``."""
    from bdh.decode import BDHDecoder
    if sparse:
        return BDHDecoder(model, state.batch_size, "sparse", capture=False if eager else None,
                          launch=launch, state=state.clone())
    return BDHDecoder(model, state.batch_size, "eager" if eager else "auto", launch=launch,
                      state=state.clone())


@torch.no_grad()
def decode_greedy(model, state, first, n: int, sparse: bool, launch=None):
    """n greedy tokens after ``first`` [B,1] from a copy of ``state``, through the sparse step
    (``launch``: its `SparseDecodeLaunch`, e.g. fused=False for the unfused kernels) or the
    dense one. Returns (tokens [B, n] on the CPU, seconds of the n timed steps, their peak
    memory)."""
    dec = _decoder(model, state, sparse, launch)
    nxt = dec.step(first).argmax(-1, keepdim=True)            # step 1 (and capture): untimed
    out = torch.empty(first.shape[0], n, dtype=torch.long, device=first.device)
    with PeakMemory(first.device) as m:          # the n steps' interval, synchronised
        for i in range(n):
            out[:, i:i + 1] = nxt
            nxt = dec.step(nxt).argmax(-1, keepdim=True)
    return out.cpu(), m.seconds, m.peak


@torch.no_grad()
def profile_steps(model, state, first, sparse: bool, launch=None, steps: int = 3,
                  top: int = 15) -> list[dict]:
    """CUDA time per kernel over ``steps`` eager decoding steps from a copy of ``state``
    (torch.profiler; eager, so launch gaps are not in these numbers, only kernel times): the
    ``top`` kernels by total time, [{"name", "calls", "us_total"}], per step. [] on the CPU."""
    if first.device.type != "cuda":
        return []
    dec = _decoder(model, state, sparse, launch, eager=True)
    tok = first

    def one(i):                            # i = 0 is the untraced warm-up (compile)
        nonlocal tok
        tok = dec.step(tok).argmax(-1, keepdim=True)
    return cuda_kernel_profile(one, steps, top)


@torch.no_grad()
def decode_density(model, state, first, n: int) -> dict:
    """Mean over layers of the xs / xy density over n eager greedy steps from ``state``."""
    from bdh.probes import SparsityProbe
    probe = SparsityProbe(model)
    with probe:
        model.generate(first, n, top_k=1, state=state, cuda_graph=False)
    per_layer = probe.densities()
    return {k: sum(d[k] for d in per_layer) / len(per_layer) for k in ("xs", "ys", "xy")}


def bench_sparse_decode(b, model, weights: str, P: int, B: int, new_tokens: int,
                        density_tokens: int, text: bytes | None, profile: bool = False) -> None:
    """Three rows (dense, sparse fused, sparse unfused) of `experiments.bench_bdh`'s Bench
    ``b``; with ``profile``, each row also gets the kernel profile of three eager steps."""
    from .bench_bdh import make_row
    prompt = make_prompts(B, P, b.dev, text)
    with torch.no_grad():
        _, st = model.generate(prompt, 0, return_state=True)  # all but the last prompt token
    first = prompt[:, -1:]
    dens = decode_density(model, st, first, density_tokens)
    # (label, sparse, launch): the unfused sparse kernels are timed too, for the A/B
    from bdh.sparse_decode import sparse_decode_launch
    tuned = sparse_decode_launch(model, B)
    variants = [("dense", False, None), ("sparse", True, tuned),
                ("sparse unfused", True, dataclasses.replace(tuned, fused=False))]
    runs = {v[0]: decode_greedy(model, st, first, new_tokens, v[1], v[2]) for v in variants}
    shape = f"B{B} prompt {P}, {new_tokens} new"
    where = "graph" if b.dev.type == "cuda" else "eager"
    for label, sparse, launch in variants:
        note = (f"{weights} weights; density while decoding xs {dens['xs']:.3f}, "
                f"xy {dens['xy']:.4f}")
        same = agree = None
        if sparse:
            eq = runs[label][0] == runs["dense"][0]
            same, agree = int(eq.all(dim=1).sum()), float(eq.float().mean())
            note += (f"; same greedy tokens as dense in {same}/{B} sequences "
                     f"({100 * agree:.1f}% of tokens)")
        row = make_row("sparse decode", f"ours {label} ({where})", shape, runs[label][1],
                       B * new_tokens, runs[label][2], note=note)
        row.update(weights=weights, batch=B, prompt=P, density=dens, same_sequences=same,
                   token_agreement=agree)
        if profile:                         # where a step spends its GPU time, per kernel
            try:
                row["profile"] = profile_steps(model, st, first, sparse, launch)
            except Exception as exc:                # noqa: BLE001 (the timing row still counts)
                row["profile"] = [{"name": f"profile failed: {type(exc).__name__}: {exc}"[:200],
                                   "calls": 0, "us_total": 0.0}]
            for k in row["profile"][:8]:
                print(f"  {label:15s} {k['us_total']:8.1f} us/step  x{k['calls']:<3d} "
                      f"{k['name'][:70]}")
        b.add(row)


def main(argv=None) -> list[dict]:
    """`experiments.bench_bdh` with its sparse item only (its flags, checked the same way)."""
    import sys

    from .bench_bdh import main as bench_bdh_main
    from .harness import fail
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a == "--items" or a.startswith("--items=") for a in argv):
        fail("--items: experiments.bench_sparse runs the sparse item only (use "
             "experiments.bench_bdh for the others)")
    return bench_bdh_main(["--items", "sparse", *argv])


if __name__ == "__main__":
    main()
