"""Ingest of safetensors checkpoints reads them with numpy and never imports torch (issue #26), storing the values
torch reads from the same files, bit for bit."""

from __future__ import annotations

import ast
import json
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import cmdtool
from cmdtool.errors import CheckpointError
from cmdtool.ingestion.formats import safetensors_metadata
from cmdtool.ingestion.safetensors_reader import (SafetensorsFile, bfloat16_to_float32, float16_to_float32)

ALL_16_BIT_PATTERNS = np.arange(1 << 16, dtype=np.uint16)
# float16 bit patterns torch's and numpy's conversions could treat differently: signalling and quiet NaNs of both
# signs, infinities, subnormals, -0
FLOAT16_SPECIALS = np.array([0x7C01, 0x7D55, 0x7E00, 0xFC01, 0xFFFF, 0x7C00, 0xFC00, 0x0001, 0x03FF, 0x8000],
                            dtype=np.uint16)


def _from_bits(bits: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    return torch.from_numpy(bits.astype(np.uint16).view(np.int16).copy()).view(dtype)


def _state(epoch: int, keys: list[str] | None = None) -> dict[str, torch.Tensor]:
    """A small model's state with float32, float16, bfloat16 and float64 weights, awkward values in each (NaN
    payloads, infinities, subnormals, -0), an int64 counter and a bool mask."""
    g = torch.Generator().manual_seed(epoch)
    conv = torch.randn(4, 1, 3, 3, generator=g)
    conv.view(-1)[:4] = torch.tensor([float("nan"), -float("inf"), -0.0, 1e-40])
    norm = torch.randn(70, generator=g).to(torch.float16)
    norm[:len(FLOAT16_SPECIALS)] = _from_bits(FLOAT16_SPECIALS, torch.float16)
    head = torch.randn(5, 7, generator=g).to(torch.bfloat16)
    head.view(-1)[:3] = _from_bits(np.array([0x7F81, 0xFFC1, 0x0001]), torch.bfloat16)
    state = {"conv.weight": conv, "norm.weight": norm, "head.weight": head,
             "head.bias": (torch.randn(7, generator=g, dtype=torch.float64) * 1e39),  # beyond float32: inf
             "norm.num_batches_tracked": torch.tensor(10 * epoch), "mask": torch.arange(6) % (epoch + 1) == 0}
    return state if keys is None else {k: state[k] for k in keys}


def _write(folder, layout: str, epochs=(1, 2, 3)) -> list[dict[str, str]]:
    """Checkpoints laid out as ``layout``; returns, per epoch, {tensor name: file holding it}."""
    where = []
    for epoch in epochs:
        state = _state(epoch)
        if layout == "files":
            path = folder / f"epoch_{epoch}.safetensors"
            folder.mkdir(parents=True, exist_ok=True)
            save_file(state, str(path), metadata={"format": "pt"})
            where.append({name: str(path) for name in state})
        elif layout == "trainer":  # HF Trainer's checkpoint-N/ folders
            (folder / f"checkpoint-{epoch}").mkdir(parents=True)
            path = folder / f"checkpoint-{epoch}" / "model.safetensors"
            save_file(state, str(path))
            where.append({name: str(path) for name in state})
        else:  # sharded: two shards and an index
            ckpt = folder / f"checkpoint-{epoch}"
            ckpt.mkdir(parents=True)
            shards = {"model-00001-of-00002.safetensors": ["head.weight", "head.bias", "conv.weight"],
                      "model-00002-of-00002.safetensors": ["norm.weight", "norm.num_batches_tracked", "mask"]}
            weight_map = {}
            for shard, names in shards.items():
                save_file({n: state[n] for n in names}, str(ckpt / shard))
                weight_map.update({n: shard for n in names})
            (ckpt / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
            where.append({name: str(ckpt / shard) for name, shard in weight_map.items()})
    return where


INGEST_IN_A_FRESH_PROCESS = (
    "import sys\nfrom cmdtool_cli.app import app\ncode = 0\n"
    "try:\n    app(['ingest', *sys.argv[2:], '--store', sys.argv[1], '-q'])\n"
    "except SystemExit as exit:\n    code = exit.code or 0\n"
    "print('EXIT', code)\n"
    "print('IMPORTED', sorted(m for m in ('torch', 'safetensors') if m in sys.modules))\n")


def _ingest_in_a_fresh_process(store, *args) -> tuple[int, list[str], str]:
    out = subprocess.run([sys.executable, "-c", INGEST_IN_A_FRESH_PROCESS, str(store), *map(str, args)],
                         capture_output=True, text=True, check=True)
    code = int(next(line for line in out.stdout.splitlines() if line.startswith("EXIT ")).split()[1])
    imported = next(line for line in out.stdout.splitlines() if line.startswith("IMPORTED "))
    return code, ast.literal_eval(imported[len("IMPORTED "):]), out.stdout + out.stderr


@pytest.mark.parametrize("layout", ["files", "trainer", "sharded"])
def test_ingest_of_safetensors_imports_no_torch_and_stores_what_torch_reads(tmp_path, layout):
    where = _write(tmp_path / "run", layout)
    code, imported, output = _ingest_in_a_fresh_process(tmp_path / "s.zarr", tmp_path / "run")
    assert code == 0 and imported == [], output
    store = cmdtool.open_store(tmp_path / "s.zarr")
    assert list(store.labels) == [1, 2, 3]
    # the tensors in the order the safetensors library lists them: sorted keys, or the shard index's order
    expected_order = list(where[0]) if layout == "sharded" else sorted(where[0])
    assert [e.name for e in store.layout.entries] == expected_order
    dtypes = {e.name: e.dtype for e in store.layout.entries}
    assert dtypes == {"conv.weight": "float32", "norm.weight": "float16", "head.weight": "bfloat16",
                      "head.bias": "float64", "norm.num_batches_tracked": "int64", "mask": "bool"}
    values = store.read_columns(slice(0, 3))
    integers = [store.read_integer_column(c) for c in range(3)]
    for column, files in enumerate(where):
        loaded = {name: load_file(path)[name] for name, path in files.items()}  # torch's read of each file
        for entry in store.layout.entries:
            if entry.role == "trajectory":
                expected = loaded[entry.name].float().reshape(-1).numpy()
                assert_same_float32(values[entry.offset:entry.stop, column], expected,
                                    exact_nans=entry.dtype != "float16", what=entry.name)
            else:
                expected = loaded[entry.name].to(torch.int64).reshape(-1).numpy()
                np.testing.assert_array_equal(integers[column][entry.offset:entry.stop], expected)
        # NaN/Inf counted as torch's values have them
        n_nonfinite = sum(int((~torch.isfinite(loaded[e.name].float())).sum()) for e in store.layout.entries
                          if e.role == "trajectory")
        assert store.time_axis[column].nonfinite == n_nonfinite > 0


def test_a_torch_checkpoint_still_imports_torch_and_a_damaged_safetensors_none(tmp_path):
    """The readers of torch files keep torch, imported when one is read; a damaged safetensors file is refused in
    one line naming it (exit 2), with nothing written and no torch imported."""
    (tmp_path / "pt").mkdir()
    torch.save(_state(1), tmp_path / "pt" / "epoch_1.pt")
    code, imported, output = _ingest_in_a_fresh_process(tmp_path / "pt.zarr", tmp_path / "pt")
    assert code == 0 and imported == ["torch"], output
    _write(tmp_path / "st", "files", epochs=(1,))
    data = (tmp_path / "st" / "epoch_1.safetensors").read_bytes()
    (tmp_path / "st" / "epoch_1.safetensors").write_bytes(data[:-5])
    code, imported, output = _ingest_in_a_fresh_process(tmp_path / "st.zarr", tmp_path / "st")
    assert code == 2 and imported == [], output
    errors = [line for line in output.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and "epoch_1.safetensors" in errors[0] and "truncated" in errors[0], output
    assert not (tmp_path / "st.zarr").exists()


def assert_same_float32(got: np.ndarray, expected: np.ndarray, exact_nans: bool = True, what: str = "") -> None:
    """Bit for bit; with ``exact_nans=False`` a NaN need only be a NaN (see the float16 test)."""
    nan = np.isnan(expected)
    np.testing.assert_array_equal(np.isnan(got), nan, err_msg=what)
    keep = slice(None) if exact_nans else ~nan
    np.testing.assert_array_equal(got.view(np.uint32)[keep], expected.view(np.uint32)[keep], err_msg=what)


@pytest.mark.parametrize("length", [1, 7, 33, 1 << 16])
def test_bfloat16_and_float16_conversions_equal_torchs_float(length):
    """Every 16-bit pattern (NaN payloads, signalling NaNs, subnormals, infinities), at lengths that reach torch's
    scalar and vectorised loops, converts to the float32 bits torch's ``.float()`` gives. torch's own float16 NaNs
    differ by loop: its vectorised loop keeps the payload (quieted), the scalar loop for the last ``length % 8``
    elements gives 0x7fffffff; the conversion here always gives the former, so a float16 NaN is compared as
    a NaN except where torch's whole tensor goes through the vectorised loop (a multiple of 8)."""
    bits = ALL_16_BIT_PATTERNS if length == 1 << 16 else \
        np.concatenate([FLOAT16_SPECIALS, ALL_16_BIT_PATTERNS[::997]])[:length]
    out = np.full(len(bits), np.nan, dtype=np.float32)
    bfloat16_to_float32(bits, out)
    assert_same_float32(out, _from_bits(bits, torch.bfloat16).float().numpy())
    float16_to_float32(bits.view(np.float16), out)
    assert_same_float32(out, _from_bits(bits, torch.float16).float().numpy(), exact_nans=length % 8 == 0)


def test_reader_agrees_with_the_safetensors_library(tmp_path):
    """Names in the library's order, shapes, metadata, parts of tensors, float64 rounded as torch rounds it."""
    path = tmp_path / "m.safetensors"
    state = _state(2)
    save_file(state, str(path), metadata={"format": "pt", "note": "x"})
    with SafetensorsFile(path) as file, safe_open(str(path), framework="pt") as library:
        assert file.keys() == list(library.keys())
        assert file.metadata == library.metadata() == safetensors_metadata(path)
        for key in file.keys():
            tensor = file.tensors[key]
            assert tensor.shape == tuple(library.get_slice(key).get_shape())
            ours, theirs = tensor.torch(), library.get_tensor(key)
            assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
            assert torch.equal(ours.reshape(-1).view(torch.uint8), theirs.reshape(-1).view(torch.uint8))  # bytes
            if key in ("conv.weight", "norm.weight", "head.weight", "head.bias"):
                out = np.zeros(5, dtype=np.float32)
                tensor.read_float32(2, 7, out)
                expected = library.get_tensor(key).float().reshape(-1)[2:7].numpy()
                assert_same_float32(out, expected, exact_nans=key != "norm.weight", what=key)


def _header_and_data(path):
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n]), data[8 + n:]


def _with_header(path, header, data):
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


@pytest.mark.parametrize("damage, message", [
    (lambda h, d: (h, d + b"\0"), "places data up to byte"),                      # trailing bytes
    (lambda h, d: ({**h, "w": {**h["w"], "data_offsets": [4, 28]}}, d), "starts at byte 4"),
    (lambda h, d: ({**h, "w": {**h["w"], "dtype": "Q7"}}, d), "unknown dtype 'Q7'"),
    (lambda h, d: ({**h, "w": {**h["w"], "shape": [2, -3]}}, d), "no valid shape"),
    (lambda h, d: ({**h, "w": {**h["w"], "dtype": "F16"}}, d), "24 bytes for shape (6,) of F16"),
    (lambda h, d: ({**h, "__metadata__": {"a": 1}}, d), "__metadata__ is not an object of strings"),
])
def test_a_damaged_header_is_refused_naming_the_file(tmp_path, damage, message):
    path = tmp_path / "epoch_1.safetensors"
    save_file({"w": torch.arange(6, dtype=torch.float32)}, str(path))
    _with_header(path, *damage(*_header_and_data(path)))
    with pytest.raises(CheckpointError, match=f"epoch_1.safetensors: not a readable safetensors file .*"
                                              f"{message.replace('(', '.').replace(')', '.')}"):
        cmdtool.ingest([path], tmp_path / "s.zarr")
    assert not (tmp_path / "s.zarr").exists()


def test_float8_is_refused_as_an_unsupported_dtype(tmp_path):
    """numpy has no float8: ingest refuses a float8 tensor by name, as it refuses one in a torch file."""
    path = tmp_path / "epoch_1.safetensors"
    save_file({"w": torch.zeros(3), "q": torch.zeros(4).to(torch.float8_e4m3fn)}, str(path))
    with pytest.raises(CheckpointError, match=r"epoch_1.safetensors: tensor 'q' has unsupported dtype F8_E4M3"):
        cmdtool.ingest([path], tmp_path / "s.zarr")
    assert not (tmp_path / "s.zarr").exists()


def test_ingest_of_safetensors_then_a_cpu_decompose_import_no_torch(tmp_path):
    """The issue's case end to end in one process: `cmdtool ingest` of a safetensors run, then `cmdtool decompose`
    (the default CMD fit, `--device auto`), and the saved fit models every epoch of the ingested values."""
    run = tmp_path / "run"
    run.mkdir()
    g = torch.Generator().manual_seed(0)
    start, drift = torch.randn(2000, generator=g), torch.randn(2000, generator=g)
    for epoch in range(1, 13):
        weight = start + drift * (1 - 0.8 ** epoch)
        save_file({"layer.weight": weight.reshape(40, 50).contiguous(), "layer.bias": weight[:10].to(torch.bfloat16)},
                  str(run / f"epoch_{epoch}.safetensors"))
    script = ("import sys\nfrom cmdtool_cli.app import app\n"
              "for args in (['ingest', sys.argv[2]], ['decompose', '--modes', '2']):\n"
              "    try:\n        app([*args, '--store', sys.argv[1], '-q'])\n"
              "    except SystemExit as exit:\n        assert not exit.code, exit.code\n"
              "print('IMPORTED', sorted(m for m in ('torch', 'safetensors') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "s.zarr"), str(run)], capture_output=True,
                         text=True, check=True)
    assert "IMPORTED []" in out.stdout, out.stdout[-2000:] + out.stderr[-2000:]
    store = cmdtool.open_store(tmp_path / "s.zarr")
    from cmdtool.analyzers import get_analyzer

    fit = get_analyzer("cmd").load(store)
    stored = store.read_columns(slice(0, 12))
    # every float32 weight is an affine image of one curve (1 - 0.8^t): CMD models it to float32 rounding (1e-4
    # against weights of up to 4); the bfloat16 bias is that curve rounded to 8 bits
    weight = next(e for e in store.layout.entries if e.name == "layer.weight")
    modelled = fit.reconstruct_epoch(store, 11)
    assert np.abs(modelled - stored[:, 11])[weight.offset:weight.stop].max() < 1e-4
    assert np.abs(modelled - stored[:, 11]).max() < 0.05
