"""The server's futures: what ``retrieve_future`` long-polls, and each training run's
``seq_id`` queue.

A reply is ready bytes: ``(media type, body)``, JSON or protobuf, encoded once when its
work ends. A failure carries Tinker's error category: ``user`` for a request that cannot
succeed as sent (ValueError, FileNotFoundError, ...), ``server`` for anything else.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import json
import time
from typing import Awaitable, Callable

Reply = tuple[str, bytes]
JSON = "application/json"
_USER_ERRORS = (ValueError, TypeError, KeyError, FileNotFoundError, FileExistsError, NotADirectoryError,
                PermissionError)
_KEEP_RETRIEVED_S = 300.0  # a retried retrieve_future still finds a result this long


class RequestFailed(Exception):
    """A request's failure as the client sees it: ``message`` and ``category``."""

    def __init__(self, message: str, category: str):
        super().__init__(message)
        self.category = category


def json_reply(value: dict) -> Reply:
    return JSON, json.dumps(value).encode()


def failure(error: BaseException) -> RequestFailed:
    if isinstance(error, RequestFailed):
        return error
    category = "user" if isinstance(error, _USER_ERRORS) else "server"
    return RequestFailed(f"{type(error).__name__}: {error}", category)


class Futures:
    """Request ids -> concurrent futures of a :data:`Reply`, completed on the event loop or
    on any thread; forgotten a while after their result was first read."""

    def __init__(self):
        self._items: dict[str, concurrent.futures.Future] = {}
        self._read_at: dict[str, float] = {}
        self._ids = itertools.count(1)
        self._stopped: str | None = None

    def new(self) -> tuple[str, concurrent.futures.Future]:
        self._forget_old()
        request_id = f"req-{next(self._ids)}"
        fut: concurrent.futures.Future = concurrent.futures.Future()
        if self._stopped is not None:
            fut.set_exception(RequestFailed(self._stopped, "server"))
        self._items[request_id] = fut
        return request_id, fut

    def run(self, work: Callable[[], Awaitable[Reply]]) -> str:
        """A request id at once; ``work()`` runs as a task on the running loop and its reply
        (or failure) completes the future."""
        request_id, fut = self.new()
        if not fut.done():
            asyncio.get_running_loop().create_task(settle(fut, work))
        return request_id

    def get(self, request_id: str) -> concurrent.futures.Future | None:
        fut = self._items.get(request_id) if isinstance(request_id, str) else None
        if fut is not None and fut.done():
            self._read_at.setdefault(request_id, time.monotonic())
        return fut

    def stop(self, message: str) -> None:
        """Fail every pending future and every later one with ``message`` (shutdown)."""
        self._stopped = message
        for fut in self._items.values():
            if not fut.done():
                fut.set_exception(RequestFailed(message, "server"))

    def _forget_old(self) -> None:
        now = time.monotonic()
        old = [k for k, t in self._read_at.items() if now - t > _KEEP_RETRIEVED_S]
        for k in old:
            del self._read_at[k], self._items[k]


async def settle(fut: concurrent.futures.Future, work: Callable[[], Awaitable[Reply]]) -> None:
    try:
        reply = await work()
    except BaseException as e:  # noqa: BLE001 - the request's failure, for its client
        if not fut.done():
            fut.set_exception(failure(e))
        if not isinstance(e, Exception):
            raise
        return
    if not fut.done():
        fut.set_result(reply)


class SeqQueue:
    """Runs one training run's requests one at a time in ``seq_id`` order, whatever order
    they arrive in (the SDK posts a forward_backward's later chunks before chunk 0, and
    waits for their request ids before posting the next call). Each request's work starts
    when the previous one has ended, so at most one call of the run is inside the engine and
    a stop leaves nothing queued there."""

    def __init__(self, first_seq_id: int = 1):
        self.next_seq_id = first_seq_id
        self._waiting: dict[int, tuple[concurrent.futures.Future, Callable[[], Awaitable[Reply]]]] = {}
        self._busy = False
        self.closed: str | None = None

    def submit(self, seq_id: int, fut: concurrent.futures.Future, work: Callable[[], Awaitable[Reply]]) -> None:
        if fut.done():
            return
        if self.closed is not None:
            fut.set_exception(RequestFailed(self.closed, "server"))
            return
        if isinstance(seq_id, bool) or not isinstance(seq_id, int) or seq_id < self.next_seq_id or seq_id in self._waiting:
            fut.set_exception(RequestFailed(f"seq_id {seq_id!r} is not an int of this training client's queue "
                                            f"(its next seq_id is {self.next_seq_id})", "user"))
            return
        self._waiting[seq_id] = (fut, work)
        self._pump()

    def close(self, message: str) -> None:
        self.closed = message
        for fut, _ in self._waiting.values():
            if not fut.done():
                fut.set_exception(RequestFailed(message, "server"))
        self._waiting.clear()

    def _pump(self) -> None:
        if self._busy or self.closed is not None or self.next_seq_id not in self._waiting:
            return
        fut, work = self._waiting.pop(self.next_seq_id)
        self.next_seq_id += 1
        self._busy = True
        asyncio.get_running_loop().create_task(self._run(fut, work))

    async def _run(self, fut, work) -> None:
        try:
            if fut.done():  # failed meanwhile (shutdown)
                return
            await settle(fut, work)
        finally:
            self._busy = False
            self._pump()
