"""Every python example in docs/integrations.md runs as written.

Each block runs as its own script in a fresh directory, with ``CKPT_BUCKET`` pointing
at a ``file://`` bucket there (the examples read their bucket from it). The examples
assert what they promise (the step reached, the tensors restored); the test checks the
exit status, that the bucket holds a committed pointer, and that the second "machine"
restored a checkpoint from it.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from harness.trainers import ROOT, trainer_env
from uploader import parse_uri
from uploader.bucket.pointer import read_pointer

pytestmark = pytest.mark.timeout(300)

DOC = ROOT / "docs" / "integrations.md"


def _examples() -> dict[str, str]:
    """``{section title: python block}`` of the doc, in order."""
    out: dict[str, str] = {}
    title = ""
    for match in re.finditer(r"^## ([^\n]+)$|^```python\n(.*?)^```$", DOC.read_text(), re.M | re.S):
        if match.group(1):
            title = match.group(1).strip()
        else:
            out[title] = match.group(2)
    return out


def test_the_doc_has_an_example_per_framework() -> None:
    names = list(_examples())
    assert len(names) == 3, names
    assert [n.split()[0] for n in names] == ["PyTorch", "Hugging", "torch"]


@pytest.mark.parametrize("name", list(_examples()))
def test_example_runs(name: str, tmp_path: Path) -> None:
    script = tmp_path / "example.py"
    script.write_text(_examples()[name])
    bucket = tmp_path / "bucket"
    bucket.mkdir()
    done = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=trainer_env({"CKPT_BUCKET": bucket.as_uri()}),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, f"{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    with parse_uri(bucket.as_uri()).hparams.initialize_object() as store:
        pointer = read_pointer(store, "", 0)
    assert pointer is not None and pointer.latest is not None
    # the second machine restored from the bucket (fetch_latest returned a checkpoint)
    restored = [p for p in tmp_path.rglob("*") if p.is_file() and "restore" in str(p)]
    assert restored, sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
