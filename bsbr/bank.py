"""The hierarchical state bank: how completed chunk states enter, merge and fold away.

The hierarchical state bank of BWR-DNC, with ``BankConfig.slots_per_level`` =
(l0, l1, ..., l_top):
  * a completed chunk's (F, h) enters level 0 (1×, a raw chunk state);
  * a level l below the top that is full when a slot must enter it first merges its two oldest
    slots into one slot of level l + 1 (F summed, h averaged, salience summed): 2^(l+1) chunks;
  * the top level, when full, folds its lowest-salience slot (per batch row and head) into the
    single archive slot (F summed, h averaged weighted by chunk counts, salience summed);
  * salience, per (batch, head, slot): s ← decay^T · s + Σ over the call's T queries of the
    routing weight the slot received (the kernel's slot_weights). New slots start at 0.
F is only ever summed, so Σ_slots F (archive included) = Σ of every completed chunk's F.
``cfg = None`` is the exact bank: every chunk stays a slot of its own, nothing merges.

The rows bank (`kernels.bsbr.bsbr_rows_step`, the transformers cache's layout) keeps the same
slots per row in fixed regions with device-side counts; `bank_of_row` and `rows_of_banks` move
between the two, and `fresh_bank` is a whole prompt's pushes into an empty bank at once.

All updates are out of place (the caller's state stays valid, autograd flows through F and h).
"""
from __future__ import annotations

import torch

from kernels.bsbr import RowsLayout

from .config import BankConfig
from .state import BankState


def empty_bank(batch: int, n_head: int, K: int, V: int, M: int, cfg: BankConfig | None, *,
               device=None, dtype=torch.float32) -> BankState:
    """A bank with no slots; a bounded one is allocated at its capacity at once."""
    S = 0 if cfg is None else cfg.capacity
    return BankState(torch.zeros(batch, n_head, S, K, V, device=device, dtype=dtype),
                     torch.zeros(batch, n_head, S, M, device=device, dtype=dtype),
                     torch.zeros(batch, n_head, S, device=device, dtype=dtype))


@torch.no_grad()
def update_salience(bank: BankState, slot_weights: torch.Tensor, n_tokens: int,
                    cfg: BankConfig | None) -> BankState:
    """Decay every valid slot's salience by decay^n_tokens and add the weights it just got."""
    if bank.n == 0 or slot_weights is None:
        return bank
    decay = 1.0 if cfg is None else cfg.salience_decay ** n_tokens
    s = bank.salience.clone()
    s[:, :, :bank.n] = s[:, :, :bank.n] * decay + slot_weights.to(s.dtype)
    return BankState(bank.F, bank.h, s, bank.levels, bank.counts)


class _Slots:
    """One block of same-level slots: F [B,H,n,K,V], h [B,H,n,M], s [B,H,n]."""

    def __init__(self, F, h, s):
        self.F, self.h, self.s = F, h, s

    def __len__(self):
        return self.F.shape[2]

    def take_two_oldest(self):
        """Remove the two oldest slots and return them merged (F summed, h averaged)."""
        F, h, s = self.F, self.h, self.s
        merged = _Slots(F[:, :, 0:1] + F[:, :, 1:2], (h[:, :, 0:1] + h[:, :, 1:2]) * 0.5,
                        s[:, :, 0:1] + s[:, :, 1:2])
        self.F, self.h, self.s = F[:, :, 2:], h[:, :, 2:], s[:, :, 2:]
        return merged

    def append(self, other: "_Slots"):
        self.F = torch.cat([self.F, other.F], 2)
        self.h = torch.cat([self.h, other.h], 2)
        self.s = torch.cat([self.s, other.s], 2)

    def take_least_salient(self):
        """Remove, per (batch, head), the slot of lowest salience (the oldest among ties)."""
        F, h, s = self.F, self.h, self.s
        B, H, n = s.shape
        i = s.argmin(-1, keepdim=True)                                        # [B,H,1]
        r = torch.arange(n - 1, device=s.device).expand(B, H, n - 1)
        keep = r + (r >= i).long()                                            # skip slot i

        def pick(t, idx):
            return t.gather(2, idx.view(*idx.shape, *([1] * (t.dim() - 3)))
                            .expand(*idx.shape, *t.shape[3:]))

        out = _Slots(pick(F, i), pick(h, i), s.gather(2, i))
        self.F, self.h, self.s = pick(F, keep), pick(h, keep), s.gather(2, keep)
        return out


