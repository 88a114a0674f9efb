"""The system shared memory extension of KServe v2, as Triton defines it: clients on the router's
machine register regions of POSIX shared memory objects by name, and a layer request's tensors
then name a region (`shared_memory_region`, `shared_memory_byte_size`, `shared_memory_offset`
in their parameters, parsed by `router_service.codec`) instead of carrying their bytes.

- A region is `byte_size` bytes from `offset` of the object `/dev/shm/<key>`: what
  `shm_open(key)` opens, and what `tritonclient.utils.shared_memory.create_shared_memory_region`
  and Python's `multiprocessing.shared_memory.SharedMemory` create (leading slashes of the key
  do not count, as in `shm_open`).
- It is mapped once, read and write, when it is registered, and unmapped when it is
  unregistered. A request holds the regions it uses (`Lease`) until its answer is written: one
  unregistered meanwhile stays mapped until then, as in Triton, and its name is free at once.
- Every mistake raises `InvalidRequest` naming it; with the extension off (`SharedMemoryOff`)
  every call raises `Unsupported` saying how to turn it on. Nothing here knows status codes.

What it trusts: whoever may call the port can have the router map, read and write any shared
memory object the router's user can open. That is why the extension is off by default and
refused on a non-loopback `router.host` unless explicitly allowed (`cluster.config.RouterConfig`).
A client that shrinks an object after registering it is refused at its next request, but one
that shrinks it while a request reads it crashes the router (SIGBUS), as it would Triton.
"""

from __future__ import annotations

import mmap
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

from router_service.errors import InvalidRequest, Unsupported

SHM_DIR = Path("/dev/shm")  # where Linux keeps POSIX shared memory objects (glibc's shm_open)
MAX_REGIONS = 256  # each region holds a mapping and a file descriptor
EXTENSION = "system_shared_memory"  # its name in ServerMetadata.extensions
OFF_MESSAGE = (
    "the system shared memory extension is off on this server: set router.shared_memory: true in its "
    "config (on a loopback router.host; elsewhere also router.shared_memory_on_exposed_host: true)"
)


@dataclass(frozen=True)
class RegionStatus:
    """A registered region as `SystemSharedMemoryStatus` shows it."""

    name: str
    key: str
    offset: int
    byte_size: int


class _Region:
    """A registered region and its mapping, which starts at the page boundary at or below the
    region's offset: the region begins `start` bytes into it."""

    def __init__(self, status: RegionStatus, mapping: mmap.mmap, start: int):
        self.status = status
        self.users = 0  # requests holding it now
        self.unregistered = False
        self._mapping: mmap.mmap | None = mapping
        self._start = start

    def view(self, offset: int, byte_size: int) -> memoryview:
        """`byte_size` bytes from `offset` of the region, without copying (already checked)."""
        begin = self._start + offset
        return memoryview(self._mapping)[begin:begin + byte_size]

    def object_size(self) -> int:
        """The object's size now (a client may have shrunk it since it was registered)."""
        return self._mapping.size()

    def close(self) -> None:
        """Unmap now, or, while a tensor still views the mapping, when the last view is freed."""
        mapping, self._mapping = self._mapping, None
        if mapping is None:
            return
        try:
            mapping.close()
        except BufferError:  # exported views hold the mmap object; freeing the last one unmaps it
            pass


class Lease:
    """The regions one request uses, held (mapped) until `release`; a context manager."""

    def __init__(self, registry: SharedMemoryRegistry | SharedMemoryOff):
        self._registry = registry
        self._held: list[_Region] = []

    def view(self, region: str, offset: int, byte_size: int, what: str) -> memoryview:
        """`byte_size` bytes from `offset` of `region`, for `what` (e.g. "input 'hidden_states'",
        named in errors); InvalidRequest when the region is unknown or too small."""
        held = self._registry._acquire(region, offset, byte_size, what)
        self._held.append(held)
        return held.view(offset, byte_size)

    def release(self) -> None:
        held, self._held = self._held, []
        for region in held:
            self._registry._release(region)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None) -> None:
        self.release()


def object_path(shm_dir: Path, key: str) -> Path:
    """Where the object `key` lives (`/dev/shm/input0` for "/input0" or "input0"); InvalidRequest
    for a key that names no object there."""
    name = key.lstrip("/")
    if not name or "/" in name or "\0" in name or name in (".", "..") or len(name.encode()) > 255:
        raise InvalidRequest(
            f"shared memory key {key!r} is not a POSIX shared memory object name: one name of at most 255 "
            f"bytes, optionally after a leading '/' (e.g. '/input0'), with no other '/'"
        )
    return shm_dir / name


