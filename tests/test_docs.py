"""The documentation stays true: every example in README.md and docs/*.md runs against the current code,
and every relative link in them points at a file that exists.

Per page, in one namespace and a scratch folder: ```python blocks run (``>>>`` blocks as doctests;
```py marks an illustration not run here, e.g. a full search or one that needs a diffusers pipeline);
a plain / json / text block right after a python block must equal what that block printed;
```bash blocks whose first line is ``# run`` run with this environment's ``fewstep`` on the PATH.
Links: every ``[text](path)`` / ``[text](path#anchor)`` outside code resolves, relative to the page, to
an existing file inside the repository (http(s) and mailto links are not followed; an anchor needs only
its file). README.md is the front door: at most 12,000 characters, with the two commands of the quick start.
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

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
README = ROOT / "README.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```\s*$", re.S | re.M)
README_MAX_CHARS = 12_000

# pages whose links are checked (benchmarks/README.md too: the front door and the docs link into it)
PAGES = {**{f"docs/{p.name}": p for p in sorted(DOCS.glob("*.md"))}, "README.md": README,
         "benchmarks/README.md": ROOT / "benchmarks" / "README.md"}


def run_examples(path: Path, tmp_path: Path) -> None:
    """Run every example block of one page, as the module docstring says."""
    text = path.read_text()
    page = path.relative_to(ROOT).as_posix()
    namespace: dict[str, object] = {"__name__": "__docs__"}
    printed: str | None = None
    env = {**os.environ, "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")}
    for i, m in enumerate(FENCE.finditer(text)):
        lang, code = m.group(1), m.group(2)
        where = f"{page} block {i}"
        if lang == "python" and ">>>" in code:
            test = doctest.DocTestParser().get_doctest(code, namespace, where, str(path), 0)
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


@pytest.mark.parametrize("page", sorted(p.name for p in DOCS.glob("*.md")))
def test_examples_on_the_page_run_and_print_what_the_page_says(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_examples(DOCS / page, tmp_path)


def test_the_readme_examples_run_as_the_docs_do(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path / "cache"))  # autotune's choices, references: not the user's cache
    run_examples(README, tmp_path)


# ---------------------------------------------------------------------------------------------- links

INLINE_LINK = re.compile(r"(?<!\!)\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
IMAGE_LINK = re.compile(r"!\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_DEF = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$", re.M)
INDENTED_CODE = re.compile(r"(?:^(?: {4}|\t).*\n?)+", re.M)
INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+?\1", re.S)
EXTERNAL = re.compile(r"^(?:[a-z][a-z0-9+.-]*:|//)", re.I)  # http:, https:, mailto:, ftp:, //host


def _prose(text: str) -> str:
    """The page without its code: fenced blocks, indented blocks after a blank line, inline code spans."""
    text = FENCE.sub("", text)
    text = re.sub(r"(?<=\n\n)" + INDENTED_CODE.pattern, "", text, flags=re.M)
    return INLINE_CODE.sub("", text)


def relative_links(text: str) -> list[str]:
    """The targets of the page's markdown links that point into the repository (external ones left out)."""
    prose = _prose(text)
    targets = [m.group(1) for pat in (INLINE_LINK, IMAGE_LINK, REFERENCE_DEF) for m in pat.finditer(prose)]
    return [t for t in targets if not EXTERNAL.match(t)]


def broken_links(path: Path, text: str | None = None) -> list[str]:
    """Each relative link of the page whose file does not exist or lies outside the repository."""
    text = path.read_text() if text is None else text
    bad = []
    for target in relative_links(text):
        file_part = target.split("#", 1)[0].split("?", 1)[0]
        if not file_part:  # "#anchor" on the same page
            continue
        resolved = (path.parent / file_part).resolve()
        if not resolved.is_relative_to(ROOT):
            bad.append(f"{target} (outside the repository)")
        elif not resolved.exists():
            bad.append(f"{target} (no such file: {resolved.relative_to(ROOT)})")
    return bad


@pytest.mark.parametrize("page", sorted(PAGES))
def test_every_relative_link_points_at_a_file_that_exists(page):
    path = PAGES[page]
    assert relative_links(path.read_text()) or page != "README.md", "the README links nothing: is the link parser broken?"
    assert not broken_links(path), f"{page}: broken links: {broken_links(path)}"


def test_the_link_check_finds_broken_links():
    page = README
    text = (
        "[ok](docs/api.md) [ok anchor](docs/api.md#sample) [web](https://example.org/x.md) [mail](mailto:a@b.c) "
        "[here](#top) [gone](docs/no-such-page.md) [gone anchor](docs/nope.md#x) [out](../shared/x.md)\n"
        "`[in code](docs/missing-in-code.md)`\n\n```md\n[in a block](docs/missing-in-block.md)\n```\n"
        "![img](benchmarks/reports/missing.png)\n[ref]: docs/missing-ref.md\n"
    )
    assert broken_links(page, text) == [
        "docs/no-such-page.md (no such file: docs/no-such-page.md)",
        "docs/nope.md#x (no such file: docs/nope.md)",
        "../shared/x.md (outside the repository)",
        "benchmarks/reports/missing.png (no such file: benchmarks/reports/missing.png)",
        "docs/missing-ref.md (no such file: docs/missing-ref.md)",
    ]


def test_the_docs_index_lists_every_page():
    index = (DOCS / "README.md").read_text()
    listed = {Path(t.split("#", 1)[0]).name for t in relative_links(index)}
    pages = {p.name for p in DOCS.glob("*.md")} - {"README.md"}
    assert not sorted(pages - listed), f"docs/README.md does not list {sorted(pages - listed)}"


# ---------------------------------------------------------------------------------------------- README


def test_the_readme_is_a_front_door():
    text = README.read_text()
    assert len(text) <= README_MAX_CHARS, f"README.md has {len(text)} characters (at most {README_MAX_CHARS}): move detail into docs/"
    assert "make demo" in text and "make test" in text
    assert "../shared" not in text, "the README must not point outside the repository"
