"""docs/benchmarks.md is generated (`python -m bench report`, bench/report.py): the committed page is exactly what
the command writes from bench/results/*.json, so no number on it is copied by hand; a result file the generator
does not know, or a known one whose layout changed, still gets its numbers on the page. The same command rewrites
README.md's generated blocks (the demo's output, the results table), and the committed README is what it writes."""

from __future__ import annotations

import json
import shutil

import pytest

from bench import RESULTS
from bench import report as R


def test_the_committed_page_is_what_the_command_writes():
    assert R.PAGE.read_text() == R.render(), (
        "docs/benchmarks.md is stale or edited by hand: run `python -m bench report` and commit the page")


def test_every_result_file_has_a_section_with_its_known_tables():
    page = R.render()
    for path in sorted(RESULTS.glob("*.json")):
        assert f"\n## {path.stem}\n" in page, path.stem
    assert "layout is not the one this page knows" not in page  # every committed result matches its layout
    known = [p.stem for p in RESULTS.glob("*.json") if p.stem in R.LAYOUTS]
    assert known, "no known result file: the specific layouts are untested"


def test_the_command_writes_the_page(tmp_path):
    out, readme = tmp_path / "benchmarks.md", tmp_path / "README.md"
    readme.write_text(R.README.read_text())
    R.main(["--out", str(out), "--readme", str(readme)])
    assert out.read_text() == R.render()
    assert readme.read_text() == R.render_readme(R.README.read_text())


def test_the_committed_readme_blocks_are_what_the_command_writes():
    text = R.README.read_text()
    assert R.render_readme(text) == text, (
        "README.md's generated blocks are stale or edited by hand: run `python -m bench report` and commit README.md")
    for name in R.README_BLOCKS:
        assert R.BEGIN.format(name=name) in text


def test_the_readme_numbers_come_from_the_result_files(tmp_path):
    text = R.README.read_text()
    results = R.readme_results()
    assert sum(row.startswith("| ") for row in results) >= 8 and "layout not known" not in "\n".join(results)
    assert all("](docs/benchmarks.md#" in row for row in results[2:])
    demo = json.loads((RESULTS / "demo_clone.json").read_text())
    block = "\n".join(R.readme_demo())
    assert demo["closing_output"][-1] in block and R.fmt(demo["fresh_clone_seconds"]) in block
    # a changed number in a result file changes the README block, and the committed README is then stale
    for path in RESULTS.glob("*.json"):
        shutil.copy(path, tmp_path / path.name)
    changed = json.loads((tmp_path / "cache_read.json").read_text())
    changed["read_gbps"] = 123.456
    (tmp_path / "cache_read.json").write_text(json.dumps(changed))
    rewritten = R.render_readme(text, tmp_path)
    assert rewritten != text and "| 123.5 GB/s |" in rewritten
    assert R.render_readme(rewritten) == text  # and back from the committed files


def test_a_readme_without_its_markers_is_an_error():
    with pytest.raises(ValueError, match="results"):
        R.render_readme(R.README.read_text().replace(R.BEGIN.format(name="results"), ""))
    assert "absent" in "\n".join(R.readme_results(RESULTS / "no-such-folder"))


def test_a_new_result_file_gets_a_generic_section(tmp_path):
    result = {"what": "a new benchmark", "tokens_per_s": 1234.5678, "nested": {"ratio": 0.123456, "ok": True},
              "machine": {"processor": "Test CPU", "cpu_count": 4, "torch": "9.9", "load_average": [1.0, 2.0, 3.0]},
              "runs": [1, 2, 3], "label": "text is not a number"}
    (tmp_path / "zz_new_bench.json").write_text(json.dumps(result))
    page = R.render(tmp_path)
    assert "## zz_new_bench" in page and "Measured: a new benchmark" in page
    assert "| tokens_per_s | 1,235 |" in page and "| nested.ratio | 0.123 |" in page and "| nested.ok | yes |" in page
    assert "Test CPU, 4 CPUs, torch 9.9, load average 1.0 / 2.0 / 3.0" in page
    assert "runs" not in page.split("## zz_new_bench")[1]  # lists are left out


def test_a_known_file_with_another_layout_falls_back_to_its_numbers(tmp_path):
    shutil.copy(RESULTS / "published_gap.json", tmp_path / "published_gap.json")
    changed = json.loads((tmp_path / "published_gap.json").read_text())
    del changed["gap_max"]
    changed["new_number"] = 42
    (tmp_path / "published_gap.json").write_text(json.dumps(changed))
    page = R.render(tmp_path)
    assert "layout is not the one this page knows (KeyError: 'gap_max')" in page
    assert "| new_number | 42 |" in page


def test_an_unreadable_result_file_is_named_not_fatal(tmp_path):
    (tmp_path / "broken.json").write_text("{not json")
    (tmp_path / "listed.json").write_text("[1, 2]")
    page = R.render(tmp_path)
    assert "`bench/results/broken.json` could not be read" in page
    assert "`bench/results/listed.json` is not a JSON object" in page


def test_numbers_are_formatted_the_same_way_everywhere():
    assert [R.fmt(v) for v in (0.0123456, 1.23456, 123.456, 151009.97, 600.0, 7, True, None, "a|b")] == [
        "0.0123", "1.23", "123.5", "151,010", "600", "7", "yes", "-", "a\\|b"]
    assert R.fmt({"mean": 0.5466, "sd": 0.0386, "runs": [0.5]}) == "0.547 ± 0.0386"
