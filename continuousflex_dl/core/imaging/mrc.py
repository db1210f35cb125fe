"""MRC particle stacks: the one check that a stack's header is sound and its data complete.

Light on purpose (numpy and mrcfile only) so that protocol forms can check their
inputs quickly; the reader (:class:`dataset.MrcsImageSource`) calls the same check.
"""
from __future__ import annotations

import os
import warnings
from typing import Tuple, Union

import mrcfile
import numpy as np
from mrcfile.utils import dtype_from_mode

__all__ = ["check_mrc_stack"]

#: Bytes of the fixed MRC header (the extended header, ``nsymbt`` bytes, follows it).
HEADER_BYTES = 1024


def check_mrc_stack(path: Union[str, os.PathLike]) -> Tuple[int, int, int]:
    """``(images, ny, nx)`` of an MRC stack whose header is sound and whose data is complete.

    Raises ValueError saying what is wrong and what to do: the file is missing, its
    header is damaged (a zero or negative size, an unknown data mode; a missing 'MAP '
    label alone is tolerated, as in old files), or it is truncated (fewer bytes than the
    header promises; the message gives both sizes).
    """
    if not os.path.exists(path):
        raise ValueError(f"Particle stack not found: {path}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # permissive reading warns; the checks below say it plainly
        try:
            with mrcfile.open(path, mode="r", permissive=True, header_only=True) as mrc:
                h = mrc.header
        except ValueError:  # shorter than a header
            h = None
    if h is None:
        raise ValueError(f"{path}: the file is shorter than an MRC header ({HEADER_BYTES} bytes): it is not a "
                         f"particle stack. Copy it again or rerun the protocol that wrote it.")
    nx, ny, nz, mode, ext = (int(h.nx), int(h.ny), int(h.nz), int(h.mode), int(h.nsymbt))
    try:
        itemsize = np.dtype(dtype_from_mode(mode)).itemsize
    except ValueError:
        itemsize = 0
    if min(nx, ny, nz) <= 0 or itemsize == 0 or ext < 0:
        raise ValueError(f"{path}: the MRC header is damaged (it gives a size of {nx} x {ny} x {nz} px "
                         f"and data mode {mode}), so the images cannot be located. "
                         f"Restore the file from a copy, or extract or import the particles again.")
    expected = HEADER_BYTES + ext + nx * ny * nz * itemsize
    actual = os.path.getsize(path)
    if actual < expected:
        complete = max(0, (actual - HEADER_BYTES - ext) // (nx * ny * itemsize))
        raise ValueError(f"{path} is truncated: {actual:,} bytes where its header promises {nz} images of "
                         f"{nx} x {ny} px ({expected:,} bytes); only {complete} images are complete. The file "
                         f"was cut short (an interrupted copy or write): copy it again or rerun the protocol "
                         f"that wrote it.")
    return nz, ny, nx
