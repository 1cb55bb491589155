"""The receipt as one self-contained, printable HTML page for a data-protection officer.

It opens with the summary sentence and the verdict, then the evidence: four plots drawn by
`app.receipts.plots` (inline SVG, or a sentence saying why a plot is missing), the tables of
the signed receipt, and how to check its signature. No JavaScript, no external resource: the
response carries a Content-Security-Policy that forbids both.
"""

from __future__ import annotations

from html import escape
from typing import Any

from app.receipts import plots

#: Served with the page: nothing may load or run but the inline styles and SVG.
CONTENT_SECURITY_POLICY = "default-src 'none'; style-src 'unsafe-inline'; img-src data:; form-action 'none'"

_CSS = """
:root { color-scheme: light; }
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #111827;
       max-width: 60rem; margin: 2rem auto; padding: 0 1.25rem; }
h1 { font-size: 1.5rem; margin: 0 0 .5rem; } h2 { font-size: 1.15rem; margin: 2rem 0 .5rem;
     border-bottom: 1px solid #e5e7eb; padding-bottom: .25rem; }
.summary { font-size: 1.1rem; margin: .75rem 0; }
.verdict { display: inline-block; padding: .3rem .8rem; border-radius: .4rem; font-weight: 700;
           letter-spacing: .02em; }
.verdict.passed { background: #dcfce7; color: #14532d; border: 1px solid #15803d; }
.verdict.failed, .verdict.not_evaluated { background: #fee2e2; color: #7f1d1d; border: 1px solid #b91c1c; }
.notice { background: #fef9c3; border: 1px solid #ca8a04; padding: .5rem .75rem; border-radius: .4rem; }
table { border-collapse: collapse; width: 100%; margin: .5rem 0; font-size: .92rem; }
th, td { text-align: left; padding: .3rem .5rem; border-bottom: 1px solid #e5e7eb; vertical-align: top; }
th { width: 16rem; color: #374151; font-weight: 600; }
code, .mono { font-family: ui-monospace, "SFMono-Regular", Menlo, Consolas, monospace;
              font-size: .85rem; word-break: break-all; }
figure { margin: 1rem 0; page-break-inside: avoid; break-inside: avoid; }
figcaption { font-weight: 600; margin-bottom: .25rem; }
svg.plot { max-width: 100%; height: auto; }
.missing { color: #6b7280; font-style: italic; border: 1px dashed #d1d5db; padding: .75rem; }
ul { margin: .25rem 0; }
@media print { body { margin: 0; max-width: none; } h2 { page-break-after: avoid; } }
"""


def _fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list) and len(value) == 2 and all(isinstance(v, int | float) for v in value):
        return f"[{_fmt(value[0])}, {_fmt(value[1])}]"
    if isinstance(value, dict | list):
        import json

        return json.dumps(value, sort_keys=True)
    return str(value)


def _table(rows: list[tuple[str, Any]], *, mono: frozenset[str] = frozenset()) -> str:
    cells = []
    for label, value in rows:
        text = escape(_fmt(value))
        if label in mono:
            text = f'<span class="mono">{text}</span>'
        cells.append(f"<tr><th>{escape(label)}</th><td>{text}</td></tr>")
    return "<table>" + "".join(cells) + "</table>"


def _figure(plot: plots.Plot) -> str:
    body = plot.svg if plot.svg is not None else f'<p class="missing">{escape(plot.missing or "")}</p>'
    return (
        f'<figure id="plot-{plot.key}" data-plot="{plot.key}" '
        f'data-state="{"drawn" if plot.svg is not None else "missing"}">'
        f"<figcaption>{escape(plot.title)}</figcaption>{body}</figure>"
    )


def build_plots(document: dict[str, Any], evidence: Any, history: Any) -> list[plots.Plot]:
    """The page's four plots for a receipt, the job's evidence and its step history."""
    test = document.get("forgetting_test") or {}
    why: str | None = None
    if test.get("status") in ("not_tested", "not_tested_references_pending"):
        why = f"{test.get('statement', 'forgetting not tested')[:1].upper()}{test.get('statement', '')[1:]}."
    evidence = evidence if isinstance(evidence, dict) else {}
    return [
        plots.confidence_distributions(evidence.get("scores"), why_missing=why),
        plots.per_class_accuracy(evidence.get("per_class_accuracy")),
        plots.training_curves(history),
        plots.flag_rates(test, why_missing=why),
    ]


