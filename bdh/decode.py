"""Decoding BDH token by token from a batch of fixed-size states: the one stepper behind
`BDH.generate`, the benchmarks and the server.

    dec = BDHDecoder(model, batch_size=2)       # mode "auto": a CUDA graph on CUDA, else eager
    logits = dec.prefill(prompt)                # prompt [2, T] → the last token's logits [2, vocab]
    logits = dec.step(next_tokens)              # next_tokens [2] or [2, 1] → logits [2, vocab]
    dec.state                                   # a BDHState viewing the decoder's tensors
    dec.load(saved_state); dec.reset()

Modes (how a step runs; every mode computes the same function, up to float32 summation order):
  "eager"   `BDH._run` on the token (~90 launches a step at batch 1);
  "graph"   the same step captured once in a CUDA graph (`glassbrain.cuda_graph`) and
            replayed: one launch instead of ~90 (6 layers of three matvecs, RoPE, the Hebbian
            step and its reduction, LayerNorms; eagerly ~3–5 ms a token at batch 1 against a
            few hundred µs of work). The step reads nothing back to the host: the RoPE
            positions are a device tensor it advances itself;
  "sparse"  `bdh.sparse_decode.sparse_decode_step` (touches only the active neurons), captured
            in a CUDA graph on CUDA unless ``capture=False``;
  "auto"    "graph" on CUDA when nothing needs the eager path (eval mode or dropout 0, no
            probe attached), else "eager".

Rows may be at different positions (streams of different lengths decoded as one batch, for
continuous batching): each row then steps exactly as it would alone. In the device modes the
positions are an int64 tensor [B] on the device that the step itself advances, so a graph
replays without any host value changing.
"""
from __future__ import annotations

import torch

from glassbrain.checks import check_int, check_token_ids
from glassbrain.cuda_graph import CapturedStep
from kernels import StepLaunch

from .sparse_decode import SPARSE_BACKENDS, SparseDecodeLaunch, sparse_decode_launch
from .state import BDHState, advance_position

DECODE_MODES = ("auto", "eager", "graph", "sparse")
PREFILL_CHUNK = 4096   # a long prompt is consumed in pieces of this many tokens


def needs_eager(model) -> bool:
    """Whether ``model`` can only decode eagerly: dropout is active (training mode, p > 0) or a
    probe is attached (it records activations from Python)."""
    return (model.training and model.drop.p > 0) or model._probe is not None


