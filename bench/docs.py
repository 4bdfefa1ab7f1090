"""The figures of BENCHMARKS.md and RELIABILITY.md, generated from the committed result files.

    python -m bench.docs            # rewrite the generated parts of both documents
    python -m bench.docs --check    # exit 1 and name every generated part that is not what it would be

The documents' prose is hand-written; only what stands between marker comments is generated:

- a **table block** (BENCHMARKS.md): ``<!-- table: NAME -->`` ... ``<!-- /table -->``. NAME is one of
  TABLES: a result file (bench/record.py) and the function that turns it into a markdown table. The
  block starts with one line naming the file, its command, UTC date, commit and load; a file that is
  not committed gives one line saying the table is not yet re-measured and which command makes it.
- a **figure span** (RELIABILITY.md, inside table cells or prose):
  ``<!--fig FILE "SCENARIO" TEMPLATE-->VALUE<!--/fig-->``. FILE names tests/figures/FILE.json (a run
  recorded by ``python -m bench.record``, e.g. ``make faults``), SCENARIO the ``FIGURES`` record of
  that run (``report_figures(SCENARIO, ...)`` in the test; ``"SCENARIO@2"`` for the second record of a
  scenario reported twice), TEMPLATE a ``str.format`` template over the record's keys with three extra
  formats: ``{k:range}`` (lowest to highest of a list, with an en dash), ``{k:list}`` (items joined by
  " / "), ``{k:sum}``. A plain ``{k}`` writes integers with a space every three digits and lists
  joined by " / ". A record whose test did not pass is shown with "(test failed in that run)"; a
  missing one as "not yet re-measured".
- a **run span**: ``<!--run FILE-->VALUE<!--/run-->``: that run's command, date, commit, load and
  the test counts.

A marker right after a backtick is an example in inline code, not a marker.

Thread contract: a command-line tool; everything runs on the caller's thread.
"""

from __future__ import annotations

import argparse
import datetime as dt
import re
import statistics
import string
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench import record

ROOT = record.ROOT
DOCS = (ROOT / "BENCHMARKS.md", ROOT / "RELIABILITY.md")
MISSING = "not yet re-measured"
DASH = "\u2013"  # ranges, as the documents write them
FAILED = " (test failed in that run)"

TABLE = re.compile(r"(?P<open>(?<!`)<!-- table: (?P<name>[a-z0-9_-]+) -->\n)(?P<value>.*?)(?P<close><!-- /table -->)",
                   re.S)
FIG = re.compile(r'(?P<open>(?<!`)<!--fig (?P<file>[a-z0-9_-]+) "(?P<scenario>[^"]+)" (?P<template>.*?)-->)'
                 r"(?P<value>.*?)(?P<close><!--/fig-->)")
RUN = re.compile(r"(?P<open>(?<!`)<!--run (?P<file>[a-z0-9_-]+)-->)(?P<value>.*?)(?P<close><!--/run-->)")


# -- formatting ------------------------------------------------------------------------------------


def num(value: float, digits: int = 0) -> str:
    """1234567 -> 1,234,567 (BENCHMARKS.md's tables); digits after the point when asked."""
    return f"{value:,.{digits}f}"


def spread(values: Sequence[float], fmt: Callable[[float], str] = num) -> str:
    """One pass: its value; more: "median (min to max)", with an en dash as the docs write ranges."""
    if len(values) == 1:
        return fmt(values[0])
    return f"{fmt(statistics.median(values))} ({fmt(min(values))}{DASH}{fmt(max(values))})"


def ratio(values: Sequence[float]) -> str:
    return spread(values, lambda v: f"{v:.2f}")


def mb(values: Sequence[float]) -> str:
    return f"{max(values):.0f} MB"


def when(document: dict[str, Any]) -> str:
    started = dt.datetime.strptime(document["started_utc"], "%Y-%m-%dT%H:%M:%SZ")
    return started.strftime("%Y-%m-%d %H:%M UTC")


def provenance(file: str, document: dict[str, Any]) -> str:
    m = document["machine"]
    before, after = m["load_avg_before"][0], m["load_avg_after"][0]
    dirty = " (with uncommitted changes)" if document.get("dirty") else ""
    line = (f"`{file}`: `{document['command']}`, {when(document)}, commit "
            f"{document['commit'][:7]}{dirty}, {m['cores']} cores, load average {before:.1f} → {after:.1f}, "
            f"{document.get('seconds', 0):.0f} s")
    if document.get("note"):
        line += f". **{document['note']}**"
    return line


# -- BENCHMARKS.md tables -------------------------------------------------------------------------------