def render(document: dict[str, Any], *, sha256: str, figures: list[plots.Plot]) -> str:
    """The HTML page of a signed receipt."""
    req, model, job = document["request"], document["model"], document["job"]
    verdict, test = document["verdict"], document["forgetting_test"]
    versions = document.get("versions") or {}
    base, result = versions.get("base") or {}, versions.get("result") or {}
    ids = document["forgotten_ids"]
    signature = document.get("signature") or {}
    status = str(verdict.get("status", "unknown"))
    parts: list[str] = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f'<meta http-equiv="Content-Security-Policy" content="{CONTENT_SECURITY_POLICY}">',
        '<link rel="icon" href="data:,">',
        f"<title>Deletion receipt {escape(req['id'])}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<header><h1>Deletion receipt</h1><p class=\"summary\">{escape(document['summary'])}</p>",
        f'<p><span class="verdict {escape(status)}" id="verdict">'
        f"Verdict: {escape(status.upper())}</span></p>",
    ]
    if test.get("status") != "tested":
        parts.append(f'<p class="notice">{escape(str(test.get("statement", "")))}</p>')
    if verdict.get("summary"):
        parts.append(f"<p>{escape(str(verdict['summary']))}</p>")
    reasons = verdict.get("reasons") or []
    if reasons:
        parts.append("<ul>" + "".join(f"<li>{escape(str(r))}</li>" for r in reasons) + "</ul>")
    parts.append("</header>")

    parts.append("<h2>Evidence</h2>")
    parts.extend(_figure(f) for f in figures)

    parts.append("<h2>Forgetting test</h2>")
    test_rows: list[tuple[str, Any]] = [("status", test.get("status")), ("statement", test.get("statement"))]
    for name in ("forget", "control", "original"):
        group = test.get(name)
        if isinstance(group, dict):
            test_rows.append(
                (f"{name}: flagged / n (rate, interval)",
                 f"{group.get('flagged')} / {group.get('n')} ({_fmt(group.get('rate'))}, "
                 f"{_fmt(group.get('interval'))})")
            )
    extra = ("test", "alpha", "references", "forget_vs_control_p", "original_vs_control_p", "distinguishes")
    for key in extra:
        if key in test:
            test_rows.append((key, test.get(key)))
    parts.append(_table(test_rows))

    parts.append("<h2>Metrics on audit data</h2>")
    metric_rows = [
        (name, f"{_fmt(m.get('value'))}  interval {_fmt(m.get('interval'))}")
        for name, m in sorted((document.get("metrics") or {}).items())
        if isinstance(m, dict)
    ]
    parts.append(_table(metric_rows) if metric_rows else '<p class="missing">No metrics were recorded.</p>')
    checks = verdict.get("checks") or []
    if checks:
        parts.append("<h2>Verdict checks</h2><ul>")
        parts.extend(f"<li>{escape(_fmt(c))}</li>" for c in checks)
        parts.append("</ul>")

    parts.append("<h2>Request and model</h2>")
    parts.append(_table([
        ("request", req["id"]),
        ("subject reference", req.get("subject_ref")),
        ("status", req.get("status")),
        ("received / finished", f"{req.get('received_at')} / {req.get('finished_at')}"),
        ("samples named", req.get("sample_count")),
        ("of which already forgotten", req.get("already_forgotten_count")),
        ("model", f"{model['name']} ({model.get('architecture')}, {model.get('num_classes')} classes)"),
        ("dataset", model["dataset"]["name"]),
        ("dataset fingerprint", model["dataset"].get("fingerprint")),
        ("forgotten IDs (salted sha256)", ids.get("sha256")),
        ("salt", ids.get("salt")),
        ("hash rule", ids.get("algorithm")),
    ], mono=frozenset({"request", "dataset fingerprint", "forgotten IDs (salted sha256)", "salt"})))

    parts.append("<h2>Versions and job</h2>")
    parts.append(_table([
        ("base version", base.get("version")),
        ("base checkpoint sha256", base.get("sha256")),
        ("result version", result.get("version")),
        ("result checkpoint sha256", result.get("sha256")),
        ("job", job.get("id")),
        ("method", job.get("method")),
        ("options", job.get("options")),
        ("seeds", job.get("seed")),
        ("code version", f"{job.get('code_version')} ({job.get('code_version_source')})"),
        ("device / seconds / steps",
         f"{job.get('device')} / {_fmt(job.get('seconds'))} / {job.get('steps')}"),
        ("error", job.get("error")),
    ], mono=frozenset({"base checkpoint sha256", "result checkpoint sha256", "job"})))

    audit = document.get("audit") or {}
    parts.append("<h2>Audit and signature</h2>")
    parts.append(_table([
        ("audit event", f"#{audit.get('seq')} {audit.get('event')}" if audit else None),
        ("audit hash", audit.get("hash")),
        ("issued at", document.get("issued_at")),
        ("signature", f"{signature.get('alg')} by key {signature.get('kid')}"),
        ("signature value", signature.get("value")),
        ("receipt sha256", sha256),
    ], mono=frozenset({"audit hash", "signature value", "receipt sha256"})))
    parts.append(
        "<p>The JSON receipt (<code>GET /v1/deletion-requests/{id}/receipt</code>) is the signed "
        "record; this page is a reading of it. Check it offline with <code>lethe receipt verify "
        "FILE --keys KEYS</code> or with the few lines of Python in <code>docs/receipts.md</code>, "
        "against the public keys at <code>GET /v1/receipts/keys</code>.</p>"
    )
    parts.append("</body></html>")
    return "\n".join(parts)
