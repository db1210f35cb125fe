"""SPIDER images and stacks (.stk, .spi, .xmp): the format of SPIDER, Xmipp and ContinuousFlex.

Read as SPIDER documents it (https://spider.wadsworth.org/spider_doc/spider/docs/image_doc.html):
a header of ``LABBYT`` bytes made of 4-byte floats (1-based word positions: 1 NZ, 2 NY,
5 IFORM, 12 NX, 22 LABBYT, 24 ISTACK, 26 MAXIM), then 32-bit float pixels, one row of NX
values after another. A stack (ISTACK > 0 in its overall header) holds MAXIM images, each
behind an image header of the same LABBYT bytes. The byte order is the writer's machine's:
the one under which the header reads as a sound 2D image or stack is used.

Images are memory-mapped, never read whole; :func:`open_spider` gives an (M, NY, NX) view
whose image ``k`` is the stack's image ``k + 1``, indexed ``[y, x]`` in the order SPIDER
stores the rows (as Xmipp and Scipion read them).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Union

import numpy as np

__all__ = ["SPIDER_EXTENSIONS", "SpiderHeader", "read_spider_header", "open_spider"]

#: File name extensions of SPIDER images and stacks (Xmipp writes .xmp and .stk as SPIDER).
SPIDER_EXTENSIONS = (".stk", ".spi", ".xmp", ".spider")
#: IFORM of a 2D real image (3 is a volume, negative values are Fourier transforms).
IFORM_IMAGE = 1
#: The smallest header SPIDER writes: 256 words.
MIN_HEADER_BYTES = 1024


@dataclass(frozen=True)
class SpiderHeader:
    """What locates the images of a SPIDER file: ``n_images`` of ``ny`` x ``nx`` px,
    ``header_bytes`` (LABBYT) before the first data and before every image of a stack,
    ``stack`` (images behind their own headers), ``byte_order`` '<' or '>'."""
    n_images: int
    ny: int
    nx: int
    header_bytes: int
    stack: bool
    byte_order: str

    @property
    def image_bytes(self) -> int:
        return self.ny * self.nx * 4

    @property
    def file_bytes(self) -> int:
        """The size the header promises."""
        per_image = self.image_bytes + (self.header_bytes if self.stack else 0)
        return self.header_bytes + self.n_images * per_image


def _words(raw: bytes, order: str) -> np.ndarray:
    return np.frombuffer(raw, dtype=f"{order}f4").astype(float)


def _sound(w: np.ndarray) -> bool:
    """Whether the first 27 header words (0-based: w[k] is word k + 1) read as a SPIDER header."""
    if not np.all(np.isfinite(w)):
        return False
    nz, ny, nx, labbyt = w[0], w[1], w[11], w[21]
    integral = all(v == int(v) for v in (nz, ny, nx, labbyt, w[4], w[23], w[25]))
    return (integral and 1 <= nx < 2 ** 20 and 1 <= ny < 2 ** 20 and 1 <= nz < 2 ** 20
            and labbyt >= MIN_HEADER_BYTES and labbyt % 4 == 0 and labbyt < 2 ** 24)


def read_spider_header(path: Union[str, os.PathLike]) -> SpiderHeader:
    """The header of a SPIDER file of 2D images, checked against the file's size.

    Raises ValueError saying what is wrong and what to do: the file is missing, too short
    for a header, not SPIDER in either byte order, a volume or a Fourier transform rather
    than 2D images, or truncated (the message gives both sizes).
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ValueError(f"Particle stack not found: {path}")
    with open(path, "rb") as f:
        raw = f.read(27 * 4)
    if len(raw) < 27 * 4:
        raise ValueError(f"{path}: the file is shorter than a SPIDER header ({MIN_HEADER_BYTES} bytes): it is "
                         f"not a particle stack. Copy it again or rerun the protocol that wrote it.")
    for order in "<>":
        w = _words(raw, order)
        if _sound(w):
            break
    else:
        raise ValueError(f"{path}: the header is not a SPIDER header in either byte order (its sizes are not "
                         f"positive whole numbers), so the images cannot be located. Check that the file is "
                         f"a SPIDER/Xmipp image or stack; restore it from a copy, or extract or import the "
                         f"particles again.")
    nz, ny, nx, iform, labbyt, istack, maxim = (int(w[0]), int(w[1]), int(w[11]), int(w[4]), int(w[21]),
                                                int(w[23]), int(w[25]))
    if iform != IFORM_IMAGE or nz != 1:
        what = "a 3D volume" if nz > 1 or iform == 3 else f"not a real 2D image (IFORM {iform})"
        raise ValueError(f"{path} is {what} ({nx} x {ny} x {nz} px), not 2D particle images: give a stack of "
                         f"2D particles.")
    stack = istack > 0
    header = SpiderHeader(n_images=maxim if stack else 1, ny=ny, nx=nx, header_bytes=labbyt, stack=stack,
                          byte_order=order)
    if stack and maxim < 1:
        raise ValueError(f"{path}: the SPIDER stack header says it holds {maxim} images: it is empty or "
                         f"damaged. Restore it from a copy, or extract or import the particles again.")
    actual = os.path.getsize(path)
    if actual < header.file_bytes:
        per_image = header.image_bytes + (labbyt if stack else 0)
        complete = max(0, (actual - labbyt) // per_image)
        raise ValueError(f"{path} is truncated: {actual:,} bytes where its SPIDER header promises "
                         f"{header.n_images} images of {nx} x {ny} px ({header.file_bytes:,} bytes); only "
                         f"{complete} images are complete. The file was cut short (an interrupted copy or "
                         f"write): copy it again or rerun the protocol that wrote it.")
    return header


def open_spider(path: Union[str, os.PathLike]) -> np.ndarray:
    """The images of a SPIDER file as a read-only memory map (M, NY, NX) float32 (in the
    file's byte order), checked by :func:`read_spider_header`."""
    h = read_spider_header(path)
    words = h.header_bytes // 4
    if not h.stack:
        return np.memmap(path, dtype=f"{h.byte_order}f4", mode="r", offset=h.header_bytes,
                         shape=(1, h.ny, h.nx))
    rows = np.memmap(path, dtype=f"{h.byte_order}f4", mode="r", offset=h.header_bytes,
                     shape=(h.n_images, words + h.ny * h.nx))
    return rows[:, words:].reshape(h.n_images, h.ny, h.nx)
