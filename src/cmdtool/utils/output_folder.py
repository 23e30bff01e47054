"""The one rule for every folder or file cmdtool writes (report, export, landscape, reconstruct).

A user's files are never deleted or overwritten:

- A folder is cmdtool's only when cmdtool marked it: the marker file :data:`MARKER` lists every file cmdtool
  wrote there. Only those files are ever replaced or removed; a file of the same name that the marker does not
  list is the user's, and is refused (nothing is written) unless ``--force``.
- Any other non-empty folder (or a user's file of the same name in a marked one) is refused unless the user
  passes ``--force``; even then only files of the names cmdtool writes are replaced, nothing else is touched.
- Never inside or equal to the trajectory store, a checkpoint folder the store was ingested from, or the folder
  that holds such checkpoints (a later ``cmdtool ingest`` of that folder would take the output for checkpoints);
  ``--force`` does not lift this.

Writing is staged: files go into a hidden staging folder and are published when the work is done (a new folder is
renamed into place whole; into an existing one, file by file with ``os.replace``, entry points such as
``index.html`` last). A killed run therefore leaves the previous complete output or none, never a half-written
file, and a failed run leaves the folder as it was. Written files get the usual permissions (``0666`` less the
umask), not the ``0600`` of a temporary file.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from ..errors import UsageError
from .units import now_iso

MARKER = ".cmdtool-output.json"
STAGING_PREFIX = ".cmdtool-partial-"


def current_umask() -> int:
    """The process umask (read without changing it where /proc allows; else set and restored at once)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def give_normal_permissions(path: str | os.PathLike) -> None:
    """``0666`` less the umask, as ``open()`` would have made it (temporary files are created ``0600``)."""
    os.chmod(path, 0o666 & ~current_umask())


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def protected_folders(store) -> dict[Path, str]:
    """Folders cmdtool never writes into, with the reason: the store and where its checkpoints came from."""
    protected = {}
    if isinstance(store.path, Path):  # a store on object storage (s3://) cannot hold a local output
        protected[store.path.resolve()] = f"the trajectory store {store.path}: cmdtool never writes output there"
    source_note = "cmdtool never writes there (a later `cmdtool ingest` would take its output for checkpoints)"
    for record in store.time_axis:
        source = Path(record.source)
        if not source.is_absolute():  # e.g. "<array>" for a store built from memory
            continue
        folder = Path(record.extra["folder"]) if record.extra.get("folder") else None
        if folder is None and source.is_dir():  # sharded folders ingested before folders were recorded
            folder = source
        if folder is not None:  # a checkpoint folder (HF checkpoint-N/, global_stepN/, a DCP folder, shards)
            protected.setdefault(folder, f"{folder}, the checkpoint folder of epoch {record.label}: {source_note}")
        holder = (folder or source).parent
        protected.setdefault(holder, f"{holder}, the folder of the store's source checkpoints: {source_note}")
    return protected


def refuse_protected(path: Path, store, option: str = "--out") -> None:
    """Raise (exit 2) when ``path`` is the store, a source checkpoint, or inside either's folder."""
    if store is None:
        return
    resolved = path.resolve()
    for record in store.time_axis:
        if Path(record.source).is_absolute() and resolved == Path(record.source):
            raise UsageError(f"{option} {path} is the source checkpoint of epoch {record.label}: cmdtool never "
                             f"overwrites a checkpoint it did not write; choose another path")
    # the innermost protected folder gives the most precise reason
    for folder, why in sorted(protected_folders(store).items(), key=lambda item: -len(item[0].parts)):
        if _inside(resolved, folder):
            raise UsageError(f"{option} {path} is inside {why}; choose a folder outside it (--force does not "
                             f"lift this)")


