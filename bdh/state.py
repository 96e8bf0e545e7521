"""The BDH streaming state, and saving / loading it ("memory across restarts").

A BDH model's whole memory of the past is one Hebbian state S ∈ R^{N×D} per head and layer
(float32), plus the position of the next token (RoPE continues from it). Its size does not
depend on how many tokens it has seen: at the default config it is 6 × 32 MiB per sequence.
"""
from __future__ import annotations

import dataclasses
import os

import torch

from glassbrain.atomic_file import UncheckedFileError, load_checked, save_checked

STATE_FORMAT = "glassbrain.bdh_state"
# 2: the payload is wrapped by glassbrain.atomic_file.save_checked (with a sha256); 1 was a bare
# torch.save of the same dict.
STATE_VERSION = 2


@dataclasses.dataclass
class BDHState:
    """layers: one float32 tensor [B, n_head, N, n_embd] per layer (BDHAttention: a single one).
    position: how many tokens the state has consumed (the RoPE position of the next token).
    config: the shape fields of the module that made it (used to refuse a mismatching model)."""
    layers: list
    position: int = 0
    config: dict | None = None

    def __post_init__(self):
        if isinstance(self.position, bool) or not isinstance(self.position, int) \
                or self.position < 0:
            raise ValueError(f"BDHState.position: expected an int >= 0, got {self.position!r}")
        self.layers = list(self.layers)
        for i, S in enumerate(self.layers):
            if not isinstance(S, torch.Tensor) or S.dim() != 4 or S.dtype != torch.float32:
                got = (f"{S.dtype} {list(S.shape)}" if isinstance(S, torch.Tensor)
                       else type(S).__name__)
                raise TypeError(f"BDHState.layers[{i}]: expected a float32 tensor "
                                f"[B, n_head, N, n_embd], got {got}")

    @classmethod
    def zeros(cls, n_layer: int, batch_size: int, n_head: int, N: int, D: int, *, device=None,
              config: dict | None = None) -> "BDHState":
        layers = [torch.zeros(batch_size, n_head, N, D, dtype=torch.float32, device=device)
                  for _ in range(n_layer)]
        return cls(layers=layers, position=0, config=None if config is None else dict(config))

    @property
    def batch_size(self) -> int:
        return self.layers[0].shape[0]

    @property
    def device(self) -> torch.device:
        return self.layers[0].device

    def nbytes(self) -> int:
        """Bytes held by the state tensors (independent of the context length)."""
        return sum(S.numel() * S.element_size() for S in self.layers)

    def clone(self) -> "BDHState":
        return BDHState([S.clone() for S in self.layers], self.position,
                        None if self.config is None else dict(self.config))

    def detach(self) -> "BDHState":
        """Cut the autograd graph (truncated backpropagation through time)."""
        return BDHState([S.detach() for S in self.layers], self.position,
                        None if self.config is None else dict(self.config))

    def to(self, device) -> "BDHState":
        return BDHState([S.to(device) for S in self.layers], self.position,
                        None if self.config is None else dict(self.config))

    def check(self, expected_config: dict, n_layer: int, shape: tuple, device,
              owner: str = "model") -> None:
        """Raise a clear error unless this state fits a module with ``expected_config``,
        ``n_layer`` layers of per-layer ``shape`` [B, nh, N, D] (B None: any batch) on
        ``device`` (None: any device)."""
        if self.config is not None and dict(self.config) != dict(expected_config):
            diff = {k: (self.config.get(k), expected_config.get(k))
                    for k in sorted(set(self.config) | set(expected_config))
                    if self.config.get(k) != expected_config.get(k)}
            listing = ", ".join(f"{k}: state has {a!r}, {owner} has {b!r}"
                                for k, (a, b) in diff.items())
            raise ValueError(f"state: made by a different configuration than this {owner} "
                             f"({listing})")
        if len(self.layers) != n_layer:
            raise ValueError(f"state: expected {n_layer} layer states, got {len(self.layers)}")
        for i, S in enumerate(self.layers):
            fits = (tuple(S.shape[1:]) == tuple(shape[1:])
                    and (shape[0] is None or S.shape[0] == shape[0]))
            if not fits:
                want = ["B" if n is None else n for n in shape]
                raise ValueError(f"state.layers[{i}]: expected shape [B,nh,N,D] = "
                                 f"{want}, got {list(S.shape)}")
            if device is not None and S.device != torch.device(device):
                raise ValueError(f"state.layers[{i}]: expected device {device}, got {S.device} "
                                 f"(move it with state.to(device))")


def save_state(state: BDHState, path) -> None:
    """Write ``state`` to ``path`` atomically (`glassbrain.atomic_file.save_checked`: a temporary
    file in the same folder, fsync'ed and renamed over ``path``), so a crash never leaves a
    half-written state behind, with a sha256 of the contents that `load_state` verifies.
    Records a format version and the model's shape config."""
    if not isinstance(state, BDHState):
        raise TypeError(f"state: expected a BDHState, got {type(state).__name__}")
    payload = {
        "format": STATE_FORMAT,
        "version": STATE_VERSION,
        "config": None if state.config is None else dict(state.config),
        "position": int(state.position),
        "layers": [S.detach().cpu() for S in state.layers],
    }
    save_checked(payload, os.fspath(path))


def _version_error(path, version) -> ValueError:
    return ValueError(f"{path}: BDH state format version {version!r} is not supported (this "
                      f"code reads version {STATE_VERSION}; version 1 files, written before "
                      f"states carried a checksum, cannot be verified): rebuild the state by "
                      f"feeding the text again, then save it with save_state")


def load_state(path, map_location=None, model=None) -> BDHState:
    """Read a state written by `save_state`. ``map_location`` is as for `torch.load`. If
    ``model`` (a BDH, or a BDHAttention) is given, the state is checked against it now;
    otherwise the model checks it when the state is used. A missing file raises
    FileNotFoundError; a truncated or damaged one (checksum mismatch) CorruptFileError (a
    ValueError); both name the path and the fix."""
    path = os.fspath(path)
    fix = "rebuild the state by feeding the text again and save it with save_state"
    try:
        payload = load_checked(path, "BDH state", map_location=map_location, fix=fix)
    except UncheckedFileError as exc:
        old = exc.content
        if isinstance(old, dict) and old.get("format") == STATE_FORMAT:
            raise _version_error(path, old.get("version")) from None
        raise ValueError(f"{path}: not a BDH state file (expected format {STATE_FORMAT!r})") \
            from None
    if not isinstance(payload, dict) or payload.get("format") != STATE_FORMAT:
        raise ValueError(f"{path}: not a BDH state file (expected format {STATE_FORMAT!r})")
    if payload.get("version") != STATE_VERSION:
        raise _version_error(path, payload.get("version"))
    state = BDHState(layers=payload["layers"], position=payload["position"],
                     config=payload["config"])
    if model is not None:
        model.check_state(state)
    return state
