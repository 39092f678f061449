"""report.html from real runs on the tiny model: structure, privacy of the text, and a real browser.

The browser half opens the pages in headless Chromium (Debian's `chromium`, driven by Playwright's Python
client) and checks that every figure decodes, the tables are there, sorting works and nothing is logged as
an error. It skips, saying why, only where Chromium or the Playwright client is not installed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest

from unmemorize.io.models import make_runtime
from unmemorize.io.sets import Sequence
from unmemorize.report import render_compare_report, render_run_report
from unmemorize.report.html import attack_cell
from unmemorize.runs.config import UnlearnSettings
from unmemorize.runs.run import unlearn

RUNTIME = make_runtime("cpu", "float32")
AUDIT = {"el_n": [4], "prefix_tokens": 8, "batch_size": 8}
CHROMIUM = os.environ.get("UNMEMORIZE_CHROMIUM", "/usr/bin/chromium")

RUN_SECTIONS = {"summary", "memorization", "histograms", "trajectories", "utility", "privacy", "attacks", "oracle",
                "sequences", "files"}
RUN_PLOTS = {"plot-ma-before-after", "plot-ma-histograms", "plot-trajectories", "plot-roc", "plot-oracle"}
RUN_TABLES = {"table-sets", "table-utility", "table-privacy", "table-attacks", "table-attack-sequences",
              "table-oracle", "table-oracle-sequences", "table-sequences"}


# ---- fixtures: two real runs (gradient steps with attacks and an oracle; task arithmetic, no trajectory) ----


@pytest.fixture(scope="module")
def runs(tiny, tiny_oracle, tmp_path_factory) -> dict[str, Path]:
    from tiny import sentences

    root = tmp_path_factory.mktemp("report-runs")
    general = [Sequence(f"g{i}", text) for i, text in enumerate(sentences(10, seed=99))]
    sets = {k: v for k, v in tiny["sets"].items() if k in ("forget", "holdout", "retain")}
    attacks = {"attacks": ["sampling", "quantize_8bit", "relearn"], "samples": 2, "relearn_steps": 2,
               "holdout_control": 5}
    sga = UnlearnSettings(method="sga", target="ma", lr=3e-4, retain_loss="nll", max_steps=60, max_utility_drop=10.0,
                          recalibrate_every=1, audit=AUDIT,
                          evaluation={"oracle": str(tiny_oracle), "attacks": attacks})
    ta = UnlearnSettings(method="ta", target="ma", lr=3e-3, max_utility_drop=10.0, audit={**AUDIT, "el_n": []})
    folders = {"sga": root / "sga", "ta": root / "ta"}
    unlearn(str(tiny["model"]), sets, general, sga, RUNTIME, folders["sga"])
    unlearn(str(tiny["model"]), sets, general, ta, RUNTIME, folders["ta"])
    return folders


@pytest.fixture(scope="module")
def pages(runs, tmp_path_factory) -> dict[str, Path]:
    compare_dir = tmp_path_factory.mktemp("report-compare") / "compare"
    return {"sga": render_run_report(runs["sga"]), "ta": render_run_report(runs["ta"]),
            "compare": render_compare_report(compare_dir, runs)}


# ---- parsing ----------------------------------------------------------------------------------------------


class Page(HTMLParser):
    """What the tests look for: element ids, images, tables (with their row counts), links, scripts, text."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.ids: set[str] = set()
        self.images: list[dict] = []
        self.tables: dict[str, int] = {}
        self.links: list[str] = []
        self.resources: list[str] = []  # every src= and <link href=>: must all be inline
        self.text: list[str] = []
        self._table: str | None = None
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list) -> None:
        attributes = dict(attrs)
        if "id" in attributes:
            self.ids.add(attributes["id"])
        if "src" in attributes:
            self.resources.append(attributes["src"])
        if tag == "img":
            self.images.append(attributes)
        elif tag == "link":
            self.resources.append(attributes.get("href", ""))
        elif tag == "a" and "href" in attributes:
            self.links.append(attributes["href"])
        elif tag == "table":
            self._table = attributes.get("id", f"table-{len(self.tables)}")
            self.tables[self._table] = 0
        elif tag == "tr" and self._table is not None:
            self.tables[self._table] += 1

    def handle_endtag(self, tag: str) -> None:
        if tag == "table":
            self._table = None

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def parse(path: Path) -> tuple[str, Page]:
    html = path.read_text(encoding="utf-8")
    return html, Page(html)


