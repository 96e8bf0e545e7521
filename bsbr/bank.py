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

All updates are out of place (the caller's state stays valid, autograd flows through F and h).
"""
from __future__ import annotations

import torch

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
