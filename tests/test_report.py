"""golf report: the page built from a tiny pipeline's artifacts is valid HTML with every section, every image
inline as PNG and no URL outside it; three seeds overlay; it runs in under 10 s; bad keys are one line, exit 2."""

from __future__ import annotations

import base64
import html
import json
import math
import re
import shutil
import subprocess
import sys
import time
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from conftest import FAST

ROOT = Path(__file__).resolve().parent.parent
SECTIONS = ("training", "averaging", "quantization", "eval", "compliance", "seeds")
VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


class PageParser(HTMLParser):
    """Collects what the checks need and fails on an end tag that does not close the innermost open element."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack, self.errors, self.ids, self.imgs, self.urls, self.doctype = [], [], [], [], [], None

    def handle_decl(self, decl):
        self.doctype = decl

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.ids.append(a["id"])
        if tag == "img":
            self.imgs.append(a.get("src", ""))
        for name in ("src", "href"):
            if a.get(name):
                self.urls.append(a[name])
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.handle_starttag(tag, attrs)
        if tag not in VOID:
            self.stack.pop()

    def handle_endtag(self, tag):
        if tag in VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1] if self.stack else 'nothing'}")
            return
        self.stack.pop()


def check_page(page: str) -> PageParser:
    """The page's checks shared by the tests: valid, balanced HTML; the six sections; inline PNGs only."""
    p = PageParser()
    p.feed(page)
    p.close()
    assert p.doctype and p.doctype.lower() == "doctype html"
    assert not p.errors, p.errors[:5]
    assert not p.stack, f"unclosed: {p.stack}"
    for s in SECTIONS:
        assert p.ids.count(s) == 1, f"section {s!r} present {p.ids.count(s)} times"
    assert p.imgs, "no images"
    for src in p.imgs:
        assert src.startswith("data:image/png;base64,"), src[:60]
        png = base64.b64decode(src.split(",", 1)[1], validate=True)
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and png[-8:-4] == b"IEND", "not a whole PNG"
    external = [u for u in p.urls if not u.startswith(("data:", "#"))]
    assert not external, external
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page, re.I)
    assert "url(" not in page.lower(), "a CSS url() would fetch"
    return p


def section_html(page: str, sid: str) -> str:
    """One section's markup, entities decoded (an apostrophe is &#x27; in the page)."""
    start = page.index(f'<section id="{sid}">')
    return html.unescape(page[start:page.index("</section>", start)])


def test_page_of_the_tiny_pipeline(pipeline_run):
    from golf.report import build_report
    store, _, results = pipeline_run
    key = results["compliance"].artifact.key
    page = build_report(store, [key[:20]])  # a prefix, as other commands take
    p = check_page(page)
    # training, averaging, bytes, per-tensor error, eval, BPB by length, seeds: no TTT and no cap fit here
    assert len(p.imgs) == 7
    assert "no cap fit in these runs" in section_html(page, "quantization")
    assert "no test-time training in these runs" in section_html(page, "eval")
    comp = section_html(page, "compliance")
    for check in results["compliance"].artifact.metrics:
        if check.endswith("_status"):
            assert f"<td>{check[:-len('_status')]}</td>" in comp
    ev = results["eval"].artifact.metrics
    assert f"{ev['val_bpb']:,.4f}" in section_html(page, "eval")


def test_the_compliance_artifact_holds_its_page(pipeline_run):
    from golf.report import build_report
    store, _, results = pipeline_run
    art = results["compliance"].artifact
    assert "report.html" in art.manifest["files"]  # hashed like every other file of the artifact
    page = art.file("report.html").read_text()
    check_page(page)
    assert "seed 1337" in page and art.metrics["verdict"] in section_html(page, "compliance")
    # the same artifacts give the same bytes (no clock in the page): the stage's copy is what golf report draws
    assert build_report(store, [art.key]) == page


def test_doc_length_buckets_add_up_to_val_bpb(pipeline_run):
    """The buckets split the scored targets: their byte-weighted BPB is eval's val_bpb, their targets its count."""
    from reporting.data import doc_buckets
    _, _, results = pipeline_run
    ev = results["eval"].artifact
    buckets = doc_buckets(results["tokenize"].artifact, ev)
    assert len(buckets) >= 2
    assert sum(b["targets"] for b in buckets) == ev.metrics["val_tokens"]
    assert sum(b["bytes"] for b in buckets) == ev.metrics["val_bytes"]
    bpb = sum(b["bpb"] * b["bytes"] for b in buckets) / sum(b["bytes"] for b in buckets)
    assert bpb == pytest.approx(ev.metrics["val_bpb"], rel=1e-9)


