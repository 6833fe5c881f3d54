"""The Python snippets of README.md and docs/usage.md run, each file's in order, in one
namespace per file, as a reader would paste them (in a scratch folder); a snippet marked
``<!-- example: PATH -->`` is the verbatim excerpt of a script the tests run
(tests/test_examples.py) and must stay one."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DOCS = ("README.md", "docs/usage.md")
BLOCK = re.compile(r"(?:<!-- example: (?P<example>\S+) -->\n)?```python\n(?P<code>.*?)```", re.S)
README_MAX_LINES = 300


def snippets(doc: str) -> list[tuple[str | None, str]]:
    text = (REPO / doc).read_text(encoding="utf-8")
    return [(match["example"], match["code"]) for match in BLOCK.finditer(text)]


def runnable(doc: str) -> list[str]:
    return [code for example, code in snippets(doc) if example is None]


def test_docs_have_snippets() -> None:
    assert len(runnable("README.md")) >= 2
    assert len(runnable("docs/usage.md")) >= 5


def test_readme_is_short() -> None:
    lines = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines (at most {README_MAX_LINES})"


def test_example_excerpts_are_verbatim() -> None:
    excerpts = [(doc, example, code) for doc in DOCS
                for example, code in snippets(doc) if example is not None]
    assert excerpts
    for doc, example, code in excerpts:
        assert code in (REPO / example).read_text(encoding="utf-8"), f"{doc} excerpt of {example} drifted"


def run_snippets(doc: str, folder: Path) -> None:
    script = folder / f"{Path(doc).stem}_snippets.py"
    script.write_text("\n\n".join(runnable(doc)), encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, script.name], cwd=folder, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{doc}:\n{result.stderr[-4000:]}"


def test_snippets_run_in_order(tmp_path: Path) -> None:
    """README.md's, then docs/usage.md's, in one scratch folder, as a reader goes on."""
    for doc in DOCS:
        run_snippets(doc, tmp_path)
    assert (tmp_path / "ckpt.pt").exists() and (tmp_path / "slim.pt").exists()
    assert (tmp_path / "runs" / "readme" / "slbi_record.jsonl").exists()
