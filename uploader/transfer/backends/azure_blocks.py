"""Azure block blobs: the multipart protocol of :class:`AzureBackend`, and blob headers.

``begin`` only names the upload (and validates its metadata), ``put_part`` is a Put
Block, ``complete`` a Put Block List that also sets the metadata. Unfinished uploads
leave uncommitted blocks, which Azure discards by itself (after a week, or at the next
commit of that blob), so ``abort`` sends nothing. A block's id names its upload and
index, so an interrupted upload is resumed from the blob's uncommitted block list
(``list_parts``); the block id is the part's ETag. Each block is sent with its MD5
unless the backend was told not to (``content_md5``).
"""

from __future__ import annotations

import base64
import hashlib
import re
import uuid
from collections.abc import Mapping
from xml.etree import ElementTree as ET

from uploader.errors import ConfigError, TransientError
from uploader.transfer.backends.base import HeldPart, PartToken
from uploader.transfer.backends.encryption import encryption_headers
from uploader.transfer.backends.http import LibcloudHTTPBackend

__all__ = ["AzureBlocks", "b64"]

_MiB = 1 << 20
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
#: Metadata keys that are blob properties rather than x-ms-meta-* values.
_PROPERTIES = {
    "content-type": "x-ms-blob-content-type",
    "content-encoding": "x-ms-blob-content-encoding",
    "content-language": "x-ms-blob-content-language",
    "cache-control": "x-ms-blob-cache-control",
}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


class AzureBlocks(LibcloudHTTPBackend):
    """Block-blob uploads in parts, resumable from the uncommitted block list."""

    multipart = True
    resumable = True
    # 50,000 committed blocks per blob. Blocks may be 4000 MiB from service version
    # 2019-12-12 on, but libcloud signs requests as 2018-11-09, where the limit is
    # 100 MiB per block (and 256 MiB per single Put Blob).
    max_part_size = 100 * _MiB
    max_parts = 50_000
    min_part_size = 1 * _MiB

    #: Whether blocks and blobs are sent with their MD5 (set by the backend).
    _content_md5: bool = True
    #: The blob headers of each upload in progress, by upload id.
    _uploads: dict[str, dict[str, str]]

    def _headers_for(self, metadata: Mapping[str, str]) -> dict[str, str]:
        headers: dict[str, str] = {}
        for key, value in metadata.items():
            k = key.lower()
            v = str(value)
            if not v.isascii() or "\n" in v or "\r" in v:
                raise ConfigError(f"metadata value of {key!r} must be one line of ASCII text")
            if k in _PROPERTIES:
                headers[_PROPERTIES[k]] = v
            elif _IDENT.match(k):
                headers[f"x-ms-meta-{k}"] = v
            else:
                raise ConfigError(
                    f"metadata key {key!r} is not valid on Azure: use letters, digits "
                    "and underscores, starting with a letter"
                )
        headers.update(encryption_headers(self.settings.extra, "azure"))
        return headers

    def begin(self, name: str, metadata: Mapping[str, str], checksum: str | None = None) -> str:
        headers = self._headers_for(metadata)  # validate before any byte is sent
        upload_id = uuid.uuid4().hex
        with self._lock:
            self._uploads[upload_id] = headers
        return upload_id

    @staticmethod
    def block_id(upload_id: str, index: int) -> str:
        """The block id of part ``index``: fixed length, unique per upload."""
        return b64(f"{upload_id}-{index:08d}".encode())

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
        block = self.block_id(upload_id, index)
        headers = {"Content-Length": str(len(data))}
        headers.update(encryption_headers(self.settings.extra, "azure"))
        if self._content_md5:
            headers["Content-MD5"] = b64(hashlib.md5(data).digest())
        what = f"upload block {index + 1} of {name}"
        resp = self._request(
            what, self._path(name), "PUT", {"comp": "block", "blockid": block}, headers, data
        )
        if resp.status_code != 201:
            raise self._fail(what, resp, name)
        resp.close()
        return block

    def complete(
        self,
        name: str,
        upload_id: str,
        tokens: list[PartToken],
        part_crcs: list[int] | None = None,
        crc64nvme: int | None = None,
    ) -> None:
        root = ET.Element("BlockList")
        for block in tokens:
            ET.SubElement(root, "Latest").text = str(block)
        body = ET.tostring(root, encoding="utf-8", xml_declaration=True)
        with self._lock:
            headers = dict(self._uploads.get(upload_id, {}))
        headers.setdefault("x-ms-blob-content-type", "application/octet-stream")
        headers.update(
            {
                "Content-Length": str(len(body)),
                "Content-MD5": b64(hashlib.md5(body).digest()),
                "Content-Type": "application/xml",
            }
        )
        what = f"commit blocks of {name}"
        resp = self._request(what, self._path(name), "PUT", {"comp": "blocklist"}, headers, body)
        if resp.status_code != 201:
            raise self._fail(what, resp, name)
        resp.close()
        with self._lock:
            self._uploads.pop(upload_id, None)

    def abort(self, name: str, upload_id: str) -> None:
        # Uncommitted blocks expire by themselves; nothing to send.
        with self._lock:
            self._uploads.pop(upload_id, None)

    def list_parts(self, name: str, upload_id: str) -> dict[int, HeldPart] | None:
        what = f"list blocks of {name}"
        resp = self._request(
            what, self._path(name), "GET", {"comp": "blocklist", "blocklisttype": "uncommitted"}
        )
        if resp.status_code == 404 and resp.headers.get("x-ms-error-code") != "ContainerNotFound":
            resp.close()  # no blob and no block
            return None
        if resp.status_code != 200:
            raise self._fail(what, resp, name)
        try:
            root = ET.fromstring(resp.content)
        except ET.ParseError:
            raise TransientError(f"{what}: the store sent an unreadable block list") from None
        finally:
            resp.close()
        held: dict[int, HeldPart] = {}
        mine = f"{upload_id}-"
        for block in root.iter("Block"):
            block_id, size = block.findtext("Name") or "", block.findtext("Size") or "0"
            try:
                text = base64.b64decode(block_id, validate=True).decode("ascii")
            except ValueError:
                continue  # a block of another writer
            if text.startswith(mine) and text[len(mine) :].isdigit():
                held[int(text[len(mine) :])] = HeldPart(int(size), block_id)
        # No block of this upload left: committed, discarded, or none sent yet.
        return held or None

    def completed_from(self, name: str, upload_id: str, tokens: list[PartToken]) -> bool:
        what = f"list blocks of {name}"
        resp = self._request(
            what, self._path(name), "GET", {"comp": "blocklist", "blocklisttype": "committed"}
        )
        if resp.status_code != 200:
            resp.close()
            return False
        try:
            root = ET.fromstring(resp.content)
        except ET.ParseError:
            return False
        finally:
            resp.close()
        return [b.findtext("Name") for b in root.iter("Block")] == [str(t) for t in tokens]

    def reopen(self, name: str, upload_id: str, metadata: Mapping[str, str]) -> None:
        headers = self._headers_for(metadata)
        with self._lock:
            self._uploads[upload_id] = headers
