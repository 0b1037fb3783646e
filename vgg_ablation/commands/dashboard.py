"""The study as a user sees it in the MLflow dashboard, walked in a real browser.

    python -m vgg_ablation.commands.dashboard experiment=sample [out=reports]   # screenshots of a study

Starts `vgg-ablation ui` on a free port for this folder's store, opens Debian's chromium through
playwright (`executable_path`: no browser download), and visits what a user would: the runs page
in the training view with the study's run expanded over its cells, the study's run with its report,
and a cell's metric charts. Each step waits for what it shows (names, the report's title, a drawn
chart) and saves a screenshot. The browser test (tests/test_dashboard.py) runs this same walk.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from vgg_ablation.tracking.stores import answers

CHROMIUM = os.environ.get("VGG_ABLATION_CHROMIUM", "/usr/bin/chromium")
# Debian's chromium on a closed network: no background calls home; no sandbox when run as root
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
                 "--disable-background-networking", "--disable-component-update"]  # fmt: skip
SHOTS = ("runs", "report", "metrics")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Dashboard:
    """`vgg-ablation ui` for the current folder's store, on a free port, while in the `with`."""

    def __init__(self, cwd: Path, study_args: list[str], env: dict | None = None):
        self.cwd, self.study_args, self.env = cwd, study_args, env
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.seconds_to_answer: float | None = None

    def __enter__(self) -> Dashboard:
        command = [sys.executable, "-m", "vgg_ablation", "ui", *self.study_args, f"port={self.port}"]
        self.server = subprocess.Popen(command, cwd=self.cwd, env=self.env, stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT, text=True, start_new_session=True)  # fmt: skip
        started = time.time()
        while True:
            if self.server.poll() is not None:
                raise RuntimeError("the dashboard exited: " + self.server.stdout.read()[-2000:])
            if answers(self.base):
                break
            if time.time() - started > 120:
                raise RuntimeError("the dashboard did not answer in 120 s")
            time.sleep(0.3)
        self.seconds_to_answer = time.time() - started
        return self

    def __exit__(self, *exc) -> None:
        self.server.send_signal(signal.SIGTERM)  # `ui` stops the MLflow server it started, then exits
        try:
            self.server.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(self.server.pid, signal.SIGKILL)
            self.server.wait(10)
        self.server.stdout.close()


def walk(base: str, experiment_id: str, study_run: str, study_name: str, cell_run: str, cell_name: str,
         cell_names: list[str], out: Path, prefix: str = "dashboard") -> list[Path]:  # fmt: skip
    """Visit the three pages, asserting what each shows; returns the screenshots written."""
    from playwright.sync_api import sync_playwright

    out.mkdir(parents=True, exist_ok=True)
    view = "workflowType=machine_learning"
    paths = [out / f"{prefix}-{name}.png" for name in SHOTS]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1440, "height": 860})
        try:
            # 1. the runs page: the study's run, expanded, over every cell
            page.goto(f"{base}/#/experiments/{experiment_id}/runs?{view}")
            row = page.locator('[role="row"]', has_text=f"study {study_name}").first
            row.wait_for(timeout=60_000)
            _close_assistant(page)
            row.locator('button[data-component-id*="runnamecellrenderer"]').click()  # the nesting toggle
            for name in cell_names:
                page.get_by_text(name, exact=True).first.wait_for(timeout=20_000)
            page.screenshot(path=str(paths[0]))
            # 2. the study's run: the report among its artifacts, rendered
            page.goto(f"{base}/#/experiments/{experiment_id}/runs/{study_run}/artifacts?{view}")
            page.get_by_text("report", exact=True).first.click(timeout=60_000)
            page.get_by_text(f"{study_name}.md", exact=True).first.click(timeout=20_000)
            page.get_by_text("do the VGG conclusions hold here?").first.wait_for(timeout=20_000)
            page.screenshot(path=str(paths[1]))
            # 3. a cell's metrics: its curves drawn
            page.goto(f"{base}/#/experiments/{experiment_id}/runs/{cell_run}/model-metrics?{view}")
            page.get_by_placeholder("Search metric charts").fill(
                "val/", timeout=60_000
            )  # the learning curves
            page.get_by_text(f"{cell_name} (val/acc1)").first.wait_for(timeout=30_000)
            page.locator("svg.main-svg").first.wait_for(timeout=30_000)  # plotly has drawn a chart
            time.sleep(1)  # the other charts finish drawing
            page.screenshot(path=str(paths[2]))
        finally:
            browser.close()
    return paths


def _close_assistant(page) -> None:
    """MLflow 3.17 opens an assistant side panel; closed, the table gets the width."""
    close = page.locator('button[data-component-id="mlflow.assistant.chat_panel.close"]')
    if close.count():
        close.first.click()


def main(argv: list[str]) -> int:
    from vgg_ablation.config import compose, study_overrides
    from vgg_ablation.study.cells import study_run_key
    from vgg_ablation.tracking import stores

    out = Path(next((a.split("=", 1)[1] for a in argv if a.startswith("out=")), "reports"))
    study_args = [a for a in argv if not a.startswith("out=")]
    cfg = compose(study_overrides(study_args))
    client = stores.client(stores.tracking_uri(cfg.logger.tracking_uri))
    experiment = client.get_experiment_by_name(stores.experiment_name(cfg))
    parent = (
        stores.find_study_run(client, experiment.experiment_id, study_run_key(cfg)) if experiment else None
    )
    if parent is None:
        print(
            f"error: no study run for {cfg.study.name!r} (this config) in this folder's store",
            file=sys.stderr,
        )
        return 2
    cells = client.search_runs(
        [experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    )
    cell = sorted(cells, key=lambda r: r.info.run_name)[0]
    with Dashboard(Path.cwd(), study_args) as ui:
        paths = walk(ui.base, experiment.experiment_id, parent.info.run_id, cfg.study.name, cell.info.run_id,
                     cell.info.run_name, [r.info.run_name for r in cells], out, prefix=f"dashboard-{cfg.study.name}")  # fmt: skip
    print(f"dashboard answered in {ui.seconds_to_answer:.1f} s; wrote " + ", ".join(map(str, paths)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
