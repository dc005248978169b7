"""Bad input from the bucket: pointers and manifests that someone with write access to the
bucket crafted (or that were damaged), restored by ``pull .../latest`` and ``fetch_latest``.

Each case writes real objects and a pointer into a real store (a directory, through the
libcloud LOCAL driver), then restores through the library and through the command line
(``uploader.cli.main.main``, in this process: the same code as the console script, with
its exit code and log). Every case must be refused with a message that says what is wrong
and what to do, with a non-zero exit, and nothing may be written anywhere: not outside
the destination, and not inside it either (a refused checkpoint is not half restored).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from uploader import (
    IntegrityError,
    ObjectNotFoundError,
    ObjectStore,
    ObjectStoreHparams,
    fetch_latest,
)
from uploader.bucket import format as pointer_format
from uploader.bucket.pointer import ManifestFile, manifest_digest
from uploader.cli.main import main
from uploader.errors import ExitCode

#: The pointer size bound in these tests (the real one, 64 MiB, works the same; a smaller
#: one keeps the oversized case fast).
BOUND = 1 << 20
PREFIX = "run"
POINTER = f"{PREFIX}/rank_0/latest.json"


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _entry(name: str, files: dict[str, bytes], **over: Any) -> dict[str, Any]:
    """A directory checkpoint entry as the daemon writes it (before ``over``)."""
    manifest = [{"path": p, "size": len(d), "digest": _sha(d)} for p, d in sorted(files.items())]
    entry = {
        "name": name,
        "object": f"{PREFIX}/rank_0/{name}",
        "size": sum(len(d) for d in files.values()),
        "digest": "sha256:" + "0" * 64,
        "mtime_ns": 1,
        "committed_at": 1.0,
        "rule": "hf",
        "files": manifest,
    }
    entry.update(over)
    return entry


def _pointer(entry: dict[str, Any]) -> bytes:
    body = {"format": "ckpt-uploader/pointer/2", "rank": 0, "latest": entry, "history": [entry]}
    return json.dumps(body).encode()


@dataclass(frozen=True)
class Bad:
    """What the bucket holds: objects (name -> bytes) and the pointer's bytes."""

    objects: dict[str, bytes]
    pointer: bytes


def _checkpoint(files: dict[str, bytes], name: str = "ckpt", **over: Any) -> Bad:
    """A checkpoint whose files are stored where its entry says, under a pointer."""
    entry = _entry(name, files, **over)
    objects = {f"{entry['object']}/{p[len(name) + 1 :]}": d for p, d in files.items()}
    return Bad(objects, _pointer(entry))


