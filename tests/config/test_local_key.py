"""libcloud LOCAL's (and Composer's) convention: the key is the base directory and the
container a folder in it (``"."``: the base itself), beside an absolute container. Real
directories, real stores, and ``python -m uploader push`` in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from harness.data import write_random
from tests.daemon.test_process import REPO, atomic_write, sha256, uploader_cmd
from tests.fixtures.stores import roundtrip
from uploader import ConfigError, ContainerNotFoundError, ObjectStoreHparams
from uploader.config.hparams import StoreLocation
from uploader.config.options import WatchOptions, to_argv
from uploader.launch.options import worker_environment
from uploader.redact import redact

MiB = 1 << 20
VAR = "CKPT_LOCAL_BASE"


@pytest.fixture
def base(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An existing base directory, also exported as ``$CKPT_LOCAL_BASE``."""
    path = tmp_path / "remote"
    path.mkdir()
    monkeypatch.setenv(VAR, str(path))
    return path


def test_the_composer_snippet_works_as_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    remote_dir = tmp_path / "remote_dir"
    remote_dir.mkdir()
    monkeypatch.setenv("OBJECT_STORE_KEY", "")  # so that it is restored after the test
    os.environ["OBJECT_STORE_KEY"] = str(remote_dir)
    hp = ObjectStoreHparams(provider="local", key_environ="OBJECT_STORE_KEY", container=".")
    with hp.initialize_object() as store:
        roundtrip(store, tmp_path, 3 * MiB + 5, name="run/rank_0/ep1.pt")
    assert (remote_dir / "run" / "rank_0" / "ep1.pt").stat().st_size == 3 * MiB + 5


# Each way of naming <base>/bucket: (hparams fields, given the base directory).
CONVENTIONS: dict[str, Callable[[Path], dict]] = {
    "absolute container": lambda b: {"container": str(b / "bucket")},
    "key_environ + folder": lambda b: {"key_environ": VAR, "container": "bucket"},
    "extra key + folder": lambda b: {"extra_init_kwargs": {"key": str(b)}, "container": "bucket"},
    "key_environ is the folder, '.'": lambda b: {
        "key_environ": "CKPT_LOCAL_ROOT",
        "container": ".",
    },
    "extra key is the folder, '.'": lambda b: {
        "extra_init_kwargs": {"key": str(b / "bucket")},
        "container": ".",
    },
}


