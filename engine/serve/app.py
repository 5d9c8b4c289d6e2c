"""The HTTP face of :class:`Service`: Starlette routes under ``/api/v1/``, the API-key check,
and uvicorn with a clean stop on SIGINT/SIGTERM.

A mutating call answers ``{"request_id": ...}`` at once; the client then long-polls
``retrieve_future`` (``{"type": "try_again"}`` after ``POLL_S`` while pending; a failure is
``{"error", "category"}``; an unknown id is 410). Direct calls (get_info, sessions, sampling
sessions) answer 400 with ``{"detail"}`` for a bad request and 404 for an unknown id.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import signal
import sys
from pathlib import Path

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .futures import failure
from .service import Service

POLL_S = 30.0  # the SDK waits 45 s for a retrieve_future answer
CLIENT_CONFIG = {"pjwt_auth_enabled": False, "credential_default_source": "api_key", "parallel_fwdbwd_chunks": True,
                 "proto_compress_fwdbwd": False, "sample_use_retrieve_futures": False,
                 "custom_loss_server_side": False, "sample_join_sampling_session": False}


def _error(status: int, detail: str) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status)


async def _json(request: Request) -> dict:
    try:
        body = json.loads(await request.body() or b"{}")
    except ValueError as e:
        raise ValueError(f"the request body is not JSON ({e})") from None
    if not isinstance(body, dict):
        raise ValueError("the request body must be a JSON object")
    return body


def build_app(service: Service, *, api_key: str | None = None) -> Starlette:
    """The ASGI app over ``service``; with ``api_key``, a request whose ``X-API-Key`` (or
    ``Authorization: Bearer``) is not that key gets 401."""

    def direct(fn):
        """A route answering ``fn(json body, request)`` (a dict or a Response, or a coroutine of
        one); a body that is not a JSON object or a ValueError -> 400, a KeyError -> 404."""
        async def endpoint(request: Request) -> Response:
            try:
                result = fn(await _json(request), request)
                if asyncio.iscoroutine(result):
                    result = await result
            except ValueError as e:
                return _error(400, str(e))
            except KeyError as e:
                return _error(404, f"unknown id {e}")
            return result if isinstance(result, Response) else JSONResponse(result)
        return endpoint

    def request_id(submit):
        return direct(lambda body, _: {"request_id": submit(body), "model_id": body.get("model_id")})

    async def forward_backward(request: Request, forward_only: bool = False) -> Response:
        rid = service.forward_backward(await request.body(), request.headers.get("content-type", ""),
                                       forward_only=forward_only)
        return JSONResponse({"request_id": rid})

    async def retrieve_future(body: dict, _) -> Response:
        fut = service.futures.get(body.get("request_id"))
        if fut is None:
            return _error(410, f"request_id {body.get('request_id')!r} is unknown to this server (lost or expired)")
        if not fut.done():
            await asyncio.wait([asyncio.wrap_future(fut)], timeout=POLL_S)
        if not fut.done():
            return JSONResponse({"type": "try_again", "request_id": body["request_id"], "queue_state": "active"})
        if fut.exception() is not None:
            error = failure(fut.exception())
            return JSONResponse({"error": str(error), "category": error.category})
        media_type, content = fut.result()
        return Response(content, media_type=media_type)

    async def retrieve_futures(body: dict, _) -> Response:
        try:
            target = body.get("target") or {}
            timeout = min(float(body.get("timeout") or POLL_S), POLL_S)
            cursor = int(body.get("prev_cursor") or 0)
        except (AttributeError, ValueError, TypeError) as e:
            raise ValueError(f"retrieve_futures: {e}") from None
        done, pending = service.completions(target.get("sampling_session_id"))
        if len(done) <= cursor and pending:
            await asyncio.wait([asyncio.wrap_future(f) for f in pending], timeout=timeout,
                               return_when=asyncio.FIRST_COMPLETED)
            done, _ = service.completions(target.get("sampling_session_id"))
        return JSONResponse({"completions": [{"state": state, "request_id": rid} for rid, state in done[cursor:]],
                             "cursor": max(cursor, len(done))})

    def heartbeat(body: dict, _) -> Response:
        finished = service.sessions.get(body.get("session_id"))
        if finished is None:
            return _error(404, f"unknown session {body.get('session_id')!r}")
        if finished:
            return _error(410, f"session {body['session_id']!r} has finished")
        return JSONResponse({"type": "session_heartbeat"})

    async def finish(request: Request) -> Response:
        session_id = request.path_params["session_id"]
        if session_id not in service.sessions:
            return _error(404, f"unknown session {session_id!r}")
        await service.finish_session(session_id)
        return JSONResponse({})

    async def get_sampler(request: Request) -> Response:
        try:
            return JSONResponse(service.get_sampler(request.path_params["sampler_id"]))
        except KeyError:
            return _error(404, f"unknown sampler {request.path_params['sampler_id']!r}")

    async def unsupported(request: Request) -> Response:
        return _error(404, f"{request.method} {request.url.path} is not supported by this server (python -m engine "
                           "serve: training, sampling and checkpoints; no REST client, custom-loss upload, weight "
                           "copies or external saves)")

    capabilities = {"supported_models": [{"model_name": b.name, "max_context_length": b.context, "trainable": True,
                                          "sampleable": True} for b in service.bases.values()]}
    v1 = "/api/v1"
    routes = [
        Route(f"{v1}/healthz", lambda _: JSONResponse({"status": "ok"}), methods=["GET"]),
        Route(f"{v1}/get_server_capabilities", lambda _: JSONResponse(capabilities), methods=["GET"]),
        Route(f"{v1}/client/config", direct(lambda b, _: CLIENT_CONFIG), methods=["POST"]),
        Route(f"{v1}/client/dynamic_config", direct(lambda b, _: {}), methods=["POST"]),
        Route(f"{v1}/telemetry", direct(lambda b, _: {"status": "accepted"}), methods=["POST"]),
        Route(f"{v1}/cancel_future", direct(lambda b, _: {}), methods=["POST"]),
        Route(f"{v1}/create_session", direct(lambda b, _: {"type": "create_session",
                                                           "session_id": service.create_session()}),
              methods=["POST"]),
        Route(f"{v1}/session_heartbeat", direct(heartbeat), methods=["POST"]),
        Route(f"{v1}/sessions/{{session_id}}/finish", finish, methods=["POST"]),
        Route(f"{v1}/create_model", request_id(service.create_model), methods=["POST"]),
        Route(f"{v1}/get_info", direct(lambda b, _: service.get_info(b.get("model_id"))), methods=["POST"]),
        Route(f"{v1}/forward_backward", forward_backward, methods=["POST"]),
        Route(f"{v1}/forward", lambda r: forward_backward(r, True), methods=["POST"]),
        Route(f"{v1}/optim_step", request_id(service.optim_step), methods=["POST"]),
        Route(f"{v1}/save_weights", request_id(service.save_weights), methods=["POST"]),
        Route(f"{v1}/load_weights", request_id(service.load_weights), methods=["POST"]),
        Route(f"{v1}/save_weights_for_sampler", request_id(service.save_weights_for_sampler), methods=["POST"]),
        Route(f"{v1}/create_sampling_session",
              direct(lambda b, _: {"type": "create_sampling_session",
                                   "sampling_session_id": service.create_sampling_session(b)}), methods=["POST"]),
        Route(f"{v1}/samplers/{{sampler_id}}", get_sampler, methods=["GET"]),
        Route(f"{v1}/asample", direct(lambda b, _: service.sample(b)), methods=["POST"]),
        Route(f"{v1}/retrieve_future", direct(retrieve_future), methods=["POST"]),
        Route(f"{v1}/retrieve_futures", direct(retrieve_futures), methods=["POST"]),
        Route(f"{v1}/{{rest:path}}", unsupported, methods=["GET", "POST", "PUT", "PATCH", "DELETE"]),
    ]
    app = Starlette(routes=routes)
    return app if api_key is None else _KeyCheck(app, api_key)


class _KeyCheck:
    """ASGI middleware: 401 unless the request carries the server's API key."""

    def __init__(self, app, api_key: str):
        self.app, self.key = app, api_key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            headers = dict(scope["headers"])
            given = headers.get(b"x-api-key") or headers.get(b"authorization", b"").removeprefix(b"Bearer ")
            if not hmac.compare_digest(given, self.key):
                await _error(401, "missing or wrong API key (send it as X-API-Key)")(scope, receive, send)
                return
        await self.app(scope, receive, send)


