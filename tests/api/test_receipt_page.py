"""The receipt page in a real browser: headless Chromium (Debian's `chromium`, which `.ci/run`
installs when missing) driven by Playwright, against the API served by uvicorn on loopback.

The page must render with no console error, load nothing but itself, run no script, and show
every plot as a drawn SVG (or, where the evidence is missing, the sentence saying why). A
screenshot is kept with the test's files; `LETHE_UPDATE_SCREENSHOT=1` also writes it to
`docs/receipt.png`, the picture the documentation shows.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from live_server import serve

from app.cli import main as cli_main
from app.services import jobs

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
DOCS_SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "receipt.png"
PLOTS = ("confidence", "per_class", "curves", "flag_rates")


def _evidence(ids: list[str], *, pending: bool) -> dict[str, Any]:
    per_class = {"classes": [0, 1, 2, 3], "before": [0.93, 0.81, 0.88, 0.97],
                 "after": [0.9, 0.8, 0.86, 0.95], "n": [10, 10, 10, 10]}
    intervals = {"acc_forget": [0.24, 0.76], "acc_retain": [0.94, 0.99], "acc_test": [0.81, 0.97]}
    if pending:
        return {"alpha": 0.05, "test": "offline-lira", "references": {"k": 8, "status": "pending"},
                "statement": "forgetting not tested: references pending",
                "per_class_accuracy": per_class, "intervals": intervals}
    n = len(ids)
    return {
        "alpha": 0.05, "test": "offline-lira", "references": {"k": 8, "status": "ready"},
        "forget": {"n": n, "flagged": 1, "rate": 1 / n, "interval": [0.0025, 0.445]},
        "control": {"n": n, "flagged": 0, "rate": 0.0, "interval": [0.0, 0.308]},
        "original": {"n": n, "flagged": 7, "rate": 7 / n, "interval": [0.348, 0.933]},
        "forget_vs_control_p": 0.5, "original_vs_control_p": 0.0015, "distinguishes": True,
        "statement": "forget samples are flagged no more often than never-trained ones",
        "p_values": {sid: 0.2 + 0.05 * i for i, sid in enumerate(ids)},
        "scores": {
            "forget_original": [3.1 + 0.35 * ((i * 7) % n) for i in range(n)],
            "forget_unlearned": [0.2 + 0.3 * ((i * 3) % n) for i in range(n)],
            "forget_out_mean": [0.1 + 0.3 * i for i in range(n)],
            "out_reference": [-1.0 + 0.09 * ((i * 13) % 41) for i in range(4 * n)],
        },
        "per_class_accuracy": per_class,
        "intervals": intervals,
    }


def _history() -> list[dict[str, Any]]:
    out = []
    for s in range(1, 41):
        w = 0.5 + 0.3 * (1 - 1 / (1 + 0.1 * s))
        out.append({"step": s, "losses": {"forget": 2.0 / (1 + 0.2 * s), "recover": 0.3 + 0.4 / s},
                    "weights": {"forget": w, "recover": 1 - w}})
    return out


def _finish(dep: Any, ids: list[str], checkpoint: bytes, **evidence: Any) -> str:
    """Run a job for `ids` to publication through the service, with `evidence` and `history`
    as the worker would report them."""
    sub = dep.submit("m", ids, subject_ref="DSR-2026-0042")
    job_id = sub.body["job_id"]
    with dep.sessions() as s:
        assert jobs.claim_job(s, job_id, "w1", heartbeat_timeout_s=60, store=dep.store) is not None
    assert dep.complete(job_id, checkpoint, **evidence).published
    return str(sub.body["id"])


@pytest.fixture
def live(sqlite_deployment: Any) -> Iterator[tuple[str, Any]]:
    """The API on a loopback port, served by uvicorn in a thread."""
    with serve(sqlite_deployment.settings) as base:
        yield base, sqlite_deployment


def test_cli_fetches_a_receipt_and_verifies_it_against_the_served_keys(
    live: tuple[str, Any], make_checkpoint: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base, dep = live
    dep.upload_model("m")
    train, _ = dep.ids()
    request_id = _finish(dep, train[:4], make_checkpoint(seed=2))
    out = tmp_path / "receipt.json"
    common = ["--url", base, "--api-key", dep.admin_key]
    assert cli_main([*common, "receipt", "get", request_id, "-o", str(out)]) == 0
    assert cli_main([*common, "receipt", "verify", str(out)]) == 0  # keys fetched from --url
    assert cli_main(["receipt", "verify", str(out), "--keys", f"{base}/v1/receipts/keys"]) == 0
    assert capsys.readouterr().out.count(f"receipt OK: request {request_id}") == 2
    assert cli_main(["receipt", "verify", str(out), "--keys", f"{base}/v1/nowhere"]) == 1
    page = tmp_path / "receipt.html"
    assert cli_main([*common, "receipt", "get", request_id, "--html", "-o", str(page)]) == 0
    assert page.read_text().startswith("<!DOCTYPE html>")


def test_receipt_page_renders_in_headless_chromium(
    live: tuple[str, Any], make_checkpoint: Any, tmp_path: Path
) -> None:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install -y chromium (.ci/run does)")
    from playwright.sync_api import sync_playwright

    base, dep = live
    dep.upload_model("m")
    train, _ = dep.ids()
    full = _finish(dep, train[:10], make_checkpoint(seed=2),
                   evidence=_evidence(train[:10], pending=False), history=_history())
    pending = _finish(dep, train[10:15], make_checkpoint(seed=3),
                      evidence=_evidence(train[10:15], pending=True), history=None)

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(
                extra_http_headers={"Authorization": f"Bearer {dep.admin_key}"},
                viewport={"width": 1100, "height": 900},
            )
            why_missing = {
                "confidence": "references pending",
                "flag_rates": "references pending",
                "curves": "step history was not recorded",
            }
            for request_id, drawn in ((full, set(PLOTS)), (pending, {"per_class"})):
                page = context.new_page()
                errors: list[str] = []
                requests: list[str] = []
                page.on("console", lambda m, e=errors: e.append(m.text) if m.type == "error" else None)
                page.on("pageerror", lambda exc, e=errors: e.append(str(exc)))
                page.on("request", lambda r, seen=requests: seen.append(r.url))
                url = f"{base}/v1/deletion-requests/{request_id}/receipt.html"
                response = page.goto(url, wait_until="load")
                assert response is not None and response.status == 200
                page.wait_for_load_state("networkidle")
                assert errors == [], errors
                assert [r for r in requests if not r.startswith("data:")] == [url]
                assert page.evaluate("document.scripts.length") == 0
                assert page.locator("h1").inner_text() == "Deletion receipt"
                summary = page.locator("p.summary").inner_text()
                assert summary.startswith("Model m was asked to forget") and request_id in summary
                assert page.locator("#verdict").inner_text() == "Verdict: PASSED"
                assert page.locator("figure[data-plot]").count() == len(PLOTS)
                for key in PLOTS:
                    figure = page.locator(f"#plot-{key}")
                    if key in drawn:
                        box = figure.locator("svg").bounding_box()
                        assert box is not None and box["width"] > 300 and box["height"] > 100, (key, box)
                        assert figure.locator("svg path").count() > 10, key
                    else:
                        assert figure.locator("svg").count() == 0, key
                        assert why_missing[key] in figure.locator(".missing").inner_text(), key
                if request_id == full:
                    shot = tmp_path / "receipt.png"
                    page.screenshot(path=str(shot), full_page=True)
                    assert shot.stat().st_size > 20_000
                    if os.environ.get("LETHE_UPDATE_SCREENSHOT") == "1":
                        shutil.copyfile(shot, DOCS_SCREENSHOT)
                    # Printable: the PDF Chromium makes of it has pages, the plots included.
                    assert len(page.pdf(format="A4")) > 20_000
                page.close()
        finally:
            browser.close()