def texts(tiny) -> list[str]:
    return [s.text for name in ("forget", "retain", "holdout") for s in tiny["sets"][name]]


# ---- structure --------------------------------------------------------------------------------------------


def test_run_report_has_every_section_plot_and_table_and_no_text(pages, tiny):
    html, page = parse(pages["sga"])
    assert page.ids >= RUN_SECTIONS
    assert {img.get("id") for img in page.images} >= RUN_PLOTS
    for img in page.images:
        assert img["src"].startswith("data:image/svg+xml;base64,") and img.get("alt")
    for table in RUN_TABLES:
        assert page.tables.get(table, 0) >= 2, table  # a header row and at least one body row
    assert all(r.startswith("data:") for r in page.resources)  # self-contained: nothing fetched
    assert not [link for link in page.links if link.startswith(("http:", "https:", "//"))]
    for text in texts(tiny):
        assert text not in html  # the forget set is the very data to delete
    for seq in tiny["sets"]["forget"]:
        assert seq.id in page.text and seq.short_hash in page.text
    attacks_row = page.tables["table-attack-sequences"]
    assert attacks_row == 1 + len(tiny["sets"]["forget"])


def test_task_vector_run_renders_without_a_trajectory(pages):
    _, page = parse(pages["ta"])
    assert "no-trajectory" in page.ids and "plot-trajectories" not in page.ids
    assert {"plot-ma-before-after", "plot-ma-histograms", "plot-roc"} <= {img.get("id") for img in page.images}
    assert "attacks" not in page.ids and "oracle" not in page.ids


def test_compare_report_ranks_runs_and_links_each_runs_report(pages, runs):
    html, page = parse(pages["compare"])
    assert {"comparison", "compare-sequences", "runs", "plot-compare-tradeoff", "table-compare"} <= page.ids
    assert page.tables["table-compare"] == 1 + len(runs)
    reports = [link for link in page.links if link.endswith("report.html")]
    assert reports and not any(Path(link).is_absolute() for link in reports)
    for link in reports:
        assert (pages["compare"].parent / link).resolve().is_file()
    order = [name for _, name in sorted(re.findall(r'href="#run-(\d+)">([^<]+)<', html), key=lambda m: int(m[0]))]
    assert sorted(order) == sorted(runs)
    reached = [json.loads((runs[name] / "run.json").read_text())["target_reached"] for name in order]
    assert reached == sorted(reached, reverse=True)  # runs that reached the target rank first


def test_text_only_with_show_text_and_only_when_the_files_hold_it(runs, tiny, tmp_path):
    folder = tmp_path / "with-text"
    folder.mkdir()
    for name in ("run.json", "before.json", "after.json"):
        shutil.copy(runs["ta"] / name, folder / name)
    by_id = {(name, s.id): s.text for name in ("forget", "retain", "holdout") for s in tiny["sets"][name]}
    for name in ("before.json", "after.json"):  # as `unlearn --show-text` writes them
        audit = json.loads((folder / name).read_text())
        for row in audit["sequences"]:
            row["text"] = by_id[(row["set"], row["id"])]
        (folder / name).write_text(json.dumps(audit))

    html = render_run_report(folder).read_text()
    assert not [text for text in texts(tiny) if text in html]
    html = render_run_report(folder, show_text=True).read_text()
    assert all(s.text in html for s in tiny["sets"]["forget"])
    html = render_run_report(runs["ta"], show_text=True).read_text()  # asked, but the files hold no text
    assert "holds no text" in html and not [text for text in texts(tiny) if text in html]


