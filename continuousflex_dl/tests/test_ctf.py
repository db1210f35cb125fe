"""CTF: wavelength, zeros against an independent scalar computation, astigmatism direction,
application in Fourier space and phase flipping."""
import math

import numpy as np
import pytest
import torch
from scipy.optimize import brentq

from continuousflex_dl.core.imaging.ctf import CTFParams, apply_ctf, ctf_image, electron_wavelength, phase_flip

# Physical constants (CODATA), for an independent wavelength.
H, M_E, Q_E, C = 6.62607015e-34, 9.1093837015e-31, 1.602176634e-19, 299792458.0


def wavelength_physics(kv):
    """lambda = h / sqrt(2 m e V (1 + e V / (2 m c^2))), in Å."""
    v = kv * 1e3
    return H / math.sqrt(2 * M_E * Q_E * v * (1 + Q_E * v / (2 * M_E * C ** 2))) * 1e10


def first_zero(dz, kv=300.0, cs_mm=2.7, q=0.1):
    """First zero (1/Å) of the CTF for defocus dz Å, solving the phase condition with brentq."""
    lam, cs = wavelength_physics(kv), cs_mm * 1e7
    phase = math.atan(q / math.sqrt(1 - q * q))

    def f(k):
        return math.pi * lam * dz * k ** 2 - 0.5 * math.pi * cs * lam ** 3 * k ** 4 + phase - math.pi

    return brentq(f, 1e-6, 1.0 / math.sqrt(lam * dz) * 1.5)


def test_wavelength_matches_physics():
    for kv in (100.0, 200.0, 300.0):
        assert abs(float(electron_wavelength(kv)) - wavelength_physics(kv)) < 1e-6
    assert abs(float(electron_wavelength(300.0)) - 0.019687) < 1e-5


@pytest.mark.parametrize("dz", [12000.0, 20000.0, 30000.0])
def test_first_zero_radius(dz):
    box, px = 64, 2.0
    ctf = ctf_image(CTFParams(dz, dz), box, px, dtype=torch.float64)[0].numpy()
    k0 = first_zero(dz)
    dk = 1.0 / (box * px)
    assert k0 < 0.5 / px  # inside Nyquist
    # Profile along +x (row 0): first sign change within one frequency sample of k0.
    prof = ctf[0]
    j = int(np.argmax(prof < 0))
    assert prof[:j].min() > 0 and j > 0
    assert abs(j * dk - k0) <= dk and abs((j - 1) * dk - k0) <= dk
    # Whole 2-D image: positive inside k0 - dk, negative between k0 + dk and the next zero.
    ky = np.fft.fftfreq(box, px)[:, None]
    kx = np.fft.rfftfreq(box, px)[None, :]
    k = np.sqrt(kx ** 2 + ky ** 2)
    assert (ctf[k < k0 - dk] > 0).all()
    band = (k > k0 + dk) & (k < k0 * 1.3)
    assert band.any() and (ctf[band] < 0).all()


def test_value_at_origin_and_phase_shift():
    q = 0.07
    c0 = ctf_image(CTFParams(15000.0, 15000.0, amplitude_contrast=q), 32, 1.5, dtype=torch.float64)
    assert abs(float(c0[0, 0, 0]) - q) < 1e-12
    c90 = ctf_image(CTFParams(15000.0, 15000.0, amplitude_contrast=q, phase_shift=90.0), 32, 1.5,
                    dtype=torch.float64)
    assert abs(float(c90[0, 0, 0]) - math.sqrt(1 - q * q)) < 1e-12


