"""Where a store lives: a local folder (a :class:`pathlib.Path`, as always) or an fsspec URL (``s3://bucket/run.zarr``,
``gs://...``) as a :class:`RemotePath`.

:class:`RemotePath` offers the few ``pathlib`` operations the store code uses (``/``, ``name``, ``exists``,
``is_file``, ``iterdir``, ...) over an fsspec filesystem, so that the store, its results and ingest read the same
for both. fsspec and the filesystem's package (s3fs for ``s3://``) are imported only when a URL is used
(``pip install 'cmdtool[s3]'``). Credentials and endpoints come from the usual places: the AWS environment
variables / ``~/.aws`` for S3, fsspec's configuration (``FSSPEC_S3_ENDPOINT_URL``, ``~/.config/fsspec``) for any
protocol (docs/store.md, "Stores on shared or object storage").
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import CmdtoolError, UsageError, first_line

_URL = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://(.*)$")


def is_url(path) -> bool:
    """Whether ``path`` is a URL of another filesystem than the local one (``file://`` is local)."""
    if isinstance(path, RemotePath):
        return True
    match = _URL.match(str(path)) if isinstance(path, str) else None
    return bool(match) and match.group(1).lower() not in ("file", "local")


_NO_CREDENTIALS = ("NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError",
                   "NoAuthTokenError", "DefaultCredentialsError", "RefreshError")
_DENIED_CODES = ("AccessDenied", "403", "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch",
                 "AllAccessDisabled", "ExpiredToken", "InvalidToken")


def storage_error(exc: BaseException, where: str = "") -> CmdtoolError | None:
    """The one-line error for a failure of object storage that the user must fix (no credentials, access
    denied, no such bucket), or None for any other exception. Recognised by name and code, so that neither
    botocore nor google-auth need be imported: missing credentials and a missing bucket are misuse (exit 2),
    a refused access a failure (exit 1)."""
    at = f"{where}: " if where else ""
    chain, seen = [], exc
    while seen is not None and len(chain) < 5:  # s3fs re-raises botocore's errors as OSErrors "from" them
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    for error in chain:
        name = type(error).__name__
        if name in _NO_CREDENTIALS:
            return UsageError(f"{at}no credentials for object storage ({first_line(error)}); set "
                              f"AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE (S3), or your provider's "
                              f"usual credentials, and try again")
        code = str(getattr(error, "response", {}).get("Error", {}).get("Code", "")) \
            if name == "ClientError" else ""
        if code in ("NoSuchBucket",):
            return UsageError(f"{at}no such bucket ({first_line(error)})")
        # s3fs raises a 403 as a PermissionError without a file name; a local one always names its file
        if (isinstance(error, PermissionError) and error.filename is None) or code in _DENIED_CODES:
            return CmdtoolError(f"{at}access denied by the object store ({first_line(error)}); check the "
                                f"credentials and the bucket's policy")
        if isinstance(error, FileNotFoundError) and "bucket" in str(error).lower():
            return UsageError(f"{at}no such bucket ({first_line(error)})")
    return None


def default_store_path() -> "Path | RemotePath":
    """``$CMDTOOL_STORE``, else ./cmdtool.zarr."""
    from . import format as fmt

    return store_location(os.environ.get(fmt.STORE_ENV_VAR) or fmt.DEFAULT_STORE)


def store_location(path: str | os.PathLike) -> "Path | RemotePath":
    """A plain path or ``file://`` URL as a :class:`Path`; any other fsspec URL as a :class:`RemotePath`."""
    if isinstance(path, (Path, RemotePath)):
        return path
    text = os.fspath(path)
    match = _URL.match(text)
    if not match:
        return Path(text)
    protocol, rest = match.group(1).lower(), match.group(2)
    if protocol in ("file", "local"):
        return Path("/" + rest.lstrip("/"))
    return RemotePath(protocol, rest.rstrip("/"))


def filesystem(protocol: str):
    """The fsspec filesystem of ``protocol`` (one cached instance per protocol and configuration)."""
    try:
        import fsspec
    except ImportError:
        raise UsageError(f"{protocol}:// paths need fsspec: pip install 'cmdtool[s3]'") from None
    try:
        return fsspec.filesystem(protocol)
    except (ImportError, ValueError) as exc:
        hint = "pip install 'cmdtool[s3]'" if protocol in ("s3", "s3a") else f"install fsspec's {protocol} backend"
        raise UsageError(f"cannot open {protocol}:// paths ({exc}); {hint}") from None


class RemotePath:
    """A path on an fsspec filesystem, with the pathlib operations the store uses. Object stores have no real
    folders: a "folder" exists when some key lies under it, and :meth:`mkdir` does nothing."""

    __slots__ = ("protocol", "key")

    def __init__(self, protocol: str, key: str):
        self.protocol, self.key = protocol, key.rstrip("/")

    @property
    def fs(self):
        return filesystem(self.protocol)

    @property
    def url(self) -> str:
        return f"{self.protocol}://{self.key}"

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"RemotePath({self.url!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, RemotePath) and (self.protocol, self.key) == (other.protocol, other.key)

    def __hash__(self) -> int:
        return hash((self.protocol, self.key))

    def __truediv__(self, part) -> "RemotePath":
        return RemotePath(self.protocol, f"{self.key}/{str(part).strip('/')}")

    @property
    def name(self) -> str:
        return self.key.rsplit("/", 1)[-1]

    @property
    def parent(self) -> "RemotePath":
        return RemotePath(self.protocol, self.key.rsplit("/", 1)[0]) if "/" in self.key else self

    @property
    def suffix(self) -> str:
        return "." + self.name.rsplit(".", 1)[1] if "." in self.name else ""

    def resolve(self) -> "RemotePath":
        return self

    def _refresh(self) -> None:
        self.fs.invalidate_cache(self.key)

    def exists(self) -> bool:
        self._refresh()
        return bool(self.fs.exists(self.key))

    def is_file(self) -> bool:
        self._refresh()
        return bool(self.fs.isfile(self.key))

    def is_dir(self) -> bool:
        self._refresh()
        return bool(self.fs.isdir(self.key))

    def iterdir(self):
        self._refresh()
        try:
            entries = self.fs.ls(self.key, detail=False)
        except FileNotFoundError:
            return iter(())
        return iter(RemotePath(self.protocol, e) for e in entries if e.rstrip("/") != self.key)

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        """Object stores create "folders" with the first key under them; nothing to do."""

    def stat(self):
        info = self.fs.info(self.key)
        return info

    def read_bytes(self) -> bytes:
        return self.fs.cat_file(self.key)

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def open(self, mode: str = "rb", **kwargs):
        return self.fs.open(self.key, mode, **kwargs)

    def remove_tree(self) -> None:
        try:
            self.fs.rm(self.key, recursive=True)
        except FileNotFoundError:
            pass
        self._refresh()

    def size_of_tree(self) -> int:
        try:
            return int(self.fs.du(self.key, total=True))
        except FileNotFoundError:
            return 0