def test_ttt_curve_from_per_token_nlls(tmp_path):
    """With the no-TTT run's per-token NLLs beside the TTT run's, the curve ends at the whole stream's gain."""
    from artifacts import Artifact
    from reporting.data import ttt_curve
    rng = np.random.default_rng(0)
    nll, plain, tok_bytes = rng.uniform(1, 5, 1000), rng.uniform(1, 5, 1000), rng.integers(1, 6, 1001)
    for name, arr in (("token_nll.npy", nll), ("token_nll_no_ttt.npy", plain), ("val_token_bytes.npy", tok_bytes)):
        np.save(tmp_path / name, arr)
    files = {n: {} for n in ("token_nll.npy", "token_nll_no_ttt.npy", "val_token_bytes.npy")}
    art = Artifact(tmp_path, {"key": "eval-0", "stage": "eval", "files": files})
    curve = ttt_curve(art, art, points=50)
    whole = (plain.sum() - nll.sum()) / math.log(2) / tok_bytes[1:].sum()
    assert curve["final_gain_bpb"] == pytest.approx(whole) and curve["gain_bpb"][-1] == pytest.approx(whole)
    assert curve["targets"][-1] == 1000 and len(curve["targets"]) == 50


def test_ttt_curve_from_a_real_eval_with_ttt(pipeline_run):
    """An eval with TTT keeps the no-TTT score's running sum: the report's curve ends at eval.json's TTT gain."""
    from artifacts import run_stage
    from golf.config import apply_overrides
    from golf.report import build_report
    from reporting.data import ttt_curve
    from stages import evaluate
    store, cfg, results = pipeline_run
    cfg = apply_overrides(cfg, ["eval.ttt.method=sgd", "eval.ttt.chunk_tokens=2048", "eval.ttt.epochs=1",
                                "eval.ttt.batch_seqs=4", "eval.stride=128", "eval.max_tokens=6144"])
    ev = run_stage(evaluate.STAGE, cfg.eval, {r: results[r].artifact for r in evaluate.STAGE.inputs}, store).artifact
    rows = np.load(ev.file("nll_no_ttt_cumsum.npy"))
    assert rows.shape[1] == 2 and rows[-1, 0] == ev.metrics["val_tokens"]
    curve = ttt_curve(results["tokenize"].artifact, ev)
    assert curve["final_gain_bpb"] == pytest.approx(-ev.metrics["ttt_gain_bpb"], rel=1e-9, abs=1e-12)
    page = build_report(store, [ev.key])
    check_page(page)
    assert "data:image/png;base64," in section_html(page, "eval").split("TTT gain over the val stream")[1]


def test_a_train_key_gives_every_section_saying_what_is_missing(pipeline_run):
    from golf.report import build_report
    store, _, results = pipeline_run
    page = build_report(store, [results["train"].artifact.key])
    check_page(page)
    assert "no quantize artifact in these runs' lineage" in section_html(page, "quantization")
    assert "no eval artifact in these runs' lineage" in section_html(page, "eval")
    assert "no compliance artifact" in section_html(page, "compliance")


