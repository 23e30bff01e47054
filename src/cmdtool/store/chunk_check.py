"""Read and check a zarr v3 chunk file without zarr: what ``cmdtool verify`` does to every chunk of a store.

cmdtool writes its arrays with three codec chains: ``bytes`` + ``blosc`` + ``crc32c`` (compressed numbers),
``bytes`` + ``crc32c`` (``--codec none`` and uncompressed results) and ``vlen-utf8`` + ``zstd`` (the ``tensor``
names). Decoding them here with numcodecs (the codec library zarr itself uses) and google-crc32c (zarr's checksum)
keeps zarr's 0.5 s import out of ``verify`` (issue #11, ``bench/startup.py``) and reads a chunk file as it is on
disk: a missing file is missing, not the fill value. A codec outside these is reported, never guessed at.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np


class ChunkDamage(Exception):
    """A chunk that does not decode: ``problem`` is what verify reports ("checksum", "unreadable (...)")."""

    def __init__(self, problem: str):
        super().__init__(problem)
        self.problem = problem


def is_array(folder) -> bool:
    """Whether ``folder`` holds a zarr array (its ``zarr.json`` says ``node_type: array``)."""
    try:
        return json.loads((folder / "zarr.json").read_text()).get("node_type") == "array"
    except (FileNotFoundError, NotADirectoryError):
        return False


@dataclass
class ArrayDocument:
    """One array's ``zarr.json``: its folder (a Path or RemotePath), shape, chunk shape, type and codecs."""

    folder: object
    shape: tuple[int, ...]
    chunk_shape: tuple[int, ...]
    data_type: str
    codecs: list[dict]

    @classmethod
    def read(cls, folder) -> ArrayDocument:
        document = json.loads((folder / "zarr.json").read_text())
        grid = document["chunk_grid"]
        encoding = document.get("chunk_key_encoding", {})
        if grid.get("name") != "regular" or encoding.get("name") != "default" \
                or encoding.get("configuration", {}).get("separator", "/") != "/":
            raise ChunkDamage(f"unreadable (chunk layout {grid.get('name')}/{encoding} is not cmdtool's)")
        return cls(folder, tuple(document["shape"]), tuple(grid["configuration"]["chunk_shape"]),
                   str(document["data_type"]), document["codecs"])

    def chunk_file(self, index: tuple[int, ...]):
        """The file of chunk ``index`` (zarr v3 default key encoding: ``c/i/j``)."""
        path = self.folder / "c"
        for i in index:
            path = path / str(i)
        return path

    def chunk_indices(self):
        """Every chunk index of the array's shape, in C order."""
        counts = [-(-n // c) for n, c in zip(self.shape, self.chunk_shape)]
        return np.ndindex(*counts) if all(counts) else iter(())

    def decode(self, data: bytes) -> np.ndarray:
        """The chunk's values; :class:`ChunkDamage` if its checksum fails or it does not decode."""
        try:
            return self._decode(data)
        except ChunkDamage:
            raise
        except Exception as exc:  # noqa: BLE001 - a codec's failure on damaged bytes is damage
            raise ChunkDamage(f"unreadable ({type(exc).__name__})") from None

    def _decode(self, data: bytes) -> np.ndarray:
        # as a uint8 array, slices (the checksum stripped) are views, not copies of the chunk (google_crc32c
        # takes arrays, not memoryviews)
        data = np.frombuffer(data, dtype=np.uint8)
        for codec in reversed(self.codecs):  # bytes->bytes codecs first, then the array->bytes one
            name, config = codec["name"], codec.get("configuration", {})
            if name == "crc32c":
                import google_crc32c

                stored = int.from_bytes(data[-4:].tobytes(), "little")
                if len(data) < 4 or google_crc32c.value(data[:-4]) != stored:
                    raise ChunkDamage("checksum")
                data = data[:-4]
            elif name == "blosc":
                from numcodecs import blosc

                data = np.frombuffer(blosc.decompress(data), dtype=np.uint8)
            elif name == "zstd":
                from numcodecs import Zstd

                data = np.frombuffer(Zstd().decode(data), dtype=np.uint8)
            elif name == "bytes" and self.data_type != "string":  # zarr v3 numeric names are numpy's
                dtype = np.dtype(self.data_type).newbyteorder("<" if config.get("endian", "little") == "little"
                                                              else ">")
                return data.view(dtype).reshape(self.chunk_shape)
            elif name == "vlen-utf8":
                from numcodecs import VLenUTF8

                return VLenUTF8().decode(data).reshape(self.chunk_shape)
            else:
                raise ChunkDamage(f"unreadable (codec {name!r} for {self.data_type} is not one cmdtool writes)")
        raise ChunkDamage("unreadable (no array codec)")

    def read_chunk(self, index: tuple[int, ...]) -> np.ndarray | None:
        """The decoded chunk ``index``, or None if its file is missing."""
        try:
            data = self.chunk_file(index).read_bytes()
        except (FileNotFoundError, IsADirectoryError):
            return None
        return self.decode(data)
