"""The pixel-size check: physical-style particles (tests/physical_particles.py, 64 px, 2 Å/px,
CTF) labelled at their own pixel size pass, labelled 20 % off give a warning naming the pixel
size that fits, labelled at half or twice it are refused; noise alone cannot decide."""
import numpy as np
import pytest

from continuousflex_dl.core.hemnma import pixel_size as ps
from continuousflex_dl.core.imaging.ctf import CTFParams
from continuousflex_dl.tests import physical_particles as pp

TRUE_PIXEL = 2.0


@pytest.fixture(scope="module")
def particles():
    data = pp.adenylate_kinase_set(40, pixel_size=TRUE_PIXEL, seed=3)
    return data, data.noisy(0.1, seed=4)


def _check(data, images, label):
    """The check of images labelled ``label`` Å/px, with the CTF a CTF estimation at that label
    finds: the same rings in pixel frequency, so the defocus scales with the label squared."""
    dz = np.asarray(data.ctf.defocus_u) * (label / TRUE_PIXEL) ** 2
    return ps.check_pixel_size(images, data.coords, label, ctf=CTFParams(defocus_u=dz, defocus_v=dz),
                               sigma=data.sigma, weights=data.weights)


def test_right_pixel_size_passes(particles):
    check = _check(*particles, TRUE_PIXEL)
    level, message = check.verdict()
    assert level == "ok", message
    assert abs(check.fitted / TRUE_PIXEL - 1) < 0.10, check.fitted      # measured 1.93 Å/px


@pytest.mark.parametrize("label", [1.0, 4.0])
def test_half_and_twice_the_pixel_size_are_refused(particles, label):
    check = _check(*particles, label)
    level, message = check.verdict()
    assert level == "refuse", message
    assert abs(check.fitted / TRUE_PIXEL - 1) < 0.10, check.fitted
    assert f"{check.fitted:.3g} Å/px" in message and "Import the particles" in message


def test_a_doubtful_pixel_size_gives_a_warning(particles):
    check = _check(*particles, 1.6)
    level, message = check.verdict()
    assert level == "warning", message
    assert abs(check.fitted / TRUE_PIXEL - 1) < 0.10 and "pixel size that fits" in message


def test_noise_alone_cannot_decide(particles):
    data, images = particles
    noise = np.random.default_rng(0).normal(size=images.shape).astype(np.float32)
    check = ps.check_pixel_size(noise, data.coords, TRUE_PIXEL, ctf=data.ctf, sigma=data.sigma)
    assert check.fitted is None and check.verdict()[0] == "undecided"


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="stack"):
        ps.check_pixel_size(np.zeros((4, 8, 6)), np.zeros((3, 3)), 1.0)
    with pytest.raises(ValueError, match="positive"):
        ps.check_pixel_size(np.zeros((4, 8, 8)), np.zeros((3, 3)), 0.0)
