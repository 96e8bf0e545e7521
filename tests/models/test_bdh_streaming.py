"""BDH streaming: split sequences, RoPE at large positions, generation, state persistence."""
import math
import os
import subprocess
import sys
import textwrap
from decimal import Decimal, getcontext

import pytest
import torch

import bdh.attention
from bdh import BDH, BDHConfig, BDHState, load_state, save_state
from kernels.rope import official_freqs, rope_angles, rotate_neurons
from helpers import assert_rel_close

SMALL = dict(n_layer=2, n_embd=32, n_head=2, mlp_internal_dim_multiplier=8, vocab_size=256,
             dropout=0.0, backend="torch", chunk_size=16)


def make_model(seed=0, **overrides):
    torch.manual_seed(seed)
    model = BDH(BDHConfig(**{**SMALL, **overrides})).eval()
    with torch.no_grad():                 # sharper logits than the 0.02 init: fewer near-ties
        for p in (model.encoder, model.encoder_v, model.decoder, model.lm_head):
            p.mul_(2.5)
    return model


def random_cuts(T, gen):
    """Cut points of [0, T) into pieces of random sizes, with several single tokens."""
    cuts, t = [0], 0
    while t < T:
        size = int(torch.randint(1, 12, (1,), generator=gen)) if len(cuts) % 3 else 1
        t = min(T, t + size)
        cuts.append(t)
    return cuts


# ----------------------------------------------------------------------------- streaming

@pytest.mark.parametrize("grad", [False, True])
def test_streaming_equals_one_call_at_random_cuts(grad):
    model = make_model()
    idx = torch.randint(0, 256, (2, 60))
    with torch.no_grad():
        full, _ = model(idx)
    cuts = random_cuts(60, torch.Generator().manual_seed(1))
    assert any(b - a == 1 for a, b in zip(cuts, cuts[1:]))
    state, pieces = None, []
    with torch.set_grad_enabled(grad):
        for a, b in zip(cuts, cuts[1:]):
            logits, state = model(idx[:, a:b], state=state, return_state=True)
            pieces.append(logits.detach())
            assert state.position == b
    assert_rel_close(torch.cat(pieces, dim=1), full, 1e-5, "streamed logits")


def test_state_size_is_independent_of_context_length_and_input_state_is_untouched():
    model = make_model()
    idx = torch.randint(0, 256, (1, 60))
    with torch.no_grad():
        _, s10 = model(idx[:, :10], return_state=True)
        _, s60 = model(idx, return_state=True)
        C = model.config
        assert s10.nbytes() == s60.nbytes() == C.n_layer * C.n_head * C.N * C.n_embd * 4
        before = [S.clone() for S in s10.layers]
        model(idx[:, 10:11], state=s10, return_state=True)     # decoding step path
        model(idx[:, 10:20], state=s10, return_state=True)     # chunked path
    assert all(torch.equal(a, b) for a, b in zip(before, s10.layers))


def test_state_position_drives_rope():
    """RoPE continues from state.position: the same state at a wrong position gives other
    logits. (A zero state at any position gives the same logits: q·k sees only offsets.)"""
    model = make_model()
    idx = torch.randint(0, 256, (1, 30))
    with torch.no_grad():
        full, _ = model(idx)
        _, st = model(idx[:, :12], return_state=True)
        right, _ = model(idx[:, 12:], state=st)
        wrong, _ = model(idx[:, 12:], state=BDHState(st.layers, st.position + 7, st.config))
        zero = model.init_state(1)
        far, _ = model(idx, state=BDHState(zero.layers, 10 ** 6, zero.config))
    assert_rel_close(right, full[:, 12:], 1e-5, "continued logits")
    assert (wrong - right).abs().max() > 1e-3, "RoPE must use the state's position"
    assert_rel_close(far, full, 1e-5, "shift invariance from an empty state")


# ----------------------------------------------------------------------------- RoPE phases

PI = Decimal("3.14159265358979323846264338327950288419716939937510582097494459")


