"""Synthetic water Cherenkov events in a Super-K-like tank: our stand-in for WAND (a LUCiD simulation), which cannot
be downloaded here. An event is the PMTs that saw light: per hit PMT its position, charge (photoelectrons, PE) and
time, and which particle's ring gave it most of its charge.

Physics, in brief (metres, nanoseconds, MeV; pure water, n = 1.33):
- Tank: a vertical cylinder (radius 16.9 m, half-height 18.1 m) lined with inward-facing 20-inch PMTs on a grid of
  about 0.71 m on the barrel and on both caps (about 10.8k PMTs).
- Particle guns: one vertex uniform in the fiducial volume, 1-5 particles (e-, mu-, gamma, pi+-, pi0) with isotropic
  directions and kinetic energies uniform in 1-2000 MeV.
- Charged tracks (mu, pi) go straight over their CSDA range in water (Bethe-Bloch). While beta > 1/n they radiate
  Cherenkov light on a cone of cos(theta) = 1 / (n beta), with the Frank-Tamm yield 2 pi alpha sin^2(theta)
  (1/l1 - 1/l2) photons per length between 300 and 600 nm. As a stopping muon slows, its cone narrows: its ring
  fills into a disc. Charged pions end at a hadronic interaction after an exponential free path, if they get that far.
- Electrons and photons shower (X0 = 36.08 cm): a shower radiates like a beta = 1 track of the shower's total charged
  track length (E over the minimum-ionising 2 MeV/cm), spread along a gamma-function longitudinal profile and over the
  angular spread of the shower's particles: fuzzy rings. A photon first travels an exponential distance (mean 9/7 X0)
  before it converts; its ring starts there.
- pi0 -> gamma gamma at the vertex: back to back with m/2 each in the pi0 frame, isotropic, boosted to the lab.
- Detection: the expected PE of a PMT from one emission step = photons x the cone's light per steradian towards the
  PMT x the PMT's solid angle (its projected area over r^2) x attenuation exp(-r / L) x quantum efficiency. Per
  particle the PE are Poisson; the charge of n PE is Gaussian with sigma = resolution x sqrt(n). A PMT's time is the
  charge-weighted mean of emission time (particles move at beta c) + r n / c, plus the transit-time spread. Dark
  noise: Poisson hits per PMT at the dark rate over the readout window, one PE each at a uniform time.
- Labels per hit PMT: `particle` (the particle that gave most of its PE, -1 for a dark-noise hit), that particle's
  `category`, and `contributors` (every particle that gave >= 1 PE: overlapping rings). Per event: the particles'
  truth (the `particles` struct of the event schema) and `rings`, the number of particles whose ring has at least
  `ring_min_pe` PE.

Every event is drawn from its own generator seeded by (seed, event index), like the LArTPC generator's.
"""

from __future__ import annotations

import functools
import math

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from raysvc.data.contract.detectors.wch import WCH
from raysvc.data.sources.physics import isotropic, range_table

N_WATER = 1.33
C_M_PER_NS = 0.299792458
ALPHA = 1 / 137.036
X0_M = 0.3608  # radiation length of water
MIP_MEV_PER_M = 200.0  # minimum-ionising dE/dx of water, 2 MeV/cm
CRITICAL_MEV = 78.0  # critical energy of water (Rossi)
MASS = {"electron": 0.51099895, "muon": 105.658, "pion": 139.570, "gamma": 0.0, "pi0": 134.977}
# Categories of the per-hit labels and of the event's particles (index = class id).
CATEGORIES = WCH.labels["pid"].classes  # ("gamma", "electron", "muon", "pion", "pi0")
CATEGORY = {name: i for i, name in enumerate(CATEGORIES)}


