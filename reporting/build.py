"""The whole page from runs: labels, the header, the six sections; and the one call the compliance stage makes."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping, Sequence

from artifacts import Artifact

from .data import RunData, load_run
from .page import CSS, SECTIONS, esc, render_section, table
from .sections import (averaging_section, compliance_section, eval_section, quantization_section, seeds_section,
                       training_section)

log = logging.getLogger("golf.report")
FILE = "report.html"  # the page's name in a compliance artifact


def run_labels(heads: Sequence[str], seeds: Sequence[int | None]) -> list[str]:
    """"seed N" when every run has its own seed (the usual several-seeds page); else the head artifact's key,
    cut to the shortest prefix that still tells the runs apart."""
    if len(seeds) > 1 and None not in seeds and len(set(seeds)) == len(seeds):
        return [f"seed {s}" for s in seeds]
    if len(seeds) == 1 and seeds[0] is not None:
        return [f"seed {seeds[0]}"]
    for n in range(8, 21, 4):  # hex digits after the stage's name
        cut = [h[:h.find("-") + 1 + n] for h in heads]
        if len(set(cut)) == len(cut):
            return cut
    return list(heads)


def _summary(runs: Sequence[RunData]) -> str:
    """The header's table: each run's artifacts (tokenize left out: shared by all), val_bpb, bytes, verdict."""
    rows = []
    for r in runs:
        ev = (r.eval or {}).get("result", {})
        size = (r.quantize or {}).get("size") or {}
        rows.append([r.label, " ".join(k for k in r.keys.values() if not k.startswith("tokenize")),
                     ev.get("val_bpb"), size.get("artifact_bytes"), (r.compliance or {}).get("verdict", "–")])
    return table(["run", "artifacts", "val_bpb", "artifact bytes", "compliance"], rows, ["", "", "num", "num", ""])


def render_page(runs: Sequence[RunData], comparison: dict | None = None, title: str = "") -> str:
    """The HTML page of ``runs`` (overlaid in every plot); ``comparison`` is the seeds' Welch test, if any."""
    if not runs:
        raise ValueError("a report needs at least one run")
    sections = [training_section(runs), averaging_section(runs), quantization_section(runs), eval_section(runs),
                compliance_section(runs), seeds_section(runs, comparison)]
    assert tuple(s.id for s in sections) == SECTIONS
    title = title or f"golf report: {', '.join(r.label for r in runs)}"
    nav = "".join(f'<a href="#{s.id}">{esc(s.title)}</a>' for s in sections)
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{esc(title)}</title><style>{CSS}</style></head><body><main>"
            # no clock in the page: the compliance stage's copy is part of its artifact, and the same inputs must
            # give the same bytes (a forced rebuild that changes nothing keeps the artifact's content digest)
            f"<header><h1>{esc(title)}</h1><p>{len(runs)} run{'s' if len(runs) > 1 else ''}, read from their "
            f"artifacts (nothing recomputed).</p>{_summary(runs)}<nav>{nav}</nav></header>"
            + "".join(render_section(s) for s in sections) + "</main></body></html>\n")


def write_stage_report(inputs: Mapping[str, Artifact], report: dict, key: str, out: Path) -> Path | None:
    """The compliance stage's page of its own run (inputs by stage name, its report dict, its key) at ``out``,
    the same bytes as `golf report KEY` gives once it is committed; None when matplotlib is missing (a bare GPU
    image: the numbers are in the JSON files all the same)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        log.warning("matplotlib is not installed: no %s", FILE)
        return None
    seed = inputs["train"].config.get("seed") if "train" in inputs else None
    label = run_labels([key], [seed])[0]
    run = load_run(inputs, label, compliance_report=report, compliance_key=key)
    out.write_text(render_page([run]), encoding="utf-8")
    return out


__all__ = ["FILE", "load_run", "render_page", "run_labels", "write_stage_report"]
