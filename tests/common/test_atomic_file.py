"""glassbrain.atomic_file: atomic writes (mode, durability, failure, stale temp files) and
checksummed torch files (round trip, missing / truncated / garbage / bit-flipped files)."""
import os
import stat

import pytest
import torch

import glassbrain
from glassbrain import atomic_file as af
from glassbrain.atomic_file import (CorruptFileError, UncheckedFileError, UnloadableFileError,
                                    atomic_write, load_checked, save_checked)


@pytest.fixture
def umask():
    """Set the umask for one test, and restore it."""
    saved = os.umask(0o022)
    os.umask(saved)

    def set_(mask):
        os.umask(mask)

    yield set_
    os.umask(saved)


def test_exported_from_the_package_root():
    assert glassbrain.atomic_write is atomic_write and glassbrain.save_checked is save_checked
    assert glassbrain.load_checked is load_checked
    assert glassbrain.CorruptFileError is CorruptFileError


@pytest.mark.parametrize("mask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_new_files_get_the_ordinary_mode(tmp_path, umask, mask, mode):
    umask(mask)
    path = atomic_write(tmp_path / "deep" / "r.json", lambda f: f.write(b"{}"))
    assert stat.S_IMODE(path.stat().st_mode) == mode
    assert path.read_bytes() == b"{}"


def test_replaces_and_fsyncs_file_and_folder(tmp_path, monkeypatch):
    path = tmp_path / "r.txt"
    path.write_bytes(b"old")
    synced = []
    real_fsync = os.fsync

    def fsync(fd):
        synced.append(stat.S_ISDIR(os.fstat(fd).st_mode))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    atomic_write(path, lambda f: f.write(b"new"))
    assert path.read_bytes() == b"new"
    assert synced == [False, True]                  # the data, then the rename in its folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.txt"]


def test_failed_write_keeps_the_old_file_and_no_temp(tmp_path):
    path = tmp_path / "r.txt"
    path.write_bytes(b"old")

    def boom(f):
        f.write(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, boom)
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.txt"]


def test_leftovers_of_crashed_writers_are_cleaned(tmp_path):
    dead = 2**22 + 12345                            # above Linux's pid_max default: not running
    while True:
        try:
            os.kill(dead, 0)
            dead += 1
        except ProcessLookupError:
            break
        except PermissionError:
            dead += 1
    stale = [tmp_path / f".r.json.{dead}-0a1b2c3d.tmp",       # a crashed writer of ours
             tmp_path / ".r.json.k2j4_x9q.tmp"]                # an older (mkstemp) writer's
    live = tmp_path / f".r.json.{os.getpid()}-deadbeef.tmp"    # a writer still running
    other = tmp_path / f".r.json.bak.{dead}-0a1b2c3d.tmp"      # another file's temp
    for p in stale + [live, other]:
        p.write_bytes(b"junk")
    atomic_write(tmp_path / "r.json", lambda f: f.write(b"{}"))
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted(["r.json", live.name, other.name])


# ----------------------------------------------------------------------------- checked files

def _payload():
    shared = torch.randn(3, 5)
    return {"w": torch.randn(4, 7), "half": torch.randn(6, dtype=torch.float16),
            "bf": torch.randn(2, 3).to(torch.bfloat16), "ids": torch.randint(0, 9, (5,)),
            "mask": torch.rand(4) > 0.5, "scalar": torch.tensor(2.5),
            "empty": torch.zeros(0, 3), "view": shared[1:], "base": shared,
            "nested": [{"step": 3, "lr": 1e-3, "name": "bdh", "flag": True, "none": None},
                       (1, 2.0, "x")], "nan": float("nan")}


def test_checked_roundtrip_is_exact(tmp_path):
    obj = _payload()
    save_checked(obj, tmp_path / "c.pt")
    back = load_checked(tmp_path / "c.pt")
    assert set(back) == set(obj)
    for k in ("w", "half", "bf", "ids", "mask", "scalar", "empty", "view", "base"):
        assert back[k].dtype == obj[k].dtype and torch.equal(back[k], obj[k]), k
    assert back["nested"] == obj["nested"]
    assert back["nested"][1] == (1, 2.0, "x") and isinstance(back["nested"][1], tuple)
    assert stat.S_IMODE((tmp_path / "c.pt").stat().st_mode) == 0o777 & ~_current_umask() & 0o666


def _current_umask():
    m = os.umask(0)
    os.umask(m)
    return m


def test_checksum_covers_values_not_only_tensors():
    a = {"t": torch.arange(4.0), "step": 3}
    assert af.payload_sha256(a) == af.payload_sha256({"t": torch.arange(4.0), "step": 3})
    assert af.payload_sha256(a) != af.payload_sha256({"t": torch.arange(4.0), "step": 4})
    assert af.payload_sha256(a) != af.payload_sha256({"t": torch.arange(4.0).double(), "step": 3})
    assert af.payload_sha256(a) != af.payload_sha256({"t": torch.arange(4.0).view(2, 2),
                                                      "step": 3})
    flipped = torch.arange(4.0)
    flipped.view(torch.int32)[2] ^= 1
    assert af.payload_sha256(a) != af.payload_sha256({"t": flipped, "step": 3})


def test_missing_file_names_path_and_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"BDH state .*nope\.pt: no such file.*check"):
        load_checked(tmp_path / "nope.pt", "BDH state")


