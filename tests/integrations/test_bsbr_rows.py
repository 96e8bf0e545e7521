"""The BSBR state of the transformers cache, one row per sequence (`BSBRRows`): a whole prompt's
chunks enter an empty bank at once (`fresh_bank`) as pushing them one by one does; the rows
layout and the host bank convert both ways; and the decode step `bsbr_rows_step` (PyTorch form
and Triton kernels, interpreted here) advances each row exactly as `bsbr_stream` advances that
row alone: outputs, partial chunks, and bank (merges, archive folds, salience), rows at
different positions and completing their chunks at different steps, padded tokens skipped."""
import pytest
import torch
from helpers import assert_rel_close

from bsbr import BankConfig, StreamSpec, bsbr_stream, empty_bank, push_chunks
from bsbr.bank import bank_of_row, fresh_bank, fresh_plan, rows_layout, rows_of_banks
from bsbr.stream import empty_state, rows_from, rows_grown, rows_step
from kernels.bsbr import RowsLayout, bsbr_rows_step

H, K, V = 2, 8, 6
CFGS = [BankConfig((2, 2, 1), 0.9), BankConfig((3, 2), 0.5), BankConfig((2,), 1.0)]


@pytest.mark.parametrize("cfg", CFGS + [None])
@pytest.mark.parametrize("m", [0, 1, 5, 13, 40])
def test_fresh_bank_equals_pushing_every_chunk(cfg, m):
    F = torch.randn(2, H, m, K, V, dtype=torch.float64)
    h = torch.randn(2, H, m, K, dtype=torch.float64)
    want = push_chunks(empty_bank(2, H, K, V, K, cfg, dtype=torch.float64), F, h, cfg)
    got = fresh_bank(F, h, cfg)
    assert got.levels == want.levels and got.counts == want.counts
    assert got.F.shape == want.F.shape
    if want.n:
        assert_rel_close(got.F, want.F, 1e-12, name="F")
        assert_rel_close(got.h, want.h, 1e-12, name="h")
    assert not got.salience.any()
    if cfg is not None:
        assert [b - a for _, a, b in fresh_plan(m, cfg)] == list(want.counts)


def pushed_bank(cfg, n_chunks, seed):
    """A host bank after n_chunks pushes with random salience between them (folds then pick
    slots other than the oldest)."""
    g = torch.Generator().manual_seed(seed)
    bank = empty_bank(1, H, K, V, K, cfg)
    for _ in range(n_chunks):
        if bank.n:
            bank.salience[:, :, :bank.n] += torch.rand(1, H, bank.n, generator=g)
        bank = push_chunks(bank, torch.randn(1, H, 1, K, V, generator=g),
                           torch.randn(1, H, 1, K, generator=g), cfg)
    return bank


@pytest.mark.parametrize("cfg", CFGS + [None])
def test_rows_layout_and_host_bank_convert_both_ways(cfg):
    banks = [pushed_bank(cfg, n, seed) for seed, n in enumerate((0, 3, 11, 7))]
    layout = rows_layout(cfg, max(b.n for b in banks))
    F, h, s, counts = rows_of_banks(banks, layout)
    assert F.shape == (4, H, layout.slots, K, V) and counts.dtype == torch.int32
    for b, bank in enumerate(banks):
        back = bank_of_row(F[b:b + 1], h[b:b + 1], s[b:b + 1], counts[b, 0].tolist(), layout,
                           cfg)
        assert back.levels == bank.levels and back.counts == bank.counts
        for name in ("F", "h", "salience"):
            assert torch.equal(getattr(back, name), getattr(bank, name)), (b, name)


def spec_for(cfg, top_k=2, backend="torch"):
    return StreamSpec(chunk_size=3, scale=0.4, long_scale=0.3, top_k=top_k, bank=cfg,
                      backend=backend)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("cfg,top_k", [(CFGS[0], 2), (CFGS[1], None), (None, 3)])
def test_rows_step_equals_each_row_streamed_alone(backend, cfg, top_k):
    """Rows whose prompts had 14, 4, 0 and 9 tokens (chunk 3), then 12 decode steps, each row's
    own token or (row 1 at steps 2 and 7) a padded one that must leave the row unchanged.
    Key/value heads grouped: one key head serves the two query heads."""
    spec = spec_for(cfg, top_k, backend)
    ref_spec = spec_for(cfg, top_k, "torch")
    lengths = (14, 4, 0, 9)
    B, T = len(lengths), 12
    alone = []
    for n in lengths:
        st = empty_state(1, H, K, V, K, ref_spec, meta_keys=False)
        if n:
            x = torch.randn(1, H, n, K)
            _, st = bsbr_stream(x, x, torch.randn(1, H, n, V), st, ref_spec)
        alone.append(st)
    rows = rows_from([s.bank for s in alone], [s.k for s in alone], [s.v for s in alone],
                     [s.fill for s in alone], spec, capacity=T)
    q = torch.randn(B, H, T, K)
    k, v = torch.randn(B, 1, T, K), torch.randn(B, 1, T, V)
    real = torch.ones(B, T, dtype=torch.bool)
    real[1, 2] = real[1, 7] = False
    with torch.no_grad():
        for t in range(T):
            o = rows_step(q[:, :, t], k[:, :, t], v[:, :, t], rows, spec, valid=real[:, t])
            for b, st in enumerate(alone):
                if not real[b, t]:
                    continue
                kb, vb = k[b:b + 1, :, t:t + 1].expand(1, H, 1, K), v[b:b + 1, :, t:t + 1]
                want, alone[b] = bsbr_stream(q[b:b + 1, :, t:t + 1], kb, vb.expand(1, H, 1, V),
                                             st, ref_spec)
                assert_rel_close(o[b], want[0, :, 0], 1e-5, name=f"row {b} step {t}")
    counts = rows.counts[:, 0].tolist()
    for b, st in enumerate(alone):
        bank = bank_of_row(rows.F[b:b + 1], rows.h[b:b + 1], rows.salience[b:b + 1], counts[b],
                           rows.layout, cfg)
        assert bank.levels == st.bank.levels and bank.counts == st.bank.counts, b
        assert int(rows.fill[b, 0]) == st.fill and bool((rows.fill[b] == st.fill).all())
        if st.bank.n:
            assert_rel_close(bank.F, st.bank.F, 1e-5, name=f"row {b} F")
            assert_rel_close(bank.h, st.bank.h, 1e-5, name=f"row {b} h")
            if cfg is not None:
                assert_rel_close(bank.salience, st.bank.salience, 1e-5, name=f"row {b} s")
        f = st.fill
        assert_rel_close(rows.k[b:b + 1, :, :f], st.k[:, :, :f], 1e-6, name=f"row {b} k")


