"""``import uploader`` and its integration modules import neither torch nor a framework.

Each integration imports its framework only when ``UploaderCallback`` is looked up.
"""

from __future__ import annotations

import subprocess
import sys

from harness.trainers import ROOT

HEAVY = ("torch", "lightning", "pytorch_lightning", "transformers", "ckpt")


def test_uploader_and_its_integrations_import_no_framework() -> None:
    code = (
        "import sys, uploader, uploader.integrations, uploader.integrations.base, "
        "uploader.integrations.lightning, uploader.integrations.transformers\n"
        "import uploader.integrations.lightning as lit\n"
        "assert 'UploaderCallback' in lit.__all__\n"
        f"heavy = [m for m in {HEAVY!r} if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-P", "-c", code], cwd=ROOT, check=True, timeout=60)


def test_a_missing_framework_is_named_when_the_callback_is_looked_up() -> None:
    code = (
        "import sys\n"
        "for name in ('lightning', 'pytorch_lightning'):\n"
        "    sys.modules[name] = None  # as if not installed\n"
        "from uploader.integrations import lightning\n"
        "try:\n"
        "    lightning.UploaderCallback\n"
        "except ImportError as exc:\n"
        "    assert 'pip install lightning' in str(exc), exc\n"
        "else:\n"
        "    raise AssertionError('no ImportError')\n"
    )
    subprocess.run([sys.executable, "-P", "-c", code], cwd=ROOT, check=True, timeout=60)