@pytest.mark.parametrize("cut", [0, 1, 100, 0.5, -30])
def test_truncated_file_fails_clearly(tmp_path, cut):
    path = tmp_path / "c.pt"
    save_checked({"w": torch.randn(64, 64)}, path)
    data = path.read_bytes()
    n = int(len(data) * cut) if isinstance(cut, float) else (cut if cut >= 0 else len(data) + cut)
    path.write_bytes(data[:n])
    with pytest.raises(CorruptFileError, match=r"checkpoint .*c\.pt: .*truncated or corrupt.*"
                                               r"delete it and write it again") as e:
        load_checked(path, "checkpoint")
    assert e.value.__cause__ is not None                   # torch's own error is kept, chained


def test_garbage_file_fails_clearly(tmp_path):
    path = tmp_path / "c.pt"
    path.write_bytes(os.urandom(3000))
    with pytest.raises(CorruptFileError, match="truncated or corrupt"):
        load_checked(path)


def test_bit_flip_in_tensor_data_is_a_checksum_mismatch(tmp_path):
    path = tmp_path / "c.pt"
    w = torch.randn(1000)
    save_checked({"w": w, "step": 7}, path)
    data = bytearray(path.read_bytes())
    at = data.find(w.numpy().tobytes()[1600:1700])          # inside the tensor's bytes
    assert at > 0
    data[at + 13] ^= 0x04                                  # one bit
    path.write_bytes(bytes(data))
    assert not torch.equal(torch.load(path)["payload"]["w"], w)   # torch itself loads it
    with pytest.raises(CorruptFileError, match=r"c\.pt: checksum mismatch.*damaged.*restore"):
        load_checked(path, fix="restore a good copy")


def test_plain_torch_file_is_reported_as_unchecked(tmp_path):
    torch.save({"format": "something", "version": 1}, tmp_path / "old.pt")
    with pytest.raises(UncheckedFileError, match="no checksum") as e:
        load_checked(tmp_path / "old.pt")
    assert e.value.content == {"format": "something", "version": 1}


def test_unsafe_object_is_not_called_corrupt(tmp_path):
    save_checked({"obj": _Picklable()}, tmp_path / "c.pt")
    with pytest.raises(UnloadableFileError,
                       match="weights-only loading refuses.*weights_only=False") as e:
        load_checked(tmp_path / "c.pt")
    assert not isinstance(e.value, CorruptFileError) and "delete" not in str(e.value)
    back = load_checked(tmp_path / "c.pt", weights_only=False)
    assert isinstance(back["obj"], _Picklable)


def _good_file(tmp_path):
    path = tmp_path / "c.pt"
    save_checked({"w": torch.randn(3, 5), "step": 2}, path)
    return path


@pytest.mark.parametrize("map_location,match", [
    ("gpu7", "names no device"), (42, "names no device"), ({"cpu": "tpu:x"}, "names no device"),
    ("meta", "meta tensors hold no data"), (torch.device("meta"), "meta tensors"),
    pytest.param("cuda", "not available on this machine",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="has a GPU")),
    ("cuda:99", "not available on this machine")])
