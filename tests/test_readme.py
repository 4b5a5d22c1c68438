"""The README's Python blocks run as written, in order, in one namespace; its CI command is what .ci/run runs."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)


def test_readme_snippets_run():
    blocks = python_blocks(README.read_text())
    assert len(blocks) >= 4
    namespace: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i, block in enumerate(blocks):
            try:
                exec(compile(block, f"README.md python block {i + 1}", "exec"), namespace)
            except Exception as err:  # say which block failed
                raise AssertionError(f"README python block {i + 1} failed: {err!r}\n{block}") from err


def test_ci_runs_the_readme_test_command():
    text = README.read_text()
    marker = text.index("<!-- ci:test -->")
    block = re.search(r"```bash\n(.*?)```", text[marker:], flags=re.DOTALL).group(1).strip()
    assert "pytest" in block and "torch==2.13.0" in block
    ci = (README.parent / ".ci" / "run").read_text()
    assert "ci:test" in ci  # .ci/run extracts that very block
