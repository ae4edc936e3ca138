"""Figures per level, and the outputs: terminal table, JSON, CSV and the PNG plot."""

import csv
import json
import math
import os
import platform
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path

import numpy as np

from serving.bench.baselines import CeilingPoint
from serving.bench.loadgen import Level, RunResult
from serving.bench.server_metrics import ServerSplit

PERCENTILES = {"p50": 50, "p90": 90, "p95": 95, "p99": 99, "p99_9": 99.9}


def floor_label(setup: dict) -> str:
    """The echo floor's row label for a request shape: echo-floor kserve x1, echo-floor http kserve x32."""
    protocol = "http " if setup["protocol"] == "http" else ""
    shape = "-stream" if setup["stream"] else "-json" if setup["http_tensors"] == "json" else ""
    return f"echo-floor {protocol}{setup['api']}{shape} x{setup['images_per_request']}"


def summarize(
    config: str,
    setup: dict,
    level: Level,
    result: RunResult,
    split: ServerSplit | None,
    server_status: Counter | None = None,
) -> dict:
    """One row: the level, throughput, latency distribution (ms), requests and attempts by outcome, the
    server-side split, and why the level failed (None when it did not)."""
    lat = result.latency_s * 1e3
    ok = len(lat)
    row = {
        "config": config,
        **setup,
        # Includes this benchmark's own server and generators; what it shows is that nothing else ran.
        "load_avg_1m": os.getloadavg()[0],
        "mode": "closed" if level.concurrency else "open",
        "concurrency": level.concurrency or None,
        "rate": level.rate or None,
        "arrivals": None if level.concurrency else level.arrivals,
        "requests": result.status.total(),
        "attempts": result.attempts.total(),
        "ok": ok,
        "errors": result.status.total() - result.status["OK"],  # requests that failed in the end
        "status": dict(sorted(result.status.items())),  # requests by their last attempt's status
        "attempt_status": dict(sorted(result.attempts.items())),
        # Every attempt of the level, warm-up and drain included, as the server answered it; beside it
        # the server's own count of the same (mnist_requests_total), where its metrics could be read.
        "level_status": dict(sorted(result.all_attempts.items())),
        "server_level_status": None if server_status is None else dict(sorted(server_status.items())),
        "window_s": result.window_s,
        "req_per_s": ok / result.window_s if result.window_s else 0.0,
        "images_per_s": result.images / result.window_s if result.window_s else 0.0,
        "images": result.images,
        "correct": result.correct,
        "accuracy": result.correct / result.images if result.images and setup.get("checked", True) else None,
        "mean_ms": float(lat.mean()) if ok else None,
        "std_ms": float(lat.std()) if ok else None,
        **{k: float(np.percentile(lat, q)) if ok else None for k, q in PERCENTILES.items()},
        "max_ms": float(lat.max()) if ok else None,
        "client_cpu_us_per_request": 1e6 * result.cpu_s / result.sent if result.sent else None,
        "answered_until_s": result.answered_until_s,
        "failed": failure(result),
    }
    if not level.concurrency:
        row |= {
            "scheduled": result.scheduled,
            "late": result.late,
            "unsent": result.unsent,
            "max_send_lag_ms": result.max_lag_s * 1e3,
        }
    if split is not None:
        row |= _server_figures(split, row["requests"])
    return row


def _server_figures(split: ServerSplit, requests: int) -> dict:
    """The server's side of a level: its split of the time, and its CPU per request."""
    figures = {}
    if split.batches:
        figures |= {
            "server_requests": split.requests,
            "server_mean_ms": split.mean_request_ms,
            "server_queue_ms": split.mean_queue_ms,
            "server_compute_ms": split.mean_compute_ms,
            "server_batch_size": split.mean_batch_size,
        }
    if not math.isnan(split.cpu_s) and split.seconds > 0:
        # Per request answered in the window; the client's count, as the echo floor has no metrics.
        figures["server_cpu_cores"] = split.cpu_s / split.seconds
        figures["server_cpu_us_per_request"] = 1e6 * split.cpu_s / max(1, requests)
    return figures


