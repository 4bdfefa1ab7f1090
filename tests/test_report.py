"""The run report without a broker: one CSV row a second, a PNG with three panels, pause shading."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image

from mtc75.app.report import COLUMNS, RunReport, batch_calls, pause_spans, plot, read_rows
from tests.stats_factory import make_stats


def count_panels(png: Path) -> int:
    """Plot frames, counted as separate long dark vertical runs (the axes' side spines) in one column."""
    dark = np.asarray(Image.open(png).convert("L")) < 100
    height = dark.shape[0]
    best = 0
    for column in dark.T:
        edges = np.flatnonzero(np.diff(np.concatenate(([0], column.astype(np.int8), [0]))))
        lengths = edges[1::2] - edges[0::2]
        best = max(best, int(np.sum(lengths >= height // 8)))
    return best


def test_rows_once_a_second_then_png_with_three_panels(tmp_path: Path) -> None:
    report = RunReport(tmp_path / "run")
    report.open()
    times = [0.0, 0.3, 1.0, 1.5, 2.1, 3.2]
    for i, t in enumerate(times):
        report.update(make_stats(elapsed_seconds=t, processed=10 * i, paused=i % 2 == 1,
                                 paused_seconds=0.4 * i, lag={("t", 0): 100 - i}))
    png = report.close(make_stats(elapsed_seconds=3.5, processed=60, lag={}))
    assert png == tmp_path / "run" / "report.png"

    with (tmp_path / "run" / "timeseries.csv").open() as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert tuple(reader.fieldnames or ()) == COLUMNS
    assert [float(r["elapsed_seconds"]) for r in rows] == [0.0, 1.0, 2.1, 3.2, 3.5]
    assert [r["processed"] for r in rows] == ["0", "20", "40", "50", "60"]
    assert rows[1]["lag"] == "98" and rows[-1]["lag"] == ""  # unknown lag stays empty, not 0
    assert rows[1]["paused"] == "0" and rows[3]["paused"] == "1"

    with Image.open(png) as image:
        image.load()  # decodes the whole file
        assert image.format == "PNG" and image.size == (1000, 800)
    assert count_panels(png) == 3


def test_panel_counter_sees_a_different_number_of_panels(tmp_path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 8), dpi=100)
    fig.subplots(2, 1)
    fig.savefig(tmp_path / "two.png")
    assert count_panels(tmp_path / "two.png") == 2


def test_pause_spans_come_from_the_paused_seconds_gained() -> None:
    rows = [
        {"elapsed_seconds": 0.0, "paused_seconds": 0.0},
        {"elapsed_seconds": 1.0, "paused_seconds": 0.0},
        {"elapsed_seconds": 2.0, "paused_seconds": 0.5},  # a short pause between two samples
        {"elapsed_seconds": 3.0, "paused_seconds": 1.5},  # paused the whole second: joins the previous span
        {"elapsed_seconds": 4.0, "paused_seconds": 1.5},
        {"elapsed_seconds": 5.0, "paused_seconds": 1.8},
    ]
    assert pause_spans(rows) == [(1.5, 3.0), (4.7, 5.0)]
    assert pause_spans([]) == []


def test_plot_handles_a_single_row(tmp_path: Path) -> None:
    report = RunReport(tmp_path)
    report.open()
    report.update(make_stats(elapsed_seconds=0.1))
    png = report.close()
    assert png is not None and count_panels(png) == 3
    assert len(read_rows(tmp_path / "timeseries.csv")) == 1


def test_close_without_open_writes_nothing(tmp_path: Path) -> None:
    assert RunReport(tmp_path / "never").close() is None
    assert not (tmp_path / "never").exists()


def test_plot_from_rows_directly(tmp_path: Path) -> None:
    rows = [dict.fromkeys(COLUMNS, 1.0) | {"elapsed_seconds": float(t)} for t in range(5)]
    plot(rows, tmp_path / "p.png")
    assert count_panels(tmp_path / "p.png") == 3


def test_a_batch_handler_s_calls_go_to_the_csv_and_the_throughput_panel(tmp_path: Path) -> None:
    report = RunReport(tmp_path)
    report.open()
    for second in range(4):  # 100 messages a second in 4 batch calls a second
        report.update(make_stats(elapsed_seconds=float(second + 1), processed=100 * (second + 1),
                                 batch_size=50, batches=4 * (second + 1)))
    png = report.close()
    rows = read_rows(tmp_path / "timeseries.csv")
    assert [row["batches"] for row in rows] == [4.0, 8.0, 12.0, 16.0]
    per_second, mean = batch_calls(rows) or ([], 0.0)
    assert per_second == [4.0, 4.0, 4.0, 4.0] and mean == 25.0
    assert png is not None and count_panels(png) == 3
    assert batch_calls(read_rows(_per_message_csv(tmp_path / "single"))) is None  # a per-message handler


def _per_message_csv(directory: Path) -> Path:
    report = RunReport(directory)
    report.open()
    report.update(make_stats(elapsed_seconds=1.0, batches=0))
    report.close()
    return directory / "timeseries.csv"
