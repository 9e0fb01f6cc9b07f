"""One epoll set for a proxy's connection sockets, watched by the event loop as a single fd.

The event loop's own add_reader/remove_reader make and drop a libuv poll handle every time, and
libuv checks each new fd with an epoll_ctl ADD and DEL, sets it non-blocking again, and removes
it three times when it is dropped: about seven syscalls per socket per connection (strace -c on
a proxy under connection-per-request load: 12 epoll_ctl per connection, half of them failing
with ENOENT). Here a socket costs one epoll_ctl ADD when first watched, a MOD when its interest
changes, a DEL when nothing is watched any more, and nothing when it is closed while watched
(epoll(7): closing the last fd of an open file removes it from every epoll set). The set is
level triggered, like the loop's readiness; the loop calls :meth:`Readiness.dispatch` whenever
the set has events.
"""

from __future__ import annotations

import asyncio
import select
from collections.abc import Callable

Callback = Callable[[], None]

_IN = select.EPOLLIN
_OUT = select.EPOLLOUT
# Reported whether asked for or not (epoll_ctl(2)); each wakes whichever side is watching.
_TROUBLE = select.EPOLLERR | select.EPOLLHUP
_BATCH = 256


class _Watch:
    __slots__ = ("reader", "writer", "mask")

    def __init__(self) -> None:
        self.reader: Callback | None = None
        self.writer: Callback | None = None
        self.mask = 0


class Readiness:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._epoll = select.epoll()
        self._watches: dict[int, _Watch] = {}
        loop.add_reader(self._epoll.fileno(), self.dispatch)

    def set_reader(self, fd: int, callback: Callback | None) -> None:
        """Call ``callback`` while ``fd`` is readable (or has an error); None: stop."""
        self._set(fd, callback, reading=True)

    def set_writer(self, fd: int, callback: Callback | None) -> None:
        """Call ``callback`` while ``fd`` is writable (or has an error); None: stop."""
        self._set(fd, callback, reading=False)

    def forget(self, fd: int) -> None:
        """Stop watching ``fd``, which is about to be closed (that removes it from the set)."""
        self._watches.pop(fd, None)

    def close(self) -> None:
        self._loop.remove_reader(self._epoll.fileno())
        self._epoll.close()
        self._watches.clear()

    def _set(self, fd: int, callback: Callback | None, *, reading: bool) -> None:
        watch = self._watches.get(fd)
        if watch is None:
            if callback is None:
                return
            watch = self._watches[fd] = _Watch()
        if reading:
            watch.reader = callback
        else:
            watch.writer = callback
        self._update(fd, watch)

    def _update(self, fd: int, watch: _Watch) -> None:
        mask = (_IN if watch.reader is not None else 0) | (_OUT if watch.writer is not None else 0)
        if mask == watch.mask:
            return
        if watch.mask == 0:
            self._epoll.register(fd, mask)
        elif mask == 0:
            # Removed rather than left with no events: EPOLLHUP and EPOLLERR would still be
            # reported, level triggered, with nobody to handle them.
            self._epoll.unregister(fd)
            del self._watches[fd]
        else:
            self._epoll.modify(fd, mask)
        watch.mask = mask

    def dispatch(self) -> None:
        watches = self._watches
        for fd, events in self._epoll.poll(0, _BATCH):
            watch = watches.get(fd)
            if watch is None:
                continue
            if events & (_IN | _TROUBLE) and watch.reader is not None:
                watch.reader()
                watch = watches.get(fd)  # the callback may have closed the connection
                if watch is None:
                    continue
            if events & (_OUT | _TROUBLE) and watch.writer is not None:
                watch.writer()
