"""Ramp filters for FDK, applied along detector rows (u) in the frequency domain.

The ramp is the FFT of the discrete Ram-Lak kernel (Kak & Slaney, eq. 3.61: h[0] = 1/(4 d^2),
h[n odd] = -1/(n pi d)^2, h[n even] = 0), which has no DC error, times a window of the
normalised frequency f in [0, 1/2] cycles per sample:

=============  ==========================  (the same definitions as scikit-image's iradon)
ram-lak        1
shepp-logan    sinc(f) = sin(pi f) / (pi f)
cosine         cos(pi f)
hamming        0.54 + 0.46 cos(2 pi f)
hann           0.5 + 0.5 cos(2 pi f)
=============  ==========================
"""

from __future__ import annotations

import numpy as np

from dgf import errors

WINDOWS = ("ram-lak", "shepp-logan", "cosine", "hamming", "hann")


def _window(name: str, f: np.ndarray) -> np.ndarray:
    if name == "ram-lak":
        return np.ones_like(f)
    if name == "shepp-logan":
        return np.asarray(np.sinc(f), dtype=np.float64)
    if name == "cosine":
        return np.cos(np.pi * f)
    if name == "hamming":
        return 0.54 + 0.46 * np.cos(2 * np.pi * f)
    if name == "hann":
        return 0.5 + 0.5 * np.cos(2 * np.pi * f)
    raise errors.UsageError(f"unknown filter {name!r}; choose one of {', '.join(WINDOWS)}.")


def padded_length(n: int) -> int:
    """FFT length: a power of two at least twice the row, so the circular convolution of the
    row with the kernel equals the linear one."""
    return 1 << int(np.ceil(np.log2(max(2 * n, 64))))


def ramp(n: int, spacing: float, window: str = "ram-lak") -> np.ndarray:
    """Frequency response (rfft bins) of the windowed ramp for rows of ``n`` samples ``spacing``
    apart, including the ``spacing`` factor of the discrete convolution."""
    length = padded_length(n)
    k = np.arange(-(length // 2), length // 2)
    h = np.zeros(length)
    h[k == 0] = 1.0 / (4.0 * spacing ** 2)
    odd = k % 2 == 1
    h[odd] = -1.0 / (np.pi * k[odd] * spacing) ** 2
    response = np.real(np.fft.rfft(np.fft.ifftshift(h))) * spacing
    f = np.fft.rfftfreq(length)
    out: np.ndarray = (response * _window(window, f)).astype(np.float64)
    return out


def filter_rows(projections: np.ndarray, spacing: float, window: str = "ram-lak") -> np.ndarray:
    """Ramp-filter every row (last axis) of ``projections``; float32 result, same shape."""
    n = projections.shape[-1]
    length = padded_length(n)
    response = ramp(n, spacing, window)
    spectrum = np.fft.rfft(projections, n=length, axis=-1)
    spectrum *= response
    return np.fft.irfft(spectrum, n=length, axis=-1)[..., :n].astype(np.float32)
