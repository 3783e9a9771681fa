"""The admin endpoints of the HTTP API (`eep.serving.http`): `POST /admin/ranks/{rank}/rejoin`
(start a replacement for a failed rank) and `POST /admin/ranks/{rank}/drain` (take an active
rank out gracefully at the next step boundary).

They want the admin key and only it (`Auth.admin`: 403 for everyone when the server has none).
The change runs on the engine loop's thread through the executor's membership side
(`executor.elastic`); one the instance's state refuses now is 409, as is any change to an
instance without one (a single process).
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, Path

from eep.errors import ConfigError
from eep.serving.deps import ApiError, Auth, Serving
from eep.serving.schemas import AdminReply, errors

logger = logging.getLogger(__name__)


def router(serving: Serving, auth: Auth) -> APIRouter:
    """The routes of `/admin/ranks/{rank}/...` for `serving`."""
    last = serving.num_ranks - 1
    rank_param = Path(ge=0, le=last, description=f"a rank of this instance (0..{last})")
    responses: dict[int | str, dict[str, Any]] = {200: {"model": AdminReply}, **errors(*auth.admin_codes)}
    r = APIRouter(dependencies=auth.admin)

    @r.post("/admin/ranks/{rank}/rejoin", response_model=None, responses=responses,
            summary="Start a replacement for a failed rank (switched in once it has loaded)")
    async def rejoin(rank: int = rank_param) -> dict[str, Any]:
        return await _change(serving, "rejoin", rank)

    @r.post("/admin/ranks/{rank}/drain", response_model=None, responses=responses,
            summary="Take an active rank out gracefully at the next step boundary")
    async def drain(rank: int = rank_param) -> dict[str, Any]:
        return await _change(serving, "drain", rank)

    return r


async def _change(serving: Serving, action: str, rank: int) -> dict[str, Any]:
    """`action` ("rejoin" or "drain") of `rank`, on the loop thread; the reply of the route."""
    def run(e: Any) -> None:
        elastic = e.executor.elastic
        if elastic is None:
            raise ApiError(409, f"{action} needs an expert-parallel instance (--ep-size > 1)",
                           code="membership_conflict")
        try:
            (elastic.rejoin if action == "rejoin" else elastic.drain)(rank)
        except ConfigError as err:  # the state refuses it now (not failed, the last rank, ...)
            raise ApiError(409, str(err), code="membership_conflict") from None

    await serving.on_loop(run)
    return {"ok": True, "rank": rank}
