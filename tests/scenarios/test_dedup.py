"""``--dedup`` end to end: real trainers' run directories pushed as chunks to real stores
(LOCAL, moto), restored bit-identical; a restart sends only what is not yet stored; each
step of the commit order interrupted; bad manifests and damaged or missing chunks refused;
and ``gc`` racing two daemons that share a scope."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from harness.trainers import files_digest, run_trainer, succeeded
from tests.daemon.test_process import (
    REPO,
    Daemon,
    daemons,  # noqa: F401 - a fixture
    local_uri,
    run_cli,
    uploader_cmd,
    wait_for,
)
from tests.fixtures.s3 import FAST_RETRY, S3Server
from tests.transfer.test_chunks import write_safetensors
from uploader import IntegrityError, ObjectStore
from uploader.bucket.fetch import fetch_entry
from uploader.bucket.gc import collect, read_state
from uploader.bucket.manifest import load_manifest, store_manifest
from uploader.bucket.pointer import (
    ManifestFile,
    PointerEntry,
    read_pointer,
    select_latest,
)
from uploader.transfer.chunks import CHUNK_DIR, ChunkWriter, chunk_prefix

pytestmark = pytest.mark.timeout(600)

MiB = 1 << 20
OWN = ".ckpt-uploader"


def _files(d: Path) -> dict[str, str]:
    return {k: v for k, v in files_digest(d).items() if not k.startswith(OWN)}


def _chunk_bytes(bucket: Path, scope: str) -> int:
    where = bucket / chunk_prefix(scope)
    return sum(p.stat().st_size for p in where.iterdir()) if where.exists() else 0


def _push(run: Path, uri: str, *extra: str, state: Path) -> subprocess.CompletedProcess[str]:
    return run_cli("push", str(run), uri, "--dedup", "--state-dir", str(state), *extra, timeout=300)


@pytest.fixture(scope="module")
def trainer_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One run directory per real trainer (no uploader beside them)."""
    base = tmp_path_factory.mktemp("trainers")
    runs = {
        "hf": ("hf_run", "--save-steps", "8", "--max-steps", "16"),
        "lightning": ("lightning_run", "--epochs", "3"),
        "dcp": ("dcp_run", "--steps", "10,20"),
    }
    out = {}
    for name, (module, *args) in runs.items():
        succeeded(run_trainer(module, base / name, *args))
        out[name] = base / name
    return out