def push_chunks(bank: BankState, F_new: torch.Tensor, h_new: torch.Tensor,
                cfg: BankConfig | None) -> BankState:
    """The bank after the completed chunks F_new [B,H,m,K,V], h_new [B,H,m,M] enter it, oldest
    first, each one merging / folding slots as the rules above require."""
    m = F_new.shape[2]
    if m == 0:
        return bank
    F_new, h_new = F_new.to(bank.F.dtype), h_new.to(bank.h.dtype)
    s_new = torch.zeros(F_new.shape[:3], dtype=bank.salience.dtype, device=F_new.device)
    if cfg is None:                                     # exact: append, nothing merges
        n = bank.n
        return BankState(torch.cat([bank.F[:, :, :n], F_new], 2),
                         torch.cat([bank.h[:, :, :n], h_new], 2),
                         torch.cat([bank.salience[:, :, :n], s_new], 2),
                         bank.levels + (0,) * m, bank.counts + (1,) * m)

    L, caps = cfg.n_levels, cfg.slots_per_level
    # Split the valid slots into the archive and one block per level (levels are non-increasing
    # along the slots, so each level is one contiguous block).
    blocks, start = {}, 0
    for lvl in range(L, -1, -1):
        cnt = bank.levels.count(lvl)
        sl = slice(start, start + cnt)
        blocks[lvl] = _Slots(bank.F[:, :, sl], bank.h[:, :, sl], bank.salience[:, :, sl])
        start += cnt
    archive_count = bank.counts[0] if bank.n and bank.levels[0] == L else 0

    def fold_into_archive(slot: _Slots, count: int):
        nonlocal archive_count
        arch = blocks[L]
        if archive_count == 0:
            blocks[L] = slot
        else:
            w = archive_count / (archive_count + count)
            blocks[L] = _Slots(arch.F + slot.F, arch.h * w + slot.h * (1.0 - w), arch.s + slot.s)
        archive_count += count

    def make_room(lvl: int):
        if len(blocks[lvl]) < caps[lvl]:
            return
        if lvl == L - 1:
            fold_into_archive(blocks[lvl].take_least_salient(), 2 ** lvl)
        else:
            make_room(lvl + 1)
            blocks[lvl + 1].append(blocks[lvl].take_two_oldest())

    for j in range(m):
        make_room(0)
        blocks[0].append(_Slots(F_new[:, :, j:j + 1], h_new[:, :, j:j + 1], s_new[:, :, j:j + 1]))

    order = range(L, -1, -1)
    levels = tuple(lvl for lvl in order for _ in range(len(blocks[lvl])))
    counts = tuple((archive_count if lvl == L else 2 ** lvl) for lvl in levels)
    pad = cfg.capacity - len(levels)
    B, H = F_new.shape[:2]
    z = dict(device=F_new.device, dtype=bank.F.dtype)
    F = torch.cat([blocks[lvl].F for lvl in order]
                  + [torch.zeros(B, H, pad, *F_new.shape[3:], **z)], 2)
    h = torch.cat([blocks[lvl].h for lvl in order]
                  + [torch.zeros(B, H, pad, h_new.shape[3], **z)], 2)
    s = torch.cat([blocks[lvl].s for lvl in order]
                  + [torch.zeros(B, H, pad, device=F_new.device, dtype=bank.salience.dtype)], 2)
    return BankState(F, h, s, levels, counts)


def fresh_plan(m: int, cfg: BankConfig) -> list[tuple[int, int, int]]:
    """Where ``m`` completed chunks end up when they enter an empty bounded bank in one call:
    (level, first chunk, end chunk) per slot in the bank's order (the archive, level n_levels,
    first). Every new slot's salience is 0, so a fold takes the oldest top slot and each slot
    holds a contiguous run of chunks (the archive a prefix)."""
    L, caps = cfg.n_levels, cfg.slots_per_level
    levels = [[] for _ in caps]
    archive = 0

    def make_room(lvl: int):
        nonlocal archive
        if len(levels[lvl]) < caps[lvl]:
            return
        if lvl == L - 1:
            archive = levels[lvl].pop(0)[1]
        else:
            make_room(lvl + 1)
            first, second = levels[lvl].pop(0), levels[lvl].pop(0)
            levels[lvl + 1].append((first[0], second[1]))

    for j in range(m):
        make_room(0)
        levels[0].append((j, j + 1))
    plan = [(L, 0, archive)] if archive else []
    return plan + [(lvl, a, b) for lvl in range(L - 1, -1, -1) for a, b in levels[lvl]]


