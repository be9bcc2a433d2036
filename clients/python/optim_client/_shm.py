"""Steps through shared memory, for a client on the server's host (``OptimClient(...,
shared_memory=True)``): each session gets two files, one its gradients are copied into and one the
server writes its new params into, registered with ``POST /v1/shm/regions``. A step then sends a
few dozen bytes of JSON naming them, instead of the arrays both ways.

The files are memfds sealed against shrinking where the system has them (the server maps those: an
update in place reads and writes them directly, any other step copies on every core), else files of
``/dev/shm`` (which it reads and writes with ``pread`` and ``pwrite``)."""

from __future__ import annotations

import fcntl
import mmap
import os
import sys
import threading
import uuid
from collections.abc import Generator
from concurrent.futures import ThreadPoolExecutor
from itertools import pairwise
from multiprocessing import shared_memory

import numpy as np
import orjson

from . import _wire
from .errors import OptimError

MEDIA_TYPE = "application/vnd.optim.shm+json"
PARALLEL_COPY_BYTES = 1 << 22  # below this a copy is faster on one thread than handed to others
_helpers: ThreadPoolExecutor | None = None  # threads that copy beside the caller, made on first need
_helpers_made = threading.Lock()
_WAYS = min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1, 4)


def copyto(dst: np.ndarray, src: np.ndarray) -> None:
    """``np.copyto(dst, src)`` for 1-D arrays, in pieces on up to 4 threads when large: one core does not
    fill the memory bus, and numpy lets go of the GIL while it copies (Ray's object store copies so too:
    10M float32 4.1 → 2.9 ms on 2 cores)."""
    global _helpers
    if dst.nbytes < PARALLEL_COPY_BYTES or _WAYS < 2:
        np.copyto(dst, src, casting="same_kind")
        return
    with _helpers_made:
        if _helpers is None:
            _helpers = ThreadPoolExecutor(_WAYS - 1, thread_name_prefix="optim-client-copy")
    cuts = np.linspace(0, dst.size, _WAYS + 1).astype(int)
    pieces = [_helpers.submit(np.copyto, dst[a:b], src[a:b], casting="same_kind") for a, b in pairwise(cuts[1:])]
    np.copyto(dst[:cuts[1]], src[:cuts[1]], casting="same_kind")
    for piece in pieces:
        piece.result()


class SessionRegions:
    """A session's regions, each as long as its parameters: ``grads`` (in, 0), ``params`` (out, 1), and
    over sealed memfds up to ``ANSWERS`` more params regions (out, 2...) whose views are a step's
    answer with no copy."""

    ANSWERS = 2  # answers a caller may hold while it steps on: the last one (the session holds it too)

    def __init__(self, layout: _wire.Layout, sealed: bool):
        self.layout = layout
        self.dtype = _wire.np_dtype(layout.dtype)
        self.nbytes = layout.nbytes  # (never a narrower wire dtype: regions() refuses those)
        self.sealed = sealed
        self.answers = self.ANSWERS  # answer regions it may still register
        self._tag = uuid.uuid4().hex[:12]
        self.names = [f"g-{self._tag}", f"p-{self._tag}"]
        self.files = [(SealedFile if sealed else SharedFile)(self.nbytes) for _ in self.names]

    def free_answer(self) -> int | None:
        """An answer region no array views any more (its answer was let go of), if there is one."""
        return next((i for i in range(2, len(self.files)) if not self.files[i].viewed()), None)

    def new_answer(self) -> tuple[str, SealedFile]:
        """A further answer region's name and file, not yet registered (sealed only: ``answer_to``)."""
        return f"a{len(self.files) - 2}-{self._tag}", SealedFile(self.nbytes)

    def registrations(self) -> list[dict]:
        return [{"name": name, "key": f.key, "byte_size": self.nbytes} for name, f in zip(self.names, self.files)]

    def _flat(self, which: int) -> np.ndarray:
        """Region ``which`` (0: gradients, 1: params) as one array of the session's dtype."""
        return np.frombuffer(self.files[which].buf, self.dtype, sum(self.layout.sizes))

    def views(self, which: int) -> list[np.ndarray]:
        """One array per tensor over region ``which``."""
        return _wire.from_binary(self._flat(which), self.layout)

    def step_body(self, arrays: list[np.ndarray], loss: float | None, fields: dict, answer: int = 1) -> bytes:
        """Copies the gradients into the gradients' region, unless they are its views already
        (``Session.shared_buffers``); the step's JSON body naming it and params region ``answer``."""
        flat = self._flat(0)
        offset = 0
        for array, size in zip(arrays, self.layout.sizes):
            target = flat[offset:offset + size]
            if not (array.dtype == self.dtype and array.size == size and array.flags.c_contiguous
                    and array.ctypes.data == target.ctypes.data):
                copyto(target, array.reshape(-1))
            offset += size
        body = {"gradients": {"region": self.names[0]}, "params": {"region": self.names[answer]}, **fields}
        if loss is not None:
            body["loss"] = float(loss)
        return orjson.dumps(body)

    def params(self, copy: bool, into, answer: int = 1) -> list[np.ndarray]:
        """The params the server wrote into region ``answer``: views of an answer region (nothing writes
        it while they live); else, of the params region, which the next step writes over, copied out
        into ``into(nbytes)`` (memory of an earlier answer nothing views any more, ``_AnswerMemory``),
        or with ``copy=False`` its views."""
        flat = self._flat(answer)
        if answer != 1 or not copy:
            return _wire.from_binary(flat, self.layout)
        out = np.frombuffer(into(self.nbytes), self.dtype)
        copyto(out, flat)
        return _wire.from_binary(out, self.layout)

    def close(self) -> None:
        for f in self.files:
            f.close()
        self.files = []


