"""Benchmark the Hebbian attention kernels against their peers, in one process.

    python -m experiments.bench_kernels                 # GPU: full table; CPU: a correctness smoke
    python -m experiments.bench_kernels --shapes bdh    # one shape
    python -m experiments.bench_kernels --no-fla        # skip fla even when importable

Peers, all timed with triton.testing.do_bench (median, random inputs, never zeros):
  ours       kernels.hebbian_attention / hebbian_step, backend="triton"
  fla        fla.ops.linear_attn.chunk_linear_attn (fwd, and fwd+bwd: with normalize=False it is
             chunk_simple_gla with autograd) and fused_recurrent_linear_attn (decode), when
             `fla` is importable. fla's linear attention is *inclusive*: for like-for-like
             timings ours runs inclusive too (strict=False; strict costs the same), both with
             scale=1 and no normalization. fla has no shared-v mode: at the BDH shape it gets
             v expanded per head (a real [B,T,H,V] copy, made outside the timed region).
  torch      kernels.chunk_hebbian_torch (plain PyTorch, cuBLAS), the same chunk size.
  reference  kernels.hebbian_recurrent (token by token): forward only, one timed run after a
             short warm-up, and only where its state traffic is small enough to finish quickly.

bf16 inputs, float32 state. Ours picks its forward algorithm and chunk sizes per shape
(`kernels.hebbian.plan.plan`, noted per row); the torch path uses chunk 64. Reported per config: ms, tokens/s, achieved TFLOP/s and,
for the decode step, GB/s of state traffic. FLOPs counted (chunk C, per batch·head):
  fwd     = 4·T·K·V (state update + inter-chunk output) + 2·T·C·(K + V) (intra-chunk QKᵀ, AV)
  fwd+bwd = 3 × fwd (the backward's dQ, dK, dV, dS products; our recompute of the chunk
            states is not counted)
  decode  state traffic = 2 · B·H·K·V · 4 bytes (read + write of the float32 state)
Each timed config is also checked against the torch path (relative error of o, S, and grads).
Writes JSON and a Markdown table to --out and prints the table at the end.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

if not torch.cuda.is_available():
    # The CPU smoke runs the Triton kernels in the interpreter; set before triton is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kernels import chunk_hebbian_torch, hebbian_attention, hebbian_recurrent, hebbian_step  # noqa: E402
from kernels.hebbian.torch_chunk import step_hebbian_torch  # noqa: E402

from .results import markdown_table, run_meta, write_json  # noqa: E402


@dataclass
class Shape:
    name: str
    B: int
    T: int
    H: int
    K: int
    V: int
    shared_v: bool = False


SHAPES = {
    "bdh": Shape("bdh", 1, 4096, 4, 8192, 256, shared_v=True),
    "k128": Shape("k128", 8, 4096, 16, 128, 128),
    "k256": Shape("k256", 4, 4096, 8, 256, 256),
    "long": Shape("long", 2, 16384, 16, 128, 128),
}
CHUNK = 64


def rel_err(a, b):
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm()).item()


def fwd_flops(s: Shape) -> float:
    return s.B * s.H * (4 * s.T * s.K * s.V + 2 * s.T * CHUNK * (s.K + s.V))


def bench(fn, rep_ms, grad_to_none=None):
    import triton.testing
    return triton.testing.do_bench(fn, warmup=max(10, rep_ms // 4), rep=rep_ms,
                                   grad_to_none=grad_to_none, return_mode="median")


def bench_graph(fn, rep_ms):
    """Median ms of ``fn`` captured once in a CUDA graph and replayed (no launch overhead)."""
    import triton.testing
    return triton.testing.do_bench_cudagraph(fn, rep=rep_ms, return_mode="median")


def rotating_states(h0, min_bytes=256 << 20, most=16):
    """Copies of the state whose total is ≥ min_bytes (at least 2, at most ``most``)."""
    n = max(2, min(most, -(-min_bytes // (h0.numel() * h0.element_size()))))
    return [h0.clone() for _ in range(n)]


def load_fla():
    try:
        from fla.ops.linear_attn import chunk_linear_attn, fused_recurrent_linear_attn
        import fla
        return chunk_linear_attn, fused_recurrent_linear_attn, getattr(fla, "__version__", "?")
    except Exception as exc:                                   # noqa: BLE001
        print(f"fla not available ({type(exc).__name__}: {exc}); fla columns skipped")
        return None


def row(shape, what, impl, ms, flops=None, state_bytes=None, err=None, note=""):
    r = {"shape": shape.name, "B,T,H,K,V": f"{shape.B},{shape.T},{shape.H},{shape.K},{shape.V}"
         + (" (v shared)" if shape.shared_v else ""), "pass": what, "impl": impl,
         "ms": ms, "tok/s": None, "TFLOP/s": None, "GB/s": None, "err vs torch": err,
         "note": note}
    if ms is not None:
        if what == "decode":
            r["tok/s"] = shape.B / (ms * 1e-3)
            r["GB/s"] = state_bytes / (ms * 1e-3) / 1e9
        else:
            r["tok/s"] = shape.B * shape.T / (ms * 1e-3)
            r["TFLOP/s"] = flops / (ms * 1e-3) / 1e12
    return r


def run_shape(s: Shape, fla, rep_ms, do_reference):
    dev = torch.device("cuda")
    dt = torch.bfloat16
    HV = 1 if s.shared_v else s.H
    q = torch.randn(s.B, s.H, s.T, s.K, device=dev, dtype=dt)
    k = torch.randn(s.B, s.H, s.T, s.K, device=dev, dtype=dt)
    v = torch.randn(s.B, HV, s.T, s.V, device=dev, dtype=dt)
    # Scale so o stays O(1) in bf16 (the timing does not depend on it).
    scale = 1.0 / (s.K * 8)
    do = torch.randn(s.B, s.H, s.T, s.V, device=dev, dtype=dt)
    h0 = torch.randn(s.B, s.H, s.K, s.V, device=dev)
    ff = fwd_flops(s)
    rows = []

    def ours(q_, k_, v_, h0_=None, final=False):
        return hebbian_attention(q_, k_, v_, scale=scale, strict=False, initial_state=h0_,
                                 output_final_state=final, backend="triton")

    def torch_path(q_, k_, v_, h0_=None):
        return chunk_hebbian_torch(q_, k_, v_, scale=scale, strict=False, initial_state=h0_,
                                   chunk_size=CHUNK)

    # ---- correctness vs the torch path (forward and gradients), one run each
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    o_t, S_t = torch_path(*leaves, h0)
    (o_t.float() * do.float()).sum().backward()
    g_t = [x.grad for x in leaves]
    del leaves
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    o_o, S_o = ours(*leaves, h0, final=True)
    (o_o.float() * do.float()).sum().backward()
    err_fwd = max(rel_err(o_o, o_t), rel_err(S_o, S_t))
    err_bwd = max(rel_err(a.grad, b) for a, b in zip(leaves, g_t))
    del leaves, g_t, o_o, S_o
    print(f"[{s.name}] ours vs torch: fwd rel err {err_fwd:.2e}, grads {err_bwd:.2e}", flush=True)

    # ---- forward
    from kernels.hebbian.plan import default_chunk_launch, plan
    p = plan(s.B, s.H, s.K, s.V, default_chunk_launch(s.B, s.H, s.K, s.V, q.dtype, q.device))
    how = f"{'fused' if p.fused else 'split'} fwd, chunk {p.BT}"
    ms = bench(lambda: ours(q, k, v), rep_ms)
    rows.append(row(s, "fwd", "ours", ms, ff, err=err_fwd, note=how))
    ms = bench(lambda: torch_path(q, k, v), rep_ms)
    rows.append(row(s, "fwd", "torch chunk", ms, ff, err=0.0))
    if fla is not None:
        chunk_la, _, _ = fla
        qf, kf = (x.transpose(1, 2).contiguous() for x in (q, k))
        vf = v.expand(s.B, s.H, s.T, s.V).transpose(1, 2).contiguous()
        o_f, _ = chunk_la(qf, kf, vf, scale=scale, normalize=False)
        err_f = rel_err(o_f.transpose(1, 2), o_t)
        ms = bench(lambda: chunk_la(qf, kf, vf, scale=scale, normalize=False), rep_ms)
        rows.append(row(s, "fwd", "fla chunk_linear_attn", ms, ff, err=err_f,
                        note="fla: v copied per head" if s.shared_v else ""))
    if do_reference:
        ref_ms = time_reference(q, k, v, scale)
        rows.append(row(s, "fwd", "reference (recurrent)", ref_ms, ff,
                        note="one run, not do_bench"))

    # ---- forward + backward
    qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
    ms = bench(lambda: ours(qg, kg, vg)[0].backward(do), rep_ms, grad_to_none=[qg, kg, vg])
    rows.append(row(s, "fwd+bwd", "ours", ms, 3 * ff, err=err_bwd,
                    note=f"{how}; bwd chunk {p.BT_bwd}"))
    try:
        ms = bench(lambda: torch_path(qg, kg, vg)[0].backward(do), rep_ms,
                   grad_to_none=[qg, kg, vg])
        rows.append(row(s, "fwd+bwd", "torch chunk", ms, 3 * ff, err=0.0))
    except torch.OutOfMemoryError:
        rows.append(row(s, "fwd+bwd", "torch chunk", None, note="OOM"))
    torch.cuda.empty_cache()
    if fla is not None:
        qfg, kfg, vfg = (x.clone().requires_grad_() for x in (qf, kf, vf))
        dof = do.transpose(1, 2).contiguous()
        ms = bench(lambda: chunk_la(qfg, kfg, vfg, scale=scale, normalize=False)[0].backward(dof),
                   rep_ms, grad_to_none=[qfg, kfg, vfg])
        rows.append(row(s, "fwd+bwd", "fla chunk_linear_attn", ms, 3 * ff,
                        note="= chunk_simple_gla autograd"))
        del qfg, kfg, vfg, dof
    del qg, kg, vg
    torch.cuda.empty_cache()

    # ---- one decode step on a [B,H,K,V] float32 state
    sb = 2 * s.B * s.H * s.K * s.V * 4
    q1, k1, v1 = q[:, :, 0].contiguous(), k[:, :, 0].contiguous(), v[:, :, 0].contiguous()
    st = h0.clone()
    st_ref = h0.clone()
    o1, _ = hebbian_step(q1, k1, v1, st, scale=scale, strict=False, backend="triton")
    o1_t, _ = step_hebbian_torch(q1, k1, v1, st_ref, scale=scale, strict=False)
    err_dec = max(rel_err(o1, o1_t), rel_err(st, st_ref))
    ms = bench(lambda: hebbian_step(q1, k1, v1, st, scale=scale, strict=False,
                                    backend="triton"), rep_ms)
    rows.append(row(s, "decode", "ours", ms, state_bytes=sb, err=err_dec,
                    note="per call: Python + 2 launches"))
    # The same step replayed from a CUDA graph: the GPU time of the kernels without the host's
    # launch overhead (what a graph-captured decode loop pays). One graph steps n different
    # states in turn (n·state ≥ 256 MiB, 5× the H100's L2), so every step reads its state from
    # HBM as a model's layers do; replaying one 32 MiB state would partly hit L2.
    states = rotating_states(h0)
    ms = bench_graph(lambda: [hebbian_step(q1, k1, v1, x, scale=scale, strict=False,
                                           backend="triton") for x in states],
                     rep_ms) / len(states)
    rows.append(row(s, "decode", "ours (CUDA graph)", ms, state_bytes=sb, err=err_dec,
                    note=f"graph replay, {len(states)} states in turn"))
    ms = bench(lambda: step_hebbian_torch(q1, k1, v1, st_ref, scale=scale, strict=False), rep_ms)
    rows.append(row(s, "decode", "torch", ms, state_bytes=sb, err=0.0))
    if fla is not None:
        _, fused_rec, _ = fla
        qd, kd = q1[:, None], k1[:, None]                      # [B,1,H,K]
        vd = v1.expand(s.B, s.H, s.V)[:, None].contiguous()
        S_in = h0.clone()
        o_fd, S_fd = fused_rec(qd, kd, vd, scale=scale, initial_state=S_in,
                               output_final_state=True, normalize=False)
        st2 = h0.clone()
        o_t2, _ = step_hebbian_torch(q1, k1, v1, st2, scale=scale, strict=False)
        err_fd = max(rel_err(o_fd[:, 0], o_t2), rel_err(S_fd, st2))
        ms = bench(lambda: fused_rec(qd, kd, vd, scale=scale, initial_state=S_in,
                                     output_final_state=True, normalize=False), rep_ms)
        rows.append(row(s, "decode", "fla fused_recurrent_linear_attn", ms, state_bytes=sb,
                        err=err_fd, note="writes a new state"))
        ms = bench_graph(lambda: [fused_rec(qd, kd, vd, scale=scale, initial_state=x,
                                            output_final_state=True, normalize=False)
                                  for x in states], rep_ms) / len(states)
        rows.append(row(s, "decode", "fla fused_recurrent (CUDA graph)", ms, state_bytes=sb,
                        err=err_fd, note=f"graph replay, {len(states)} states in turn"))
    del states
    add_ratios(rows)
    print(markdown_table(rows, ["pass", "impl", "ms", "TFLOP/s", "GB/s", "peer/ours",
                                "err vs torch"]), flush=True)
    return rows


SWEEP = [  # (chunk, forward algorithm, tile overrides) for ours
    (64, "split", {}), (128, "split", {}),
    (64, "fused", {"fused_BK": 128, "fused_BV": 128}),        # 8 warps
    (64, "fused", {"fused_BK": 128, "fused_BV": 128, "fused_warps": 16}),
    (64, "fused", {"fused_BK": 256, "fused_BV": 64, "fused_warps": 16}),   # fewer atomics
    (64, "fused", {"fused_BK": 128, "fused_BV": 64}),
    (64, "fused", {"fused_BK": 64, "fused_BV": 64}),          # no register spill (sm_90 cubin)
    (32, "fused", {"fused_BK": 128, "fused_BV": 128}),
    # With q is k (BDH) the kernel holds one [BT, BK] tile fewer: room for larger state slices.
    (64, "fused", {"fused_BK": 256, "fused_BV": 32}),         # half the atomics of 128×64
    (64, "fused", {"fused_BK": 256, "fused_BV": 32, "fused_warps": 4}),
    (64, "fused", {"fused_BK": 128, "fused_BV": 64, "fused_warps": 4}),
]


def run_sweep(s: Shape, rep_ms):
    """Time ours (fwd, fwd+bwd) over chunk sizes, tile sizes and the two forward algorithms:
    the data for tuning. Each config's output is checked against the torch path."""
    from kernels.hebbian.function import hebbian_attention_triton
    from kernels.hebbian.launches import ChunkLaunch
    dev, dt = torch.device("cuda"), torch.bfloat16
    HV = 1 if s.shared_v else s.H
    q = torch.randn(s.B, s.H, s.T, s.K, device=dev, dtype=dt)
    k = torch.randn(s.B, s.H, s.T, s.K, device=dev, dtype=dt)
    v = torch.randn(s.B, HV, s.T, s.V, device=dev, dtype=dt)
    do = torch.randn(s.B, s.H, s.T, s.V, device=dev, dtype=dt)
    qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
    scale = 1.0 / (s.K * 8)
    o_ref, _ = chunk_hebbian_torch(q, k, v, scale=scale, strict=False, chunk_size=CHUNK)
    # BDH calls the kernels with q is k; the fused forward then reads each Q/K tile once.
    o_ref_qk = None
    if s.name == "bdh":
        o_ref_qk, _ = chunk_hebbian_torch(q, q, v, scale=scale, strict=False, chunk_size=CHUNK)
    rows = []
    for chunk_size, mode, tiles in SWEEP:
        pl = ChunkLaunch(mode=mode, BT=chunk_size, BT_bwd=chunk_size, **tiles)

        def f(q_, k_, v_, pl=pl):
            return hebbian_attention_triton(q_, k_, v_, scale=scale, strict=False, launch=pl)
        cases = [("q, k", k, o_ref)]
        if o_ref_qk is not None and mode == "fused":
            cases.append(("q is k", q, o_ref_qk))
        for inputs, k_in, ref in cases:
            try:
                err = rel_err(f(q, k_in, v)[0], ref)
                fwd = bench(lambda: f(q, k_in, v), rep_ms)
                fb = None
                if inputs == "q, k":
                    fb = bench(lambda: f(qg, kg, vg)[0].backward(do), rep_ms,
                               grad_to_none=[qg, kg, vg])
            except Exception as exc:                               # noqa: BLE001
                err = fwd = fb = None
                print(f"sweep {s.name} {chunk_size} {mode} {tiles} {inputs}: "
                      f"{type(exc).__name__}: {exc}")
            rows.append({"shape": s.name, "chunk": chunk_size, "forward": mode,
                         "tiles": str(tiles) or "default", "inputs": inputs,
                         "fwd ms": fwd, "fwd+bwd ms": fb, "fwd err vs torch": err})
            print(rows[-1], flush=True)
    return rows


