"""The sidecar's Dockerfile, parsed: slim base, non-root user, the console script as the
entrypoint, no torch. (Building it needs an OCI builder and the base image from a
registry; where one runs, ``docker build .`` / ``podman build .`` builds it.)"""

from __future__ import annotations

import json
import re
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[2]


def _instructions() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile").read_text()
    text = re.sub(r"\\\n", " ", text)  # continuation lines
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def _final_stage() -> list[tuple[str, str]]:
    ins = _instructions()
    last = max(i for i, (w, _) in enumerate(ins) if w == "FROM")
    return ins[last:]


def test_final_stage_is_slim_and_runs_as_a_non_root_user() -> None:
    final = _final_stage()
    base = final[0][1]
    assert re.match(r"python:3\.11-slim\b", base), base
    users = [rest for w, rest in final if w == "USER"]
    assert users, "the final stage sets no USER: it would run as root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), user
    # The user exists: created in the final stage with that uid.
    assert any(w == "RUN" and "useradd" in rest and user in rest for w, rest in final)


def test_entrypoint_is_the_console_script_in_exec_form() -> None:
    final = _final_stage()
    [entry] = [rest for w, rest in final if w == "ENTRYPOINT"]
    argv = json.loads(entry)  # exec form: signals reach the daemon (it drains on SIGTERM)
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert argv == ["ckpt-uploader"] and "ckpt-uploader" in scripts


def test_no_torch_is_installed() -> None:
    runs = " ".join(rest for w, rest in _instructions() if w == "RUN")
    assert "torch" not in runs.lower()
    assert not re.search(r"\.\[[^\]]*\]", runs), "no extras (torch, dev) are installed"
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert not any(d.lower().startswith(("torch", "pytorch")) for d in deps)


def test_build_context_holds_only_the_package() -> None:
    ignore = (ROOT / ".dockerignore").read_text().split()
    assert ignore[ignore.index("*") :][:1] == ["*"]  # everything out, then what is needed
    copied = " ".join(rest for w, rest in _instructions() if w == "COPY" and "--from" not in rest)
    for needed in ("pyproject.toml", "uploader/", "ckpt/"):
        assert needed in copied and f"!{needed}" in ignore
