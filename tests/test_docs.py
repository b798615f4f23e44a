"""The docs the code points at exist: every "docs/method.md N" citation in the code (pipeline/, cli.py, bench/,
tests/) names a numbered section of docs/method.md, the page that holds the method in the repository."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
METHOD = ROOT / "docs" / "method.md"
CITED_IN = [ROOT / "pipeline", ROOT / "cli.py", ROOT / "bench", ROOT / "tests"]
# "docs/method.md 5", "docs/method.md section 5", "docs/method.md 1, 4", "docs/method.md 2-4"
CITATION = re.compile(r"docs/method\.md\b(?:\s+section)?(?P<sections>(?:[ \t,]*\d+(?: *- *\d+)?)*)")
OUTSIDE = re.compile(r"METHOD\.md")  # the seed's copy of the method, outside the repository: never cited
SECTION = re.compile(r"^## (\d+)\. \S", re.M)


def cited_sections(text: str) -> list[tuple[int, list[int]]]:
    """(line number, sections) of every citation of the method in ``text``; an empty list of sections where a
    citation names none."""
    out = []
    for m in CITATION.finditer(text):
        sections = []
        for part in re.findall(r"\d+(?:\s*-\s*\d+)?", m["sections"]):
            lo, _, hi = part.partition("-")
            sections += range(int(lo), int(hi or lo) + 1)
        out.append((text.count("\n", 0, m.start()) + 1, sections))
    return out


def method_sections() -> list[int]:
    return [int(n) for n in SECTION.findall(METHOD.read_text())]


def citations() -> list[tuple[str, int, list[int]]]:
    files = [p for root in CITED_IN for p in ([root] if root.is_file() else sorted(root.rglob("*.py")))]
    return [(str(path.relative_to(ROOT)), line, sections)
            for path in files if path.name != "test_docs.py"
            for line, sections in cited_sections(path.read_text())]


def test_method_page_is_numbered_1_to_10():
    assert method_sections() == list(range(1, 11))


def test_the_code_cites_the_method():
    cited = [c for c in citations() if c[0].startswith("pipeline/")]
    assert len(cited) >= 30, cited  # the code's "why" lives in docs/method.md


@pytest.mark.parametrize("where, line, sections", citations(), ids=lambda v: str(v) if isinstance(v, str) else None)
def test_every_citation_names_a_section_of_docs_method(where, line, sections):
    assert sections, f"{where}:{line}: cites the method without a section number"
    missing = sorted(set(sections) - set(method_sections()))
    assert not missing, f"{where}:{line}: cites section(s) {missing}, which docs/method.md does not have"


def test_a_citation_of_a_missing_section_is_caught():
    assert cited_sections('x  # docs/method.md 2-4\n"(docs/method.md section 5)" and docs/method.md 1, 4; '
                          'docs/method.md.') == [(1, [2, 3, 4]), (2, [5]), (2, [1, 4]), (2, [])]
    planted = cited_sections('"""See docs/method.md 11 and docs/method.md section 3."""')
    assert [s for _, s in planted] == [[11], [3]]
    assert 11 not in method_sections() and 3 in method_sections()


def test_no_citation_points_outside_the_repository():
    """The method lives in docs/method.md: a citation of a METHOD.md (the seed's copy, beside the repository) is one
    a user's clone cannot follow."""
    files = [p for root in CITED_IN for p in ([root] if root.is_file() else sorted(root.rglob("*.py")))]
    outside = [f"{p.relative_to(ROOT)}:{p.read_text().count(chr(10), 0, m.start()) + 1}" for p in files
               if p.name != "test_docs.py" for m in OUTSIDE.finditer(p.read_text())]
    assert outside == []
