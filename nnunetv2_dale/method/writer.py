"""Memory updates off the training loop's critical path (issue 15): one background thread applies
the submitted updates in submission order, so per case too; at most ``depth`` wait, and a
submission beyond that blocks (bounded memory, back pressure). ``flush`` waits for every submitted
update; the memory flushes before anything that must see all of them (epoch statistics, snapshots,
restore, reset, whole-case reads). A failure in the thread is raised again in the training
process at the next ``submit`` or ``flush``: an update is never silently lost.

Staleness: a read between flushes may miss the updates still waiting, at most ``depth`` batches,
so a voxel's ensemble can lack its last visit or two of ~5+ (docs/method.md).
"""
from __future__ import annotations

import queue
import threading
from typing import Callable


class BackgroundWriter:
    """A FIFO of callables run by one daemon thread."""

    def __init__(self, depth: int = 2, name: str = "dale-memory-writer") -> None:
        self._queue: queue.Queue[Callable[[], None] | None] = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            try:
                if job is None:
                    return
                if self._error is None:  # after a failure, later updates are dropped (and the failure raised)
                    job()
            except BaseException as e:  # noqa: BLE001 - handed to the training process
                self._error = e
            finally:
                self._queue.task_done()

    def _raise_pending_error(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise RuntimeError(f"a DALE memory update failed in the background writer: {error!r}") from error

    def submit(self, job: Callable[[], None]) -> None:
        self._raise_pending_error()
        if not self._thread.is_alive():
            raise RuntimeError("the DALE memory's background writer has stopped; no update can be applied")
        self._queue.put(job)

    def flush(self) -> None:
        """Wait until every submitted job has run; raise the failure of any of them."""
        self._queue.join()
        self._raise_pending_error()

    def close(self) -> None:
        """Flush, then stop the thread."""
        if self._thread.is_alive():
            self._queue.join()
            self._queue.put(None)
            self._thread.join()
        self._raise_pending_error()
