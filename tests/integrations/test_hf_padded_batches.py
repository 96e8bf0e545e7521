"""Padded and batched generation through the transformers drop-ins: a left-padded batch of
prompts of different lengths gives, row by row, exactly what each prompt gives alone (greedy
tokens identical, logits within float32 rounding), for GPT-2 and Llama, "hebbian" and "bsbr"
(exact and bounded bank, past the bounded bank's capacity so that it merges and archives);
right padding in a forward, with and without the recurrent cache; eight prompts of mixed
lengths in one generate call."""
import pytest
import torch
from helpers import assert_rel_close
from test_hf_dropin import V, tiny

from glassbrain.hf import RecurrentCache, use_recurrent_cache

KINDS = [("hebbian", None), ("bsbr", None), ("bsbr", [2, 2])]


def drop_in(arch: str, kind: str, bank, decode: str = "auto"):
    model = tiny(arch)
    model.config.bsbr_chunk_size = 2
    model.config.bsbr_top_k = 2
    model.config.bsbr_bank = bank
    model.set_attn_implementation(kind)
    use_recurrent_cache(model, decode)
    return model


def padded(prompts, side: str = "left"):
    """The prompts in one batch, padded with 0 on ``side``; (ids, attention mask)."""
    T = max(p.shape[1] for p in prompts)
    ids = torch.zeros(len(prompts), T, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        cols = slice(T - p.shape[1], T) if side == "left" else slice(0, p.shape[1])
        ids[i, cols], mask[i, cols] = p[0], 1
    return ids, mask


def greedy(model, ids, mask=None, n=8):
    return model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                          do_sample=False,
                          return_dict_in_generate=True, output_logits=True)


def assert_rows_as_alone(model, prompts, batch, n):
    T = batch.sequences.shape[1] - n
    for i, p in enumerate(prompts):
        alone = greedy(model, p, n=n)
        assert torch.equal(batch.sequences[i, T:], alone.sequences[0, p.shape[1]:]), i
        for step, (a, b) in enumerate(zip(batch.logits, alone.logits)):
            assert_rel_close(a[i], b[0], 1e-5, name=f"row {i} step {step}")


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("kind,bank", KINDS)
def test_left_padded_generate_equals_each_prompt_alone(arch, kind, bank):
    """Prompts of 9, 3 and 6 tokens at chunk 2, then 8 tokens: rows complete their chunks at
    different steps, and the bounded bank (2 + 2 slots) merges and archives in every row."""
    model = drop_in(arch, kind, bank)
    prompts = [torch.randint(1, V, (1, n)) for n in (9, 3, 6)]
    ids, mask = padded(prompts)
    batch = greedy(model, ids, mask)
    assert_rows_as_alone(model, prompts, batch, 8)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("kind,bank", KINDS)
def test_right_padded_forward_equals_each_row_alone(arch, kind, bank):
    """A right-padded batch in one forward: the real positions' logits are each row's own,
    without a cache and with a recurrent cache, whose per-row states then continue each row
    exactly (one token per row at its own position)."""
    model = drop_in(arch, kind, bank)
    prompts = [torch.randint(1, V, (1, n)) for n in (7, 2, 5)]
    ids, mask = padded(prompts, "right")
    nxt = torch.randint(1, V, (3, 1))
    with torch.no_grad():
        plain = model(ids, attention_mask=mask, use_cache=False).logits
        cache = RecurrentCache(model.config)
        cached = model(ids, attention_mask=mask, cache=cache, use_cache=True).logits
        lengths = mask.sum(1, keepdim=True)
        step = model(nxt, attention_mask=torch.cat([mask, torch.ones_like(nxt)], 1),
                     position_ids=lengths, cache=cache, use_cache=True).logits
        for i, p in enumerate(prompts):
            n = p.shape[1]
            own = RecurrentCache(model.config)
            alone = model(p, cache=own, use_cache=True).logits
            alone_step = model(nxt[i:i + 1], cache=own, use_cache=True).logits
            assert_rel_close(plain[i, :n], alone[0], 1e-5, name=f"row {i}, no cache")
            assert_rel_close(cached[i, :n], alone[0], 1e-5, name=f"row {i}, cache")
            assert_rel_close(step[i, 0], alone_step[0, 0], 1e-5, name=f"row {i}, next token")


@pytest.mark.parametrize("kind,bank", [("hebbian", None), ("bsbr", [2, 2])])
def test_eight_prompts_of_mixed_lengths_in_one_generate(kind, bank):
    model = drop_in("llama", kind, bank)
    prompts = [torch.randint(1, V, (1, n)) for n in (1, 12, 4, 7, 2, 9, 5, 11)]
    ids, mask = padded(prompts)
    batch = greedy(model, ids, mask, n=5)
    assert batch.sequences.shape == (8, 12 + 5)
    assert_rows_as_alone(model, prompts, batch, 5)


@pytest.mark.parametrize("kind", ["hebbian", "bsbr"])
def test_a_padded_kv_cache_replay_equals_the_recurrent_cache(kind):
    """Without use_recurrent_cache (an ordinary KV cache, history replayed every step) a padded
    batch gives the same tokens: the mask reaches the history's keys too (the exact bank: the
    replay keeps no bounded bank)."""
    model = drop_in("gpt2", kind, None)
    prompts = [torch.randint(1, V, (1, n)) for n in (6, 2)]
    ids, mask = padded(prompts)
    ref = greedy(model, ids, mask, n=5).sequences
    plain = tiny("gpt2")
    plain.load_state_dict(model.state_dict())
    plain.config.bsbr_chunk_size, plain.config.bsbr_top_k = 2, 2
    plain.set_attn_implementation(kind)
    assert torch.equal(greedy(plain, ids, mask, n=5).sequences, ref)