class SharedMemoryRegistry:
    """The system shared memory regions registered with one router, by name."""

    extensions: tuple[str, ...] = (EXTENSION,)

    def __init__(self, shm_dir: Path = SHM_DIR, max_regions: int = MAX_REGIONS):
        self._dir = shm_dir
        self._max_regions = max_regions
        self._regions: dict[str, _Region] = {}

    def __repr__(self) -> str:
        return f"SharedMemoryRegistry(regions={sorted(self._regions)})"

    def register(self, name: str, key: str, offset: int, byte_size: int) -> RegionStatus:
        """Map `byte_size` bytes from `offset` of the object `key` as region `name`."""
        if not name:
            raise InvalidRequest("a shared memory region needs a name (the register request's name is empty)")
        if name in self._regions:
            held = self._regions[name].status
            raise InvalidRequest(
                f"shared memory region '{name}' is already registered (key {held.key!r}, offset {held.offset}, "
                f"{held.byte_size} bytes); unregister it first or use another name"
            )
        if len(self._regions) >= self._max_regions:
            raise InvalidRequest(
                f"{len(self._regions)} shared memory regions are registered, the most this router maps; "
                f"unregister some first"
            )
        if byte_size <= 0:
            raise InvalidRequest(f"shared memory region '{name}' has byte_size {byte_size}; it must be at least 1")
        path = object_path(self._dir, key)
        fd = _open(path, name, key)
        try:
            size = _object_size(fd, name, key, path)
            if offset + byte_size > size:
                raise InvalidRequest(
                    f"shared memory region '{name}' (offset {offset} + byte_size {byte_size} = {offset + byte_size} "
                    f"bytes) goes beyond the object {key!r} ({path}), which has {size} bytes"
                )
            start = offset - offset % mmap.ALLOCATIONGRANULARITY  # a mapping starts at a page boundary
            try:
                mapping = mmap.mmap(fd, offset + byte_size - start, flags=mmap.MAP_SHARED,
                                    prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=start)
            except OSError as err:
                raise InvalidRequest(f"cannot map shared memory region '{name}' of {path}: {err.strerror}") from None
        finally:
            os.close(fd)  # the mapping keeps its own descriptor
        status = RegionStatus(name, key, offset, byte_size)
        self._regions[name] = _Region(status, mapping, offset - start)
        return status

    def unregister(self, name: str = "") -> list[str]:
        """Unregister region `name`, or every region when `name` is empty; returns the names
        unregistered. An unknown name unregisters nothing (as in Triton: unregistering is
        idempotent). A region in use by a request is unmapped once that request is answered."""
        names = sorted(self._regions) if not name else [name] if name in self._regions else []
        for each in names:
            region = self._regions.pop(each)
            region.unregistered = True
            if region.users == 0:
                region.close()
        return names

    def status(self, name: str = "") -> list[RegionStatus]:
        """Region `name`, or every region when `name` is empty (sorted by name)."""
        if not name:
            return [self._regions[n].status for n in sorted(self._regions)]
        if name not in self._regions:
            raise InvalidRequest(f"shared memory region '{name}' is not registered; {self._registered()}")
        return [self._regions[name].status]

    def lease(self) -> Lease:
        return Lease(self)

    def close(self) -> None:
        """Unregister every region (the server stops)."""
        self.unregister("")

    def _registered(self) -> str:
        names = sorted(self._regions)
        if not names:
            return "no region is registered"
        shown = ", ".join(repr(n) for n in names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
        return f"registered: {shown}"

    def _acquire(self, name: str, offset: int, byte_size: int, what: str) -> _Region:
        region = self._regions.get(name)
        if region is None:
            raise InvalidRequest(
                f"{what} names shared memory region '{name}', which is not registered; {self._registered()}"
            )
        size = region.status.byte_size
        if offset + byte_size > size:
            raise InvalidRequest(
                f"{what}: shared_memory_offset {offset} + shared_memory_byte_size {byte_size} = "
                f"{offset + byte_size} bytes go beyond shared memory region '{name}', which has {size} bytes"
            )
        needed, now = region.status.offset + region.status.byte_size, region.object_size()
        if now < needed:
            raise InvalidRequest(
                f"{what}: the shared memory object {region.status.key!r} of region '{name}' has shrunk to {now} "
                f"bytes since it was registered (the region needs {needed}); unregister it and register it again"
            )
        region.users += 1
        return region

    def _release(self, region: _Region) -> None:
        region.users -= 1
        if region.users == 0 and region.unregistered:
            region.close()


class SharedMemoryOff:
    """The extension when it is off: every call says how to turn it on."""

    extensions: tuple[str, ...] = ()

    def __repr__(self) -> str:
        return "SharedMemoryOff()"

    def register(self, name: str, key: str, offset: int, byte_size: int) -> RegionStatus:
        raise Unsupported(OFF_MESSAGE)

    def unregister(self, name: str = "") -> list[str]:
        raise Unsupported(OFF_MESSAGE)

    def status(self, name: str = "") -> list[RegionStatus]:
        raise Unsupported(OFF_MESSAGE)

    def lease(self) -> Lease:
        return Lease(self)

    def close(self) -> None:
        pass

    def _acquire(self, name: str, offset: int, byte_size: int, what: str) -> _Region:
        raise Unsupported(f"{what} names shared memory region '{name}', but {OFF_MESSAGE}")

    def _release(self, region: _Region) -> None:
        pass


def _open(path: Path, name: str, key: str) -> int:
    try:
        return os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        raise InvalidRequest(
            f"cannot register shared memory region '{name}': no shared memory object has key {key!r} ({path} does "
            f"not exist); create it first (e.g. tritonclient.utils.shared_memory.create_shared_memory_region)"
        ) from None
    except OSError as err:  # EACCES, ELOOP (a symbolic link), EISDIR, ...
        raise InvalidRequest(
            f"cannot register shared memory region '{name}': cannot open {path} read-write ({err.strerror})"
        ) from None


def _object_size(fd: int, name: str, key: str, path: Path) -> int:
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        raise InvalidRequest(
            f"cannot register shared memory region '{name}': key {key!r} ({path}) is not a shared memory object"
        )
    return info.st_size
