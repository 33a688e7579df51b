"""The SRE dashboard at /dashboard: a static page that calls the admin JSON API with the token the SRE types in.

The shell and its assets need no auth (they hold no data); every figure comes from the Bearer-protected API.
Assets are vendored under hub/static so the page works on machines without internet.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, RedirectResponse

from hub.api.deps import HubDep, require_admin

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
_MEDIA_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css", ".json": "application/json",
                ".svg": "image/svg+xml"}

router = APIRouter(tags=["dashboard"], include_in_schema=False)


@router.get("/dashboard")
async def dashboard() -> FileResponse:
    return FileResponse(STATIC_DIR / "dashboard.html", media_type="text/html",
                        headers={"Cache-Control": "no-cache", "X-Frame-Options": "DENY",
                                 "Content-Security-Policy": "default-src 'self'; style-src 'self' 'unsafe-inline'; "
                                                            "img-src 'self' data:; frame-ancestors 'none'"})


@router.get("/dashboard/")
async def dashboard_slash() -> RedirectResponse:
    return RedirectResponse("/dashboard")


@router.get("/dashboard/static/{name:path}")
async def static_file(name: Annotated[str, PathParam(max_length=128,
                                                     pattern=r"^[A-Za-z0-9_-]+(/[A-Za-z0-9_.-]+)*\.[a-z]+$")],
                      ) -> FileResponse:
    """Files under hub/static only. The pattern lets a ``..`` segment through after the first (and the server decodes
    ``%2e%2e`` after routing): the resolved-path check is what keeps it out."""
    path = (STATIC_DIR / name).resolve()
    if not path.is_relative_to(STATIC_DIR) or not path.is_file() or path.suffix not in _MEDIA_TYPES:
        raise HTTPException(404, f"no dashboard asset {name}")
    return FileResponse(path, media_type=_MEDIA_TYPES[path.suffix], headers={"Cache-Control": "max-age=300"})


@router.get("/dashboard/api/livekit", dependencies=[Depends(require_admin)])
async def livekit_regions(hub: HubDep) -> dict[str, list[dict[str, object]]]:
    """Where the LiveKit deployments are, for the map: names, URLs and coordinates, never their keys."""
    return {"regions": [{"region": d.region, "url": d.url, "lat": d.lat, "lon": d.lon}
                        for d in hub.settings.livekit_deployments]}