def fresh_bank(F_new: torch.Tensor, h_new: torch.Tensor, cfg: BankConfig | None) -> BankState:
    """`push_chunks` of the chunks F_new [B,H,m,K,V], h_new [B,H,m,M] into an empty bank, in
    closed form (`fresh_plan`): a slot's F is the sum of its chunks' and h their mean (what the
    pairwise merges and the count-weighted archive average give), salience 0. A prompt of m
    chunks costs O(m) work instead of m pushes."""
    sd = torch.float64 if F_new.dtype == torch.float64 else torch.float32
    F_new, h_new = F_new.to(sd), h_new.to(sd)
    B, H, m = F_new.shape[:3]
    if cfg is None:
        return BankState(F_new, h_new, F_new.new_zeros(B, H, m), (0,) * m, (1,) * m)
    plan = fresh_plan(m, cfg)
    pad = cfg.capacity - len(plan)
    F = torch.stack([F_new[:, :, a:b].sum(2) for _, a, b in plan]
                    + [F_new.new_zeros(B, H, *F_new.shape[3:])] * pad, 2)
    h = torch.stack([h_new[:, :, a:b].mean(2) for _, a, b in plan]
                    + [h_new.new_zeros(B, H, h_new.shape[3])] * pad, 2)
    return BankState(F, h, F_new.new_zeros(B, H, cfg.capacity),
                     tuple(lvl for lvl, _, _ in plan), tuple(b - a for _, a, b in plan))


def rows_layout(cfg: BankConfig | None, capacity: int = 0):
    """The `kernels.bsbr.RowsLayout` of a rows bank: the bounded bank's levels, or the exact
    bank as one never-merging level of ``capacity`` slots."""
    if cfg is None:
        return RowsLayout((capacity,), bounded=False)
    return RowsLayout(cfg.slots_per_level, True, cfg.salience_decay)


def _row_slots(layout, counts: list[int]) -> list[int]:
    """A row's used slots in the bank's order (archive, top level, ..., level 0)."""
    slots = [0] if counts[0] else []
    for lvl in range(layout.levels - 1, -1, -1):
        a = layout.start(lvl)
        slots += range(a, a + counts[1 + lvl])
    return slots


def bank_of_row(F, h, salience, counts: list[int], layout, cfg: BankConfig | None) -> BankState:
    """Row ``b`` of a rows bank (F [1,H,S,K,V], h, salience: that row's slices; counts: its
    counts read on the host) as a `BankState` in the host layout."""
    slots = _row_slots(layout, counts)
    L = layout.levels
    levels = ((L,) if counts[0] else ()) + tuple(
        lvl for lvl in range(L - 1, -1, -1) for _ in range(counts[1 + lvl]))
    sizes = tuple(counts[0] if lvl == L else 2 ** lvl for lvl in levels)
    index = torch.tensor(slots, dtype=torch.long, device=F.device)
    Fs, hs, ss = (t.index_select(2, index) for t in (F, h, salience))
    if cfg is not None:
        pad = cfg.capacity - len(slots)
        Fs = torch.cat([Fs, Fs.new_zeros(*Fs.shape[:2], pad, *Fs.shape[3:])], 2)
        hs = torch.cat([hs, hs.new_zeros(*hs.shape[:2], pad, hs.shape[3])], 2)
        ss = torch.cat([ss, ss.new_zeros(*ss.shape[:2], pad)], 2)
    return BankState(Fs, hs, ss, levels, sizes)


def rows_of_banks(banks: list, layout):
    """Rows bank tensors (F [B,H,S,K,V], h, salience, counts [B,H,L+1] int32) holding the host
    banks ``banks`` (one `BankState` of batch 1 per row) at ``layout``'s slots. Out of place
    (differentiable in the banks' F and h)."""
    F0 = banks[0].F
    H = F0.shape[1]
    S, L = layout.slots, layout.levels
    rows_F, rows_h, rows_s, counts = [], [], [], []
    for bank in banks:
        arch = bank.counts[0] if bank.n and bank.levels[0] == L and layout.bounded else 0
        per_level = [bank.levels.count(lvl) for lvl in range(L)] if layout.bounded \
            else [bank.n]
        row_counts = [arch] + per_level
        index = torch.tensor(_row_slots(layout, row_counts), dtype=torch.long,
                             device=F0.device)
        n = len(index)

        def place(t):
            return t.new_zeros(1, H, S, *t.shape[3:]).index_copy(2, index, t[:, :, :n])

        rows_F.append(place(bank.F))
        rows_h.append(place(bank.h))
        rows_s.append(place(bank.salience))
        counts.append(row_counts)
    counts = torch.tensor(counts, dtype=torch.int32, device=F0.device)
    return (torch.cat(rows_F), torch.cat(rows_h), torch.cat(rows_s),
            counts[:, None].expand(-1, H, -1).contiguous())
