"""Checkpoints on object storage (``s3://``, ``gs://``, any fsspec URL) as ingest inputs, in bounded local disk.

The readers memory-map local files, so a checkpoint's bytes must be on local disk while it is read. The remote
tree is listed once and mirrored as a local *skeleton* in a staging folder: small metadata files (``*.json``,
DCP's ``.metadata``) downloaded for real, checkpoint files as sparse placeholders of the remote size with the
remote mtime (no disk blocks). :func:`~cmdtool.ingestion.discover.discover` then runs on the skeleton unchanged
(same layouts, labels, notes), and the classify step compares the recorded size and mtime without downloading.

Each checkpoint's files are downloaded just before it is read (the next one downloads while the current one is
converted) and turned back into placeholders once read and hashed, so the staging folder holds at most two
checkpoints. The staging folder is removed when the ingest ends, however it ends, except by SIGKILL (or a power
cut): its name records the owner (host, pid, the process's start time), and the next ingest that stages in the
same folder removes the staging folders of this host whose owner process is gone (:func:`remove_stale_staging`).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from ..errors import CheckpointError, CmdtoolError, UsageError
from ..store.location import RemotePath, filesystem, storage_error
from .formats import DCP_METADATA, CheckpointSource

# Files discovery reads (shard indexes, trainer_state.json, DCP metadata): downloaded while listing.
METADATA_SUFFIXES = (".json", DCP_METADATA)
_FOLDED_URL = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]+):/+(.*)$")
STAGING_PREFIX = ".cmdtool-staging-"
# .cmdtool-staging-<host>-<pid>-<start time of the process, 0 where unknown>-<tempfile's random suffix>
_STAGING_NAME = re.compile(r"^\.cmdtool-staging-(?P<host>[A-Za-z0-9._]+)-(?P<pid>\d+)-(?P<started>\d+)-[A-Za-z0-9_]+$")


def _host() -> str:
    """This host's name as it goes into a staging folder's name (no "-": the fields stay apart)."""
    return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "host"


def _process_started(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks since boot, ``/proc/<pid>/stat``), to tell a reused pid from
    the process that had it; None where there is no ``/proc`` or no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return int(stat.read().rsplit(b")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _owner_alive(pid: int, started: int) -> bool:
    """Whether the process that made a staging folder on this host still runs (True when it cannot be told)."""
    if os.name != "posix":
        return True
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except OSError:  # another user's process: it exists
        pass
    now = _process_started(pid)
    return not (started and now is not None and now != started)  # the pid was reused by another process


def staging_folder_prefix() -> str:
    """The name prefix of this process's staging folders (owner recorded in the name, see the module)."""
    return f"{STAGING_PREFIX}{_host()}-{os.getpid()}-{_process_started(os.getpid()) or 0}-"


def remove_stale_staging(parent: Path) -> list[Path]:
    """Remove the staging folders in ``parent`` that an ingest of this host left when it was killed: named by
    cmdtool, owned by this user, and whose owner process no longer exists. Others (another host's, a running
    ingest's, a name cmdtool does not write) are left alone. Returns what was removed."""
    removed = []
    host = _host()
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return removed
    for entry in entries:
        match = _STAGING_NAME.match(entry.name)
        if not match or match.group("host") != host:
            continue
        try:
            if not entry.is_dir(follow_symlinks=False) or entry.stat(follow_symlinks=False).st_uid != os.getuid():
                continue
        except OSError:
            continue
        if not _owner_alive(int(match.group("pid")), int(match.group("started"))):
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(Path(entry.path))
    return removed


def checkpoint_url(path) -> str | None:
    """The URL ``path`` names when it is one of another filesystem than the local one, else None. A ``Path``
    folds ``s3://b/k`` to ``s3:/b/k`` (the command line's arguments are Paths): that is unfolded."""
    if isinstance(path, RemotePath):
        return path.url
    text = os.fspath(path)
    match = _FOLDED_URL.match(text)
    if not match or match.group(1).lower() in ("file", "local") or Path(text).exists():
        return None
    return f"{match.group(1).lower()}://{match.group(2).rstrip('/')}"


def local_checkpoint_path(path):
    """``file://`` URLs as local paths; anything else unchanged."""
    text = os.fspath(path) if not isinstance(path, RemotePath) else ""
    match = _FOLDED_URL.match(text)
    if match and match.group(1).lower() in ("file", "local") and not Path(text).exists():
        return Path("/" + match.group(2).lstrip("/"))
    return path


