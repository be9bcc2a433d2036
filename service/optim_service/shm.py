"""Shared-memory regions, as NVIDIA Triton's system shared-memory extension has them: a client on
this host registers a file of ``/dev/shm`` (a name, the file's key, an offset and a byte size), then
names a region and an offset where a step's gradients lie, and where its answer should go, instead
of sending the bytes through a socket.

A file of ``/dev/shm`` is read and written with ``pread``/``pwrite`` on a descriptor opened at
registration, never mapped: a client that shrinks its file under a mapping would crash the server
(SIGBUS), while a short read is a 422. A memfd sealed against shrinking (``F_SEAL_SHRINK``), named
``/proc/<pid>/fd/<n>`` by the process that holds it, cannot shrink: it is mapped. An update in place
reads its gradients there and writes the params there in its own pass, guarded against gradients
the client changes under it (``kernels.guarded``); any other step copies the gradients into the
server's memory first, with plain loads and stores on every core, so that the client cannot change
them under its checks. Regions belong
to the API key that registered them, live in this process (hence one worker), and are closed by
unregistering or when the server stops.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import re
import stat
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .errors import FeatureOff, InvalidRequest, RegionExists, RegionNotFound, TooManyRegions
from .optim.kernels import PARALLEL_MIN_BYTES, copy

KEY = re.compile(r"/?[A-Za-z0-9_][A-Za-z0-9._-]{0,254}")  # one name in the directory: no path, no dotfile
SEALED = re.compile(r"/proc/[1-9][0-9]{0,9}/fd/[0-9]{1,10}")  # a memfd, by its holder's descriptor
NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")


class Region(NamedTuple):
    name: str
    key: str
    offset: int  # where the region starts in its file
    byte_size: int
    fd: int
    mapping: mmap.mmap | None = None  # a sealed memfd's pages, from the file's start to the region's end

    def document(self) -> dict:
        return {"name": self.name, "key": self.key, "offset": self.offset, "byte_size": self.byte_size}


class Span(NamedTuple):
    """The bytes a step's reference names: ``size`` of them at ``offset`` into ``region``."""

    region: Region
    offset: int
    size: int

    @property
    def start(self) -> int:  # in the region's file
        return self.region.offset + self.offset

    def document(self) -> dict:
        return {"region": self.region.name, "offset": self.offset, "byte_size": self.size}


class Regions:
    """The registered regions of every API key (``None`` when keys are off)."""

    def __init__(self, directory: Path, enabled: bool, per_owner: int):
        self.directory, self.enabled, self.per_owner = Path(directory), enabled, per_owner
        self._owned: dict[str | None, dict[str, Region]] = {}

    def _check_on(self) -> None:
        if not self.enabled:
            raise FeatureOff("shared-memory regions are off on this server: start it with OPTIM_SHM=true "
                             "(for clients on the same host), or send the gradients in the body")

    def register(self, owner: str | None, name: str, key: str, offset: int, byte_size: int) -> Region:
        self._check_on()
        if not NAME.fullmatch(name):
            raise InvalidRequest(f"region name {name!r}: 1-128 letters, digits, '.', '_' or '-'")
        sealed = SEALED.fullmatch(key) is not None
        if not sealed and not KEY.fullmatch(key):
            raise InvalidRequest(f"key {key!r} must name one file of {self.directory} (as shm_open takes it, "
                                 "'/name'): letters, digits, '.', '_' or '-', no path; or be /proc/<pid>/fd/<n> "
                                 "of a memfd sealed against shrinking")
        if offset < 0 or byte_size < 1:
            raise InvalidRequest("offset must be ≥ 0 and byte_size ≥ 1")
        owned = self._owned.setdefault(owner, {})
        if name in owned:
            raise RegionExists(f"region {name!r} is already registered: DELETE /v1/shm/regions/{name} first, "
                               "or choose another name")
        if len(owned) >= self.per_owner:
            raise TooManyRegions(f"this API key holds {len(owned)} regions, the most it may: unregister one first")
        path = Path(key) if sealed else self.directory / key.lstrip("/")
        try:  # no symlink followed (but /proc's own link to the memfd): the key names the file itself
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK | (0 if sealed else os.O_NOFOLLOW))
        except FileNotFoundError:
            raise InvalidRequest(f"no file {path} on the server's host: create it first (shm_open, or Python's "
                                 "multiprocessing.shared_memory), on the same host as the server") from None
        except OSError as e:
            raise InvalidRequest(f"cannot open {path} for reading and writing: {e.strerror}") from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise InvalidRequest(f"{path} is not a regular file")
            for other, regions in self._owned.items():  # one key's live region is not another's to read
                if other != owner and any(_same_file(r.fd, info) for r in regions.values()):
                    raise RegionExists(f"{path} is registered by another API key")
            if info.st_size < offset + byte_size:
                raise InvalidRequest(f"{path} holds {info.st_size} bytes; offset {offset} + byte_size {byte_size} "
                                     f"needs {offset + byte_size}")
            mapping = _map_sealed(fd, offset + byte_size, path) if sealed else None
        except BaseException:
            os.close(fd)
            raise
        owned[name] = region = Region(name, key, offset, byte_size, fd, mapping)
        return region

    def get(self, owner: str | None, name: str) -> Region:
        self._check_on()
        region = self._owned.get(owner, {}).get(name)
        if region is None:
            raise RegionNotFound(f"no region {name!r} is registered with this API key: POST /v1/shm/regions first")
        return region

    def list(self, owner: str | None) -> list[Region]:
        self._check_on()
        return list(self._owned.get(owner, {}).values())

    def status(self, owner: str | None, name: str) -> dict:
        """The region, and whether its file still holds it (``"ready"``) or was shrunk (``"short"``)."""
        region = self.get(owner, name)
        size = os.fstat(region.fd).st_size
        return {**region.document(), "status": "ready" if size >= region.offset + region.byte_size else "short",
                "file_bytes": size}

    def unregister(self, owner: str | None, name: str) -> None:
        """Forgets a region; its mapping is unmapped when the last step reading it lets go."""
        region = self.get(owner, name)
        del self._owned[owner][name]
        os.close(region.fd)

    def close(self) -> None:
        for owned in self._owned.values():
            for region in owned.values():
                os.close(region.fd)
        self._owned.clear()

    def span(self, owner: str | None, ref: dict, nbytes: int | None, what: str) -> Span:
        """The bytes a reference names, checked against its region and the region's file: ``nbytes``
        of them, else the reference's ``byte_size``, else the rest of the region."""
        region = self.get(owner, ref["region"])
        offset = ref.get("offset", 0)
        size = nbytes if nbytes is not None else ref.get("byte_size") or region.byte_size - offset
        if ref.get("byte_size") is not None and ref["byte_size"] != size:
            raise InvalidRequest(f"{what}: byte_size {ref['byte_size']} but the session's parameters take {size} bytes")
        if size < 1:
            raise InvalidRequest(f"{what}: offset {offset} is at or past the end of region {region.name!r} "
                                 f"({region.byte_size} bytes)")
        if offset < 0 or offset + size > region.byte_size:
            raise InvalidRequest(f"{what}: {size} bytes at offset {offset} do not fit region {region.name!r} "
                                 f"of {region.byte_size} bytes")
        span = Span(region, offset, size)
        if region.mapping is not None:  # sealed: it cannot have shrunk
            return span
        have = os.fstat(region.fd).st_size
        if have < span.start + size:
            raise InvalidRequest(f"{what}: the file of region {region.name!r} was shrunk to {have} bytes; it "
                                 f"needs {span.start + size}. Nothing was changed: re-create and re-register it")
        return span


