"""Physics shared by the event generators: Bethe-Bloch stopping power and CSDA range tables of a medium, and random
directions. Lengths in cm, energies in MeV."""

from __future__ import annotations

import math

import numpy as np

ME = 0.51099895  # electron mass, MeV
K_BETHE = 0.307075  # MeV cm^2 / mol


def range_table(
    mass: float, z_over_a: float, rho: float, i_mev: float, dedx_floor: float, dedx_cap: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(T grid, dE/dx(T) in MeV/cm, CSDA range R(T) in cm) of a particle of this mass in a medium (Z/A, density in
    g/cm^3, mean excitation energy): Bethe-Bloch without density correction, clipped to [floor, cap] and kept at its
    peak value below the Bethe peak, where the formula fails."""
    t = np.geomspace(0.05, 2e5, 4000)
    gamma = 1.0 + t / mass
    beta2 = 1.0 - 1.0 / gamma**2
    bg2 = beta2 * gamma**2
    ratio = ME / mass
    wmax = 2 * ME * bg2 / (1 + 2 * gamma * ratio + ratio**2)
    dedx = K_BETHE * z_over_a * rho / beta2 * (0.5 * np.log(2 * ME * bg2 * wmax / i_mev**2) - beta2)
    dedx = np.clip(np.where(np.isfinite(dedx) & (dedx > 0), dedx, dedx_cap), dedx_floor, dedx_cap)
    peak = int(np.argmax(dedx))
    dedx[:peak] = dedx[peak]
    r = np.concatenate([[0.0], np.cumsum(np.diff(t) / (0.5 * (dedx[1:] + dedx[:-1])))])
    return t, dedx, r


def cross3(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """`np.cross` of two 3-vectors, term for term the same float operations (so the same bits), without its
    general-shape overhead: half of a generated event's time went to np.cross on single vectors."""
    return np.array([a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0]])


def perp_basis(d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two unit vectors that make an orthonormal basis with the unit vector `d`."""
    a = np.array([1.0, 0.0, 0.0]) if abs(d[0]) < 0.9 else np.array([0.0, 1.0, 0.0])
    u = cross3(d, a)
    u /= np.linalg.norm(u)
    return u, cross3(d, u)


def isotropic(rng: np.random.Generator) -> np.ndarray:
    v = rng.normal(size=3)
    return v / np.linalg.norm(v)


def deflect(rng: np.random.Generator, d: np.ndarray, theta: float) -> np.ndarray:
    """`d` turned by the polar angle `theta` about a uniformly random azimuth."""
    u, v = perp_basis(d)
    phi = rng.uniform(0, 2 * math.pi)
    out = math.cos(theta) * d + math.sin(theta) * (math.cos(phi) * u + math.sin(phi) * v)
    return out / np.linalg.norm(out)
