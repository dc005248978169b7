"""A local directory as the bucket, over libcloud's LOCAL driver.

libcloud's driver walks the container to list it; everything else is done here
on the filesystem, because the driver's own paths are unsafe for large
checkpoints: its stream upload writes straight to the final name (a crash
leaves a torn object), and its ranged read loads the whole file into memory.
Here every write goes to a temporary file on the same filesystem
(``<base>/.<container>.uploads/``), is fsynced, and is renamed into place (the
folder fsynced too); reads seek and stream.

A multipart upload is one staged file that each part is written into at its offset
(and flushed to disk), plus a ``.parts`` list beside it naming each part written
(index, size, and its CRC64NVME or the first 128 bits of its sha256 as its ETag), from which an
interrupted upload is resumed (``list_parts``).

The driver keeps no metadata, so the store records digests in digest records
(``<name>.ckpt-digest`` objects).

Conditional writes (commit pointers): ``put_if`` holds an exclusive ``flock`` on
``<base>/.<container>.lock`` while it compares the object's version (the sha256 of
its bytes) with the one expected and renames the new bytes into place, so two
processes on one host (or on a filesystem with working ``flock``) cannot both
replace the same version. Readers need no lock: the rename is atomic.
It needs ``fasteners`` and writes its lock files to TMPDIR.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import uuid
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path

from uploader.errors import (
    ConfigError,
    ContainerNotFoundError,
    ObjectNotFoundError,
    PreconditionFailedError,
)
from uploader.transfer.backends.base import Backend, HeldPart, ObjectInfo, PartToken
from uploader.transfer.files import fsync_dir
from uploader.transfer.settings import StoreSettings

__all__ = ["LocalBackend"]


class LocalBackend(Backend):
    """Objects as files under one directory (the container); multipart parts are
    written in place into one staged file, committed by a rename."""

    multipart = True
    keeps_metadata = False
    resumable = True
    min_part_size = 64 << 10
    max_part_size = 5 << 30
    max_parts = 10_000
    conditional = True
    enforces_conditions = True

    def __init__(self, settings: StoreSettings) -> None:
        from libcloud.storage.drivers.local import LocalStorageDriver

        root = Path(settings.container)
        if root == root.parent:
            raise ConfigError(
                "the local container cannot be the filesystem root; "
                "name a directory such as file:///data/bucket"
            )
        self.base = root.parent
        self.container_name = root.name
        self.root = root
        self._driver_cls = LocalStorageDriver
        self._driver: LocalStorageDriver | None = None
        self.staging = self.base / f".{self.container_name}.uploads"

    # libcloud's driver insists that the base directory exists when it is built.
    def _drv(self):  # type: ignore[no-untyped-def]
        if self._driver is None:
            if not self.base.is_dir():
                raise ContainerNotFoundError(
                    f"the directory {self.base} that holds local container {self.root} does not "
                    "exist; create it (mkdir -p) or pass --create-container"
                )
            self._driver = self._driver_cls(str(self.base))
        return self._driver

    def check_container(self, create: bool = False) -> None:
        if self.root.is_dir():
            return
        if not create:
            raise ContainerNotFoundError(
                f"local container {self.root} does not exist; create it with "
                f"'mkdir -p {self.root}' or pass --create-container (create_container=True)"
            )
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, name: str) -> Path:
        path = (self.root / name).resolve()
        root = self.root.resolve()
        if root not in path.parents:
            raise ConfigError(f"object name {name!r} leaves the container; use a relative path")
        return path

    def _require_root(self) -> None:
        if not self.root.is_dir():
            raise ContainerNotFoundError(
                f"local container {self.root} does not exist; create it or pass --create-container"
            )

    def _staging_file(self) -> Path:
        self.staging.mkdir(parents=True, exist_ok=True)
        return self.staging / uuid.uuid4().hex

    def _commit(self, tmp: Path, name: str) -> None:
        dest = self._path(name)
        root = self.root.resolve()
        # Folders are made one by one below the container, never the container itself:
        # a container deleted during an upload is reported, not silently re-created.
        folder = root
        try:
            for part in dest.parent.relative_to(root).parts:
                folder = folder / part
                with contextlib.suppress(FileExistsError):
                    folder.mkdir()
            os.replace(tmp, dest)
        except FileNotFoundError:
            if tmp.exists():
                self._require_root()
            raise
        fsync_dir(dest.parent)

    def put_bytes(
        self,
        name: str,
        data: bytes,
        metadata: Mapping[str, str],
        sha256: bytes | None,
        crc64nvme: int | None = None,
    ) -> None:
        self._require_root()
        tmp = self._staging_file()
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            self._commit(tmp, name)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()

    # -- conditional writes ------------------------------------------------------------
    @staticmethod
    def _version(data: bytes) -> str:
        return "sha256:" + hashlib.sha256(data).hexdigest()

    def get_versioned(self, name: str, limit: int | None = None) -> tuple[bytes, str | None]:
        data = b"".join(self.read_range(name, 0, limit))
        return data, self._version(data)

    def put_if(
        self,
        name: str,
        data: bytes,
        metadata: Mapping[str, str],
        sha256: bytes,
        expected: str | None,
    ) -> str | None:
        self._require_root()
        fd = os.open(self.base / f".{self.container_name}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                current: str | None = self.get_versioned(name)[1]
            except ObjectNotFoundError:
                current = None
            if current != expected:
                raise PreconditionFailedError(
                    f"upload {name}: another writer changed it since it was read "
                    f"({'it exists' if expected is None else 'version mismatch'}); "
                    "read it again and merge"
                )
            self.put_bytes(name, data, metadata, sha256)
        finally:
            os.close(fd)  # releases the lock
        return self._version(data)

    def begin(self, name: str, metadata: Mapping[str, str], checksum: str | None = None) -> str:
        self._require_root()
        self._path(name)
        tmp = self._staging_file()
        tmp.touch()
        # Remember which object the staged file is for, so stale-upload recovery can
        # abort only the uploads under its own prefix.
        tmp.with_suffix(".name").write_text(name)
        return tmp.name

    def put_part(
        self,
        name: str,
        upload_id: str,
        index: int,
        offset: int,
        data: memoryview,
        sha256: bytes | None,
        crc64nvme: int | None = None,
    ) -> PartToken:
        staged = self.staging / upload_id
        try:
            fd = os.open(staged, os.O_WRONLY)
        except FileNotFoundError:
            raise ObjectNotFoundError(
                f"upload {upload_id} of {name!r} is gone from {self.staging}"
            ) from None
        try:
            written = 0
            while written < len(data):
                written += os.pwrite(fd, data[written:], offset + written)
            os.fdatasync(fd)  # the part is on disk before it is listed as held
        finally:
            os.close(fd)
        if sha256 is not None:
            etag = sha256[:16].hex()
        elif crc64nvme is not None:
            etag = f"crc64nvme-{crc64nvme:016x}"
        else:
            etag = hashlib.sha256(data).digest()[:16].hex()
        fd = os.open(staged.with_suffix(".parts"), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, f"{index} {len(data)} {etag}\n".encode())
        finally:
            os.close(fd)
        return etag

    def list_parts(self, name: str, upload_id: str) -> dict[int, HeldPart] | None:
        staged = self.staging / upload_id
        if not staged.exists():
            return None
        try:
            lines = staged.with_suffix(".parts").read_text().splitlines()
        except FileNotFoundError:
            return {}
        held: dict[int, HeldPart] = {}
        for line in lines:
            # A line torn by a crash names a wrong size or ETag: that part is sent again.
            fields = line.split()
            if len(fields) == 3 and fields[0].isdigit() and fields[1].isdigit():
                held[int(fields[0])] = HeldPart(int(fields[1]), fields[2])
        return held

    def complete(
        self,
        name: str,
        upload_id: str,
        tokens: list[PartToken],
        part_crcs: list[int] | None = None,
        crc64nvme: int | None = None,
    ) -> None:
        tmp = self.staging / upload_id
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        self._commit(tmp, name)
        for suffix in (".name", ".parts"):
            with contextlib.suppress(FileNotFoundError):
                tmp.with_suffix(suffix).unlink()

    def abort(self, name: str, upload_id: str) -> None:
        staged = self.staging / upload_id
        for path in (staged, staged.with_suffix(".name"), staged.with_suffix(".parts")):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def list_uploads(self, prefix: str) -> list[tuple[str, str, float]]:
        if not self.staging.is_dir():
            return []
        uploads = []
        for p in self.staging.iterdir():
            if p.suffix in (".name", ".parts"):
                continue
            try:
                name = p.with_suffix(".name").read_text()
            except FileNotFoundError:
                name = ""  # a single-request write that never finished: no object name
            if name.startswith(prefix) and (name or not prefix):
                with contextlib.suppress(FileNotFoundError):
                    uploads.append((name, p.name, p.stat().st_mtime))
        return uploads

    def stat(self, name: str) -> ObjectInfo:
        self._require_root()
        path = self._path(name)
        try:
            st = path.stat()
        except FileNotFoundError:
            raise ObjectNotFoundError(f"object {name!r} not found in {self.root}") from None
        if not path.is_file():
            raise ObjectNotFoundError(f"object {name!r} not found in {self.root}")
        return ObjectInfo(name, st.st_size, {}, None, st.st_mtime)

    def read_range(
        self, name: str, start: int, length: int | None, chunk_size: int = 1 << 20
    ) -> Iterator[bytes]:
        path = self._path(name)
        try:
            f = open(path, "rb", buffering=0)
        except (FileNotFoundError, IsADirectoryError):
            raise ObjectNotFoundError(f"object {name!r} not found in {self.root}") from None
        with f:
            f.seek(start)
            remaining = length if length is not None else -1
            while remaining != 0:
                want = chunk_size if remaining < 0 else min(chunk_size, remaining)
                data = f.read(want)
                if not data:
                    return
                if remaining > 0:
                    remaining -= len(data)
                yield data

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        self._require_root()
        drv = self._drv()
        container = drv.get_container(self.container_name)
        with warnings.catch_warnings():
            # The driver filters by prefix after walking; that is expected here.
            warnings.simplefilter("ignore", UserWarning)
            objects = list(drv.iterate_container_objects(container, prefix=prefix or None))
        for obj in objects:
            name = obj.name.replace(os.sep, "/")
            yield ObjectInfo(name, obj.size, {}, None, obj.extra.get("modify_time"))

    def delete(self, name: str) -> bool:
        self._require_root()
        path = self._path(name)
        try:
            path.unlink()
        except FileNotFoundError:
            return False
        # Remove empty parent folders up to the container, as libcloud's driver does.
        parent = path.parent
        root = self.root.resolve()
        while parent != root:
            try:
                parent.rmdir()
            except OSError:
                break
            parent = parent.parent
        return True
