"""Damaged particle stacks are named with what is wrong and what to do (core/imaging/mrc.py)."""
import mrcfile
import numpy as np
import pytest

from continuousflex_dl.core.imaging.dataset import MrcsImageSource
from continuousflex_dl.core.imaging.mrc import check_mrc_stack


@pytest.fixture
def stack(tmp_path):
    """A sound stack of 4 float32 images of 16 x 16 px (4 * 1024 bytes of data)."""
    path = tmp_path / "particles.mrcs"
    mrcfile.new(str(path), np.arange(4 * 16 * 16, dtype=np.float32).reshape(4, 16, 16)).close()
    return path


def test_sound_stack_gives_its_size(stack):
    assert check_mrc_stack(stack) == (4, 16, 16)
    np.testing.assert_array_equal(MrcsImageSource([(stack, 3)]).read([0])[0, 0, :3], [768, 769, 770])


def test_zeroed_header_is_called_damaged(stack):
    data = stack.read_bytes()
    stack.write_bytes(bytes(1024) + data[1024:])
    with pytest.raises(ValueError, match=r"the MRC header is damaged \(it gives a size of 0 x 0 x 0 px"):
        check_mrc_stack(stack)
    with pytest.raises(ValueError, match="header is damaged.*import the particles again"):
        MrcsImageSource([(stack, 0)])  # the reader says the same


def test_truncated_stack_gives_expected_and_actual_size(stack):
    size = stack.stat().st_size
    assert size == 1024 + 4 * 16 * 16 * 4  # no extended header
    stack.write_bytes(stack.read_bytes()[:1024 + 2 * 1024 + 100])
    with pytest.raises(ValueError) as err:
        MrcsImageSource([(stack, 0)])
    message = str(err.value)
    assert "is truncated: 3,172 bytes" in message
    assert "promises 4 images of 16 x 16 px (5,120 bytes)" in message
    assert "only 2 images are complete" in message and "copy it again" in message


def test_file_shorter_than_a_header(stack, tmp_path):
    stack.write_bytes(stack.read_bytes()[:200])
    with pytest.raises(ValueError, match="shorter than an MRC header"):
        check_mrc_stack(stack)
    with pytest.raises(ValueError, match="Particle stack not found"):
        check_mrc_stack(tmp_path / "missing.mrcs")
