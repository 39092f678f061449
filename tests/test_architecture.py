"""The package's layers follow the data flow and arrows point one way (docs/architecture.md):

    io -> measure -> unlearning -> evaluate -> runs -> cli,   and report, which renders results and runs nothing.

A module may import its own layer and the layers before it; report/ may import only pure helpers (no torch,
nothing from unlearning/ or evaluate/). Imports under `if TYPE_CHECKING:` are annotations, not arrows.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "unmemorize"
ORDER = ["_version", "errors", "progress", "io", "measure", "unlearning", "evaluate", "report", "runs", "cli",
         "__main__"]
# What report/ may use: writing files, hashing ids, band status names. Nothing that imports torch.
REPORT_MAY_IMPORT = {"_version", "errors", "io.files", "io.hashing", "measure.band"}
BASE = {"_version", "errors", "progress"}


def layer_of(module: str) -> str:
    return module.split(".")[0]


def rank(layer: str) -> int:
    return {"_version": 0, "errors": 0, "progress": 0}.get(layer, ORDER.index(layer))


def imports_of(here: tuple[str, ...], source: str) -> list[tuple[int, str]]:
    """(line, module relative to the package, e.g. 'measure.audit') of every intra-package import, at any depth,
    except those under `if TYPE_CHECKING:`, of the module at `here` (e.g. ('measure', 'audit'))."""
    tree = ast.parse(source)
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for child in node.body for n in ast.walk(child))
    package = list(here[:-1])
    found = []
    for node in ast.walk(tree):
        if id(node) in skip or not isinstance(node, ast.ImportFrom):
            continue
        if node.level == 0:
            if node.module and node.module.startswith("unmemorize"):
                parts = node.module.split(".")[1:]
            else:
                continue
        else:
            base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
            parts = [*base, *(node.module.split(".") if node.module else [])]
        # `from ..io import tokens` imports the module io.tokens; `from ..io.tokens import encode`, io.tokens
        targets = [".".join([*parts, a.name]) if is_module([*parts, a.name]) else ".".join(parts) for a in node.names]
        found += [(node.lineno, t) for t in targets if t]
    return found


def is_module(parts: list[str]) -> bool:
    where = PACKAGE.joinpath(*parts)
    return where.with_suffix(".py").exists() or (where / "__init__.py").exists()


def modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if p.name != "__init__.py" or p.parent != PACKAGE)


def check(here: tuple[str, ...], source: str) -> None:
    own = layer_of(".".join(here))
    for line, target in imports_of(here, source):
        where = f"{'/'.join(here)}.py:{line} imports {target}"
        if own == "report":
            assert target in REPORT_MAY_IMPORT or layer_of(target) == "report", where
        elif layer_of(target) not in BASE:
            assert rank(layer_of(target)) <= rank(own), where


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_arrows_point_down_the_data_flow(path: Path):
    check(path.relative_to(PACKAGE).with_suffix("").parts, path.read_text())


def test_report_and_io_basics_load_without_torch():
    code = ("import sys, unmemorize.report.html, unmemorize.report.certificate, unmemorize.report.terminal, "
            "unmemorize.io.sets, unmemorize.io.files, unmemorize.io.hashing; "
            "assert 'torch' not in sys.modules, 'torch was imported'; "
            "assert not [m for m in sys.modules if m.startswith(('unmemorize.unlearning', 'unmemorize.evaluate'))]")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize(("here", "source"), [
    (("measure", "probe"), "def f():\n    from ..unlearning.loop import gradient_unlearn\n"),
    (("unlearning", "probe"), "from ..evaluate.utility import utility\n"),
    (("report", "probe"), "from ..measure.audit import AuditResult\n"),
    (("evaluate", "probe"), "from unmemorize.report import certificate\n"),
    (("report", "probe"), "from .. import io\nfrom ..io import tokens\n"),
])
def test_the_checker_sees_an_upward_arrow(here: tuple[str, ...], source: str):
    """The rule is only worth something if a wrong import is caught."""
    with pytest.raises(AssertionError):
        check(here, source)


def test_the_checker_lets_annotations_and_downward_imports_pass():
    check(("report", "probe"), "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                               "    from ..measure.audit import AuditResult\n"
                               "from ..io.files import atomic_write_text\nfrom . import plots\n")
    check(("runs", "probe"), "from ..unlearning.loop import gradient_unlearn\nfrom ..report.html import render\n")