class BDHDecoder:
    """A batch of ``batch_size`` BDH streams decoded one token per row per step.

    model: a `bdh.BDH` (its train/eval mode is left as it is). mode: see the module docstring.
    capture: for "sparse" only, whether to capture the step in a CUDA graph (None: on CUDA).
    prefill_chunk: `prefill` consumes a prompt in pieces of this many tokens.
    launch: the step's kernel launches, passed on every step: a `kernels.StepLaunch` (the
    dense Hebbian step of "eager" and "graph") or a `SparseDecodeLaunch` ("sparse"); None: the
    tuned defaults for the shape.
    backend: the sparse step's kernels ("auto", "triton", "torch").
    state: a BDHState of ``batch_size`` rows whose tensors the decoder adopts and updates in
    place from now on (no copy: pass ``state.clone()`` to keep the original); None: an empty
    history (zeros, position 0).

    The decoder owns one float32 state per layer, [B, nh, N, D], at fixed addresses for its
    life; `load` copies into them and `reset` zeroes them.
    """

    def __init__(self, model, batch_size: int, mode: str = "auto", *, capture: bool | None = None,
                 prefill_chunk: int = PREFILL_CHUNK,
                 launch: StepLaunch | SparseDecodeLaunch | None = None,
                 backend: str = "auto", state: BDHState | None = None):
        from .model import BDH
        if not isinstance(model, BDH):
            raise TypeError(f"model: expected a bdh.BDH, got {type(model).__name__}")
        batch_size = check_int("batch_size", batch_size, 1)
        prefill_chunk = check_int("prefill_chunk", prefill_chunk, 1)
        if mode not in DECODE_MODES:
            raise ValueError(f"mode: expected one of {DECODE_MODES}, got {mode!r}")
        if capture not in (None, True, False) or (capture is not None and mode != "sparse"):
            raise ValueError(f"capture: expected None, or True / False with mode 'sparse', got "
                             f"{capture!r} with mode {mode!r}")
        if backend not in SPARSE_BACKENDS:
            raise ValueError(f"backend: expected one of {SPARSE_BACKENDS}, got {backend!r}")
        device = model.encoder.device
        on_cuda = device.type == "cuda"
        if mode == "auto":
            mode = "graph" if on_cuda and not needs_eager(model) else "eager"
        kind = SparseDecodeLaunch if mode == "sparse" else StepLaunch
        if launch is not None and not isinstance(launch, kind):
            raise TypeError(f"launch: expected None or a {kind.__name__} (mode {mode!r}), got "
                            f"{type(launch).__name__}")
        if mode == "sparse" and needs_eager(model):
            raise ValueError("mode='sparse' (sparse=True): needs eval mode (or dropout 0) and no "
                             "probe attached")
        self.capture = mode == "graph" or (mode == "sparse" and
                                           (on_cuda if capture is None else capture))
        if self.capture and (not on_cuda or needs_eager(model)):
            raise ValueError(f"mode={mode!r}: a CUDA graph (cuda_graph=True) needs a CUDA model "
                             f"in eval mode (or dropout 0) with no probe attached; got device "
                             f"{device}, training={model.training}, "
                             f"probe={model._probe is not None}")
        self.model, self.batch_size, self.mode = model, batch_size, mode
        self.prefill_chunk, self.backend, self.device = prefill_chunk, backend, device
        self.launch = launch or (sparse_decode_launch(model, batch_size) if mode == "sparse"
                                 else None)
        self._idx = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
        self._pos = torch.zeros(batch_size, dtype=torch.int64, device=device)
        self._graph, self._graph_shared = None, None
        if state is None:
            self._state = model.init_state(batch_size)
        else:
            self._check_state(state)
            for i, S in enumerate(state.layers):
                if S.device != device or not S.is_contiguous():
                    raise ValueError(f"state.layers[{i}]: the decoder updates it in place, so it "
                                     f"must be contiguous on {device}; got {S.device}, "
                                     f"contiguous={S.is_contiguous()} (pass state.to(device))")
            self._state = BDHState(state.layers, state.position, model.state_config())
        self._sync_positions()

    # ----------------------------------------------------------------- state

    @property
    def state(self) -> BDHState:
        """The current state: the decoder's own tensors (the next step changes them; clone it
        to keep it), and the position of every row (an int, or a tuple when rows differ)."""
        return self._state

    @property
    def position(self):
        """How many tokens each row has consumed: an int, or a tuple of B ints."""
        return self._state.position

    def _check_state(self, state) -> None:
        if not isinstance(state, BDHState):
            raise TypeError(f"state: expected a BDHState, got {type(state).__name__}")
        C = self.model.config
        state.check(self.model.state_config(), C.n_layer,
                    (self.batch_size, C.n_head, C.N, C.n_embd), None, owner="BDH model")

    def _sync_positions(self) -> None:
        self._pos.copy_(torch.tensor(self._state.positions, dtype=torch.int64))

    def reset(self) -> None:
        """An empty history in every row: zero states, position 0."""
        for S in self._state.layers:
            S.zero_()
        self._state.position = 0
        self._sync_positions()

    def load(self, state: BDHState) -> None:
        """Copy ``state`` (``batch_size`` rows of this model's configuration, on any device)
        into the decoder; ``state`` itself is not changed."""
        self._check_state(state)
        for S, src in zip(self._state.layers, state.layers):
            S.copy_(src)
        self._state.position = state.position
        self._sync_positions()

    # ----------------------------------------------------------------- decoding

    @torch.no_grad()
    def prefill(self, tokens: torch.Tensor) -> torch.Tensor:
        """Consume ``tokens`` [B, T] (every row continues from its own position), by the chunked
        kernel in pieces of ``prefill_chunk``. Returns the logits after the last token, [B,
        vocab] (a view of this call's output)."""
        tokens = check_token_ids(tokens, self.model.config.vocab_size, "tokens")
        if tokens.shape[0] != self.batch_size or tokens.device != self.device:
            raise ValueError(f"tokens: expected [B, T] with B = {self.batch_size} on "
                             f"{self.device}, got {list(tokens.shape)} on {tokens.device}")
        layers = self._state.layers
        step_launch = self.launch if isinstance(self.launch, StepLaunch) else None  # T == 1
        logits = None
        for s in range(0, tokens.shape[1], self.prefill_chunk):
            piece = tokens[:, s:s + self.prefill_chunk]
            logits, new = self.model._run(piece, layers, self._state.position, want_state=True,
                                          inplace=True, last_only=True, step_launch=step_launch)
            for S, S_new in zip(layers, new):
                if S_new is not S:            # the chunked kernel returns new tensors
                    S.copy_(S_new)
            del new
            self._state.position = advance_position(self._state.position, piece.shape[1])
        self._sync_positions()
        return logits[:, -1]

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row, ``tokens`` [B] or [B, 1] (ids on the model's device, not
        range-checked: that would wait for the device). Returns the logits of the next token,
        [B, vocab]: a buffer that the next step overwrites (copy it to keep it)."""
        B = self.batch_size
        ids = isinstance(tokens, torch.Tensor) and tokens.dtype in (torch.int64, torch.int32)
        if not ids or tokens.numel() != B or tokens.dim() not in (1, 2) \
                or tokens.device != self.device:
            raise ValueError(f"tokens: expected int64 token ids [B] or [B, 1] with B = {B} on "
                             f"{self.device}, got "
                             f"{getattr(tokens, 'dtype', type(tokens).__name__)} "
                             f"{list(getattr(tokens, 'shape', []))} on "
                             f"{getattr(tokens, 'device', None)}")
        self._idx.copy_(tokens.reshape(B, 1))
        if not self.capture:
            logits = self._eager_step()
        else:
            shared = not isinstance(self._state.position, tuple)
            if self._graph is not None and self._graph_shared == shared:
                logits = self._graph.replay()
            else:                        # this step runs eagerly, then the graph is captured
                self._graph = None
                self._graph = CapturedStep(lambda: self._device_step(shared), self.device)
                self._graph_shared = shared
                logits = self._graph.first
        self._state.position = advance_position(self._state.position, 1)
        return logits[:, -1]

    def _eager_step(self) -> torch.Tensor:
        if self.mode == "sparse":
            return self._device_step(not isinstance(self._state.position, tuple))
        logits, _ = self.model._run(self._idx, self._state.layers, self._state.position,
                                    want_state=True, inplace=True, last_only=True,
                                    step_launch=self.launch)
        return logits

    def _device_step(self, shared: bool) -> torch.Tensor:
        """One step at the device-held positions, which it advances (graph-safe: nothing here
        reads a value back from the device). Rows at one position pass a single one, which
        lets the sparse step use its fused kernels."""
        pos = self._pos[:1] if shared else self._pos
        if self.mode == "sparse":
            from .sparse_decode import sparse_decode_step
            logits, _ = sparse_decode_step(self.model, self._idx, self._state.layers, pos,
                                           backend=self.backend, launch=self.launch)
        else:
            logits, _ = self.model._run(self._idx, self._state.layers, pos, want_state=True,
                                        inplace=True, last_only=True, step_launch=self.launch)
        self._pos.add_(1)
        return logits
