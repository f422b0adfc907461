"""Catch a peer that stopped (SIGSTOP, a frozen node) in seconds, not after `ddp_timeout`.

Every rank runs one daemon thread that bumps its own counter in the rendezvous store every
`interval_s` and reads every peer's. A peer whose counter has not moved for `timeout_s` is
hung: the thread prints which rank, and exits this process with `PEER_LOST_EXIT_CODE`
(the main thread may be blocked inside a gloo/NCCL collective for up to `ddp_timeout`, from
which nothing else can free it; torchrun then stops the job). A stopped process stops all
its threads, so its counter freezes; a process merely busy (a long save, a compile) keeps
beating. A rank that leaves `train()` marks itself done and is no longer watched.

The store traffic is one `add` per peer per interval per rank. The thread talks to its own
client of the rendezvous TCPStore with a short timeout, so a stopped store host (rank 0,
unless torchrun hosts the store) is noticed too instead of blocking the thread.
"""
from __future__ import annotations

import datetime
import logging
import os
import sys
import threading
import time
from typing import Callable, Optional

logger = logging.getLogger("fasttrain")

PEER_LOST_EXIT_CODE = 75  # EX_TEMPFAIL: the job can be resumed from its last checkpoint


def _exit(message: str) -> None:
    logger.error(message)
    print(f"fasttrain: error: {message}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(PEER_LOST_EXIT_CODE)


def _watch_store(interval_s: float):
    """(store, who hosts it): a client of its own for a TCPStore (short timeout), else the
    default store itself (a FileStore never blocks on a dead peer)."""
    import torch.distributed as dist
    store = dist.distributed_c10d._get_default_store()
    inner = store
    while isinstance(inner, dist.PrefixStore):
        inner = inner.underlying_store
    if isinstance(inner, dist.TCPStore):
        host = ("the torchrun agent" if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
                else "rank 0")
        client = dist.TCPStore(inner.host, inner.port, is_master=False, wait_for_workers=False,
                               timeout=datetime.timedelta(seconds=max(2 * interval_s, 1.0)))
        return client, f"{host} at {inner.host}:{inner.port}"
    return store, None


class PeerWatchdog:
    def __init__(self, rank: int, world_size: int, generation: int, timeout_s: float,
                 interval_s: Optional[float] = None, on_hang: Callable[[str], None] = _exit,
                 store=None):
        self.rank, self.world_size = rank, world_size
        self.timeout_s = float(timeout_s)
        self.interval_s = interval_s or min(2.0, self.timeout_s / 5)
        self.on_hang = on_hang
        self._prefix = f"fasttrain/heartbeat/{generation}"
        self._store, self._store_host = (store, None) if store is not None else _watch_store(self.interval_s)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        now = time.monotonic()
        self._seen = {r: (-1, now) for r in range(world_size) if r != rank}  # rank -> (count, when)
        self._store_ok_at = now

    def _key(self, what: str, rank: int) -> str:
        return f"{self._prefix}/{what}/{rank}"

    def start(self) -> None:
        self._beat()
        # Two threads: a store call to a stopped host may block past its timeout, and the
        # judge must still run then.
        self._threads = [threading.Thread(target=self._run_beats, name="fasttrain-heartbeat", daemon=True),
                         threading.Thread(target=self._run_judge, name="fasttrain-peer-watchdog", daemon=True)]
        for t in self._threads:
            t.start()

    def stop(self, clean: bool = True) -> None:
        """Stop watching; after a clean finish tell the peers this rank left train() on
        purpose (after a failure its silence lets them stop as well)."""
        self._stop.set()
        for t in self._threads:
            t.join(timeout=4 * self.interval_s)  # a beat blocked on a dead store host is a daemon
        self._threads = []
        if not clean:
            return
        try:
            self._store.add(self._key("done", self.rank), 1)
        except Exception:  # noqa: BLE001 - the store is gone: peers find out anyway
            pass

    def silent_peers(self, for_s: float) -> list[int]:
        """Peers whose counter has not moved for `for_s` seconds (for naming a dead rank)."""
        now = time.monotonic()
        return sorted(r for r, (_, when) in self._seen.items() if now - when >= for_s)

    def _beat(self) -> None:
        self._store.add(self._key("beat", self.rank), 1)
        now = time.monotonic()
        for r in list(self._seen):
            if self._store.add(self._key("done", r), 0) > 0:
                del self._seen[r]  # left train(): nothing more to expect from it
                continue
            count = self._store.add(self._key("beat", r), 0)
            if count != self._seen[r][0]:
                self._seen[r] = (count, now)
        self._store_ok_at = now

    def _run_beats(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self._beat()
            except Exception as e:  # noqa: BLE001 - a store timeout: the judge sees the silence
                logger.debug("heartbeat store unreachable: %s", e)

    def _run_judge(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._judge()

    def _judge(self) -> None:
        now = time.monotonic()
        hung = self.silent_peers(self.timeout_s)
        if hung:
            ranks = ("rank " if len(hung) == 1 else "ranks ") + ", ".join(str(r) for r in hung)
            self.on_hang(
                f"rank {self.rank}: peer {ranks} made no progress for {self.timeout_s:.0f} s "
                f"(stopped, frozen or unreachable); stopping this rank too instead of waiting "
                f"for ddp_timeout. Resume from the last checkpoint once every node is healthy "
                f"(ddp_heartbeat_timeout sets this limit; 0 turns the check off)")
        elif now - self._store_ok_at >= self.timeout_s:
            self.on_hang(
                f"rank {self.rank}: the rendezvous store ({self._store_host or 'default store'}) "
                f"has not answered for {self.timeout_s:.0f} s: its host is stopped or gone; "
                f"stopping this rank. Resume from the last checkpoint once every node is healthy")