# A level whose requests all failed for this long at its end (or this share of its window) measured a
# server that had stopped answering, not one that answers slowly.
DEAD_AFTER_S = 1.0
DEAD_SHARE = 0.1


def failure(result: RunResult) -> str | None:
    """Why a level measured nothing worth a figure: no request succeeded, or none did from some point on."""
    if not result.status:
        return "no request was measured"
    if not result.status["OK"]:
        failed = ", ".join(f"{s}={n}" for s, n in sorted(result.status.items()))
        return f"no request succeeded ({failed})"
    since = result.failing_since_s
    if since is not None and result.window_s - since > max(DEAD_AFTER_S, DEAD_SHARE * result.window_s):
        return f"no request succeeded after {since:.2f} s of the {result.window_s:.2f} s window"
    return None


def disagreement(row: dict) -> str | None:
    """What the server counted that the generators did not see the same way (None: the counts agree or
    the server's could not be read)."""
    server, sent = row.get("server_level_status"), row["level_status"]
    if server is None or server == sent:
        return None
    return f"the server counted {_counts(server)}; the generators saw {_counts(sent)}"


def _counts(counts: dict) -> str:
    return " ".join(f"{status}={n}" for status, n in counts.items()) or "nothing"


def add_ratios(rows: list[dict], floor_rows: list[dict], ceilings: dict[str, list[CeilingPoint]]) -> None:
    """Served throughput as a fraction of the echo floor (same level) and the ORT ceiling (same model)."""
    floor = {_level_key(r): r["req_per_s"] for r in floor_rows}
    for row in rows:
        if (echo := floor.get(_level_key(row))) is not None:
            row["floor_req_per_s"] = echo
            row["of_floor"] = row["req_per_s"] / echo if echo else None
        if points := ceilings.get(row["model"]):
            peak = max(p.images_per_s for p in points)
            same = next((p.images_per_s for p in points if p.batch_size == row["images_per_request"]), None)
            row["ceiling_images_per_s"] = peak
            row["of_ceiling"] = row["images_per_s"] / peak
            if same:
                row["of_ceiling_same_batch"] = row["images_per_s"] / same


def _level_key(row: dict) -> tuple:
    shape = (row.get("protocol", "grpc"), row["api"], row["stream"], row.get("http_tensors"))
    return (*shape, row["images_per_request"], row["concurrency"], row["rate"])


def machine() -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(),
        "load_avg": os.getloadavg(),
        "cpu": cpu,
        "python": platform.python_version(),
        "os": platform.platform(),
    }


def _fmt(value, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.{digits}f}"
    return str(value)


def _percent(fraction: float | None) -> str:
    """A ratio as a percentage with three significant digits: 0.0031 is 0.31 %, not 0.00."""
    if fraction is None or math.isnan(fraction):
        return "-"
    return f"{100 * fraction:.3g} %"


TABLE = [
    ("config", "config"),
    ("level", None),
    ("req/s", "req_per_s"),
    ("img/s", "images_per_s"),
    ("mean±std ms", None),
    ("p50", "p50"),
    ("p90", "p90"),
    ("p99", "p99"),
    ("p99.9", "p99_9"),
    ("max", "max_ms"),
    ("requests", "requests"),
    ("attempts", "attempts"),
    ("failures", None),
    ("acc", "accuracy"),
    ("queue ms", "server_queue_ms"),
    ("compute ms", "server_compute_ms"),
    ("batch", "server_batch_size"),
    ("srv cpu µs/req", "server_cpu_us_per_request"),
    ("gen cpu µs/req", "client_cpu_us_per_request"),
    ("of floor", "of_floor"),
    ("of ceiling", "of_ceiling"),
]


def _cells(row: dict) -> list[str]:
    cells = []
    for title, key in TABLE:
        if title == "level":
            cells.append(level_name(row))
        elif title == "mean±std ms":
            cells.append(f"{_fmt(row['mean_ms'])}±{_fmt(row['std_ms'])}")
        elif title == "failures":
            cells.append(_failures(row))
        elif title == "acc":
            cells.append(_fmt(row.get(key), 4))
        elif key in ("of_floor", "of_ceiling"):
            cells.append(_percent(row.get(key)))
        else:
            cells.append(_fmt(row.get(key)))
    return cells


