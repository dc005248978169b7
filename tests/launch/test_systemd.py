"""The systemd unit: `systemd-analyze verify` accepts it, its settings hold together, and
its ExecStart line, run with its environment file as systemd would, uploads, drains on
SIGTERM and resumes after a restart.

systemd itself cannot run services in this test environment (no init system of
our own), so the test plays systemd's part for one service: it parses the unit,
expands the specifiers (%i) and ``${VAR}`` references, builds the environment
from ``Environment=``, ``EnvironmentFile=`` and ``StateDirectory=`` (as
``$STATE_DIRECTORY``), and runs the command as a process. Absolute paths of the
unit are mapped into a temporary root (``/etc/ckpt-uploader`` ->
``<tmp>/etc/ckpt-uploader`` ...); the installed binary is this environment's.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path

from harness.servers.s3 import S3Server, find_binary
from uploader.bucket.pointer import read_pointer

ROOT = Path(__file__).resolve().parents[2]
SYSTEMD = ROOT / "systemd"
UNIT = SYSTEMD / "ckpt-uploader@.service"
INSTALLED_BINARY = "/opt/ckpt-uploader/bin/ckpt-uploader"


# -- a small reader of unit files -------------------------------------------------------------
def parse_unit(text: str) -> dict[str, list[tuple[str, str]]]:
    """Sections -> [(key, value)], keeping repeated keys in order (as systemd does)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    pending = ""
    for raw in text.splitlines():
        line = pending + raw.strip()
        pending = ""
        if not line or line[0] in "#;":
            continue
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        assert current is not None, f"setting outside a section: {line}"
        key, _, value = line.partition("=")
        current.append((key.strip(), value.strip()))
    return sections


def values(unit: dict[str, list[tuple[str, str]]], section: str, key: str) -> list[str]:
    return [v for k, v in unit.get(section, []) if k == key]


def one(unit: dict[str, list[tuple[str, str]]], section: str, key: str) -> str:
    found = values(unit, section, key)
    assert len(found) == 1, f"[{section}] {key}= appears {len(found)} times"
    return found[0]


def expand_specifiers(text: str, instance: str, unit_name: str) -> str:
    table = {"i": instance, "I": instance.replace("-", "/"), "n": unit_name, "%": "%"}

    def sub(m: re.Match[str]) -> str:
        if m.group(1) not in table:
            raise AssertionError(f"specifier %{m.group(1)} is not handled by this test")
        return table[m.group(1)]

    return re.sub(r"%(.)", sub, text)


def read_environment_file(path: Path) -> dict[str, str]:
    """systemd's EnvironmentFile= format: KEY=VALUE lines, # or ; comments, quotes."""
    env: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{path}: not KEY=VALUE: {line!r}"
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        env[key.strip()] = value
    return env