def test_a_map_location_that_cannot_work_here_is_not_called_corrupt(tmp_path, map_location,
                                                                     match):
    path = _good_file(tmp_path)
    with pytest.raises(UnloadableFileError, match=match) as e:
        load_checked(path, "checkpoint", map_location=map_location)
    assert "c.pt" in str(e.value) and "map_location" in str(e.value)
    assert not isinstance(e.value, CorruptFileError) and "delete" not in str(e.value)
    assert torch.equal(load_checked(path, map_location="cpu")["w"],
                       load_checked(path)["w"])                    # the file is fine


def test_a_device_missing_at_load_time_is_not_called_corrupt(tmp_path, monkeypatch):
    """A file whose tensors were saved on a device this machine lacks: torch.load fails unless
    everything is mapped to the CPU. Simulated (no such file can be made on a CPU machine)."""
    path = _good_file(tmp_path)
    real_load = torch.load

    def load_without_the_saved_device(f, map_location=None, **kw):
        if map_location != "cpu":
            raise RuntimeError("Attempting to deserialize object on a CUDA device but "
                               "torch.cuda.is_available() is False.")
        return real_load(f, map_location=map_location, **kw)

    monkeypatch.setattr(torch, "load", load_without_the_saved_device)
    with pytest.raises(UnloadableFileError, match=r"intact.*map_location='cpu'") as e:
        load_checked(path, "checkpoint")
    assert "delete" not in str(e.value) and isinstance(e.value.__cause__, RuntimeError)
    assert load_checked(path, map_location="cpu")["step"] == 2
    path.write_bytes(path.read_bytes()[:100])                      # truncated: corrupt after all
    with pytest.raises(CorruptFileError, match="truncated or corrupt"):
        load_checked(path)


def test_a_folder_is_not_called_corrupt(tmp_path):
    (tmp_path / "d.pt").mkdir()
    with pytest.raises(IsADirectoryError, match=r"d\.pt: is a folder, not a file") as e:
        load_checked(tmp_path / "d.pt", "BDH state")
    assert "delete" not in str(e.value)


class _Picklable:
    def __eq__(self, other):
        return isinstance(other, _Picklable)


# ----------------------------------------------------------------------------- format versions

def test_a_version_1_file_still_loads_and_is_still_checked(tmp_path):
    """Files written before the block hash (version 1: tensor bytes fed to one sha256) load,
    and a flipped bit in them is still caught."""
    obj = {"S": torch.randn(3, 5), "position": 7}
    path = tmp_path / "v1.pt"
    torch.save({"format": af.CHECKED_FORMAT, "version": 1,
                "sha256": af.payload_sha256(obj, 1), "payload": obj}, path)
    got = load_checked(path)
    assert torch.equal(got["S"], obj["S"]) and got["position"] == 7
    bad = {"S": obj["S"].clone(), "position": 7}
    bad["S"][1, 2] += 1.0
    torch.save({"format": af.CHECKED_FORMAT, "version": 1,
                "sha256": af.payload_sha256(obj, 1), "payload": bad}, path)
    with pytest.raises(CorruptFileError, match="checksum mismatch"):
        load_checked(path)


def test_block_hash_catches_a_flip_in_any_block(tmp_path, monkeypatch):
    """Version 2 hashes a tensor in blocks (in parallel): a change in the last block, or two
    blocks swapped, changes the checksum."""
    monkeypatch.setattr(af, "HASH_BLOCK", 64)
    t = torch.randn(100)                                  # 400 bytes: 7 blocks of 64
    base = af.payload_sha256({"t": t})
    assert af.payload_sha256({"t": t.clone()}) == base
    last = t.clone()
    last[-1] += 1.0
    assert af.payload_sha256({"t": last}) != base
    swapped = torch.cat([t[16:32], t[:16], t[32:]])       # first two 64-byte blocks swapped
    assert af.payload_sha256({"t": swapped}) != base
    assert af.payload_sha256({"t": t}, 1) != base         # the two versions are distinct hashes
    save_checked({"t": t}, tmp_path / "v2.pt")
    assert torch.equal(load_checked(tmp_path / "v2.pt")["t"], t)


@pytest.mark.parametrize("version", [0, 3, True, "2"])
def test_unknown_versions_are_refused(tmp_path, version):
    path = tmp_path / "v.pt"
    obj = {"x": torch.ones(2)}
    torch.save({"format": af.CHECKED_FORMAT, "version": version,
                "sha256": af.payload_sha256(obj), "payload": obj}, path)
    with pytest.raises(CorruptFileError, match="version"):
        load_checked(path)