def read_marker(folder: Path) -> dict | None:
    """The marker of a folder cmdtool wrote (None: not cmdtool's). Listed names are kept to plain relative
    paths inside the folder, so a doctored marker cannot make cmdtool touch anything outside it."""
    try:
        data = json.loads((folder / MARKER).read_text())
        files = [str(f) for f in data["files"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    data["files"] = [f for f in files if not Path(f).is_absolute() and ".." not in Path(f).parts]
    return data


def _stamp(path: Path) -> list[int] | None:
    try:
        info = path.stat()
    except OSError:
        return None
    return [info.st_size, info.st_mtime_ns]


def _unchanged(folder: Path, name: str, marker: dict | None) -> bool:
    """Whether ``name`` is a file cmdtool wrote in ``folder`` and nobody changed since (size and mtime as
    recorded): only such a file may be replaced or removed without --force."""
    if not marker or name not in marker["files"]:
        return False
    recorded = (marker.get("stamps") or {}).get(name)
    return recorded is None or recorded == _stamp(folder / name)


def file_is_ours(path: Path) -> bool:
    """Whether cmdtool wrote ``path`` and it is unchanged since (the marker of its folder lists it)."""
    return _unchanged(path.parent, path.name, read_marker(path.parent))


def write_atomically(path: str | os.PathLike, write) -> Path:
    """Create or replace the file ``path`` by ``write(temporary_path)``: the file is written under a temporary
    name in the same folder and renamed, so a crash leaves no partial file; it gets the usual permissions."""
    import tempfile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        write(temporary)
        give_normal_permissions(temporary)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def check_output_file(path: str | os.PathLike, store=None, force: bool = False, option: str = "--out") -> Path:
    """A single output file (e.g. ``reconstruct --out model.pt``): never a source checkpoint or inside the store
    or a source folder; an existing file only when cmdtool wrote it (its folder's marker lists it) or with
    ``force``."""
    path = Path(path)
    refuse_protected(path, store, option)
    if path.is_dir():
        raise UsageError(f"{option} {path} is a folder; give a file name")
    if path.exists() and not force and not file_is_ours(path):
        raise UsageError(f"{option} {path} exists and cmdtool did not write it; choose another name or pass "
                         f"--force to replace it")
    return path


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _owned_leftover(folder: Path) -> bool:
    """A staging folder of a cmdtool run that died (its marker says so and its process is gone)."""
    marker = read_marker(folder)
    return bool(marker) and marker.get("state") == "partial" and not _pid_alive(int(marker.get("pid", -1)))


class OutputFolder:
    """Claim ``path`` for ``command``'s output, following the module's rule; use as a context manager::

        with OutputFolder(out, "report", force=force, store=store, replace=True) as staging:
            ... write files under ``staging`` ...
        # published under ``out`` here; on an exception nothing changes

    ``replace=True`` (a report): files of the previous run that this run did not write again are removed (only
    files the marker lists). ``replace=False`` (export, landscape, reconstruct): earlier files stay.
    ``last``: names published after every other file (entry points such as ``index.html``).
    """

    def __init__(self, path: str | os.PathLike, command: str, *, force: bool = False, store=None,
                 replace: bool = False, last: tuple[str, ...] = (), option: str = "--out"):
        self.path = Path(path)
        self.command, self.force, self.replace, self.last, self.option = command, force, replace, last, option
        self.files: list[str] = []  # written by this run, relative to the folder
        refuse_protected(self.path, store, option)
        if self.path.exists() and not self.path.is_dir():
            raise UsageError(f"{option} {self.path} is a file; give a folder")
        self.previous = read_marker(self.path) if self.path.is_dir() else None
        # a folder cmdtool marked is accepted as is (the user's files there stay untouched); any other
        # non-empty folder only with --force
        foreign = [] if self.previous else self._foreign_entries()
        if foreign and not force:
            shown = ", ".join(foreign[:4]) + (", ..." if len(foreign) > 4 else "")
            raise UsageError(f"{option} {self.path} already holds files cmdtool did not write ({shown}); choose a "
                             f"new or empty folder, or pass --force to write into it (files of the same names are "
                             f"replaced, nothing else is touched)")
        self.staging: Path | None = None

    def _foreign_entries(self) -> list[str]:
        if not self.path.is_dir():
            return []
        return sorted(p.name for p in self.path.iterdir() if not p.name.startswith(STAGING_PREFIX))

    # ------------------------------------------------------------------ staging
    def __enter__(self) -> Path:
        # Staged beside the folder (so a rename publishes it) and named after it; leftovers of killed runs are
        # cleared first, only when their marker says they are cmdtool's and their process is gone.
        parent = self.path.resolve().parent
        parent.mkdir(parents=True, exist_ok=True)
        for leftover in parent.glob(f"{STAGING_PREFIX}*"):
            if leftover.is_dir() and _owned_leftover(leftover):
                shutil.rmtree(leftover, ignore_errors=True)
        self.staging = parent / f"{STAGING_PREFIX}{self.path.resolve().name}-{os.getpid()}"
        if self.staging.exists():
            shutil.rmtree(self.staging)
        self.staging.mkdir()
        self._write_marker(self.staging, [], state="partial")
        return self.staging

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            if exc_type is None:
                self._publish()
        finally:
            if self.staging is not None and self.staging.exists():
                shutil.rmtree(self.staging, ignore_errors=True)
        return False

    def _write_marker(self, folder: Path, files: list[str], state: str, stamps: dict | None = None) -> None:
        data = {"written_by": "cmdtool", "command": self.command, "state": state, "pid": os.getpid(),
                "updated_at": now_iso(), "files": sorted(set(files)),
                "stamps": {name: _stamp(folder / name) for name in sorted(set(files))} if stamps is None else stamps,
                "note": "cmdtool replaces or removes only the files listed here, and only while unchanged "
                        "(size, mtime); every other file is yours"}
        temporary = folder / f"{MARKER}.tmp"
        temporary.write_text(json.dumps(data, indent=1) + "\n")
        os.replace(temporary, folder / MARKER)

    def _staged_files(self) -> list[str]:
        names = [str(p.relative_to(self.staging)) for p in sorted(self.staging.rglob("*"))
                 if p.is_file() and p.name != MARKER]
        rank = {name: i for i, name in enumerate(self.last)}
        return sorted(names, key=lambda n: (rank.get(n, -1), n))

    def _publish(self) -> None:
        self.files = self._staged_files()
        for name in self.files:
            os.chmod(self.staging / name, 0o666 & ~current_umask())
        if not self.path.exists():
            self._write_marker(self.staging, self.files, state="complete")
            self.staging.rename(self.path)
            self.staging = None
            return
        # ours: listed by the marker and unchanged since; a user's file (or one the user edited) of one of our
        # names is never replaced without --force
        previous = {name for name in (self.previous["files"] if self.previous else [])
                    if _unchanged(self.path, name, self.previous)}
        for name in self.files:
            target = self.path / name
            if target.is_dir() or (target.exists() and name not in previous and not self.force):
                raise UsageError(f"{self.option} {self.path}: {name} is there and cmdtool did not write it (or it "
                                 f"changed since); nothing was written (choose another folder, or pass --force to "
                                 f"replace it)")
        old_stamps = {name: _stamp(self.path / name) for name in previous}
        # the marker first lists old and new files: a kill mid-way leaves only listed (ours) files behind
        self._write_marker(self.path, sorted(previous | set(self.files)), state="complete",
                           stamps={**old_stamps, **{n: _stamp(self.staging / n) for n in self.files}})
        for name in self.files:
            target = self.path / name
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(self.staging / name, target)
        kept = set(self.files) if self.replace else previous | set(self.files)
        if self.replace:
            for stale in sorted(previous - kept):
                target = self.path / stale
                if target.is_file() and not target.is_symlink():
                    target.unlink()
        self._write_marker(self.path, sorted(kept), state="complete")