class WChGeneratorConfig(BaseModel):
    """Knobs of the synthetic tank, its PMTs and the particle guns; defaults follow a Super-K-like detector."""

    model_config = ConfigDict(extra="forbid")
    radius_m: float = Field(16.9, gt=0)
    half_height_m: float = Field(18.1, gt=0)
    pmt_spacing_m: float = Field(0.717, gt=0, description="PMT grid pitch on the barrel and the caps")
    pmt_radius_m: float = Field(0.254, gt=0, description="photocathode radius (20-inch PMT)")
    fiducial_margin_m: float = Field(2.0, ge=0, description="vertices keep this distance from every wall")
    particles: dict[int, float] = Field(
        default_factory=lambda: {1: 0.4, 2: 0.25, 3: 0.15, 4: 0.1, 5: 0.1},
        description="relative probability of each number of gun particles per event",
    )
    species: dict[str, float] = Field(
        default_factory=lambda: {"electron": 1.0, "muon": 1.0, "gamma": 1.0, "pion": 1.0, "pi0": 1.0},
        description="relative probability of each gun species",
    )
    kinetic_mev: tuple[float, float] = Field((1.0, 2000.0), description="uniform kinetic energy range of the guns")
    quantum_efficiency: float = Field(0.18, gt=0, le=1, description="PE per photon that reaches a photocathode")
    attenuation_m: float = Field(60.0, gt=0, description="light attenuation length in water")
    tts_ns: float = Field(1.5, ge=0, description="PMT transit-time spread (Gaussian sigma)")
    charge_resolution: float = Field(0.3, ge=0, description="charge sigma of one PE (scales with sqrt(PE))")
    dark_rate_khz: float = Field(4.2, ge=0, description="dark-noise rate per PMT")
    window_ns: tuple[float, float] = Field((-200.0, 800.0), description="readout window, vertex time 0")
    step_m: float = Field(0.1, gt=0, le=0.5, description="emission step along tracks and showers")
    track_spread_deg: float = Field(1.5, ge=0, description="angular spread of a track's light (scattering)")
    shower_spread_deg: float = Field(12.0, gt=0, description="angular spread of a shower's light")
    pion_interaction_m: float = Field(1.0, gt=0, description="mean free path of a charged pion before it interacts")
    ring_min_pe: float = Field(20.0, ge=0, description="PE a particle's ring needs to count in `rings`")

    @model_validator(mode="after")
    def _check(self) -> WChGeneratorConfig:
        unknown = sorted(set(self.species) - set(MASS) - {"gamma"})
        if unknown:
            raise ValueError(f"species {unknown} unknown; known: {sorted(MASS)}")
        if not self.particles or min(self.particles) < 1:
            raise ValueError(f"particles must give weights to counts >= 1, got {self.particles}")
        lo, hi = self.kinetic_mev
        if not 0 < lo < hi:
            raise ValueError(f"kinetic_mev must be (low, high) with 0 < low < high, got {self.kinetic_mev}")
        return self


# --- geometry ------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=4)
def _pmt_layout(radius: float, half_height: float, spacing: float) -> tuple[np.ndarray, np.ndarray]:
    """(positions (P, 3), inward unit normals (P, 3)): barrel rings, then the bottom and top caps."""
    n_phi = round(2 * math.pi * radius / spacing)
    n_z = round(2 * half_height / spacing)
    phi = (np.arange(n_phi) + 0.5) * 2 * math.pi / n_phi
    z = -half_height + (np.arange(n_z) + 0.5) * 2 * half_height / n_z
    pp, zz = np.meshgrid(phi, z)
    barrel = np.column_stack([radius * np.cos(pp.ravel()), radius * np.sin(pp.ravel()), zz.ravel()])
    barrel_n = np.column_stack([-np.cos(pp.ravel()), -np.sin(pp.ravel()), np.zeros(pp.size)])
    g = (np.arange(-radius, radius + 1e-9, spacing)) + (radius % spacing) / 2 - spacing / 2
    gx, gy = np.meshgrid(g, g)
    keep = gx.ravel() ** 2 + gy.ravel() ** 2 <= (radius - spacing / 2) ** 2
    xy = np.column_stack([gx.ravel()[keep], gy.ravel()[keep]])
    caps, caps_n = [], []
    for sign in (-1.0, 1.0):
        caps.append(np.column_stack([xy, np.full(len(xy), sign * half_height)]))
        caps_n.append(np.tile([0.0, 0.0, -sign], (len(xy), 1)))
    return np.concatenate([barrel, *caps]), np.concatenate([barrel_n, *caps_n])