@pytest.mark.parametrize("trainer", ["hf", "lightning", "dcp"])
def test_a_trainers_run_pushed_with_dedup_restores_bit_identical(
    trainer_runs: dict[str, Path], tmp_path: Path, local_bucket: Path, trainer: str
) -> None:
    run = trainer_runs[trainer]
    uri = local_uri(local_bucket, "exp")
    done = _push(run, uri, state=tmp_path / "state")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "chunk(s)" in done.stderr  # files went as chunks
    rank0 = local_bucket / "exp" / "rank_0"
    # no checkpoint file is a plain object: they are chunks named by the manifests
    pointer = json.loads((rank0 / "latest.json").read_text())
    assert pointer["format"] == "ckpt-uploader/pointer/4"
    ls = run_cli("ls", uri)
    assert ls.returncode == 0 and "dedup:" in ls.stdout, ls.stdout + ls.stderr
    names = [e["name"] for e in (pointer["latest"], *pointer["history"])]
    for name in names:
        entry = next(e for e in pointer["history"] if e["name"] == name)
        assert entry["manifest"]["chunked"] is True
        assert not (rank0 / name).exists() or not any(
            p.is_file() for p in (rank0 / name).rglob("*")
        )
        dest = tmp_path / "pulled" / name.replace("/", "_")
        got = run_cli("pull", f"{local_uri(local_bucket, 'exp/rank_0/' + name)}", str(dest) + "/")
        assert got.returncode == 0, got.stderr[-3000:]
        src = run / name
        if src.is_dir():
            assert _files(dest / name) == _files(src)
        else:
            assert (dest / name).read_bytes() == src.read_bytes()
    verify = run_cli("verify", uri)
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_a_restart_sends_only_the_chunks_not_yet_stored(tmp_path: Path, local_bucket: Path) -> None:
    run = tmp_path / "run" / "checkpoint-1"
    run.mkdir(parents=True)
    write_safetensors(
        run / "model.safetensors", [(f"w{i}", random.randbytes(4 * MiB)) for i in range(8)]
    )
    (run / "trainer_state.json").write_text("{}")
    (run / "empty.txt").write_bytes(b"")  # no chunk at all: a plain empty object
    for p in run.iterdir():
        os.utime(p, (1e9, 1e9))
    uri = local_uri(local_bucket, "exp")
    state = tmp_path / "state"
    proc = subprocess.Popen(
        uploader_cmd(
            "push",
            str(run.parent),
            uri,
            "--dedup",
            "--state-dir",
            str(state),
            "--bwlimit",
            "8M",
            "--files",
            "1",
        ),
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    chunks = local_bucket / chunk_prefix("exp")
    wait_for(lambda: chunks.exists() and len(list(chunks.iterdir())) >= 3, 60, "chunks")
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    held = _chunk_bytes(local_bucket, "exp")
    assert 0 < held < 32 * MiB
    again = _push(run.parent, uri, state=state)
    assert again.returncode == 0, again.stderr[-3000:]
    new = sum(
        int(line.split(" byte(s) new")[0].rsplit(" ", 1)[1])
        for line in again.stderr.splitlines()
        if "byte(s) new" in line
    )
    assert new <= 32 * MiB + (1 << 16) - held + 4 * MiB  # at most one chunk in flight again
    dest = tmp_path / "out"
    assert run_cli("pull", local_uri(local_bucket, "exp/latest"), str(dest) + "/").returncode == 0
    assert _files(dest / "checkpoint-1") == _files(run)
    status = run_cli("status", str(run.parent), "--state-dir", str(state), "--json")
    daemon = json.loads(status.stdout)["daemon"]  # the second push's report
    assert daemon["dedup_scope"] == "exp" and daemon["dedup_new_bytes"] == new
    every = sum(p.stat().st_size for p in run.iterdir())  # both files, sent or found
    assert daemon["dedup_new_bytes"] + daemon["dedup_reused_bytes"] == every
    text = run_cli("status", str(run.parent), "--state-dir", str(state)).stdout
    assert "dedup in scope 'exp'" in text and "sent as new chunks" in text


@pytest.fixture
def moto_store(moto_s3: S3Server) -> Any:
    if not moto_s3.alive():
        moto_s3.start()
    bucket = f"d-{uuid.uuid4().hex[:12]}"
    moto_s3.make_bucket(bucket)
    s = moto_s3.hparams(bucket).initialize_object(concurrency=4, retry=FAST_RETRY)
    try:
        yield s
    finally:
        s.close()


def _entry(store: ObjectStore, tmp: Path, scope: str, name: str, seed: int) -> PointerEntry:
    """A single-file checkpoint ``name`` sent as chunks (shared base, own head)."""
    path = tmp / name
    rng = random.Random(0)
    base = [(f"base{i}", rng.randbytes(2 * MiB)) for i in range(4)]
    write_safetensors(path, [*base, ("head", random.Random(seed).randbytes(MiB))])
    got = ChunkWriter(store, scope).upload_file(path)
    f = ManifestFile(name, got.size, str(got.digest), got.chunks)
    return PointerEntry(
        name, f"{scope}/rank_0/{name}", got.size, str(got.digest), seed, files=(f,), scope=scope
    )


def test_each_step_of_the_commit_order_interrupted_leaves_no_manifest_with_a_missing_chunk(
    moto_store: ObjectStore, tmp_path: Path
) -> None:
    from uploader.bucket.commit import commit

    scope = "exp"
    first = store_manifest(moto_store, _entry(moto_store, tmp_path, scope, "a.safetensors", 1))
    commit(moto_store, scope, 0, first)
    # (1) chunks sent, then a crash before the manifest: only unreferenced chunks remain
    orphan = _entry(moto_store, tmp_path, scope, "b.safetensors", 2)
    dry = collect(moto_store, scope, grace=0, dry_run=True)
    assert {n.rsplit("/", 1)[1] for n, _ in dry.doomed} == {orphan.files[0].chunks[-1].hash}
    # (2) manifest written, then a crash before the pointer: latest is still the first,
    # and the orphan manifest keeps its chunks
    stored = store_manifest(moto_store, orphan)
    assert collect(moto_store, scope, grace=0, dry_run=True).doomed == []
    sel = select_latest(moto_store, f"{scope}/latest")
    assert sel is not None and sel.entries[0].name == "a.safetensors"
    # (3) the pointer: the checkpoint restores, verified
    commit(moto_store, scope, 0, stored)
    entry = read_pointer(moto_store, scope, 0)
    assert entry is not None and entry.latest.name == "b.safetensors"
    out = fetch_entry(moto_store, entry.latest, tmp_path / "out" / "b.safetensors", into=False)
    assert out.read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    # a collection now deletes nothing any manifest names
    report = collect(moto_store, scope, grace=0, window=0)
    assert report.deleted == 0 and read_state(moto_store, scope)[0].token == "1:done"


def _corrupt_manifest(
    store: ObjectStore, entry: PointerEntry, change: Any
) -> tuple[PointerEntry, str]:
    """``entry`` (stored) pointing at a manifest object rewritten by ``change(dict)``,
    with the pointer's size and sha256 made to match it (a bucket writer's edit)."""
    assert entry.manifest_ref is not None
    body = json.loads(store.get_bytes(entry.manifest_ref.object))
    change(body)
    data = json.dumps(body).encode()
    store.put_bytes(entry.manifest_ref.object, data)
    from dataclasses import replace

    ref = replace(
        entry.manifest_ref, size=len(data), digest="sha256:" + hashlib.sha256(data).hexdigest()
    )
    return replace(entry, manifest_ref=ref, files=()), entry.manifest_ref.object


@pytest.mark.parametrize(
    ("change", "says"),
    [
        (lambda d: d["files"][0]["chunks"].pop(), "add up to"),
        (lambda d: d["files"][0]["chunks"][0].__setitem__(0, "zz" * 32), "BLAKE3"),
        (lambda d: d["files"][0]["chunks"][0].__setitem__(1, -5), "size"),
        (lambda d: d.__setitem__("scope_up", 9), "scope_up"),
        (lambda d: d.__setitem__("format", "ckpt-uploader/manifest/1"), "format"),
        (lambda d: d["files"][0].__setitem__("digest", "crc64nvme:" + "0" * 16), "records"),
    ],
)
def test_bad_chunked_manifests_from_the_bucket_are_refused(
    moto_store: ObjectStore, tmp_path: Path, change: Any, says: str
) -> None:
    entry = store_manifest(moto_store, _entry(moto_store, tmp_path, "exp", "m.safetensors", 3))
    bad, _ = _corrupt_manifest(moto_store, entry, change)
    with pytest.raises(IntegrityError, match=says):
        load_manifest(moto_store, bad)


def test_a_manifest_naming_a_missing_chunk_is_refused_with_a_clear_error(
    tmp_path: Path, local_bucket: Path
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    write_safetensors(run / "ep1.safetensors", [(f"w{i}", os.urandom(2 * MiB)) for i in range(3)])
    uri = local_uri(local_bucket, "exp")
    assert _push(run, uri, state=tmp_path / "st").returncode == 0
    victim = sorted((local_bucket / "exp" / CHUNK_DIR).iterdir())[0]
    victim.unlink()
    got = run_cli("pull", local_uri(local_bucket, "exp/latest"), str(tmp_path / "out") + "/")
    assert got.returncode != 0
    assert victim.name in got.stderr and "missing" in got.stderr
    assert not (tmp_path / "out" / "ep1.safetensors").exists()
    verify = run_cli("verify", uri)
    assert verify.returncode != 0 and "missing" in verify.stdout + verify.stderr


def test_two_runs_from_one_base_in_one_scope_store_the_base_once(
    tmp_path: Path, local_bucket: Path
) -> None:
    rng = random.Random(5)
    base = [(f"base{i}", rng.randbytes(3 * MiB)) for i in range(4)]
    for run in ("a", "b"):
        d = tmp_path / run
        d.mkdir()
        write_safetensors(d / "ep1.safetensors", [*base, ("head", os.urandom(MiB))])
        got = _push(
            d,
            local_uri(local_bucket, f"team/{run}"),
            "--dedup-scope",
            "team",
            state=tmp_path / f"st-{run}",
        )
        assert got.returncode == 0, got.stderr[-2000:]
    held = _chunk_bytes(local_bucket, "team")
    assert 12 * MiB + 2 * MiB <= held < 12 * MiB + 2 * MiB + 2 * MiB
    for run in ("a", "b"):
        out = tmp_path / f"out-{run}"
        pulled = run_cli("pull", local_uri(local_bucket, f"team/{run}/latest"), str(out) + "/")
        assert pulled.returncode == 0, pulled.stderr
        assert (out / "ep1.safetensors").read_bytes() == (
            tmp_path / run / "ep1.safetensors"
        ).read_bytes()
    bad = run_cli(
        "push",
        str(tmp_path / "a"),
        local_uri(local_bucket, "team/a"),
        "--dedup",
        "--dedup-scope",
        "other",
        "--state-dir",
        str(tmp_path / "st-x"),
    )
    assert bad.returncode != 0 and "not the run's prefix" in bad.stderr


def test_gc_racing_two_daemons_of_one_scope_never_deletes_a_referenced_chunk(
    moto_s3: S3Server,
    tmp_path: Path,
    daemons: list[Daemon],  # noqa: F811 - the fixture
) -> None:
    """Run A rotates its checkpoints away (--keep-remote 1), so their chunks become
    unreferenced while run B, in the same scope, keeps finding the same chunks in its
    index; ``gc --grace 0`` runs again and again meanwhile. Every checkpoint either
    pointer names must restore bit-identical at the end."""
    if not moto_s3.alive():
        moto_s3.start()
    bucket = f"g-{uuid.uuid4().hex[:12]}"
    moto_s3.make_bucket(bucket)
    rng = random.Random(6)
    base = [(f"base{i}", rng.randbytes(MiB + 4096)) for i in range(6)]
    runs = {r: tmp_path / r for r in ("a", "b")}
    for name, run in runs.items():
        run.mkdir()
        keep = ("--keep-remote", "1") if name == "a" else ()
        d = Daemon(
            tmp_path,
            run,
            "--to",
            moto_s3.uri(bucket, f"scope/{name}"),
            "--dedup",
            "--dedup-scope",
            "scope",
            "--settle",
            "0.2",
            *keep,
            name=name,
        )
        daemons.append(d)
        d.wait_running()
    stop = threading.Event()
    gcs: list[subprocess.CompletedProcess[str]] = []

    def collector() -> None:
        while not stop.is_set():
            gcs.append(
                run_cli(
                    "gc",
                    moto_s3.uri(bucket, "scope"),
                    "--grace",
                    "0",
                    "--window",
                    "1",
                    "--limit",
                    "20",
                    timeout=120,
                )
            )

    t = threading.Thread(target=collector)
    t.start()
    try:
        for step in range(6):
            for name, run in runs.items():
                head = random.Random(step * 10 + (name == "b")).randbytes(256 << 10)
                tmp = run / f".ep{step}.safetensors.tmp"
                write_safetensors(tmp, [*base, ("head", head)])
                tmp.rename(run / f"ep{step}.safetensors")
            time.sleep(1.5)
        for d in daemons:
            d.wait_status(lambda s: s.get("counts", {}).get("pending", 0) == 0, timeout=120)
    finally:
        stop.set()
        t.join(150)
    for d in daemons:
        d.signal(signal.SIGTERM)
        assert d.wait(120) == 0, d.log()[-4000:]
    assert len(gcs) >= 2 and all(g.returncode == 0 for g in gcs), [g.stderr for g in gcs]
    deleted = [int(g.stdout.split("deleted ")[1].split(" chunk")[0]) for g in gcs]
    assert sum(deleted) > 0  # run A's rotated heads were collected while both ran
    # the final state: every named checkpoint restores, and a last collection keeps them
    final = run_cli("gc", moto_s3.uri(bucket, "scope"), "--grace", "0", "--window", "0")
    assert final.returncode == 0, final.stderr
    for name, run in runs.items():
        uri = moto_s3.uri(bucket, f"scope/{name}")
        ls = run_cli("ls", uri, "--json")
        assert ls.returncode == 0, ls.stderr
        rows = [json.loads(line) for line in ls.stdout.splitlines()]
        assert rows and all(r["chunked"] for r in rows)
        if name == "a":
            assert len(rows) == 1  # keep-remote 1
        for r in rows:
            out = tmp_path / f"out-{name}-{r['name']}"
            got = run_cli("pull", moto_s3.uri(bucket, f"scope/{name}/rank_0/{r['name']}"), str(out))
            assert got.returncode == 0, got.stderr[-3000:]
            assert out.read_bytes() == (run / r["name"]).read_bytes()
    verify = run_cli("verify", moto_s3.uri(bucket, "scope"))
    assert verify.returncode == 0, verify.stdout[-3000:] + verify.stderr[-3000:]


def test_a_writer_resends_chunks_a_collection_took_before_its_manifest(
    moto_store: ObjectStore, tmp_path: Path
) -> None:
    """The protocol's writer side, step by step: chunks sent at generation 0; a collection
    (grace 0) deletes them, since no manifest names them yet; before its manifest the
    writer sees the generation moved, finds its chunks gone, sends them again, and only
    then writes the manifest, which restores."""
    from uploader.bucket.gc import confirm_chunks, read_generation

    scope = "exp"
    token = read_generation(moto_store, scope)
    entry = _entry(moto_store, tmp_path, scope, "a.safetensors", 7)
    f = entry.files[0]
    report = collect(moto_store, scope, grace=0, window=0)
    assert report.deleted == sum(1 for c in f.chunks if c.data is None)
    resent: list[str] = []
    written: list[PointerEntry] = []

    def resend(mf: ManifestFile) -> None:
        resent.append(mf.path)
        ChunkWriter(moto_store, scope).upload_file(tmp_path / mf.path)

    confirm_chunks(
        moto_store,
        scope,
        [(f, token)],
        resend,
        lambda: written.append(store_manifest(moto_store, entry)),
    )
    assert resent == ["a.safetensors"] and len(written) == 1
    out = fetch_entry(moto_store, written[0], tmp_path / "out" / "a", into=False)
    assert out.read_bytes() == (tmp_path / "a.safetensors").read_bytes()
    # the same writer, with the generation it sent at now current: no check, no resend
    confirm_chunks(
        moto_store,
        scope,
        [(f, read_generation(moto_store, scope))],
        resend,
        lambda: None,
    )
    assert resent == ["a.safetensors"]


def test_a_collection_that_died_blocks_neither_writers_nor_the_next_one(
    moto_store: ObjectStore,
) -> None:
    """A collector killed while it ran leaves its mark ``running``; once its limit has
    passed (by the store's clock) writers stop waiting for it and the next collection
    takes over. A live one is still waited for, and refused to a second collector."""
    from uploader.bucket.gc import GcState, confirm_chunks, gc_object
    from uploader.errors import ConfigError

    moto_store.put_bytes(gc_object("exp"), GcState(3, "running", 5.0, 0.5).to_json())
    time.sleep(3.5)  # its limit, the margin, and Last-Modified's whole seconds
    waited: list[float] = []
    confirm_chunks(moto_store, "exp", [], lambda f: None, lambda: None, sleep=waited.append)
    assert waited == []
    collect(moto_store, "exp", grace=0, window=0)
    assert read_state(moto_store, "exp")[0].token == "4:done"
    moto_store.put_bytes(gc_object("exp"), GcState(5, "running", 5.0, 300.0).to_json())
    with pytest.raises(ConfigError, match="is running"):
        collect(moto_store, "exp", grace=0, window=0)
    now = [0.0]  # a clock that moves only while the writer sleeps, 100 s a sleep

    def nap(seconds: float) -> None:
        waited.append(seconds)
        now[0] += 100.0

    confirm_chunks(
        moto_store, "exp", [], lambda f: None, lambda: None, sleep=nap, clock=lambda: now[0]
    )
    assert len(waited) == 4  # waited for the live one until its limit and margin (302 s)
