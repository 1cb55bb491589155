"""`/v1/datasets`: register (admin), read, list, list samples, look up a data subject."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Path, Query
from fastapi.responses import JSONResponse

from app.api.deps import PagingDep, SessionDep, require
from app.api.schemas import (
    PROBLEM_RESPONSES,
    DatasetCreate,
    DatasetList,
    DatasetPublic,
    SampleList,
    SubjectPublic,
)
from app.services import datasets
from app.services.apikeys import Principal
from app.vocab import Scope

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])
#: A subject ID as a path segment: printable, no `/`, not starting with `.` (IDs outside this
#: are looked up by naming them in a deletion request instead).
SUBJECT_IN_PATH = r"^[^\x00-\x1f\x7f/.][^\x00-\x1f\x7f/]{0,199}$"
SUBJECT_IN_PATH_DESCRIPTION = "The subject ID (percent-encoded); no '/' and no leading '.'"
NamePath = Annotated[str, Path(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")]


@router.post("", status_code=201, response_model=DatasetPublic, responses=PROBLEM_RESPONSES)
def create_dataset(
    body: DatasetCreate,
    session: SessionDep,
    principal: Annotated[Principal, Depends(require(Scope.ADMIN))],
) -> Any:
    """Register a dataset and index its samples."""
    created = datasets.register_dataset(session, actor=principal.name, **body.model_dump())
    return JSONResponse(
        created, status_code=201, headers={"Location": f"/v1/datasets/{created['name']}"}
    )


@router.get("", response_model=DatasetList, responses=PROBLEM_RESPONSES)
def list_datasets(
    session: SessionDep, paging: PagingDep, _: Annotated[Principal, Depends(require(Scope.MODELS_READ))]
) -> Any:
    """Datasets by name."""
    page = datasets.list_datasets(session, limit=paging.limit, cursor=paging.cursor)
    return {"items": page.items, "next_cursor": page.next_cursor}


@router.get("/{name}", response_model=DatasetPublic, responses=PROBLEM_RESPONSES)
def get_dataset(
    name: NamePath, session: SessionDep, _: Annotated[Principal, Depends(require(Scope.MODELS_READ))]
) -> Any:
    """One dataset with its sizes."""
    return datasets.get_dataset(session, name)


@router.get("/{name}/samples", response_model=SampleList, responses=PROBLEM_RESPONSES)
def list_samples(
    name: NamePath,
    session: SessionDep,
    paging: PagingDep,
    _: Annotated[Principal, Depends(require(Scope.MODELS_READ))],
    split: Literal["train", "test"] | None = None,
    label: Annotated[int | None, Query(ge=0, le=2**31 - 1)] = None,
) -> Any:
    """A dataset's samples (`sample_id, split, label`)."""
    page = datasets.list_samples(
        session, name, split=split, label=label, limit=paging.limit, cursor=paging.cursor
    )
    return {"items": page.items, "next_cursor": page.next_cursor}


@router.get("/{name}/subjects/{subject_id}", response_model=SubjectPublic, responses=PROBLEM_RESPONSES)
def get_subject(
    name: NamePath,
    subject_id: Annotated[str, Path(pattern=SUBJECT_IN_PATH, description=SUBJECT_IN_PATH_DESCRIPTION)],
    session: SessionDep,
    _: Annotated[Principal, Depends(require(Scope.MODELS_READ))],
) -> Any:
    """How many samples, per split, a data subject has in the dataset (zero when unknown)."""
    return datasets.get_subject(session, name, subject_id)
