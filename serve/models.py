"""Model adapters: what the engine needs from a recurrent model, for BDH and the BSBR LM.

The engine never touches a model's internals; it holds opaque per-session states and calls

    state          = adapter.new_state()                     one empty history (batch 1)
    logits, state  = adapter.prefill(state, tokens)          tokens [T] → next-token logits [V]
    key            = adapter.batch_key(state)                states with equal keys step together
    batch          = adapter.stack(states)                   one batched state (rows in order)
    logits, batch  = adapter.step(batch, tokens)             tokens [B] → logits [B, V]
    states         = adapter.split(batch)                    one independent state per row
    payload        = adapter.to_payload(state) / adapter.from_payload(payload)   for the store

``step`` also returns an observation for the dashboard (``observe=True``): BDH's active neurons
of the token just stepped, per layer, pooled to a grid (`BrainProbe`); the BSBR LM's bank.

BDH steps through `bdh.decode.BDHDecoder`, which keeps a RoPE position per row, so every
running session decodes in one batch (a constant `batch_key`). The BSBR LM's public protocol
takes one position per call (its bank's levels follow the position), so its `batch_key` is the
position and only rows at equal positions share a step.
Another family (a transformers model with a recurrent attention) fits by implementing the same
methods on its cache.
"""
from __future__ import annotations

import math

import torch

from bdh import BDH, BDHState, SparsityProbe
from bdh.decode import DECODE_MODES, BDHDecoder
from bsbr import BSBRLM, BankState, BSBRLMState, BSBRState

BRAIN_CELLS = 4096          # the glass brain's grid: at most 64 × 64 cells per layer


def brain_cells(neurons: int) -> int:
    """Cells of the square grid that ``neurons`` neurons are pooled to: the largest square of a
    power-of-two side that has at most one cell per neuron and at most BRAIN_CELLS cells."""
    side = 1
    while (2 * side) ** 2 <= min(neurons, BRAIN_CELLS):
        side *= 2
    return side * side


class ModelAdapter:
    """The interface the engine drives (see the module docstring). ``kind`` names the family,
    ``vocab_size`` is 256 (bytes), ``device`` is where the weights and active states live."""
    kind = "model"
    vocab_size = 256

    def __init__(self, model: torch.nn.Module, name: str):
        self.model = model.eval()
        self.name = name
        self.device = next(model.parameters()).device

    # -- per-session state
    def new_state(self):
        raise NotImplementedError

    def position(self, state) -> int:
        return int(state.position)

    def state_nbytes(self, state) -> int:
        return int(state.nbytes())

    def to_device(self, state, device):
        return state.to(device)

    def clone(self, state):
        """An independent copy of one session's state."""
        return state.clone()

    # -- compute
    @torch.no_grad()
    def prefill(self, state, tokens: torch.Tensor, chunk: int = 4096):
        """Consume ``tokens`` [T] (T >= 1) after ``state``: (logits [V] for the next token, the
        new state). The state passed in is not modified."""
        logits = None
        for s in range(0, tokens.numel(), chunk):
            piece = tokens[s:s + chunk].view(1, -1).to(self.device)
            logits, state = self.model(piece, state=state, return_state=True)
        return logits[0, -1], state

    def batch_key(self, state):
        return self.position(state)

    def stack(self, states: list):
        """One batched state of ``states``' rows, in order. It may empty the list (the engine
        hands the states over), so a row can be freed once it is copied."""
        raise NotImplementedError

    def split(self, batch) -> list:
        raise NotImplementedError

    def join(self, batch, states: list):
        """``batch`` with the rows of ``states`` added at the end."""
        return self.stack(self.split(batch) + list(states))

    def leave(self, batch, rows: list):
        """(``batch`` without ``rows`` or None when none is left, the states of ``rows``)."""
        states = self.split(batch)
        kept = [s for i, s in enumerate(states) if i not in rows]
        return (self.stack(kept) if kept else None), [states[i] for i in rows]

    @torch.no_grad()
    def step(self, batch, tokens: torch.Tensor, observe: bool = False):
        """One token per row: (logits [B, V], the new batched state, observation or None)."""
        logits, batch = self.model(tokens.view(-1, 1).to(self.device), state=batch,
                                   return_state=True)
        return logits[:, -1], batch, (self.observe(batch) if observe else None)

    def observe(self, batch):
        return None

    # -- persistence (tensors and plain values only: the store loads with weights_only)
    def to_payload(self, state) -> dict:
        raise NotImplementedError

    def from_payload(self, payload: dict):
        raise NotImplementedError

    def _check_header(self, payload) -> dict:
        """Refuse a payload of another model family or configuration; returns this model's
        state config."""
        _expect(isinstance(payload, dict) and payload.get("kind") == self.kind,
                f"expected a {self.kind} state")
        cfg = self.model.state_config()
        _expect(payload.get("config") == cfg, f"made by another configuration "
                f"({payload.get('config')!r}, this model has {cfg!r})")
        return cfg

    def describe(self) -> dict:
        return {"kind": self.kind, "name": self.name,
                "params": sum(p.numel() for p in self.model.parameters())}