def test_astigmatism_direction():
    box, px, du, dv = 128, 2.0, 25000.0, 15000.0
    dk = 1.0 / (box * px)
    ku, kv_ = first_zero(du), first_zero(dv)
    assert kv_ - ku > 3 * dk
    # angle 0: U along x (row 0), V along y (column 0, rows 1..box/2).
    c = ctf_image(CTFParams(du, dv, 0.0), box, px, dtype=torch.float64)[0].numpy()
    along_x, along_y = c[0, :], c[: box // 2, 0]
    assert abs(int(np.argmax(along_x < 0)) * dk - ku) <= dk
    assert abs(int(np.argmax(along_y < 0)) * dk - kv_) <= dk
    # angle 30 deg: pixels within 3 deg of 30 deg see U, within 3 deg of 120 deg see V.
    box = 256
    dk = 1.0 / (box * px)
    c = ctf_image(CTFParams(du, dv, 30.0), box, px, dtype=torch.float64)[0].numpy()
    ky = np.fft.fftfreq(box, px)[:, None] * np.ones((1, box // 2 + 1))
    kx = np.fft.rfftfreq(box, px)[None, :] * np.ones((box, 1))
    k = np.hypot(kx, ky)
    theta = np.degrees(np.arctan2(ky, kx)) % 180.0
    for centre, k0 in ((30.0, ku), (120.0, kv_)):
        wedge = np.abs(theta - centre) < 3.0
        assert (c[wedge & (k < k0 - dk)] > 0).all()
        band = wedge & (k > k0 + dk) & (k < k0 * 1.3)
        assert band.sum() > 5 and (c[band] < 0).all()


def test_batch_and_validation():
    p = CTFParams(np.array([10000.0, 20000.0, 30000.0]), np.array([10000.0, 20000.0, 30000.0]), 0.0)
    assert p.batch_size == 3
    c = ctf_image(p, 32, 2.0)
    assert c.shape == (3, 32, 17) and c.dtype == torch.float32
    single = ctf_image(CTFParams(20000.0, 20000.0), 32, 2.0)
    assert torch.allclose(c[1], single[0], atol=1e-6)
    assert p.select(slice(1, 2)).batch_size == 1
    with pytest.raises(ValueError):
        CTFParams(np.ones(3), np.ones(4))
    with pytest.raises(ValueError):
        CTFParams(1e4, 1e4, amplitude_contrast=1.0)
    with pytest.raises(ValueError):
        ctf_image(CTFParams(1e4, 1e4), 32, 0.0)
    s = CTFParams.from_scipion(defocusU=1.2e4, defocusV=1.1e4, defocusAngle=15.0, voltage=200.0,
                               sphericalAberration=2.0, amplitudeContrast=0.07, phaseShift=None)
    assert (s.defocus_u, s.defocus_v, s.defocus_angle, s.voltage, s.cs, s.amplitude_contrast,
            s.phase_shift) == (1.2e4, 1.1e4, 15.0, 200.0, 2.0, 0.07, 0.0)


def test_columns_round_trip(tmp_path):
    """The npz columns of a CTF batch read back to the same parameters (relion-style isInverse)."""
    p = CTFParams(defocus_u=np.array([1.2e4, 9e3]), defocus_v=np.array([1.1e4, 8.5e3]),
                  defocus_angle=np.array([15.0, 170.0]), voltage=200.0, cs=2.0,
                  amplitude_contrast=0.07, phase_shift=np.array([0.0, 90.0]))
    np.savez(tmp_path / "c.npz", ids=np.arange(2), **p.to_columns())
    back = CTFParams.from_columns(np.load(tmp_path / "c.npz"))
    for name in ("defocus_u", "defocus_v", "defocus_angle", "voltage", "cs", "amplitude_contrast",
                 "phase_shift"):
        np.testing.assert_array_equal(back.column(name), p.column(name))
    assert back.batch_size == 2
    assert CTFParams.from_columns({"ids": np.arange(2)}) is None


def test_apply_ctf_and_phase_flip_against_numpy():
    rng = np.random.default_rng(0)
    box = 32
    img = rng.standard_normal((2, box, box))
    ctf = ctf_image(CTFParams([12000.0, 25000.0], [11000.0, 22000.0], 40.0), box, 1.8,
                    dtype=torch.float64)
    out = apply_ctf(torch.from_numpy(img), ctf).numpy()
    expected = np.fft.irfft2(np.fft.rfft2(img) * ctf.numpy(), s=(box, box))
    assert np.abs(out - expected).max() < 1e-10
    flipped = phase_flip(torch.from_numpy(out), ctf).numpy()
    # After flipping, the transfer is |CTF| >= 0 at every frequency.
    # (The Nyquist column kx = box/2 is excluded: there an astigmatic CTF is not Hermitian and
    # irfft2 keeps only its Hermitian part.)
    diff = np.fft.rfft2(flipped) - np.abs(ctf.numpy()) * np.fft.rfft2(img)
    assert np.abs(diff[..., :-1]).max() < 1e-9
    sign = np.where(ctf.numpy() < 0, -1.0, 1.0)
    assert (ctf.numpy() * sign >= 0).all()
    with pytest.raises(ValueError):
        apply_ctf(torch.zeros(2, box, box), ctf[:, :, :-1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    p = CTFParams([12000.0, 25000.0], [11000.0, 22000.0], 40.0)
    cpu = ctf_image(p, 64, 1.5)
    gpu = ctf_image(p, 64, 1.5, device="cuda")
    assert gpu.is_cuda and torch.allclose(cpu, gpu.cpu(), atol=1e-6)
