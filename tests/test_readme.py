"""The README's Python snippets run, in order, in one namespace, as a reader would paste
them (in a scratch folder); a snippet marked ``<!-- example: PATH -->`` is the verbatim
excerpt of a script the tests run (tests/test_examples.py) and must stay one."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BLOCK = re.compile(r"(?:<!-- example: (?P<example>\S+) -->\n)?```python\n(?P<code>.*?)```", re.S)


def snippets() -> list[tuple[str | None, str]]:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    return [(match["example"], match["code"]) for match in BLOCK.finditer(text)]


def test_readme_has_snippets() -> None:
    assert len([code for example, code in snippets() if example is None]) >= 5


def test_example_excerpts_are_verbatim() -> None:
    excerpts = [(example, code) for example, code in snippets() if example is not None]
    assert excerpts
    for example, code in excerpts:
        assert code in (REPO / example).read_text(encoding="utf-8"), f"README excerpt of {example} drifted"


def test_snippets_run_in_order(tmp_path: Path) -> None:
    program = "\n\n".join(code for example, code in snippets() if example is None)
    (tmp_path / "readme_snippets.py").write_text(program, encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "readme_snippets.py"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert (tmp_path / "ckpt.pt").exists() and (tmp_path / "slim.pt").exists()
    assert (tmp_path / "runs" / "readme" / "slbi_record.jsonl").exists()