@dataclass(frozen=True)
class RemoteFile:
    protocol: str
    key: str
    size: int
    mtime: float

    @property
    def url(self) -> str:
        return f"{self.protocol}://{self.key}"


def _mtime_of(info: dict) -> float:
    """Modification time of a listing entry (S3 ``LastModified``, GCS ``updated``, ...) in seconds; 0 when the
    filesystem gives none (then size alone tells an unchanged file, and the digest decides)."""
    for key in ("LastModified", "last_modified", "mtime", "updated", "modified", "created"):
        value = info.get(key)
        if value is None:
            continue
        if isinstance(value, datetime):
            return value.timestamp()
        if isinstance(value, (int, float)):
            return float(value)
        with contextlib.suppress(ValueError):
            return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()
    return 0.0


class CheckpointStaging:
    """The checkpoint paths of one ingest with their URLs mirrored as local skeletons (a context manager).

    ``paths``: what discovery reads (local paths unchanged, URLs replaced by their skeletons). :meth:`each_local`
    yields sources with their files downloaded, one ahead; local sources pass through untouched."""

    def __init__(self, paths, staging_parent: Path | None = None):
        self._given = list(paths)
        self._parent = staging_parent
        self.root: Path | None = None
        self.files: dict[Path, RemoteFile] = {}       # skeleton file -> what it stands for
        self._roots: list[tuple[Path, str]] = []      # (skeleton root, URL it mirrors)
        self._downloaded: set[Path] = set()
        self.paths: list = []

    @property
    def remote(self) -> bool:
        return bool(self._roots)

    def __enter__(self) -> "CheckpointStaging":
        try:
            for raw in self._given:
                url = checkpoint_url(raw)
                self.paths.append(self._mirror(url) if url else local_checkpoint_path(raw))
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None

    # ---------------------------------------------------------------------------------------------- listing
    def _mirror(self, url: str) -> Path:
        """List ``url`` once and build its skeleton; returns the local path standing for it."""
        protocol, key = url.split("://", 1)
        fs = filesystem(protocol)
        try:
            fs.invalidate_cache()
            info = fs.info(key)
            entries = {key: info} if info.get("type") != "directory" else fs.find(key, detail=True)
        except FileNotFoundError:
            bucket, bucket_exists = key.split("/", 1)[0], True
            with contextlib.suppress(Exception):  # the finer message is a nicety; the error stands anyway
                bucket_exists = fs.exists(bucket)
            if not bucket_exists:
                raise UsageError(f"{url}: bucket {protocol}://{bucket} does not exist") from None
            raise UsageError(f"{url}: no such file or folder") from None
        except Exception as exc:  # noqa: BLE001 - credentials, permissions: one line
            error = storage_error(exc, url)
            if error is None:
                raise
            raise error from None
        if self.root is None:
            parent = self._parent if self._parent is not None and self._parent.is_dir() else None
            remove_stale_staging(parent or Path(tempfile.gettempdir()))
            self.root = Path(tempfile.mkdtemp(prefix=staging_folder_prefix(), dir=parent))
        name = key.rstrip("/").rsplit("/", 1)[-1]
        local_root = self.root / str(len(self._roots)) / name
        self._roots.append((local_root, url))
        for entry_key, entry in sorted(entries.items()):
            if entry.get("type") == "directory" or entry_key.endswith("/"):  # folder marker objects
                continue
            relative = entry_key[len(key):].lstrip("/")
            local = local_root / relative if relative else local_root
            local.parent.mkdir(parents=True, exist_ok=True)
            remote = RemoteFile(protocol, entry_key, int(entry.get("size") or entry.get("Size") or 0),
                                _mtime_of(entry))
            self.files[local] = remote
            if local.name.endswith(METADATA_SUFFIXES):
                self._download(local, remote)
            else:
                self._placeholder(local, remote)
        if not self.files or not any(p == local_root or local_root in p.parents for p in self.files):
            raise UsageError(f"{url}: no such file or folder")
        return local_root

    @staticmethod
    def _placeholder(local: Path, remote: RemoteFile) -> None:
        """A sparse file of the remote size and mtime: stat() tells what the remote file is, no disk used."""
        with open(local, "wb") as handle:
            handle.truncate(remote.size)
        os.utime(local, (remote.mtime, remote.mtime))

    def _download(self, local: Path, remote: RemoteFile) -> None:
        partial = local.with_name(local.name + ".cmdtool-part")
        try:
            filesystem(remote.protocol).get_file(remote.key, str(partial))
        except Exception as exc:  # noqa: BLE001
            partial.unlink(missing_ok=True)
            error = storage_error(exc, remote.url)
            if error is None:
                raise
            raise error from None
        if partial.stat().st_size != remote.size:
            partial.unlink(missing_ok=True)
            raise CheckpointError(f"{remote.url} changed while being ingested (size {remote.size} when listed); "
                                  f"run the command again")
        os.replace(partial, local)
        os.utime(local, (remote.mtime, remote.mtime))  # as listed: the time record compares it on the next run

    # ------------------------------------------------------------------------------------------- sources
    def is_remote(self, source: CheckpointSource) -> bool:
        return any(f in self.files for f in source.files)

    def url_of(self, path: Path) -> str | None:
        """The URL a skeleton path stands for (a file or a folder), else None."""
        for local_root, url in self._roots:
            if path == local_root:
                return url
            if local_root in path.parents:
                return f"{url}/{path.relative_to(local_root).as_posix()}"
        return None

    def local_of(self, url: str) -> Path | None:
        for local_root, root_url in self._roots:
            if url.rstrip("/") == root_url:
                return local_root
            if url.startswith(root_url + "/"):
                return local_root / url[len(root_url) + 1:].rstrip("/")
        return None

    def name_origins(self, discovery) -> None:
        """Set each remote source's ``origin`` (and ``folder_origin``): the URLs its time record names; the
        discovery's notes name URLs too."""
        discovery.skipped = [self.in_urls(note) for note in discovery.skipped]
        for source in discovery.sources:
            source.origin = self.url_of(source.path) or ""
            source.folder_origin = (self.url_of(source.folder) or "") if source.folder is not None else ""

    def fetch(self, source: CheckpointSource) -> None:
        """Download the source's files not yet downloaded (no-op for a local source)."""
        for local in source.files:
            remote = self.files.get(local)
            if remote is not None and local not in self._downloaded and not local.name.endswith(METADATA_SUFFIXES):
                self._download(local, remote)
                self._downloaded.add(local)

    def release(self, source: CheckpointSource) -> None:
        """Its files back to placeholders: their disk space is freed, stat() still tells the remote file."""
        for local in source.files:
            if local in self._downloaded:
                self._downloaded.discard(local)
                self._placeholder(local, self.files[local])

    @contextlib.contextmanager
    def local(self, source: CheckpointSource, keep: bool = False):
        """The source's files on local disk inside the block; released afterwards unless ``keep``."""
        self.fetch(source)
        try:
            yield source
        finally:
            if not keep:
                self.release(source)

    def each_local(self, sources: list[CheckpointSource]):
        """Yield each source with its files on local disk, downloading the next one meanwhile; a source is
        released when the next is asked for (its values are in the buffer and its digest taken by then)."""
        if not any(self.is_remote(s) for s in sources):
            yield from sources
            return
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="cmdtool-download") as downloader:
            ahead = downloader.submit(self.fetch, sources[0]) if sources else None
            try:
                for position, source in enumerate(sources):
                    ahead.result()
                    ahead = downloader.submit(self.fetch, sources[position + 1]) \
                        if position + 1 < len(sources) else None
                    try:
                        yield source
                    finally:
                        self.release(source)
            finally:
                if ahead is not None:
                    ahead.cancel()
                    with contextlib.suppress(BaseException):
                        ahead.result()  # the download in flight ends before the folder is removed

    def translate(self, exc: CmdtoolError) -> CmdtoolError:
        """The error's message with skeleton paths written as the URLs they stand for."""
        if self._roots and exc.args and isinstance(exc.args[0], str):
            exc.args = (self.in_urls(exc.args[0]),) + exc.args[1:]
        return exc

    def in_urls(self, text: str) -> str:
        """``text`` with skeleton paths written as the URLs they stand for."""
        for local_root, url in self._roots:
            text = text.replace(str(local_root), url)
        return text

    def translate_labels(self, set_labels: dict | None) -> dict | None:
        """``--set-label URL=N`` keys as the skeleton paths discovery sees."""
        if not set_labels:
            return set_labels
        out = {}
        for key, label in set_labels.items():
            url = checkpoint_url(key)
            out[(self.local_of(url) or key) if url else key] = label
        return out


__all__ = ["CheckpointStaging", "RemoteFile", "checkpoint_url", "local_checkpoint_path", "remove_stale_staging"]
