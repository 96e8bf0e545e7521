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


def _positions_of(value) -> int | tuple:
    """``value`` as a position: an int >= 0, or a tuple of ints >= 0 (one per row). A sequence
    or 1-D integer tensor becomes a tuple; raises TypeError / ValueError otherwise."""
    if isinstance(value, torch.Tensor) and value.dim() == 1 \
            and not value.is_floating_point() and value.dtype != torch.bool:
        value = tuple(value.tolist())
    if isinstance(value, (list, tuple)):
        if not value or any(isinstance(p, bool) or not isinstance(p, int) or p < 0
                            for p in value):
            raise ValueError(f"BDHState.position: expected an int >= 0 or one int >= 0 per "
                             f"row, got {value!r}")
        return tuple(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"BDHState.position: expected an int >= 0 or one int >= 0 per row, "
                         f"got {value!r}")
    return value


def advance_position(position, n: int):
    """The position after ``n`` more tokens in every row (an int, or a tuple per row)."""
    if isinstance(position, tuple):
        return tuple(p + n for p in position)
    return position + n


@dataclasses.dataclass
class BDHState:
    """layers: one float32 tensor [B, n_head, N, n_embd] per layer (BDHAttention: a single one).
    position: how many tokens the state has consumed (the RoPE position of the next token): an
    int, or a tuple of B ints when the rows (streams decoded as one batch) are at different
    positions; a tuple whose rows agree is kept as that int.
    config: the shape fields of the module that made it (used to refuse a mismatching model)."""
    layers: list
    position: int | tuple = 0
    config: dict | None = None

    def __post_init__(self):
        self.position = _positions_of(self.position)
        self.layers = list(self.layers)
        for i, S in enumerate(self.layers):
            if not isinstance(S, torch.Tensor) or S.dim() != 4 or S.dtype != torch.float32:
                got = (f"{S.dtype} {list(S.shape)}" if isinstance(S, torch.Tensor)
                       else type(S).__name__)
                raise TypeError(f"BDHState.layers[{i}]: expected a float32 tensor "
                                f"[B, n_head, N, n_embd], got {got}")
        if isinstance(self.position, tuple):
            if self.layers and len(self.position) != self.batch_size:
                raise ValueError(f"BDHState.position: expected one position per row "
                                 f"(B = {self.batch_size}), got {len(self.position)}")
            if len(set(self.position)) == 1:
                self.position = self.position[0]

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

    @property
    def positions(self) -> tuple:
        """The position of each row, a tuple of B ints."""
        if isinstance(self.position, tuple):
            return self.position
        return (self.position,) * self.batch_size

    def nbytes(self) -> int:
        """Bytes held by the state tensors (independent of the context length)."""
        return sum(S.numel() * S.element_size() for S in self.layers)

    def _with(self, layers, position=None) -> "BDHState":
        return BDHState(layers, self.position if position is None else position,
                        None if self.config is None else dict(self.config))

    def clone(self) -> "BDHState":
        return self._with([S.clone() for S in self.layers])

    def detach(self) -> "BDHState":
        """Cut the autograd graph (truncated backpropagation through time)."""
        return self._with([S.detach() for S in self.layers])

    def to(self, device) -> "BDHState":
        return self._with([S.to(device) for S in self.layers])

    def rows(self, index) -> "BDHState":
        """The state of some rows (streams): ``index`` an int, a slice, a sequence of ints or a
        1-D integer tensor. The layers are new tensors (copies), each row keeps its position."""
        B = self.batch_size
        if isinstance(index, torch.Tensor):
            index = index.cpu()
        picked = torch.arange(B)[index].reshape(-1)
        if picked.numel() == 0:
            raise ValueError(f"index: expected at least one row of {B}, got {index!r}")
        at = picked.to(self.device)
        pos = self.positions
        return self._with([S.index_select(0, at) for S in self.layers],
                          tuple(pos[i] for i in picked.tolist()))

    @classmethod
    def cat(cls, states) -> "BDHState":
        """One state whose rows are the rows of ``states`` in order (e.g. streams at different
        positions gathered into one batch for decoding); they must come from one configuration
        and device, with the same layer shapes but the batch."""
        states = list(states)
        if not states or not all(isinstance(s, BDHState) for s in states):
            raise TypeError(f"states: expected a non-empty sequence of BDHState, got "
                            f"{[type(s).__name__ for s in states]}")
        first = states[0]
        for i, s in enumerate(states[1:], 1):
            if s.config != first.config or len(s.layers) != len(first.layers) \
                    or any(a.shape[1:] != b.shape[1:] for a, b in zip(s.layers, first.layers)):
                raise ValueError(f"states[{i}]: made by another configuration or layer shape "
                                 f"than states[0] (config {s.config} against {first.config})")
            if s.layers and s.device != first.device:
                raise ValueError(f"states[{i}]: on {s.device}, states[0] on {first.device} "
                                 f"(move them with state.to(device))")
        layers = [torch.cat(group) for group in zip(*(s.layers for s in states))]
        return first._with(layers, tuple(p for s in states for p in s.positions))

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
    position = state.position
    payload = {
        "format": STATE_FORMAT,
        "version": STATE_VERSION,
        "config": None if state.config is None else dict(state.config),
        # an int, or a list of ints (rows at different positions; an int-only reader of this
        # version refuses such a file with a clear error)
        "position": list(position) if isinstance(position, tuple) else int(position),
        "layers": [S.detach().cpu() for S in state.layers],
    }
    save_checked(payload, os.fspath(path))


