"""The transfer layer never imports the configuration layer, not even inside a function.

``uploader.config`` imports ``uploader.transfer`` (to build the store); an import the
other way, however deferred, would make the two one tangle again.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import uploader.transfer

TRANSFER = Path(uploader.transfer.__file__).parent
FORBIDDEN = "uploader.config"


def _imported_modules(tree: ast.AST, module: str, is_package: bool) -> list[tuple[int, str]]:
    """Every module an import statement anywhere in ``tree`` names, made absolute."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base if is_package else base[:-1]
                base = base[: len(base) - (node.level - 1)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            found.append((node.lineno, prefix))
            found += [(node.lineno, f"{prefix}.{alias.name}") for alias in node.names]
    return found


def _modules() -> list[Path]:
    return sorted(TRANSFER.rglob("*.py"))


def _offences(path: Path) -> list[str]:
    root = TRANSFER.parent.parent
    parts = path.relative_to(root).with_suffix("").parts
    is_package = parts[-1] == "__init__"
    module = ".".join(parts[:-1] if is_package else parts)
    tree = ast.parse(path.read_text(), str(path))
    return [
        f"{path.relative_to(root)}:{line} imports {name}"
        for line, name in _imported_modules(tree, module, is_package)
        if name == FORBIDDEN or name.startswith(FORBIDDEN + ".")
    ]


def test_the_walk_sees_every_module() -> None:
    names = {p.relative_to(TRANSFER).as_posix() for p in _modules()}
    assert {"store.py", "settings.py", "backends/s3.py", "backends/local.py"} <= names


@pytest.mark.parametrize(
    "source",
    [
        "from uploader.config.hparams import ObjectStoreHparams",
        "import uploader.config.files",
        "def f():\n    from uploader.config import hparams",
        "class C:\n    def m(self):\n        import uploader.config",
        "from ...config import hparams",
        "from ... import config",
    ],
)
def test_the_check_catches_every_form(source: str) -> None:
    tree = ast.parse(source)
    names = [n for _, n in _imported_modules(tree, "uploader.transfer.backends.s3", False)]
    assert any(n == FORBIDDEN or n.startswith(FORBIDDEN + ".") for n in names), names


def test_transfer_never_imports_config() -> None:
    offences = [o for path in _modules() for o in _offences(path)]
    assert offences == [], "uploader.transfer must not import uploader.config:\n" + "\n".join(
        offences
    )