def random_rows(layout, B=3, C=2, seed=0):
    """Random states of B rows with valid counts (an exact bank: half full, no archive)."""
    g = torch.Generator().manual_seed(seed)
    S, L = layout.slots, layout.levels

    def row_counts():
        if not layout.bounded:
            return [0, int(torch.randint(0, layout.caps[0] // 2, (), generator=g))]
        return [int(torch.randint(0, 5, (), generator=g))] + [
            int(torch.randint(0, c + 1, (), generator=g)) for c in layout.caps]

    counts = torch.stack([torch.tensor(row_counts()) for _ in range(B)])
    return dict(kbuf=torch.randn(B, H, C - 1, K, generator=g),
                vbuf=torch.randn(B, H, C - 1, V, generator=g),
                fill=torch.randint(0, C, (B, 1), generator=g).expand(B, H).int().contiguous(),
                F=torch.randn(B, H, S, K, V, generator=g), h=torch.randn(B, H, S, K, generator=g),
                salience=torch.rand(B, H, S, generator=g),
                counts=counts[:, None].expand(B, H, L + 1).int().contiguous())


@pytest.mark.parametrize("layout", [RowsLayout((2, 2, 1), True, 0.9), RowsLayout((3,), True),
                                    RowsLayout((40,), bounded=False)])
def test_triton_rows_step_equals_the_pytorch_form(layout):
    """20 steps at chunk 2 from random states: every state tensor and every output agree,
    through folds of the least salient top slot, merges and appends."""
    a = random_rows(layout)
    b = {name: t.clone() for name, t in a.items()}
    archived = a["counts"][:, 0, 0].clone()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for t in range(20):
            q = torch.randn(3, H, K, generator=g)
            k, v = torch.randn(3, 1, K, generator=g), torch.randn(3, 1, V, generator=g)
            real = torch.rand(3, generator=g) > 0.2
            args = dict(layout=layout, scale=0.3, long_scale=0.5, top_k=2, valid=real)
            oa = bsbr_rows_step(q, k, v, **a, **args, backend="torch")
            ob = bsbr_rows_step(q, k, v, **b, **args, backend="triton")
            assert_rel_close(ob, oa, 1e-5, name=f"o, step {t}")
            for name in a:
                assert_rel_close(b[name].float(), a[name].float(), 1e-5, name=f"{name} {t}")
    assert (a["counts"][:, 0, 0] > archived).any() == layout.bounded     # folds happened


def test_exact_bank_rows_grow_and_keep_their_slots():
    spec = spec_for(None)
    banks = [pushed_bank(None, n, n) for n in (2, 5)]
    rows = rows_from(banks, [torch.zeros(1, H, 2, K)] * 2, [torch.zeros(1, H, 2, V)] * 2, [0, 1],
                     spec)
    assert rows.layout.caps == (5,) and not rows.capturable
    grown = rows_grown(rows, 6)
    assert grown.layout.caps == (10,) and rows_grown(grown, 9) is grown
    assert torch.equal(grown.F[:, :, :rows.F.shape[2]], rows.F)
    assert not grown.F[:, :, rows.F.shape[2]:].any()


def test_rows_step_refusals_name_the_argument():
    layout = RowsLayout((2, 1))
    st = random_rows(layout, B=2)
    q, k, v = torch.randn(2, H, K), torch.randn(2, H, K), torch.randn(2, H, V)
    kw = dict(layout=layout, scale=0.5)
    with pytest.raises(ValueError, match="k: expected"):
        bsbr_rows_step(q, torch.randn(2, 3, K), v, **st, **kw)
    with pytest.raises(ValueError, match="counts: expected"):
        bsbr_rows_step(q, k, v, **dict(st, counts=st["counts"].long()), **kw)
    with pytest.raises(ValueError, match="fill: expected"):
        bsbr_rows_step(q, k, v, **dict(st, fill=st["fill"][:1]), **kw)
    with pytest.raises(ValueError, match="valid: expected"):
        bsbr_rows_step(q, k, v, **st, **kw, valid=torch.ones(2))
    with pytest.raises(ValueError, match="scale"):
        bsbr_rows_step(q, k, v, **st, layout=layout, scale=0.0)
    with pytest.raises(TypeError, match="layout"):
        bsbr_rows_step(q, k, v, **st, layout=(2, 1), scale=0.5)
    with pytest.raises(ValueError, match="caps"):
        RowsLayout((1, 1))
    with pytest.raises(ValueError, match="caps"):
        RowsLayout((4, 2), bounded=False)
