"""The training sweep's grid and its choice, without Prefect: flows/train_sweep.py runs the points.

A grid is ``KEY=V1,V2,...`` per config field (``train.muon_weight_decay=0.040,0.042,0.045``); the points are
every combination, in the order given (the last key varies fastest). ``fit`` picks, among the points whose
artifact fits the cap, the one with the lowest val_bpb: PR #281's manual sweep of weight decay (0.040 was
16.3 MB, over the cap; 0.042, 15.5 MB, the best that fit) as one command.

    golf sweep-train --preset pr281 --grid train.muon_weight_decay=0.040,0.041,0.042,0.050 --fit
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Callable, Mapping, Sequence

from artifacts.configs import ConfigError, apply_overrides
from gpt.training import TrainingInterrupted

from .config import PipelineConfig

TABLE_COLUMNS = ("point", "artifact_bytes", "fits", "val_bpb", "steps", "train_key", "error")


def parse_grid(specs: Sequence[str]) -> dict[str, list[str]]:
    """``["train.a=1,2", "train.b=x"]`` -> {"train.a": ["1", "2"], "train.b": ["x"]}; a one-line error otherwise."""
    grid: dict[str, list[str]] = {}
    for spec in specs:
        key, sep, values = spec.partition("=")
        key = key.strip()
        if not sep or not key or not values.strip():
            raise ConfigError(f"--grid {spec!r}: expected KEY=V1,V2,... (e.g. train.muon_weight_decay=0.040,0.042)")
        if key in grid:
            raise ConfigError(f"--grid: {key} is given twice; list all its values in one --grid")
        grid[key] = [v.strip() for v in values.split(",")]
        if "" in grid[key]:
            raise ConfigError(f"--grid {spec!r}: an empty value (two commas, or one at an end)")
    if not grid:
        raise ConfigError("the sweep needs at least one --grid KEY=V1,V2,... (e.g. train.muon_weight_decay=0.040,0.042)")
    return grid


def grid_points(cfg: PipelineConfig, grid: Mapping[str, Sequence]) -> list[tuple[str, PipelineConfig]]:
    """(label, config) per combination. Every point's config is built (so checked) before anything trains, and
    its quantize stage reports an over-cap artifact instead of stopping: the sweep needs the bytes of every point."""
    if not grid:
        raise ConfigError("the sweep's grid is empty: give at least one field and its values")
    keys = list(grid)
    for k in keys:
        if not grid[k]:
            raise ConfigError(f"the sweep's grid gives {k} no values")
    points, labels = [], set()
    for combo in itertools.product(*(grid[k] for k in keys)):
        label = " ".join(f"{k}={v}" for k, v in zip(keys, combo))
        if label in labels:
            raise ConfigError(f"the sweep's grid repeats a point: {label}")
        labels.add(label)
        point = apply_overrides(cfg, [f"{k}={v}" for k, v in zip(keys, combo)])
        point = dataclasses.replace(point, quantize=dataclasses.replace(point.quantize, fail_over_cap=False))
        points.append((label, point))
    return points


def point_row(label: str, summaries: Sequence[dict] | None, cap_bytes: int, error: str | None = None) -> dict:
    """One table row from a point's stage summaries (flows.pipeline's): bytes, whether they fit, val_bpb."""
    by = {s["stage"]: s for s in summaries or []}
    q = by.get("quantize", {}).get("metrics", {})
    size = q.get("artifact_bytes")
    return {"point": label, "artifact_bytes": size, "fits": None if size is None else size <= cap_bytes,
            "val_bpb": by.get("eval", {}).get("metrics", {}).get("val_bpb"),
            "steps": by.get("train", {}).get("metrics", {}).get("steps"),
            "train_key": by.get("train", {}).get("key"), "eval_key": by.get("eval", {}).get("key"), "error": error}


def pick_fit(rows: Sequence[dict]) -> dict | None:
    """The fitting point with the lowest val_bpb (None if none fits); a tie goes to the earlier point."""
    fitting = [r for r in rows if r["fits"] and r["error"] is None and r["val_bpb"] is not None]
    return min(fitting, key=lambda r: r["val_bpb"]) if fitting else None


def run_sweep(points: Sequence[tuple[str, PipelineConfig]], cap_bytes: int, fit: bool,
              run_point: Callable[[str, PipelineConfig], Sequence[dict]]) -> dict:
    """Every point through ``run_point`` (label, config -> the pipeline's stage summaries), one after another; a
    point that raises is a row with its error, not the end of the sweep. Prefect's flow and ``--no-prefect`` share it."""
    rows = []
    for label, point in points:
        try:
            rows.append(point_row(label, run_point(label, point), cap_bytes))
        except TrainingInterrupted:  # a stop signal (Ctrl-C, SIGTERM): the sweep stops, the point's snapshot kept
            raise
        except Exception as e:  # diverged, out of memory, ...: the other points still run
            rows.append(point_row(label, None, cap_bytes, f"{type(e).__name__}: {e}"))
    return {"rows": rows, "chosen": pick_fit(rows) if fit else None, "cap_bytes": cap_bytes,
            "mode": "fit" if fit else "table"}


def format_sweep(rows: Sequence[dict], chosen: dict | None = None, cap_bytes: int | None = None) -> str:
    """The sweep as aligned text, the chosen point marked with '*'."""
    def num(v, fmt):
        return "-" if v is None else format(v, fmt)
    width = max([len(r["point"]) for r in rows] + [5]) + 2
    lines = [f"  {'point':<{width}}{'artifact bytes':>15}{'fits':>6}{'val_bpb':>10}{'steps':>7}  error"]
    for r in rows:
        mark = "*" if chosen is not None and r is chosen else " "
        fits = "-" if r["fits"] is None else ("yes" if r["fits"] else "no")
        lines.append(f"{mark} {r['point']:<{width}}{num(r['artifact_bytes'], ','):>15}{fits:>6}"
                     f"{num(r['val_bpb'], '.4f'):>10}{num(r['steps'], 'd'):>7}  {r['error'] or ''}")
    if cap_bytes is not None:
        lines.append(f"cap {cap_bytes:,} bytes; " + (f"fit: {chosen['point']} (val_bpb {chosen['val_bpb']:.4f}, "
                                                      f"{chosen['artifact_bytes']:,} bytes)" if chosen else
                                                      "fit: no point fits the cap"))
    return "\n".join(lines)
