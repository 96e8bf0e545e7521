"""kernels.bsbr launches: the frozen launch dataclasses refuse bad fields (errors name the
field), a call with launch=None runs the tuning cache's launch for its shape class (the length
bucketed), and the sweeps of kernels.bsbr.tune store their winner where launch=None finds it.
A fake GPU name stands in for a GPU (kernels.launch.device_name); the kernels run under the
Triton interpreter."""
import dataclasses
import json

import pytest
import torch

import kernels.bsbr.readout_grouped as grouped
import kernels.launch
from kernels.bsbr import (BSBRLaunch, LocalLaunch, ReadoutLaunch, RoutingLaunch, StatesLaunch,
                          bsbr_attention, chunk_local_attention, chunk_states, tune)
from kernels.bsbr.launch import resolve, shape_classes

FAKE_GPU = "Fake GPU 80GB"


@pytest.fixture
def fake_gpu(tmp_path, monkeypatch):
    """A tuning cache in tmp_path for a GPU model named FAKE_GPU that the CPU pretends to be."""
    monkeypatch.setenv("GLASSBRAIN_TUNING_DIR", str(tmp_path))
    monkeypatch.setattr(kernels.launch, "device_name", lambda device: FAKE_GPU)
    return tmp_path


def cache_entries(folder):
    (path,) = folder.glob("*.json")
    doc = json.loads(path.read_text())
    assert doc["device"] == FAKE_GPU
    return doc["entries"]


@pytest.mark.parametrize("cls,field,value,exc", [
    (RoutingLaunch, "block_q", 48, ValueError), (RoutingLaunch, "block_s", 8, ValueError),
    (RoutingLaunch, "warps", 3, ValueError), (RoutingLaunch, "precision", "fp8", ValueError),
    (RoutingLaunch, "method", "cuda", ValueError), (RoutingLaunch, "block_q", True, TypeError),
    (ReadoutLaunch, "mode", "dense", ValueError), (ReadoutLaunch, "block", 256, ValueError),
    (ReadoutLaunch, "block_v", 100, ValueError), (ReadoutLaunch, "df_block", 48, ValueError),
    (ReadoutLaunch, "df_warps", 3, ValueError), (ReadoutLaunch, "fused_block", 48, ValueError),
    (ReadoutLaunch, "products", True, TypeError), (ReadoutLaunch, "warps", 4.0, TypeError),
    (LocalLaunch, "block", 8, ValueError), (StatesLaunch, "block_v", 256, ValueError)])
def test_launch_fields_are_checked(cls, field, value, exc):
    with pytest.raises(exc, match=rf"{cls.__name__}\.{field}: expected .*{value!r}"):
        cls(**{field: value})
    with pytest.raises(exc, match=rf"{cls.__name__}\.{field}"):
        dataclasses.replace(cls(), **{field: value})


def test_a_launch_of_the_wrong_kind_is_refused():
    x = [torch.randn(1, 2, 12, 8) for _ in range(5)]
    with pytest.raises(TypeError, match="BSBRLaunch.routing: expected a RoutingLaunch"):
        BSBRLaunch(routing=ReadoutLaunch())
    with pytest.raises(TypeError, match="launch: expected a kernels.bsbr.BSBRLaunch.*dict"):
        bsbr_attention(*x, chunk_size=4, launch={"block": 64})
    with pytest.raises(TypeError, match="launch: .*LocalLaunch"):
        chunk_local_attention(*x[:3], chunk_size=4, launch=LocalLaunch())
    with pytest.raises(TypeError, match="launch: .*StatesLaunch"):
        chunk_states(x[1], x[2], x[4], chunk_size=4, launch=StatesLaunch())


def test_shape_classes_bucket_the_length():
    kw = dict(dtype=torch.float16, K=64, V=32, M=16, chunk_size=64, top_k=4)
    assert shape_classes(T=1000, **kw) == shape_classes(T=1024, **kw)
    assert shape_classes(T=1024, **kw) != shape_classes(T=1025, **kw)
    other = shape_classes(T=1000, **{**kw, "top_k": None})
    assert other["readout"] != shape_classes(T=1000, **kw)["readout"]
    assert other["local"] == shape_classes(T=1000, **kw)["local"]       # no top_k in local


def spy_readout(monkeypatch):
    """The ReadoutLaunch of every grouped readout call."""
    seen = []
    real = grouped.RoutedReadoutGrouped.apply

    def spy(*a):
        seen.append(next(x for x in a if isinstance(x, ReadoutLaunch)))
        return real(*a)
    monkeypatch.setattr(grouped.RoutedReadoutGrouped, "apply", spy)
    return seen


