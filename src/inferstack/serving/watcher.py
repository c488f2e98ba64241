"""Poll mode: watch the model repository and load, reload or unload what changed.

Every ``interval`` seconds the watcher takes a snapshot of each model
directory (``ModelRepository.snapshot``: file names, sizes and mtimes, and
the content of ``config.pbtxt``) off the event loop, and compares it with the
previous scan:

* a new model directory is loaded;
* a changed one is loaded again: the manager loads the changed versions beside
  the serving ones and switches atomically, so requests never fail, and keeps
  the versions whose files and config did not change;
* a removed one is unloaded (after its in-flight requests finish).

A model whose snapshot did not change is never touched. A load that fails is
not retried until the model changes again; what served before keeps serving
and the repository index shows why. There is no loop other than the sleep
between scans: a scan starts ``interval`` seconds after the previous one
(and the loads it triggered) finished.

A change is acted on at the first scan that sees it, so a model copied into
the repository file by file can be caught half-written; its load then fails,
and the next scan (which sees the rest) loads it. Copy into a hidden
directory (``.tmp-model``, which is ignored) and rename it into place to
avoid the failed attempt.
"""

from __future__ import annotations

import asyncio
import logging

from inferstack.core.errors import InferenceServerError
from inferstack.repository.repository import ModelRepository, ModelSnapshot
from inferstack.serving.manager import ModelManager

log = logging.getLogger("inferstack.watcher")


def scan(repository: ModelRepository) -> dict[str, ModelSnapshot]:
    """A snapshot of every model directory (blocking: run it off the event loop)."""
    return {name: repository.snapshot(name) for name in repository.model_names()}


class RepositoryWatcher:
    """Reconciles the manager with the repository every ``interval`` seconds."""

    def __init__(self, manager: ModelManager, interval: float) -> None:
        self.manager = manager
        self.interval = interval
        self._seen: dict[str, ModelSnapshot] | None = None
        #: Scans completed.
        self.scans = 0
        self._task: asyncio.Task[None] | None = None
        self._busy = False
        self._stopping = False

    async def baseline(self) -> None:
        """Remember the repository as the startup load is about to read it, so a
        change made while models load is still seen by the first scan."""
        self._seen = await asyncio.to_thread(scan, self.manager.repository)

    def start(self, after: asyncio.Future | None = None) -> None:
        """Watch in a background task, from when ``after`` (the startup load) is done."""
        self._task = asyncio.get_running_loop().create_task(self._run(after), name="repository-watcher")

    async def stop(self, timeout: float) -> None:
        """Stop watching. A scan's loads under way may finish (up to ``timeout``
        seconds), so no model is left half switched; a sleeping watcher stops at once."""
        task = self._task
        if task is None:
            return
        self._stopping = True
        if not self._busy:
            task.cancel()
        try:
            await asyncio.wait_for(task, timeout)
        except (asyncio.CancelledError, TimeoutError):
            pass

    async def _run(self, after: asyncio.Future | None) -> None:
        if after is not None:
            await asyncio.wait({after})  # its outcome is the startup load's business
        if self._seen is None:
            await self.baseline()
        log.info("watching %s for changes every %gs", self.manager.repository.root, self.interval)
        while not self._stopping:
            await asyncio.sleep(self.interval)
            self._busy = True
            try:
                await self.poll_once()
            except Exception:  # a failed scan must never stop the watching
                log.exception("repository poll failed; trying again in %gs", self.interval)
            finally:
                self._busy = False

    async def poll_once(self) -> None:
        """One scan of the repository and the loads and unloads it calls for."""
        current = await asyncio.to_thread(scan, self.manager.repository)
        previous = self._seen or {}
        added = sorted(current.keys() - previous.keys())
        removed = sorted(previous.keys() - current.keys())
        changed = sorted(name for name in current.keys() & previous.keys() if current[name] != previous[name])
        self._seen = current
        self.scans += 1
        if not (added or removed or changed):
            return
        log.info("repository changed: added %s, changed %s, removed %s",
                 added or "none", changed or "none", removed or "none")
        await asyncio.gather(
            *(self._load(name) for name in added + changed),
            *(self._unload(name) for name in removed),
        )

    async def _load(self, name: str) -> None:
        try:
            await self.manager.load(name)
        except InferenceServerError as exc:
            # The manager has logged the reason and kept what served before.
            log.debug("poll: load of %s failed: %s", name, exc)

    async def _unload(self, name: str) -> None:
        if not self.manager.known(name):
            return
        try:
            await self.manager.unload(name)
        except InferenceServerError as exc:
            log.warning("poll: unload of %s failed: %s", name, exc)
