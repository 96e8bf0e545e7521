"""Benchmark the Hebbian attention kernels against their peers, in one process.

    python -m experiments.bench_kernels                 # GPU: full table; CPU: a correctness smoke
    python -m experiments.bench_kernels --shapes bdh    # one shape
    python -m experiments.bench_kernels --no-fla        # skip fla even when importable

Peers, all timed through the harness (`experiments.timing.time_call`: the median of
triton.testing.do_bench under the one policy every experiment uses; random inputs, never zeros):
  ours       kernels.hebbian_attention / hebbian_step, backend="triton"
  fla        fla.ops.linear_attn.chunk_linear_attn (fwd, and fwd+bwd: with normalize=False it is
             chunk_simple_gla with autograd) and fused_recurrent_linear_attn (decode), when
             `fla` is importable. fla's linear attention is *inclusive*: for like-for-like
             timings ours runs inclusive too (strict=False; strict costs the same), both with
             scale=1 and no normalization. fla has no shared-v mode: at the BDH shape it gets
             v expanded per head (a real [B,T,H,V] copy, made outside the timed region).
  torch      kernels.chunk_hebbian_torch (plain PyTorch, cuBLAS), the same chunk size.
  reference  kernels.hebbian_recurrent (token by token): forward only, one timed run (a
             `Stopwatch`) after a short warm-up, and only where its state traffic is small
             enough to finish quickly.

bf16 inputs, float32 state. Ours picks its forward algorithm and chunk sizes per shape
(`kernels.hebbian.plan.plan`, noted per row); the torch path uses chunk 64. Reported per
config: ms, tokens/s, achieved TFLOP/s and, for the decode step, GB/s of state traffic. FLOPs
counted (chunk C, per batch·head):
  fwd     = 4·T·K·V (state update + inter-chunk output) + 2·T·C·(K + V) (intra-chunk QKᵀ, AV)
  fwd+bwd = 3 × fwd (the backward's dQ, dK, dV, dS products; our recompute of the chunk
            states is not counted)
  decode  state traffic = 2 · B·H·K·V · 4 bytes (read + write of the float32 state)
Each timed config is also checked against the torch path (relative error of o, S, and grads).
Writes JSON and a Markdown table to --out and prints the table at the end. On a CPU it runs a
correctness smoke of the Triton kernels in the interpreter (a few seconds) and times nothing.
"""
from __future__ import annotations

import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

if not torch.cuda.is_available():
    # The CPU smoke runs the Triton kernels in the interpreter; set before triton is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kernels import (chunk_hebbian_torch, hebbian_attention, hebbian_recurrent,  # noqa: E402
                     hebbian_step)
from kernels.hebbian.torch_chunk import step_hebbian_torch  # noqa: E402

from .harness import (Choice, Flag, Names, Optional, OutDir, Stopwatch, default_out,  # noqa: E402
                      markdown_table, option, parse_config, rel_err, run_meta, time_call,
                      write_json, write_text)


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


@dataclass
class KernelBenchConfig:
    out: str = field(default=default_out("bench_kernels"), metadata=option(
        OutDir(), "output folder"))
    shapes: tuple = field(default=tuple(SHAPES), metadata=option(
        Names(SHAPES), "comma list of the shapes to time"))
    no_fla: bool = field(default=False, metadata=option(
        Flag(), "skip fla even when importable"))
    no_reference: bool = field(default=False, metadata=option(
        Flag(), "skip the token-by-token oracle"))
    sweep: bool = field(default=False, metadata=option(
        Flag(), "also time ours over chunk sizes, tile sizes and the split / fused forward at "
                "each shape"))
    sweep_only: bool = field(default=False, metadata=option(
        Flag(), "the sweep without the main table"))
    fwd_mode: str | None = field(default=None, metadata=option(
        Optional(Choice(("auto", "split", "fused"))),
        "the forward algorithm for ours", shown="the package's choice"))


def fwd_flops(s: Shape) -> float:
    return s.B * s.H * (4 * s.T * s.K * s.V + 2 * s.T * CHUNK * (s.K + s.V))


def bench(fn, device="cuda", grad_to_none=None) -> float:
    """Median ms of ``fn`` through the harness (on CUDA: do_bench)."""
    return time_call(fn, device, grad_to_none=grad_to_none).median_ms


def bench_graph(fn, device="cuda") -> float:
    """Median ms of ``fn`` captured once in a CUDA graph and replayed (no launch overhead)."""
    return time_call(fn, device, cuda_graph=True).median_ms


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



