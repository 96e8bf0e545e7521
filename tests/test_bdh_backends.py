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
                                     dict(backend="dense", recompute_attention=True)],
                         ids=["dense", "recompute", "dense+recompute"])
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
