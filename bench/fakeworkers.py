"""One aiohttp server standing in for many GPU workers: ``/w/<id>/sessions`` accepts every dispatch at once."""

from __future__ import annotations

import argparse

from aiohttp import web


async def create(request: web.Request) -> web.Response:
    body = await request.json()
    return web.json_response({"session_id": body["session_id"]}, status=201)


async def delete(request: web.Request) -> web.Response:
    return web.Response(status=204)


async def health(request: web.Request) -> web.Response:
    return web.json_response({"ok": True})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    args = ap.parse_args()
    app = web.Application()
    app.router.add_post("/w/{wid}/sessions", create)
    app.router.add_delete("/w/{wid}/sessions/{sid}", delete)
    app.router.add_get("/health", health)
    web.run_app(app, host="127.0.0.1", port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
