"""A small BSBR language model on the model protocol (byte vocabulary).

    x = embed(idx)                                    [B,T,D]   no position embedding
    repeat n_layer times (own weights per layer):
      x = x + BSBRAttention(LN(x))                    causal; streams through a BSBRState
      x = x + MLP(LN(x))                              Linear(D, r·D) → GELU → Linear(r·D, D)
    logits = LN(x) @ lm_head

    logits, loss  = model(idx, targets)
    logits, state = model(idx, state=state, return_state=True)
    out           = model.generate(idx, max_new_tokens, temperature=1.0, top_k=None)

`generate` consumes the prompt once (in pieces) into the state, then decodes one token at a time
from it (local attention over the partial chunk + a routed readout of the bank per layer); the
prefix is never re-run.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from glassbrain.checks import check_int, check_token_ids, next_token_loss
from glassbrain.generation import check_generate_args
from glassbrain.sampling import generate_from_state

from .attention import BSBRAttention
from .config import BSBRLMConfig
from .state import BSBRLMState

PREFILL_CHUNK = 4096   # generate() consumes a long prompt in pieces of this many tokens


class BSBRBlock(nn.Module):
    def __init__(self, cfg: BSBRLMConfig):
        super().__init__()
        D = cfg.d_model
        self.ln_1 = nn.LayerNorm(D)
        self.attn = BSBRAttention(D, cfg.n_head, cfg.chunk_size, top_k=cfg.top_k, bank=cfg.bank,
                                  meta_dim=cfg.meta_dim, backend=cfg.backend,
                                  long_scale=cfg.long_scale)
        self.ln_2 = nn.LayerNorm(D)
        self.mlp = nn.Sequential(nn.Linear(D, cfg.mlp_ratio * D), nn.GELU(),
                                 nn.Linear(cfg.mlp_ratio * D, D))
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, state=None, return_state=False):
        a = self.attn(self.ln_1(x), state=state, return_state=return_state)
        a, state = a if return_state else (a, None)
        x = x + self.drop(a)
        x = x + self.drop(self.mlp(self.ln_2(x)))
        return x, state


class BSBRLM(nn.Module):
    """Byte-level BSBR language model. See the module docstring."""

    def __init__(self, config: BSBRLMConfig | None = None):
        super().__init__()
        if config is None:
            config = BSBRLMConfig()
        if not isinstance(config, BSBRLMConfig):
            raise TypeError(f"config: expected a BSBRLMConfig, got {type(config).__name__}")
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(BSBRBlock(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.d_model)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():      # GPT-2's scaled init of residual outputs
            if name.endswith("attn.W_o.weight") or name.endswith("mlp.2.weight"):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(mod):
        if isinstance(mod, nn.Linear):
            nn.init.normal_(mod.weight, std=0.02)
            if mod.bias is not None:
                nn.init.zeros_(mod.bias)
        elif isinstance(mod, nn.Embedding):
            nn.init.normal_(mod.weight, std=0.02)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ----------------------------------------------------------------- state

    def state_config(self) -> dict:
        return {"model": "BSBRLM", "n_layer": self.config.n_layer,
                "layer": self.blocks[0].attn.state_config()}

    def init_state(self, batch_size: int, device=None) -> BSBRLMState:
        return BSBRLMState([b.attn.init_state(batch_size, device=device) for b in self.blocks],
                           0, self.state_config())

    def check_state(self, state, batch_size: int | None = None) -> None:
        if not isinstance(state, BSBRLMState):
            raise TypeError(f"state: expected a BSBRLMState or None, got {type(state).__name__}")
        if state.config is not None and dict(state.config) != self.state_config():
            raise ValueError(f"state: made by a different configuration ({state.config}) than "
                             f"this BSBRLM ({self.state_config()})")
        if len(state.layers) != self.config.n_layer:
            raise ValueError(f"state: expected {self.config.n_layer} layer states, "
                             f"got {len(state.layers)}")
        for blk, s in zip(self.blocks, state.layers):
            blk.attn.check_state(s, batch_size)

    # ----------------------------------------------------------------- forward

    def _run(self, idx, states, want_state: bool):
        x = self.drop(self.embed(idx))
        new_states = []
        for i, blk in enumerate(self.blocks):
            x, s = blk(x, None if states is None else states[i], want_state)
            new_states.append(s)
        return self.lm_head(self.ln_f(x)), (new_states if want_state else None)

    def forward(self, idx, targets=None, *, state: BSBRLMState | None = None,
                return_state: bool = False):
        """idx [B,T] token ids. `logits, loss = model(idx, targets=None)` (loss None without
        targets); with `state=` the sequence continues from that state; `return_state=True`
        returns `(logits, state)`, or `(logits, loss, state)` with targets. The state passed in
        is not modified."""
        idx = check_token_ids(idx, self.config.vocab_size)
        B, T = idx.shape
        position = 0
        if state is not None:
            self.check_state(state, B)
            position = state.position
        logits, new_states = self._run(idx, None if state is None else state.layers,
                                       return_state)
        loss = None if targets is None else next_token_loss(logits, targets)
        if not return_state:
            return logits, loss
        new_state = BSBRLMState(new_states, position + T, self.state_config())
        return (logits, new_state) if targets is None else (logits, loss, new_state)

    # ----------------------------------------------------------------- generation

    @torch.no_grad()
    def generate(self, idx, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, generator: torch.Generator | None = None, *,
                 seed: int | None = None, state: BSBRLMState | None = None,
                 return_state: bool = False, prefill_chunk: int = PREFILL_CHUNK):
        """idx followed by ``max_new_tokens`` sampled tokens, [B, T0 + max_new_tokens].

        The prompt goes through the model once (in pieces of ``prefill_chunk`` tokens) into the
        state; then every new token is one decode step from the state. top_k=1 is greedy;
        ``generator`` (or ``seed``) makes sampling reproducible. With `state=`, idx holds the
        tokens that follow the state. With `return_state=True` it returns `(tokens, state)`,
        the state having consumed every returned token but the last, so
        `model.generate(tokens[:, -1:], n, state=state)` continues the sequence."""
        idx = check_token_ids(idx, self.config.vocab_size)
        generator = check_generate_args(idx, self.embed.weight.device, max_new_tokens,
                                        temperature, top_k, generator, seed)
        check_int("prefill_chunk", prefill_chunk, 1)
        if state is None:
            state = self.init_state(idx.shape[0])
        else:
            self.check_state(state, idx.shape[0])
        return generate_from_state(self, idx, max_new_tokens, temperature, top_k, generator,
                                   state=state, return_state=return_state,
                                   prefill_chunk=prefill_chunk)
