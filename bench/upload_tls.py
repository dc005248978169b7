"""Upload CPU over HTTPS and plain HTTP: ``ckpt-uploader push`` of one large file, whole
processes, this tree against another source tree (``--base``: a git worktree of an earlier
commit), interleaved.

One ``rclone serve s3`` over plain HTTP and one with ``--cert``/``--key`` (a private CA's
leaf for ``localhost``, trusted through ``ca_bundle``), each on loopback. Every run pushes
the same random file (default 1 GiB) to a fresh prefix with a fresh state directory;
seconds, CPU seconds per GiB (user + system of the push process) and peak RSS are
medians over the runs. Over HTTPS this tree sends ``UNSIGNED-PAYLOAD`` with the signed
CRC64NVME header and computes no sha256; over plain HTTP it still signs the payload's
sha256.

Usage::

    python -m bench.upload_tls --base /tmp/base            # 1 GiB, 3 runs
    python -m bench.upload_tls --base /tmp/base --size-mib 256 --runs 1 --no-write
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
from pathlib import Path

from bench.common import ROOT, MiB, client_env
from bench.report import publish
from bench.restore import _measure

__all__ = ["main"]

log = logging.getLogger("bench.upload_tls")
GiB = 1 << 30


def _push(tree: str, run: Path, uri: str, state: Path) -> list[str]:
    return [
        sys.executable,
        "-c",
        f"import sys; sys.path.insert(0, {tree!r}); from uploader.cli.main import main; "
        "sys.exit(main(sys.argv[1:]))",
        "push",
        str(run),
        "--to",
        uri,
        "--quiet",
        "--state-dir",
        str(state),
    ]


_OBSTORE = """
import os, sys
from pathlib import Path
import obstore
from obstore.store import S3Store
endpoint, path, key, ca, unsigned = sys.argv[1:6]
opts = {"allow_http": True}
if ca:
    opts["root_certificate"] = Path(ca).read_bytes()
