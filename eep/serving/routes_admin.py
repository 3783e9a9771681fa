"""The admin endpoints of the HTTP API (`eep.serving.http`): `POST /admin/ranks/{rank}/rejoin`
(start a replacement for a failed rank), `POST /admin/ranks/{rank}/drain` (take an active
rank out gracefully at the next step boundary), `POST /admin/scale` (move to N active ranks
within `--ep-max-size`; 202 with the operation, whose `operation_id` a retry may send again)
and `GET /admin/scale/{operation_id}` (its state).

They want the admin key and only it (`Auth.admin`: 403 for everyone when the server has none).
The change runs on the engine loop's thread through the executor's membership side
(`executor.elastic`); one the instance's state refuses now is 409, as is any change to an
instance without one (a single process).
"""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, Path, Response

from eep.errors import ConfigError
from eep.serving.deps import ApiError, Auth, Serving
from eep.serving.schemas import AdminReply, ScaleOperation, ScaleRequest, errors

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

    scale_responses: dict[int | str, dict[str, Any]] = {202: {"model": ScaleOperation},
                                                        **errors(400, 409, *auth.admin_codes)}

    @r.post("/admin/scale", status_code=202, response_model=None, responses=scale_responses,
            summary="Move the instance to ep_size active ranks while it serves (within --ep-max-size)")
    async def scale(body: ScaleRequest, response: Response) -> dict[str, Any]:
        def run(e: Any) -> dict[str, Any]:
            try:
                return _elastic(e, "scaling").scale(body.ep_size, body.operation_id)
            except ConfigError as err:  # out of range, an operation in progress, an id reused for another size
                raise ApiError(409, str(err), code="membership_conflict") from None

        op = await serving.on_loop(run)
        response.headers["Location"] = f"/admin/scale/{quote(str(op['operation_id']), safe='')}"
        return op

    @r.get("/admin/scale/{operation_id:path}", response_model=None,  # (an id may hold a "/")
           responses={200: {"model": ScaleOperation}, **errors(404, *auth.admin_codes)},
           summary="The state of a scale operation")
    async def scale_status(operation_id: str = Path(min_length=1, max_length=128)) -> dict[str, Any]:
        def run(e: Any) -> dict[str, Any]:
            try:
                return _elastic(e, "scaling").scale_status(operation_id)
            except KeyError:
                raise ApiError(404, f"no scale operation {operation_id!r} (this instance keeps its last 100)",
                               code="operation_not_found") from None

        return await serving.on_loop(run)

    return r


def _elastic(engine: Any, action: str) -> Any:
    elastic = engine.executor.elastic
    if elastic is None:
        raise ApiError(409, f"{action} needs an expert-parallel instance (--ep-size > 1)", code="membership_conflict")
    return elastic


async def _change(serving: Serving, action: str, rank: int) -> dict[str, Any]:
    """`action` ("rejoin" or "drain") of `rank`, on the loop thread; the reply of the route."""
    def run(e: Any) -> None:
        elastic = _elastic(e, action)
        try:
            (elastic.rejoin if action == "rejoin" else elastic.drain)(rank)
        except ConfigError as err:  # the state refuses it now (not failed, the last rank, ...)
            raise ApiError(409, str(err), code="membership_conflict") from None

    await serving.on_loop(run)
    return {"ok": True, "rank": rank}
