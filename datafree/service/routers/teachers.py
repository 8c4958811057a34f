"""``/v1/teachers``: upload a teacher (validated by loading it) and list the stored ones.

Example:
    >>> app.include_router(router)   # doctest: +SKIP
"""
from __future__ import annotations

from fastapi import APIRouter, File, Form, HTTPException, Request, UploadFile

from datafree.service.store import UploadRefused

router = APIRouter(prefix="/v1/teachers")
PUBLIC_FIELDS = ("id", "name", "format", "sha256", "size", "info", "created")


@router.post("", status_code=201)
def upload_teacher(request: Request, file: UploadFile = File(...), card: UploadFile | None = File(None),
                   name: str | None = Form(None)):
    try:
        return request.app.state.store.import_teacher(file.file, card.file if card is not None else None, name, file.filename)
    except UploadRefused as e:
        raise HTTPException(400, str(e)) from None


@router.get("")
def list_teachers(request: Request):
    return [{k: t[k] for k in PUBLIC_FIELDS} for t in request.app.state.store.teachers()]
