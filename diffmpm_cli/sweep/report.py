"""What a sweep reports: one record per trial, sorted by the metric; sweep.jsonl, sweep.csv and sweep.png (the
metric against each varied key) in the sweep's folder; the best trial.

A record: ``{"rank", "trial", "status", "metric", "value", "params", "error", "iterations", "retries", "session",
"wall_s", "run_dir", "metrics"}``; status is one of STATUSES, session says what this invocation did with the trial
(ran, resumed, skipped: finished earlier, refused: its parameters were refused, not run).
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

from PIL import Image, ImageDraw

from ..outputs.files import atomic_write, json_line, write_text
from ..outputs.pictures import _font, _number, _text_size, _ticks
from .trials import SCENE_KEY, Trial, finite_or_none, value_label

STATUSES = {
    "finished": "the run went to its last iteration",
    "stopped": "early stopping (ASHA) stopped it; its metrics are of the last iteration it ran",
    "failed": "the run refused its parameters or failed (NaN, unstable): rerunning it would fail the same way",
    "error": "its worker died or raised more often than the sweep retries",
    "unfinished": "not run to its end (the sweep was interrupted): a rerun resumes it from its checkpoint",
}
ORDER = {"finished": 0, "stopped": 1, "failed": 2, "error": 3, "unfinished": 4}


def sort_records(records: list[dict], *, mode: str) -> list[dict]:
    """Finished trials by their value (best first), then stopped ones by value, then the rest; ranks set."""
    sign = 1.0 if mode == "min" else -1.0

    def key(record: dict):
        value = finite_or_none(record.get("value"))
        return (ORDER.get(record["status"], 9), value is None, sign * value if value is not None else 0.0,
                record["trial"])

    ordered = sorted(records, key=key)
    for rank, record in enumerate(ordered, 1):
        record["rank"] = rank
    return ordered


def best_record(records: list[dict]) -> dict | None:
    """The first finished record with a finite value (records sorted), or None."""
    return next((r for r in records if r["status"] == "finished" and finite_or_none(r.get("value")) is not None),
                None)


def make_record(trial: Trial, *, metric: str, status: str, metrics: dict, error: str | None = None,
                iterations: int | None = None, retries: int = 0, session: str = "ran",
                wall_s: float | None = None) -> dict:
    return {"rank": None, "trial": trial.name, "status": status, "metric": metric, "value": metrics.get(metric),
            "params": dict(trial.params), "error": error, "iterations": iterations, "retries": retries,
            "session": session, "wall_s": wall_s, "run_dir": str(trial.run_dir), "metrics": metrics}


def write_jsonl(path: Path, records: list[dict]) -> Path:
    return write_text(path, "".join(json_line(r) for r in records))


def read_jsonl(path: Path) -> list[dict]:
    """The records of an earlier session's sweep.jsonl (lines that are not records are passed over)."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return []
    records = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("trial"), str):
            records.append(record)
    return records


def write_csv(path: Path, records: list[dict], *, keys: list[str]) -> Path:
    """One row per trial: rank, trial, status, the varied keys, the metric's value, every final metric, error."""
    metric_keys = sorted({k for r in records for k in r["metrics"]})
    header = ["rank", "trial", "status", *keys, "metric", "value", "iterations", "retries", "wall_s", *metric_keys,
              "error", "run_dir"]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for r in records:
        writer.writerow([r["rank"], r["trial"], r["status"],
                         *(_csv_value(r["params"].get(k)) for k in keys), r["metric"], _csv_value(r["value"]),
                         r["iterations"], r["retries"], _csv_value(r["wall_s"]),
                         *(_csv_value(r["metrics"].get(k)) for k in metric_keys), r["error"] or "", r["run_dir"]])
    return write_text(path, buffer.getvalue())


def _csv_value(value):
    if value is None:
        return ""
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return value


PANEL = (360, 300)
POINT = {"finished": (31, 119, 180), "stopped": (160, 160, 160)}