store = S3Store(
    "bench", endpoint=endpoint, access_key_id=os.environ["AWS_ACCESS_KEY_ID"],
    secret_access_key=os.environ["AWS_SECRET_ACCESS_KEY"], region="us-east-1",
    virtual_hosted_style_request=False, unsigned_payload=unsigned == "1", client_options=opts,
)
obstore.put(store, key, Path(path))
"""

PEERS = ("obstore", "obstore unsigned", "s5cmd")


def _peer(name: str, endpoint: str, ca: str, path: Path, key: str, s5cmd: str) -> list[str]:
    """A peer's upload as its users type it: ``s5cmd cp``; obstore's ``put`` of a path (its
    own multipart), with its default signed payload or with ``unsigned_payload``."""
    if name == "s5cmd":
        return [s5cmd, "--endpoint-url", endpoint, "cp", str(path), f"s3://bench/{key}"]
    unsigned = "1" if name == "obstore unsigned" else "0"
    return [sys.executable, "-c", _OBSTORE, endpoint, str(path), key, ca, unsigned]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.upload_tls", description=__doc__.split("\n")[0]
    )
    p.add_argument("--base", help="another source tree, run as a row of its own")
    p.add_argument("--size-mib", type=int, default=1024)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--no-write", action="store_true", help="print the table only")
    p.add_argument("--no-peers", action="store_true", help="leave out obstore and s5cmd")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from harness.data import write_random
    from harness.servers.certs import make_certs
    from harness.servers.s3 import find_binary, start_rclone_s3

    trees = {"this tree": ROOT, **({"base": args.base} if args.base else {})}
    rows = [*trees, *(() if args.no_peers else PEERS)]
    s5cmd = find_binary("s5cmd")
    samples: dict[tuple[str, str], list[tuple[float, float, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-upload-tls-") as tmp:
        base = Path(tmp)
        certs = make_certs(base / "certs")
        plain = start_rclone_s3(base / "plain", bucket="bench")
        tls = start_rclone_s3(
            base / "tls",
            bucket="bench",
            extra_args=["--cert", str(certs.leaf), "--key", str(certs.leaf_key)],
        )
        try:
            run = base / "run"
            run.mkdir()
            write_random(run / "model.pt", args.size_mib * MiB)
            env = {**client_env(plain, base), **tls.env, "AWS_CA_BUNDLE": str(certs.ca)}
            load0 = os.getloadavg()[0]
            n = 0
            for r in range(args.runs):
                for tree_name in rows[r % len(rows) :] + rows[: r % len(rows)]:
                    for scheme, server in (("http", plain), ("https", tls)):
                        n += 1
                        https = f"https://localhost:{server.port}"
                        endpoint = (
                            server.endpoint if scheme == "http" else f"{https}&ca_bundle={certs.ca}"
                        )
                        uri = (
                            f"s3://bench/r{n}?endpoint={endpoint}"
                            f"&key_environ={server.key_env}&secret_environ={server.secret_env}"
                        )
                        if tree_name in trees:
                            binary = _push(trees[tree_name], run, uri, base / f"state-{n}")
                        else:
                            peer_endpoint = server.endpoint if scheme == "http" else https
                            ca = str(certs.ca) if scheme == "https" else ""
                            key = f"r{n}/model.pt"
                            binary = _peer(
                                tree_name, peer_endpoint, ca, run / "model.pt", key, s5cmd
                            )
                        child = [sys.executable, "-m", "bench.restore", "--child-download"]
                        s = _measure(
                            [*child, "push", "-", "-", server.endpoint],
                            dict(
                                env,
                                BENCH_ARGV=json.dumps(binary),
                                AWS_ACCESS_KEY_ID=server.key,
                                AWS_SECRET_ACCESS_KEY=server.secret,
                            ),
                        )
                        gib = args.size_mib * MiB / GiB
                        samples.setdefault((tree_name, scheme), []).append(
                            (s.seconds, s.cpu / gib, s.rss_mib)
                        )
                        log.info(
                            "run %d %-9s %-5s %6.2f s  cpu %.2f s/GiB  rss %.0f MiB",
                            r + 1,
                            tree_name,
                            scheme,
                            s.seconds,
                            s.cpu / gib,
                            s.rss_mib,
                        )
            load1 = os.getloadavg()[0]
        finally:
            plain.close()
            tls.close()

    def med(key: tuple[str, str], i: int) -> float:
        return statistics.median(x[i] for x in samples[key])

    lines = [
        "## Uploads over HTTPS and plain HTTP (`bench/upload_tls.py`)",
        "",
        f"`ckpt-uploader push` of one {args.size_mib} MiB random file to `rclone serve s3` on "
        "loopback, over plain HTTP and over HTTPS (a private CA's certificate, trusted through "
        f"`ca_bundle`), as a whole process; {args.runs} interleaved run(s), medians. "
        "*base*: the tree before CRC64NVME digests (sha256 of every part, signed payloads "
        "over HTTPS too).",
        "",
        "| tree | scheme | MiB/s | CPU s/GiB | peak RSS MiB |",
        "|---|---|---:|---:|---:|",
    ]
    for tree_name in rows:
        for scheme in ("http", "https"):
            key = (tree_name, scheme)
            lines.append(
                f"| {tree_name} | {scheme} | {args.size_mib / med(key, 0):.0f} "
                f"| {med(key, 1):.2f} | {med(key, 2):.0f} |"
            )
    this_https = med(("this tree", "https"), 1)
    this_http = med(("this tree", "http"), 1)
    lines += ["", f"This tree over HTTPS / over HTTP, CPU per GiB: {this_https / this_http:.2f}x."]
    if args.base:
        ratio = this_https / med(("base", "https"), 1)
        lines.append(f"Upload CPU per GiB over HTTPS, this tree / base: {ratio:.2f}x.")
    for peer in () if args.no_peers else PEERS:
        for scheme in ("http", "https"):
            speed = med((peer, scheme), 0) / med(("this tree", scheme), 0)
            cpu = med(("this tree", scheme), 1) / med((peer, scheme), 1)
            lines.append(
                f"Over {scheme.upper()}, this tree / {peer}: {speed:.2f}x the speed, "
                f"{cpu:.2f}x the CPU per GiB."
            )
    lines += [
        "",
        f"Load average (1 min) on this 2-core machine at the start and the end of these "
        f"runs: {load0:.1f} and {load1:.1f}.",
    ]
    text = "\n".join(lines)
    publish("upload-tls", text, "bench.upload_tls", argv, not args.no_write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