def _version_error(path, version) -> ValueError:
    return ValueError(f"{path}: BDH state format version {version!r} is not supported (this "
                      f"code reads version {STATE_VERSION}; version 1 files, written before "
                      f"states carried a checksum, cannot be verified): rebuild the state by "
                      f"feeding the text again, then save it with save_state")


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {list(value.shape)}"
    return f"{type(value).__name__} {value!r}"[:120]


def _state_from_payload(path, payload: dict) -> BDHState:
    """The BDHState of a loaded payload whose checksum passed; a file can be intact and still
    not be a state this code can use (another writer, a damaged writer), so its structure is
    checked here, each problem raised as a ValueError naming the file and the field."""
    def bad(field, expected, value):
        return ValueError(f"{path}: not a usable BDH state: {field} should be {expected}, "
                          f"got {_describe(value)}")
    missing = [k for k in ("config", "position", "layers") if k not in payload]
    if missing:
        raise ValueError(f"{path}: not a usable BDH state: missing {', '.join(missing)}")
    config, position, layers = payload["config"], payload["position"], payload["layers"]
    if config is not None and not (isinstance(config, dict) and all(
            isinstance(k, str) and (v is None or isinstance(v, (str, int, float, bool)))
            for k, v in config.items())):
        raise bad("config", "None or a dict of named shape fields", config)
    if not isinstance(layers, list) or not layers:
        raise bad("layers", "a non-empty list of float32 tensors [B, n_head, N, n_embd]", layers)
    for i, S in enumerate(layers):
        if not isinstance(S, torch.Tensor) or S.dtype != torch.float32 or S.dim() != 4 \
                or S.layout != torch.strided:
            raise bad(f"layers[{i}]", "a float32 tensor [B, n_head, N, n_embd]", S)
        if S.shape != layers[0].shape:
            raise bad(f"layers[{i}]", f"of layers[0]'s shape {list(layers[0].shape)}", S)
    try:
        return BDHState(layers=layers, position=position, config=config)
    except (TypeError, ValueError) as exc:
        raise bad("position", f"an int >= 0 or a list of {layers[0].shape[0]} ints >= 0 (one "
                  f"per row)", position) from exc


def load_state(path, map_location=None, model=None) -> BDHState:
    """Read a state written by `save_state`. ``map_location`` is as for `torch.load`. If
    ``model`` (a BDH, or a BDHAttention) is given, the state is checked against it now;
    otherwise the model checks it when the state is used. A missing file raises
    FileNotFoundError; a truncated or damaged one (checksum mismatch) CorruptFileError (a
    ValueError); an intact file that cannot be loaded here (a device this machine lacks, a
    bad ``map_location``) UnloadableFileError; an intact file of the wrong structure a
    ValueError naming the field. Each names the path and the fix."""
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
    state = _state_from_payload(path, payload)
    if model is not None:
        model.check_state(state)
    return state