class _Server(uvicorn.Server):
    """uvicorn, announcing readiness on stdout and failing in-flight requests on a signal."""

    def __init__(self, config: uvicorn.Config, service: Service):
        super().__init__(config)
        self.service = service

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets=sockets)
        if self.started:
            host, port = self.servers[0].sockets[0].getsockname()[:2]
            host = f"[{host}]" if ":" in host else host
            print(f"serving on http://{host}:{port}", flush=True)

    @contextlib.contextmanager
    def capture_signals(self):
        """uvicorn's own re-raises the signal once it has stopped, which kills the process
        before the engines are closed; this one lets ``serve`` close them and return."""
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig: int, frame) -> None:
        self.service.stop(f"the server is shutting down ({signal.Signals(sig).name}); this request did not complete")
        super().handle_exit(sig, frame)


def serve(models: dict[str, Path], *, host: str = "127.0.0.1", port: int = 8000, checkpoint_dir: str | Path,
          api_key: str | None = None, max_batch_size: int = 8192, tp: int = 1) -> None:
    """Load ``models`` ({name: HF folder}) and serve them until SIGINT/SIGTERM; then every
    pending request fails with a clear error, each engine's current call ends, and the
    process exits (checkpoint writes are atomic: a save is whole or absent)."""
    service = Service(models, checkpoint_dir=checkpoint_dir, max_batch_size=max_batch_size, tp=tp)
    config = uvicorn.Config(build_app(service, api_key=api_key), host=host, port=port, log_level="warning",
                            access_log=False, timeout_graceful_shutdown=5, lifespan="off")
    try:
        _Server(config, service).run()
    finally:
        service.close()
    sys.stdout.flush()
