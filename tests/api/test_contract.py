"""What the OpenAPI document declares is what the server enforces (the regressions the live
schemathesis run found): method options validated at intake and named, the enums, the
callback URL rule, `since`, the opaque cursor, both registration bodies, and `Allow` on 405."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from engine import catalog

PROBLEM = "application/problem+json"


@pytest.fixture
def api(sqlite_deployment: Any) -> Iterator[tuple[TestClient, Any]]:
    sqlite_deployment.upload_model("m")
    with TestClient(create_app(sqlite_deployment.settings)) as client:
        client.headers["Authorization"] = f"Bearer {sqlite_deployment.admin_key}"
        yield client, sqlite_deployment


def _problem(resp: Any, status: int, code: str) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith(PROBLEM)
    body: dict[str, Any] = resp.json()
    assert body["code"] == code, body
    return body


def _submit(client: TestClient, dep: Any, **body: Any) -> Any:
    train, _ = dep.ids()
    return client.post("/v1/deletion-requests", json={"model": "m", "sample_ids": train[:2], **body})


def test_method_options_are_validated_at_intake_and_named(api: tuple[TestClient, Any]) -> None:
    client, dep = api
    unknown = _problem(
        _submit(client, dep, method="finetune", method_options={"lr": 0.1, "learning_rate": 0.1}),
        422,
        "invalid_method_options",
    )
    assert [e["loc"] for e in unknown["errors"]] == [["body", "method_options", "learning_rate"]]
    assert "learning_rate" in unknown["detail"] and unknown["method"] == "finetune"
    invalid = _problem(
        _submit(client, dep, method_options={"balancer": "nope", "lr": 0, "batch_size": 2.5}),
        422,
        "invalid_method_options",
    )
    assert {e["loc"][-1] for e in invalid["errors"]} == {"balancer", "lr", "batch_size"}
    rule = _problem(
        _submit(client, dep, method="scrub", method_options={"epochs": 2, "max_epochs": 3}),
        422,
        "invalid_method_options",
    )
    assert rule["errors"][0]["type"] == "method_option_rule"
    # Nothing was stored for the refused requests; a valid one is accepted with its options.
    assert client.get("/v1/deletion-requests").json()["items"] == []
    ok = _submit(client, dep, method="finetune", method_options={"lr": 0.1, "epochs": 2})
    assert ok.status_code == 202, ok.text
    job = client.get(f"/v1/jobs/{ok.json()['job_id']}").json()
    assert job["method"] == "finetune"


def test_unknown_methods_are_refused_by_the_enum(api: tuple[TestClient, Any]) -> None:
    client, dep = api
    body = _problem(_submit(client, dep, method="magic"), 422, "validation_error")
    assert "body.method" in body["detail"]


def test_the_document_declares_the_catalog(api: tuple[TestClient, Any]) -> None:
    client, _ = api
    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    create = schemas["DeletionRequestCreate"]
    assert create["properties"]["method"]["enum"] == list(catalog.METHOD_NAMES)
    variants = {v["title"]: v["properties"]["method_options"] for v in create["oneOf"]}
    assert set(variants) == set(catalog.METHODS)
    finetune = variants["finetune"]
    assert finetune["additionalProperties"] is False
    assert finetune["properties"]["lr"] == {
        "type": "number",
        "exclusiveMinimum": 0,
        "maximum": 10,
        "default": 0.01,
        "description": "learning rate",
    }
    from engine.datasets import ADAPTERS

    kinds = schemas["DatasetCreate"]["properties"]["kind"]["enum"]
    assert sorted(kinds) == sorted(ADAPTERS) and {"mnist5k", "npz", "image_folder", "manifest"} <= set(kinds)
    from engine.arch_shapes import ARCHITECTURES

    assert schemas["ModelTrainCreate"]["properties"]["architecture"]["enum"] == list(ARCHITECTURES)
    assert schemas["Recipe"]["properties"]["optimizer"]["enum"] == list(catalog.OPTIMIZERS)
    assert "enum" in schemas["RequestStatus"] and "enum" in schemas["JobKind"]


@pytest.mark.parametrize(
    ("environment", "url", "accepted"),
    [
        ("development", "https://hooks.example.com/lethe?x=1", True),
        ("development", "http://127.0.0.1:9000/hook", True),
        ("development", "http://localhost/hook", True),
        ("development", "http://[::1]:8080/", True),
        ("development", "http://hooks.example.com/hook", False),
        ("development", "ftp://hooks.example.com/", False),
        ("development", "not a url", False),
        ("production", "https://hooks.example.com/lethe", True),
        ("production", "http://127.0.0.1:9000/hook", False),
    ],
)
def test_callback_url_rule_is_declared_and_enforced(
    sqlite_deployment: Any, environment: str, url: str, accepted: bool
) -> None:
    import re

    settings = sqlite_deployment.settings.model_copy(
        update={"environment": environment, "webhook_signing_secret": "s" * 40}
    )
    sqlite_deployment.upload_model("m")
    with TestClient(create_app(settings)) as client:
        client.headers["Authorization"] = f"Bearer {sqlite_deployment.admin_key}"
        schema = client.get("/openapi.json").json()["components"]["schemas"]["DeletionRequestCreate"]
        callback = schema["properties"]["callback_url"]
        declared = next(s for s in callback["anyOf"] if s.get("type") == "string")
        assert declared["format"] == "uri" and "loopback" in callback["description"]
        assert bool(re.search(declared["pattern"], url)) is accepted
        resp = _submit(client, sqlite_deployment, callback_url=url)
    assert (resp.status_code == 202) is accepted, resp.text
    if not accepted:
        assert resp.status_code == 422


def test_since_is_an_rfc3339_date_time(api: tuple[TestClient, Any]) -> None:
    client, _ = api
    for path in ("/v1/audit", "/v1/audit/export"):
        _problem(client.get(path, params={"since": "0.5"}), 422, "validation_error")
        _problem(client.get(path, params={"since": "2026-01-01"}), 422, "validation_error")
        assert client.get(path, params={"since": "2000-01-01T00:00:00Z"}).status_code == 200
    future = client.get("/v1/audit", params={"since": "2999-01-01T00:00:00+02:00"}).json()
    assert future["items"] == []
    past = client.get("/v1/audit", params={"since": "2000-01-01t00:00:00z"}).json()
    assert past["items"]


def test_cursor_is_opaque_and_its_refusal_declared(api: tuple[TestClient, Any]) -> None:
    client, dep = api
    for path in ("/v1/models", "/v1/audit", "/v1/models/m/versions", "/v1/deletion-requests"):
        _problem(client.get(path, params={"cursor": "0000"}), 400, "invalid_cursor")
    # An issued cursor works, and an issued string cursor is refused where numbers are keys.
    page = client.get("/v1/audit", params={"limit": 1}).json()
    assert client.get("/v1/audit", params={"cursor": page["next_cursor"]}).status_code == 200
    _submit(client, dep)
    _submit(client, dep, subject_ref="x")
    first = client.get("/v1/deletion-requests", params={"limit": 1}).json()
    assert first["next_cursor"]
    _problem(client.get("/v1/audit", params={"cursor": first["next_cursor"]}), 400, "invalid_cursor")
    # Without a key the answer is 401 whatever the cursor.
    _problem(
        client.get("/v1/models", params={"cursor": "0000"}, headers={"Authorization": ""}),
        401,
        "unauthorized",
    )
    responses = client.get("/openapi.json").json()["paths"]["/v1/models"]["get"]["responses"]
    assert "400" in responses


def test_both_registration_bodies_are_what_the_document_says(
    api: tuple[TestClient, Any], make_checkpoint: Any
) -> None:
    client, _ = api
    meta = {"name": "u", "dataset": "tiny", "architecture": "small_cnn", "num_classes": 4}
    # JSON is the train form: `init: "train"` is required, as the document says.
    missing = _problem(client.post("/v1/models", json=meta), 422, "validation_error")
    assert "body.init" in missing["detail"]
    assert client.post("/v1/models", json={**meta, "init": "train"}).status_code == 202
    # Multipart carries `metadata` as a JSON part and the checkpoint file.
    resp = client.post(
        "/v1/models",
        files={
            "metadata": (None, json.dumps({**meta, "name": "u2"}), "application/json"),
            "checkpoint": ("m.safetensors", make_checkpoint(), "application/octet-stream"),
        },
    )
    assert resp.status_code == 201, resp.text
    bad_policy = client.post(
        "/v1/models", json={**meta, "name": "u3", "init": "train", "policy": {"max_gapp": 1}}
    )
    assert "body.policy.max_gapp" in _problem(bad_policy, 422, "validation_error")["detail"]
    body = client.get("/openapi.json").json()["paths"]["/v1/models"]["post"]["requestBody"]
    multipart = body["content"]["multipart/form-data"]
    assert multipart["schema"]["properties"]["metadata"] == {
        "$ref": "#/components/schemas/ModelUploadMetadata"
    }
    assert multipart["encoding"] == {"metadata": {"contentType": "application/json"}}


def test_405_names_every_allowed_method(api: tuple[TestClient, Any]) -> None:
    client, _ = api
    for path, allowed in (
        ("/v1/models", "GET, POST"),
        ("/v1/deletion-requests", "GET, POST"),
        ("/v1/deletion-requests/dr_x", "GET"),
        ("/v1/jobs/job_x/cancel", "POST"),
        ("/healthz", "GET"),
    ):
        resp = client.request("DELETE", path)
        _problem(resp, 405, "method_not_allowed")
        assert resp.headers["allow"] == allowed, path