def test_an_old_run_folder_without_optional_keys_still_renders(runs, tmp_path):
    folder = tmp_path / "old"
    folder.mkdir()
    run = json.loads((runs["sga"] / "run.json").read_text())
    for key in ("tokens", "phase_seconds", "peak_memory_mb", "restored_step", "forget", "tool_version"):
        run.pop(key, None)
    for side in ("before", "after"):
        run["utility"][side] = {"retain_ma": run["utility"][side]["retain_ma"],
                                "general_ppl": run["utility"][side]["general_ppl"]}
    (folder / "run.json").write_text(json.dumps(run))
    for name in ("before.json", "after.json"):
        audit = json.loads((runs["sga"] / name).read_text())
        for key in ("oracle", "attacks"):
            audit.pop(key, None)
        audit["privacy"].pop("roc", None)
        audit["privacy"].pop("umia_auc_ci", None)
        (folder / name).write_text(json.dumps(audit))
    _, page = parse(render_run_report(folder))
    assert {"plot-ma-before-after", "plot-ma-histograms"} <= {img.get("id") for img in page.images}
    assert "plot-roc" not in page.ids and "no-trajectory" in page.ids


# ---- in a real browser ------------------------------------------------------------------------------------


def browser_or_skip():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the Playwright Python client is not installed (pip install playwright)")
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"Chromium is not installed at {CHROMIUM} (apt-get install chromium)")
    return sync_playwright


def open_page(browser, path: Path, problems: list[str]):
    """A page that records console errors, uncaught exceptions and any request leaving the file system."""
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.on("console", lambda message: message.type == "error" and problems.append(f"console: {message.text}"))
    page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
    page.on("request", lambda request: request.url.startswith(("file:", "data:"))
            or problems.append(f"network request: {request.url}"))
    page.goto(path.resolve().as_uri(), wait_until="load")
    return page


def check_images(page) -> list[str]:
    images = page.eval_on_selector_all("img", "els => els.map(e => [e.id, e.complete, e.naturalWidth])")
    assert images
    return [image_id for image_id, complete, width in images if not (complete and width > 0)]


def test_reports_render_in_headless_chromium(pages, tmp_path):
    sync_playwright = browser_or_skip()
    problems: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = open_page(browser, pages["sga"], problems)
            assert check_images(page) == []
            ids = set(page.eval_on_selector_all("img", "els => els.map(e => e.id)"))
            assert ids >= RUN_PLOTS
            for table in RUN_TABLES:
                assert page.locator(f"#{table} tbody tr").count() > 0, table
            # sorting: clicking "MA after" twice puts the highest MA first
            header = page.locator("#table-sequences th", has_text="MA after")
            header.click()
            header.click()
            column = page.eval_on_selector_all(
                "#table-sequences tbody tr", "rows => rows.map(r => Number(r.cells[5].dataset.sort))")
            assert column == sorted(column, reverse=True)
            page.screenshot(path=str(tmp_path / "report.png"), full_page=True)

            page = open_page(browser, pages["compare"], problems)
            assert check_images(page) == []
            assert page.locator("#table-compare tbody tr").count() == 2
            page.locator("#table-compare th", has_text="seconds").click()
            seconds = page.eval_on_selector_all(
                "#table-compare tbody tr", "rows => rows.map(r => Number(r.cells[12].dataset.sort))")
            assert seconds == sorted(seconds)
            page.screenshot(path=str(tmp_path / "compare.png"), full_page=True)

            page = open_page(browser, pages["ta"], problems)
            assert check_images(page) == []
        finally:
            browser.close()
    assert problems == []
    assert (tmp_path / "report.png").stat().st_size > 10_000


def test_an_attack_cell_tells_a_record_the_oracle_shows_too_from_one_beyond_it():
    row = {"status": "extractable", "verbatim": False, "returned_extractable": True, "returned_verbatim": False}
    assert attack_cell(row, False) == {"text": "extractable (returned)", "status": "extractable", "returned": True}
    shown = {**row, "beyond_oracle_extractable": False, "beyond_oracle_verbatim": False}
    assert attack_cell(shown, False) == {"text": "extractable (returned; the oracle's too)", "status": "extractable",
                                         "returned": False}
    beyond = {**row, "beyond_oracle_extractable": True, "beyond_oracle_verbatim": False}
    assert attack_cell(beyond, False)["text"] == "extractable (returned)" and attack_cell(beyond, False)["returned"]