def _failures(row: dict) -> str:
    """Failed attempts by status; with retries, how many requests failed in the end; late sends."""
    text = " ".join(f"{s}={n}" for s, n in row["attempt_status"].items() if s != "OK") or "0"
    if row["attempts"] != row["requests"]:
        text += f" ({row['errors']} req. failed)"
    if row.get("late"):
        text += f" late={row['late']}"
    return text


def notes(rows: Iterable[dict]) -> list[str]:
    """Below the table: every failed level, and every level whose server counted otherwise."""
    lines = []
    for row in rows:
        where = f"{row['config']} {level_name(row)}"
        if row["failed"]:
            lines.append(f"FAILED {where}: {row['failed']}")
        if text := disagreement(row):
            lines.append(f"{where}: {text}")
    return lines


def progress_line(row: dict) -> str:
    """One level in a line, said as it finishes (the table comes at the end, once every level is known)."""
    line = (
        f"[{row['config']}] {level_name(row)}: {_fmt(row['req_per_s'])} req/s, {_fmt(row['images_per_s'])} "
        f"img/s, p50 {_fmt(row['p50'])} ms, p99 {_fmt(row['p99'])} ms, {row['requests']} requests, "
        f"{row['attempts']} attempts, failures: {_failures(row)}"
    )
    return line + (f"; FAILED: {row['failed']}" if row["failed"] else "")


def table(rows: Iterable[dict]) -> str:
    """Fixed-width text for the terminal."""
    return _fixed_width([[title for title, _ in TABLE], *(_cells(row) for row in rows)])


def markdown(rows: Iterable[dict]) -> str:
    """The same table in Markdown, for the README / benchmarks pages."""
    lines = ["| " + " | ".join(title for title, _ in TABLE) + " |", "|" + "---|" * len(TABLE)]
    lines += ["| " + " | ".join(_cells(row)) + " |" for row in rows]
    return "\n".join(lines)


SUMMARY_FIGURES = ("images_per_s", "p50", "p99", "server_cpu_us_per_request")


