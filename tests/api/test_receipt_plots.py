"""The receipt page's plots and HTML, without a database: drawn SVG or a sentence saying why,
deterministic output, nothing that loads or runs, and no torch in the drawing process."""

from __future__ import annotations

import re
import subprocess
import sys
from typing import Any

from app.receipts import page, plots

SCORES = {"forget_original": [3.0, 3.5, 2.9], "forget_unlearned": [0.1, 0.4, 0.2],
          "forget_out_mean": [0.0, 0.3, 0.1], "out_reference": [-0.5, 0.0, 0.2, 0.4, 0.1, -0.2]}
TEST = {"status": "tested", "statement": "ok", "alpha": 0.05,
        "forget": {"n": 3, "flagged": 0, "rate": 0.0, "interval": [0.0, 0.7]},
        "control": {"n": 3, "flagged": 0, "rate": 0.0, "interval": [0.0, 0.7]},
        "original": {"n": 3, "flagged": 2, "rate": 0.667, "interval": [0.09, 0.99]}}
HISTORY = [{"step": s, "losses": {"forget": 1 / s, "recover": 0.4},
            "weights": {"forget": 0.5, "recover": 0.5}} for s in range(1, 6)]
PER_CLASS = {"classes": [0, 1], "before": [0.9, 0.8], "after": [0.85, 0.8], "n": [5, 5]}


def _document(test: dict[str, Any]) -> dict[str, Any]:
    return {
        "summary": "Model m was asked to forget 3 training samples <b>(request dr_1)</b>.",
        "request": {"id": "dr_1", "subject_ref": "<script>alert(1)</script>", "status": "succeeded",
                    "sample_count": 3},
        "model": {"name": "m", "dataset": {"name": "tiny", "fingerprint": "f" * 64}},
        "job": {"id": "job_1"}, "verdict": {"status": "passed", "reasons": []},
        "forgetting_test": test, "forgotten_ids": {"sha256": "a" * 64, "salt": "b" * 32},
        "metrics": {"acc_test": {"value": 0.9, "interval": [0.8, 0.95]}},
        "signature": {"kid": "k", "alg": "Ed25519", "value": "v"},
    }


def test_each_plot_is_an_inline_svg_and_the_same_twice() -> None:
    drawn = [
        plots.confidence_distributions(SCORES),
        plots.per_class_accuracy(PER_CLASS),
        plots.training_curves(HISTORY),
        plots.flag_rates(TEST),
    ]
    for plot in drawn:
        assert plot.svg is not None and plot.missing is None, plot.key
        assert plot.svg.startswith("<svg ") and plot.svg.rstrip().endswith("</svg>")
        assert "<script" not in plot.svg and "<image" not in plot.svg and "<?xml" not in plot.svg
        assert "href=\"http" not in plot.svg
    assert plots.flag_rates(TEST).svg == drawn[3].svg  # deterministic: no dates, salted ids
    ids = [set(re.findall(r'id="([^"]+)"', p.svg or "")) for p in drawn]
    for i in range(len(ids)):
        for j in range(i + 1, len(ids)):
            assert ids[i] and not ids[i] & ids[j], (i, j)
    for plot in drawn:  # every reference points inside its own figure
        svg = plot.svg or ""
        refs = set(re.findall(r'(?:href="#|url\(#)([^")]+)', svg))
        assert refs and refs <= set(re.findall(r'id="([^"]+)"', svg)), plot.key


def test_missing_data_gives_a_sentence_instead_of_a_plot() -> None:
    no_scores = "The job's evidence holds no per-sample confidence scores."
    assert plots.confidence_distributions(None).missing == no_scores
    pending = plots.confidence_distributions(SCORES, why_missing="References pending.")
    assert pending.svg is None and pending.missing == "References pending."
    assert plots.per_class_accuracy({"classes": [0, 1], "before": [0.9], "after": [0.8, 0.7]}).svg is None
    assert plots.training_curves(None).missing == "The job's step history was not recorded."
    no_curves = "The job's step history holds no losses or weights."
    assert plots.training_curves([{"step": 1}]).missing == no_curves
    assert plots.flag_rates({"forget": {"n": 3}}).missing == "The job's evidence holds no flag rates."
    # a non-finite value stored as null is skipped, not drawn or raised on
    assert plots.confidence_distributions({"forget_unlearned": [None, 1.0, 2.0]}).svg is not None


def test_the_page_escapes_text_and_replaces_missing_plots() -> None:
    pending = {"status": "not_tested_references_pending",
               "statement": "forgetting not tested: references pending"}
    figures = page.build_plots(_document(pending), {"per_class_accuracy": PER_CLASS}, None)
    html = page.render(_document(pending), sha256="c" * 64, figures=figures)
    assert "<script>" not in html and "&lt;script&gt;" in html and "&lt;b&gt;" in html
    assert html.count('data-state="drawn"') == 1 and html.count('data-state="missing"') == 3
    assert html.count("Forgetting not tested: references pending.") == 2
    assert "default-src &#x27;none&#x27;" in html or "default-src 'none'" in html


def test_drawing_a_page_does_not_import_torch() -> None:
    code = (
        "import sys\n"
        "from app.receipts import page, plots\n"
        f"figs = [plots.confidence_distributions({SCORES!r}), plots.flag_rates({TEST!r})]\n"
        "assert all(f.svg for f in figs)\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
