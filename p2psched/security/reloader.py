"""The trio adapter that keeps the tenant registry current: SIGHUP and file changes.

Public interface: start it in the agent's nursery when ``--tenants`` is given::

    await nursery.start(watch_registry, holder, on_reload)

``on_reload(reload)`` is called for every reload attempt: ``reload.reloaded`` (log at
info) or ``reload.error`` (log at error; the old registry stays active).

SIGHUP: trio delivers a signal to one receiver only, so if the agent already handles
SIGHUP itself (``Agent.reload``), start the watcher with ``handle_sighup=False`` and call
``on_reload(holder.reload())`` from the agent's handler. Signals reach only the main
thread; elsewhere the watcher polls the file only.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable

import trio

from p2psched.security.tenants import RegistryHolder, Reload

#: 2 s: an operator who edits the file sees it applied before they can switch windows,
#: and a stat() every 2 s costs nothing (Consul's config watch is similar).
POLL_INTERVAL_S = 2.0


async def watch_registry(
    holder: RegistryHolder, on_reload: Callable[[Reload], None], *, poll_interval: float = POLL_INTERVAL_S,
    handle_sighup: bool = True, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    async with trio.open_nursery() as nursery:
        if handle_sighup and threading.current_thread() is threading.main_thread():
            with trio.open_signal_receiver(signal.SIGHUP) as signals:
                nursery.start_soon(_poll, holder, on_reload, poll_interval)
                task_status.started()
                async for _ in signals:
                    on_reload(holder.reload())
        else:
            task_status.started()
            await _poll(holder, on_reload, poll_interval)


async def _poll(holder: RegistryHolder, on_reload: Callable[[Reload], None], interval: float) -> None:
    while True:
        await trio.sleep(interval)
        result = holder.reload_if_changed()
        if result.reloaded or result.error:
            on_reload(result)
