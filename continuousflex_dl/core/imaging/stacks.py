"""Particle stack files that core reads directly: MRC (.mrc, .mrcs, .st, .map) and SPIDER
(.stk, .spi, .xmp). The one place that tells them apart by name and opens them.

Every other format Scipion's image library reads (TIFF, EM, DM4, ...) is converted once
into an MRC stack in the run's folder by the protocol layer (``convert.native_stacks``),
so that core and its chunk workers only ever meet the two formats below.
"""
from __future__ import annotations

import os
from typing import Tuple, Union


from .mrc import check_mrc_stack
from .spider import SPIDER_EXTENSIONS, open_spider, read_spider_header

__all__ = ["MRC_EXTENSIONS", "NATIVE_EXTENSIONS", "stack_format", "check_stack", "open_stack"]

#: File name extensions read as MRC (Scipion's ``path:mrc`` / ``path:mrcs`` suffix aside).
MRC_EXTENSIONS = (".mrc", ".mrcs", ".st", ".map", ".ali", ".rec")
NATIVE_EXTENSIONS = MRC_EXTENSIONS + SPIDER_EXTENSIONS


def stack_format(path: Union[str, os.PathLike]) -> str:
    """'mrc', 'spider', or '' (a format core does not read) from a file name's extension
    (case-insensitive)."""
    ext = os.path.splitext(os.fspath(path))[1].lower()
    if ext in MRC_EXTENSIONS:
        return "mrc"
    if ext in SPIDER_EXTENSIONS:
        return "spider"
    return ""


def check_stack(path: Union[str, os.PathLike]) -> Tuple[int, int, int]:
    """``(images, ny, nx)`` of a sound, complete MRC or SPIDER stack; ValueError with the
    reason and the fix otherwise (also for a file of another format)."""
    kind = stack_format(path)
    if kind == "mrc":
        return check_mrc_stack(path)
    if kind == "spider":
        h = read_spider_header(path)
        return h.n_images, h.ny, h.nx
    raise ValueError(f"{path}: core reads MRC ({', '.join(MRC_EXTENSIONS)}) and SPIDER "
                     f"({', '.join(SPIDER_EXTENSIONS)}) stacks only; other formats are converted to MRC "
                     f"in the run's folder by the protocols. Convert the file to an MRC stack.")


def open_stack(path: Union[str, os.PathLike]):
    """The images of an MRC or SPIDER stack as a memory-mapped array (M, ny, nx) (never read
    whole), and the object to close when done (or None). ValueError as :func:`check_stack`."""
    check_stack(path)
    if stack_format(path) == "spider":
        return open_spider(path), None
    import mrcfile
    handle = mrcfile.mmap(path, mode="r", permissive=True)
    data = handle.data
    if data is None:
        handle.close()
        raise ValueError(f"{path}: could not read image data.")
    return (data if data.ndim == 3 else data[None]), handle

