"""Type stubs of the native module (re-exported by ``qcow2_bitmap``)."""

import os
from types import TracebackType
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Type, Union

_Path = Union[str, "os.PathLike[str]"]
_Progress = Callable[[int, int], Any]

__version__: str
MAX_READ: int
"""Largest ``Image.read`` in one call (1 GiB)."""

class Qcow2BitmapError(Exception):
    """Any error of qcow2_bitmap."""

    kind: str
    """``io``, ``not-qcow2``, ``unsupported``, ``corrupt``, ``invalid-input``,
    ``not-found``, ``untrusted``, ``locked``, ``closed`` (or ``other``)."""
    object: str
    """The structure or field the error is about (with the file name)."""
    offset: Optional[int]
    """The absolute file offset of the offending bytes, when known."""
    message: str
    """What is wrong, without the object and offset."""
    errno: Optional[int]
    """The system's error number for I/O errors."""

class LockedError(Qcow2BitmapError):
    """Another process (a QEMU) holds a conflicting lock on the image."""

class UntrustedBitmapError(Qcow2BitmapError):
    """The bitmap is in-use, stale or invalid: take a full backup, or force."""

class CorruptImageError(Qcow2BitmapError):
    """On-disk metadata breaks the format."""

class NotQcow2Error(Qcow2BitmapError):
    """The file is not a qcow2 image."""

class InvalidInputError(Qcow2BitmapError):
    """An argument is invalid."""

class NotFoundError(Qcow2BitmapError):
    """The named bitmap does not exist."""

class UnsupportedError(Qcow2BitmapError):
    """A valid qcow2 feature this library does not handle."""

class ImageIOError(Qcow2BitmapError):
    """Reading or writing a file failed."""

class ClosedError(Qcow2BitmapError):
    """The image or transaction was used after its ``with`` block."""

class Bitmap:
    """One bitmap of an image, as ``info`` reports it."""

    name: str
    granularity: int
    flags: List[str]
    """``in-use`` and ``auto`` when set."""
    enabled: bool
    """The ``auto`` flag: QEMU records writes into the bitmap."""
    state: str
    """``ok``, ``in-use``, ``stale`` or ``invalid``."""
    problem: Optional[str]
    dirty_bytes: Optional[int]
    """Dirty bytes, None unless the state is ``ok``."""
    table_offset: int
    table_size: int

class ExtentIter(Iterator[Tuple[int, int, bool]]):
    """Lazy ``(offset, length, dirty)`` runs of ``Image.extents``."""

    def __iter__(self) -> "ExtentIter": ...
    def __next__(self) -> Tuple[int, int, bool]: ...

class MapIter(Iterator[Dict[str, Any]]):
    """Lazy ``qemu-img map --output=json`` entries of ``Image.map``."""

    def __iter__(self) -> "MapIter": ...
    def __next__(self) -> Dict[str, Any]: ...

class Image:
    """A qcow2 image opened read-only with QEMU's reader locks."""

    @property
    def filename(self) -> str: ...
    @property
    def virtual_size(self) -> int: ...
    @property
    def cluster_size(self) -> int: ...
    @property
    def version(self) -> int: ...
    @property
    def closed(self) -> bool: ...
    @property
    def backing_chain(self) -> List[Dict[str, Any]]:
        """One dict per chain member, top first (``filename``, ``format``,
        ``virtual-size``, ``cluster-size``, ``backing-filename``...)."""
    @property
    def bitmaps(self) -> List[Bitmap]: ...
    def info(self) -> Dict[str, Any]:
        """The ``info --json`` document."""
    def extents(
        self,
        name: str,
        offset: Optional[int] = None,
        length: Optional[int] = None,
        all: bool = False,
        force: bool = False,
    ) -> ExtentIter:
        """Dirty extents (with ``all``, clean runs too) in guest bytes."""
    def hash(self, name: str, force: bool = False) -> str:
        """QEMU's ``x-debug-block-dirty-bitmap-sha256`` of the bitmap."""
    def map(self, offset: Optional[int] = None, length: Optional[int] = None) -> MapIter:
        """The allocation map of the guest view, as ``qemu-img map``."""
    def read(self, offset: int, length: int) -> bytes:
        """Guest bytes through the whole backing chain (at most MAX_READ)."""
    def check(self) -> Dict[str, Any]:
        """The ``check --json`` document."""
    def close(self) -> None: ...
    def __enter__(self) -> "Image": ...
    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> bool: ...

class Edit:
    """A write transaction: staged operations commit on a clean exit."""

    @property
    def filename(self) -> str: ...
    @property
    def active(self) -> bool: ...
    @property
    def notes(self) -> List[str]: ...
    def names(self) -> List[str]: ...
    def add(self, name: str, granularity: Optional[int] = None, disabled: bool = False) -> None: ...
    def remove(self, *names: str) -> None: ...
    def clear(self, name: str) -> None: ...
    def enable(self, name: str) -> None: ...
    def disable(self, name: str) -> None: ...
    def merge(
        self,
        target: str,
        sources: Union[str, Sequence[str]],
        source_image: Optional[_Path] = None,
    ) -> None: ...
    def commit(self) -> List[str]:
        """Writes everything staged; returns the warnings."""
    def discard(self) -> None: ...
    def __enter__(self) -> "Edit": ...
    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> bool: ...

def open(path: _Path, force_share: bool = False) -> Image:
    """Opens an image read-only (``force_share``: like ``-U``)."""

def edit(path: _Path) -> Edit:
    """Opens an image for a write transaction (QEMU's write locks)."""

def repair(path: _Path, dry_run: bool = False, in_use: str = "dirty") -> Dict[str, Any]:
    """The ``repair --json`` document of repairing the image."""

def backup(
    image: _Path,
    output: _Path,
    bitmap: Optional[str] = None,
    backing: Optional[str] = None,
    format: str = "qcow2",
    compress: bool = False,
    force_share: bool = False,
    next: Optional[str] = None,
    then: Optional[str] = None,
    progress: Optional[_Progress] = None,
) -> Dict[str, Any]:
    """A full or incremental backup; the ``backup --json`` document."""

def restore(
    backup: _Path, output: _Path, format: str = "qcow2", progress: Optional[_Progress] = None
) -> Dict[str, Any]:
    """Flattens a backup chain into a new image."""

def apply(backup: _Path, target: _Path, progress: Optional[_Progress] = None) -> Dict[str, Any]:
    """Lays one backup onto a raw image or block device."""

def verify(backup: _Path, source: Optional[_Path] = None) -> Dict[str, Any]:
    """The ``verify --json`` document."""
