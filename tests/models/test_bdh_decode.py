"""bdh.decode.BDHDecoder: the one BDH stepper (eager, sparse, CUDA graph), rows at different
positions stepped as one batch, and the BDHState row utilities it relies on."""
import pytest
import torch

from bdh import BDHState, load_state, save_state
from bdh.decode import BDHDecoder
from bdh.sparse_decode import SparseDecodeLaunch
from helpers import assert_rel_close, rel_err
from test_bdh_streaming import make_model      # small BDH (N = 128), sharpened logits

POSITIONS = (5, 300)


def prefilled(model, T, **kw):
    """A one-row decoder after T random tokens, and its last logits."""
    dec = BDHDecoder(model, 1, **kw)
    logits = dec.prefill(torch.randint(0, 256, (1, T), device=model.encoder.device))
    return dec, logits


def two_streams(model, **kw):
    """Two one-row decoders at POSITIONS, and one two-row decoder holding both rows."""
    alone = [prefilled(model, T, **kw)[0] for T in POSITIONS]
    both = BDHDecoder(model, 2, state=BDHState.cat([d.state.clone() for d in alone]), **kw)
    assert both.position == POSITIONS
    return alone, both


def step_compare(alone, both, n, tol):
    """n steps of both rows together against each row stepped alone: logits and states."""
    dev, start = both.device, both.position
    for _ in range(n):
        tok = torch.randint(0, 256, (2,), device=dev)
        out = both.step(tok).clone()
        for b, dec in enumerate(alone):
            assert_rel_close(out[b], dec.step(tok[b:b + 1])[0], tol, f"logits of row {b}")
    for b, dec in enumerate(alone):
        for S_both, S_alone in zip(both.state.layers, dec.state.layers):
            assert_rel_close(S_both[b], S_alone[0], tol, f"state of row {b}")
    assert both.position == tuple(p + n for p in start)


@pytest.mark.parametrize("mode,kw", [("eager", {}), ("sparse", {"backend": "torch"}),
                                     ("sparse", {"backend": "triton"})])
def test_rows_at_different_positions_step_as_if_alone(mode, kw):
    """Rows at positions 5 and 300 in one batch equal each row stepped alone (the sparse Triton
    kernels alone take their fused layer; the batch, with two positions, the unfused one)."""
    model = make_model()
    alone, both = two_streams(model, mode=mode, **kw)
    step_compare(alone, both, 3, 1e-5)


def test_the_position_of_each_row_matters():
    """The same row state stepped at another position gives other logits: the batch above
    cannot pass by ignoring positions."""
    model = make_model()
    alone, both = two_streams(model)
    tok = torch.randint(0, 256, (2,))
    shifted = BDHDecoder(model, 2, state=BDHState(both.state.clone().layers, (5, 5),
                                                  both.state.config))
    assert rel_err(shifted.step(tok)[1], both.step(tok)[1]) > 1e-2


def test_prefill_continues_each_row_from_its_own_position():
    model = make_model()
    alone, both = two_streams(model, prefill_chunk=4)
    tokens = torch.randint(0, 256, (2, 9))
    out = both.prefill(tokens).clone()
    for b, dec in enumerate(alone):
        assert_rel_close(out[b], dec.prefill(tokens[b:b + 1])[0], 1e-5, f"prefill row {b}")
    assert both.position == (14, 309)
    step_compare(alone, both, 0, 1e-5)


def test_forward_with_a_per_row_state_equals_each_row_alone():
    model = make_model()
    alone, both = two_streams(model)
    idx = torch.randint(0, 256, (2, 6))
    with torch.no_grad():
        logits, st = model(idx, state=both.state, return_state=True)
        for b, dec in enumerate(alone):
            ref, st_b = model(idx[b:b + 1], state=dec.state, return_state=True)
            assert_rel_close(logits[b], ref[0], 1e-5, f"logits of row {b}")
            assert st_b.position == POSITIONS[b] + 6
    assert st.position == (11, 306)


def test_decoder_equals_generate_and_the_model_forward():
    model = make_model()
    prompt = torch.randint(0, 256, (3, 11))
    want = model.generate(prompt, 6, top_k=1)
    dec = BDHDecoder(model, 3)
    assert dec.mode == "eager" and not dec.capture          # "auto" on the CPU
    logits = dec.prefill(prompt)
    assert logits.shape == (3, 256)
    got = [prompt]
    for _ in range(6):
        got.append(logits.argmax(-1, keepdim=True))
        logits = dec.step(got[-1])
    assert torch.equal(torch.cat(got, 1), want)
    with torch.no_grad():
        ref, _ = model(torch.cat(got, 1))
    assert_rel_close(logits, ref[:, -1], 1e-5, "logits after the last step")


