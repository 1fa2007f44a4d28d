"""The report page: six sections (training, averaging, quantization, eval, compliance, seeds), each a plot with
its numbers beside it, in one HTML file with the images inline (data: URIs) and no URL outside it, so it can be
mailed, attached to a Prefect run or opened from the store on a machine without network."""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from typing import Callable, Sequence

from .data import RunData

SECTIONS = ("training", "averaging", "quantization", "eval", "compliance", "seeds")

CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #222; margin: 0; background: #fafafa; }
main { max-width: 1220px; margin: 0 auto; padding: 12px 20px 40px; }
header h1 { margin: 8px 0 2px; font-size: 22px; }
nav a { margin-right: 14px; color: #245; }
section { background: #fff; border: 1px solid #ddd; border-radius: 6px; margin: 18px 0; padding: 10px 16px 14px; }
h2 { font-size: 18px; margin: 4px 0 8px; }
h3 { font-size: 14px; margin: 12px 0 4px; color: #444; }
.row { display: flex; flex-wrap: wrap; gap: 18px; align-items: flex-start; margin: 8px 0; }
figure { flex: 1 1 700px; max-width: 780px; margin: 0; }
figure img { max-width: 100%; height: auto; display: block; }
.wide { flex: 1 1 100%; overflow-x: auto; }
td:first-child { white-space: nowrap; }
.numbers { flex: 1 1 340px; min-width: min-content; overflow-x: auto; }
table { border-collapse: collapse; font-size: 12.5px; font-variant-numeric: tabular-nums; }
th, td { border-bottom: 1px solid #e4e4e4; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f2f2f2; font-weight: 600; }
td.num { text-align: right; white-space: nowrap; }
td.evidence { font-size: 12px; color: #333; min-width: 420px; }
.PASS { color: #11692b; font-weight: 600; } .FAIL { color: #b00020; font-weight: 600; } .SKIP { color: #8a6d00; }
.missing { color: #777; font-style: italic; margin: 6px 0; }
pre { background: #f4f4f4; padding: 8px; overflow-x: auto; font-size: 12px; }
code { font-size: 12.5px; }
"""


@dataclass
class Block:
    """One plot and the numbers beside it; either may be absent (then ``missing`` says why)."""
    png: bytes | None = None
    alt: str = ""
    numbers: str = ""          # HTML: a table, usually
    missing: str = ""          # shown when there is no plot: what is absent and why
    title: str = ""


@dataclass
class Section:
    id: str
    title: str
    blocks: list[Block] = field(default_factory=list)
    intro: str = ""


def esc(x) -> str:
    return html.escape(str(x), quote=True)


def fmt(v, digits: int = 4) -> str:
    """Numbers as a reader compares them: integers with thousands separators, floats to ``digits`` decimals."""
    if v is None or v == "":
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:,.{digits}f}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"
    return str(v)


def table(header: Sequence[str], rows: Sequence[Sequence], classes: Sequence[str] = ()) -> str:
    """An HTML table; cells are escaped unless given as ("html", markup)."""
    def cell(v, j):
        cls = classes[j] if j < len(classes) else ""
        if isinstance(v, tuple) and v and v[0] == "html":
            body = v[1]
        else:
            body = esc(fmt(v))
            cls = cls or ("num" if isinstance(v, (int, float)) and not isinstance(v, bool) else "")
        return f'<td class="{cls}">{body}</td>' if cls else f"<td>{body}</td>"
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(cell(v, j) for j, v in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def run_table(runs: Sequence[RunData], rows: Sequence[tuple[str, Callable[[RunData], object]]]) -> str:
    """One row per quantity, one column per run; a quantity a run lacks is a dash."""
    def value(fn, run):
        try:
            return fn(run)
        except (KeyError, TypeError, IndexError, AttributeError):  # that run's artifacts lack the field
            return None
    return table(["", *[r.label for r in runs]], [[name, *[value(fn, r) for r in runs]] for name, fn in rows])


def img(png: bytes, alt: str) -> str:
    return f'<img src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}" alt="{esc(alt)}">'


def render_block(b: Block) -> str:
    fig = f"<figure>{img(b.png, b.alt)}</figure>" if b.png else ""
    miss = f'<p class="missing">{esc(b.missing)}</p>' if b.missing else ""
    title = f"<h3>{esc(b.title)}</h3>" if b.title else ""
    left = fig or (f"<figure>{miss}</figure>" if b.numbers and miss else miss)
    # a table with no plot beside it (the compliance checks) takes the width: its evidence is long text
    wide = "numbers" if left else "wide"
    numbers = f'<div class="{wide}">{b.numbers}</div>' if b.numbers else ""
    return f'{title}<div class="row">{left}{numbers}</div>' + (miss if fig and miss else "")


def render_section(s: Section) -> str:
    intro = f"<p>{s.intro}</p>" if s.intro else ""
    return f'<section id="{s.id}"><h2>{esc(s.title)}</h2>{intro}{"".join(render_block(b) for b in s.blocks)}</section>'
