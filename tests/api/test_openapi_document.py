"""The OpenAPI document says what the API serves (regressions found by the schemathesis run in
`test_fuzz_openapi.py`): errors as problem+json with the `Problem` schema, every `$ref`
resolvable, the Bearer scheme, `/metrics` as text, `/readyz`'s 503, and the download's
conditional and range headers and statuses."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings

PROBLEM = "application/problem+json"


@pytest.fixture
def document(tmp_path: Path) -> dict[str, Any]:
    app = create_app(Settings(var_dir=tmp_path / "var", run_background_loops=False))
    with TestClient(app) as client:
        resp = client.get("/openapi.json")
    assert resp.status_code == 200
    spec: dict[str, Any] = resp.json()
    return spec


def _operations(spec: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in spec["paths"].items():
        for method, op in item.items():
            yield method.upper(), path, op


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _refs(value)


def test_every_ref_resolves(document: dict[str, Any]) -> None:
    # `POST /v1/models` referred to its body schemas (and they to `Recipe`) without them in
    # components, so clients and fuzzers could not see the registration bodies.
    schemas = document["components"]["schemas"]
    refs = set(_refs(document))
    assert {"#/components/schemas/ModelTrainCreate", "#/components/schemas/ModelUploadMetadata"} <= refs
    for ref in refs:
        assert ref.startswith("#/components/schemas/"), ref
        assert ref.rsplit("/", 1)[1] in schemas, ref
    body = document["paths"]["/v1/models"]["post"]["requestBody"]["content"]
    assert set(body) == {"application/json", "multipart/form-data"}
    for name in ("ModelTrainCreate", "ModelUploadMetadata"):
        assert schemas[name]["properties"]["recipe"] == {"$ref": "#/components/schemas/Recipe"}


def test_errors_are_declared_as_problem_json_only(document: dict[str, Any]) -> None:
    # Errors were declared as `application/json` with the Problem schema and as
    # `application/problem+json` with no schema: the reverse of what is served.
    problem = document["components"]["schemas"]["Problem"]
    assert set(problem["required"]) == {"type", "title", "status", "detail", "code"}
    assert problem["additionalProperties"] is True
    seen = 0
    for method, path, op in _operations(document):
        for status, response in op["responses"].items():
            if status.isdigit() and int(status) >= 400 and response.get("content"):
                if path == "/readyz":
                    continue  # the readiness document, not an error
                assert set(response["content"]) == {PROBLEM}, (method, path, status)
                schema = response["content"][PROBLEM]["schema"]
                assert schema == {"$ref": "#/components/schemas/Problem"}, (method, path, status)
                seen += 1
    assert seen > 100


#: API operations anyone may call: a receipt's holder checks it with these public keys, and
#: an OpenDSR controller checks signatures with the processor certificate.
PUBLIC_V1 = {("GET", "/v1/receipts/keys"), ("GET", "/opendsr/v2/cert.pem")}


def test_every_v1_operation_declares_bearer_auth(document: dict[str, Any]) -> None:
    assert document["components"]["securitySchemes"]["HTTPBearer"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "An API key: `Authorization: Bearer <key>`",
    }
    for method, path, op in _operations(document):
        declared = op.get("security")
        if path.startswith(("/v1/", "/opendsr/")) and (method, path) not in PUBLIC_V1:
            assert declared == [{"HTTPBearer": []}], (method, path)
            assert {"401", "403"} <= set(op["responses"]), (method, path)
        else:
            assert declared is None, (method, path)


def test_operations_endpoints_declare_what_they_serve(document: dict[str, Any]) -> None:
    # `/metrics` was declared as JSON but serves the Prometheus text format; `/readyz`'s 503
    # was undeclared.
    metrics = document["paths"]["/metrics"]["get"]["responses"]
    assert set(metrics) == {"200"} and set(metrics["200"]["content"]) == {"text/plain"}
    ready = document["paths"]["/readyz"]["get"]["responses"]
    ref = {"$ref": "#/components/schemas/Readiness"}
    assert ready["200"]["content"]["application/json"]["schema"] == ref
    assert ready["503"]["content"]["application/json"]["schema"] == ref
    health = document["paths"]["/healthz"]["get"]["responses"]["200"]
    assert health["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Health"}


def test_download_declares_range_and_conditional_headers(document: dict[str, Any]) -> None:
    # Range, If-Range and If-None-Match were read from the raw request, invisible to the
    # document (and so never fuzzed).
    op = document["paths"]["/v1/models/{name}/versions/{n}/checkpoint"]["get"]
    headers = {p["name"] for p in op["parameters"] if p["in"] == "header"}
    assert headers == {"Range", "If-Range", "If-None-Match"}
    responses = op["responses"]
    assert {"200", "206", "304", "416"} <= set(responses)
    for status in ("200", "206"):
        assert set(responses[status]["content"]) == {"application/octet-stream"}
        assert {"ETag", "Accept-Ranges", "Content-Disposition"} <= set(responses[status]["headers"])
    assert "Content-Range" in responses["206"]["headers"]
    assert "Content-Range" in responses["416"]["headers"]
    assert "content" not in responses["304"] and "content" not in responses["416"]


def test_metrics_and_readiness_match_their_declarations(tmp_path: Path) -> None:
    settings = Settings(var_dir=tmp_path / "var", run_background_loops=False)
    with TestClient(create_app(settings)) as client:
        metrics = client.get("/metrics")
        ready = client.get("/readyz")  # not migrated: 503 with the readiness document
    assert metrics.headers["content-type"].startswith("text/plain")
    assert ready.status_code == 503 and ready.headers["content-type"] == "application/json"
    assert ready.json()["status"] == "unavailable" and set(ready.json()["checks"]) == {
        "database",
        "migrations",
        "broker",
    }