def _expect(cond: bool, what: str) -> None:
    if not cond:
        raise ValueError(f"state payload: {what}")


def _float_tensor(t, shape, what: str) -> torch.Tensor:
    _expect(isinstance(t, torch.Tensor) and t.dtype == torch.float32
            and list(t.shape) == list(shape),
            f"{what}: expected a float32 tensor {list(shape)}, got "
            f"{(t.dtype, list(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__}")
    return t


def _position(value) -> int:
    _expect(isinstance(value, int) and not isinstance(value, bool) and value >= 0,
            f"position: expected an int >= 0, got {value!r}")
    return value


class BrainProbe(SparsityProbe):
    """A `bdh.SparsityProbe` that keeps, per layer, which neurons of xy = xs·ys fired for the
    last token of each row: the fraction active in each cell of a grid of `brain_cells` cells
    (neighbouring neurons h·N + n pooled together), [B, cells] per layer, and the density of
    xs, ys and xy per row."""

    def __init__(self, model):
        super().__init__(model)
        C = model.config
        self.cells = brain_cells(C.n_head * C.N)
        self.grids: list = [None] * C.n_layer
        self.density: list = [None] * C.n_layer

    @torch.no_grad()
    def _record(self, layer: int, xs, ys, xy) -> None:
        B = xy.shape[0]
        fired = (xy[:, :, -1] > 0).float().reshape(B, 1, -1)               # [B,1,nh·N]
        self.grids[layer] = torch.nn.functional.adaptive_avg_pool1d(fired, self.cells)[:, 0]
        self.density[layer] = torch.stack([(t[:, :, -1] > 0).float().mean((1, 2))
                                           for t in (xs, ys, xy)], 1)        # [B,3]


