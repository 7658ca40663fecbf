"""astra.storage: files that run no code when loaded, refuse damage, and never lose the old copy."""

from __future__ import annotations

import os
import pickle
import threading

import pytest
import torch

from astra import storage
from astra.storage import StoredFileError, atomic_path, check_output, load_tensors, save_tensors


def test_nested_structure_round_trips_with_int_keys_and_tied_tensors(tmp_path):
    weight = torch.randn(4, 3)
    tree = {
        "config": {"groups": 2, "name": "x", "ratio": 0.5, "none": None, "ok": True},
        "embed": weight,
        "head": weight,  # tied: stored once, still two entries
        "transposed": weight.t(),  # not contiguous
        "optimizer": {"state": {0: {"step": torch.tensor(3.0)}}, "groups": [{"betas": [0.9, 1]}]},
        "history": [{"loss": 1.5}, {"loss": float("inf")}],
        "rng": torch.get_rng_state(),
    }
    path = save_tensors(tmp_path / "t.safetensors", tree, kind="test/1")
    back = load_tensors(path, kind="test/1")
    assert back["config"] == tree["config"] and back["history"] == tree["history"]
    torch.testing.assert_close(back["head"], weight, rtol=0, atol=0)
    torch.testing.assert_close(back["transposed"], weight.t(), rtol=0, atol=0)
    assert list(back["optimizer"]["state"]) == [0]  # int key, not "0"
    assert torch.equal(back["rng"], tree["rng"])


class _Payload:
    """Unpickling this runs code: it creates the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_a_crafted_pickle_is_refused_and_runs_nothing(tmp_path, writer):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.safetensors"
    blob = {"format": "astra-artefact/2", "payload": _Payload(marker)}
    if writer == "torch.save":
        torch.save(blob, path)
    else:
        path.write_bytes(pickle.dumps(blob))
    with pytest.raises(StoredFileError, match="pickle"):
        load_tensors(path, kind="astra-artefact/2")
    assert not marker.exists()


def test_a_flipped_byte_and_a_truncation_are_detected(tmp_path):
    path = save_tensors(tmp_path / "t.safetensors", {"w": torch.arange(100.0)}, kind="test/1")
    data = path.read_bytes()
    flipped = bytearray(data)
    flipped[-17] ^= 0x01  # one bit of one float
    (tmp_path / "flipped").write_bytes(bytes(flipped))
    with pytest.raises(StoredFileError, match="SHA-256.*changed or damaged"):
        load_tensors(tmp_path / "flipped", kind="test/1")
    (tmp_path / "short").write_bytes(data[:-40])
    with pytest.raises(StoredFileError, match="truncated"):
        load_tensors(tmp_path / "short", kind="test/1")
    (tmp_path / "stub").write_bytes(data[:5])
    with pytest.raises(StoredFileError, match="too short"):
        load_tensors(tmp_path / "stub", kind="test/1")
    with pytest.raises(StoredFileError, match="is not other/1"):
        load_tensors(path, kind="other/1")


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    path = tmp_path / "out.json"
    storage.write_json(path, {"v": 1})
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(path) as tmp:
            tmp.write_text("half")
            raise KeyboardInterrupt
    assert path.read_text() == '{\n  "v": 1\n}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_concurrent_writers_to_one_path_both_succeed(tmp_path):
    """Two calibrations writing the same cache: each uses its own temp name; the last rename
    wins and the file is always whole."""
    path = tmp_path / "cache.safetensors"
    errors = []

    def write(value):
        try:
            for _ in range(20):
                save_tensors(path, {"w": torch.full((1000,), float(value))}, kind="test/1")
        except Exception as exc:  # pragma: no cover - the failure this test looks for
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(v,)) for v in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    w = load_tensors(path, kind="test/1")["w"]
    assert w.unique().numel() == 1 and w[0].item() in (1.0, 2.0)
    assert [p.name for p in tmp_path.iterdir()] == ["cache.safetensors"]


def test_check_output_refuses_existing_files_and_unwritable_places(tmp_path):
    existing = tmp_path / "a.json"
    existing.write_text("{}")
    with pytest.raises(ValueError, match="a.json already exists; pass --force"):
        check_output(existing)
    check_output(existing, force=True)
    check_output(tmp_path / "new" / "deeper" / "b.json")  # directories are created later
    with pytest.raises(ValueError, match="is a directory"):
        check_output(tmp_path)
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(ValueError, match="cannot write in"):
            check_output(locked / "c.json", flag="--json")
    with pytest.raises(ValueError, match="--json /proc/x.json: cannot write in /proc"):
        check_output("/proc/x.json", flag="--json")