def test_bad_keys_are_one_line_and_exit_2(pipeline_run, tmp_path, capsys):
    from golf.cli import main
    store, _, results = pipeline_run
    out = tmp_path / "r.html"
    for key, says in (("train-0000000000000000dead", "no artifact 'train-0000000000000000dead'"),
                      (results["quantize"].artifact.key,
                       "is a quantize artifact; give a compliance, eval or train key"),
                      ("../objects", "is not an artifact key")):
        assert main(["--store", str(store.root), "report", key, "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("golf: error: ") and says in err and "\n" not in err, err
    assert not out.exists()


def test_report_runs_in_under_10_s(pipeline_run, tmp_path):
    """The whole command, interpreter and imports included, as a user runs it."""
    store, _, results = pipeline_run
    out = tmp_path / "page.html"
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "golf.cli", "--store", str(store.root), "report",
                           results["compliance"].artifact.key, "--out", str(out)], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    seconds = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr
    assert seconds < 10, f"golf report took {seconds:.1f} s"
    assert proc.stdout.startswith(f"wrote {out} (")
    check_page(out.read_text())


@pytest.fixture(scope="module")
def three_seeds(tmp_path_factory):
    """Three seeds of the tiny preset, cut shorter than FAST (4 steps)."""
    from artifacts import ArtifactStore
    from golf.config import apply_overrides, preset
    from golf.pipeline import run_pipeline
    store = ArtifactStore(tmp_path_factory.mktemp("seeds") / "store")
    keys = []
    for seed in (1, 2, 3):
        cfg = apply_overrides(preset("tiny"), FAST + ["train.max_steps=4", "eval.max_tokens=4096",
                                                      f"train.seed={seed}"])
        keys.append(run_pipeline(cfg, store)[-1].artifact.key)
    return store, keys


def test_three_seeds_overlay_their_curves_and_fill_the_seed_table(three_seeds, monkeypatch):
    import statistics

    import reporting.figures as F
    from golf.report import build_report
    store, keys = three_seeds
    drawn = {}
    real_png = F._png

    def keep(fig):  # the training figure's axes, to see what was drawn on them
        drawn.setdefault("figs", []).append(fig)
        return real_png(fig)
    monkeypatch.setattr(F, "_png", keep)
    page = build_report(store, keys, against=keys[:2])
    check_page(page)
    train_fig = drawn["figs"][0]
    loss_lines = [ln for ln in train_fig.axes[0].get_lines() if ln.get_label().startswith("seed")]
    assert [ln.get_label() for ln in loss_lines] == ["seed 1", "seed 2", "seed 3"]
    for ln, key in zip(loss_lines, keys):
        train_key = store.get(store.get(store.get(key).manifest["inputs"]["average"]).manifest["inputs"]["train"]).key
        lines = store.get(train_key).file("metrics.jsonl").read_text().splitlines()
        losses = [json.loads(line)["loss"] for line in lines]
        assert list(ln.get_ydata()) == losses
    seeds = section_html(page, "seeds")
    bpb = [store.get(store.get(k).manifest["inputs"]["eval"]).metrics["val_bpb"] for k in keys]
    for label, v in zip(("seed 1", "seed 2", "seed 3"), bpb):
        assert re.search(rf"<td>{label}</td><td>{label[5:]}</td>.*?<td class=\"num\">{v:,.4f}</td>", seeds)
    assert f"{statistics.fmean(bpb):,.4f}" in seeds and f"{statistics.stdev(bpb):,.4f}" in seeds
    assert "Welch test against the baseline" in seeds and "Welch         one-sided on val_loss: t = " in seeds


def test_the_prefect_task_links_the_page(pipeline_run, monkeypatch):
    """The compliance task's link artifact points at the artifact's report.html (a file:// URI, the path as text)."""
    import flows.pipeline as fp
    _, _, results = pipeline_run
    calls = []
    monkeypatch.setattr(fp, "create_link_artifact", lambda **kw: calls.append(kw))
    art = results["compliance"].artifact
    fp.link_run_report(art)
    page = art.file("report.html").resolve()
    assert calls == [{"key": "golf-run-report", "link": page.as_uri(), "link_text": str(page),
                      "description": calls[0]["description"]}]
    assert art.key in calls[0]["description"]
    fp.link_run_report(results["eval"].artifact)  # an artifact without a page: no link
    assert len(calls) == 1


@pytest.mark.skipif(not shutil.which("chromium"), reason="no chromium (Debian: apt-get install chromium)")
def test_chromium_draws_every_section_at_laptop_width(pipeline_run, tmp_path):
    """A real browser at 1280 px: the six sections are six white boxes down the page, each with something drawn
    in it (its plot or table), and none wider than the window (no sideways scrolling of the page)."""
    from PIL import Image

    from golf.report import build_report
    store, _, results = pipeline_run
    page = tmp_path / "page.html"
    page.write_text(build_report(store, [results["compliance"].artifact.key]))
    shot = tmp_path / "shot.png"
    subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--screenshot={shot}", "--window-size=1280,6000", page.as_uri()], capture_output=True,
                   timeout=120, check=True)
    px = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert px.shape[1] == 1280
    white = (px[:, 40] == 255).all(axis=1)  # a column inside the sections' left edge: white in a section
    edges = np.flatnonzero(np.diff(np.concatenate([[0], white.astype(int), [0]])))
    boxes = [(a, b) for a, b in zip(edges[::2], edges[1::2]) if b - a > 80]
    assert len(boxes) == len(SECTIONS), boxes
    for a, b in boxes:
        box = px[a:b, 40:1240]
        drawn = (box != 255).any(axis=2).mean()
        assert drawn > 0.01, f"section box {a}-{b} is empty"  # text, tables, plots
    # nothing past the sections' right edge: the page fits the window, grey (#fafafa) down to the last section
    assert (px[:boxes[-1][1], 1252:] == 250).all(), "something sticks out past the page's width"