@pytest.mark.parametrize("convention", sorted(CONVENTIONS))
def test_each_convention_round_trips_into_the_same_directory(
    convention: str, base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (base / "bucket").mkdir()
    monkeypatch.setenv("CKPT_LOCAL_ROOT", str(base / "bucket"))
    hp = ObjectStoreHparams(provider="local", **CONVENTIONS[convention](base))
    with hp.initialize_object(part_size=256 << 10) as store:
        assert store.settings.container == str(base / "bucket")
        roundtrip(store, tmp_path, MiB + 7)  # multipart: 5 parts
        roundtrip(store, tmp_path, 1000, name="small.bin")
    assert (base / "bucket" / "run" / "rank_0" / f"f{MiB + 7}.bin").stat().st_size == MiB + 7
    assert (base / "bucket" / "small.bin").stat().st_size == 1000
    # The absolute convention reads what this one wrote: one store, two names.
    plain = ObjectStoreHparams(provider="local", container=str(base / "bucket"))
    with plain.initialize_object() as store:
        assert sorted(i.name for i in store.list("")) == [f"run/rank_0/f{MiB + 7}.bin", "small.bin"]


def test_create_container_makes_the_folder_but_never_the_base(base: Path, tmp_path: Path) -> None:
    hp = ObjectStoreHparams(provider="local", key_environ=VAR, container="new")
    with pytest.raises(ContainerNotFoundError, match="create-container"):
        hp.initialize_object()
    with hp.initialize_object(create_container=True) as store:
        store.put_bytes("x", b"x")
    assert (base / "new" / "x").read_bytes() == b"x"

    missing = tmp_path / "not-here"
    hp = ObjectStoreHparams(
        provider="local", extra_init_kwargs={"key": str(missing)}, container="new"
    )
    with pytest.raises(ConfigError) as info:
        hp.initialize_object(create_container=True)
    text = str(info.value)
    assert str(missing) in text and "does not exist" in text and f"mkdir -p {missing}" in text
    assert not missing.exists()


def test_a_missing_base_directory_names_the_variable_and_the_path(
    base: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gone = base / "gone"
    monkeypatch.setenv(VAR, str(gone))
    for container in (".", "bucket"):
        hp = ObjectStoreHparams(provider="local", key_environ=VAR, container=container)
        with pytest.raises(ConfigError) as info:
            hp.initialize_object(create_container=True)
        text = str(info.value)
        assert f"${VAR}" in text and str(gone) in text and "mkdir -p" in text
    assert not gone.exists()


@pytest.mark.parametrize(
    ("value", "words"),
    [(None, "is not set"), ("  ", "is empty"), ("relative/dir", "must be an absolute path")],
)
def test_the_key_variable_must_hold_an_absolute_path(
    value: str | None, words: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if value is None:
        monkeypatch.delenv(VAR, raising=False)
    else:
        monkeypatch.setenv(VAR, value)
    hp = ObjectStoreHparams(provider="local", key_environ=VAR, container=".")
    with pytest.raises(ConfigError, match=words) as info:
        hp.initialize_object()
    assert VAR in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"container": "bucket"}, "relative; give an absolute directory"),
        ({"container": "."}, "key_environ=VAR"),
        ({"container": "../up", "key_environ": VAR}, r"contains '\.\.'"),
        ({"container": "a/../../up", "extra_init_kwargs": {"key": "/tmp"}}, r"'\.\.'"),
        ({"container": ".", "key_environ": VAR, "extra_init_kwargs": {"key": "/t"}}, "twice"),
        ({"container": ".", "extra_init_kwargs": {"key": ""}}, "non-empty path"),
        ({"container": ".", "extra_init_kwargs": {"key": 3}}, "non-empty path"),
    ],
)
def test_what_names_no_directory_is_refused_up_front(kwargs: dict, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        ObjectStoreHparams(provider="local", **kwargs)


def test_the_key_is_a_path_not_a_secret(base: Path) -> None:
    hp = ObjectStoreHparams(provider="local", key_environ=VAR, container=".")
    assert hp.credentials() == (None, None)
    env = worker_environment(hp, {})  # the variable must still be set for the worker
    assert env[VAR] == str(base)
    hp.initialize_object().close()
    assert redact(f"wrote {base}/x") == f"wrote {base}/x"  # never masked in messages
    argv = to_argv(WatchOptions(), StoreLocation(hp, "exp"))
    assert argv == ["--provider=local", "--container=.", f"--key-environ={VAR}", "--prefix=exp"]
    assert str(base) not in " ".join(argv)


def _push(run: Path, *store_flags: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        uploader_cmd("push", str(run), *store_flags, "--settle=0.1", "-q"),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        env={**os.environ, **env},
    )


def test_cli_push_with_the_key_convention_then_pull_by_uri(base: Path, tmp_path: Path) -> None:
    run = tmp_path / "rank_0"
    run.mkdir()
    atomic_write(run / "ep1.pt", 300_000)
    flags = ("--provider=local", f"--key-environ={VAR}", "--container=bucket", "--prefix=exp")
    out = _push(run, *flags, "--create-container", env={VAR: str(base)})
    assert out.returncode == 0, out.stderr
    assert sha256(base / "bucket" / "exp" / "rank_0" / "ep1.pt") == sha256(run / "ep1.pt")
    pointer = json.loads((base / "bucket" / "exp" / "rank_0" / "latest.json").read_text())
    assert pointer["latest"]["name"] == "ep1.pt"

    # The same store by URI: pull checks size and digest.
    dest = tmp_path / "out.pt"
    pulled = subprocess.run(
        uploader_cmd("pull", f"file://{base}/bucket?prefix=exp/rank_0/ep1.pt", str(dest), "-q"),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert pulled.returncode == 0, pulled.stderr
    assert dest.read_bytes() == (run / "ep1.pt").read_bytes()

    # '.' with the key naming the folder itself; and the key as --extra-init-kwargs.
    atomic_write(run / "ep2.pt", 1000)
    out = _push(
        run,
        "--provider=local",
        f"--key-environ={VAR}",
        "--container=.",
        env={VAR: str(base / "bucket")},
    )
    assert out.returncode == 0, out.stderr
    assert (base / "bucket" / "rank_0" / "ep2.pt").stat().st_size == 1000
    kwargs = json.dumps({"key": str(base)})
    out = _push(
        run,
        "--provider=local",
        f"--extra-init-kwargs={kwargs}",
        "--container=b2",
        "--create-container",
        f"--state-dir={tmp_path / 'state-b2'}",  # a new store: a journal of its own
        env={},
    )
    assert out.returncode == 0, out.stderr
    assert (base / "b2" / "rank_0" / "ep2.pt").stat().st_size == 1000


def test_cli_push_into_a_missing_base_is_a_configuration_error(tmp_path: Path) -> None:
    run = tmp_path / "rank_0"
    run.mkdir()
    write_random(run / "ep1.pt", 1000)
    gone = tmp_path / "gone"
    flags = ("--provider=local", f"--key-environ={VAR}", "--container=.", "--create-container")
    out = _push(run, *flags, env={VAR: str(gone)})
    assert out.returncode == 2
    assert f"${VAR}" in out.stderr and str(gone) in out.stderr and "mkdir -p" in out.stderr
    assert not gone.exists()
    out = _push(run, "--provider=local", "--container=.", env={})
    assert out.returncode == 2 and "key_environ" in out.stderr
