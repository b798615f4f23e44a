"""Every relative link of README.md and docs/*.md leads somewhere: the file it names exists in the repository, and
its #anchor is a heading of that page (as GitHub makes anchors from headings) or an explicit `<a id=...>`. Links to
other sites are not followed (the tests run offline). The checks are functions of a tree, so the tests below also
plant broken links in a copy and see them caught."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.S | re.M)
INLINE_CODE = re.compile(r"`+[^`\n]*`+")
LINK = re.compile(r"(?<!\!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)|!\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.M)
EXPLICIT_ANCHOR = re.compile(r"<a\s+(?:id|name)=\"([^\"]+)\"", re.I)


def pages(root: Path = ROOT) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def prose(markdown: str) -> str:
    """The text outside fenced code blocks and inline code, where links and headings mean what they say."""
    return INLINE_CODE.sub("", FENCE.sub("", markdown))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lower case, punctuation but - and _ removed, spaces -> -."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text stays
    text = re.sub(r"<[^>]+>", "", text).replace("`", "").strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(markdown: str) -> set[str]:
    """Every anchor a page has: its headings' (a repeated one gets -1, -2, ... as on GitHub) and explicit ids."""
    seen: dict[str, int] = {}
    out = set(EXPLICIT_ANCHOR.findall(markdown))
    for heading in HEADING.findall(FENCE.sub("", markdown)):
        base = slug(heading)
        n = seen.get(base, 0)
        out.add(base if n == 0 else f"{base}-{n}")
        seen[base] = n + 1
    return out


def links(markdown: str) -> list[str]:
    return [a or b for a, b in LINK.findall(prose(markdown))]


def broken_links(root: Path = ROOT) -> list[str]:
    """'page: target (why)' for every relative link of the pages under ``root`` that leads nowhere."""
    problems = []
    for page in pages(root):
        if not page.is_file():
            continue
        for target in links(page.read_text()):
            if re.match(r"[a-z][a-z0-9+.-]*:", target, re.I):  # https:, mailto: ... not followed
                continue
            path, _, anchor = target.partition("#")
            file = Path(os.path.normpath(page.parent / path)) if path else page  # links are not followed here
            where = f"{page.relative_to(root)}: {target}"
            if not file.is_relative_to(root):
                problems.append(f"{where} (outside the repository)")
            elif not file.exists():
                problems.append(f"{where} (no such file)")
            elif anchor and file.suffix == ".md" and anchor not in anchors(file.read_text()):
                problems.append(f"{where} (no heading or id #{anchor} in {file.name})")
    return problems


def test_every_relative_link_leads_somewhere():
    assert not broken_links(), "\n".join(broken_links())


def test_the_pages_link_each_other():
    readme = links((ROOT / "README.md").read_text())
    for page in sorted((ROOT / "docs").glob("*.md")):
        assert f"docs/{page.name}" in readme, f"README.md does not link docs/{page.name}"
    assert len([t for p in pages() for t in links(p.read_text())]) > 50


def test_github_anchors():
    assert slug("Many GPUs and nodes (torchrun)") == "many-gpus-and-nodes-torchrun"
    assert slug("Scoring: `urm score`") == "scoring-urm-score"
    assert slug("Without `trust_remote_code`") == "without-trust_remote_code"
    assert slug("Measuring it on a GPU: `make bench-gpu`") == "measuring-it-on-a-gpu-make-bench-gpu"
    assert anchors("# A\n## B c\n```\n# not a heading\n```\n## B c\n<a id=\"x-y\"></a>\n") == {"a", "b-c", "b-c-1", "x-y"}
    assert links("[a](x.md) `[b](y.md)` ![c](z.png)\n```\n[d](w.md)\n```\n[e\nf](v.md#g)") == ["x.md", "z.png", "v.md#g"]


@pytest.fixture
def copy_of_the_docs(tmp_path):
    (tmp_path / "docs").mkdir()
    for page in pages():
        shutil.copy(page, tmp_path / page.relative_to(ROOT))
    for linked in ("pipeline", "bench", "tests", "notebooks", "cache", ".ci", "cli.py"):
        (tmp_path / linked).symlink_to(ROOT / linked)
    assert broken_links(tmp_path) == []
    return tmp_path


@pytest.mark.parametrize("planted, why", [
    ("[gone](docs/no-such-page.md)", "no such file"),
    ("[moved](pipeline/no_such_stage/__init__.py)", "no such file"),
    ("[anchor](docs/cache.md#no-such-heading)", "no heading or id #no-such-heading"),
    ("[here](#nowhere)", "no heading or id #nowhere"),
    ("[out](../../etc/passwd)", "outside the repository"),
])
def test_a_planted_broken_link_is_caught(copy_of_the_docs, planted, why):
    readme = copy_of_the_docs / "README.md"
    readme.write_text(readme.read_text() + f"\nSee {planted}.\n")
    problems = broken_links(copy_of_the_docs)
    assert len(problems) == 1 and why in problems[0], problems
