"""Assertions shared by the tests (import as `from helpers import ...`)."""
import torch


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64 (the ratio is inf for a nonzero out against a zero ref)."""
    out64 = out.detach().to("cpu", torch.float64)
    ref64 = ref.detach().to("cpu", torch.float64)
    if out64.shape != ref64.shape:
        raise AssertionError(f"shape {tuple(out64.shape)} != reference {tuple(ref64.shape)}")
    num = (out64 - ref64).norm().item()
    den = ref64.norm().item()
    return num / den if den > 0 else (0.0 if num == 0 else float("inf"))


def assert_rel_close(out: torch.Tensor, ref: torch.Tensor, tol: float, name: str = "output"):
    """Fail if any element is NaN/inf or if ‖out − ref‖/‖ref‖ (float64) exceeds ``tol``."""
    out_d = out.detach()
    if not torch.isfinite(out_d).all():
        bad = (~torch.isfinite(out_d)).sum().item()
        raise AssertionError(f"{name}: {bad} non-finite elements (of {out_d.numel()})")
    if not torch.isfinite(ref.detach()).all():
        raise AssertionError(f"{name}: the reference has non-finite elements")
    err = rel_err(out, ref)
    assert err <= tol, f"{name}: relative error {err:.3e} > tolerance {tol:.1e}"
    return err


def run_pieces(stream, x: torch.Tensor, cuts, state=None):
    """Feed x[:, a:b] for consecutive cuts [0, ..., T] through ``stream`` (any module or model
    on the streaming protocol), carrying the state: (the outputs joined along time, the final
    state). Equal to one call of the whole sequence, by the protocol."""
    outs = []
    for a, b in zip(cuts[:-1], cuts[1:]):
        y, state = stream(x[:, a:b], state=state, return_state=True)
        outs.append(y)
    return torch.cat(outs, 1), state
