"""The hierarchical state bank: exactness within budget, the merge / fold rules (checked against
an independent simulation of which chunks each slot holds), conservation of F, salience, and
constant state size past capacity."""
import pytest
import torch

from helpers import assert_rel_close, run_pieces
from kernels.bsbr import naive
from bsbr import BankConfig, BSBRAttention, empty_bank, push_chunks, update_salience

D, H, C, M = 24, 3, 4, 5
K = D // H


def random_chunks(B, n, dtype=torch.float64):
    return torch.randn(B, H, n, K, K, dtype=dtype), torch.randn(B, H, n, M, dtype=dtype)


class Simulation:
    """Which chunks each slot holds, per (batch, head), by the bank's rules (`bsbr.bank`)
    written out plainly: a list of levels, each a list of slots (oldest first), a slot = list
    of chunk ids."""

    def __init__(self, cfg, salience):
        self.cfg, self.sal = cfg, salience            # salience(b, h, chunks) -> float
        self.levels = [[] for _ in cfg.slots_per_level]
        self.archive = []

    def push(self, chunk_id, b, h):
        self._room(0, b, h)
        self.levels[0].append([chunk_id])

    def _room(self, lvl, b, h):
        caps = self.cfg.slots_per_level
        if len(self.levels[lvl]) < caps[lvl]:
            return
        if lvl == len(caps) - 1:
            sal = [self.sal(b, h, s) for s in self.levels[lvl]]
            i = sal.index(min(sal))
            self.archive += self.levels[lvl].pop(i)
        else:
            self._room(lvl + 1, b, h)
            a, c = self.levels[lvl].pop(0), self.levels[lvl].pop(0)
            self.levels[lvl + 1].append(a + c)

    def slots(self):
        """Slots in the bank's order: the archive, then the top level down to level 0."""
        out = [self.archive] if self.archive else []
        for lvl in reversed(range(len(self.levels))):
            out += self.levels[lvl]
        return out


@pytest.mark.parametrize("slots", [(2, 2, 2), (3, 2, 1), (2,), (4, 3)])
def test_merge_and_fold_rules_match_simulation(slots):
    """Every slot's F is the sum and h the mean of the chunks it holds, in the simulated order;
    levels, counts and the number of slots follow the rules; F is conserved."""
    cfg = BankConfig(slots_per_level=slots, salience_decay=0.5)
    B, n_chunks = 2, 23
    F_all, h_all = random_chunks(B, n_chunks)
    bank = empty_bank(B, H, K, K, M, cfg, dtype=torch.float64)
    # Salience differs per (b, h), so folds pick different slots in different rows. A chunk's
    # salience counts once its call has reported it (chunks enter the bank at salience 0).
    chunk_sal = torch.rand(B, H, n_chunks, dtype=torch.float64)
    given = set()
    def salience(b, h, s):
        return float(chunk_sal[b, h, [c for c in s if c in given]].sum())

    sims = {(b, h): Simulation(cfg, salience) for b in range(B) for h in range(H)}
    pushed = 0
    for m in [1, 3, 1, 1, 5, 2, 1, 4, 5]:                         # several chunks per call too
        new = range(pushed, pushed + m)
        bank = push_chunks(bank, F_all[:, :, new], h_all[:, :, new], cfg)
        # New slots start at 0 salience; give each chunk its salience as "routing weight".
        w = torch.zeros(B, H, bank.n, dtype=torch.float64)
        for (b, h), sim in sims.items():
            for c in new:
                sim.push(c, b, h)
            for i, s in enumerate(sim.slots()):
                w[b, h, i] = chunk_sal[b, h, [c for c in s if c in new]].sum()
        bank = update_salience(bank, w, 0, cfg)                  # decay^0 = 1: pure sums
        given.update(new)
        pushed += m
        assert bank.n_chunks == pushed
        assert bank.n <= cfg.capacity and bank.F.shape[2] == cfg.capacity
        for (b, h), sim in sims.items():
            slots_sim = sim.slots()
            assert len(slots_sim) == bank.n
            for i, s in enumerate(slots_sim):
                assert bank.counts[i] == len(s), (pushed, i)
                assert torch.allclose(bank.F[b, h, i], F_all[b, h, s].sum(0), rtol=0, atol=1e-12)
                assert torch.allclose(bank.h[b, h, i], h_all[b, h, s].mean(0), rtol=0, atol=1e-12)
                assert torch.allclose(bank.salience[b, h, i], chunk_sal[b, h, s].sum(),
                                      rtol=0, atol=1e-12)
        # Levels: the archive is level n_levels, others 2^level chunks, never increasing.
        L = cfg.n_levels
        for lvl, cnt in zip(bank.levels, bank.counts):
            assert lvl == L or cnt == 2 ** lvl
        assert list(bank.levels) == sorted(bank.levels, reverse=True)
        for lvl in range(L):
            assert bank.levels.count(lvl) <= slots[lvl]
        assert bank.levels.count(L) <= 1
        # F mass: the slots (archive included) sum to all chunks pushed so far.
        assert_rel_close(bank.F[:, :, :bank.n].sum(2), F_all[:, :, :pushed].sum(2), 1e-13,
                         "F mass")
        assert bank.F[:, :, bank.n:].abs().sum() == 0                 # padding stays zero