def plot_metric(path: Path, records: list[dict], *, keys: list[str], metric: str, log_keys: set[str]) -> Path:
    """sweep.png: one panel per varied key, the metric of every finished (blue) and stopped (grey) trial against
    the key's value; numbers on a linear axis (log10 for loguniform keys and positive values spanning a factor 30 or
    more), anything else as categories; the best trial ringed in red."""
    keys = keys or [SCENE_KEY]
    width, height = PANEL
    picture = Image.new("RGB", (width * len(keys), height), (255, 255, 255))
    draw = ImageDraw.Draw(picture)
    font = _font()
    shown = [r for r in records if r["status"] in POINT and finite_or_none(r.get("value")) is not None]
    best = best_record(records)
    values = [float(r["value"]) for r in shown]
    y_low, y_high = (min(values), max(values)) if values else (0.0, 1.0)
    if y_high - y_low < 1e-12:
        y_low, y_high = y_low - 0.5 * (abs(y_low) or 1), y_high + 0.5 * (abs(y_high) or 1)
    pad = 0.08 * (y_high - y_low)
    y_low, y_high = y_low - pad, y_high + pad
    for panel, key in enumerate(keys):
        x0 = panel * width
        left, right, top, bottom = x0 + 70, x0 + width - 14, 24, height - 40
        draw.rectangle((left, top, right, bottom), outline=(0, 0, 0))
        draw.text((left, 6), f"{metric} vs {key}", fill=(0, 0, 0), font=font)
        raw = [r["params"].get(key) for r in shown]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in raw) and raw
        # log10 for loguniform keys and for positive values spread over more than a decade and a half (a grid
        # such as 0.002, 0.02, 0.2)
        positive = numeric and all(v > 0 for v in raw)
        logx = positive and (key in log_keys or max(raw) / min(raw) >= 30)
        if numeric:
            xs = [math.log10(v) if logx else float(v) for v in raw]
            labels = None
        else:
            labels = sorted({value_label(v) for v in raw})
            xs = [labels.index(value_label(v)) for v in raw]
        x_low, x_high = (min(xs), max(xs)) if xs else (0.0, 1.0)
        if x_high - x_low < 1e-12:
            x_low, x_high = x_low - 1, x_high + 1
        span = x_high - x_low
        x_low, x_high = x_low - 0.08 * span, x_high + 0.08 * span

        def pixel(x, y, left=left, right=right, top=top, bottom=bottom, x_low=x_low, x_high=x_high):
            return (left + (x - x_low) / (x_high - x_low) * (right - left),
                    bottom - (y - y_low) / (y_high - y_low) * (bottom - top))

        y_ticks = _ticks(y_low, y_high, 5)
        for y, label in zip(y_ticks, _distinct_labels(y_ticks)):
            _, py = pixel(x_low, y)
            draw.line((left - 4, py, left, py), fill=(0, 0, 0))
            tw, th = _text_size(draw, label, font)
            draw.text((left - 6 - tw, py - th / 2 - 1), label, fill=(0, 0, 0), font=font)
        ticks = (list(range(len(labels))) if labels is not None else
                 [t for t in _ticks(x_low, x_high, 5) if x_low <= t <= x_high])
        for x in ticks:
            px, _ = pixel(x, y_low)
            draw.line((px, bottom, px, bottom + 4), fill=(0, 0, 0))
            label = labels[x] if labels is not None else (f"1e{x:.3g}" if logx else _number(x))
            label = label if len(label) <= 14 else label[:13] + "~"
            tw, _ = _text_size(draw, label, font)
            draw.text((px - tw / 2, bottom + 6), label, fill=(0, 0, 0), font=font)
        caption = key + (" (log10)" if logx else "")
        tw, _ = _text_size(draw, caption, font)
        draw.text(((left + right - tw) / 2, bottom + 20), caption, fill=(0, 0, 0), font=font)
        for record, x in zip(shown, xs):
            px, py = pixel(x, float(record["value"]))
            draw.ellipse((px - 3, py - 3, px + 3, py + 3), fill=POINT[record["status"]])
            if record is best:
                draw.ellipse((px - 6, py - 6, px + 6, py + 6), outline=(214, 39, 40), width=2)
    return atomic_write(path, lambda tmp: picture.save(tmp, format="PNG"))


def _distinct_labels(values: list[float]) -> list[str]:
    """Axis labels with as few significant digits (3 at least) as keep neighbouring ticks apart."""
    for digits in range(3, 12):
        labels = [f"{v:.{digits}g}" for v in values]
        if len(set(labels)) == len(labels):
            return labels
    return labels
