"""Request handles returned by ``Runtime.stream`` / ``Runtime.astream``: iterate a submitted request's chunks.

A handle owns its request: closing it, leaving an ``async for`` through cancellation, or simply dropping it
(garbage collection, through ``weakref.finalize``) before the last chunk aborts the request, so a stream that
nobody reads never keeps generating. Handles hold the engine only weakly: an open stream never keeps a
runtime's device memory alive after the runtime is closed or collected.

The async handle never parks a thread on the request's queue: the engine's ``put`` wakes the event loop through
``call_soon_threadsafe``, so cancelling a task, closing the runtime or ending ``asyncio.run`` leaves no executor
thread behind.
"""
from __future__ import annotations

import asyncio
import queue
import weakref

from .request import StreamChunk


def _abort(engine_ref: "weakref.ref", request_id: str) -> None:
    engine = engine_ref()
    if engine is not None:
        engine.abort(request_id)


class _Handle:
    def __init__(self, engine, req):
        self._req = req
        self._done = False
        self._finalizer = weakref.finalize(self, _abort, weakref.ref(engine), req.request_id)

    @property
    def request_id(self) -> str:
        return self._req.request_id

    @property
    def request(self):
        """The engine-side request (codes, finish reason) this stream reads."""
        return self._req

    def _take(self, chunk: StreamChunk) -> StreamChunk:
        """Mark the stream done on its last chunk; raise the request's error if the chunk carries one."""
        if chunk.finished or chunk.error is not None:
            self._done = True
            self._finalizer.detach()   # finished: nothing to abort (and the id may be reused afterwards)
        if chunk.error is not None:
            raise chunk.error
        return chunk

    def close(self) -> None:
        """Abort the request if it has not finished; idempotent."""
        self._done = True
        self._finalizer()  # runs the abort at most once


class RequestStream(_Handle):
    """Iterator of ``StreamChunk``s of one request (see ``Runtime.stream``)."""

    def __iter__(self) -> "RequestStream":
        return self

    def __next__(self) -> StreamChunk:
        if self._done:
            raise StopIteration
        try:
            chunk = self._req.out.get()
        except BaseException:   # e.g. KeyboardInterrupt while waiting: the caller has left the stream
            self.close()
            raise
        return self._take(chunk)

    def __enter__(self) -> "RequestStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncRequestStream(_Handle):
    """Async iterator of ``StreamChunk``s of one request (see ``Runtime.astream``)."""

    def __init__(self, engine, req):
        super().__init__(engine, req)
        self._event: asyncio.Event | None = None

    def __aiter__(self) -> "AsyncRequestStream":
        return self

    def _arm(self) -> asyncio.Event:
        loop = asyncio.get_running_loop()
        event = asyncio.Event()

        def wake() -> None:  # called on the engine thread after each put
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # the loop is closed: nobody is waiting any more
                pass

        self._req.out.waker = wake
        self._event = event
        return event

    async def __anext__(self) -> StreamChunk:
        if self._done:
            raise StopAsyncIteration
        event = self._event or self._arm()
        try:
            while True:
                event.clear()   # before looking, so a put after the look always wakes the wait below
                try:
                    chunk = self._req.out.get_nowait()
                    break
                except queue.Empty:
                    await event.wait()
        except BaseException:   # the consuming task was cancelled: cancel the request
            self.close()
            raise
        return self._take(chunk)

    async def aclose(self) -> None:
        self.close()

    async def __aenter__(self) -> "AsyncRequestStream":
        return self

    async def __aexit__(self, *exc) -> None:
        self.close()