def exact_angle(t, j, N):
    """2π·frac(t·θ^{-2j/N}/2π) with θ = 2^16, to ~40 digits."""
    getcontext().prec = 60
    f = (Decimal(2) ** (Decimal(-32 * j) / Decimal(N))) / (2 * PI)
    cyc = Decimal(t) * f
    return float((cyc - int(cyc)) * 2 * PI)


def angle_error(a, b):
    d = (a - b) % (2 * math.pi)
    return min(d, 2 * math.pi - d)


def test_rope_phase_is_exact_at_position_one_million():
    N, t = 64, 10 ** 6
    js = range(N // 2)
    exact = [exact_angle(t, j, N) for j in js]
    ours = rope_angles(t, 1, N)[0].tolist()
    assert max(angle_error(a, b) for a, b in zip(ours, exact)) < 1e-4
    # The rotation actually applied: rotate unit vectors e_{2j}, read the angle back.
    e = torch.zeros(N // 2, 1, N)
    e[torch.arange(N // 2), 0, 2 * torch.arange(N // 2)] = 1.0
    r = rotate_neurons(e, t)                                             # [N/2, 1, N]
    applied = [math.atan2(r[j, 0, 2 * j + 1].item(), r[j, 0, 2 * j].item()) for j in js]
    assert max(angle_error(a, b) for a, b in zip(applied, exact)) < 1e-4
    # The test can fail: the official float32 phase is far off at this position.
    f32 = official_freqs(N)[0::2]
    official = ((torch.tensor(float(t)) * f32) % 1 * (2 * math.pi)).tolist()
    assert max(angle_error(a, b) for a, b in zip(official, exact)) > 1e-3


def test_rope_gradient_is_the_inverse_rotation():
    x = torch.randn(2, 3, 7, 16, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda z: rotate_neurons(z, 12345), (x,))


# ----------------------------------------------------------------------------- generation

def test_greedy_generate_equals_repeated_argmax_of_the_full_forward():
    model = make_model()
    prompt = torch.randint(0, 256, (2, 9))
    out = model.generate(prompt, 14, top_k=1)
    assert out.shape == (2, 23) and out.dtype == torch.long
    assert torch.equal(out[:, :9], prompt)
    seq = prompt
    with torch.no_grad():
        for _ in range(14):
            logits, _ = model(seq)
            seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)


def test_seeded_sampling_is_reproducible():
    model = make_model()
    prompt = torch.randint(0, 256, (2, 5))
    a = model.generate(prompt, 20, temperature=1.5, generator=torch.Generator().manual_seed(7))
    b = model.generate(prompt, 20, temperature=1.5, generator=torch.Generator().manual_seed(7))
    c = model.generate(prompt, 20, temperature=1.5, seed=7)
    d = model.generate(prompt, 20, temperature=1.5, seed=8)
    assert torch.equal(a, b) and torch.equal(a, c)
    assert not torch.equal(a, d)
    k = model.generate(prompt, 20, top_k=3, seed=3)
    with torch.no_grad():
        logits, _ = model(k)
    top3 = logits[:, 4:-1].topk(3, dim=-1).indices                      # predicts k[:, 5:]
    assert (top3 == k[:, 5:, None]).any(-1).all(), "top_k=3 samples only from the top 3"


def test_generate_never_reruns_the_prefix(monkeypatch):
    model = make_model()
    calls = {"chunk_tokens": 0, "chunk_calls": 0, "steps": 0}
    real_attn, real_step = bdh.attention.hebbian_attention, bdh.attention.hebbian_step

    def counting_attn(q, k, v, **kw):
        calls["chunk_tokens"] += q.shape[2]
        calls["chunk_calls"] += 1
        return real_attn(q, k, v, **kw)

    def counting_step(q, k, v, state, **kw):
        calls["steps"] += 1
        return real_step(q, k, v, state, **kw)

    monkeypatch.setattr(bdh.attention, "hebbian_attention", counting_attn)
    monkeypatch.setattr(bdh.attention, "hebbian_step", counting_step)
    L, T0, n = model.config.n_layer, 20, 15
    prompt = torch.randint(0, 256, (1, T0))
    out = model.generate(prompt, n, top_k=1, prefill_chunk=8)
    assert calls == {"chunk_tokens": T0 * L, "chunk_calls": 3 * L, "steps": (n - 1) * L}
    # Same tokens as a prefill in one piece.
    monkeypatch.setattr(bdh.attention, "hebbian_attention", real_attn)
    assert torch.equal(out, model.generate(prompt, n, top_k=1))


def test_generate_continues_from_a_state():
    model = make_model()
    prompt = torch.randint(0, 256, (1, 7))
    whole = model.generate(prompt, 16, top_k=1)
    first, st = model.generate(prompt, 6, top_k=1, return_state=True)
    assert st.position == 7 + 6 - 1
    rest = model.generate(first[:, -1:], 10, top_k=1, state=st)
    assert torch.equal(torch.cat([first, rest[:, 1:]], dim=1), whole)


def test_generate_validates_its_inputs():
    model = make_model()
    p = torch.randint(0, 256, (1, 4))
    with pytest.raises(ValueError, match="temperature"):
        model.generate(p, 3, temperature=0.0)
    with pytest.raises(ValueError, match="top_k"):
        model.generate(p, 3, top_k=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(p, -1)
    with pytest.raises(TypeError, match="dtype torch.long"):
        model.generate(p.float(), 3)
    with pytest.raises(ValueError, match="token ids must lie"):
        model.generate(p + 256, 3)
    with pytest.raises(ValueError, match="T >= 1"):
        model.generate(p[:, :0], 3)


# ----------------------------------------------------------------------------- persistence

CONTINUE_SCRIPT = textwrap.dedent("""
    import sys, torch
    from bdh import BDH, BDHConfig, load_state
    cfg, weights, state_path, out_path, n = sys.argv[1:6]
    torch.set_num_threads(1)
    model = BDH(BDHConfig(**eval(cfg))).eval()
    model.load_state_dict(torch.load(weights))
    state = load_state(state_path, model=model)
    last = torch.load(out_path)
    torch.save(model.generate(last, int(n), top_k=1, state=state), out_path)
""")


def test_state_saved_in_one_process_continues_exactly_in_another(tmp_path):
    model = make_model()
    prompt = torch.randint(0, 256, (2, 11))
    whole = model.generate(prompt, 20, top_k=1)
    first, st = model.generate(prompt, 8, top_k=1, return_state=True)
    save_state(st, tmp_path / "state.pt")
    assert sorted(os.listdir(tmp_path)) == ["state.pt"], "the atomic write left a temp file"
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    torch.save(first[:, -1:], tmp_path / "tokens.pt")
    subprocess.run([sys.executable, "-c", CONTINUE_SCRIPT, repr(SMALL),
                    str(tmp_path / "weights.pt"), str(tmp_path / "state.pt"),
                    str(tmp_path / "tokens.pt"), "12"],
                   check=True, timeout=120)
    rest = torch.load(tmp_path / "tokens.pt")
    assert rest.shape == (2, 13)
    assert torch.equal(torch.cat([first, rest[:, 1:]], dim=1), whole)


def test_save_state_roundtrip_and_failed_write_keeps_old_file(tmp_path, monkeypatch):
    model = make_model()
    with torch.no_grad():
        _, st = model(torch.randint(0, 256, (1, 9)), return_state=True)
    path = tmp_path / "s.pt"
    save_state(st, path)
    back = load_state(path)
    assert back.position == 9 and back.config == st.config
    assert all(torch.equal(a, b) for a, b in zip(back.layers, st.layers))
    old = path.read_bytes()

    def broken_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_state(st, path)
    assert path.read_bytes() == old
    assert sorted(os.listdir(tmp_path)) == ["s.pt"]


def test_loading_into_a_different_config_fails_clearly(tmp_path):
    model = make_model()
    other = make_model(n_embd=16)
    with torch.no_grad():
        _, st = model(torch.randint(0, 256, (1, 5)), return_state=True)
    save_state(st, tmp_path / "s.pt")
    with pytest.raises(ValueError, match="different configuration.*n_embd: state has 32"):
        load_state(tmp_path / "s.pt", model=other)
    loaded = load_state(tmp_path / "s.pt")
    with pytest.raises(ValueError, match="different configuration"):
        other.generate(torch.zeros(1, 1, dtype=torch.long), 2, state=loaded)
    torch.save({"something": 1}, tmp_path / "junk.pt")
    with pytest.raises(ValueError, match="not a BDH state file"):
        load_state(tmp_path / "junk.pt")


def test_damaged_missing_and_old_state_files_fail_clearly(tmp_path):
    import stat

    from bdh.state import STATE_FORMAT, STATE_VERSION
    from glassbrain.atomic_file import CorruptFileError
    model = make_model()
    with torch.no_grad():
        _, st = model(torch.randint(0, 256, (1, 7)), return_state=True)
    path = tmp_path / "s.pt"
    save_state(st, path)
    assert STATE_VERSION == 2
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~_umask()        # not mkstemp's 0600
    good = path.read_bytes()
    # One flipped bit inside a layer's float32 data: torch loads it, the checksum does not.
    data = bytearray(good)
    at = data.find(st.layers[1].numpy().tobytes()[:64])
    assert at > 0
    data[at + 9] ^= 0x20
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptFileError, match=r"BDH state .*s\.pt: checksum mismatch.*rebuild"):
        load_state(path)
    path.write_bytes(good[: len(good) // 2])                          # truncated
    with pytest.raises(CorruptFileError, match=r"BDH state .*s\.pt: .*truncated or corrupt"):
        load_state(path)
    with pytest.raises(FileNotFoundError, match=r"BDH state .*gone\.pt: no such file"):
        load_state(tmp_path / "gone.pt")
    # A version-1 file (a bare torch.save of the payload, no checksum).
    torch.save({"format": STATE_FORMAT, "version": 1, "config": st.config, "position": 7,
                "layers": st.layers}, tmp_path / "v1.pt")
    with pytest.raises(ValueError, match=r"v1\.pt: BDH state format version 1 is not supported "
                                         r"\(this code reads version 2"):
        load_state(tmp_path / "v1.pt")


def _umask():
    m = os.umask(0)
    os.umask(m)
    return m


@pytest.mark.parametrize("change,match", [
    (lambda p: p.pop("layers"), "missing layers"),
    (lambda p: (p.pop("position"), p.pop("config")), "missing config, position"),
    (lambda p: p.update(layers="abc"), "layers should be a non-empty list"),
    (lambda p: p.update(layers=[]), "layers should be a non-empty list"),
    (lambda p: p["layers"].__setitem__(1, p["layers"][1].double()), r"layers\[1\] should be a "
                                                                    r"float32 tensor"),
    (lambda p: p["layers"].__setitem__(1, p["layers"][1][..., :-1]), r"layers\[1\] should be "
                                                                     r"of layers\[0\]'s shape"),
    (lambda p: p["layers"].__setitem__(0, {"S": 1}), r"layers\[0\] should be a float32"),
    (lambda p: p.update(position="7"), "position should be an int >= 0 or a list of 2 ints"),
    (lambda p: p.update(position=[3, 4, 5]), "position should be"),
    (lambda p: p.update(position=-1), "position should be"),
    (lambda p: p.update(config=[1, 2]), "config should be None or a dict"),
    (lambda p: p.update(config={"n_embd": [32]}), "config should be"),
])
def test_intact_state_file_of_the_wrong_structure_fails_clearly(tmp_path, change, match):
    """State files are untrusted input: one that passes its checksum but holds the wrong
    structure is refused with a ValueError naming the file and the field, not a raw
    KeyError / TypeError from deep inside."""
    from bdh.state import STATE_FORMAT, STATE_VERSION
    from glassbrain.atomic_file import save_checked
    model = make_model()
    with torch.no_grad():
        _, st = model(torch.randint(0, 256, (2, 5)), return_state=True)
    payload = {"format": STATE_FORMAT, "version": STATE_VERSION, "config": dict(st.config),
               "position": 5, "layers": [S.clone() for S in st.layers]}
    change(payload)
    save_checked(payload, tmp_path / "s.pt")
    with pytest.raises(ValueError, match=r"s\.pt: not a usable BDH state: " + match):
        load_state(tmp_path / "s.pt")
