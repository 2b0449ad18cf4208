"""The core library `src/finemem/` imports nothing above it (`rollout`, `reward`, `learner`).

Why: the services build on the core library; an upward import makes `finemem` depend on code that
depends on it (a cycle in waiting), and drags rollout/reward/learner into every core import.
Checked on the source with `ast`, so function-local imports count too.
"""

from __future__ import annotations

import ast
from pathlib import Path

CORE = Path(__file__).resolve().parents[1] / "src" / "finemem"
ABOVE = ("rollout", "reward", "learner")
# Known upward imports still to remove; a new upward import fails the test, and a fixed one must be
# taken out of this set.
KNOWN: set[str] = set()


def upward_imports(path: Path) -> list[str]:
    """`file:line module` for every import of a package in ABOVE (module level or inside a function)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found += [f"{path.name}:{node.lineno} {n}" for n in names if n.split(".")[0] in ABOVE]
    return found


def test_upward_imports_are_found(tmp_path):
    (tmp_path / "m.py").write_text("import os\ndef f():\n    from rollout.episode import X\n    import learner.sft\n")
    assert upward_imports(tmp_path / "m.py") == ["m.py:3 rollout.episode", "m.py:4 learner.sft"]


def test_core_library_imports_nothing_above_it():
    files = sorted(CORE.rglob("*.py"))
    assert len(files) > 10
    found = [f"{f.relative_to(CORE).parent / line}" for f in files for line in upward_imports(f)]
    bad = [s for s in found if f"{s.split(':')[0]} {s.split(' ')[1]}" not in KNOWN]
    assert not bad, "src/finemem imports rollout/reward/learner:\n" + "\n".join(bad)
    gone = KNOWN - {f"{s.split(':')[0]} {s.split(' ')[1]}" for s in found}
    assert not gone, f"these upward imports are gone, remove them from KNOWN: {sorted(gone)}"
