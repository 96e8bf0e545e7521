"""The decode step generate runs through `RecurrentDecoder` (use_recurrent_cache's default):
on the CPU its slot step runs eagerly on the slot's buffers, the code a CUDA graph captures.
It equals plain eager decoding; a new prompt length reuses the slot (nothing to capture again);
a cache is bound to the slot's state tensors, whose addresses never change while decoding, and
a cache bound before keeps its own values; the step reads nothing back to the host."""
import pytest
import torch
from helpers import assert_rel_close
from test_hf_padded_batches import V, drop_in, greedy, padded

from glassbrain.hf import RecurrentCache, RecurrentDecoder, state_tensors, use_recurrent_cache

KINDS = [("hebbian", None), ("bsbr", [2, 2])]


def cache_of(out):
    return out.cache


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("kind,bank", KINDS)
def test_slot_decoding_equals_eager_decoding(arch, kind, bank):
    model = drop_in(arch, kind, bank, decode="eager")
    prompts = [torch.randint(1, V, (1, n)) for n in (7, 3, 5)]
    ids, mask = padded(prompts)
    eager = greedy(model, ids, mask)
    decoder = use_recurrent_cache(model, "graph")
    slotted = greedy(model, ids, mask)
    assert len(decoder._slots) == 1 and decoder.captures == 0        # no CUDA here
    assert torch.equal(slotted.sequences, eager.sequences)
    for step, (a, b) in enumerate(zip(slotted.logits, eager.logits)):
        assert_rel_close(a, b, 1e-6, name=f"step {step}")


@pytest.mark.parametrize("kind,bank", KINDS)
def test_a_new_prompt_length_reuses_the_slot_and_a_new_batch_size_adds_one(kind, bank):
    model = drop_in("gpt2", kind, bank, decode="graph")
    decoder = model._recurrent_decoder
    for n in (4, 9, 13):
        greedy(model, torch.randint(1, V, (2, n)), n=3)
        assert len(decoder._slots) == 1
    greedy(model, torch.randint(1, V, (3, 5)), n=3)
    assert len(decoder._slots) == 2


@pytest.mark.parametrize("kind,bank", KINDS)
def test_decoding_keeps_the_slot_tensors_and_an_earlier_cache_keeps_its_values(kind, bank):
    """Every decode step updates the slot's tensors in place (the addresses a graph replays);
    when a second generate binds its cache to the slot, the first cache gets private copies of
    exactly the values it held."""
    model = drop_in("llama", kind, bank, decode="graph")
    first = greedy(model, torch.randint(1, V, (2, 6)), n=6)
    slot = next(iter(model._recurrent_decoder._slots.values()))
    viewed = [[t.data_ptr() for t in state_tensors(s)] for s in slot.states]
    held = [[t.data_ptr() for t in state_tensors(layer.state)] for layer in first.cache.layers]
    assert held == viewed
    values = [[t.clone() for t in state_tensors(layer.state)] for layer in first.cache.layers]
    greedy(model, torch.randint(1, V, (2, 9)), n=4)
    assert [[t.data_ptr() for t in state_tensors(s)] for s in slot.states] == viewed
    for layer, before in zip(first.cache.layers, values):
        now = state_tensors(layer.state)
        assert all(t.data_ptr() not in sum(viewed, []) for t in now)
        assert all(torch.equal(a, b) for a, b in zip(now, before))


@pytest.mark.parametrize("kind,bank", KINDS)
def test_the_decode_step_reads_nothing_back_to_the_host(kind, bank, monkeypatch):
    """After the prompt, a decode step through the decoder (model, cache, attention, kernels'
    PyTorch forms) with every device-to-host read patched to raise."""
    model = drop_in("llama", kind, bank, decode="graph")
    ids, mask = padded([torch.randint(1, V, (1, n)) for n in (5, 2)])
    cache = RecurrentCache(model.config)
    with torch.no_grad():
        out = model(ids, attention_mask=mask, cache=cache, use_cache=True)
    nxt = out.logits[:, -1:].argmax(-1)
    positions = mask.sum(1, keepdim=True)

    def refuse(*_, **__):
        raise AssertionError("a host read in the decode step")

    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    with torch.no_grad():
        for _ in range(4):          # crosses a chunk completion (chunk 2) in every row
            step = model._recurrent_decoder(input_ids=nxt, position_ids=positions, cache=cache,
                                            use_cache=True, return_dict=True)
            nxt, positions = step.logits[:, -1:].argmax(-1), positions + 1
    monkeypatch.undo()
    assert torch.isfinite(step.logits).all()


def test_inputs_the_slot_cannot_serve_run_eagerly():
    model = drop_in("gpt2", "bsbr", None, decode="graph")          # the exact bank grows
    out = greedy(model, torch.randint(1, V, (2, 5)), n=3)
    assert out.sequences.shape == (2, 8) and not model._recurrent_decoder._slots
    model = drop_in("gpt2", "hebbian", None, decode="graph")
    cache = RecurrentCache(model.config)
    with torch.no_grad():
        model(torch.randint(1, V, (1, 4)), cache=cache, use_cache=True)
        model._recurrent_decoder(input_ids=torch.ones(1, 1, dtype=torch.long), cache=cache,
                                 use_cache=True)                 # no position ids
    assert not model._recurrent_decoder._slots


def test_disable_compile_and_decode_eager_bypass_the_decoder():
    model = drop_in("gpt2", "hebbian", None, decode="graph")
    model.generate(torch.randint(1, V, (1, 4)), max_new_tokens=2, do_sample=False,
                   disable_compile=True)
    assert not model._recurrent_decoder._slots
    assert use_recurrent_cache(model, "eager") is None and "_recurrent_decoder" not in vars(model)


def test_decode_modes_are_checked():
    model = drop_in("gpt2", "hebbian", None)
    with pytest.raises(ValueError, match="decode"):
        use_recurrent_cache(model, "cuda")
    with pytest.raises(ValueError, match="decode"):
        RecurrentDecoder(model, "fast")
    with pytest.raises(ValueError, match="capture"):
        RecurrentDecoder(model, "graph", capture="yes")


@pytest.mark.gpu
@pytest.mark.parametrize("kind,bank", KINDS)
def test_captured_graph_equals_eager_on_cuda(kind, bank):
    """On a GPU: the captured and replayed step gives eager decoding's tokens and logits, one
    capture per batch size whatever the prompt length."""
    model = drop_in("llama", kind, bank, decode="eager").cuda()
    prompts = [torch.randint(1, V, (1, n)).cuda() for n in (7, 3, 5)]
    ids, mask = padded([p.cpu() for p in prompts])
    ids, mask = ids.cuda(), mask.cuda()
    eager = greedy(model, ids, mask)
    decoder = use_recurrent_cache(model, "auto")
    graphed = greedy(model, ids, mask)
    greedy(model, ids[:, 2:], mask[:, 2:])
    assert decoder.captures == 1
    assert torch.equal(graphed.sequences, eager.sequences)
    for a, b in zip(graphed.logits, eager.logits):
        assert_rel_close(a, b, 1e-4)
