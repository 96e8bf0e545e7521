"""Sparsity probes: how many BDH neurons fire, per layer, and what chosen neurons do over time.

    probe = SparsityProbe(model, keep={"xy": [3, 17, 4100]})
    with probe, torch.no_grad():
        model(idx)                         # any number of calls (forward, streaming, generate)
    probe.densities()                      # [{"xs": 0.49, "ys": 0.12, "xy": 0.06}, ...] per layer
    probe.activations[(0, "xy")]           # [B, T, 3] raw activations of the kept neurons, layer 0

Densities are the fraction of entries > 0 of xs = relu(x @ encoder), ys = relu(LN(a) @
encoder_v) and xy = xs * ys (before dropout), over batch, heads, tokens and neurons, summed
over every call made while the probe is attached. Neuron indices address the flattened nh·N
axis (index h·N + n is neuron n of head h, the order of the decoder's rows). Kept activations
are copied to ``device`` (CPU by default) as float32; successive calls append along T.

The model hands the tensors to the probe from inside its layers (`model._probe`), so probing
re-runs nothing and does not change the outputs. Gradient checkpointing is skipped while a probe
is attached, so recomputation cannot record a layer twice.
"""
from __future__ import annotations

import torch

KINDS = ("xs", "ys", "xy")


class SparsityProbe:
    def __init__(self, model, keep: dict | None = None, device="cpu"):
        if not hasattr(model, "_probe") or not hasattr(model, "config"):
            raise TypeError(f"model: expected a bdh.BDH, got {type(model).__name__}")
        self.model = model
        self.device = torch.device(device)
        C = model.config
        total = C.n_head * C.N
        self.keep = {}
        for kind, neurons in (keep or {}).items():
            if kind not in KINDS:
                raise ValueError(f"keep: keys must be among {KINDS}, got {kind!r}")
            ids = torch.as_tensor(neurons, dtype=torch.long).flatten()
            if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= total):
                raise ValueError(f"keep[{kind!r}]: neuron indices must lie in [0, n_head·N = "
                                 f"{total}), got values in [{int(ids.min())}, {int(ids.max())}]")
            self.keep[kind] = ids
        self.reset()

    def reset(self) -> None:
        """Forget everything recorded so far."""
        n = self.model.config.n_layer
        self._positive = [dict.fromkeys(KINDS, 0) for _ in range(n)]   # tensors on the device
        self._total = [dict.fromkeys(KINDS, 0) for _ in range(n)]
        self.activations: dict[tuple[int, str], torch.Tensor] = {}

    def __enter__(self) -> "SparsityProbe":
        if self.model._probe is not None:
            raise RuntimeError("SparsityProbe: this model already has a probe attached")
        self.model._probe = self
        return self

    def __exit__(self, *exc) -> None:
        self.model._probe = None

    @torch.no_grad()
    def _record(self, layer: int, xs, ys, xy) -> None:
        N = xs.shape[-1]
        for kind, t in (("xs", xs), ("ys", ys), ("xy", xy)):
            # Counts stay on the device (no sync per layer); densities() reads them once.
            self._positive[layer][kind] = self._positive[layer][kind] + (t > 0).sum()
            self._total[layer][kind] += t.numel()
            ids = self.keep.get(kind)
            if ids is None:
                continue
            ids = ids.to(t.device)
            # t [B,nh,T,N]; t[:, h, :, n] with index tensors → [n_chosen, B, T]
            picked = t[:, ids // N, :, ids % N].permute(1, 2, 0)
            picked = picked.detach().to(self.device, torch.float32)
            key = (layer, kind)
            prev = self.activations.get(key)
            self.activations[key] = picked if prev is None else torch.cat([prev, picked], dim=1)

    def densities(self) -> list[dict]:
        """Per layer {"xs", "ys", "xy"}: fraction of entries > 0 (NaN for a layer never run)."""
        out = []
        for pos, tot in zip(self._positive, self._total):
            out.append({k: (float(pos[k]) / tot[k]) if tot[k] else float("nan") for k in KINDS})
        return out
