"""The client's resource types (`app.client` TypedDicts) stay equal to the OpenAPI schemas.

Each TypedDict must list exactly the members of the component schema it mirrors
(`app.client.SCHEMAS`), each with the JSON type the schema declares (an enum's values are
strings; `X | None` where the schema allows null).
"""

from __future__ import annotations

import types
import typing
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import pytest
from fastapi.testclient import TestClient

from app import client
from app.main import create_app
from app.settings import Settings


@pytest.fixture(scope="module")
def schemas(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    var = Path(tmp_path_factory.mktemp("var"))
    with TestClient(create_app(Settings(var_dir=var, run_background_loops=False))) as api:
        document = api.get("/openapi.json").json()
    found: dict[str, Any] = document["components"]["schemas"]
    return found


def _resolve(schema: dict[str, Any], schemas: dict[str, Any]) -> dict[str, Any]:
    ref = schema.get("$ref")
    return _resolve(schemas[ref.rsplit("/", 1)[1]], schemas) if ref else schema


def _json_types(schema: dict[str, Any], schemas: dict[str, Any]) -> set[str]:
    """The JSON types a property schema admits (`any` when it does not say)."""
    schema = _resolve(schema, schemas)
    if "anyOf" in schema:
        return set().union(*(_json_types(s, schemas) for s in schema["anyOf"]))
    declared = schema.get("type")
    if declared is None:
        return {"string"} if "enum" in schema else {"any"}
    found = set(declared) if isinstance(declared, list) else {declared}
    if "enum" in schema:
        assert all(isinstance(v, str) for v in schema["enum"]), schema
    return found


def _python_types(annotation: Any) -> set[str]:
    """The JSON types a TypedDict annotation stands for."""
    if annotation is Any:
        return {"any"}
    if annotation is type(None):
        return {"null"}
    origin = get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return set().union(*(_python_types(a) for a in get_args(annotation)))
    base = origin or annotation
    return {
        str: {"string"},
        int: {"integer"},
        float: {"number"},
        bool: {"boolean"},
        dict: {"object"},
        list: {"array"},
    }[base]


@pytest.mark.parametrize("schema_name", sorted(client.SCHEMAS))
def test_client_type_matches_the_schema(schema_name: str, schemas: dict[str, Any]) -> None:
    typed = client.SCHEMAS[schema_name]
    hints = get_type_hints(typed)
    properties = schemas[schema_name]["properties"]
    assert list(hints) == list(properties), schema_name  # same members, same order
    for name, prop in properties.items():
        assert _python_types(hints[name]) == _json_types(prop, schemas), (schema_name, name)


def test_every_resource_schema_has_a_client_type(schemas: dict[str, Any]) -> None:
    resources = {name for name in schemas if name.endswith("Public")} - {"SamplePublic", "AuditEventPublic"}
    assert resources <= set(client.SCHEMAS)
    assert "ChainVerification" in client.SCHEMAS


def test_final_statuses_are_the_vocabulary() -> None:
    from app.vocab import FINAL_JOB_STATUSES, FINAL_REQUEST_STATUSES

    assert {"succeeded", "failed", "cancelled"} == client.FINAL_STATUSES
    assert client.FINAL_STATUSES == FINAL_REQUEST_STATUSES | FINAL_JOB_STATUSES