def pmt_layout(cfg: WChGeneratorConfig) -> tuple[np.ndarray, np.ndarray]:
    return _pmt_layout(cfg.radius_m, cfg.half_height_m, cfg.pmt_spacing_m)


def inside_tank(cfg: WChGeneratorConfig, p: np.ndarray, margin: float = 0.0) -> np.ndarray:
    p = np.atleast_2d(p)
    return (np.hypot(p[:, 0], p[:, 1]) < cfg.radius_m - margin) & (np.abs(p[:, 2]) < cfg.half_height_m - margin)


def distance_to_wall(cfg: WChGeneratorConfig, start: np.ndarray, d: np.ndarray) -> float:
    """Path length from `start` (inside) along the unit vector `d` to the tank's surface."""
    a = d[0] ** 2 + d[1] ** 2
    b = 2 * (start[0] * d[0] + start[1] * d[1])
    c = start[0] ** 2 + start[1] ** 2 - cfg.radius_m**2
    s_barrel = (-b + math.sqrt(max(b * b - 4 * a * c, 0.0))) / (2 * a) if a > 1e-12 else math.inf
    s_cap = (math.copysign(cfg.half_height_m, d[2]) - start[2]) / d[2] if abs(d[2]) > 1e-12 else math.inf
    return max(min(s_barrel, s_cap), 0.0)


# --- Cherenkov light -----------------------------------------------------------------------------------------
def cherenkov_cos(beta: np.ndarray | float, n: float = N_WATER) -> np.ndarray:
    """cos(theta) of the Cherenkov cone, 1 / (n beta); NaN below threshold (beta <= 1 / n)."""
    beta = np.asarray(beta, float)
    with np.errstate(divide="ignore"):
        c = 1.0 / (n * beta)
    return np.where(c < 1.0, c, np.nan)


def frank_tamm_per_m(beta: np.ndarray | float, n: float = N_WATER, nm: tuple[float, float] = (300.0, 600.0)):
    """Cherenkov photons per metre between two wavelengths: 2 pi alpha sin^2(theta) (1/l1 - 1/l2); 0 below threshold."""
    c = cherenkov_cos(beta, n)
    sin2 = np.where(np.isnan(c), 0.0, 1.0 - np.nan_to_num(c) ** 2)
    return 2 * math.pi * ALPHA * sin2 * (1 / (nm[0] * 1e-9) - 1 / (nm[1] * 1e-9))


@functools.lru_cache(maxsize=8)
def _water_range(mass: float) -> tuple[np.ndarray, np.ndarray]:
    """(T grid in MeV, CSDA range in m) of a particle of this mass in water (Z/A 0.5551, 1 g/cm^3, I 75 eV)."""
    t, _, r_cm = range_table(mass, 0.5551, 1.0, 75e-6, 1.5, 60.0)
    return t, r_cm / 100.0


