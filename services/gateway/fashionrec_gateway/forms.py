"""Multipart fields that take exactly one part."""

from __future__ import annotations

from typing import Any

from fashionrec_shared.problems import ProblemError
from fastapi import Depends, Request


def single_parts(*names: str) -> Any:
    """A route dependency: 422 when one of these fields comes in more than one part. FastAPI
    would silently keep one of them; which file the client meant is a guess not worth making."""

    async def check(request: Request) -> None:
        form = await request.form()  # parsed already for the route's fields (cached)
        for name in names:
            count = len(form.getlist(name))
            if count > 1:
                raise ProblemError(
                    422,
                    "Unprocessable Content",
                    f"{count} `{name}` parts in one request; send exactly one",
                )

    return Depends(check)