@dataclass
class Inputs:
    """One shape's random inputs on the GPU (bf16; the state float32), and the two paths."""
    s: Shape
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    do: torch.Tensor
    h0: torch.Tensor
    scale: float

    @classmethod
    def make(cls, s: Shape) -> "Inputs":
        dev, dt = torch.device("cuda"), torch.bfloat16
        q = torch.randn(s.B, s.H, s.T, s.K, device=dev, dtype=dt)
        k = torch.randn(s.B, s.H, s.T, s.K, device=dev, dtype=dt)
        v = torch.randn(s.B, 1 if s.shared_v else s.H, s.T, s.V, device=dev, dtype=dt)
        do = torch.randn(s.B, s.H, s.T, s.V, device=dev, dtype=dt)
        h0 = torch.randn(s.B, s.H, s.K, s.V, device=dev)
        # Scale so o stays O(1) in bf16 (the timing does not depend on it).
        return cls(s, q, k, v, do, h0, 1.0 / (s.K * 8))

    def ours(self, q, k, v, h0=None, final=False):
        return hebbian_attention(q, k, v, scale=self.scale, strict=False, initial_state=h0,
                                 output_final_state=final, backend="triton")

    def torch_path(self, q, k, v, h0=None):
        return chunk_hebbian_torch(q, k, v, scale=self.scale, strict=False, initial_state=h0,
                                   chunk_size=CHUNK)

    def bthd(self):
        """q, k, v in fla's [B,T,H,D] layout (v expanded per head: a real copy)."""
        s = self.s
        qf, kf = (x.transpose(1, 2).contiguous() for x in (self.q, self.k))
        vf = self.v.expand(s.B, s.H, s.T, s.V).transpose(1, 2).contiguous()
        return qf, kf, vf


def check_vs_torch(inp: Inputs):
    """(forward rel err, gradient rel err, the torch path's o) of ours against the torch path,
    one run each."""
    def run(path, **kw):
        leaves = [x.clone().requires_grad_() for x in (inp.q, inp.k, inp.v)]
        o, S = path(*leaves, inp.h0, **kw)
        (o.float() * inp.do.float()).sum().backward()
        return o, S, [x.grad for x in leaves]

    o_t, S_t, g_t = run(inp.torch_path)
    o_o, S_o, g_o = run(inp.ours, final=True)
    err_fwd = max(rel_err(o_o, o_t), rel_err(S_o, S_t))
    err_bwd = max(rel_err(a, b) for a, b in zip(g_o, g_t))
    print(f"[{inp.s.name}] ours vs torch: fwd rel err {err_fwd:.2e}, grads {err_bwd:.2e}",
          flush=True)
    return err_fwd, err_bwd, o_t.detach()


def forward_rows(inp: Inputs, fla, err_fwd, o_t, how, do_reference) -> list[dict]:
    s, q, k, v, ff = inp.s, inp.q, inp.k, inp.v, fwd_flops(inp.s)
    rows = [row(s, "fwd", "ours", bench(lambda: inp.ours(q, k, v)), ff, err=err_fwd, note=how),
            row(s, "fwd", "torch chunk", bench(lambda: inp.torch_path(q, k, v)), ff, err=0.0)]
    if fla is not None:
        chunk_la, qf = fla[0], inp.bthd()
        o_f, _ = chunk_la(*qf, scale=inp.scale, normalize=False)
        ms = bench(lambda: chunk_la(*qf, scale=inp.scale, normalize=False))
        rows.append(row(s, "fwd", "fla chunk_linear_attn", ms, ff,
                        err=rel_err(o_f.transpose(1, 2), o_t),
                        note="fla: v copied per head" if s.shared_v else ""))
    if do_reference:
        rows.append(row(s, "fwd", "reference (recurrent)", time_reference(inp), ff,
                        note="one run, not do_bench"))
    return rows


def fwd_bwd_rows(inp: Inputs, fla, err_bwd, how) -> list[dict]:
    s, do, ff = inp.s, inp.do, 3 * fwd_flops(inp.s)
    g = [x.clone().requires_grad_() for x in (inp.q, inp.k, inp.v)]
    rows = [row(s, "fwd+bwd", "ours", bench(lambda: inp.ours(*g)[0].backward(do),
                                            grad_to_none=g), ff, err=err_bwd, note=how)]
    try:
        ms = bench(lambda: inp.torch_path(*g)[0].backward(do), grad_to_none=g)
        rows.append(row(s, "fwd+bwd", "torch chunk", ms, ff, err=0.0))
    except torch.OutOfMemoryError:
        rows.append(row(s, "fwd+bwd", "torch chunk", None, note="OOM"))
    torch.cuda.empty_cache()
    if fla is not None:
        gf = [x.requires_grad_() for x in inp.bthd()]
        dof = do.transpose(1, 2).contiguous()
        ms = bench(lambda: fla[0](*gf, scale=inp.scale, normalize=False)[0].backward(dof),
                   grad_to_none=gf)
        rows.append(row(s, "fwd+bwd", "fla chunk_linear_attn", ms, ff,
                        note="= chunk_simple_gla autograd"))
    torch.cuda.empty_cache()
    return rows