def expected_pe(
    cfg: WChGeneratorConfig,
    points: np.ndarray,
    dirs: np.ndarray,
    photons: np.ndarray,
    cos_theta: np.ndarray,
    spread: np.ndarray,
    times: np.ndarray,
    pmts: np.ndarray,
    normals: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """(expected PE per PMT, PE-weighted sum of arrival times per PMT) of emission steps: each emits `photons` on a
    cone of half-angle arccos(cos_theta) around `dirs` with a Gaussian angular spread (rad) at time `times`."""
    lam = np.zeros(len(pmts))
    lam_t = np.zeros(len(pmts))
    area = math.pi * cfg.pmt_radius_m**2
    theta = np.arccos(np.clip(cos_theta, -1, 1))
    for a in range(0, len(points), 32):  # blocks of steps x all PMTs bound the memory
        sl = slice(a, a + 32)
        v = pmts[None, :, :] - points[sl, None, :]
        r = np.linalg.norm(v, axis=2)
        u = v / r[..., None]
        incidence = -np.einsum("spk,pk->sp", u, normals)  # cos of the angle on the photocathode
        alpha = np.arccos(np.clip(np.einsum("spk,sk->sp", u, dirs[sl]), -1, 1))
        sig = spread[sl, None]
        # light per steradian at polar angle alpha: a Gaussian ring of width sig around theta, over 2 pi sin(alpha)
        dens = np.exp(-0.5 * ((alpha - theta[sl, None]) / sig) ** 2) / (math.sqrt(2 * math.pi) * sig)
        dens /= 2 * math.pi * np.maximum(np.sin(alpha), np.sin(sig))
        omega = area * np.clip(incidence, 0, None) / r**2
        pe = photons[sl, None] * dens * omega * np.exp(-r / cfg.attenuation_m) * cfg.quantum_efficiency
        lam += pe.sum(0)
        lam_t += (pe * (times[sl, None] + r * N_WATER / C_M_PER_NS)).sum(0)
    return lam, lam_t


# --- particles -----------------------------------------------------------------------------------------------
def track_steps(cfg: WChGeneratorConfig, species: str, start, d, ke: float, rng) -> dict:
    """Emission steps of a muon or charged pion from `start` along `d`: straight, over its CSDA range (or to the
    wall, or, for a pion, to its hadronic interaction), with the local beta of each step."""
    mass = MASS[species]
    t_tab, r_tab = _water_range(mass)
    length = float(np.interp(ke, t_tab, r_tab))
    if species == "pion":
        length = min(length, float(rng.exponential(cfg.pion_interaction_m)))
    length = min(length, distance_to_wall(cfg, start, d))
    n = max(int(math.ceil(length / cfg.step_m)), 1)
    s = (np.arange(n) + 0.5) * length / n
    r0 = float(np.interp(ke, t_tab, r_tab))
    t_left = np.interp(np.maximum(r0 - s, 0.0), r_tab, t_tab)
    gamma = 1 + t_left / mass
    beta = np.sqrt(1 - 1 / gamma**2)
    cos_t = cherenkov_cos(beta)
    lit = ~np.isnan(cos_t)
    return {
        "points": start + s[lit, None] * d,
        "dirs": np.tile(d, (int(lit.sum()), 1)),
        "photons": frank_tamm_per_m(beta[lit]) * length / n,
        "cos_theta": cos_t[lit],
        "spread": np.full(int(lit.sum()), math.radians(cfg.track_spread_deg)),
        "times": s[lit] / C_M_PER_NS,  # the particle moves at ~c while it radiates
    }


def shower_steps(cfg: WChGeneratorConfig, species: str, start, d, energy: float, t0: float = 0.0) -> dict:
    """Emission steps of an electromagnetic shower of `energy` from `start` along `d`: beta = 1 light of the total
    charged track length E / (2 MeV/cm) along a gamma-function profile (Longo's parametrisation, b = 0.5)."""
    b = 0.5
    t_max = max(math.log(max(energy, 1.0) / CRITICAL_MEV) + (0.5 if species == "gamma" else -0.5), 0.0)
    a = b * t_max + 1
    depth = min((t_max + 8 / b) * X0_M, distance_to_wall(cfg, start, d))
    n = max(int(math.ceil(depth / cfg.step_m)), 1)
    s = (np.arange(n) + 0.5) * depth / n
    x = s / X0_M
    profile = x ** (a - 1) * np.exp(-b * x)
    profile = profile / profile.sum() if profile.sum() > 0 else np.full(n, 1.0 / n)
    # light of the shower's whole track length, as far as it reaches before the wall
    photons = frank_tamm_per_m(1.0) * energy / MIP_MEV_PER_M * profile
    return {
        "points": start + s[:, None] * d,
        "dirs": np.tile(d, (n, 1)),
        "photons": photons,
        "cos_theta": np.full(n, 1 / N_WATER),
        "spread": np.full(n, math.radians(cfg.shower_spread_deg)),
        "times": t0 + s / C_M_PER_NS,
    }


def pi0_decay(rng: np.random.Generator, direction: np.ndarray, ke: float) -> list[tuple[np.ndarray, float]]:
    """The two photons of pi0 -> gamma gamma: (direction, energy) each, from an isotropic back-to-back decay in the
    pi0 frame boosted along the pi0's direction."""
    m = MASS["pi0"]
    e = ke + m
    p = math.sqrt(e * e - m * m)
    gamma, beta_gamma = e / m, p / m
    k = isotropic(rng) * (m / 2)
    out = []
    for sign in (1.0, -1.0):
        kr = sign * k
        par = float(kr @ direction)
        perp = kr - par * direction
        e_lab = gamma * (m / 2) + beta_gamma * par
        p_vec = perp + (gamma * par + beta_gamma * (m / 2)) * direction
        out.append((p_vec / np.linalg.norm(p_vec), float(e_lab)))
    return out


# --- events --------------------------------------------------------------------------------------------------
def generate_wch_event(cfg: WChGeneratorConfig, seed: int, index: int) -> dict:
    """One event, a pure function of (cfg, seed, index). A draw whose PMTs all stay dark (a 1 MeV electron, say) is
    redrawn from the sub-seed (seed, index, attempt), so that events are never empty."""
    for attempt in range(100):
        key = [int(seed), int(index), 1] + ([attempt] if attempt else [])  # 1: another stream than the LArTPC's
        out = _draw_event(cfg, np.random.default_rng(np.random.SeedSequence(key)))
        if len(out["charge"]) and out["rings"] > 0:
            out["event_id"] = np.int64(index)
            return out
    raise RuntimeError(f"wch generator config produced 100 events without a ring for event {index}")


def _draw_event(cfg: WChGeneratorConfig, rng: np.random.Generator) -> dict:
    pmts, normals = pmt_layout(cfg)
    counts = np.array(sorted(cfg.particles))
    weights = np.array([cfg.particles[c] for c in counts], float)
    n_guns = int(rng.choice(counts, p=weights / weights.sum()))
    names = sorted(cfg.species)
    probs = np.array([cfg.species[s] for s in names], float)
    margin = cfg.fiducial_margin_m
    while True:  # uniform in the fiducial cylinder
        vertex = rng.uniform(-1, 1, 3) * [cfg.radius_m, cfg.radius_m, cfg.half_height_m - margin]
        if math.hypot(vertex[0], vertex[1]) < cfg.radius_m - margin:
            break
    truth: list[dict] = []
    lights: list[tuple[int, dict]] = []  # (particle id, emission steps)

    def add(species: str, start, d, ke: float, primary: bool) -> int:
        pid = len(truth)
        m = MASS[species]
        truth.append(
            {
                "species": species,
                "mass": m,
                "momentum": math.sqrt(ke * ke + 2 * ke * m),
                "direction": np.asarray(d, float),
                "vertex": np.asarray(start, float),
                "primary": primary,
            }
        )
        return pid

    for species in rng.choice(names, size=n_guns, p=probs / probs.sum()):
        species = str(species)
        d = isotropic(rng)
        ke = float(rng.uniform(*cfg.kinetic_mev))
        pid = add(species, vertex, d, ke, True)
        if species in ("muon", "pion"):
            lights.append((pid, track_steps(cfg, species, vertex, d, ke, rng)))
        elif species == "electron":
            lights.append((pid, shower_steps(cfg, species, vertex, d, ke)))
        elif species == "gamma":
            lights.append((pid, _photon(cfg, vertex, d, ke, rng)))
        else:  # pi0 -> gamma gamma at the vertex: the photons carry the rings
            for g_dir, g_e in pi0_decay(rng, d, ke):
                g = add("gamma", vertex, g_dir, g_e, False)
                lights.append((g, _photon(cfg, vertex, g_dir, g_e, rng)))
    return _detect(cfg, rng, pmts, normals, lights, truth, vertex)


def _photon(cfg: WChGeneratorConfig, vertex, d, energy: float, rng) -> dict:
    conv = min(float(rng.exponential(9 / 7 * X0_M)), distance_to_wall(cfg, vertex, d))
    return shower_steps(cfg, "gamma", vertex + conv * d, d, energy, t0=conv / C_M_PER_NS)


def _detect(cfg, rng, pmts, normals, lights, truth, vertex) -> dict:
    n_pmt = len(pmts)
    pe = np.zeros((len(truth), n_pmt), np.int64)
    t_sum = np.zeros(n_pmt)
    for pid, steps in lights:
        if not len(steps["photons"]):
            continue
        lam, lam_t = expected_pe(
            cfg,
            *(steps[k] for k in ("points", "dirs", "photons", "cos_theta", "spread")),
            steps["times"],
            pmts,
            normals,
        )
        pe[pid] = rng.poisson(lam)
        t_sum += np.where(lam > 0, lam_t / np.maximum(lam, 1e-300), 0.0) * pe[pid]
    total = pe.sum(0)
    lo, hi = cfg.window_ns
    dark = rng.random(n_pmt) < 1 - math.exp(-cfg.dark_rate_khz * 1e-6 * (hi - lo))
    hit = (total > 0) | dark
    idx = np.flatnonzero(hit)
    n_pe = total[idx] + dark[idx]
    charge = n_pe + rng.normal(size=len(idx)) * cfg.charge_resolution * np.sqrt(n_pe)
    light_t = np.where(total[idx] > 0, t_sum[idx] / np.maximum(total[idx], 1), np.inf)
    dark_t = np.where(dark[idx], rng.uniform(lo, hi, len(idx)), np.inf)
    time = np.minimum(light_t + rng.normal(size=len(idx)) * cfg.tts_ns, dark_t)
    owner = np.where(total[idx] > 0, pe[:, idx].argmax(0), -1)
    contrib = [np.flatnonzero(pe[:, j] > 0).astype(np.int32) for j in idx]
    ring_pe = pe.sum(1)
    return {
        "pmt": idx.astype(np.int32),
        "coord": pmts[idx].astype(np.float32),
        "charge": np.maximum(charge, 0.1).astype(np.float32),
        "time": time.astype(np.float32),
        "particle": owner.astype(np.int32),
        "category": np.array([CATEGORY[truth[o]["species"]] if o >= 0 else -1 for o in owner], np.int8),
        "contributors": contrib,
        "rings": int(sum(1 for p, t in enumerate(truth) if t["species"] != "pi0" and ring_pe[p] >= cfg.ring_min_pe)),
        "ring_pe": ring_pe.astype(np.int64),
        "particles": {
            "id": np.arange(len(truth), dtype=np.int32),
            "interaction": np.zeros(len(truth), np.int32),
            "pid": np.array([CATEGORY[t["species"]] for t in truth], np.int8),
            "mass": np.array([t["mass"] for t in truth], np.float32),
            "momentum": np.array([t["momentum"] for t in truth], np.float32),
            "direction": np.array([t["direction"] for t in truth], np.float32).reshape(-1, 3),
            "vertex": np.array([t["vertex"] for t in truth], np.float32).reshape(-1, 3),
            "primary": np.array([int(t["primary"]) for t in truth], np.int8),
        },
        "vertex": np.asarray(vertex, np.float32),
    }


# --- shards --------------------------------------------------------------------------------------------------
def to_cube(p_m: np.ndarray) -> np.ndarray:
    """Tank coordinates (m, origin at the tank's centre) -> the `wch` detector's (cm, origin at a corner of the cube
    that holds the tank)."""
    return (np.asarray(p_m, np.float64) * 100.0 + WCH.center).astype(np.float32)


def generate_wch_record(cfg: WChGeneratorConfig, seed: int, index: int) -> dict:
    """One event as a row of the event table (`detector = "wch"`): hit PMTs with charge in `energy`, `time`, the
    owning particle's category as `semantic` (dark noise: the stuff class) and `pid`, `contributors` and `rings`."""
    ev = generate_wch_event(cfg, seed, index)
    owner = ev["particle"]
    noise = owner < 0
    category = ev["category"].astype(np.int8)
    parts = dict(ev["particles"])
    parts["vertex"] = to_cube(parts["vertex"])
    return {
        "event_id": ev["event_id"],
        "coord": to_cube(ev["coord"]),
        "energy": ev["charge"],
        "time": ev["time"],
        "semantic": np.where(noise, WCH.stuff_class, category).astype(np.int8),
        "pid": np.where(noise, -1, category).astype(np.int8),
        "particle": owner,
        "interaction": np.where(noise, -1, 0).astype(np.int32),
        "fragment": owner,
        "contributors": ev["contributors"],
        "rings": ev["rings"],
        "particles": parts,
    }