def repeat_summary(rows: list[dict]) -> list[dict]:
    """Mean and standard deviation over the repeats of each configuration at each level, and each
    configuration's throughput relative to the first configuration at the same level (`vs_first`).
    Failed repeats are counted, not averaged: `repeats` is the number of runs that measured something."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["config"], _level_key(row)), []).append(row)
    summary = []
    for (config, _), group in groups.items():
        valid = [r for r in group if r["failed"] is None]
        entry = {"config": config, "level": level_name(group[0]), "repeats": len(valid)}
        entry["served"] = group[0]["model"] != "echo"
        for key in SUMMARY_FIGURES:
            values = [r[key] for r in valid if r.get(key) is not None]
            entry[key] = (float(np.mean(values)), float(np.std(values))) if values else None
        entry["load_avg_1m"] = max(r["load_avg_1m"] for r in group)
        entry["errors"] = sum(r["errors"] for r in group)
        entry["failed"] = sum(r["failed"] is not None for r in group)
        summary.append(entry)
    first = summary[0]["config"] if summary else None
    base = {s["level"]: s["images_per_s"] for s in summary if s["config"] == first and s["images_per_s"]}
    for s in summary:
        reference = base.get(s["level"])
        # A configuration that served nothing at a level has no throughput to compare with.
        known = reference and reference[0] > 0 and s["images_per_s"] and s["served"]  # echo: no model
        s["vs_first"] = s["images_per_s"][0] / reference[0] if known else None
    return summary


SUMMARY_HEAD = (
    "config",
    "level",
    "n",
    "img/s",
    "p50 ms",
    "p99 ms",
    "srv cpu µs/req",
    "errors",
    "failed",
    "load",
    "of first",
)


def _summary_cells(s: dict) -> tuple[str, ...]:
    def spread(pair) -> str:  # one run has no spread to show
        if pair is None:
            return "-"
        return f"{_fmt(pair[0])} ± {_fmt(pair[1])}" if s["repeats"] > 1 else _fmt(pair[0])

    return (
        s["config"], s["level"], str(s["repeats"]), spread(s["images_per_s"]), spread(s["p50"]),
        spread(s["p99"]), spread(s["server_cpu_us_per_request"]), str(s["errors"]), str(s["failed"]),
        f"{s['load_avg_1m']:.2f}", _percent(s["vs_first"]),
    )  # fmt: skip


def summary_table(summary: list[dict]) -> str:
    """Fixed-width text: mean ± std over the repeats."""
    return _fixed_width([SUMMARY_HEAD, *(_summary_cells(s) for s in summary)])


def _fixed_width(lines: list) -> str:
    """Rows of cells as aligned text: the first two columns left-aligned, the figures right-aligned."""
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    text = [
        "  ".join(
            c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths, strict=True))
        )
        for line in lines
    ]
    return "\n".join([text[0], "-" * len(text[0]), *text[1:]])


def summary_markdown(summary: list[dict]) -> str:
    lines = ["| " + " | ".join(SUMMARY_HEAD) + " |", "|" + "---|" * len(SUMMARY_HEAD)]
    lines += ["| " + " | ".join(_summary_cells(s)) + " |" for s in summary]
    return "\n".join(lines)


def level_name(row: dict) -> str:
    return f"c={row['concurrency']}" if row["concurrency"] else f"{row['rate']:g}/s"


def ceiling_table(ceilings: dict[str, list[CeilingPoint]]) -> str:
    lines = ["ORT ceiling (in-process, no gRPC):  model  batch  images/s (callers)  p50 ms  p99 ms"]
    for model, points in ceilings.items():
        for p in points:
            rate = f"{p.images_per_s:12,.0f} ({p.callers})"
            lines.append(f"  {model:>10}  {p.batch_size:5d}  {rate}  {p.p50_ms:.3f}  {p.p99_ms:.3f}")
    return "\n".join(lines)


def write_json(path: Path, report: dict) -> None:
    path.write_text(json.dumps(report, indent=2, default=_jsonable) + "\n")


def _jsonable(value):
    if isinstance(value, CeilingPoint):
        return asdict(value)
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def write_csv(path: Path, rows: list[dict]) -> None:
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: json.dumps(v) if isinstance(v, dict) else v for k, v in row.items()})


def plot(path: Path, rows: list[dict], floor_rows: list[dict], title: str) -> bool:
    """Latency percentiles (log ms) against served images/s: one colour per configuration, one line style
    per percentile; the echo floor in grey. False, and nothing written, without matplotlib (the bench
    extra brings it)."""
    try:
        import matplotlib
    except ImportError:
        return False

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    styles = {"p50": "-", "p99": "--", "p99_9": ":"}
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    greys = ["0.45", "0.65", "0.8"]
    series = [(c, colours[i % len(colours)]) for i, c in enumerate(dict.fromkeys(r["config"] for r in rows))]
    series += [
        (c, greys[i % len(greys)]) for i, c in enumerate(dict.fromkeys(r["config"] for r in floor_rows))
    ]
    for name, colour in series:
        # In the order of the sweep (rising load), so an overloaded server shows as a line turning back.
        points = [r for r in rows + floor_rows if r["config"] == name and r["ok"] and not r["failed"]]
        x = [r["images_per_s"] for r in points]
        for pct, style in styles.items():
            label = f"{name} {pct.replace('_', '.')}"
            ax.plot(x, [r[pct] for r in points], style, marker="o", markersize=3, color=colour, label=label)
        for r in points:
            level = f"c={r['concurrency']}" if r["concurrency"] else f"{r['rate']:g}/s"
            ax.annotate(level, (r["images_per_s"], r["p50"]), fontsize=6, color=colour, xytext=(3, -8),
                        textcoords="offset points")  # fmt: skip
    ax.set_xlabel("served images/s")
    ax.set_ylabel("latency (ms, log scale)")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title(title, fontsize=10)
    if ax.lines:  # a run where every level failed has nothing to plot
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