def _rows(lines: list[str]) -> str:
    return "\n".join(lines)


def t_limit(f: dict[str, Any]) -> str:
    threads = f["threads"]
    out = [f"| shape (no-op handler) | tuned loop msg/s (peak RSS) | default-settings loop msg/s (peak RSS) "
           f"| engine, {threads} threads, msg/s (peak RSS) | **engine / tuned loop** | default loop / tuned loop "
           "| Python µs/msg, engine / tuned loop | load average at the passes |",
           "|---|---|---|---|---|---|---|---|"]
    for row in f["rows"]:
        c, r = row["contenders"], row["ratios"]
        engine_rss = max(c["engine_16"]["peak_rss_mb"])
        met = "met" if statistics.median(r["engine_16_vs_tuned"]) >= row["target"] else "**missed**"
        rss_met = "met" if engine_rss <= row["rss_target_mb"] else "**missed**"
        out.append(
            f"| {row['shape']}, {row['partitions']} partitions ({num(row['backlog'])} msgs) "
            f"| {spread(c['tuned_loop']['rate'])} ({mb(c['tuned_loop']['peak_rss_mb'])}) "
            f"| {spread(c['default_loop']['rate'])} ({mb(c['default_loop']['peak_rss_mb'])}) "
            f"| {spread(c['engine_16']['rate'])} ({engine_rss:.0f} MB; ≤ {row['rss_target_mb']:.0f}: {rss_met}) "
            f"| **{ratio(r['engine_16_vs_tuned'])}** (≥ {row['target']}: {met}) "
            f"| {ratio(r['default_vs_tuned'])} | {_python_us(c)} "
            f"| {', '.join(str(x) for x in row['load_avg_at_passes'])} |")
    return _rows(out)


def _python_us(c: dict[str, Any]) -> str:
    """The limit table's cell: Python threads' CPU µs per message, engine and tuned loop (older files: —)."""
    if "python_us_per_message" not in c["engine_16"] or "python_us_per_message" not in c["tuned_loop"]:
        return "—"
    def fmt(v: float) -> str:
        return f"{v:.2f}"

    engine, loop = c["engine_16"]["python_us_per_message"], c["tuned_loop"]["python_us_per_message"]
    return f"{spread(engine, fmt)} / {spread(loop, fmt)}"


def t_batch(f: dict[str, Any]) -> str:
    out = ["| shape | tuned loop msg/s (peak RSS) | no-op batch handler msg/s (peak RSS) | **no-op / tuned loop** "
           "| sleeping batch handler msg/s | **sleeping / min(ideal, tuned loop)** | load average at the passes |",
           "|---|---|---|---|---|---|---|"]
    for row in f["rows"]:
        c, r, t = row["contenders"], row["ratios"], row["targets"]
        rss = max(c["batch_noop"]["peak_rss_mb"] + c["batch_sleep"]["peak_rss_mb"])
        noop_met = "met" if statistics.median(r["noop_vs_tuned"]) >= t["noop"] else "**missed**"
        sleep_met = "met" if statistics.median(r["sleep_vs_bound"]) >= t["sleep"] else "**missed**"
        rss_met = "met" if rss <= t["rss_mb"] else "**missed**"
        out.append(
            f"| {row['shape']}, {row['partitions']} partitions ({num(row['backlog'])} msgs) "
            f"| {spread(c['tuned_loop']['rate'])} ({mb(c['tuned_loop']['peak_rss_mb'])}) "
            f"| {spread(c['batch_noop']['rate'])} ({rss:.0f} MB; ≤ {t['rss_mb']:.0f}: {rss_met}) "
            f"| **{ratio(r['noop_vs_tuned'])}** (≥ {t['noop']}: {noop_met}) "
            f"| {spread(c['batch_sleep']['rate'])} (ideal {num(row['sleep_ideal'])}) "
            f"| **{ratio(r['sleep_vs_bound'])}** (≥ {t['sleep']}: {sleep_met}) "
            f"| {', '.join(str(x) for x in row['load_avg_at_passes'])} |")
    return _rows(out)


def t_bursts(f: dict[str, Any]) -> str:
    out = ["| burst (sleeping handler) | fixed counts msg/s | auto (from 1, limit) msg/s | **auto / best fixed** "
           "| load average at the passes |", "|---|---|---|---|---|"]
    for row in f["rows"]:
        c = row["contenders"]
        fixed = "; ".join(f"{n}: {spread(c[f'fixed_{n}']['rate'])}" for n in row["fixed"])
        met = "met" if statistics.median(row["auto_vs_best_fixed"]) >= row["target"] else "**missed**"
        out.append(f"| {row['burst']} | {fixed} | {spread(c['auto']['rate'])} (limit {row['limit']}) "
                   f"| **{ratio(row['auto_vs_best_fixed'])}** (≥ {row['target']}: {met}) "
                   f"| {', '.join(str(x) for x in row['load_avg_at_passes'])} |")
    return _rows(out)


