"""The documentation stays true: every example in docs/*.md runs against the current code.

Per page, in one namespace and a scratch folder: ```python blocks run (``>>>`` blocks as doctests;
```py marks an illustration too slow to run here, e.g. a full search);
a plain / json / text block right after a python block must equal what that block printed;
```bash blocks whose first line is ``# run`` run with this environment's ``fewstep`` on the PATH.
"""

from __future__ import annotations

import contextlib
import doctest
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```\s*$", re.S | re.M)


@pytest.mark.parametrize("page", sorted(p.name for p in DOCS.glob("*.md")))
def test_examples_on_the_page_run_and_print_what_the_page_says(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    text = (DOCS / page).read_text()
    namespace: dict[str, object] = {"__name__": "__docs__"}
    printed: str | None = None
    env = {**os.environ, "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")}
    for i, m in enumerate(FENCE.finditer(text)):
        lang, code = m.group(1), m.group(2)
        where = f"{page} block {i}"
        if lang == "python" and ">>>" in code:
            test = doctest.DocTestParser().get_doctest(code, namespace, where, str(DOCS / page), 0)
            runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS)
            out = io.StringIO()
            runner.run(test, clear_globs=False, out=out.write)
            namespace.update(test.globs)
            assert not runner.failures, f"{where}:\n{out.getvalue()}"
            printed = None
        elif lang == "python":
            buf = io.StringIO()
            with contextlib.redirect_stdout(buf):
                exec(compile(code, where, "exec"), namespace)  # noqa: S102  (the docs' own examples)
            printed = buf.getvalue()
        elif lang in ("", "json", "text") and printed:
            assert printed.rstrip() == code.rstrip(), f"{where}: the page shows output that the code no longer prints"
            printed = None
        elif lang == "bash" and code.startswith("# run"):
            r = subprocess.run(["bash", "-e", "-c", code], capture_output=True, text=True, env=env, timeout=600)
            assert r.returncode == 0, f"{where}: exit {r.returncode}\n{r.stderr[-2000:]}"
            printed = None
        else:
            printed = None