def warm() -> None:
    """Compile (or load from numba's cache) the copy a large step through a mapped region makes, at
    start-up where regions are on (0.2–0.4 s), not on a first step."""
    copy(np.zeros(PARALLEL_MIN_BYTES, np.uint8), np.zeros(PARALLEL_MIN_BYTES, np.uint8))


def mapped(span: Span) -> memoryview | None:
    """A checked span's bytes where they lie in a sealed region's mapping, which the client can still
    write (``SessionService.step``'s ``volatile`` and ``answer_into``); None for a file, which is only
    ever read and written with pread and pwrite."""
    region = span.region
    return None if region.mapping is None else memoryview(region.mapping)[span.start:span.start + span.size]


def check_size(span: Span, limit: int) -> None:
    if span.size > limit:
        raise InvalidRequest(f"gradients: {span.size} bytes, over this server's limit of {limit} per step")


def read(span: Span, into: np.ndarray | None, limit: int) -> memoryview:
    """A checked span's bytes, read into ``into`` (uint8, long enough) or fresh memory: a copy the
    client cannot change, so that what a check or a proof read before the update is what it reads."""
    region, size = span.region, span.size
    check_size(span, limit)
    buffer = memoryview(into)[:size] if into is not None and len(into) >= size else memoryview(bytearray(size))
    if region.mapping is not None:
        copy(np.frombuffer(buffer, np.uint8), np.frombuffer(region.mapping, np.uint8, size, span.start))
        return buffer
    got = os.preadv(region.fd, [buffer], span.start)
    if got != size:  # shrunk between the check and the read
        raise InvalidRequest(f"gradients: region {region.name!r} gave {got} of {size} bytes (its file was "
                             "shrunk); nothing was changed")
    return buffer


def write(span: Span, data) -> None:
    """``data`` (the span's size) written where a span checked before the step lies. After the step
    there is no refusing: a file shrunk since is written (and so grown) again, and what cannot be
    written at all raises OSError."""
    data = memoryview(data).cast("B")
    region = span.region
    if region.mapping is not None:
        copy(np.frombuffer(region.mapping, np.uint8, len(data), span.start), np.frombuffer(data, np.uint8))
    elif os.pwritev(region.fd, [data], span.start) != len(data):
        raise OSError(errno.EIO, "a short write")


def _same_file(fd: int, info: os.stat_result) -> bool:
    mine = os.fstat(fd)
    return (mine.st_dev, mine.st_ino) == (info.st_dev, info.st_ino)


def _map_sealed(fd: int, length: int, path: Path) -> mmap.mmap:
    """A memfd's first ``length`` bytes, mapped: only where its seals forbid shrinking it."""
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:  # not a memfd (or a file that cannot be sealed)
        seals = 0
    if not seals & fcntl.F_SEAL_SHRINK:
        raise InvalidRequest(f"{path} is not a memfd sealed against shrinking: add F_SEAL_SHRINK (and F_SEAL_GROW) "
                             "with fcntl(F_ADD_SEALS), or register a file of /dev/shm instead")
    try:
        return mmap.mmap(fd, length)
    except OSError as e:  # e.g. also sealed against writing: the params could not go in
        raise InvalidRequest(f"cannot map {path} for reading and writing ({e.strerror}): a region's memfd must "
                             "stay writable (no F_SEAL_WRITE)") from None