SHAPE_COLUMNS = (("default_loop", "default-settings loop"), ("engine", "engine, 75 threads"),
                 ("pool", "plain pool"), ("arroyo_x1", "arroyo, max_pending_futures 75"),
                 ("arroyo_x10", "arroyo, 750"), ("engine_previous_settings", "engine, previous settings"),
                 ("engine_large_fetches", "engine, large fetches"))


def t_shapes(f: dict[str, Any]) -> str:
    head = " | ".join(f"{label} / tuned (peak RSS)" for _, label in SHAPE_COLUMNS)
    out = [f"| shape (no-op handler) | tuned loop msg/s (peak RSS) | {head} | engine's fetch sizes | load average |",
           "|---|---|" + "---|" * len(SHAPE_COLUMNS) + "---|---|"]
    for row in f["rows"]:
        c, r = row["contenders"], row["ratios"]
        cells = [f"{ratio(r[f'{name}_vs_tuned'])} ({mb(c[name]['peak_rss_mb'])})" for name, _ in SHAPE_COLUMNS]
        sizes = sorted(set(c["engine"].get("fetch_sizes", ["?"])))
        out.append(f"| {row['shape']}, {row['partitions']} partitions ({num(row['backlog'])} msgs) "
                   f"| {spread(c['tuned_loop']['rate'])} "
                   f"({mb(c['tuned_loop']['peak_rss_mb'])}) | {' | '.join(cells)} | {', '.join(sizes)} "
                   f"| {', '.join(str(x) for x in row['load_avg_at_passes'])} |")
    return _rows(out)


def t_shapes_cpu(f: dict[str, Any]) -> str:
    names = ("tuned_loop", "default_loop", "engine", "pool")
    out = ["| shape | " + " | ".join(f"{n.replace('_', ' ')} µs/msg" for n in names) + " |",
           "|---|" + "---|" * len(names)]
    for row in f["rows"]:
        c = row["contenders"]
        cells = [spread(c[n]["cpu_us_per_message"], lambda v: f"{v:.1f}") for n in names]
        out.append(f"| {row['shape']}, {row['partitions']} partitions | " + " | ".join(cells) + " |")
    return _rows(out)


def t_reference(f: dict[str, Any]) -> str:
    out = ["| shape | tuned-loop candidate | msg/s | / the first candidate | peak RSS |", "|---|---|---|---|---|"]
    for row in f["rows"]:
        for name, c in row["contenders"].items():
            out.append(f"| {row['shape']}, {row['partitions']} partitions | {name} | {spread(c['rate'])} "
                       f"| {ratio(row['ratios'][f'{name}_vs_first'])} | {mb(c['peak_rss_mb'])} |")
    return _rows(out)


def t_saturation(f: dict[str, Any]) -> str:
    grid = {(r["threads"], r["work_s"]): r for r in f["grid"]}
    ns = sorted({k[0] for k in grid})
    works = sorted({k[1] for k in grid})
    out = ["| W \\ N | " + " | ".join(str(n) for n in ns) + " |", "|---|" + "---|" * len(ns)]
    for w in works:
        out.append(f"| {w * 1000:g} ms | " + " | ".join(f"{grid[(n, w)]['ratio']:.3f}" if (n, w) in grid else "—"
                                                        for n in ns) + " |")
    return _rows(out)


def t_saturation_peers(f: dict[str, Any]) -> str:
    out = ["| N = 75, W = 10 ms | msg/s | of ideal |", "|---|---|---|"]
    mine = next((r for r in f["grid"] if r["threads"] == 75 and r["work_s"] == 0.010), None)
    if mine is not None:
        out.append(f"| MTC75 | {num(mine['rate'])} | **{mine['ratio']:.3f}** (target ≥ {f['target']}) |")
    for r in f["peers"]:
        pending = f", max_pending_futures = {r['max_pending_futures']}" if "max_pending_futures" in r else ""
        out.append(f"| {r['peer']}{pending} | {num(r['rate'])} | {r['ratio']:.3f} |")
    return _rows(out)