def decode_rows(inp: Inputs, fla) -> list[dict]:
    """One decode step on a [B,H,K,V] float32 state: ours eagerly and replayed from a CUDA
    graph, the torch step, fla's fused recurrent step."""
    s, h0, scale = inp.s, inp.h0, inp.scale
    sb = 2 * s.B * s.H * s.K * s.V * 4
    q1, k1, v1 = (x[:, :, 0].contiguous() for x in (inp.q, inp.k, inp.v))
    st, st_ref = h0.clone(), h0.clone()

    def ours():
        return hebbian_step(q1, k1, v1, st, scale=scale, strict=False, backend="triton")
    o1, _ = ours()
    o1_t, _ = step_hebbian_torch(q1, k1, v1, st_ref, scale=scale, strict=False)
    err = max(rel_err(o1, o1_t), rel_err(st, st_ref))
    rows = [row(s, "decode", "ours", bench(ours), state_bytes=sb, err=err,
                note="per call: Python + 2 launches")]
    # The same step replayed from a CUDA graph: the GPU time of the kernels without the host's
    # launch overhead (what a graph-captured decode loop pays). One graph steps n different
    # states in turn (n·state ≥ 256 MiB, 5× the H100's L2), so every step reads its state from
    # HBM as a model's layers do; replaying one 32 MiB state would partly hit L2.
    states = rotating_states(h0)
    ms = bench_graph(lambda: [hebbian_step(q1, k1, v1, x, scale=scale, strict=False,
                                           backend="triton") for x in states]) / len(states)
    rows.append(row(s, "decode", "ours (CUDA graph)", ms, state_bytes=sb, err=err,
                    note=f"graph replay, {len(states)} states in turn"))
    ms = bench(lambda: step_hebbian_torch(q1, k1, v1, st_ref, scale=scale, strict=False))
    rows.append(row(s, "decode", "torch", ms, state_bytes=sb, err=0.0))
    if fla is not None:
        rows += fla_decode_rows(inp, fla[1], q1, k1, v1, states, sb)
    return rows


def fla_decode_rows(inp: Inputs, fused_rec, q1, k1, v1, states, sb) -> list[dict]:
    s, h0, scale = inp.s, inp.h0, inp.scale
    qd, kd = q1[:, None], k1[:, None]                      # [B,1,H,K]
    vd = v1.expand(s.B, s.H, s.V)[:, None].contiguous()
    S_in = h0.clone()

    def step(S):
        return fused_rec(qd, kd, vd, scale=scale, initial_state=S, output_final_state=True,
                         normalize=False)
    o_fd, S_fd = step(S_in)
    st2 = h0.clone()
    o_t2, _ = step_hebbian_torch(q1, k1, v1, st2, scale=scale, strict=False)
    err = max(rel_err(o_fd[:, 0], o_t2), rel_err(S_fd, st2))
    graph_ms = bench_graph(lambda: [step(x) for x in states]) / len(states)
    return [row(s, "decode", "fla fused_recurrent_linear_attn", bench(lambda: step(S_in)),
                state_bytes=sb, err=err, note="writes a new state"),
            row(s, "decode", "fla fused_recurrent (CUDA graph)", graph_ms, state_bytes=sb,
                err=err, note=f"graph replay, {len(states)} states in turn")]


def run_shape(s: Shape, fla, do_reference):
    """Every row of one shape: forward, forward + backward and decode, ours against peers."""
    from kernels.hebbian.plan import default_chunk_launch, plan
    inp = Inputs.make(s)
    err_fwd, err_bwd, o_t = check_vs_torch(inp)
    p = plan(s.B, s.H, s.K, s.V, default_chunk_launch(s.B, s.H, s.K, s.V, inp.q.dtype,
                                                       inp.q.device))
    how = f"{'fused' if p.fused else 'split'} fwd, chunk {p.BT}"
    rows = forward_rows(inp, fla, err_fwd, o_t, how, do_reference)
    rows += fwd_bwd_rows(inp, fla, err_bwd, f"{how}; bwd chunk {p.BT_bwd}")
    rows += decode_rows(inp, fla)
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