def test_rule_walkthrough_small():
    """(2, 2, 1): the levels after each pushed chunk, by hand."""
    cfg = BankConfig(slots_per_level=(2, 2, 1))
    F, h = random_chunks(1, 11)
    bank = empty_bank(1, H, K, K, M, cfg, dtype=torch.float64)
    want = [(0,), (0, 0), (1, 0), (1, 0, 0), (1, 1, 0), (1, 1, 0, 0), (2, 1, 0), (2, 1, 0, 0),
            (2, 1, 1, 0), (2, 1, 1, 0, 0), (3, 2, 1, 0)]
    for j in range(11):
        bank = push_chunks(bank, F[:, :, j:j + 1], h[:, :, j:j + 1], cfg)
        assert bank.levels == want[j], j
    assert bank.counts == (4, 4, 2, 1)              # archive: chunks 0-3; then 4-7, 8-9, 10
    assert_rel_close(bank.F[:, :, 0], (F[:, :, 0] + F[:, :, 1]) + (F[:, :, 2] + F[:, :, 3]), 1e-15)


def test_budget_at_least_chunks_is_bit_exact():
    """A bounded bank with level 0 >= the number of chunks never merges: bit-for-bit the exact
    bank's outputs, streamed in pieces and token by token, and the same slots."""
    x = torch.randn(2, 35, D)
    exact = BSBRAttention(D, H, C, top_k=2, meta_dim=M)
    bounded = BSBRAttention(D, H, C, top_k=2, meta_dim=M,
                            bank=BankConfig(slots_per_level=(35 // C, 2, 1)))
    bounded.load_state_dict(exact.state_dict())
    for cuts in ([0, 3, 4, 13, 14, 35], list(range(36))):
        with torch.no_grad():
            y_e, s_e = run_pieces(exact, x, cuts)
            y_b, s_b = run_pieces(bounded, x, cuts)
        assert torch.equal(y_e, y_b)
        n = s_e.bank.n
        assert s_b.bank.levels == (0,) * n == s_e.bank.levels
        assert torch.equal(s_b.bank.F[:, :, :n], s_e.bank.F)


def test_past_capacity_state_size_is_constant_and_mass_conserved():
    cfg = BankConfig(slots_per_level=(2, 2, 1))
    attn = BSBRAttention(D, H, C, top_k=2, meta_dim=M, bank=cfg).double()
    x = torch.randn(2, 48, D, dtype=torch.float64)          # 12 chunks, capacity 6 slots
    sizes, st = [], None
    with torch.no_grad():
        for t in range(48):
            y, st = attn(x[:, t:t + 1], state=st, return_state=True)
            assert torch.isfinite(y).all()
            sizes.append(st.nbytes())
    assert len(set(sizes)) == 1
    assert st.bank.n_chunks == 12 and st.bank.levels[0] == cfg.n_levels     # archive in use
    with torch.no_grad():
        B, T = x.shape[:2]
        k = attn.W_k(x).view(B, T, H, K).transpose(1, 2)
        v = attn.W_v(x).view(B, T, H, K).transpose(1, 2)
        hk = attn.W_h(x).view(B, T, H, M).transpose(1, 2)
        F_all, _ = naive.chunk_states_ref(k, v, hk, chunk_size=C)
    assert_rel_close(st.bank.F[:, :, :st.bank.n].sum(2), F_all.sum(2), 1e-12, "F mass")
    # Past capacity the bank approximates: the outputs move away from the exact bank's.
    exact = BSBRAttention(D, H, C, top_k=2, meta_dim=M).double()
    exact.load_state_dict(attn.state_dict())
    with torch.no_grad():
        y_b, _ = run_pieces(attn, x, list(range(0, 49, 2)))
    assert not torch.allclose(y_b, exact(x))
    assert torch.allclose(y_b[:, :2 * C + 1], exact(x)[:, :2 * C + 1], rtol=0, atol=1e-12)


def test_salience_is_the_decayed_sum_of_routing_weights():
    cfg = BankConfig(slots_per_level=(8, 2, 1), salience_decay=0.9)
    attn = BSBRAttention(D, H, C, top_k=2, meta_dim=M, bank=cfg).double()
    x = torch.randn(2, 19, D, dtype=torch.float64)
    _, st = attn(x[:, :12], return_state=True)                  # 3 chunks in, salience 0
    assert st.bank.n == 3 and torch.equal(st.bank.salience, torch.zeros_like(st.bank.salience))
    _, st2 = attn(x[:, 12:19], state=st, return_state=True)    # 7 queries route to the bank
    B, T = 2, 19
    with torch.no_grad():
        q = attn.W_q(x).view(B, T, H, K).transpose(1, 2)
        k = attn.W_k(x).view(B, T, H, K).transpose(1, 2)
        v = attn.W_v(x).view(B, T, H, K).transpose(1, 2)
        r = attn.W_r(x).view(B, T, H, M).transpose(1, 2)
        hk = attn.W_h(x).view(B, T, H, M).transpose(1, 2)
        F, h = naive.chunk_states_ref(k, v, hk, chunk_size=C)
        _, w = naive.bsbr_attention_ref(q[:, :, 12:], k[:, :, 12:], v[:, :, 12:], r[:, :, 12:],
                                        hk[:, :, 12:], chunk_size=C, top_k=2, bank_F=F[:, :, :3],
                                        bank_h=h[:, :, :3], return_slot_weights=True)
    assert_rel_close(st2.bank.salience[:, :, :3], w, 1e-12, "salience")
    assert w.sum() > 0
    # The next call decays the old salience by 0.9^T before adding its own weights.
    s = update_salience(st2.bank, torch.ones(B, H, st2.bank.n, dtype=torch.float64), 3, cfg)
    assert_rel_close(s.salience[:, :, :st2.bank.n],
                     st2.bank.salience[:, :, :st2.bank.n] * 0.9 ** 3 + 1, 1e-14)


def test_bank_gradients_flow_through_merges():
    cfg = BankConfig(slots_per_level=(2, 2, 1))
    F, h = random_chunks(1, 7)
    F.requires_grad_(True)
    h.requires_grad_(True)
    bank = push_chunks(empty_bank(1, H, K, K, M, cfg, dtype=torch.float64), F, h, cfg)
    (bank.F.sum() + bank.h.sum()).backward()
    assert torch.equal(F.grad, torch.ones_like(F))              # F is only ever summed
    assert torch.isfinite(h.grad).all() and (h.grad > 0).all()


def test_bad_bank_config_raises_clearly():
    with pytest.raises(ValueError, match=r"slots_per_level\[0\]: expected an int >= 2, got 1"):
        BankConfig(slots_per_level=(1, 2))
    with pytest.raises(ValueError, match=r"slots_per_level\[1\]: expected an int >= 1, got 0"):
        BankConfig(slots_per_level=(2, 0))
    with pytest.raises(TypeError, match="slots_per_level"):
        BankConfig(slots_per_level=())
    with pytest.raises(ValueError, match="salience_decay.*\\(0, 1\\].*1.5"):
        BankConfig(salience_decay=1.5)
    assert BankConfig(slots_per_level=(1,)).capacity == 2