def test_launch_none_runs_the_cached_launch_of_its_shape_class(fake_gpu, monkeypatch,
                                                               kernel_device):
    """A cache entry for (op, shape class) is what launch=None runs, for every T of the length
    bucket; a stage given explicitly keeps the cache for the others; an entry the dataclass
    refuses falls back to the defaults; without a GPU name the defaults apply."""
    seen = spy_readout(monkeypatch)
    dev = kernel_device
    x = [torch.randn(1, 2, 40, d, device=dev) for d in (8, 8, 8, 4, 4)]
    kw = dict(chunk_size=8, top_k=2, backend="triton")
    cls = shape_classes(dtype=torch.float32, T=40, K=8, V=8, M=4, chunk_size=8, top_k=2)
    kernels.launch.store_tuned("bsbr.readout", dev, cls["readout"],
                               {"block": 16, "warps": 2, "not_a_field": 1})
    tuned = ReadoutLaunch(block=16, warps=2)
    bsbr_attention(*x, **kw)
    bsbr_attention(*[t[:, :, :33] for t in x], **kw)              # T = 33: the same bucket
    bsbr_attention(*x, **kw, launch=BSBRLaunch(routing=RoutingLaunch(precision="ieee")))
    bsbr_attention(*x, **kw, launch=BSBRLaunch(readout=ReadoutLaunch(block=32)))
    bsbr_attention(*[t[:, :, :24] for t in x], **kw)              # T = 24: another bucket
    assert seen == [tuned, tuned, tuned, ReadoutLaunch(block=32), ReadoutLaunch()]
    kernels.launch.store_tuned("bsbr.readout", dev, cls["readout"], {"block": 48})
    assert resolve(BSBRLaunch(), dev, cls).readout == ReadoutLaunch()
    monkeypatch.setattr(kernels.launch, "device_name", lambda device: None)     # a plain CPU
    assert resolve(BSBRLaunch(), dev, cls) == BSBRLaunch(RoutingLaunch(), ReadoutLaunch(),
                                                           LocalLaunch(), StatesLaunch())


SHAPE = tune.SweepShape(T=40, batch=1, heads=2, head_dim=8, chunk_size=8, top_k=2,
                        dtype=torch.float32, meta_dim=4)


def test_routing_sweep_stores_a_winner_that_launch_none_resolves_to(fake_gpu, kernel_device):
    """The real sweep (wall-clock times on the CPU, so any candidate may win): every candidate
    gets a time and the same slots (the interpreter computes every product in float32), and the
    winner in the file is the routing launch=None resolves to at that shape class."""
    candidates = tune.ROUTE_CANDIDATES[:3]
    report = tune.tune_routing(SHAPE, kernel_device, candidates)
    assert [r["fwd_ms"] > 0 and r["same_slots"] == 1.0 for r in report["rows"]] == [True] * 3
    assert report["best"] in candidates
    stored = cache_entries(fake_gpu)["bsbr.routing"][report["shape_class"]]
    assert stored == dataclasses.asdict(report["best"])
    assert resolve(BSBRLaunch(), kernel_device, SHAPE.classes()).routing == report["best"]


def test_routing_sweep_picks_the_fastest_launch_with_the_same_slots(fake_gpu, monkeypatch,
                                                                   kernel_device):
    from kernels.bsbr import routing_triton
    real = routing_triton.SelectedScoresTriton.apply
    running = []

    def fake_apply(*a):
        launch = next(x for x in a if isinstance(x, RoutingLaunch))
        running.append(launch)
        idx, sel = real(*a)
        return (idx.flip(-1) if launch.block_q == 128 else idx), sel      # "other slots"

    def fake_time(fn, device):
        fn()
        launch = running[-1]
        # block_q 128 is "fastest" but selects differently: the pick must skip it.
        return {32: 3.0, 64: 1.0, 128: 0.1}[launch.block_q] + launch.block_s / 1e3 \
            - (launch.precision == "tf32x3") / 10
    monkeypatch.setattr(routing_triton.SelectedScoresTriton, "apply", fake_apply)
    monkeypatch.setattr(tune, "time_ms", fake_time)
    report = tune.tune_routing(SHAPE, kernel_device)
    assert report["best"] == RoutingLaunch(block_q=64, block_s=32, warps=4, precision="tf32x3")
    rows = report["rows"]
    assert [r["same_slots"] < 1.0 for r in rows] == [r["block_q"] == 128 for r in rows]
    assert len(rows) == len(tune.ROUTE_CANDIDATES)
    assert resolve(BSBRLaunch(), kernel_device, SHAPE.classes()).routing == report["best"]


def test_readout_sweep_times_each_candidate_and_stores_the_fastest(fake_gpu, monkeypatch,
                                                                   kernel_device):
    """Each candidate runs a bsbr fwd+bwd with its readout launch; a candidate that fails is a
    row with a note; the fastest one is stored and resolved by launch=None."""
    seen = spy_readout(monkeypatch)
    candidates = (ReadoutLaunch(block=16), ReadoutLaunch(block=32, backward="two_pass"),
                  ReadoutLaunch(block=16, backward="one_pass", fused_block=16))
    times = iter([2.0, 1.0])

    def fake_time(fn, device):
        fn()
        if seen[-1].backward == "one_pass":
            raise RuntimeError("out of resources")
        return next(times)
    monkeypatch.setattr(tune, "time_ms", fake_time)
    report = tune.tune_readout(SHAPE, kernel_device, candidates,
                               routing=RoutingLaunch(precision="ieee"))
    assert seen == list(candidates)
    assert [r["fwd_bwd_ms"] for r in report["rows"]] == [2.0, 1.0, None]
    assert "out of resources" in report["rows"][2]["note"]
    assert report["best"] == candidates[1]
    stored = cache_entries(fake_gpu)["bsbr.readout"][report["shape_class"]]
    assert ReadoutLaunch(**stored) == candidates[1]
    assert resolve(BSBRLaunch(), kernel_device, SHAPE.classes()).readout == candidates[1]
