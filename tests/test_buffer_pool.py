"""The pool of large session buffers: one is handed out again only when nothing else holds it (a
stored record, a reader's view, a snapshot), writable, and let go of when no step took it soon."""

from __future__ import annotations

import time

import numpy as np

from optim_service.record import BufferPool

SIZE = 2 << 20


def test_a_buffer_is_reused_only_when_nothing_else_refers_to_it():
    pool = BufferPool(idle_seconds=60)
    stored = np.empty(SIZE, np.uint8)
    stored.flags.writeable = False  # a step's frozen state
    address = stored.ctypes.data
    reader = memoryview(stored)[:16]  # an answer in flight, say
    assert pool.give(stored)
    del stored
    first = pool.take(SIZE)
    assert first.ctypes.data != address  # still held by the reader: a fresh buffer
    del reader
    again = pool.take(SIZE)
    assert again.ctypes.data == address and again.flags.writeable  # nobody else's now
    assert pool.take(SIZE).ctypes.data != address  # and handed out once
    assert pool.take(100).nbytes == 100  # small ones are not pooled


def test_buffers_no_step_took_are_let_go_of():
    pool = BufferPool(idle_seconds=0.05)
    pool.give(np.empty(SIZE, np.uint8))
    pool.give(np.empty(2 * SIZE, np.uint8))
    pool.trim()
    assert len(pool._buffers) == 2  # given just now
    time.sleep(0.1)
    pool.trim()
    assert pool._buffers == []  # the memory goes back: a session at rest holds its state only


def test_the_pool_is_bounded():
    pool = BufferPool(max_bytes=3 * SIZE, per_size=8)
    for _ in range(5):
        pool.give(np.empty(SIZE, np.uint8))
    assert sum(b.nbytes for b in pool._buffers) <= 3 * SIZE
