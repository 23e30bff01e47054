"""cmdtool.ingestion.torch_archive: tensors of a torch file found and replaced without running its pickle."""

from __future__ import annotations

import io
import os
import pickle
import sys
import types
import zipfile

import numpy as np
import pytest
import torch

from cmdtool.errors import CheckpointError
from cmdtool.ingestion import torch_archive


def test_scan_reads_containers_and_tensor_places_of_classes_that_are_not_importable(tmp_path):
    module = types.ModuleType("vanished_library")
    exec("class Stage:\n    def __init__(self, n):\n        self.n = n\n", module.__dict__)
    sys.modules["vanished_library"] = module
    module.Stage.__module__ = "vanished_library"
    try:
        flat = torch.arange(10, dtype=torch.float32)
        torch.save({"inner": {"flat": [flat[2:8]], "stage": module.Stage(3), "n": 5}}, tmp_path / "p.pt")
    finally:
        del sys.modules["vanished_library"]
    with pytest.raises(ModuleNotFoundError):
        torch.load(tmp_path / "p.pt", weights_only=False)
    obj = torch_archive.scan(tmp_path / "p.pt")
    ref = obj["inner"]["flat"][0]
    assert obj["inner"]["n"] == 5 and isinstance(obj["inner"]["stage"], torch_archive.Opaque)
    assert (ref.offset, ref.size, ref.numel) == (2, (6,), 6)
    np.testing.assert_array_equal(torch_archive.read_tensor(tmp_path / "p.pt", ref), np.arange(2, 8))

    sys.modules["vanished_library"] = module
    try:
        torch_archive.write_replacing(tmp_path / "p.pt", tmp_path / "q.pt", [(ref, -np.arange(6.0))])
        loaded = torch.load(tmp_path / "q.pt", weights_only=False)
    finally:
        del sys.modules["vanished_library"]
    np.testing.assert_array_equal(loaded["inner"]["flat"][0].numpy(), -np.arange(6.0))
    assert loaded["inner"]["stage"].n == 3 and loaded["inner"]["n"] == 5
    assert (tmp_path / "p.pt").read_bytes() != (tmp_path / "q.pt").read_bytes()


def test_scan_never_runs_what_the_pickle_names(tmp_path):
    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {tmp_path / 'ran'}",)

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("archive/data.pkl", pickle.dumps({"x": Payload()}, protocol=2))
    (tmp_path / "evil.pt").write_bytes(buffer.getvalue())
    obj = torch_archive.scan(tmp_path / "evil.pt")
    assert isinstance(obj["x"], torch_archive.Opaque) and not (tmp_path / "ran").exists()


def test_a_file_that_is_not_a_torch_archive_is_one_checkpoint_error(tmp_path):
    (tmp_path / "bad.pt").write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match="bad.pt: not a readable torch file"):
        torch_archive.scan(tmp_path / "bad.pt")