class BDHAdapter(ModelAdapter):
    """BDH on `bdh.decode.BDHDecoder`: the batch is a decoder that owns the rows' states and
    steps them in place, each row at its own RoPE position, so every running session decodes
    in one batch (`batch_key` is constant). ``mode``: the decoder's ("eager", "graph",
    "sparse", "auto"); the glass brain is recorded only by eager steps (a probe cannot ride a
    captured CUDA graph), so observing servers decode eagerly."""
    kind = "bdh"

    def __init__(self, model: BDH, name: str = "bdh", mode: str = "eager"):
        if not isinstance(model, BDH):
            raise TypeError(f"model: expected a bdh.BDH, got {type(model).__name__}")
        if mode not in DECODE_MODES:
            raise ValueError(f"mode: expected one of {DECODE_MODES}, got {mode!r}")
        super().__init__(model, name)
        self.vocab_size = model.config.vocab_size
        self.mode = mode

    def new_state(self) -> BDHState:
        return self.model.init_state(1)

    def batch_key(self, state):
        return "bdh"

    def _decoder(self, state: BDHState) -> BDHDecoder:
        return BDHDecoder(self.model, state.batch_size, self.mode, state=state)

    def stack(self, states: list) -> BDHDecoder:
        """The decoder of ``states``' rows. It empties the list as it copies each row into
        tensors allocated once, so a row's state can be freed as soon as it is copied:
        `BDHState.cat` would hold every row and the batch at once, twice the batch's memory
        (96 GiB for 256 sessions of the default BDH)."""
        first = states[0]
        config, shapes = first.config, [(S.shape[1:], S.device) for S in first.layers]
        del first
        B = len(states)
        layers = [torch.empty((B, *shape), dtype=torch.float32, device=dev)
                  for shape, dev in shapes]
        positions = []
        for i in range(B):
            st, states[i] = states[i], None
            for dst, src in zip(layers, st.layers):
                dst[i].copy_(src[0])
            positions.extend(st.positions)
            del st
        states.clear()
        return self._decoder(BDHState(layers, tuple(positions), config))

    def split(self, batch: BDHDecoder) -> list:
        st = batch.state
        return [st.rows(r) for r in range(st.batch_size)]

    def join(self, batch: BDHDecoder, states: list) -> BDHDecoder:
        return self._decoder(BDHState.cat([batch.state, *states]))

    def leave(self, batch: BDHDecoder, rows: list):
        st = batch.state
        kept = [r for r in range(st.batch_size) if r not in rows]
        return (self._decoder(st.rows(kept)) if kept else None), [st.rows(r) for r in rows]

    @torch.no_grad()
    def step(self, batch: BDHDecoder, tokens, observe: bool = False):
        tokens = tokens.to(self.device)
        if not observe or batch.capture:
            return batch.step(tokens), batch, None
        with BrainProbe(self.model) as probe:
            logits = batch.step(tokens)
        obs = [{"grid": torch.stack([g[r] for g in probe.grids]).cpu(),          # [L, cells]
                "density": torch.stack([d[r] for d in probe.density]).cpu()}    # [L, 3]
               for r in range(tokens.numel())]
        return logits, batch, obs

    def to_payload(self, state: BDHState) -> dict:
        return {"kind": self.kind, "config": dict(state.config), "position": state.position,
                "tensors": [S.detach().cpu() for S in state.layers]}

    def from_payload(self, payload: dict) -> BDHState:
        cfg = self._check_header(payload)
        C = self.model.config
        tensors = payload.get("tensors")
        _expect(isinstance(tensors, list) and len(tensors) == C.n_layer,
                f"expected {C.n_layer} layer tensors")
        shape = [1, C.n_head, C.N, C.n_embd]
        layers = [_float_tensor(t, shape, f"layer {i}") for i, t in enumerate(tensors)]
        return BDHState(layers, _position(payload.get("position")), cfg).to(self.device)

    def describe(self) -> dict:
        C = self.model.config
        return {**super().describe(), "config": C.shape_dict(), "N": C.N, "mode": self.mode,
                "brain_cells": brain_cells(C.n_head * C.N), "layers": C.n_layer}


# The BSBR LM's state, flattened to tensors: per layer the bank (F, h, salience) and the
# partial chunk (k, v, hk); levels / counts are small int lists.
_BSBR_TENSORS = ("F", "h", "salience", "k", "v", "hk")


def _bsbr_layer_tensors(s: BSBRState) -> list:
    b = s.bank
    return [b.F, b.h, b.salience, s.k, s.v, s.hk]