def t_peer(f: dict[str, Any]) -> str:
    out = [f"| contender | elapsed | of ideal ({f['ideal_s']:.2f} s) |", "|---|---|---|",
           f"| MTC75 ({f['threads']} threads) | {f['elapsed_s']:.2f} s "
           f"| **{f['ratio']:.3f}** (target ≥ {f['target']}) |"]
    for p in f["peers"]:
        pending = f", max_pending_futures = {p['max_pending_futures']}" if "max_pending_futures" in p else ""
        out.append(f"| {p['peer']}{pending} | {p['elapsed_s']:.2f} s | {p['ratio']:.3f} |")
    return _rows(out)


def t_cpu(f: dict[str, Any]) -> str:
    return _rows(["| fed rate | messages | CPU | per message |", "|---|---|---|---|",
                  f"| {num(f['rate'])} msg/s | {num(f['messages'])} | {f['cpu_s']:.2f} s "
                  f"| {f['us_per_message']:.0f} µs |"])


def t_async(f: dict[str, Any]) -> str:
    out = [f"| runner | bound | msg/s | of ideal ({num(f['ideal_rate'])} msg/s) | OS threads (peak) | peak RSS "
           "| CPU per message |", "|---|---|---|---|---|---|---|"]
    for run in sorted(f["runs"], key=lambda r: (r["mode"], r["bound"], -r["rate"])):
        best = " (best)" if run == f["async"] or run == f["thread_best"] else ""
        out.append(f"| {run['mode']}{best} | {num(run['bound'])} | {num(run['rate'])} | {run['ratio']:.3f} "
                   f"| {run['peak_threads']} | {run['peak_rss_mb']:.0f} MB | {run['cpu_us_per_message']:.0f} µs |")
    return _rows(out)


