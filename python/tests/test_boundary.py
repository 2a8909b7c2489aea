"""The boundary rule (docs/design.md, "Engines: how Python workers reach the shelf"): memory a caller lends is touched only while the
call that lent it runs. A call the caller cancels, abandons on a timeout or closes is
stopped, and has finished, before control (or the buffer) goes back (issue 17 §1).

Each scenario holds a real Redis with ``CLIENT PAUSE`` (or a stalling proxy in front of
it) so that the call outlives the caller's patience, lets the caller give up and refill
its memory with 0x11, and watches that memory until well after Redis answers again: a
kvshelf that kept the call running writes its block (0xab) there."""

from __future__ import annotations

import asyncio
import ctypes
import faulthandler
import functools
import os
import socket
import threading
import time

import pytest

import kvshelf
from conftest import sigstop
from test_lmcache_mp import drain_all

GUARD = 60.0  # seconds a test may take before the process dumps its stacks and exits
PAUSE_MS = 2000
WATCH = PAUSE_MS / 1000 + 1.5  # how long after the caller gave up its memory is watched
BLOCK = 2 * 1024 * 1024


@pytest.fixture(autouse=True)
def guard():
    """A test-level timeout that works even while a thread is stuck in native code (no
    pytest-timeout here): a hang fails the run, with every thread's stack."""
    faulthandler.dump_traceback_later(GUARD, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


def caller_memory(n: int):
    """Memory the caller owns and kvshelf does not: a ctypes array, as LMCache's
    ``MemoryObj.byte_array`` is, and a writable memoryview over it."""
    arr = (ctypes.c_ubyte * n)()
    return arr, memoryview(arr).cast("B")


def fill(arr, byte: int) -> None:
    ctypes.memset(arr, byte, ctypes.sizeof(arr))


def watch_untouched(arrs, byte: int, seconds: float = WATCH) -> None:
    """Fails as soon as any of `arrs` holds anything but `byte`, watching for `seconds`."""
    want = [bytes([byte]) * ctypes.sizeof(a) for a in arrs]
    deadline = time.monotonic() + seconds
    while True:
        for i, (a, w) in enumerate(zip(arrs, want)):
            assert bytes(a) == w, f"buffer {i} was written after the caller took it back"
        if time.monotonic() >= deadline:
            return
        time.sleep(0.05)  # Redis answers when its pause ends: nothing else to wait on


def block_ns(label: str) -> kvshelf.Namespace:
    # 1 layer x (K, V) x 512 tokens x 1 head x 1024 dims x 2 bytes = 2 MiB
    return kvshelf.Namespace(label=label, model_id="m", kv_dtype="float16", num_layers=1,
                             num_kv_heads=1, head_dim=1024, block_size=512)


def stored_block(redis_server, label: str):
    ns = block_ns(label)
    assert ns.block_bytes == BLOCK
    h = kvshelf.PrefixHasher(ns).hash_prefix(list(range(ns.block_size)))[0]
    assert kvshelf.Store(redis_server.url).put(ns, [h], [b"\xab" * BLOCK]) == ["stored"]
    return ns, h


def pause(redis_server, ms: int = PAUSE_MS) -> None:
    assert redis_server.cli("CLIENT", "PAUSE", str(ms), "ALL").strip() == b"OK"


def test_async_get_into_abandoned_by_wait_for_never_writes_again(own_redis, label):
    ns, h = stored_block(own_redis, label)
    arr, mv = caller_memory(BLOCK)

    async def main():
        s = kvshelf.AsyncStore(own_redis.url)
        await s.ping()
        pause(own_redis)
        t0 = time.monotonic()
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(s.get_into(ns, [h], [mv]), 0.5)
        assert time.monotonic() - t0 < 1.5, "the cancellation waited for Redis"
        fill(arr, 0x11)  # the caller's memory is its own again
        await asyncio.to_thread(watch_untouched, [arr], 0x11)
        # The abandoned exchange left nothing behind: the next read is right.
        fresh, fresh_mv = caller_memory(BLOCK)
        assert await s.get_into(ns, [h], [fresh_mv]) == [BLOCK]
        assert bytes(fresh) == b"\xab" * BLOCK

    asyncio.run(main())


def test_sync_get_into_in_an_executor_returns_within_its_own_deadline(own_redis, label):
    """`Store.get_into` run through `run_in_executor` cannot be stopped from outside; its
    `timeout` makes the thread return before the caller's own deadline, so a caller that
    gives up never leaves a call running over its buffer."""
    ns, h = stored_block(own_redis, label)
    store = kvshelf.Store(own_redis.url)
    store.ping()
    arr, mv = caller_memory(BLOCK)

    async def main():
        loop = asyncio.get_running_loop()
        pause(own_redis)
        call = loop.run_in_executor(
            None, functools.partial(store.get_into, ns, [h], [mv], timeout=0.3))
        with pytest.raises(kvshelf.KvshelfError) as e:
            await asyncio.wait_for(asyncio.shield(call), 0.5)
        assert e.value.code == "backend_timeout"
        fill(arr, 0x11)
        await asyncio.to_thread(watch_untouched, [arr], 0x11)

    asyncio.run(main())


def test_start_get_into_cancelled_then_waited_has_finished(own_redis, label):
    """The native form the async wrappers use: `cancel()` then `wait()` returns once the
    read has stopped, with the buffer never written afterwards."""
    ns, h = stored_block(own_redis, label)
    store = kvshelf.Store(own_redis.url)
    store.ping()
    arr, mv = caller_memory(BLOCK)
    pause(own_redis)
    pending = store.start_get_into(ns, [h], [mv])
    time.sleep(0.3)  # the read is under way, held by the pause
    assert not pending.done()
    pending.cancel()
    with pytest.raises(kvshelf.KvshelfError) as e:
        pending.wait()
    assert e.value.code == "cancelled" and pending.done()
    fill(arr, 0x11)
    watch_untouched([arr], 0x11)


def test_async_client_fetch_into_abandoned_never_writes_again(redis, label):
    """The same through a sidecar: AsyncClient.fetch_into given up on while the sidecar
    is stopped (SIGSTOP); its answer, arriving later, must not be copied in."""
    import signal

    from test_client import Sidecar

    ns = kvshelf.Namespace(label=label, model_id="kvshelf/test-model", kv_dtype="float16",
                           num_layers=2, num_kv_heads=2, head_dim=8, block_size=4)
    hashes = kvshelf.PrefixHasher(ns).hash_prefix(list(range(ns.block_size)))
    side = Sidecar(redis.url, label)
    try:
        c = kvshelf.AsyncClient(side.url)
        arr, mv = caller_memory(ns.block_bytes)

        async def main():
            assert await c.put(label, hashes, [b"\xab" * ns.block_bytes]) == ["stored"]
            sigstop(side.proc)
            try:
                with pytest.raises(asyncio.TimeoutError):
                    await asyncio.wait_for(c.fetch_into(label, hashes, [mv]), 0.5)
                fill(arr, 0x11)
            finally:
                side.proc.send_signal(signal.SIGCONT)
            await asyncio.to_thread(watch_untouched, [arr], 0x11, 2.0)
            fresh, fresh_mv = caller_memory(ns.block_bytes)
            assert await c.fetch_into(label, hashes, [fresh_mv]) == (1, "complete")
            assert bytes(fresh) == b"\xab" * ns.block_bytes

        asyncio.run(main())
    finally:
        side.stop()


# --- in-process LMCache: its own RemoteBackend gives up on a get -------------------------


def test_lmcache_get_abandoned_by_its_timeout_never_writes_into_reused_memory(own_redis, label):
    """LMCache's `RemoteBackend.get_blocking` waits `blocking_timeout_secs`, cancels the
    future and returns None; the memory object the connector allocated must not go back to
    LMCache's allocator (which hands its slot to the next chunk) while kvshelf still reads
    into it."""
    import torch
    from lmcache_instance import Instance

    inst = Instance(own_redis.url, label, blocking_timeout_secs=1)
    try:
        conn = inst.remote.connection
        conn = getattr(conn, "_connector", conn)
        conn.timeout = None  # no deadline of its own: LMCache's timeout is what cancels
        src = inst.chunk(1)
        src.tensor.view(torch.uint8).fill_(0xAB)
        key = inst.key(1)
        inst.put(key, src)
        assert inst.remote.contains(key)
        pause(own_redis)
        t0 = time.monotonic()
        assert inst.remote.get_blocking(key) is None  # LMCache gave up after 1 s
        assert time.monotonic() - t0 < 2
        # The next chunks LMCache allocates, filled by their new owners.
        reused = [inst.chunk(100 + i) for i in range(8)]
        for o in reused:
            o.tensor.view(torch.uint8).fill_(0x11)
        deadline = time.monotonic() + WATCH
        while time.monotonic() < deadline:
            for i, o in enumerate(reused):
                assert bool((o.tensor.view(torch.uint8) == 0x11).all()), (
                    f"chunk {i}, allocated after LMCache gave up, was written by the abandoned get")
            time.sleep(0.05)  # Redis answers when its pause ends: nothing else to wait on
        got = inst.remote.get_blocking(key)  # and the connector still serves
        assert got is not None and bool((got.tensor.view(torch.uint8) == 0xAB).all())
        for o in [*reused, got, src]:
            o.ref_count_down()
    finally:
        inst.close()


# --- MP plugin: close racing submits, and deadlines ----------------------------------------

CHUNK_KW = dict(kv_dtype="bf16", num_layers=1, num_kv_heads=1, head_dim=1, chunk_size=256)
CHUNK = 2 * 1 * 256 * 1 * 1 * 2  # 1 KiB


def test_close_racing_submits_from_another_thread_leaves_no_batch_running(own_redis, label):
    """`close()` waits for running batches with the GIL released; a submit from another
    thread in that window must not start a batch that close neither stops nor waits for."""
    from kvshelf.lmcache import KvshelfNativeConnector

    key = "m@00000000@0@" + "ab" * 32
    seed = KvshelfNativeConnector(own_redis.url, label, **CHUNK_KW)
    try:
        assert drain_all(seed, [seed.submit_batch_set([key], [bytearray(b"\xab" * CHUNK)])])
    finally:
        seed.close()
    lent: list = []  # every buffer handed to a submit (its ctypes array)
    pause(own_redis)
    for _ in range(6):
        # No pacing of new connections: a batch that races the close gets one, and then
        # waits for Redis, which answers only after close returned.
        c = KvshelfNativeConnector(own_redis.url, label, timeout=30, connect_rate=0,
                                   **CHUNK_KW)
        stop, mine = threading.Event(), []

        def submit(c=c, stop=stop, mine=mine):
            while not stop.is_set():
                arr, mv = caller_memory(CHUNK)
                mine.append(arr)
                c.submit_batch_get([key], [mv])

        t = threading.Thread(target=submit)
        t.start()
        # Let batches pile up; the submitter is still spinning (and queued for the GIL)
        # when close releases the GIL to wait for them.
        time.sleep(0.01)
        c.close()
        stop.set()
        t.join(timeout=10)
        lent += mine
        for arr in lent:  # close returned: every buffer is the caller's again
            fill(arr, 0x11)
    assert len(lent) > 6 * 8
    watch_untouched(lent, 0x11)


class StallingProxy:
    """A TCP proxy in front of a real Redis that forwards everything, except that it holds
    any request naming `stall` until `release()`: one key's Redis is slow, not Redis."""

    def __init__(self, port: int, stall: bytes) -> None:
        self.port, self.stall = port, stall
        self.released = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"redis://127.0.0.1:{self.listener.getsockname()[1]}"
        self.socks: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.port))
            self.socks += [client, server]
            threading.Thread(target=self._pipe, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client, False), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, requests: bool) -> None:
        tail = b""
        try:
            while data := src.recv(1 << 16):
                if requests and self.stall in tail + data:
                    self.released.wait()
                tail = data[-len(self.stall):]
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def release(self) -> None:
        self.released.set()

    def close(self) -> None:
        self.release()
        self.listener.close()
        for s in self.socks:
            s.close()


