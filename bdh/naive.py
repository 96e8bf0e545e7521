"""The official BDH forward, transcribed readably in plain PyTorch (float64): the oracle.

Written from the BDH layer's math (the `bdh.model` docstring) and the official pathwaycom/bdh
code's structure: dense scores with tril(-1), RoPE from float64 phases reduced mod 1, one set of
weights shared by every layer, no dropout. It imports nothing else of ours, so the tests that
compare `bdh.BDH` against it compare two independent implementations.

    sd = official_state_dict(n_layer=2, n_embd=32, n_head=2, mlp_internal_dim_multiplier=8,
                             vocab_size=256)               # official names and shapes
    logits = official_forward(sd, idx, n_layer=2)         # [B, T, vocab] float64
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def official_state_dict(n_layer, n_embd, n_head, mlp_internal_dim_multiplier, vocab_size,
                        std=0.05):
    """Random tensors with the official names and shapes (official freqs buffer included)."""
    D, nh = n_embd, n_head
    N = mlp_internal_dim_multiplier * D // nh
    i = torch.arange(N, dtype=torch.float32)
    freqs = 1.0 / (2.0 ** 16) ** (torch.floor(i / 2) * 2 / N) / (2 * math.pi)
    return {
        "decoder": torch.randn(nh * N, D) * std,
        "encoder": torch.randn(nh, D, N) * std,
        "attn.freqs": freqs.view(1, 1, 1, N),
        "embed.weight": torch.randn(vocab_size, D),
        "encoder_v": torch.randn(nh, D, N) * std,
        "lm_head": torch.randn(D, vocab_size) * std,
    }


def official_forward(sd, idx, n_layer, start=0, record=None):
    """The official forward in float64. Returns logits [B,T,vocab]. ``record``, if a list,
    receives per layer the float64 (xs, ys, xy) tensors [B,nh,T,N]."""
    f64 = {k: v.double() for k, v in sd.items()}
    enc, enc_v, dec = f64["encoder"], f64["encoder_v"], f64["decoder"]
    nh, D, N = enc.shape
    B, T = idx.shape
    ln = lambda z: F.layer_norm(z, (z.shape[-1],))
    # RoPE: pairs (x_{2i}, x_{2i+1}) -> (-x_{2i+1}, x_{2i}); freq_i = θ^{-2⌊i/2⌋/N}/2π.
    i = torch.arange(N, dtype=torch.float64)
    freq = (2.0 ** 16) ** (-(torch.div(i, 2, rounding_mode="floor") * 2) / N) / (2 * math.pi)
    t = torch.arange(start, start + T, dtype=torch.float64)[:, None]
    phase = torch.remainder(t * freq, 1.0) * 2 * math.pi                 # [T, N]
    cos, sin = torch.cos(phase), torch.sin(phase)

    def rope(v):
        rot = torch.stack((-v[..., 1::2], v[..., 0::2]), dim=-1).reshape(v.shape)
        return v * cos + rot * sin

    x = ln(f64["embed.weight"][idx].unsqueeze(1))                          # [B,1,T,D]
    for _ in range(n_layer):
        xs = torch.relu(x @ enc)                                           # [B,nh,T,N]
        qr = rope(xs)
        scores = (qr @ qr.transpose(-1, -2)).tril(diagonal=-1)
        a = scores @ x                                                     # [B,nh,T,D]
        ys = torch.relu(ln(a) @ enc_v)
        xy = xs * ys
        if record is not None:
            record.append((xs, ys, xy))
        y = xy.transpose(1, 2).reshape(B, 1, T, nh * N) @ dec
        x = ln(x + ln(y))
    return x.view(B, T, D) @ f64["lm_head"]