def test_load_copies_reset_empties_and_state_is_adopted():
    model = make_model()
    dec, _ = prefilled(model, 7)
    saved = dec.state.clone()
    other = BDHDecoder(model, 1)
    other.load(saved)
    tok = torch.randint(0, 256, (1,))
    a, b = dec.step(tok).clone(), other.step(tok).clone()
    assert torch.equal(a, b) and other.position == 8 and saved.position == 7
    assert not torch.equal(saved.layers[0], other.state.layers[0])     # load copied
    other.reset()
    assert other.position == 0 and all(not S.any() for S in other.state.layers)
    own = saved.clone()
    adopted = BDHDecoder(model, 1, state=own)
    adopted.step(tok)
    assert adopted.state.layers[0] is own.layers[0]                     # updated in place
    assert_rel_close(own.layers[1], dec.state.layers[1], 1e-6, "adopted state")


def test_decoder_rejects_bad_arguments():
    model = make_model()
    with pytest.raises(ValueError, match="mode"):
        BDHDecoder(model, 1, mode="fast")
    with pytest.raises(ValueError, match="batch_size"):
        BDHDecoder(model, 0)
    with pytest.raises(ValueError, match="capture"):
        BDHDecoder(model, 1, mode="eager", capture=True)
    with pytest.raises(TypeError, match="launch"):
        BDHDecoder(model, 1, mode="sparse", launch={"fused": False})
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="mode='graph'.*CUDA"):
            BDHDecoder(model, 1, mode="graph")
    model.train()
    model.drop.p = 0.1
    with pytest.raises(ValueError, match="sparse.*eval mode"):
        BDHDecoder(model, 1, mode="sparse")
    model.eval()
    dec = BDHDecoder(model, 2)
    with pytest.raises(ValueError, match=r"tokens: expected int64 token ids \[B\]"):
        dec.step(torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="tokens"):
        dec.prefill(torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="batch size|shape"):
        dec.load(model.init_state(3))
    with pytest.raises(ValueError, match="different configuration"):
        dec.load(make_model(n_embd=16).init_state(2))


# ----------------------------------------------------------------------------- BDHState rows

def test_state_rows_and_cat_keep_each_row_and_its_position():
    model = make_model()
    a, b = (prefilled(model, T)[0].state for T in (4, 9))
    both = BDHState.cat([a, b, a])
    assert both.batch_size == 3 and both.position == (4, 9, 4) and both.positions == (4, 9, 4)
    assert both.rows(1).position == 9 and isinstance(both.rows([0, 2]).position, int)
    assert both.rows(slice(0, 2)).position == (4, 9)
    assert both.rows(torch.tensor([2, 1])).position == (4, 9)
    for S, Sb in zip(both.rows(1).layers, b.layers):
        assert torch.equal(S, Sb)
    assert BDHState.cat([a, a]).position == 4                 # rows that agree keep an int
    assert BDHState(a.layers, [4]).position == 4
    with pytest.raises(ValueError, match="one position per row"):
        BDHState(a.layers, (1, 2))
    with pytest.raises(ValueError, match="BDHState.position"):
        BDHState(a.layers, (-1,))
    with pytest.raises(ValueError, match=r"states\[1\]: made by another configuration"):
        BDHState.cat([a, make_model(n_embd=16).init_state(1)])
    with pytest.raises(TypeError, match="BDHState"):
        BDHState.cat([a, a.layers])


def test_per_row_state_saves_and_loads(tmp_path):
    model = make_model()
    alone, both = two_streams(model)
    save_state(both.state, tmp_path / "s.pt")
    back = load_state(tmp_path / "s.pt", model=model)
    assert back.position == POSITIONS
    assert all(torch.equal(x, y) for x, y in zip(back.layers, both.state.layers))


# ----------------------------------------------------------------------------- GPU only

@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["graph", "sparse"])
def test_gpu_graph_rows_at_different_positions_step_as_if_alone(mode):
    """The captured step (dense and sparse) with positions 5 and 300 in one batch equals each
    row stepped alone by the eager decoder; a later load of rows at one position recaptures."""
    model = make_model(backend="auto").cuda()
    alone, both = two_streams(model, mode=mode)
    assert both.capture
    eager = [BDHDecoder(model, 1, mode="eager", state=d.state.clone()) for d in alone]
    step_compare(eager, both, 4, 1e-4)
    both.load(BDHState.cat([eager[0].state, eager[0].state]))       # shared: recaptured
    tok = torch.randint(0, 256, (2,), device="cuda")
    out = both.step(tok).clone()
    ref = eager[0].step(tok[:1])
    assert_rel_close(out[0], ref[0], 1e-4, "row 0 after the reload")
    assert both.launch == (SparseDecodeLaunch() if mode == "sparse" else None)
