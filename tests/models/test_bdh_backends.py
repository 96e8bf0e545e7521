"""BDH gives the same function whichever attention backend or memory option computes it."""
import pytest
import torch

from bdh import BDH, BDHConfig
from helpers import assert_rel_close

SMALL = dict(n_layer=2, n_embd=32, n_head=2, mlp_internal_dim_multiplier=8, dropout=0.0)


def _loss_and_grads(cfg, idx, tgt, seed=0):
    torch.manual_seed(seed)
    model = BDH(cfg).train()
    _, loss = model(idx, tgt)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("variant", [dict(backend="dense"), dict(recompute_attention=True),
                                     dict(backend="dense", recompute_attention=True),
                                     dict(backend="triton", chunk_size=16)],
                         ids=["dense", "recompute", "dense+recompute", "triton"])
def test_variants_match_chunked_torch(variant):
    idx = torch.randint(0, 256, (2, 40))
    tgt = torch.randint(0, 256, (2, 40))
    ref_loss, ref_grads = _loss_and_grads(BDHConfig(**SMALL, backend="torch"), idx, tgt)
    loss, grads = _loss_and_grads(BDHConfig(**{**SMALL, "backend": "torch", **variant}), idx, tgt)
    assert_rel_close(loss, ref_loss, 1e-5, "loss")
    for name, g in ref_grads.items():
        assert_rel_close(grads[name], g, 1e-4, f"grad {name}")


def test_dense_streaming_pieces_equal_one_call():
    torch.manual_seed(1)
    model = BDH(BDHConfig(**SMALL, backend="dense")).eval()
    idx = torch.randint(0, 256, (1, 30))
    with torch.no_grad():
        full, _ = model(idx)
        a, st = model(idx[:, :11], return_state=True)
        b, st = model(idx[:, 11:], state=st, return_state=True)
    assert_rel_close(torch.cat([a, b], 1), full, 1e-5, "streamed logits")


def test_config_rejects_bad_memory_options():
    with pytest.raises(TypeError, match="recompute_attention"):
        BDHConfig(recompute_attention=1)
    with pytest.raises(ValueError, match="dense_max_tokens"):
        BDHConfig(dense_max_tokens=-1)


@pytest.mark.parametrize("p", [0.2, 0.7])
def test_dropout_keeps_1_minus_p_and_rescales(monkeypatch, p):
    """The explicit keep mask keeps a fraction 1 − p (within 5 sigma) and rescales by 1/(1 − p),
    as nn.Dropout does; p ≠ 0.5 catches a mask drawn with p and 1 − p swapped."""
    import bdh.model as bdh_model
    seen = []
    real = bdh_model.gated_decode

    def spy(xs, ys, keep, scale, dec):
        seen.append((keep, scale))
        return real(xs, ys, keep, scale, dec)

    monkeypatch.setattr(bdh_model, "gated_decode", spy)
    model = BDH(BDHConfig(**{**SMALL, "dropout": p})).train()
    model(torch.randint(0, 256, (2, 40)), torch.randint(0, 256, (2, 40)))
    keep = torch.cat([k.flatten() for k, _ in seen]).double()
    n = keep.numel()
    assert abs(keep.mean().item() - (1 - p)) < 5 * (p * (1 - p) / n) ** 0.5
    assert all(abs(s - 1 / (1 - p)) < 1e-12 for _, s in seen)