class SealedFile:
    """A memfd that can neither shrink nor grow, mapped here; the server opens it through /proc."""

    def __init__(self, nbytes: int):
        self.fd = os.memfd_create("optim-region", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(self.fd, nbytes)
        fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
        self.buf = mmap.mmap(self.fd, nbytes)
        self.key = f"/proc/{os.getpid()}/fd/{self.fd}"
        self._alone = sys.getrefcount(self.buf)

    def viewed(self) -> bool:
        """Whether an array still views the memory (each holds a reference to the mapping)."""
        return sys.getrefcount(self.buf) > self._alone

    def close(self) -> None:
        try:
            self.buf.close()
        except BufferError:  # the caller still holds views (shared_buffers, copy=False): unmapped with them
            pass
        os.close(self.fd)


class SharedFile:
    """A file of /dev/shm, by name: for a server that cannot open this process's descriptors (another
    PID namespace sharing /dev/shm)."""

    def __init__(self, nbytes: int):
        self._shm = shared_memory.SharedMemory(create=True, size=nbytes)
        self.buf = self._shm.buf
        self.key = "/" + self._shm.name

    def close(self) -> None:
        self.buf = None
        try:
            self._shm.close()
        except BufferError:  # views still held: the mapping goes with them
            pass
        try:
            self._shm.unlink()
        except FileNotFoundError:
            pass


SEALING = hasattr(os, "memfd_create") and hasattr(fcntl, "F_ADD_SEALS")


# What a registration asks the server, as (method, path, json) for the client to send: the sync and
# async clients drive the same generators (sans-IO), throwing a refused request's error back in.
Request = tuple[str, str, dict | None]


class SharedMemory:
    """A client's regions, per session, and why the server refused them if it did."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.refused: str | None = None
        self.sessions: dict[str, SessionRegions] = {}

    def regions(self, session_id: str, layout: _wire.Layout) -> Generator[Request, object, SessionRegions | None]:
        """The session's regions, registered on first use (a sealed memfd, else a /dev/shm file);
        None to step over the wire."""
        if not self.enabled or self.refused or layout.wire:
            return None
        found = self.sessions.get(session_id)
        if found is not None:
            return found
        for sealed in (True, False) if SEALING else (False,):
            regions = SessionRegions(layout, sealed)
            try:
                for body in regions.registrations():
                    yield "POST", "/v1/shm/regions", body
            except OptimError as e:  # the server's refusal: off (403), or it cannot open this process's files
                self.refused = str(e)
                yield from self.unregister(regions)
                if getattr(e, "status_code", None) == 403:
                    return None
                continue
            self.refused = None
            self.sessions[session_id] = regions
            return regions
        return None

    def answer_to(self, regions: SessionRegions, copy: bool) -> Generator[Request, object, int]:
        """Which params region a step's answer goes into: with ``copy`` an answer region nothing views
        (registered on first need, up to ``ANSWERS``), whose views are the answer with no copy; else,
        or when every one is still viewed, the params region (1). Only over sealed memfds: a view of a
        /dev/shm file's memoryview leaves no trace on it to tell whether the region is still viewed."""
        if not copy or not regions.sealed:
            return 1
        free = regions.free_answer()
        if free is None and len(regions.files) - 2 < regions.answers:
            name, file = regions.new_answer()
            try:
                yield "POST", "/v1/shm/regions", {"name": name, "key": file.key, "byte_size": regions.nbytes}
            except OptimError:  # e.g. this key's regions are at the server's cap: copy out, as before
                file.close()
                regions.answers = len(regions.files) - 2  # and ask no more
                return 1
            regions.names.append(name)
            regions.files.append(file)
            free = len(regions.files) - 1
        return 1 if free is None else free

    def unregister(self, regions: SessionRegions) -> Generator[Request, object, None]:
        for name in regions.names:
            try:
                yield "DELETE", f"/v1/shm/regions/{name}", None
            except OptimError:  # never registered, or the server is gone: the files go anyway
                pass
        regions.close()

    def drop(self, session_id: str) -> Generator[Request, object, None]:
        regions = self.sessions.pop(session_id, None)
        if regions is not None:
            yield from self.unregister(regions)

    def drop_all(self) -> Generator[Request, object, None]:
        for session_id in list(self.sessions):
            yield from self.drop(session_id)
