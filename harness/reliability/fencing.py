"""Two uploaders on one rank's pointer: fenced (compare-and-swap) commits under contention.

Each writer is a separate process with its own journal that runs the daemon's real
commit path (:class:`uploader.daemon.committer.Committer`): its checkpoint files are
recorded in its journal as verified, then it submits one checkpoint, waits for the
pointer write (and the journal's ``committed`` mark), and goes on with the next. Writer A commits ``step-00000``, ``step-00002``, ...; writer
B ``step-00001``, ``step-00003``, ...; both start together (a file barrier), so
their reads, merges and writes interleave and often collide. No file is uploaded:
the case is the pointer, not the bytes.

Meanwhile the parent reads the pointer in a loop and counts every time ``latest``
is older than one it saw before (``backwards``). At the end every checkpoint either
writer committed must be in the pointer's history (``lost`` counts those that are
not; the writers keep the whole history for this). ``conflicts`` counts the writes
that lost to the other writer and were merged and written again.

``unfenced=True`` runs the same writers with the plain PUT used where a store ignores
conditions, to show what fencing prevents.

Example::

    figures = two_writers(server.hparams("ckpts"), "fence/run1", Path("/tmp/w"), rounds=200)
    assert figures["lost"] == figures["backwards"] == 0

Writer process: ``python -m harness.reliability.fencing HPARAMS_JSON PREFIX STATE_DIR
--first 0 --rounds 200 [--unfenced]`` (prints one JSON line).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import anyio

from harness.reliability.common import ROOT, Result
from uploader import ObjectStoreHparams, RetryPolicy
from uploader.bucket.pointer import PointerEntry, pointer_name, read_pointer
from uploader.config.hparams import join_key
from uploader.daemon.committer import Committer
from uploader.daemon.journal import FileRecord, Journal
from uploader.transfer.store import ObjectStore

__all__ = ["two_writers", "scenario_two_writers"]

log = logging.getLogger(__name__)

RANK = 0
_DIGEST = "sha256:" + "0" * 64
_RETRY = RetryPolicy(attempts=6, total_seconds=30.0, base_delay=0.05, max_delay=0.5)


# -- one writer (a process of its own) ---------------------------------------------------------


async def _commit_loop(
    store: ObjectStore, journal: Journal, a: argparse.Namespace
) -> dict[str, Any]:
    lock = threading.Lock()

    async def call(fn: Any, *args: Any) -> Any:
        def locked() -> Any:
            with lock:
                return fn(*args)

        return await anyio.to_thread.run_sync(locked)

    failures: list[str] = []
    committer = Committer(
        store,
        a.prefix,
        5,
        lambda n: 0.05 * n,
        journal,
        call,
        report=lambda msg, code: failures.append(msg),
    )
    # Keep every entry in the history, so "no committed entry lost" can be checked whole.
    committer.history_limit = 2 * a.rounds + 64
    if a.unfenced:
        committer.fenced = False
    fenced = await anyio.to_thread.run_sync(committer.prepare)
    steps = [a.first + 2 * i for i in range(a.rounds)]
    entries = []
    for n in steps:
        name = f"step-{n:05d}.pt"
        entries.append(PointerEntry(name, join_key(a.prefix, f"rank_{RANK}/{name}"), 1, _DIGEST, n))

    def verified() -> None:  # every file recorded as uploaded and verified, before the race
        for e in entries:
            journal.accept(FileRecord(e.name, RANK, e.name, e.object, 1, e.mtime_ns, True))
            journal.done(e.name, _DIGEST)

    await call(verified)
    Path(a.state, "ready").touch()
    go = Path(a.state).parent / "go"
    deadline = time.monotonic() + 30
    while not go.exists() and time.monotonic() < deadline:
        await anyio.sleep(0.005)
    orders: list[int] = []
    t0 = time.monotonic()
    async with anyio.create_task_group() as tg:
        committer.task_group = tg
        for entry in entries:
            committer.submit(RANK, entry, [entry.name])
            while committer.busy:
                await anyio.sleep(0.0005)
            pointer = committer.pointer(RANK)
            if pointer is not None:
                orders.append(pointer.latest.mtime_ns)
    seconds = time.monotonic() - t0
    committed = [r.name for r in await call(journal.records, "done") if r.committed]
    return {
        "fenced": fenced,
        "committed": sorted(committed),
        "conflicts": committer.conflicts,
        "failures": failures,
        "seconds": round(seconds, 3),
        "own_backwards": sum(1 for x, y in zip(orders, orders[1:], strict=False) if y < x),
    }


def _writer_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m harness.reliability.fencing")
    p.add_argument("hparams", help="ObjectStoreHparams as JSON (credentials by variable name)")
    p.add_argument("prefix")
    p.add_argument("state")
    p.add_argument("--first", type=int, required=True)
    p.add_argument("--rounds", type=int, required=True)
    p.add_argument("--unfenced", action="store_true")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    store = ObjectStoreHparams(**json.loads(a.hparams)).initialize_object(check=False, retry=_RETRY)
    journal = Journal.open(a.state)
    try:
        out = anyio.run(_commit_loop, store, journal, a)
    finally:
        journal.close()
        store.close()
    print(json.dumps(out), flush=True)
    return 0


# -- the case ---------------------------------------------------------------------------------


def two_writers(
    hparams: ObjectStoreHparams,
    prefix: str,
    workdir: Path,
    rounds: int = 200,
    unfenced: bool = False,
    timeout: float = 300.0,
    poll: float = 0.1,
) -> dict[str, Any]:
    """Run two writer processes on rank 0's pointer under ``prefix``; the figures
    (see the module docstring). The parent reads the pointer every ``poll`` seconds.
    The credential variables must be set in this process."""
    workdir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    procs = []
    for first in (0, 1):
        state = workdir / f"writer{first}"
        state.mkdir()
        argv = [
            sys.executable,
            "-m",
            "harness.reliability.fencing",
            json.dumps(hparams.to_dict()),
            prefix,
            str(state),
            "--first",
            str(first),
            "--rounds",
            str(rounds),
            *(["--unfenced"] if unfenced else []),
        ]
        procs.append(
            subprocess.Popen(
                argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )
    store = hparams.initialize_object(check=False, retry=_RETRY)
    try:
        deadline = time.monotonic() + timeout
        while not all((workdir / f"writer{i}" / "ready").exists() for i in (0, 1)):
            if any(p.poll() is not None for p in procs) or time.monotonic() > deadline:
                break
            time.sleep(0.01)
        (workdir / "go").touch()
        seen: list[int] = []
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            pointer = read_pointer(store, prefix, RANK)
            if pointer is not None:
                seen.append(pointer.latest.mtime_ns)
            time.sleep(poll)
        outs = []
        for p in procs:
            try:
                out, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                out, err = p.communicate()
            if p.returncode != 0:
                raise RuntimeError(f"writer exited with {p.returncode}:\n{err[-3000:]}")
            outs.append(json.loads(out.strip().splitlines()[-1]))
        final = read_pointer(store, prefix, RANK)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        store.close()
    names = {e.name for e in final.history} if final else set()
    committed = [n for o in outs for n in o["committed"]]
    newest = max((int(n[5:10]) for n in committed), default=-1)
    return {
        "rounds": rounds,
        "fenced": int(all(o["fenced"] for o in outs)),
        "committed": len(committed),
        "lost": sum(1 for n in committed if n not in names),
        "backwards": sum(1 for x, y in zip(seen, seen[1:], strict=False) if y < x)
        + sum(o["own_backwards"] for o in outs),
        "latest_is_newest": int(final is not None and final.latest.mtime_ns == newest),
        "conflicts": sum(o["conflicts"] for o in outs),
        "failed_commits": sum(len(o["failures"]) for o in outs),
        "reads": len(seen),
        "commits_per_s": round(len(committed) / max(max(o["seconds"] for o in outs), 1e-9), 1),
        "pointer": pointer_name(prefix, RANK),
    }


def scenario_two_writers(
    workdir: Path, store: str = "moto", rounds: int = 200, unfenced: bool = False
) -> Result:
    """:func:`two_writers` on a server of its own (``moto``, ``azurite`` or ``local``)."""
    from harness.servers.azure import (
        AZURITE_ACCOUNT,
        AZURITE_KEY,
        AZURITE_KEY_ENV,
        AZURITE_SECRET_ENV,
        start_azurite,
        stop_azurite,
    )
    from harness.servers.s3 import start_moto_s3

    if store == "moto":
        server = start_moto_s3(workdir / "moto", serial=True)
        try:
            figures = two_writers(server.hparams(), "fence", workdir / "w", rounds, unfenced)
        finally:
            server.close()
    elif store == "azurite":
        os.environ.setdefault(AZURITE_KEY_ENV, AZURITE_ACCOUNT)
        os.environ.setdefault(AZURITE_SECRET_ENV, AZURITE_KEY)
        az = start_azurite(workdir / "azurite")
        try:
            hp = az.hparams("fence")
            hp.initialize_object(create_container=True, retry=_RETRY).close()
            figures = two_writers(hp, "fence", workdir / "w", rounds, unfenced)
        finally:
            stop_azurite(az)
    else:
        bucket = workdir / "bucket"
        bucket.mkdir()
        hp = ObjectStoreHparams(provider="local", container=str(bucket))
        figures = two_writers(hp, "fence", workdir / "w", rounds, unfenced)
    figures.pop("pointer")
    name = f"8. two uploaders commit one rank's pointer at once ({store}" + (
        ", NOT fenced: the control)" if unfenced else ", fenced)"
    )
    # In the report's terms: cycles = checkpoints per writer, files = commits in all.
    cycles, files = figures.pop("rounds"), figures.pop("committed")
    notes: list[str] = []
    if store == "moto" and not unfenced:
        notes.append(
            f"each case: two writer processes, each with its own journal and the daemon's "
            f"Committer, commit {cycles} checkpoints each to rank 0's pointer at once "
            "(interleaved by mtime) while a third process reads it every 0.1 s; lost = commits "
            "missing from the final pointer; backwards = reads (by any of the three) where "
            "latest was older than before; conflicts = writes that lost the race and were "
            "merged and written again"
        )
        notes.append(
            "moto serves one request at a time here (harness/servers/moto_serial.py): threaded "
            "moto checks If-Match and then writes without a lock, so two conditional PUTs at "
            "once can both pass (seen here: 1 of 200 commits lost); AWS S3 decides them "
            "atomically"
        )
    if unfenced:
        notes.append(
            "the control: the same writers with the plain PUT used where a store ignores "
            "conditions; each writes the pointer merged from its own last write, so the "
            "other's commits vanish and latest moves back"
        )
    return Result(name, {"cycles": cycles, "files": files, "store": store, **figures}, notes)


if __name__ == "__main__":
    raise SystemExit(_writer_main(sys.argv[1:]))
