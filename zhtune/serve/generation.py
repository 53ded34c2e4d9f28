"""Running generations for the server: admission (a bounded queue), one worker thread per running
request, cancellation, and `stop` strings.

The engine does the batching: `Scheduler` hands up to `max_concurrency` requests to
`engine.stream_ids` at once, each from its own worker thread, so an engine that batches concurrent
calls (continuous batching) serves them together and one that serialises them (a lock) still answers
every one in turn. At most `max_queue_size` more wait for a slot; beyond that `admit` answers 503.

A request whose client went away, or whose reply hit a stop string, sets its cancel flag; its worker
closes the engine's stream generator at the next piece (which stops the engine's generation) and only
then frees the slot, so the bound counts generations that really run. Any exception from the engine
is handed to the request as `GenerationFailed`; the slot is freed all the same.
"""

import asyncio
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

from zhtune.infer.base import Delta, Engine, GenerationSettings
from zhtune.log import logger
from zhtune.serve.protocol import APIError

_DONE = object()


class GenerationFailed(Exception):
    """The engine raised while generating; `__cause__` is its exception."""


class Ticket:
    """One admitted request: waiting, then running (holding a slot), then released exactly once."""

    def __init__(self, scheduler: "Scheduler"):
        self.scheduler = scheduler
        self.cancel = threading.Event()
        self.running = False  # holds a slot
        self.worker = False  # a worker thread generates for it (and releases it when done)
        self.released = False

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        self.scheduler.pending -= 1
        if self.running:
            self.scheduler.running -= 1
            self.scheduler.slots.release()

    def abandon(self) -> None:
        """The request is over on the HTTP side: stop its generation; free at once if none runs."""
        self.cancel.set()
        if not self.worker:
            self.release()


class Scheduler:
    def __init__(self, engine: Engine, max_concurrency: int, max_queue_size: int):
        self.engine = engine
        self.max_concurrency, self.max_queue_size = max_concurrency, max_queue_size
        self.slots = asyncio.Semaphore(max_concurrency)
        self.pending = 0  # admitted and not yet released: running + waiting
        self.running = 0
        self.executor = ThreadPoolExecutor(max_workers=max_concurrency, thread_name_prefix="zhtune-generate")

    @property
    def waiting(self) -> int:
        return self.pending - self.running

    def admit(self) -> Ticket:
        if self.pending >= self.max_concurrency + self.max_queue_size:
            raise APIError(503, f"the server is busy ({self.running} requests generating, {self.waiting} waiting, "
                           f"queue limit {self.max_queue_size}); retry shortly.", type="server_error",
                           code="server_overloaded")
        self.pending += 1
        return Ticket(self)

    async def generate(self, ticket: Ticket, prompt: list[int], settings: GenerationSettings,
                       stops: list[str]) -> AsyncIterator[Delta]:
        """The reply piece by piece, cut at the first stop string; raises GenerationFailed."""
        loop = asyncio.get_running_loop()
        deltas: asyncio.Queue = asyncio.Queue()
        cutter = StopCutter(stops)
        try:
            await self.slots.acquire()
            ticket.running = True
            self.running += 1
            if ticket.cancel.is_set():
                return
            future = loop.run_in_executor(self.executor, self._pump, loop, deltas, ticket.cancel, prompt, settings)
            ticket.worker = True
            future.add_done_callback(lambda _: ticket.release())
            while True:
                item = await deltas.get()
                if item is _DONE:
                    raise GenerationFailed("the engine's stream ended without a finish reason")
                if isinstance(item, BaseException):
                    raise GenerationFailed(f"{type(item).__name__}: {item}") from item
                text = cutter.feed(item.text)
                if cutter.stopped:
                    ticket.cancel.set()
                    n = len(self.engine.tokenizer.encode(cutter.text, add_special_tokens=False))
                    yield Delta(text, "stop", len(prompt), n)
                    return
                if item.finish_reason is not None:
                    yield Delta(text + cutter.flush(), item.finish_reason, item.prompt_tokens or len(prompt),
                                item.completion_tokens)
                    return
                if text:
                    yield Delta(text)
        finally:
            ticket.abandon()  # stops a generation still running; the worker frees the slot when it ends

    def _pump(self, loop, deltas: asyncio.Queue, cancel: threading.Event, prompt, settings) -> None:
        """Worker thread: the engine's stream into the request's queue, until done or cancelled."""
        def put(item):
            try:
                loop.call_soon_threadsafe(deltas.put_nowait, item)
            except RuntimeError:  # the event loop is gone (server shutting down)
                pass

        stream = None
        try:
            stream = self.engine.stream_ids(prompt, settings)
            for delta in stream:
                put(delta)
                if delta.finish_reason is not None or cancel.is_set():
                    break
            else:
                put(_DONE)
        except BaseException as e:  # noqa: BLE001 - any engine failure goes to its request
            logger.warning(f"generation failed: {type(e).__name__}: {e}")
            put(e)
        finally:
            if stream is not None and hasattr(stream, "close"):
                try:
                    stream.close()  # an engine's cleanup: stops its generation, frees its lock
                except Exception as e:  # noqa: BLE001
                    logger.warning(f"closing a generation failed: {type(e).__name__}: {e}")

    def shutdown(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


class StopCutter:
    """Releases streamed text, holding back just enough to cut it before the first stop string."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.text, self.sent, self.stopped = "", 0, False

    def feed(self, piece: str) -> str:
        if not self.stops:
            self.text += piece
            self.sent = len(self.text)
            return piece
        start = max(0, len(self.text) - self.hold)
        self.text += piece
        found = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        if found:
            self.stopped = True
            self.text = self.text[:min(found)]
        end = len(self.text) if self.stopped else max(self.sent, len(self.text) - self.hold)
        out, self.sent = self.text[self.sent:end], end
        return out

    def flush(self) -> str:
        out, self.sent = self.text[self.sent:], len(self.text)
        return out