def test_plugin_deadline_keeps_the_keys_that_completed_before_it(redis, label):
    from kvshelf.lmcache import KvshelfNativeConnector

    fast, slow = "m@00000000@0@" + "0a" * 32, "m@00000000@0@" + "0b" * 32
    fast_data, slow_data = os.urandom(CHUNK), os.urandom(CHUNK)
    seed = KvshelfNativeConnector(redis.url, label, **CHUNK_KW)
    try:
        ok = drain_all(seed, [seed.submit_batch_set([fast, slow],
                                                    [bytearray(fast_data), bytearray(slow_data)])])
        assert list(ok.values())[0][2] == [True, True]
    finally:
        seed.close()
    slow_key = kvshelf.block_key(label, kvshelf.lmcache_key_hash(slow)).encode()
    proxy = StallingProxy(redis.port, slow_key)
    c = KvshelfNativeConnector(proxy.url, label, timeout=1.0, fanout=2, **CHUNK_KW)
    try:
        fast_arr, fast_mv = caller_memory(CHUNK)
        slow_arr, slow_mv = caller_memory(CHUNK)
        fid = c.submit_batch_get([fast, slow], [fast_mv, slow_mv])
        (ok, err, bools) = drain_all(c, [fid])[fid]
        assert ok is False and "timed out" in err
        assert bools == [True, False], "the key read before the deadline lost its result"
        assert bytes(fast_arr) == fast_data
        fill(slow_arr, 0x11)
        proxy.release()  # the slow key's answer arrives now, after its batch completed
        watch_untouched([slow_arr], 0x11, seconds=1.0)
    finally:
        c.close()
        proxy.close()
