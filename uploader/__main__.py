"""``python -m uploader ...`` is ``ckpt-uploader ...``."""

from __future__ import annotations

import sys

from uploader.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
