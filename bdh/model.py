"""BDH ("Dragon Hatchling"), the official pathwaycom/bdh architecture on Glass Brain's kernels.

    x  = LN(embed(idx))                                  [B,1,T,D]   LN: no affine, no bias
    repeat n_layer times, one shared weight set:
      xs = relu(x @ encoder)                             [B,nh,T,N]
      a  = hebbian(RoPE(xs), RoPE(xs), v = x, strict)    [B,nh,T,D]
      ys = relu(LN(a) @ encoder_v)                       [B,nh,T,N]
      xy = dropout(xs * ys)
      x  = LN(x + LN(xy as [B,1,T,nh·N] @ decoder))      neuron h·N + n is row h·N + n of decoder
    logits = x @ lm_head

Parameter and buffer names/shapes equal the official ones, so an official state_dict loads as
is. Differences from the official code, none of which changes the function:
  * attention runs through `kernels.hebbian_attention` (chunked, O(T)) instead of a dense T×T
    score matrix, and decoding through `kernels.hebbian_step`;
  * RoPE phases are exact at any position (see `kernels.rope`), and positions continue across calls
    when a state is passed (streaming);
  * the wide tensors are head-major ([nh, B·T, N], one bmm per weight: no broadcast copies of
    the weights), and the decoder product is taken per head and summed, which avoids copying
    xy into the [B,T,nh·N] layout; its backward recomputes dropout(xs·ys) instead of keeping it;
  * dropout draws an explicit keep mask (the same distribution as nn.Dropout, another
    random stream);
  * `generate` prefills once and then decodes from the state; it never re-runs the prefix.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from glassbrain.checks import check_token_ids, next_token_loss
from glassbrain.generation import check_generate_args
from glassbrain.sampling import sample_loop

from .attention import HebbianRoPE
from .config import BDHConfig
from .decode import PREFILL_CHUNK, BDHDecoder, needs_eager
from .state import BDHState, advance_position


def _gate(xs, ys, keep):
    xy = xs * ys
    return xy if keep is None else xy.mul_(keep)


class _GatedDecode(torch.autograd.Function):
    """y = Σ_h (xs_h ⊙ ys_h ⊙ keep_h · scale) @ dec_h   for xs, ys [nh,M,N], keep bool or None,
    dec [nh,N,D] → y [M,D] in xs's dtype.

    Autograd would save the dropped-out product (1 GiB per layer at the preset) for the decoder's
    weight gradient; this saves only xs, ys and the keep mask, which the layer holds anyway
    (xs for the attention, ys and keep for the product's own gradient), and recomputes the
    product in the backward: one elementwise pass instead of 1 GiB per layer kept. The dropout
    scale 1/(1−p) rides on the small decoder (dec·scale) rather than on the [nh,M,N] product,
    one pass over it fewer each way."""

    @staticmethod
    def forward(ctx, xs, ys, keep, scale, dec):
        cd = xs.dtype
        decc = (dec if scale == 1.0 else dec * scale).to(cd)
        y = torch.bmm(_gate(xs, ys.to(cd), keep), decc).sum(0)
        ctx.save_for_backward(xs, ys, keep, decc)
        ctx.scale, ctx.ys_dtype, ctx.dec_dtype = scale, ys.dtype, dec.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        xs, ys, keep, decc = ctx.saved_tensors
        nh, M, _ = xs.shape
        dy = dy.to(decc.dtype).expand(nh, M, dy.shape[-1])
        ddec = None
        if ctx.needs_input_grad[4]:
            xy = _gate(xs, ys.to(xs.dtype), keep)                        # recomputed
            ddec = torch.bmm(xy.transpose(1, 2), dy).to(ctx.dec_dtype)
            if ctx.scale != 1.0:
                ddec.mul_(ctx.scale)
            del xy
        dxs = dys = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            g = torch.bmm(dy, decc.transpose(1, 2))       # dL/dxy, scale included [nh,M,N]
            if keep is not None:
                g.mul_(keep)
            if ctx.needs_input_grad[0]:
                dxs = g * ys
            if ctx.needs_input_grad[1]:
                dys = g.mul_(xs).to(ctx.ys_dtype)
        return dxs, dys, None, None, ddec


def gated_decode(xs, ys, keep, scale: float, dec):
    """Σ_h dropout(xs_h ⊙ ys_h) @ dec_h with an explicit keep mask (see `_GatedDecode`)."""
    return _GatedDecode.apply(xs, ys, keep, float(scale), dec)


class BDH(nn.Module):
    def __init__(self, config: BDHConfig):
        super().__init__()
        if not isinstance(config, BDHConfig):
            raise TypeError(f"config: expected a BDHConfig, got {type(config).__name__}")
        self.config = config
        nh, D, N = config.n_head, config.n_embd, config.N
        self.decoder = nn.Parameter(torch.zeros((nh * N, D)).normal_(std=0.02))
        self.encoder = nn.Parameter(torch.zeros((nh, D, N)).normal_(std=0.02))
        self.attn = HebbianRoPE(N)
        self.ln = nn.LayerNorm(D, elementwise_affine=False, bias=False)
        self.embed = nn.Embedding(config.vocab_size, D)
        nn.init.normal_(self.embed.weight, mean=0.0, std=0.02)
        self.drop = nn.Dropout(config.dropout)
        self.encoder_v = nn.Parameter(torch.zeros((nh, D, N)).normal_(std=0.02))
        self.lm_head = nn.Parameter(torch.zeros((D, config.vocab_size)).normal_(std=0.02))
        # Hook point for bdh.probes.SparsityProbe: when set, each layer hands it xs, ys, xy.
        self._probe = None

    # ----------------------------------------------------------------- state

    def state_config(self) -> dict:
        return {"model": "BDH", **self.config.shape_dict()}

    def init_state(self, batch_size: int, device=None) -> BDHState:
        """An empty history: zeros [B, nh, N, D] float32 per layer, position 0."""
        C = self.config
        device = self.encoder.device if device is None else device
        return BDHState.zeros(C.n_layer, batch_size, C.n_head, C.N, C.n_embd, device=device,
                              config=self.state_config())

    def check_state(self, state, batch_size: int | None = None) -> None:
        """Raise a clear error unless ``state`` was made by a model of this configuration (and
        has ``batch_size`` rows, when given) and lives on this model's device."""
        if not isinstance(state, BDHState):
            raise TypeError(f"state: expected a BDHState or None, got {type(state).__name__}")
        C = self.config
        state.check(self.state_config(), C.n_layer, (batch_size, C.n_head, C.N, C.n_embd),
                    self.encoder.device, owner="BDH model")

    # ----------------------------------------------------------------- forward

    def _layer(self, x, S, position, step: bool, want_state: bool, layer: int,
               step_launch=None):
        """One BDH layer. x [B,1,T,D]; S None or [B,nh,N,D]. Returns (x, S_final or None).

        The [.., N]-wide tensors are made head-major, [nh, B·T, N], by one bmm per weight:
        `x @ encoder` on [B,1,T,D] @ [nh,D,N] would broadcast the weight, and torch.matmul
        materialises a broadcast operand (a [B,nh,D,N] copy, 537 MB in bf16 at the preset,
        and as large a weight gradient summed over B in the backward). xs, ys, xy are handed
        on as [B,nh,T,N] views of that storage."""
        C = self.config
        B, _, T, D = x.shape
        nh, N, M = C.n_head, C.N, B * T
        xh = x.reshape(1, M, D).expand(nh, M, D)                         # no copy
        xs_h = torch.bmm(xh, self.encoder).relu_()                       # [nh,B·T,N]
        xs = xs_h.view(nh, B, T, N).transpose(0, 1)                      # [B,nh,T,N] view
        a, S = self.attn(xs, x, position=position, state=S, output_final_state=want_state,
                         step=step, backend=C.backend, chunk_size=C.chunk_size,
                         dense_max_tokens=C.dense_max_tokens,
                         recompute=C.recompute_attention and self.training,
                         step_launch=step_launch)
        a_h = self.ln(a).transpose(0, 1).reshape(nh, M, D)               # a view when head-major
        ys_h = torch.bmm(a_h, self.encoder_v).relu_()                    # [nh,B·T,N]
        if self._probe is not None:
            ys = ys_h.view(nh, B, T, N).transpose(0, 1)
            self._probe._record(layer, xs, ys, xs * ys)
        p = self.drop.p if self.drop.training else 0.0
        keep = None
        if p > 0:
            keep = torch.empty(xs_h.shape, dtype=torch.bool, device=xs_h.device).bernoulli_(1 - p)
        # y = Σ_h dropout(xs_h · ys_h) @ decoder_h   (decoder row h·N + n is neuron n of head h)
        y = gated_decode(xs_h, ys_h, keep, 1.0 / (1.0 - p), self.decoder.view(nh, N, D))
        x = self.ln(x + self.ln(y.view(B, 1, T, D)))
        return x, S

    def _run(self, idx, states, position, want_state: bool, inplace: bool,
             last_only: bool = False, step_launch=None):
        """The layer stack on validated ids. states: None or a list of [B,nh,N,D] float32.
        position: the RoPE position of idx[:, 0]: an int, a tuple (one per row), or an int64
        device tensor [1] or [B] (decoding steps only). inplace: the decoding step may update
        ``states`` in place (only a `BDHDecoder`, which owns them). step_launch: the decoding
        step's `kernels.StepLaunch` (None: its default). Returns (logits, list of final states
        or None)."""
        C = self.config
        B, T = idx.shape
        x = self.ln(self.embed(idx).unsqueeze(1))                        # [B,1,T,D]
        step = T == 1 and states is not None and not torch.is_grad_enabled()
        ckpt = (C.gradient_checkpointing and self.training and torch.is_grad_enabled()
                and self._probe is None)
        new_states = []
        for layer in range(C.n_layer):
            S = None if states is None else states[layer]
            if step and not inplace:
                S = S.clone()
            if ckpt:
                x, S = checkpoint(self._layer, x, S, position, step, want_state, layer,
                                  use_reentrant=False)
            else:
                x, S = self._layer(x, S, position, step, want_state, layer, step_launch)
            new_states.append(S)
        if last_only:
            x = x[:, :, -1:]
        logits = x.view(B, x.shape[2], C.n_embd) @ self.lm_head
        return logits, (new_states if want_state else None)

    def forward(self, idx, targets=None, *, state: BDHState | None = None,
                return_state: bool = False):
        """idx [B,T] token ids.

        `logits, loss = model(idx, targets=None)` as the official model (loss None without
        targets). With `state=` the sequence continues from that state (RoPE positions from
        `state.position`); `return_state=True` returns `(logits, state)` instead, or
        `(logits, loss, state)` when targets are given too. The state passed in is not
        modified. T == 1 under `torch.no_grad()` uses the decoding kernel `hebbian_step`.
        """
        C = self.config
        idx = check_token_ids(idx, C.vocab_size)
        B, T = idx.shape
        states, position = None, 0
        if state is not None:
            self.check_state(state, B)
            states, position = state.layers, state.position
        elif return_state and T == 1:
            states = self.init_state(B).layers
        logits, new_states = self._run(idx, states, position, return_state, inplace=False)
        loss = None if targets is None else next_token_loss(logits, targets)
        if not return_state:
            return logits, loss
        new_state = BDHState(new_states, advance_position(position, T), self.state_config())
        return (logits, new_state) if targets is None else (logits, loss, new_state)

    # ----------------------------------------------------------------- generation

    @torch.no_grad()
    def generate(self, idx, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, generator: torch.Generator | None = None, *,
                 seed: int | None = None, state: BDHState | None = None,
                 return_state: bool = False, prefill_chunk: int = PREFILL_CHUNK,
                 cuda_graph: bool | None = None, sparse: bool = False):
        """Returns idx followed by ``max_new_tokens`` sampled tokens, [B, T0 + max_new_tokens].

        The prompt is consumed once by the chunked kernel (in pieces of ``prefill_chunk``
        tokens), then each new token is decoded from the fixed-size state by a
        `bdh.decode.BDHDecoder`: the prefix is never re-run and memory does not grow with the
        tokens generated. top_k=1 is greedy. ``generator`` (or ``seed``) makes sampling
        reproducible.

        Continuing: with `state=`, idx holds the tokens that follow the state. With
        `return_state=True` it returns `(tokens, state)`, where the state has consumed every
        returned token but the last, so `model.generate(tokens[:, -1:], n, state=state)`
        continues the same sequence (also after `save_state` / `load_state` in a new process).
        The model's train/eval mode is left as it is (call `model.eval()` to turn off dropout).

        cuda_graph: decode through one captured CUDA graph per token (`glassbrain.cuda_graph`)
        instead of ~90 eager launches. None (default) uses it on CUDA when nothing needs the
        eager path (eval mode or dropout 0, no probe) and at least 3 tokens are to be decoded.

        sparse: decode each token with `bdh.sparse_decode.sparse_decode_step`, which reads and
        writes only the active neurons' state rows and decoder rows (same result up to float32
        summation order). Needs eval mode (or dropout 0) and no probe; the prompt still runs
        through the dense chunked kernel.
        """
        idx = check_token_ids(idx, self.config.vocab_size)
        generator = check_generate_args(idx, self.encoder.device, max_new_tokens, temperature,
                                        top_k, generator, seed)
        if not isinstance(sparse, bool):
            raise ValueError(f"sparse: expected True or False, got {sparse!r}")
        if cuda_graph not in (None, True, False):
            raise ValueError(f"cuda_graph: expected None, True or False, got {cuda_graph!r}")
        if cuda_graph is None:
            cuda_graph = (self.encoder.is_cuda and not needs_eager(self)
                          and max_new_tokens >= 4)
        B, T0 = idx.shape
        if state is not None:
            self.check_state(state, B)
            state = state.clone()     # the decoder updates it in place; the caller's stays intact
        mode = "sparse" if sparse else ("graph" if cuda_graph else "eager")
        dec = BDHDecoder(self, B, mode, capture=cuda_graph if sparse else None,
                         prefill_chunk=prefill_chunk, state=state)
        if max_new_tokens == 0 and return_state and T0 > 1:
            dec.prefill(idx[:, :-1])
        out = sample_loop(idx, max_new_tokens, dec.prefill, dec.step, temperature, top_k,
                          generator)
        return (out, dec.state) if return_state else out