def run_sweep(s: Shape):
    """Time ours (fwd, fwd+bwd) over chunk sizes, tile sizes and the two forward algorithms:
    the data for tuning. Each config's output is checked against the torch path."""
    from kernels.hebbian.function import hebbian_attention_triton
    from kernels.hebbian.launches import ChunkLaunch
    inp = Inputs.make(s)
    q, k, v, do, scale = inp.q, inp.k, inp.v, inp.do, inp.scale
    g = [x.clone().requires_grad_() for x in (q, k, v)]
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
                fwd = bench(lambda: f(q, k_in, v))
                fb = (bench(lambda: f(*g)[0].backward(do), grad_to_none=g)
                      if inputs == "q, k" else None)
            except Exception as exc:                               # noqa: BLE001
                err = fwd = fb = None
                print(f"sweep {s.name} {chunk_size} {mode} {tiles} {inputs}: "
                      f"{type(exc).__name__}: {exc}")
            rows.append({"shape": s.name, "chunk": chunk_size, "forward": mode,
                         "tiles": str(tiles) or "default", "inputs": inputs,
                         "fwd ms": fwd, "fwd+bwd ms": fb, "fwd err vs torch": err})
            print(rows[-1], flush=True)
    return rows


def time_reference(inp: Inputs) -> float:
    """ms of one run of the token-by-token oracle (after a short warm-up)."""
    q, k, v, scale = inp.q, inp.k, inp.v, inp.scale
    hebbian_recurrent(q[:, :, :32], k[:, :, :32], v[:, :, :32], scale=scale, strict=False)
    with Stopwatch("cuda") as sw:
        hebbian_recurrent(q, k, v, scale=scale, strict=False)
    return sw.seconds * 1e3


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


def parse(argv=None) -> KernelBenchConfig:
    return parse_config(KernelBenchConfig, {}, argv, prog="python -m experiments.bench_kernels",
                        description=__doc__.split("\n")[0])


def write_table(out: Path, meta: dict, rows: list[dict]) -> str:
    cols = ["shape", "B,T,H,K,V", "pass", "impl", "ms", "tok/s", "TFLOP/s", "GB/s",
            "peer/ours", "err vs torch", "note"]
    table = markdown_table(rows, cols)
    write_text(out / "bench_kernels.md",
               f"# Hebbian kernel benchmark\n\n{meta['date']} · {meta['device']} · commit "
               f"{meta['commit']} · torch {meta['torch']} · triton {meta['triton']} · fla "
               f"{meta['fla']}\n\n`{meta['command']}`\n\n{table}\n")
    return table


def main(argv=None):
    cfg = parse(argv)
    if cfg.fwd_mode:
        os.environ["GLASSBRAIN_FWD_MODE"] = cfg.fwd_mode
    if not torch.cuda.is_available():
        return 0 if cpu_smoke() else 1
    fla = None if cfg.no_fla else load_fla()
    out = Path(cfg.out)
    from kernels.hebbian.plan import fwd_mode
    meta = run_meta("cuda", chunk=CHUNK, dtype="bfloat16", state="float32", fwd_mode=fwd_mode(),
                    fla=fla[2] if fla else None,
                    command=" ".join(["python -m experiments.bench_kernels"]
                                     + list(sys.argv[1:] if argv is None else argv)))
    rows = []
    for name in ([] if cfg.sweep_only else cfg.shapes):
        s = SHAPES[name]
        # The recurrent oracle reads and writes the whole state every token: only where that
        # stays under ~1.5 TB of traffic (a few seconds).
        ref_ok = not cfg.no_reference and s.B * s.H * s.K * s.V * 8 * s.T < 1.5e12
        rows += run_shape(s, fla, ref_ok)
        add_ratios(rows)
        write_json(out / "bench_kernels.json", {"meta": meta, "rows": rows,
                                                "shapes": [asdict(x) for x in SHAPES.values()]})
        torch.cuda.empty_cache()
    sweep = []
    if cfg.sweep or cfg.sweep_only:
        for name in cfg.shapes:
            sweep += run_sweep(SHAPES[name])
            torch.cuda.empty_cache()
    if sweep:
        write_json(out / "bench_kernels_sweep.json", {"meta": meta, "rows": sweep})
    table = write_table(out, meta, rows)
    print(f"\n{meta['device']}, commit {meta['commit']}, torch {meta['torch']}, "
          f"triton {meta['triton']}, fla {meta['fla']}")
    print(table)
    if sweep:
        print(markdown_table(sweep))
    return 0


if __name__ == "__main__":
    sys.exit(main())
