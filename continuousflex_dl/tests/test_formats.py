"""Image formats other than MRC: SPIDER stacks are read directly (core/imaging/spider.py),
TIFF and the other formats Scipion's image library reads are converted once into an MRC stack
in the run's folder (convert.native_stacks); a file that cannot be read is refused with the
reason. Files are written by independent writers: SPIDER by the few lines below, following
the SPIDER format documentation (image_doc.html), TIFF by tifffile."""
import numpy as np
import pytest
import tifffile

from continuousflex_dl import convert
from continuousflex_dl.core.imaging.dataset import MrcsImageSource
from continuousflex_dl.core.imaging.stacks import check_stack

HEADER_WORDS = 256  # LABBYT = 1024 bytes: a header of 256 4-byte words for images of 16 px


def write_spider_stack(path, images, order="<"):
    """SPIDER stack as its documentation describes it: an overall header (word 1 NZ=1, 2 NY,
    5 IFORM=1, 12 NX, 22 LABBYT, 23 LENBYT, 24 ISTACK=2, 26 MAXIM), then per image an image
    header (27 IMGNUM) and the NY rows of NX float32 values."""
    m, ny, nx = images.shape

    def header(imgnum):
        w = np.zeros(HEADER_WORDS, dtype=f"{order}f4")
        w[[0, 1, 4, 11, 21, 22]] = [1, ny, 1, nx, HEADER_WORDS * 4, nx * 4]
        w[12] = HEADER_WORDS * 4 / (nx * 4)  # LABREC
        if imgnum == 0:
            w[[23, 25]] = [2, m]
        else:
            w[26] = imgnum
        return w.tobytes()

    with open(path, "wb") as f:
        f.write(header(0))
        for k in range(m):
            f.write(header(k + 1) + images[k].astype(f"{order}f4").tobytes())


@pytest.fixture
def images():
    return np.random.default_rng(0).normal(size=(5, 16, 16)).astype(np.float32)


@pytest.mark.parametrize("order", ["<", ">"])
def test_spider_stack_reads_exactly_in_either_byte_order(tmp_path, images, order):
    path = tmp_path / "particles.stk"
    write_spider_stack(path, images, order)
    assert check_stack(path) == (5, 16, 16)
    np.testing.assert_array_equal(MrcsImageSource([(path, 3), (path, 0)]).read([0, 1]), images[[3, 0]])


def test_spider_reader_agrees_with_pwem_reader(tmp_path, images):
    from pwem.emlib.image.image_readers import STKImageReader
    path = tmp_path / "particles.stk"
    write_spider_stack(path, images)
    np.testing.assert_array_equal(MrcsImageSource([(path, 2)]).read([0])[0], STKImageReader.open(str(path))[2])


def test_truncated_spider_stack_says_so(tmp_path, images):
    path = tmp_path / "particles.stk"
    write_spider_stack(path, images)
    path.write_bytes(path.read_bytes()[:1024 + 2 * (1024 + 1024) + 10])
    with pytest.raises(ValueError, match=r"is truncated: 5,130 bytes where its SPIDER header promises 5 images "
                                         r"of 16 x 16 px \(11,264 bytes\); only 2 images are complete"):
        MrcsImageSource([(path, 0)])


def test_mrc_named_stk_is_not_read_as_spider(tmp_path, images):
    import mrcfile
    path = tmp_path / "particles.stk"
    mrcfile.new(str(path), images).close()
    with pytest.raises(ValueError, match="not a SPIDER header in either byte order"):
        check_stack(path)


def _parts(paths, indices, pixel_size=2.0):
    return convert.ParticleArrays(ids=np.arange(1, len(paths) + 1), stacks=list(paths),
                                  indices=np.array(indices), pixel_size=pixel_size, box=16)


def test_tiff_is_converted_once_into_an_mrc_stack(tmp_path, images):
    path = tmp_path / "particles.tif"
    tifffile.imwrite(str(path), images)  # one page per image
    parts = _parts([str(path)] * 3, [4, 1, 4])
    folder = tmp_path / "run" / "images"
    lines = convert.native_stacks(parts, str(folder))
    assert len(lines) == 1 and lines[0].startswith("Converted 2 images of ")  # only the images the set uses
    assert parts.stacks[0].endswith(".mrcs") and parts.stacks[0].startswith(str(folder))
    assert parts.indices.tolist() == [1, 0, 1]
    np.testing.assert_array_equal(MrcsImageSource(list(zip(parts.stacks, parts.indices))).read([0, 1, 2]),
                                  images[[4, 1, 4]])
    import mrcfile
    with mrcfile.open(parts.stacks[0]) as mrc:
        assert float(mrc.voxel_size.x) == pytest.approx(2.0)
    again = _parts([str(path)] * 3, [4, 1, 4])
    assert convert.native_stacks(again, str(folder))[0].startswith("Reused ")
    assert again.stacks == parts.stacks
    native = _parts([str(tmp_path / "x.mrcs")], [0])
    assert convert.native_stacks(native, str(folder)) == [] and native.stacks == [str(tmp_path / "x.mrcs")]


def test_unreadable_format_is_refused_with_the_reason(tmp_path, images):
    path = tmp_path / "particles.hdf"  # pwem reads EMAN's HDF only through the EMAN plugin
    path.write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(100))
    error = convert.stack_error(str(path))
    assert "cannot read .hdf files here (" in error and "convert the particles to an MRC stack" in error
    with pytest.raises(ValueError, match=r"cannot read \.hdf files here"):
        convert.native_stacks(_parts([str(path)], [0]), str(tmp_path / "images"))
    stk = tmp_path / "particles.stk"
    write_spider_stack(stk, images)
    assert convert.stack_error(str(stk)) is None
    assert "Particle stack not found" in convert.stack_error(str(tmp_path / "missing.tif"))


def test_cs_of_zero_is_kept_and_unset_values_take_the_defaults():
    from pwem.objects import Acquisition
    corrected = convert.read_ctf(Acquisition(voltage=200.0, sphericalAberration=0.0, amplitudeContrast=0.07),
                                 [(15000.0, 14000.0, 30.0, 0.0)])
    assert (corrected.column("cs")[0], corrected.column("voltage")[0]) == (0.0, 200.0)  # a Cs corrector
    unset = convert.read_ctf(Acquisition(), [(15000.0, 14000.0, 30.0, 0.0)])
    assert [unset.column(k)[0] for k in convert.DEFAULT_ACQUISITION] == list(convert.DEFAULT_ACQUISITION.values())