class BSBRAdapter(ModelAdapter):
    """The BSBR LM with a bounded bank (`bsbr.BankConfig`): its state has the same size at any
    position, so it is stored and batched like BDH's. Rows batch when their positions are equal
    (then their banks have the same levels and counts)."""
    kind = "bsbr"

    def __init__(self, model: BSBRLM, name: str = "bsbr"):
        if not isinstance(model, BSBRLM):
            raise TypeError(f"model: expected a bsbr.BSBRLM, got {type(model).__name__}")
        if model.config.bank is None:
            raise ValueError("model: the BSBR LM needs a bounded bank (BSBRLMConfig.bank, a "
                             "BankConfig) so that its state has a fixed size; got bank=None")
        super().__init__(model, name)
        self.vocab_size = model.config.vocab_size
        self._shapes = [t.shape[1:] for t in _bsbr_layer_tensors(self.new_state().layers[0])]

    def new_state(self) -> BSBRLMState:
        return self.model.init_state(1, device=self.device)

    @staticmethod
    def _rebuild(template: BSBRLMState, layer_tensors: list) -> BSBRLMState:
        layers = []
        for s, ts in zip(template.layers, layer_tensors):
            F, h, sal, k, v, hk = ts
            bank = BankState(F, h, sal, s.bank.levels, s.bank.counts)
            layers.append(BSBRState(bank, k, v, hk, s.position, s.config))
        return BSBRLMState(layers, template.position, template.config)

    def stack(self, states: list) -> BSBRLMState:
        per_layer = [[torch.cat(ts) for ts in zip(*(_bsbr_layer_tensors(st.layers[i])
                                                     for st in states))]
                     for i in range(len(states[0].layers))]
        return self._rebuild(states[0], per_layer)

    def split(self, batch: BSBRLMState) -> list:
        B = batch.batch_size
        return [self._rebuild(batch, [[t[r:r + 1].clone() for t in _bsbr_layer_tensors(s)]
                                      for s in batch.layers]) for r in range(B)]

    def observe(self, batch: BSBRLMState):
        """Per row and layer: each valid slot's level, chunk count and salience (head mean)."""
        rows = []
        for r in range(batch.batch_size):
            layers = []
            for s in batch.layers:
                n = s.bank.n
                sal = s.bank.salience[r, :, :n].float().mean(0).cpu()
                layers.append({"levels": list(s.bank.levels), "counts": list(s.bank.counts),
                               "salience": [round(float(x), 5) for x in sal]})
            rows.append({"bank": layers})
        return rows

    def to_payload(self, state: BSBRLMState) -> dict:
        return {"kind": self.kind, "config": self.model.state_config(),
                "position": state.position,
                "levels": [list(s.bank.levels) for s in state.layers],
                "counts": [list(s.bank.counts) for s in state.layers],
                "tensors": [t.detach().cpu() for s in state.layers
                            for t in _bsbr_layer_tensors(s)]}

    def from_payload(self, payload: dict) -> BSBRLMState:
        self._check_header(payload)
        L = self.model.config.n_layer
        position = _position(payload.get("position"))
        tensors, levels, counts = (payload.get(k) for k in ("tensors", "levels", "counts"))
        _expect(isinstance(tensors, list) and len(tensors) == L * len(_BSBR_TENSORS),
                f"expected {L * len(_BSBR_TENSORS)} tensors")
        _expect(isinstance(levels, list) and isinstance(counts, list) and len(levels) == L
                and len(counts) == L, "levels / counts: expected one list per layer")
        template = self.new_state()
        cap = self.model.config.bank.capacity
        per_layer = []
        for i, s in enumerate(template.layers):
            lv, ct = levels[i], counts[i]
            _expect(isinstance(lv, list) and isinstance(ct, list) and len(lv) == len(ct) <= cap
                    and all(isinstance(x, int) and not isinstance(x, bool) for x in lv + ct),
                    f"layer {i}: levels / counts must be int lists of equal length <= {cap}")
            s.bank = BankState(s.bank.F, s.bank.h, s.bank.salience, tuple(lv), tuple(ct))
            s.position = position
            ts = tensors[i * len(_BSBR_TENSORS):(i + 1) * len(_BSBR_TENSORS)]
            per_layer.append([_float_tensor(t, [1, *shape], f"layer {i} {name}").to(self.device)
                              for t, shape, name in zip(ts, self._shapes, _BSBR_TENSORS)])
        template.position = position
        return self._rebuild(template, per_layer)

    def describe(self) -> dict:
        C = self.model.config
        return {**super().describe(), "layers": C.n_layer, "chunk_size": C.chunk_size,
                "bank": C.bank.as_dict()}


def kv_cache_bytes(tokens: int, n_layer: int = 12, n_embd: int = 768,
                   bytes_per_value: int = 2) -> int:
    """What a softmax transformer's KV cache holds after ``tokens`` tokens: keys and values
    (2) × layers × width × bytes per value per token; GPT-2 124M in bf16 by default
    (2 × 12 × 768 × 2 = 36,864 bytes per token)."""
    return 2 * n_layer * n_embd * bytes_per_value * int(tokens)


def human_bytes(n: float) -> str:
    if n <= 0:
        return "0 B"
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    i = min(int(math.log(n, 1024)), len(units) - 1)
    return f"{n / 1024 ** i:.3g} {units[i]}"
