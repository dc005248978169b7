"""``ckpt-uploader check URI``: a pre-flight for job scripts.

One row per question, in order: which identity was found (never a secret), whether
the bucket is reachable, whether the store takes put, get, list, conditional writes
and delete (on a probe object under the prefix, removed after), the TLS status, and
the clock skew against the store's ``Date`` header (SigV4 refuses requests more than
15 minutes off). Exit 0 when every row passes, 2 otherwise; ``--json`` prints the same
rows as one JSON object.

Example::

    ckpt-uploader check s3://ckpts/exp1 && python train.py
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any

from uploader.cli.options import EXIT_CODES, Formatter, add_output_options, add_store_options
from uploader.config.hparams import StoreLocation, join_key
from uploader.config.resolve import resolve
from uploader.errors import ExitCode, PreconditionFailedError, UploaderError
from uploader.redact import redact
from uploader.transfer.store import ObjectStore

__all__ = ["register", "cmd_check", "MAX_SKEW"]

#: Seconds of clock difference beyond which a row fails (SigV4 allows 15 minutes).
MAX_SKEW = 300.0


@dataclass
class Row:
    check: str
    ok: bool
    detail: str


def register(sub: Any) -> None:
    """Add the ``check`` subcommand to ``sub`` (argparse subparsers)."""
    p = sub.add_parser(
        "check",
        help="pre-flight: identity, bucket, permissions, TLS and clock of a store",
        description="Check a store before a job relies on it: which identity was found, "
        "whether the bucket is reachable, whether put, get, list, conditional writes and "
        "delete work (on a probe object under URI's prefix, removed after), TLS, and clock "
        "skew against the store. Exit 0 when all pass, 2 otherwise.",
        epilog=EXIT_CODES,
        formatter_class=Formatter,
    )
    p.add_argument("uri", metavar="URI", nargs="?", help="the store, as push names it")
    p.add_argument("--json", action="store_true", help="print JSON (default: a table)")
    add_store_options(p, to=False)
    add_output_options(p)
    p.set_defaults(func=cmd_check)


def cmd_check(args: argparse.Namespace) -> int:
    rows = run_checks(resolve(vars(args), reading=True).location)
    ok = all(r.ok for r in rows)
    if args.json:
        print(json.dumps({"ok": ok, "checks": [asdict(r) for r in rows]}, indent=1))
    else:
        width = max(len(r.check) for r in rows)
        for r in rows:
            print(f"{r.check:<{width}}  {'ok' if r.ok else 'FAILED':<6}  {r.detail}")
    return ExitCode.OK if ok else ExitCode.CONFIG


def _why(exc: BaseException) -> str:
    return redact(f"{type(exc).__name__}: {exc}")[:400]


def run_checks(loc: StoreLocation) -> list[Row]:
    """The rows of the table for the store at ``loc`` (each check guarded on its own)."""
    rows: list[Row] = []
    try:
        store = loc.hparams.initialize_object(check=False)
    except UploaderError as exc:
        return [Row("identity", False, _why(exc))]
    with store:
        rows.append(Row("identity", True, store.identity))
        try:
            store.backend.check_container(False)
            rows.append(Row("bucket", True, f"{store.settings.container} reachable"))
        except UploaderError as exc:
            rows.append(Row("bucket", False, _why(exc)))
            return rows + [_tls(store)]
        rows += _probe(store, loc)
        rows.append(_tls(store))
        rows.append(_clock(store))
    return rows


def _probe(store: ObjectStore, loc: StoreLocation) -> list[Row]:
    backend = store.backend
    name = join_key(loc.prefix, f".ckpt-uploader-check-{uuid.uuid4().hex[:12]}")
    data = b"ckpt-uploader check probe\n"
    rows: list[Row] = []

    def step(check: str, fn: Any, detail: str) -> bool:
        try:
            fn()
        except UploaderError as exc:
            rows.append(Row(check, False, _why(exc)))
            return False
        rows.append(Row(check, True, detail))
        return True

    def get() -> None:
        got, _ = backend.get_versioned(name)
        if got != data:
            raise UploaderError(f"read back {len(got)} bytes that differ from what was put")

    def listed() -> None:
        if name not in {o.name for o in backend.list(name)}:
            raise UploaderError(f"{name} is not in the listing after it was put")

    if not step(
        "put", lambda: backend.put_bytes(name, data, {}, hashlib.sha256(data).digest()), name
    ):
        return rows
    step("get", get, "probe read back intact")
    step("list", listed, "probe listed")
    rows.append(_conditional(store, name + ".cas", data))
    if not step("delete", lambda: backend.delete(name), "probe removed"):
        rows[-1].detail += f"; the probe {name} is left behind: remove it by hand"
    return rows


def _conditional(store: ObjectStore, name: str, data: bytes) -> Row:
    backend = store.backend
    if not backend.conditional:
        return Row("conditional writes", True, "not offered by this store (commits unfenced)")
    digest = hashlib.sha256(data).digest()
    try:
        backend.put_if(name, data, {}, digest, None)
        try:
            backend.put_if(name, data, {}, digest, None)
            detail = "ignored by the store: commits are not fenced against another writer"
        except PreconditionFailedError:
            detail = "honoured (If-None-Match refused a second create)"
        return Row("conditional writes", True, detail)
    except UploaderError as exc:
        return Row("conditional writes", False, _why(exc))
    finally:
        try:
            backend.delete(name)
        except UploaderError:
            pass


def _tls(store: ObjectStore) -> Row:
    st = store.settings
    if st.family == "local":
        return Row("tls", True, "not used (local directory)")
    if not st.secure:
        return Row("tls", True, "plain HTTP (no TLS): fine on loopback only")
    if st.insecure_skip_tls_verify:
        return Row("tls", False, "certificate NOT verified (insecure_skip_tls_verify)")
    return Row(
        "tls", True, "certificate verified" + (f" against {st.ca_bundle}" if st.ca_bundle else "")
    )


def _clock(store: ObjectStore) -> Row:
    try:
        then = store.backend.server_date()
    except UploaderError as exc:
        return Row("clock", False, _why(exc))
    if then is None:
        return Row("clock", True, "the store's clock is not read for this provider")
    skew = time.time() - then
    ok = abs(skew) <= MAX_SKEW
    detail = f"{skew:+.0f} s against the store's Date header"
    if not ok:
        detail += "; fix this machine's clock (NTP): signed requests are refused past 15 minutes"
    return Row("clock", ok, detail)