def expand_exec(line: str, env: dict[str, str]) -> list[str]:
    """Split ExecStart= and expand ${VAR} (one word) and $VAR (split), as systemd does."""
    words = shlex.split(line)
    exe = words[0].lstrip("-@+!:")
    out = [exe]
    for w in words[1:]:
        m = re.fullmatch(r"\$([A-Za-z_][A-Za-z0-9_]*)", w)
        if m:
            out.extend(env.get(m.group(1), "").split())
            continue
        out.append(re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", lambda m: env.get(m.group(1), ""), w))
    return out


class FakeRoot:
    """Maps the unit's absolute paths into a temporary directory tree."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.map = {
            INSTALLED_BINARY: find_binary("ckpt-uploader"),
            "/etc/ckpt-uploader/": str(base / "etc" / "ckpt-uploader") + "/",
            "/srv/training/": str(base / "srv" / "training") + "/",
            "/var/lib/": str(base / "var" / "lib") + "/",
        }

    def __call__(self, text: str) -> str:
        for src, dst in self.map.items():
            text = text.replace(src, dst)
        return text


def service_environment(
    unit: dict[str, list[tuple[str, str]]], instance: str, root: FakeRoot
) -> dict[str, str]:
    """The environment systemd gives the service (manager env + Environment= + files)."""
    name = f"ckpt-uploader@{instance}.service"
    env = {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "LANG": "C.UTF-8",
    }
    for assignment in values(unit, "Service", "Environment"):
        for word in shlex.split(assignment):
            key, _, value = word.partition("=")
            env[key] = root(expand_specifiers(value, instance, name))
    for spec in values(unit, "Service", "EnvironmentFile"):
        optional = spec.startswith("-")
        path = Path(root(expand_specifiers(spec.lstrip("-"), instance, name)))
        if optional and not path.exists():
            continue
        env.update(read_environment_file(path))  # files override Environment=
    states = values(unit, "Service", "StateDirectory")
    if states:
        env["STATE_DIRECTORY"] = ":".join(
            root("/var/lib/" + expand_specifiers(s, instance, name)) for s in states
        )
    return env


# -- verify ---------------------------------------------------------------------------------
def systemd_analyze() -> str:
    tool = shutil.which("systemd-analyze")
    assert tool, "systemd-analyze is missing: run 'make systemd-tools' (installs systemd)"
    return tool


def verify(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [systemd_analyze(), "verify", "--man=no", "--generators=no", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    # The shipped unit as it is: the only complaint allowed is that the binary is not
    # installed at /opt/ckpt-uploader on this machine.
    shipped = tmp_path / "shipped" / UNIT.name
    shipped.parent.mkdir()
    shutil.copy(UNIT, shipped)
    res = verify(shipped)
    lines = [ln for ln in (res.stdout + res.stderr).splitlines() if ln.strip()]
    unexpected = [ln for ln in lines if f"Command {INSTALLED_BINARY} is not executable" not in ln]
    assert not unexpected, "\n".join(lines)

    # Installed as the docs say (ExecStart pointing at a real ckpt-uploader), as a
    # template and as an instance: no warning at all.
    installed = UNIT.read_text().replace(INSTALLED_BINARY, find_binary("ckpt-uploader"))
    for name in ("ckpt-uploader@.service", "ckpt-uploader@myrun.service"):
        unit = tmp_path / "installed" / name
        unit.parent.mkdir(exist_ok=True)
        unit.write_text(installed)
        res = verify(unit)
        assert res.returncode == 0 and not (res.stdout + res.stderr).strip(), (
            res.stdout + res.stderr
        )


def test_verify_rejects_a_broken_unit(tmp_path: Path) -> None:
    """The check above can fail: a typo in a directive is reported."""
    broken = UNIT.read_text().replace(INSTALLED_BINARY, find_binary("ckpt-uploader"))
    broken = broken.replace("NoNewPrivileges=yes", "NoNewPrivilege=yes")
    unit = tmp_path / "ckpt-uploader@.service"
    unit.write_text(broken)
    res = verify(unit)
    assert "NoNewPrivilege" in res.stdout + res.stderr


def test_unit_settings_hold_together() -> None:
    unit = parse_unit(UNIT.read_text())
    exec_start = one(unit, "Service", "ExecStart")
    argv = shlex.split(exec_start)
    assert argv[0] == INSTALLED_BINARY and argv[1] == "watch"
    # The instance names the config file; credentials come from an EnvironmentFile.
    assert argv[argv.index("--config") + 1] == "/etc/ckpt-uploader/%i.toml"
    assert [v.lstrip("-") for v in values(unit, "Service", "EnvironmentFile")] == [
        "/etc/ckpt-uploader/%i.env"
    ]
    assert not any("KEY" in a or "SECRET" in a for a in argv)
    # The state directory carries the journal across restarts.
    assert argv[argv.index("--state-dir") + 1] == "${STATE_DIRECTORY}"
    assert one(unit, "Service", "StateDirectory") == "ckpt-uploader/%i"
    # SIGTERM drains; systemd waits at least the drain timeout before SIGKILL.
    assert one(unit, "Service", "KillSignal") == "SIGTERM"
    drain = float(argv[argv.index("--drain-timeout") + 1])
    assert float(one(unit, "Service", "TimeoutStopSec")) >= drain + 30
    assert one(unit, "Service", "Restart") == "on-failure"
    assert "2" in one(unit, "Service", "RestartPreventExitStatus").split()
    # Hardening.
    assert one(unit, "Service", "NoNewPrivileges") == "yes"
    assert one(unit, "Service", "ProtectSystem") == "strict"
    assert one(unit, "Service", "PrivateTmp") == "yes"
    assert one(unit, "Service", "ProtectHome") in ("yes", "read-only", "tmpfs")
    assert values(unit, "Service", "User") or values(unit, "Service", "DynamicUser") == ["yes"]
    rw = " ".join(values(unit, "Service", "ReadWritePaths")).split()
    [run_default] = [
        v.split("=", 1)[1]
        for v in values(unit, "Service", "Environment")
        if v.startswith("CKPT_UPLOADER_RUN_DIR=")
    ]
    assert any(run_default.startswith(p.rstrip("/") + "/") for p in rw), (run_default, rw)
    # Training keeps priority.
    assert int(one(unit, "Service", "Nice")) > 0
    assert one(unit, "Service", "IOSchedulingClass") in ("best-effort", "idle")
    # Every flag on the command line is one ckpt-uploader accepts.
    from uploader.cli.main import build_parser

    build_parser().parse_args([a.replace("%i", "x") for a in argv[1:]])


def test_example_config_and_env_file_are_what_the_cli_reads(tmp_path: Path) -> None:
    from uploader.config.files import load_config_file
    from uploader.config.options import WATCH_KEYS

    cfg = load_config_file(str(SYSTEMD / "ckpt-uploader.example.toml"))
    assert set(cfg["watch"]) <= set(WATCH_KEYS)
    env = read_environment_file(SYSTEMD / "ckpt-uploader.env.example")
    store = cfg["store"]
    # No key variables named: the instance profile through botocore's chain; the env file
    # holds no keys, only (commented out) the fallback where no role can be attached.
    assert "key_environ" not in store and "secret_environ" not in store
    assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} & set(env)
    text = (SYSTEMD / "ckpt-uploader.env.example").read_text()
    assert "instance profile" in text and "# AWS_ACCESS_KEY_ID=" in text


# -- run the ExecStart line -----------------------------------------------------------------
def start_service(
    unit: dict[str, list[tuple[str, str]]], env: dict[str, str], root: FakeRoot
) -> tuple[subprocess.Popen[bytes], list[str]]:
    """``systemctl start ckpt-uploader@myrun``: run ExecStart= in the service environment."""
    line = expand_specifiers(
        one(unit, "Service", "ExecStart"), "myrun", "ckpt-uploader@myrun.service"
    )
    argv = expand_exec(root(line), env)
    Path(env["STATE_DIRECTORY"]).mkdir(parents=True, exist_ok=True)
    with open(root.base / "service.log", "ab") as log:
        proc = subprocess.Popen(
            argv,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return proc, argv


def wait_for(pred, seconds: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {seconds}s waiting for {what}")


def write_checkpoint(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp"
    tmp.write_bytes(data)
    os.replace(tmp, path)


def test_exec_start_with_its_environment_file_uploads_drains_and_resumes(
    rclone_s3: S3Server, tmp_path: Path
) -> None:
    root = FakeRoot(tmp_path / "root")
    etc = Path(root("/etc/ckpt-uploader/"))
    etc.mkdir(parents=True)
    bucket = f"systemd-unit-{uuid.uuid4().hex[:8]}"
    rclone_s3.make_bucket(bucket)
    # The example config, pointed at the test's S3 server; the example env file with the
    # server's credentials. The variable names stay those of the shipped examples.
    config = (SYSTEMD / "ckpt-uploader.example.toml").read_text()
    uri = f"s3://{bucket}/exp1?endpoint=http://{rclone_s3.host}:{rclone_s3.port}"
    config = re.sub(r'(?m)^uri = ".*"$', f'uri = "{uri}"', config)
    (etc / "myrun.toml").write_text(config)
    key, secret = os.environ[rclone_s3.key_env], os.environ[rclone_s3.secret_env]
    env_text = (SYSTEMD / "ckpt-uploader.env.example").read_text()
    # No instance profile here: the example's commented static-key fallback, uncommented.
    env_text = re.sub(r"(?m)^# AWS_ACCESS_KEY_ID=.*$", f"AWS_ACCESS_KEY_ID={key}", env_text)
    env_text = re.sub(
        r"(?m)^# AWS_SECRET_ACCESS_KEY=.*$", f"AWS_SECRET_ACCESS_KEY={secret}", env_text
    )
    (etc / "myrun.env").write_text(env_text)
    os.chmod(etc / "myrun.env", 0o600)

    unit = parse_unit(UNIT.read_text())
    env = service_environment(unit, "myrun", root)
    assert env["AWS_SECRET_ACCESS_KEY"] == secret  # from the file, not from this process
    run_dir = Path(env["CKPT_UPLOADER_RUN_DIR"])
    assert run_dir == Path(root("/srv/training/myrun"))
    store = rclone_s3.hparams(bucket).initialize_object()

    def uploaded(name: str) -> bool:
        return store.exists(f"exp1/rank_0/checkpoints/{name}")

    # First start: uploads what training writes.
    proc, argv = start_service(unit, env, root)
    assert secret not in " ".join(argv) and key not in " ".join(argv)
    try:
        write_checkpoint(run_dir / "checkpoints" / "ep1.pt", b"one" * 100_000)
        wait_for(lambda: uploaded("ep1.pt"), 30, "ep1.pt in the bucket")
        write_checkpoint(run_dir / "checkpoints" / "ep2.pt", b"two" * 100_000)
        time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)  # systemctl stop
        assert proc.wait(timeout=60) == 0, (root.base / "service.log").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert uploaded("ep2.pt")  # drained before exiting
    first_mtime = (
        (rclone_s3.data_dir / bucket / "exp1/rank_0/checkpoints/ep1.pt").stat().st_mtime_ns
    )
    log_text = (root.base / "service.log").read_text()
    assert secret not in log_text

    # While stopped, training wrote another checkpoint; the restart resumes from the
    # journal in $STATE_DIRECTORY: ep3 is uploaded, ep1 and ep2 are not sent again.
    write_checkpoint(run_dir / "checkpoints" / "ep3.pt", b"three" * 100_000)
    proc, argv = start_service(unit, env, root)
    try:
        wait_for(lambda: uploaded("ep3.pt"), 30, "ep3.pt in the bucket after the restart")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, (root.base / "service.log").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert (
        rclone_s3.data_dir / bucket / "exp1/rank_0/checkpoints/ep1.pt"
    ).stat().st_mtime_ns == first_mtime
    status = subprocess.run(
        [
            find_binary("ckpt-uploader"),
            "status",
            str(run_dir),
            "--state-dir",
            env["STATE_DIRECTORY"],
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout)
    assert report["done"] == 3 and report["failed"] == 0
    assert {f["path"]: f["attempts"] for f in report["files"]} == {
        "checkpoints/ep1.pt": 1,
        "checkpoints/ep2.pt": 1,
        "checkpoints/ep3.pt": 1,
    }
    pointer = read_pointer(store, "exp1", 0)
    assert pointer is not None and pointer.latest.name == "checkpoints/ep3.pt"
    # The journal lives in the state directory, not in the run directory.
    assert not any(p.name.startswith(".ckpt-uploader") for p in run_dir.iterdir())


def test_exec_start_without_credentials_is_a_configuration_error(
    tmp_path: Path, rclone_s3: S3Server
) -> None:
    """Exit 2, which RestartPreventExitStatus keeps systemd from restarting in a loop."""
    root = FakeRoot(tmp_path / "root")
    etc = Path(root("/etc/ckpt-uploader/"))
    etc.mkdir(parents=True)
    uri = f"s3://ckpts/exp1?endpoint=http://{rclone_s3.host}:{rclone_s3.port}"
    config = re.sub(
        r'(?m)^uri = ".*"$', f'uri = "{uri}"', (SYSTEMD / "ckpt-uploader.example.toml").read_text()
    )
    (etc / "myrun.toml").write_text(config)  # and no myrun.env
    unit = parse_unit(UNIT.read_text())
    env = service_environment(unit, "myrun", root)
    proc, _ = start_service(unit, env, root)
    try:
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert code == 2
    assert "AWS_ACCESS_KEY_ID" in (root.base / "service.log").read_text()
