"""One-off comparison of the stress test's two dose models (docs/STRESS.md): Fourier-shaped CT-like noise
(`ctseg.stress.perturb.correlated_noise`) vs projection-domain noise (radon, Poisson counts, filtered
back-projection; `projection_noise_slice`), both at the same std, on axial slices of a phantom case.

Prints the radially averaged noise power spectra (normalised to unit area), lag-1/2 autocorrelations and the
std inside vs outside the central half of the body (non-stationarity), and writes docs/stress_noise_nps.png.

    PYTHONPATH=src python benchmarks/compare_dose_noise.py [--in-plane 256] [--slices 4]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from ctseg.datasets.phantom import generate_case
from ctseg.evaluate.plots import _save, plt
from ctseg.stress.perturb import correlated_noise, estimate_noise_hu, projection_noise_slice

REPO = Path(__file__).resolve().parents[1]


def radial_nps(noise: np.ndarray, mask: np.ndarray, patch: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Radially averaged NPS (cycles/px, unit area) from patch x patch ROIs fully inside `mask`."""
    h, w = noise.shape[-2:]
    spectra = []
    for sl, m in zip(noise, mask):
        for y in range(0, h - patch + 1, patch // 2):
            for x in range(0, w - patch + 1, patch // 2):
                if m[y:y + patch, x:x + patch].all():
                    roi = sl[y:y + patch, x:x + patch].astype(np.float64)
                    roi = roi - roi.mean()
                    spectra.append(np.abs(np.fft.fft2(roi)) ** 2)
    nps = np.mean(spectra, axis=0)
    f = np.hypot(*np.meshgrid(np.fft.fftfreq(patch), np.fft.fftfreq(patch), indexing="ij"))
    bins = np.linspace(0, 0.5, 11)
    idx = np.digitize(f.ravel(), bins) - 1
    radial = np.array([nps.ravel()[idx == i].mean() if (idx == i).any() else np.nan for i in range(len(bins) - 1)])
    centres = (bins[:-1] + bins[1:]) / 2
    return centres, radial / np.nansum(radial)


def lag_corr(noise: np.ndarray, mask: np.ndarray, lag: int) -> float:
    n = np.where(mask, noise, 0.0)
    m = mask[:, :, lag:] & mask[:, :, :-lag]
    a, b = n[:, :, lag:][m], n[:, :, :-lag][m]
    return float(np.corrcoef(a, b)[0, 1])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--in-plane", type=int, default=256)
    p.add_argument("--slices", type=int, default=4)
    args = p.parse_args()
    case = generate_case(np.random.SeedSequence([0, 2]), size="full", in_plane=args.in_plane, num_slices=args.slices)
    image = case.image.array.astype(np.float32)
    sigma0 = estimate_noise_hu(case.image)
    sigma = sigma0 * np.sqrt(3.0)          # k = 2: added noise std sigma0 * sqrt(k^2 - 1)
    rng = np.random.default_rng(0)
    fourier = correlated_noise(image.shape[1:], image.shape[0], sigma, rng)
    projection = np.stack([projection_noise_slice(s, sigma, rng) for s in image])
    body = image > -500
    from scipy import ndimage

    inner = np.stack([ndimage.binary_erosion(b, iterations=args.in_plane // 10) for b in body])
    outer = body & ~inner
    print(f"phantom {image.shape}, own noise {sigma0:.1f} HU (estimated), added {sigma:.1f} HU (k = 2)")
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for name, noise in (("Fourier-shaped (stress 'dose')", fourier), ("projection domain (radon/Poisson/FBP)",
                                                                      projection)):
        f, nps = radial_nps(noise, body)
        peak = f[np.nanargmax(nps)]
        print(f"{name}: std body {noise[body].std():.1f} HU, inner {noise[inner].std():.1f} / outer "
              f"{noise[outer].std():.1f} HU; lag-1 corr {lag_corr(noise, body, 1):.2f}, lag-2 "
              f"{lag_corr(noise, body, 2):.2f}; NPS peak {peak:.3f} cycles/px")
        ax.plot(f, nps, marker="o", ms=3, label=name)
    ax.set_xlabel("spatial frequency (cycles/pixel)")
    ax.set_ylabel("NPS (unit area)")
    ax.set_title(f"noise power spectra, phantom {args.in_plane}x{args.in_plane}, k = 2")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    _save(fig, REPO / "docs" / "stress_noise_nps.png")
    print(f"written {REPO / 'docs' / 'stress_noise_nps.png'}")


if __name__ == "__main__":
    main()
