"""ASGI middleware that refuses request bodies over a size limit (413), by header and by counting bytes.

Example:
    >>> app.add_middleware(LimitBody, max_upload=200 * MB, max_json=256 * 1024)   # doctest: +SKIP
"""
from __future__ import annotations

import json

MB = 1024 * 1024
UPLOAD_PATH = "/v1/teachers"  # the one endpoint that takes files: it gets the upload limit, the rest the JSON limit


class LimitBody:
    """ASGI middleware: refuse request bodies over the limit (413), by header and by counting bytes.

    Past the limit the application sees the client disconnect, and whatever it answers is replaced
    by the 413, so an oversized upload is never written out whole.
    """

    def __init__(self, app, max_upload: int, max_json: int):
        self.app, self.max_upload, self.max_json = app, max_upload, max_json

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.max_upload if scope["path"].rstrip("/") == UPLOAD_PATH else self.max_json
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await _too_large(send, limit)
        seen, exceeded, answered = 0, False, False

        async def counted():
            nonlocal seen, exceeded
            if exceeded:
                return {"type": "http.disconnect"}
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > limit:
                exceeded = True
                return {"type": "http.disconnect"}
            return message

        async def guarded_send(message):
            nonlocal answered
            if exceeded:
                if not answered:
                    answered = True
                    await _too_large(send, limit)
                return
            answered = answered or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, guarded_send)
        except Exception:
            if not exceeded:
                raise
            if not answered:
                await _too_large(send, limit)


async def _too_large(send, limit: int):
    body = json.dumps({"detail": f"request body too large (limit {limit // MB} MiB)"}).encode()
    await send({"type": "http.response.start", "status": 413, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})
