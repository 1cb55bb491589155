"""Schemathesis hooks for the live contract run (`test_live_contract.py`), loaded by the CLI
through `SCHEMATHESIS_HOOKS`.

`positive_data_acceptance` fails any schema-valid request answered 4xx (other than 401, 403,
404, 409). A few refusals depend on the state of the world, which no schema can state: a
sample ID the dataset does not hold, subjects named for a dataset that maps none, a file that
is not a safetensors checkpoint, a dataset file that cannot be read, a cursor the server never
issued, an OpenDSR request type or identity the processor's discovery does not list.
`stateful_positive_data_acceptance` is that check with exactly these refusals let through,
each identified by its problem `code` (and, where a code is broad, its field or error type),
each declared in the document. Every other refusal of a schema-valid request still fails the
run.
"""

from __future__ import annotations

import json
from typing import Any

import schemathesis
from schemathesis.specs.openapi.checks import _openapi_positive_data_acceptance

#: (method, path template) -> problem codes whose refusal depends on stored data.
STATE_DEPENDENT: dict[tuple[str, str], frozenset[str]] = {
    # The IDs must be training samples of the model's dataset; subjects need a dataset that
    # says whose its samples are.
    ("POST", "/v1/deletion-requests"): frozenset(
        {"unknown_sample_ids", "test_split_samples", "dataset_without_subjects"}
    ),
    # The `uri` (and `options`) must name data the adapter can read.
    ("POST", "/v1/datasets"): frozenset({"invalid_input"}),
    # The file must be a safetensors checkpoint of the architecture's shapes; a `timm:` or
    # `torchvision:` name must be a classifier of the installed library (its model list).
    ("POST", "/v1/models"): frozenset({"invalid_checkpoint", "unsupported_architecture"}),
}


def _problem(response: Any) -> dict[str, Any]:
    try:
        body = json.loads(response.content or b"{}")
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def state_dependent(method: str, path: str, status: int, problem: dict[str, Any]) -> bool:
    """True when a refusal of a schema-valid request depends on stored data, not its shape."""
    code = problem.get("code")
    if status == 400 and code == "invalid_cursor":
        return True  # only cursors the server issued are valid; the schema says so
    if status == 400 and (method, path) == ("POST", "/opendsr/v2/requests"):
        # OpenDSR: every request type and identity of the protocol is schema-valid; which ones
        # a processor fulfils is what its discovery document publishes, answered with the
        # protocol's error when the request asks for another.
        return code in {"unsupported_request_type", "unsupported_identity"}
    if status != 422:
        return False
    if code in STATE_DEPENDENT.get((method, path), frozenset()):
        return True
    if (method, path) == ("POST", "/v1/models") and code == "invalid_input":
        # A model needs at least as many classes as its dataset holds; an upload's input
        # description must agree with itself and its architecture (stated in its description).
        return problem.get("field") in ("num_classes", "input_size", "preprocessing")
    if (method, path) == ("POST", "/v1/deletion-requests") and code == "invalid_method_options":
        # Constraints between options (scrub: max_epochs <= epochs), stated in the
        # options' description; JSON Schema has no way to state them.
        return all(e.get("type") == "method_option_rule" for e in problem.get("errors", []))
    return False


@schemathesis.check
def stateful_positive_data_acceptance(ctx: Any, response: Any, case: Any) -> bool | None:
    """`positive_data_acceptance`, except refusals that depend on stored data."""
    operation = case.operation
    if state_dependent(operation.method.upper(), operation.path, response.status_code, _problem(response)):
        return None
    result: bool | None = _openapi_positive_data_acceptance(ctx, response, case)
    return result
