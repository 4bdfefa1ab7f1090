"""The figures in BENCHMARKS.md and RELIABILITY.md come from committed result files (issue 23 item 7).

No broker: these read the documents, the result files (bench/results/, tests/figures/) and the tests'
source. bench/docs.py generates the tables and figure cells; bench/record.py writes the files.
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path
from typing import Any

import pytest

from bench import docs, record

ROOT = Path(__file__).resolve().parent.parent


def test_every_generated_part_of_the_docs_is_what_the_committed_result_files_give() -> None:
    stale = [problem for doc in docs.DOCS for problem in docs.stale(doc)]
    assert not stale, "run `python -m bench.docs` (and commit the result files it reads):\n" + "\n".join(stale)


def test_the_docs_have_generated_parts_where_the_figures_are() -> None:
    bench_text, reliability = (doc.read_text() for doc in docs.DOCS)
    tables = {m.group("name") for m in docs.TABLE.finditer(bench_text)}
    assert {"targets", "limit", "shapes", "saturation", "peer", "cpu", "async", "ordering", "autotune",
            "scaleout"} <= tables
    assert len(list(docs.FIG.finditer(reliability))) >= 80
    assert {m.group("file") for m in docs.RUN.finditer(reliability)} >= {"faults", "e2e"}


@pytest.mark.parametrize("path", record.result_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_result_file_names_its_command_date_commit_and_machine(path: Path) -> None:
    document = record.load(path)
    assert record.problems(document) == []
    assert document["section"] == path.stem
    if path.parent == record.TEST_FIGURES:
        records = document["figures"]["records"]
        assert records and all("scenario" in r and r.get("outcome") for r in records)


def _reported_scenarios() -> list[re.Pattern[str]]:
    """Every report_figures(SCENARIO, ...) in the tests, as a pattern (f-string parts match anything)."""
    patterns = []
    for source in sorted((ROOT / "tests").glob("test_*.py")):
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "report_figures" and node.args:
                first = node.args[0]
                if isinstance(first, ast.Constant):
                    patterns.append(re.compile(re.escape(first.value)))
                elif isinstance(first, ast.JoinedStr):
                    parts = [re.escape(v.value) if isinstance(v, ast.Constant) else ".+" for v in first.values]
                    patterns.append(re.compile("".join(parts)))
    return patterns


def test_every_scenario_a_figure_cell_names_is_one_a_test_reports() -> None:
    patterns = _reported_scenarios()
    assert len(patterns) >= 40
    unknown = sorted({m.group("scenario") for doc in docs.DOCS for m in docs.FIG.finditer(doc.read_text())
                      if not any(p.fullmatch(m.group("scenario").partition("@")[0]) for p in patterns)})
    assert not unknown, f"no test reports these scenarios (a typo leaves the cell 'not yet re-measured'): {unknown}"


def _results_rows(text: str) -> list[list[str]]:
    section = text[text.index("## Results"):]
    section = section[:section.index("\n### ")]
    return [re.split(r"(?<!\\)\|", line)[1:-1] for line in section.splitlines()
            if re.match(r"^\| \w+ \| ", line) and not line.startswith("| # ")]


def test_reliability_figure_cells_hold_no_hand_written_number() -> None:
    """lost, duplicates, time to recover: markers, a dash or words; a number outside a marker is pasted."""
    rows = _results_rows((ROOT / "RELIABILITY.md").read_text())
    assert len(rows) >= 40
    pasted = []
    for cells in rows:
        assert len(cells) == 9, cells[0]
        for column, cell in zip(("lost", "duplicates", "time to recover"), cells[5:8], strict=True):
            rest = docs.FIG.sub("", cell)
            rest = re.sub(r"\]\([^)]*\)", "]", rest)  # link targets (#broker-gone-close-issue-16)
            rest = re.sub(r"`[^`]*`", "", rest)  # code: test and setting names
            if re.search(r"\d", rest):
                pasted.append(f"row {cells[0].strip()}, {column}: {rest.strip()!r}")
    assert not pasted, ("figures written by hand; give them a <!--fig ...--> marker (RELIABILITY.md, "
                        "'Where the figures come from'):\n" + "\n".join(pasted))


# -- the generator itself, on result files made here -------------------------------------------------


def _run_file(root: Path, name: str, records: list[dict[str, Any]], **extra: Any) -> None:
    document = record.Run.start(name, f"python -m bench.record {name} -- pytest x").document(
        {"exit_code": 0, "tests": {"passed": 3}, "records": records}, extra.get("note", ""))
    record.write(document, root / "tests" / "figures")


def test_a_figure_span_is_filled_from_its_record_and_says_when_the_test_failed(tmp_path: Path) -> None:
    _run_file(tmp_path, "faults", [
        {"scenario": "crash_loop", "duplicates": 11670, "per_crash": [3, 1, 2], "waits": {"0": 0.4, "1": 1.1},
         "outcome": "passed"},
        {"scenario": "broker_gone", "exited_after_s": 3.9, "outcome": "failed"},
        {"scenario": "twice", "n": 1, "outcome": "passed"}, {"scenario": "twice", "n": 2, "outcome": "passed"},
    ])
    text = ('<!--fig faults "crash_loop" {duplicates} in all; {per_crash}; {per_crash:range}; '
            '{waits:range} s-->old<!--/fig--> | <!--fig faults "broker_gone" {exited_after_s} s-->x<!--/fig--> | '
            '<!--fig faults "twice@2" n={n}--><!--/fig--> | <!--fig faults "nobody" {n}-->5<!--/fig--> | '
            '<!--fig other "crash_loop" {n}--><!--/fig-->')
    out = docs.generate(text, tmp_path)
    assert ">11 670 in all; 3 / 1 / 2; 1\u20133; 0.4\u20131.1 s<" in out
    assert ">3.9 s (test failed in that run)<" in out
    assert ">n=2<" in out
    assert out.count(">not yet re-measured<") == 2  # a scenario no run holds, a run not committed
    with pytest.raises(docs.DocError, match="twice@1"):
        docs.generate('<!--fig faults "twice" {n}--><!--/fig-->', tmp_path)
    with pytest.raises(docs.DocError, match="record keys"):
        docs.generate('<!--fig faults "crash_loop" {lost}--><!--/fig-->', tmp_path)
    with pytest.raises(docs.DocError, match="attributes"):
        docs.generate('<!--fig faults "crash_loop" {duplicates.real}--><!--/fig-->', tmp_path)


def test_a_changed_figure_is_stale_and_generating_again_restores_it(tmp_path: Path) -> None:
    _run_file(tmp_path, "faults", [{"scenario": "crash_loop", "lost": 0, "outcome": "passed"}])
    doc = tmp_path / "RELIABILITY.md"
    doc.write_text(docs.generate('| 1 | <!--fig faults "crash_loop" **{lost}**--><!--/fig--> |\n'
                                 "<!--run faults--><!--/run-->\n", tmp_path))
    assert docs.stale(doc, tmp_path) == []
    assert "**3 passed** in" in doc.read_text() and "python -m bench.record faults" in doc.read_text()
    doc.write_text(doc.read_text().replace("**0**", "**1**"))
    assert len(docs.stale(doc, tmp_path)) == 1


def _limit(rates: dict[str, list[int]], rss: list[float], partitions: int = 6) -> dict[str, Any]:
    contenders = {name: {"rate": r, "peak_rss_mb": rss, "cpu_us_per_message": [1.0] * len(r)}
                  for name, r in rates.items()}
    return {"threads": 16, "passes": 3, "rows": [{
        "shape": "lz4 100 B", "partitions": partitions, "backlog": 1_000_000, "contenders": contenders,
        "load_avg_at_passes": [1.0, 2.0, 3.0], "target": 0.8 if partitions == 6 else 0.6, "rss_target_mb": 150.0,
        "ratios": {"engine_16_vs_tuned": [round(e / t, 3) for e, t in zip(rates["engine_16"], rates["tuned_loop"],
                                                                            strict=True)],
                   "default_vs_tuned": [0.5, 0.5, 0.5]}}]}


def test_the_limit_table_shows_the_spread_of_the_passes_and_judges_the_median(tmp_path: Path) -> None:
    figures = _limit({"tuned_loop": [1000, 1000, 1000], "default_loop": [500, 500, 500],
                      "engine_16": [700, 900, 850]}, [100.0, 160.0, 120.0])
    document = record.Run.start("limit", "python -m bench.run --only limit").document(figures)
    record.write(document, tmp_path / "bench" / "results")
    block = docs.table_block("limit", tmp_path)
    assert "`python -m bench.run --only limit`" in block and document["started_utc"][:10] in block
    assert "**0.85 (0.70\u20130.90)** (≥ 0.8: met)" in block  # median of the passes' ratios, then the spread
    assert "160 MB; ≤ 150: **missed**" in block  # the highest peak of the passes
    summary = docs.table_block("targets", tmp_path)
    assert "| **0.85 (0.70\u20130.90)** | ≥ 0.8 | yes |" in summary
    assert "| 160 MB | ≤ 150 MB | **no** |" in summary
    assert "not yet re-measured" in summary  # the sections not run here
    assert "Not yet re-measured" in docs.table_block("shapes", tmp_path)
    quick = record.Run.start("limit", "python -m bench.run --only limit --quick").document(figures,
                                                                                          "--quick: a smoke run")
    record.write(quick, tmp_path / "bench" / "results")
    assert "**--quick: a smoke run**" in docs.table_block("limit", tmp_path)
    assert docs.table_block("targets", tmp_path).count("(**--quick: a smoke run**)") == 2  # a quick run says so


def test_a_result_file_without_command_or_date_is_refused(tmp_path: Path) -> None:
    document = record.Run.start("x", "python -m bench.run --only x").document({"a": 1})
    path = record.write(document, tmp_path)
    assert record.problems(json.loads(path.read_text())) == []
    assert record.problems({**document, "command": " "}) == ["no command"]
    assert any("UTC" in p for p in record.problems({**document, "started_utc": "2026-11-27 05:03"}))
    with pytest.raises(ValueError, match="figures"):
        record.write({k: v for k, v in document.items() if k != "figures"}, tmp_path)


def test_the_costs_of_a_run_split_the_fetching_threads_time_without_counting_consume_twice() -> None:
    from collections import Counter

    from bench.costs import Costs, _kind

    costs = Costs()
    costs._at_first = Counter({"fetching thread": 1.0, "handler threads": 0.5})
    costs._at_count = Counter({"fetching thread": 2.2, "handler threads": 1.3, "librdkafka": 0.4})
    costs._steps_at_first = Counter({"consume": 0.1, "fetch": 0.15})
    costs._steps_at_count = Counter({"consume": 0.6, "fetch": 0.85, "admit": 0.2})
    figures = costs.figures(1_000_000)
    assert figures["threads"] == {"fetching thread": 1.2, "handler threads": 0.8, "librdkafka": 0.4, "other": 0.0}
    # fetch's 0.7 holds consume's 0.5: 0.2 besides it; the rest of the loop is what no step took
    assert figures["steps"] == {"consume": 0.5, "fetch": 0.2, "admit": 0.2, "rest of the loop": 0.3}
    assert _kind("MainThread", 7, 7) == "fetching thread" and _kind("mtc75-worker_3", 7, 8) == "handler threads"
    assert _kind("rdk:broker1", 7, 9) == "librdkafka" and _kind("mtc75-make-x.dlq", 7, 10) == "other"