def time_reference(q, k, v, scale):
    hebbian_recurrent(q[:, :, :32], k[:, :, :32], v[:, :, :32], scale=scale, strict=False)
    torch.cuda.synchronize()
    t = time.perf_counter()
    hebbian_recurrent(q, k, v, scale=scale, strict=False)
    torch.cuda.synchronize()
    return (time.perf_counter() - t) * 1e3


def add_ratios(rows):
    """ratio = peer ms / ours ms for the same shape and pass (> 1: ours is faster)."""
    ours = {(r["shape"], r["pass"]): r["ms"] for r in rows if r["impl"] == "ours"}
    for r in rows:
        base = ours.get((r["shape"], r["pass"]))
        r["peer/ours"] = (r["ms"] / base if (base and r["ms"] and r["impl"] != "ours")
                          else None)


def cpu_smoke():
    """Tiny correctness check of the Triton path (interpreter) against the reference."""
    torch.manual_seed(0)
    B, H, T, K, V = 1, 2, 70, 24, 20
    q, k = torch.randn(B, H, T, K), torch.randn(B, H, T, K)
    v, h0 = torch.randn(B, 1, T, V), torch.randn(B, H, K, V)
    g = torch.tensor([0.95, 1.0])
    o, S = hebbian_attention(q, k, v, decay=g, initial_state=h0, output_final_state=True,
                             backend="triton", chunk_size=32)
    o_r, S_r = hebbian_recurrent(q.double(), k.double(), v.double(), decay=g.double(),
                                 initial_state=h0.double())
    st = h0.clone()
    o1, _ = hebbian_step(q[:, :, 0], k[:, :, 0], v[:, :, 0], st, decay=g, backend="triton")
    o1_r, _ = hebbian_recurrent(q[:, :, :1].double(), k[:, :, :1].double(),
                                v[:, :, :1].double(), decay=g.double(),
                                initial_state=h0.double())
    errs = {"o": rel_err(o, o_r), "S": rel_err(S, S_r), "decode o": rel_err(o1, o1_r[:, :, 0])}
    print("CPU smoke (Triton interpreter vs float64 reference): "
          + ", ".join(f"{n} rel err {e:.1e}" for n, e in errs.items()))
    ok = all(e < 1e-4 for e in errs.values())
    print("timings need a CUDA GPU: run this module on one for the benchmark table.")
    return ok


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/bench_kernels", help="output folder")
    p.add_argument("--shapes", default=",".join(SHAPES), help=f"subset of {list(SHAPES)}")
    p.add_argument("--rep-ms", type=int, default=100, help="do_bench repetition time (ms)")
    p.add_argument("--no-fla", action="store_true", help="skip fla even when importable")
    p.add_argument("--no-reference", action="store_true", help="skip the token-by-token oracle")
    p.add_argument("--sweep", action="store_true",
                   help="also time ours over chunk sizes, tile sizes and the split / fused "
                        "forward at each shape")
    p.add_argument("--sweep-only", action="store_true", help="the sweep without the main table")
    p.add_argument("--fwd-mode", choices=["auto", "split", "fused"], default=None,
                   help="the forward algorithm for ours (default: the package's choice)")
    args = p.parse_args(argv)
    if args.fwd_mode:
        os.environ["GLASSBRAIN_FWD_MODE"] = args.fwd_mode

    if not torch.cuda.is_available():
        ok = cpu_smoke()
        return 0 if ok else 1

    fla = None if args.no_fla else load_fla()
    out = Path(args.out)
    from kernels.hebbian.plan import fwd_mode
    meta = run_meta("cuda", chunk=CHUNK, dtype="bfloat16", state="float32",
                    fwd_mode=fwd_mode(),
                    fla=fla[2] if fla else None, command=" ".join(["python -m experiments."
                                                                     "bench_kernels"]
                                                                    + (argv or sys.argv[1:])))
    rows = []
    for name in ([] if args.sweep_only else args.shapes.split(",")):
        s = SHAPES[name]
        # The recurrent oracle reads and writes the whole state every token: only where that
        # stays under ~1.5 TB of traffic (a few seconds).
        ref_ok = not args.no_reference and s.B * s.H * s.K * s.V * 8 * s.T < 1.5e12
        rows += run_shape(s, fla, args.rep_ms, ref_ok)
        add_ratios(rows)
        write_json(out / "bench_kernels.json", {"meta": meta, "shapes": [asdict(x) for x in
                                                                          SHAPES.values()],
                                                 "rows": rows})
        torch.cuda.empty_cache()
    sweep = []
    if args.sweep or args.sweep_only:
        for name in args.shapes.split(","):
            sweep += run_sweep(SHAPES[name], args.rep_ms)
            torch.cuda.empty_cache()
    if sweep:
        write_json(out / "bench_kernels_sweep.json", {"meta": meta, "rows": sweep})
    cols = ["shape", "B,T,H,K,V", "pass", "impl", "ms", "tok/s", "TFLOP/s", "GB/s",
            "peer/ours", "err vs torch", "note"]
    table = markdown_table(rows, cols)
    (out / "bench_kernels.md").write_text(
        f"# Hebbian kernel benchmark\n\n{meta['date']} · {meta['device']} · commit "
        f"{meta['commit']} · torch {meta['torch']} · triton {meta['triton']} · fla "
        f"{meta['fla']}\n\n`{meta['command']}`\n\n{table}\n")
    print(f"\n{meta['device']}, commit {meta['commit']}, torch {meta['torch']}, "
          f"triton {meta['triton']}, fla {meta['fla']}")
    print(table)
    if sweep:
        print(markdown_table(sweep))
    return 0


if __name__ == "__main__":
    sys.exit(main())
