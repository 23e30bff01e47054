"""zarr v3 chunk files read, checked and decoded without zarr: the store's local read path and ``cmdtool verify``.

cmdtool writes its arrays with three codec chains: ``bytes`` + ``blosc`` + ``crc32c`` (compressed numbers),
``bytes`` + ``crc32c`` (``--codec none`` and uncompressed results) and ``vlen-utf8`` + ``zstd`` (the ``tensor``
names). Decoding them here with numcodecs (the codec library zarr itself uses) and google-crc32c (zarr's checksum)
costs less CPU than reading the same region through zarr, keeps zarr's import out of ``verify``'s start-up and
reads a chunk file as it is on disk: a missing file is missing, not the fill value. A codec outside these is
reported, never guessed at.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import threading
import uuid
from dataclasses import dataclass

import numpy as np


_SCRATCH = threading.local()  # per-thread reusable buffers of read_region and write_region
WRITE_THREADS = 2  # chunks encoded at once by write_region


@functools.cache
def _writer_pool():
    from concurrent.futures import ThreadPoolExecutor

    return ThreadPoolExecutor(WRITE_THREADS, thread_name_prefix="cmdtool-chunk-writer")


class ChunkDamage(Exception):
    """A chunk that does not decode: ``problem`` is what verify reports ("checksum", "unreadable (...)")."""

    def __init__(self, problem: str):
        super().__init__(problem)
        self.problem = problem
        self.index: tuple[int, ...] | None = None  # the chunk, where the reader knows it


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
    fill_value: object = 0

    @classmethod
    def read(cls, folder) -> ArrayDocument:
        document = json.loads((folder / "zarr.json").read_text())
        grid = document["chunk_grid"]
        encoding = document.get("chunk_key_encoding", {})
        if grid.get("name") != "regular" or encoding.get("name") != "default" \
                or encoding.get("configuration", {}).get("separator", "/") != "/":
            raise ChunkDamage(f"unreadable (chunk layout {grid.get('name')}/{encoding} is not cmdtool's)")
        return cls(folder, tuple(document["shape"]), tuple(grid["configuration"]["chunk_shape"]),
                   str(document["data_type"]), document["codecs"], document.get("fill_value", 0))

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

    def decode(self, data, into: np.ndarray | None = None) -> np.ndarray:
        """The chunk's values from its file's bytes; :class:`ChunkDamage` if its checksum fails or it does not
        decode. ``into``: a uint8 array of the chunk's decoded size to decode into (no allocation); the values
        returned are then a view of it."""
        try:
            return self._decode(data, into)
        except ChunkDamage:
            raise
        except Exception as exc:  # noqa: BLE001 - a codec's failure on damaged bytes is damage
            raise ChunkDamage(f"unreadable ({type(exc).__name__})") from None

    def _decode(self, data, into: np.ndarray | None) -> np.ndarray:
        # as a uint8 array, slices (the checksum stripped) are views, not copies of the chunk (google_crc32c
        # takes arrays, not memoryviews)
        data = np.frombuffer(data, dtype=np.uint8)
        for codec in reversed(self.codecs):  # bytes->bytes codecs first, then the array->bytes one
            name = codec["name"]
            if name == "crc32c":
                import google_crc32c

                stored = int.from_bytes(data[-4:].tobytes(), "little")
                if len(data) < 4 or google_crc32c.value(data[:-4]) != stored:
                    raise ChunkDamage("checksum")
                data = data[:-4]
            elif name == "blosc":
                from numcodecs import blosc

                if into is not None:
                    blosc.decompress(data, into)
                    data, into = into, None
                else:
                    data = np.frombuffer(blosc.decompress(data), dtype=np.uint8)
            elif name == "zstd":
                from numcodecs import Zstd

                data = np.frombuffer(Zstd().decode(data), dtype=np.uint8)
            elif name == "bytes" and self.data_type != "string":  # zarr v3 numeric names are numpy's
                dtype = np.dtype(self.data_type).newbyteorder(self._byte_order)
                if into is not None:  # not decoded into it yet (no blosc): one copy, as asked
                    into[:len(data)] = data
                    data = into
                return data[:int(np.prod(self.chunk_shape)) * dtype.itemsize].view(dtype).reshape(self.chunk_shape)
            elif name == "vlen-utf8":
                from numcodecs import VLenUTF8

                return VLenUTF8().decode(data).reshape(self.chunk_shape)
            else:
                raise ChunkDamage(f"unreadable (codec {name!r} for {self.data_type} is not one cmdtool writes)")
        raise ChunkDamage("unreadable (no array codec)")

    @property
    def numeric(self) -> bool:
        """Whether :meth:`read_region` can read this array: numbers, and only codecs this module decodes."""
        return self.data_type != "string" and all(c.get("name") in ("bytes", "blosc", "zstd", "crc32c")
                                                  for c in self.codecs)

    def read_region(self, rows: slice, columns: slice, empty=np.empty) -> np.ndarray:
        """``array[rows, columns]`` of a 2-D numeric array in a local folder (a 1-D one reads as one column),
        decoded chunk by chunk;
        :class:`ChunkDamage` names the first chunk that is missing or damaged (``problem``, and ``index``).

        No allocation per chunk: files are read into a buffer reused by this thread, and a chunk whose rows and
        columns all fall in the region (every chunk of a row block over all checkpoints, but a last partial one)
        is decompressed straight into the result, with no per-chunk buffer to allocate and page-fault in.
        ``empty(shape, dtype)`` allocates the result (the reader passes its reused block arrays)."""
        one_dimensional = len(self.chunk_shape) == 1
        chunk_rows, chunk_cols = (self.chunk_shape[0], 1) if one_dimensional else self.chunk_shape
        itemsize = np.dtype(self.data_type).itemsize
        chunk_bytes = chunk_rows * chunk_cols * itemsize
        out = empty((rows.stop - rows.start, columns.stop - columns.start), self.data_type)
        in_place_ok = self._native_order and columns.start % chunk_cols == 0 and \
            columns.stop - columns.start == chunk_cols
        row_chunks = range(rows.start // chunk_rows, -(-rows.stop // chunk_rows))
        column_chunks = range(columns.start // chunk_cols, -(-columns.stop // chunk_cols))
        if len(row_chunks) * len(column_chunks) > 1:
            _will_need([self.chunk_file((i,) if one_dimensional else (i, j)) for i in row_chunks
                        for j in column_chunks])
        for i in row_chunks:
            r0, r1 = max(rows.start, i * chunk_rows), min(rows.stop, (i + 1) * chunk_rows)
            for j in column_chunks:
                c0, c1 = max(columns.start, j * chunk_cols), min(columns.stop, (j + 1) * chunk_cols)
                in_place = in_place_ok and r1 - r0 == chunk_rows
                target = out[r0 - rows.start:r1 - rows.start].reshape(-1).view(np.uint8) if in_place \
                    else self._scratch("chunk", chunk_bytes)
                index = (i,) if one_dimensional else (i, j)
                try:
                    data = self._read_file(self.chunk_file(index))
                    if data is None:
                        raise ChunkDamage("missing")
                    chunk = self.decode(data, into=target).reshape(chunk_rows, chunk_cols)
                except ChunkDamage as exc:
                    exc.index = index
                    raise
                if not in_place:
                    out[r0 - rows.start:r1 - rows.start, c0 - columns.start:c1 - columns.start] = \
                        chunk[r0 - i * chunk_rows:r1 - i * chunk_rows, c0 - j * chunk_cols:c1 - j * chunk_cols]
        return out

    def write_region(self, rows: slice, columns: slice, values: np.ndarray, shape: tuple[int, int],
                     chunk_shape: tuple[int, int] | None = None) -> None:
        """``array[rows, columns] = values`` for a 2-D numeric array in a local folder whose current shape is
        ``shape`` (it grows as columns are appended). ``values`` may be a strided view (a transposed buffer):
        each chunk is assembled in a reused buffer, encoded (:meth:`encode`) and written to a temporary file
        renamed over the chunk's, so a reader sees the old chunk or the new one; chunks are encoded on
        :data:`WRITE_THREADS` threads (blosc, the checksum and the file write release the GIL), as zarr does. A
        chunk the region covers only in part is read, updated and rewritten; the padding of an edge chunk holds
        the fill value, as zarr's. ``chunk_shape``: the 2-D shape of a 1-D array's chunks, ``(rows, 1)`` (the
        same bytes in C order)."""
        chunk_shape = tuple(chunk_shape or self.chunk_shape)
        chunk_rows, chunk_cols = chunk_shape
        tasks = [(i, j) for i in range(rows.start // chunk_rows, -(-rows.stop // chunk_rows))
                 for j in range(columns.start // chunk_cols, -(-columns.stop // chunk_cols))]

        def write_chunk(index: tuple[int, int]) -> None:
            i, j = index
            top, left = i * chunk_rows, j * chunk_cols
            r0, r1 = max(rows.start, top), min(rows.stop, top + chunk_rows)
            c0, c1 = max(columns.start, left), min(columns.stop, left + chunk_cols)
            dtype = np.dtype(self.data_type)
            chunk = self._scratch("assemble", chunk_rows * chunk_cols * dtype.itemsize).view(dtype) \
                .reshape(chunk_shape)
            whole = r0 == top and r1 >= min(top + chunk_rows, shape[0]) and \
                c0 == left and c1 >= min(left + chunk_cols, shape[1])
            key = index[:len(self.chunk_shape)]  # a 1-D array's chunk i is file c/i
            old = None if whole else self.read_chunk(key)
            if old is not None:
                chunk[...] = old.reshape(chunk_shape)
            elif r1 - r0 < chunk_rows or c1 - c0 < chunk_cols:  # the padding of an edge chunk, or unwritten
                chunk.fill(self.fill_value)
            chunk[r0 - top:r1 - top, c0 - left:c1 - left] = \
                values[r0 - rows.start:r1 - rows.start, c0 - columns.start:c1 - columns.start]
            _write_atomically(self.chunk_file(key), self.encode(chunk))

        if len(tasks) == 1 or WRITE_THREADS == 1:
            for index in tasks:
                write_chunk(index)
            return
        for _ in _writer_pool().map(write_chunk, tasks):
            pass

    def encode(self, chunk: np.ndarray) -> list[np.ndarray]:
        """A full chunk's file bytes in this array's numeric codec chain, as consecutive parts (uint8 arrays;
        the checksum apart, to save copying the data to append 4 bytes)."""
        data = np.ascontiguousarray(chunk, dtype=np.dtype(self.data_type).newbyteorder(self._byte_order)) \
            .reshape(-1).view(np.uint8)
        for codec in self.codecs[1:]:  # the first is ``bytes``: the array's values in order
            name, config = codec["name"], codec.get("configuration", {})
            if name == "blosc":
                from numcodecs import blosc

                shuffle = {"noshuffle": 0, "shuffle": 1, "bitshuffle": 2}[config.get("shuffle", "shuffle")]
                data = np.frombuffer(blosc.compress(data, config.get("cname", "lz4").encode(),
                                                    int(config.get("clevel", 5)), shuffle,
                                                    int(config.get("blocksize", 0)),
                                                    typesize=int(config.get("typesize", data.itemsize))),
                                     dtype=np.uint8)
            elif name == "crc32c":
                import google_crc32c

                # a new array, not a copy of data with 4 bytes more: encode returns the parts
                return [data, np.array([google_crc32c.value(data)], dtype="<u4").view(np.uint8)]
            else:
                raise ChunkDamage(f"unreadable (codec {name!r} is not one cmdtool writes numbers with)")
        return [data]

    @property
    def _byte_order(self) -> str:
        """numpy's byte-order character of the ``bytes`` codec's ``endian``."""
        endian = next((c.get("configuration", {}).get("endian", "little") for c in self.codecs
                       if c["name"] == "bytes"), "little")
        return "<" if endian == "little" else ">"

    @property
    def _native_order(self) -> bool:
        return self._byte_order == ("<" if sys.byteorder == "little" else ">")

    def _scratch(self, name: str, size: int) -> np.ndarray:
        """A uint8 buffer of ``size`` bytes, kept per thread and grown when needed."""
        buffers = _SCRATCH.__dict__.setdefault("buffers", {})
        buffer = buffers.get(name)
        if buffer is None or len(buffer) < size:
            buffer = buffers[name] = np.empty(size, dtype=np.uint8)
        return buffer[:size]

    def _read_file(self, path) -> np.ndarray | None:
        """A local file's bytes in this thread's file buffer (a view of it), or None if it does not exist."""
        try:
            with open(path, "rb", buffering=0) as file:
                size = os.fstat(file.fileno()).st_size
                buffer = self._scratch("file", size)
                view, done = memoryview(buffer), 0
                while done < size:
                    got = file.readinto(view[done:])
                    if not got:
                        break
                    done += got
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None
        return buffer[:done]

    def read_chunk(self, index: tuple[int, ...]) -> np.ndarray | None:
        """The decoded chunk ``index``, or None if its file is missing."""
        try:
            data = self.chunk_file(index).read_bytes()
        except (FileNotFoundError, IsADirectoryError):
            return None
        return self.decode(data)


def _will_need(paths) -> None:
    """Ask the kernel to start reading these files now, all at once (``posix_fadvise(WILLNEED)``), before they are
    read one after another: a row block of a store ingested with narrow chunks is many small files in different
    places on the disk, and one read at a time waits for each. Files in the page cache cost a system call each."""
    if not hasattr(os, "posix_fadvise"):
        return
    for path in paths:
        try:
            descriptor = os.open(path, os.O_RDONLY)
        except OSError:
            continue  # a missing chunk is reported by the read that follows
        try:
            os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass
        finally:
            os.close(descriptor)


def _write_atomically(path, parts: list[np.ndarray]) -> None:
    """``parts`` into the file ``path`` through a temporary file renamed over it (as zarr's local store does)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.{uuid.uuid4().hex}.partial")
    try:
        with open(partial, "wb") as file:
            for part in parts:
                file.write(part)
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
