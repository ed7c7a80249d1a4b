"""Offline access to QEMU's persistent dirty bitmaps in qcow2 images.

The library of the ``qcow2-bitmap`` tool, without a subprocess or an NBD
socket: read bitmaps and their dirty extents, the guest's data through the
whole backing chain, edit bitmaps in crash-safe transactions, check and
repair images, and make, restore, apply and verify incremental backups.

    import qcow2_bitmap as qb

    with qb.open("disk.qcow2") as img:
        for offset, length, _ in img.extents("ckpt-1"):
            data = img.read(offset, length)

Every failure raises a subclass of :class:`Qcow2BitmapError` with ``kind``,
``object``, ``offset`` and the one-line ``message``. Dicts returned by
``check``, ``info``, ``repair``, ``backup``, ``verify``... carry the same keys
as the CLI's ``--json`` documents.
"""

from ._native import (
    MAX_READ,
    Bitmap,
    ClosedError,
    CorruptImageError,
    Edit,
    ExtentIter,
    Image,
    ImageIOError,
    InvalidInputError,
    LockedError,
    MapIter,
    NotFoundError,
    NotQcow2Error,
    Qcow2BitmapError,
    UnsupportedError,
    UntrustedBitmapError,
    __version__,
    apply,
    backup,
    edit,
    open,
    repair,
    restore,
    verify,
)

__all__ = [
    "MAX_READ",
    "Bitmap",
    "ClosedError",
    "CorruptImageError",
    "Edit",
    "ExtentIter",
    "Image",
    "ImageIOError",
    "InvalidInputError",
    "LockedError",
    "MapIter",
    "NotFoundError",
    "NotQcow2Error",
    "Qcow2BitmapError",
    "UnsupportedError",
    "UntrustedBitmapError",
    "__version__",
    "apply",
    "backup",
    "edit",
    "open",
    "repair",
    "restore",
    "verify",
]