def _truncated() -> Bad:
    good = _checkpoint({"ckpt/a.bin": b"a" * 100})
    return Bad(good.objects, good.pointer[: len(good.pointer) // 2])


def _oversized() -> Bad:
    good = _checkpoint({"ckpt/a.bin": b"a" * 100})
    # Valid JSON, but padded past the bound: it must not even be parsed.
    return Bad(good.objects, good.pointer + b" " * (BOUND + 1 - len(good.pointer)))


def _outside_object() -> Bad:
    """Rank 0's pointer naming another rank's objects (not a copy of its own run)."""
    files = {"ckpt/a.bin": b"a" * 100}
    entry = _entry("ckpt", files, object="other-run/rank_1/ckpt")
    return Bad({"other-run/rank_1/ckpt/a.bin": files["ckpt/a.bin"]}, _pointer(entry))


def _raw_name(name: str) -> Bad:
    """A checkpoint whose name (and so manifest paths) is ``name``, planted as it is."""
    entry = _entry("ckpt", {"ckpt/a.bin": b"a"})
    entry["name"] = name
    entry["files"][0]["path"] = f"{name}/a.bin"
    return Bad({}, _pointer(entry))


def _raw_path(path: str) -> Bad:
    entry = _entry("ckpt", {"ckpt/a.bin": b"a"})
    entry["files"][0]["path"] = path
    return Bad({}, _pointer(entry))


def _file_rule_naming_others() -> Bad:
    data = b"x" * 10
    entry = _entry("ep1.pt", {}, rule="file", size=10, digest=_sha(data))
    entry["object"] = f"{PREFIX}/rank_0/ep1.pt"
    entry["files"] = [{"path": "../../escape.pt", "size": 10, "digest": _sha(data)}]
    return Bad({f"{PREFIX}/rank_0/ep1.pt": data}, _pointer(entry))


def _manifest_body(files: dict[str, bytes], name: str = "ckpt") -> dict[str, Any]:
    manifest = [{"path": p, "size": len(d), "digest": _sha(d)} for p, d in sorted(files.items())]
    return {"format": "ckpt-uploader/manifest/1", "name": name, "files": manifest}


def _external(
    files: dict[str, bytes],
    body: dict[str, Any] | None = None,
    planted: Callable[[bytes], bytes] = lambda data: data,
    **ref_over: Any,
) -> Bad:
    """A checkpoint whose manifest is an object of its own (pointer format 3): the
    manifest object holds ``body`` (default: ``files``' manifest), stored as
    ``planted(bytes)``; the pointer records the bytes of ``body`` (then ``ref_over``)."""
    name = "ckpt"
    data = json.dumps(body or _manifest_body(files)).encode()
    digest = _sha(data)
    ref = {
        "object": f"{PREFIX}/rank_0/.ckpt-uploader/manifests/{name}.{digest[7:23]}.json",
        "size": len(data),
        "digest": digest,
        "files": len(files),
    }
    ref.update(ref_over)
    mf = [ManifestFile(p, len(d), _sha(d)) for p, d in files.items()]
    entry = _entry(name, files, digest=manifest_digest(mf), manifest=ref)
    del entry["files"]
    good = _checkpoint(files)
    pointer = json.loads(_pointer(entry))
    pointer["format"] = "ckpt-uploader/pointer/3"
    return Bad({**good.objects, ref["object"]: planted(data)}, json.dumps(pointer).encode())


def _chunked(
    files: dict[str, bytes],
    change: Callable[[dict[str, Any]], None] = lambda body: None,
    chunk: Callable[[bytes], bytes] = lambda body: body,
) -> Bad:
    """A chunked checkpoint (``--dedup``, pointer format 4): each file one chunk object
    (``chunk(body)``: its stored bytes; a missing chunk is tests/scenarios/test_dedup.py's), a manifest object of format 2
    (after ``change``) that the pointer records exactly."""
    from blake3 import blake3

    from uploader.transfer.digest import crc64nvme

    name, objects, manifest = "ckpt", {}, []
    for p, d in sorted(files.items()):
        h = blake3(d).hexdigest()
        objects[f"{PREFIX}/.ckpt-uploader/chunks/{h}"] = chunk(b"CKC1\x00" + d)
        digest = f"crc64nvme:{crc64nvme(d):016x}"
        manifest.append({"path": p, "size": len(d), "digest": digest, "chunks": [[h, len(d)]]})
    mf = [ManifestFile(f["path"], f["size"], f["digest"]) for f in manifest]
    body_d = {"format": "ckpt-uploader/manifest/2", "name": name, "scope_up": 0, "files": manifest}
    change(body_d)
    data = json.dumps(body_d).encode()
    digest = _sha(data)
    ref = {
        "object": f"{PREFIX}/rank_0/.ckpt-uploader/manifests/{name}.{digest[7:23]}.json",
        "size": len(data),
        "digest": digest,
        "files": len(files),
        "chunked": True,
    }
    entry = _entry(name, files, digest=manifest_digest(mf), manifest=ref)
    del entry["files"]
    pointer = json.loads(_pointer(entry))
    pointer["format"] = "ckpt-uploader/pointer/4"
    return Bad({**objects, ref["object"]: data}, json.dumps(pointer).encode())


def _flip(body: bytes) -> bytes:
    return body[:-1] + bytes([body[-1] ^ 1])


def _newer_format() -> Bad:
    good = _checkpoint({"ckpt/a.bin": b"a" * 100})
    return Bad(good.objects, good.pointer.replace(b"pointer/2", b"pointer/5"))


_ONE = {"ckpt/a.bin": b"a" * 100, "ckpt/b.bin": b"b" * 50}

CASES: dict[str, tuple[Callable[[], Bad], str]] = {
    "dotdot in a manifest path": (
        lambda: _raw_path("ckpt/../../../escape.txt"),
        "not a plain relative path",
    ),
    "absolute checkpoint name": (lambda: _raw_name("/tmp/escape"), "not a plain relative path"),
    "NUL in a manifest path": (lambda: _raw_path("ckpt/a\x00.bin"), "not a plain relative path"),
    "very long name": (lambda: _raw_path("ckpt/" + "x" * 300), "too long"),
    "very long path": (lambda: _raw_path("ckpt/" + "/".join(["y" * 200] * 6)), "too long"),
    "names equal after case folding": (
        lambda: _checkpoint({"ckpt/Model.bin": b"A" * 10, "ckpt/model.bin": b"B" * 10}),
        "one file on case-insensitive",
    ),
    "names equal after Unicode normalisation": (
        lambda: _checkpoint({"ckpt/caf\u00e9.bin": b"A" * 10, "ckpt/cafe\u0301.bin": b"B" * 10}),
        "Unicode-normalising",
    ),
    "a file that is also a folder": (
        lambda: Bad({}, _pointer(_entry("ckpt", {"ckpt/a": b"A" * 10, "ckpt/a/b": b"B" * 10}))),
        "as a file and as the folder",
    ),
    "manifest file outside its checkpoint": (
        lambda: _raw_path("other/a.bin"),
        "not inside checkpoint",
    ),
    "single file naming another file": (_file_rule_naming_others, "not a plain relative path"),
    "objects outside the checkpoint's place": (_outside_object, "outside its place"),
    "truncated pointer": (_truncated, "unreadable"),
    "pointer larger than the bound": (_oversized, "larger than the"),
    "pointer of a newer format": (_newer_format, "upgrade ckpt-uploader"),
    "manifest object larger than its pointer records": (
        lambda: _external(_ONE, planted=lambda d: d + b" " * 64),
        "larger than the",
    ),
    "manifest object replaced": (
        lambda: _external(_ONE, planted=lambda d: d.replace(b"a.bin", b"c.bin")),
        "replaced or damaged",
    ),
    "manifest object beyond the bound": (
        lambda: _external(_ONE, size=(64 << 20) + 1),
        "bytes a manifest may have",
    ),
    "manifest object outside its checkpoint's place": (
        lambda: _external(_ONE, object="run/rank_0/elsewhere.json"),
        "not where its checkpoint is",
    ),
    "dotdot in a manifest object's path": (
        lambda: _external(_ONE, body=_manifest_body({"ckpt/../../x": b"a" * 100, **_ONE})),
        "not a plain relative path",
    ),
    "manifest object of another checkpoint": (
        lambda: _external(_ONE, body=_manifest_body(_ONE, name="other")),
        "it is the manifest of 'other'",
    ),
    "manifest object not matching the checkpoint's digest": (
        lambda: _external(_ONE, body=_manifest_body({**_ONE, "ckpt/b.bin": b"B" * 50})),
        "do not make the checkpoint's digest",
    ),
    "manifest object of another format": (
        lambda: _external(_ONE, body={**_manifest_body(_ONE), "format": "x"}),
        "unknown format 'x'",
    ),
    "chunked manifest whose chunks do not add up to the file": (
        lambda: _chunked(
            {"ckpt/a.bin": b"a" * 100},
            lambda b: b["files"][0]["chunks"][0].__setitem__(1, 99),
        ),
        "add up to 99 bytes",
    ),
    "chunked manifest naming something that is not a BLAKE3": (
        lambda: _chunked(
            {"ckpt/a.bin": b"a" * 100},
            lambda b: b["files"][0]["chunks"][0].__setitem__(0, "../../etc/passwd"),
        ),
        "not a BLAKE3",
    ),
    "chunked manifest whose scope lies above the bucket's root": (
        lambda: _chunked({"ckpt/a.bin": b"a" * 100}, lambda b: b.__setitem__("scope_up", 5)),
        "scope_up 5",
    ),
    "inline chunk whose bytes do not hash to its name": (
        lambda: _chunked(
            {"ckpt/a.bin": b"a" * 100},
            lambda b: b["files"][0]["chunks"][0].append(base64.b64encode(b"b" * 100).decode()),
        ),
        "inline does not hash to its name",
    ),
    "inline chunk that is not base64": (
        lambda: _chunked(
            {"ckpt/a.bin": b"a" * 100},
            lambda b: b["files"][0]["chunks"][0].append("not base64!"),
        ),
        "inline is not base64",
    ),
    "chunk whose bytes do not hash to its name": (
        lambda: _chunked({"ckpt/a.bin": b"a" * 100}, chunk=_flip),
        "does not hash to its name",
    ),
    "names equal after case folding, in a manifest object": (
        lambda: _external({"ckpt/Model.bin": b"A" * 10, "ckpt/model.bin": b"B" * 10}),
        "one file on case-insensitive",
    ),
}


def _plant(store: ObjectStore, bad: Bad) -> None:
    for name, data in bad.objects.items():
        store.put_bytes(name, data)
    store.put_bytes(POINTER, bad.pointer)


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("case", list(CASES))
def test_restore_refuses_a_crafted_pointer(
    case: str,
    tmp_path: Path,
    local_hparams: ObjectStoreHparams,
    local_store: ObjectStore,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert pointer_format.MAX_POINTER_BYTES > BOUND
    monkeypatch.setattr(pointer_format, "MAX_POINTER_BYTES", BOUND)
    make, reason = CASES[case]
    _plant(local_store, make())
    dest = tmp_path / "restore"
    dest.mkdir()
    (dest / "kept.txt").write_text("an earlier restore")
    before = _tree(tmp_path)
    uri = f"file://{local_hparams.container}?prefix={PREFIX}"

    with pytest.raises(IntegrityError, match=re.escape(reason)):
        fetch_latest(uri, dest)
    code = main(["pull", f"file://{local_hparams.container}?prefix={PREFIX}/latest", f"{dest}/"])
    err = capsys.readouterr().err

    assert code != ExitCode.OK
    assert reason in err and "Traceback" not in err
    assert _tree(tmp_path) == before  # nothing written, inside dest or out, nothing lost


def test_a_sound_pointer_restores(
    tmp_path: Path, local_hparams: ObjectStoreHparams, local_store: ObjectStore
) -> None:
    """The control: the same construction, unaltered, restores (so each refusal above is
    for its own reason)."""
    files = {"ckpt/Model.bin": b"A" * 10, "ckpt/sub/caf\u00e9.bin": b"B" * 10}
    _plant(local_store, _checkpoint(files))
    got = fetch_latest(f"file://{local_hparams.container}?prefix={PREFIX}", tmp_path / "dest")
    assert got == tmp_path / "dest" / "ckpt"
    assert _tree(got) == {"Model.bin": b"A" * 10, "sub/caf\u00e9.bin": b"B" * 10}


def test_a_pointer_naming_another_prefix_reads_only_its_own_place(
    tmp_path: Path, local_hparams: ObjectStoreHparams, local_store: ObjectStore
) -> None:
    """An entry naming ``other-run/rank_0/ckpt`` is read as a copy beside its pointer: the
    objects planted under ``other-run`` are never read, so the restore finds nothing and
    writes nothing."""
    files = {"ckpt/a.bin": b"a" * 100}
    entry = _entry("ckpt", files, object="other-run/rank_0/ckpt")
    _plant(local_store, Bad({"other-run/rank_0/ckpt/a.bin": files["ckpt/a.bin"]}, _pointer(entry)))
    before = _tree(tmp_path)
    with pytest.raises(ObjectNotFoundError, match="run/rank_0/ckpt/a.bin"):
        fetch_latest(f"file://{local_hparams.container}?prefix={PREFIX}", tmp_path / "dest")
    assert _tree(tmp_path) == before


def test_a_copied_prefix_restores_from_the_copy(
    tmp_path: Path, local_hparams: ObjectStoreHparams, local_store: ObjectStore
) -> None:
    """A run copied to another prefix (pointer and objects alike) still names the prefix it
    was written under; it is restored from the copy, every file checked."""
    files = {"ckpt/a.bin": b"a" * 100, "ckpt/b.bin": b"b" * 7}
    entry = _entry("ckpt", files, object="first-run/rank_0/ckpt")
    objects = {f"{PREFIX}/rank_0/ckpt/{p[len('ckpt/') :]}": d for p, d in files.items()}
    _plant(local_store, Bad(objects, _pointer(entry)))
    got = fetch_latest(f"file://{local_hparams.container}?prefix={PREFIX}", tmp_path / "dest")
    assert _tree(got) == {"a.bin": b"a" * 100, "b.bin": b"b" * 7}


def test_a_named_checkpoint_of_a_copied_prefix_restores_from_the_copy(
    tmp_path: Path, local_hparams: ObjectStoreHparams, local_store: ObjectStore
) -> None:
    """``pull URI/rank_0/NAME`` of a copied run reads the copy beside its pointer, never
    the prefix the pointer was written under (which may hold another run now)."""
    files = {"ckpt/a.bin": b"a" * 100, "ckpt/b.bin": b"b" * 7}
    entry = _entry("ckpt", files, object="first-run/rank_0/ckpt")
    objects = {f"{PREFIX}/rank_0/ckpt/{p[len('ckpt/') :]}": d for p, d in files.items()}
    # the first prefix holds other bytes under the same names: they must not be read
    objects.update(
        {f"first-run/rank_0/ckpt/{p[len('ckpt/') :]}": b"x" * len(d) for p, d in files.items()}
    )
    _plant(local_store, Bad(objects, _pointer(entry)))
    uri = f"file://{local_hparams.container}?prefix={PREFIX}/rank_0/ckpt"
    assert main(["pull", uri, f"{tmp_path / 'dest'}/", "-q"]) == ExitCode.OK
    assert _tree(tmp_path / "dest" / "ckpt") == {"a.bin": b"a" * 100, "b.bin": b"b" * 7}
