"""How a download is cut into ranged reads, and how each range is checked as it arrives.

:class:`Plan` picks the ranges of one object and how its digest is computed from
them:

* ``crc64nvme``: ranges of any size (they need not align with the upload's parts);
  each range's CRC is computed by the thread that receives it and the ranges'
  values are combined in order with their lengths;
* ``sha256-parts``: each range holds whole upload parts, each hashed on its own, and
  the part hashes give the file digest;
* ``sha256`` (or no digest): the object's bytes are hashed as one sha256, which
  only a single range can do while receiving (the downloader reads a larger file
  back once).

:class:`RangeHasher` is fed one range's bytes in order and yields the checksums of
the plan's pieces it holds. awscrt's CRC and hashlib's sha256 both let go of the
interpreter lock, so threads checksum while others receive.
"""

from __future__ import annotations

from uploader.transfer.digest import Digest, PartHasher, running_sum

__all__ = ["Plan", "RangeHasher"]


class Plan:
    """The ranged reads of an object of ``size`` bytes (about ``part_size`` each) and
    how their checksums give its ``digest`` (see the module docstring)."""

    def __init__(self, size: int, digest: Digest | None, part_size: int) -> None:
        self.size = size
        self.kind = digest.kind if digest is not None else "sha256"
        parts = digest is not None and digest.algo == "sha256-parts" and size > digest.part_size
        #: Whether each range is checked on its own and the values combined.
        self.split = parts or (digest is not None and digest.algo == "crc64nvme")
        if parts:
            assert digest is not None
            self.hash_part = digest.part_size
            self.range_size = max(1, part_size // digest.part_size) * digest.part_size
        elif self.split:  # crc64nvme: one value a range
            self.range_size = self.hash_part = max(1, part_size)
        else:
            self.hash_part = max(size, 1)
            self.range_size = part_size
        self.count = max(1, -(-size // self.range_size))

    def range(self, i: int) -> tuple[int, int]:
        start = i * self.range_size
        return start, min(self.range_size, self.size - start)

    def hasher(self) -> PartHasher | None:
        """What combines the ranges' checksums into the file digest (None: not split)."""
        return PartHasher(self.size, self.hash_part, self.kind) if self.split else None


class RangeHasher:
    """The checksum of each of the plan's pieces inside one range (an upload part for
    ``sha256-parts``, the range itself otherwise), fed the range's bytes in order."""

    def __init__(self, plan: Plan, start: int, length: int, enabled: bool = True) -> None:
        self.enabled = enabled
        self.kind = plan.kind
        self.part = plan.hash_part
        self.pos = start
        self.end = start + length
        self.done: list[bytes] = []
        self.h = running_sum(self.kind)

    def update(self, view: memoryview) -> None:
        if not self.enabled:
            return
        while len(view):
            left = self.part - self.pos % self.part
            take = view[:left]
            self.h.update(take)
            self.pos += len(take)
            view = view[len(take) :]
            if self.pos % self.part == 0 or self.pos == self.end:
                self.done.append(self.h.digest())
                self.h = running_sum(self.kind)

    def digests(self) -> list[bytes]:
        if self.enabled and not self.done and self.pos == self.end:
            return [self.h.digest()]  # an empty object
        return self.done