def t_ordering(f: dict[str, Any]) -> str:
    """Rates are each contender's best pass; the ratio is best against best, with each pass's own ratio
    (key and unordered of one pass, minutes apart at most) as its spread when the file keeps them."""
    out = ["| keys | 2 ms: unordered | 2 ms: key | **key / unordered** (per pass) | no-op: unordered | no-op: key "
           "| **key / unordered** (per pass) | no-op: unordered / fifo |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def kept(side: dict[str, Any]) -> str:
        passes = side.get("key_vs_unordered_passes")
        spread_ = f" ({min(passes):.2f}{DASH}{max(passes):.2f})" if passes else ""
        return f"**{side['key_vs_unordered']:.2f}**{spread_}"

    for row in f["rows"]:
        s, n = row["sleep"], row["noop"]
        fifo = n.get("unordered_vs_fifo")
        out.append(f"| {num(row['keys'])} | {num(s['unordered']['rate'])}/s | {num(s['key']['rate'])}/s "
                   f"| {kept(s)} | {num(n['unordered']['rate'])}/s | {num(n['key']['rate'])}/s "
                   f"| {kept(n)} | {'—' if fifo is None else f'{fifo:.2f}'} |")
    return _rows(out)


STEP_ORDER = ("consume", "fetch", "admit", "put", "settle", "turn", "rest of the loop")  # the poll loop's order
STEP_NAMES = {"consume": "`consume()`", "fetch": "`fetch`, besides `consume()`", "admit": "`admit`",
              "put": "`put`", "settle": "`settle`", "turn": "`turn`", "rest of the loop": "rest of the loop"}


def t_costs(f: dict[str, Any]) -> str:
    """Per contender: its rate, the CPU µs per message of each kind of thread, and of each step of the
    fetching thread (medians over the passes)."""
    from bench.costs import KINDS

    seen = {s for c in f["contenders"].values() for s in c["median"]["steps"]}
    steps = [s for s in STEP_ORDER if s in seen] + sorted(seen - set(STEP_ORDER))
    out = ["| contender | msg/s | " + " | ".join(f"{k} µs" for k in KINDS) + " | **Python µs** (fetching + handler) | "
           + " | ".join(STEP_NAMES.get(s, s) for s in steps) + " |", "|---|" + "---:|" * (len(KINDS) + 2 + len(steps))]
    for name, c in f["contenders"].items():
        t, s = c["median"]["threads"], c["median"]["steps"]
        python = t["fetching thread"] + t["handler threads"]
        out.append(f"| {name} | {spread(c['rate'])} | " + " | ".join(f"{t[k]:.2f}" for k in KINDS)
                   + f" | **{python:.2f}** | " + " | ".join("—" if k not in s else f"{s[k]:.2f}" for k in steps) + " |")
    return _rows(out)


def t_eos(f: dict[str, Any]) -> str:
    out = ["| guarantee | COMMIT_INTERVAL | rate (per pass) | latency p50 | latency p99 |", "|---|---:|---:|---:|---:|"]
    keys = sorted({(r["guarantee"], r["commit_interval"]) for r in f["runs"]}, key=lambda k: (k[0] != "at_least_once",
                                                                                               k[1]))
    for guarantee, interval in keys:
        runs = [r for r in f["runs"] if (r["guarantee"], r["commit_interval"]) == (guarantee, interval)]
        p50, p99 = spread([r["latency_p50_ms"] for r in runs]), spread([r["latency_p99_ms"] for r in runs])
        out.append(f"| `{guarantee}` | {interval:g} s | {spread([r['rate'] for r in runs])}/s | {p50} ms | {p99} ms |")
    out.append(f"| **exactly_once / at_least_once** (best rates, 0.5 s) | | **{f['eos_vs_alo']:.2f}** "
               f"(target ≥ {f['target']}) | | |")
    return _rows(out)


def t_autotune(f: dict[str, Any]) -> str:
    from bench.autotune import markdown

    return markdown(f)


def t_scaleout(f: dict[str, Any]) -> str:
    out = ["| processes | msg/s | ratio to one process | of ideal | window |", "|---|---|---|---|---|"]
    for row in f["runs"]:
        out.append(f"| {row['processes']} | {num(row['rate_msg_s'])} | **{row['ratio_to_one']:.2f}** "
                   f"| {row['of_ideal']:.3f} | {row['window_s']:.1f} s |")
    return _rows(out)


def t_processes(f: dict[str, Any]) -> str:
    best = {name: max(runs, key=lambda r: r["rate"]) for name, runs in f["runs"].items()}
    top = max(best[f"threads_{n}"]["rate"] for n in f["threads"])
    out = [f"| {f['handler_ms']:g} ms of pure-Python CPU, 1 partition | msg/s (best of {f['passes']}) "
           "| ratio to the best thread count |", "|---|---|---|"]
    for n in f["threads"]:
        r = best[f"threads_{n}"]["rate"]
        out.append(f"| threads, MAX_THREAD_COUNT={n} | {num(r)} | {r / top:.2f} |")
    out.append(f"| processes, PROCESS_COUNT={f['processes']} | {num(best['processes']['rate'])} "
               f"| **{f['speedup']:.2f}** |")
    t1, p1 = best["threads_1_1ms"]["rate"], best["processes_1_1ms"]["rate"]
    out.append(f"| 1 ms handler, one at a time: 1 worker process (1 thread) | {num(p1)} ({num(t1)}) "
               f"| time per message over 1 ms: **{f['overhead_1ms']:.1%}** ({f['threads_1_1ms_overhead']:.1%}) |")
    return _rows(out)


def t_share(f: dict[str, Any]) -> str:
    from bench.share import markdown

    return markdown(f)


def _src(document: dict[str, Any]) -> str:
    """The targets table's "from" cell: the run's date, and its note when it has one (a --quick run)."""
    return when(document) + (f" (**{document['note']}**)" if document.get("note") else "")


def _met(ok: bool) -> str:
    return "yes" if ok else "**no**"


def t_targets(root: Path) -> str:
    """The summary: each target of the issues against the committed file that measures it."""
    out = ["| figure | measured | target | met | from |", "|---|---|---|---|---|"]

    def doc(name: str) -> dict[str, Any] | None:
        path = root / "bench" / "results" / f"{name}.json"
        return record.load(path) if path.exists() else None

    def missing(what: str, name: str, target: str) -> None:
        out.append(f"| {what} | {MISSING} | {target} | — | `bench/results/{name}.json` |")

    limit = doc("limit")
    if limit is None:
        missing("no-op, engine (16 threads) / tuned loop, per limit shape; engine peak RSS", "limit",
                "≥ 0.8 (6 partitions), ≥ 0.6 (60); ≤ 150 MB")
    else:
        for row in limit["figures"]["rows"]:
            r = row["ratios"]["engine_16_vs_tuned"]
            rss = max(row["contenders"]["engine_16"]["peak_rss_mb"])
            shape = f"{row['shape']}, {row['partitions']} partitions"
            out.append(f"| no-op, {shape}: engine / tuned loop | **{ratio(r)}** | ≥ {row['target']} "
                       f"| {_met(statistics.median(r) >= row['target'])} | {_src(limit)} |")
            out.append(f"| no-op, {shape}: engine peak RSS | {rss:.0f} MB | ≤ {row['rss_target_mb']:.0f} MB "
                       f"| {_met(rss <= row['rss_target_mb'])} | {_src(limit)} |")
    batch = doc("batch")
    if batch is None:
        missing("batch handlers: no-op (BATCH_SIZE 500) / tuned loop; 10 ms per call (100, 16 threads) / "
                "min(ideal, tuned loop); peak RSS", "batch", "≥ 0.9; ≥ 0.85; ≤ 150 MB")
    else:
        for row in batch["figures"]["rows"]:
            r, t = row["ratios"], row["targets"]
            shape = f"{row['shape']}, {row['partitions']} partitions"
            rss = max(row["contenders"]["batch_noop"]["peak_rss_mb"] + row["contenders"]["batch_sleep"]["peak_rss_mb"])
            out.append(f"| batch, {shape}: no-op (BATCH_SIZE {row['batch_noop']}) / tuned loop "
                       f"| **{ratio(r['noop_vs_tuned'])}** | ≥ {t['noop']} "
                       f"| {_met(statistics.median(r['noop_vs_tuned']) >= t['noop'])} | {_src(batch)} |")
            out.append(f"| batch, {shape}: {row['sleep_s'] * 1e3:g} ms per call (BATCH_SIZE {row['batch_sleep']}, "
                       f"{row['threads']} threads) / min(ideal, tuned loop) | **{ratio(r['sleep_vs_bound'])}** "
                       f"| ≥ {t['sleep']} | {_met(statistics.median(r['sleep_vs_bound']) >= t['sleep'])} "
                       f"| {_src(batch)} |")
            out.append(f"| batch, {shape}: engine peak RSS | {rss:.0f} MB | ≤ {t['rss_mb']:.0f} MB "
                       f"| {_met(rss <= t['rss_mb'])} | {_src(batch)} |")
    bursts = doc("bursts")
    if bursts is None:
        missing('MAX_THREAD_COUNT="auto" / best fixed count over a short burst', "bursts", "≥ 0.8")
    else:
        for row in bursts["figures"]["rows"]:
            r = row["auto_vs_best_fixed"]
            out.append(f"| auto / best fixed count over a burst of {row['burst']} | **{ratio(r)}** "
                       f"| ≥ {row['target']} | {_met(statistics.median(r) >= row['target'])} | {_src(bursts)} |")
    sat = doc("saturation")
    mine = next((r for r in sat["figures"]["grid"] if r["threads"] == 75 and r["work_s"] == 0.010), None) \
        if sat else None
    if sat is None or mine is None:
        missing("saturation, N = 75 threads, W = 10 ms: of ideal N/W", "saturation", "≥ 0.97")
    else:
        t = sat["figures"]["target"]
        out.append(f"| saturation, N = 75 threads, W = 10 ms: of ideal N/W | **{mine['ratio']:.3f}** | ≥ {t} "
                   f"| {_met(mine['ratio'] >= t)} | {_src(sat)} |")
    peer = doc("peer")
    peer_label = f"peer workload (10 000 msgs, 1 partition, 0{DASH}5 ms, 16 threads): of ideal"
    if peer is None:
        missing(peer_label, "peer", "≥ 0.9")
    else:
        f = peer["figures"]
        out.append(f"| {peer_label} | **{f['ratio']:.3f}** "
                   f"| ≥ {f['target']} | {_met(f['ratio'] >= f['target'])} | {_src(peer)} |")
    ordering = doc("ordering")
    if ordering is None:
        missing("`ORDERING=key` / unordered at ≥ 20 keys: 2 ms of work; no-op", "ordering", "≥ 0.9; ≥ 0.5")
    else:
        rows = [r for r in ordering["figures"]["rows"] if r["keys"] >= 20]
        for handler, target in (("sleep", 0.9), ("noop", 0.5)):
            values = [r[handler]["key_vs_unordered"] for r in rows]
            label = "2 ms of work" if handler == "sleep" else "no-op"
            spread_ = f"{min(values):.2f}{DASH}{max(values):.2f}"
            out.append(f"| `ORDERING=key` / unordered, {label}, ≥ 20 keys | **{spread_}** "
                       f"| ≥ {target} | {_met(min(values) >= target)} | {_src(ordering)} |")
    processes = doc("processes")
    if processes is None:
        missing("process runner: 2 workers / best thread count (2 ms CPU-bound handler); overhead on 1 ms",
                "processes", "≥ 1.7; ≤ 10 %")
    else:
        f = processes["figures"]
        t = f["targets"]
        out.append(f"| process runner, {f['processes']} workers / best thread count, {f['handler_ms']:g} ms "
                   f"CPU-bound handler | **{f['speedup']:.2f}** | ≥ {t['speedup']} "
                   f"| {_met(f['speedup'] >= t['speedup'])} | {_src(processes)} |")
        out.append(f"| process runner: overhead per message on a 1 ms handler | **{f['overhead_1ms']:.1%}** "
                   f"| ≤ {t['overhead']:.0%} | {_met(f['overhead_1ms'] <= t['overhead'])} | {_src(processes)} |")
    async_ = doc("async")
    if async_ is None:
        missing("async handlers: of the ideal 10,000 msg/s; OS threads", "async", "≥ 0.8; ≤ 20")
    else:
        f = async_["figures"]
        a, t = f["async"], f["targets"]
        out.append(f"| async handlers: of the ideal {num(f['ideal_rate'])} msg/s | **{a['ratio']:.3f}** "
                   f"| ≥ {t['ratio']} | {_met(a['ratio'] >= t['ratio'])} | {_src(async_)} |")
        out.append(f"| async handlers: OS threads (peak) | **{a['peak_threads']}** | ≤ {t['threads']} "
                   f"| {_met(a['peak_threads'] <= t['threads'])} | {_src(async_)} |")
    return _rows(out)


# name -> (result file, renderer of its "figures", the command that writes the file)
TABLES: dict[str, tuple[str, Callable[[dict[str, Any]], str], str]] = {
    "limit": ("bench/results/limit.json", t_limit, "python -m bench.run --only limit"),
    "batch": ("bench/results/batch.json", t_batch, "python -m bench.run --only batch"),
    "bursts": ("bench/results/bursts.json", t_bursts, "python -m bench.run --only bursts"),
    "shapes": ("bench/results/shapes.json", t_shapes, "python -m bench.run --only shapes"),
    "shapes-cpu": ("bench/results/shapes.json", t_shapes_cpu, "python -m bench.run --only shapes"),
    "reference": ("bench/results/reference.json", t_reference, "python -m bench.run --only reference"),
    "saturation": ("bench/results/saturation.json", t_saturation, "python -m bench.run --only saturation"),
    "saturation-peers": ("bench/results/saturation.json", t_saturation_peers,
                         "python -m bench.run --only saturation"),
    "peer": ("bench/results/peer.json", t_peer, "python -m bench.run --only peer"),
    "cpu": ("bench/results/cpu.json", t_cpu, "python -m bench.run --only cpu"),
    "async": ("bench/results/async.json", t_async, "python -m bench.run --only async"),
    "ordering": ("bench/results/ordering.json", t_ordering, "python -m bench.ordering --with-fifo"),
    "autotune": ("bench/results/autotune.json", t_autotune, "python -m bench.autotune"),
    "eos": ("bench/results/eos.json", t_eos, "python -m bench.eos"),
    "scaleout": ("bench/results/scaleout.json", t_scaleout, "python -m bench.scaleout"),
    "processes": ("bench/results/processes.json", t_processes, "python -m bench.processes"),
    "share": ("bench/results/share.json", t_share, "python -m bench.share"),
    "costs": ("bench/results/costs.json", t_costs, "python -m bench.costs"),
}
def tables_of(document: dict[str, Any]) -> str:
    """Every table made from one result document (bench/run.py prints them at the end of a run)."""
    return "\n\n".join(f"{name}:\n\n{renderer(document['figures'])}" for name, (file, renderer, _) in TABLES.items()
                       if Path(file).stem == document["section"])


def table_block(name: str, root: Path = ROOT) -> str:
    if name == "targets":
        return "*Each row from the result file of its section (the date is its run's); generated.*\n\n" \
            + t_targets(root) + "\n"
    if name not in TABLES:
        raise DocError(f"unknown table {name!r} (bench/docs.py TABLES: {', '.join(TABLES)})")
    file, renderer, command = TABLES[name]
    path = root / file
    if not path.exists():
        return f"*{MISSING[0].upper()}{MISSING[1:]}: no `{file}` is committed; `{command}` writes it.*\n"
    document = record.load(path)
    return f"*From {provenance(file, document)}.*\n\n{renderer(document['figures'])}\n"


# -- RELIABILITY.md figure spans ---------------------------------------------------------------------


class DocError(Exception):
    """A marker the generator cannot fill: unknown table, bad template, ambiguous scenario."""


class Figures(string.Formatter):
    """``str.format`` over one FIGURES record, with the formats of the module docstring; no attributes."""

    def get_field(self, field_name: str, args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
        if "." in field_name:
            raise DocError(f"{{{field_name}}}: attributes are not figures")
        return super().get_field(field_name, args, kwargs)

    def format_field(self, value: Any, format_spec: str) -> str:
        if isinstance(value, dict) and format_spec in ("", "list", "range", "sum"):
            value = list(value.values())  # e.g. a figure per partition
        if format_spec == "range":
            lo, hi = min(value), max(value)
            ends = [self.format_field(lo, "")] + ([self.format_field(hi, "")] if hi != lo else [])
            return DASH.join(ends)
        if format_spec == "sum":
            return self.format_field(sum(value), "")
        if format_spec in ("", "list") and isinstance(value, list):
            return " / ".join(self.format_field(v, "") for v in value)
        if format_spec == "" and isinstance(value, bool):
            return "yes" if value else "no"
        if format_spec == "" and isinstance(value, int):
            return f"{value:,}".replace(",", " ")
        return super().format_field(value, format_spec)


def test_run(file: str, root: Path = ROOT) -> dict[str, Any] | None:
    path = root / "tests" / "figures" / f"{file}.json"
    return record.load(path) if path.exists() else None


def find_record(document: dict[str, Any], scenario: str) -> dict[str, Any] | None:
    name, _, nth = scenario.partition("@")
    found = [r for r in document["figures"]["records"] if r.get("scenario") == name]
    if nth:
        index = int(nth) - 1
        return found[index] if 0 <= index < len(found) else None
    if len(found) > 1:
        raise DocError(f"{len(found)} records of scenario {name!r}: name one as \"{name}@1\" .. \"@{len(found)}\"")
    return found[0] if found else None


def fig_value(file: str, scenario: str, template: str, root: Path = ROOT) -> str:
    if "--" in template:
        raise DocError(f"template {template!r}: '--' cannot stand inside an HTML comment")
    document = test_run(file, root)
    found = find_record(document, scenario) if document is not None else None
    if found is None:
        return MISSING
    try:
        value = Figures().format(template, **found)
    except (KeyError, IndexError, ValueError, TypeError) as exc:
        raise DocError(f'fig {file} "{scenario}" {template!r}: {exc!r} (record keys: {sorted(found)})') from exc
    return value if found.get("outcome", "passed") == "passed" else value + FAILED


def run_value(file: str, root: Path = ROOT) -> str:
    document = test_run(file, root)
    if document is None:
        return f"{MISSING} (no `tests/figures/{file}.json`)"
    tests = document["figures"]["tests"]
    counted = ", ".join(f"{n} {k}" for k, n in sorted(tests.items(), key=lambda kv: kv[0] != "passed"))
    m = document["machine"]
    peak = f", at most {m['load_avg_1m_peak']:.1f}" if "load_avg_1m_peak" in m else ""
    return (f"`{document['command']}`, {when(document)}, commit {document['commit'][:7]}, {m['cores']} cores, "
            f"load average {m['load_avg_before'][0]:.1f} → {m['load_avg_after'][0]:.1f}{peak}: **{counted}** in "
            f"{document.get('seconds', 0):.0f} s (`tests/figures/{file}.json`)"
            + (f"; {document['note']}" if document.get("note") else ""))


# -- the documents ------------------------------------------------------------------------------------


def generate(text: str, root: Path = ROOT) -> str:
    """``text`` with every table block, figure span and run span filled from the result files under root."""
    def fill(value: Callable[[re.Match[str]], str]) -> Callable[[re.Match[str]], str]:
        return lambda m: m.group("open") + value(m) + m.group("close")

    text = TABLE.sub(fill(lambda m: table_block(m.group("name"), root)), text)
    text = FIG.sub(fill(lambda m: fig_value(m.group("file"), m.group("scenario"), m.group("template"), root)), text)
    return RUN.sub(fill(lambda m: run_value(m.group("file"), root)), text)


def markers(text: str) -> list[str]:
    """Every generated part of ``text``, as written (for naming the ones that differ)."""
    return [m.group(0) for pattern in (TABLE, FIG, RUN) for m in pattern.finditer(text)]


def stale(path: Path, root: Path = ROOT) -> list[str]:
    """The generated parts of the document at ``path`` that differ from what the result files give."""
    text = path.read_text()
    now, then = markers(text), markers(generate(text, root))
    return [f"{path.name}: {a[:160]!r}\n  should be {b[:160]!r}" for a, b in zip(now, then, strict=True) if a != b]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.docs", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a generated part is stale")
    args = parser.parse_args(argv)
    try:
        if args.check:
            problems = [p for doc in DOCS for p in stale(doc)]
            for p in problems:
                print(p)
            return 1 if problems else 0
        for doc in DOCS:
            text = doc.read_text()
            new = generate(text)
            if new != text:
                doc.write_text(new)
                print(f"bench.docs: {doc.name} regenerated")
    except DocError as exc:
        print(f"bench.docs: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
