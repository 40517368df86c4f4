"""Every error the server answers, in OpenAI's shape: {"error": {"message", "type", "param", "code"}}.

Validation errors are 400s (not FastAPI's 422 `{"detail": ...}`) whose message names the field; the
input is never echoed back, so NaN, Infinity or lone surrogates in a body cannot break the answer.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from kvshelf.server.gate import error_body

log = logging.getLogger(__name__)


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind
        self.param, self.code, self.headers = param, code, headers

    def body(self) -> dict:
        return error_body(self.message, self.kind, self.code, self.param)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


_UNION_MEMBERS = {"str", "int", "float", "bool", "dict", "list", "none", "function-after", "function-before"}


def _param(loc) -> str | None:
    # Union members add their type to the path (prompt.str, prompt.list[int]): leave them out.
    parts = [str(p) for p in loc if p != "body" and not (isinstance(p, str) and ("[" in p or p in _UNION_MEMBERS))]
    out = ""
    for p in parts:
        out += f"[{p}]" if p.isdigit() else (f".{p}" if out else p)
    return out or None


def _describe(e: dict) -> tuple[str | None, str]:
    """(param, message) for one pydantic error, without its input."""
    param = _param(e.get("loc", ()))
    kind = e.get("type", "")
    if kind == "json_invalid":
        return None, "the request body is not valid JSON"
    if kind == "extra_forbidden":
        return param, f"{param}: unsupported field (this server does not implement it)"
    if kind == "missing":
        return param, f"{param}: required field missing"
    msg = str(e.get("msg", "invalid value")).removeprefix("Value error, ")
    return param, f"{param}: {msg}" if param else msg


def install(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, err: APIError):
        return err.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, err: RequestValidationError):
        described = [_describe(e) for e in err.errors()]
        seen: list[str] = []
        for _, message in described:
            if message not in seen:
                seen.append(message)
        param = described[0][0] if described else None
        return JSONResponse(error_body("; ".join(seen[:5]), "invalid_request_error", None, param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, err: StarletteHTTPException):
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(err.detail), kind), status_code=err.status_code, headers=err.headers)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, err: Exception):
        log.error("unexpected server error: %s", err, exc_info=err)
        return JSONResponse(error_body("internal server error (see the server log)", "server_error"), status_code=500)
