"""Synthetic LArTPC "particle bomb" events: our stand-in for PILArNet-M, which cannot be downloaded here.

Physics, in brief (lengths in cm, energies in MeV, liquid argon):
- Interaction vertices uniform in the fiducial volume, each emitting a few particles (mu, pi+-, p, e-, gamma);
  plus crossing muons entering through a face. Each vertex is one interaction id; each crossing muon is one too.
- Charged tracks are stepped along their CSDA range (Bethe-Bloch dE/dx, integrated into a range table), so dE/dx rises
  into a Bragg peak at the end; direction random-walks with the Highland multiple-scattering angle.
- Energetic tracks knock out delta rays (1/T^2 spectrum above a threshold, Bethe's rate); stopping muons decay into a
  Michel electron (spectrum x^2 (3 - 2x), E_max 52.8 MeV); stopping pions either decay (4.1 MeV muon + Michel) or are
  captured (short protons).
- Electrons and photons make EM showers: a branching cascade with radiation length X0 = 14 cm. Photons convert after an
  exponential distance (mean 9/7 X0), leaving a gap; above the critical energy electrons radiate bremsstrahlung
  photons; low-energy photons Compton scatter, and the small scatters (below `led_max_mev`) are the diffuse
  low-energy depositions (class 4) around showers.
- Deposits are voxelised on the 768^3 grid of 3 mm voxels: energy summed per voxel, labels of the largest deposit.

Every event is drawn from its own generator seeded by (seed, event index): an event is identical whatever shard or
worker produces it.
"""

from __future__ import annotations

import functools
import math

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from raysvc.data.contract.detectors import LARTPC
from raysvc.data.sources.physics import K_BETHE, ME, deflect, isotropic, perp_basis, range_table

DETECTOR = LARTPC  # the detector these events are written for: its geometry, label ids and `detector` column

# Liquid argon and particle constants.
X0_CM = 14.0  # radiation length
RHO = 1.396  # g/cm^3
Z_OVER_A = 18.0 / 39.948
I_MEV = 188e-6  # mean excitation energy
MASS = {"muon": 105.658, "pion": 139.570, "proton": 938.272, "electron": ME}
# Label ids from the detector's label spaces, by name: a renamed or reordered class fails here, not in a model.
PID = {name: DETECTOR.labels["pid"].classes.index(name) for name in ("photon", "electron", "muon", "pion", "proton")}
SHOWER, TRACK, MICHEL, DELTA, LED = map(DETECTOR.class_names.index, ("shower", "track", "michel", "delta", "led"))
MICHEL_EMAX = 52.83


class EnergyRange(BaseModel):
    model_config = ConfigDict(extra="forbid")
    low: float = Field(gt=0)
    high: float = Field(gt=0)


class GeneratorConfig(BaseModel):
    """Knobs of the synthetic detector and event mix; defaults are tuned to PILArNet-M's statistics."""

    model_config = ConfigDict(extra="forbid")
    volume_voxels: int = Field(int(DETECTOR.extent), gt=0, description="voxels per side of the cubic volume")
    voxel_cm: float = Field(DETECTOR.unit_mm / 10, gt=0, description="voxel pitch (cm)")
    fiducial_margin: float = Field(0.1, ge=0, lt=0.5, description="vertices keep this fraction of the side from walls")
    interactions_mean: float = Field(4.0, gt=0, description="mean number of vertices per event")
    interactions_std: float = Field(3.0, ge=0, description="spread of vertices per event (negative binomial)")
    particles_per_vertex_mean: float = Field(2.1, ge=1, description="mean primaries per vertex (>= 1)")
    crossing_muons_mean: float = Field(0.4, ge=0, description="Poisson mean of crossing muons per event")
    species: dict[str, float] = Field(
        default_factory=lambda: {"muon": 0.22, "pion": 0.16, "proton": 0.28, "electron": 0.17, "photon": 0.17},
        description="relative probability of each primary species at a vertex",
    )
    kinetic_mev: dict[str, EnergyRange] = Field(
        default_factory=lambda: {
            "muon": EnergyRange(low=80, high=2000),
            "pion": EnergyRange(low=60, high=1200),
            "proton": EnergyRange(low=40, high=600),
            "electron": EnergyRange(low=60, high=1500),
            "photon": EnergyRange(low=60, high=1500),
            "crossing_muon": EnergyRange(low=1000, high=4000),
        },
        description="kinetic energy range (MeV) of each species, sampled log-uniformly",
    )
    step_voxels: float = Field(0.5, gt=0, le=1, description="stepping length in voxels")
    delta_threshold_mev: float = Field(6.5, gt=0.5, description="lowest delta-ray kinetic energy produced")
    michel_probability: float = Field(
        0.45, ge=0, le=1, description="stopping muons that decay (mu- capture in Ar takes the rest)"
    )
    pion_decay_probability: float = Field(0.5, ge=0, le=1, description="stopping pions that decay (else captured)")
    critical_mev: float = Field(30.0, gt=1, description="below this electrons stop radiating")
    pair_threshold_mev: float = Field(20.0, gt=1.1, description="photons above convert, below Compton scatter")
    led_max_mev: float = Field(4.0, gt=0, description="Compton electrons below this are low-energy depositions")
    compton_photons_per_mev: float = Field(0.14, ge=0, description="extra soft photons radiated per MeV of shower")
    energy_noise: float = Field(0.05, ge=0, description="relative gaussian smearing of each voxel's energy")


@functools.lru_cache(maxsize=8)
def _range_table(mass: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(T grid, dE/dx(T), CSDA range R(T)) for a particle of this mass in LAr (Bethe-Bloch, capped at low T)."""
    return range_table(mass, Z_OVER_A, RHO, I_MEV, 1.6, 60.0)


class _Event:
    """Accumulates energy deposits with their labels for one event."""

    def __init__(self, cfg: GeneratorConfig, rng: np.random.Generator):
        self.cfg, self.rng = cfg, rng
        self.size_cm = cfg.volume_voxels * cfg.voxel_cm
        self.step = cfg.step_voxels * cfg.voxel_cm
        self.pos: list[np.ndarray] = []
        self.edep: list[np.ndarray] = []
        self.labels: list[np.ndarray] = []
        self.next_particle = 0
        self.next_fragment = 0
        self.truth: dict[int, tuple] = {}  # particle id -> (interaction, species, start, direction, kinetic, primary)

    def new_particle(self) -> int:
        self.next_particle += 1
        return self.next_particle - 1

    def record(
        self, particle: int, species: str, interaction: int, start: np.ndarray, d: np.ndarray, ke: float, primary: bool
    ) -> None:
        """The truth of a particle as it starts (no random draw here: the events stay those of earlier versions)."""
        self.truth[particle] = (interaction, species, np.array(start, float), np.array(d, float), float(ke), primary)

    def new_fragment(self) -> int:
        self.next_fragment += 1
        return self.next_fragment - 1

    def inside(self, p: np.ndarray) -> bool:
        return bool(np.all(p >= 0) and np.all(p < self.size_cm))

    def deposit(
        self, pos: np.ndarray, edep: np.ndarray, semantic: int, pid: int, particle: int, interaction: int, fragment: int
    ) -> None:
        self.pos.append(pos)
        self.edep.append(edep)
        lab = np.empty((len(edep), 5), np.int32)
        lab[:] = (semantic, pid, particle, interaction, fragment)
        self.labels.append(lab)

    # --- charged particles -------------------------------------------------------------------------------------
    def step_charged(
        self,
        start: np.ndarray,
        d: np.ndarray,
        ke: float,
        mass: float,
        length: float | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Step a charged particle from `start` along `d` until it stops (or for `length` cm).

        Returns positions of each step, energy deposited per step, kinetic energy at each step, final direction.
        """
        t_tab, dedx_tab, r_tab = _range_table(mass)
        r0 = float(np.interp(ke, t_tab, r_tab))
        travel = r0 if length is None else min(length, r0)
        if travel < 1e-4:  # stops at once: everything in one point
            return start[None, :].copy(), np.array([ke]), np.array([0.0]), d
        n = max(int(travel / self.step), 1)
        s = np.arange(n + 1) * (travel / n)
        t_at = np.interp(r0 - s, r_tab, t_tab)
        t_at[s >= r0] = 0.0
        edep = -np.diff(t_at)  # energy lost on each step (Bragg peak emerges from the range table)
        t_mid = 0.5 * (t_at[1:] + t_at[:-1])
        p = np.sqrt(t_mid**2 + 2 * t_mid * mass)
        beta = p / (t_mid + mass)
        x = (travel / n) / X0_CM
        theta0 = 13.6 / np.maximum(beta * p, 1e-3) * math.sqrt(x) * (1 + 0.038 * math.log(x))
        theta0 = np.minimum(theta0, 0.6)
        u, v = perp_basis(d)
        kicks = self.rng.normal(size=(n, 2)) * theta0[:, None]
        bend = np.cumsum(kicks, axis=0)
        dirs = d[None, :] + bend[:, :1] * u[None, :] + bend[:, 1:] * v[None, :]
        dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
        pos = start[None, :] + np.cumsum(dirs * (travel / n), axis=0)
        return pos, edep, t_at[1:], dirs[-1]

    def track(
        self,
        start: np.ndarray,
        d: np.ndarray,
        ke: float,
        species: str,
        interaction: int,
        particle: int | None = None,
        semantic: int = TRACK,
        primary: bool = True,
    ) -> None:
        """A muon, pion or proton: track + delta rays, and the decay / capture products if it stops inside."""
        mass = MASS[species]
        particle = self.new_particle() if particle is None else particle
        self.record(particle, species, interaction, start, d, ke, primary)
        pos, edep, t_at, d_end = self.step_charged(start, d, ke, mass)
        self.deposit(pos, edep, semantic, PID[species], particle, interaction, self.new_fragment())
        self.delta_rays(pos, t_at, mass, d, interaction)
        end = pos[-1]
        if not self.inside(end):
            return
        rng = self.rng
        if species == "muon" and rng.random() < self.cfg.michel_probability:
            self.michel(end, interaction)
        elif species == "pion":
            if rng.random() < self.cfg.pion_decay_probability:
                mu_d = isotropic(rng)
                self.track(end, mu_d, 4.12, "muon", interaction, primary=False)  # pi -> mu nu at rest: 4.12 MeV
            else:
                for _ in range(rng.integers(0, 3)):
                    self.track(end, isotropic(rng), rng.uniform(10, 60), "proton", interaction, primary=False)

    def delta_rays(self, pos: np.ndarray, t_at: np.ndarray, mass: float, d: np.ndarray, interaction: int) -> None:
        """Knock-on electrons above the threshold along a track (Bethe's 1/T^2 rate, forward-peaked angle)."""
        tmin = self.cfg.delta_threshold_mev
        gamma = 1 + np.maximum(t_at, 1e-6) / mass
        beta2 = 1 - 1 / gamma**2
        bg2 = beta2 * gamma**2
        ratio = ME / mass
        wmax = 2 * ME * bg2 / (1 + 2 * gamma * ratio + ratio**2)
        ok = wmax > tmin
        if not ok.any():
            return
        step = np.linalg.norm(pos[1] - pos[0]) if len(pos) > 1 else self.step
        rate = 0.5 * K_BETHE * Z_OVER_A * RHO / beta2 * (1 / tmin - 1 / np.maximum(wmax, tmin)) * step
        hits = np.flatnonzero(ok & (self.rng.random(len(pos)) < rate))
        for i in hits:
            # inverse-CDF sample of 1/T^2 on [tmin, wmax]
            u = self.rng.random()
            t = 1.0 / (1 / tmin - u * (1 / tmin - 1 / wmax[i]))
            cos_t = min(math.sqrt(t / (t + 2 * ME) * (wmax[i] + 2 * ME) / wmax[i]), 1.0)
            de = deflect(self.rng, d, math.acos(cos_t))
            particle = self.new_particle()
            self.record(particle, "electron", interaction, pos[i], de, t, primary=False)
            self.em_cascade("electron", pos[i], de, t, interaction, particle, DELTA)

    def michel(self, where: np.ndarray, interaction: int) -> None:
        while True:  # rejection sample x^2 (3 - 2x) on [0, 1]
            x, y = self.rng.random(), self.rng.random()
            if y <= x * x * (3 - 2 * x):
                break
        d, ke, particle = isotropic(self.rng), max(x * MICHEL_EMAX, 1.0), self.new_particle()
        self.record(particle, "electron", interaction, where, d, ke, primary=False)
        self.em_cascade("electron", where, d, ke, interaction, particle, MICHEL)

    # --- electromagnetic showers ------------------------------------------------------------------------------
    def em_cascade(
        self,
        kind: str,
        start: np.ndarray,
        d: np.ndarray,
        energy: float,
        interaction: int,
        particle: int,
        semantic: int = SHOWER,
    ) -> None:
        """Branching e/gamma cascade; charged pieces deposit with `semantic`, small Compton scatters are LED."""
        cfg, rng = self.cfg, self.rng
        pid = PID[kind]
        frag = self.new_fragment()
        stack = [(kind, start, d, energy, frag)]
        soft = rng.poisson(cfg.compton_photons_per_mev * energy) if semantic == SHOWER else 0
        soft_origins: list[np.ndarray] = []
        while stack:
            k, p0, d0, e, fr = stack.pop()
            if not self.inside(p0):
                continue
            if k == "photon":
                if e < 0.3:
                    continue
                if e > cfg.pair_threshold_mev:  # pair conversion after a gap
                    p1 = p0 + d0 * rng.exponential(9.0 / 7.0 * X0_CM)
                    f = rng.uniform(0.1, 0.9)
                    d_a = deflect(rng, d0, rng.exponential(ME / e))
                    stack.append(("electron", p1, d_a, f * e, self.new_fragment()))
                    d_b = deflect(rng, d0, rng.exponential(ME / e))
                    stack.append(("electron", p1, d_b, (1 - f) * e, self.new_fragment()))
                else:  # Compton scatter: a recoil electron, the photon goes on softer
                    p1 = p0 + d0 * rng.exponential(25.0)
                    te = e * rng.uniform(0.2, 0.8)
                    if te < cfg.led_max_mev:
                        self.blip(p1, te, interaction)
                    else:
                        stack.append(("electron", p1, deflect(rng, d0, rng.uniform(0, 0.8)), te, self.new_fragment()))
                    stack.append(("photon", p1, deflect(rng, d0, rng.uniform(0.3, 2.0)), e - te, fr))
                continue
            # electron: ionise until the next bremsstrahlung emission, or to the end of its range
            if e > cfg.critical_mev:
                length = rng.exponential(0.34 * X0_CM)
                pos, edep, t_at, d1 = self.step_charged(p0, d0, e, ME, length)
                self.deposit(pos, edep, semantic, pid, particle, interaction, fr)
                e_left = float(t_at[-1])
                if len(pos) > 2 and soft:
                    soft_origins.append(pos[rng.integers(len(pos))])
                if e_left <= 0:
                    continue
                y = math.exp(rng.uniform(math.log(0.01), 0.0))  # photon fraction, log-uniform
                k_gamma = y * e_left
                stack.append(("photon", pos[-1], deflect(rng, d1, rng.exponential(ME / e_left)), k_gamma, fr))
                stack.append(("electron", pos[-1], d1, e_left - k_gamma, fr))
            else:
                pos, edep, _, _ = self.step_charged(p0, d0, e, ME)
                self.deposit(pos, edep, semantic, pid, particle, interaction, fr)
        # soft photons from the shower body: Compton scatters that fill the halo of low-energy depositions
        for _ in range(soft):
            if not soft_origins:
                break
            origin = soft_origins[rng.integers(len(soft_origins))]
            p1 = origin + isotropic(rng) * rng.exponential(25.0)
            if self.inside(p1):
                self.blip(p1, rng.uniform(0.3, cfg.led_max_mev), interaction)

    def blip(self, where: np.ndarray, energy: float, interaction: int) -> None:
        """A low-energy deposition: a short, strongly scattered electron labelled LED (no particle / fragment)."""
        pos, edep, _, _ = self.step_charged(where, isotropic(self.rng), energy, ME)
        self.deposit(pos, edep, LED, -1, -1, -1, -1)

    # --- event assembly ---------------------------------------------------------------------------------------
    def primary(self, species: str, vertex: np.ndarray, ke: float, interaction: int) -> None:
        d = isotropic(self.rng)
        if species in ("electron", "photon"):
            particle = self.new_particle()
            self.record(particle, species, interaction, vertex, d, ke, primary=True)
            self.em_cascade(species, vertex, d, ke, interaction, particle)
        else:
            self.track(vertex, d, ke, species, interaction)

    def crossing_muon(self, interaction: int, ke: float) -> None:
        rng = self.rng
        axis = rng.integers(3)
        start = rng.uniform(0, self.size_cm, size=3)
        start[axis] = 0.0 if rng.random() < 0.5 else self.size_cm - 1e-3
        d = isotropic(rng)
        inward = 1.0 if start[axis] == 0.0 else -1.0
        d[axis] = inward * abs(d[axis]) + inward * 0.3
        self.track(start, d / np.linalg.norm(d), ke, "muon", interaction)

    def voxelize(self) -> dict[str, np.ndarray]:
        cfg = self.cfg
        n_vox = cfg.volume_voxels
        if not self.pos:
            self.pos, self.edep, self.labels = [np.zeros((0, 3))], [np.zeros(0)], [np.zeros((0, 5), np.int32)]
        pos = np.concatenate(self.pos)
        edep = np.concatenate(self.edep)
        lab = np.concatenate(self.labels)
        vox = np.floor(pos / cfg.voxel_cm).astype(np.int64)
        keep = np.all((vox >= 0) & (vox < n_vox), axis=1) & (edep > 0)
        vox, edep, lab = vox[keep], edep[keep], lab[keep]
        key = (vox[:, 0] * n_vox + vox[:, 1]) * n_vox + vox[:, 2]
        order = np.lexsort((-edep, key))  # by voxel, largest deposit first
        key_s = key[order]
        first = np.concatenate([[True], key_s[1:] != key_s[:-1]]) if len(key_s) else np.zeros(0, bool)
        starts = np.flatnonzero(first)
        energy = np.add.reduceat(edep[order], starts) if len(starts) else np.zeros(0)
        if cfg.energy_noise > 0:
            energy = energy * np.clip(self.rng.normal(1.0, cfg.energy_noise, len(energy)), 0.5, 1.5)
        lab = lab[order][first]
        v = vox[order][first]
        return {
            "coord": v.astype(np.float32),
            "energy": energy.astype(np.float32),
            "semantic": lab[:, 0].astype(np.int8),
            "pid": lab[:, 1].astype(np.int8),
            "particle": lab[:, 2],
            "interaction": lab[:, 3],
            "fragment": lab[:, 4],
            "particles": self.particles(np.unique(lab[:, 2][lab[:, 2] >= 0])),
        }

    def particles(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        """The `particles` truth of the particles that kept at least one voxel: |p| = sqrt(T^2 + 2 T m) from the
        kinetic energy T it started with, its start point in voxel units (the frame of `coord`), its direction."""
        rows = [self.truth[int(i)] for i in ids]
        mass = np.array([MASS.get(r[1], 0.0) for r in rows])  # photons: 0
        ke = np.array([r[4] for r in rows])
        return {
            "id": ids.astype(np.int32),
            "interaction": np.array([r[0] for r in rows], np.int32),
            "pid": np.array([PID[r[1]] for r in rows], np.int8),
            "mass": mass.astype(np.float32),
            "momentum": np.sqrt(ke**2 + 2 * ke * mass).astype(np.float32),
            "direction": np.array([r[3] for r in rows], np.float32).reshape(-1, 3),
            "vertex": (np.array([r[2] for r in rows]).reshape(-1, 3) / self.cfg.voxel_cm).astype(np.float32),
            "primary": np.array([int(r[5]) for r in rows], np.int8),
        }


def _negative_binomial(rng: np.random.Generator, mean: float, std: float) -> int:
    var = std**2
    if var <= mean:  # not over-dispersed: Poisson
        return int(rng.poisson(mean))
    r = mean**2 / (var - mean)
    return int(rng.negative_binomial(r, r / (r + mean)))


def _log_uniform(rng: np.random.Generator, r: EnergyRange) -> float:
    return float(math.exp(rng.uniform(math.log(r.low), math.log(r.high))))


def generate_event(cfg: GeneratorConfig, seed: int, index: int) -> dict[str, np.ndarray]:
    """One event, a pure function of (cfg, seed, index): coord (N,3) float32 voxel indices, energy (MeV), labels.

    A draw that leaves no deposit inside the volume (say, a lone photon converting outside) is redrawn from the
    sub-seed (seed, index, attempt): events stay deterministic and never empty.
    """
    for attempt in range(100):
        key = [int(seed), int(index)] + ([attempt] if attempt else [])
        out = _draw_event(cfg, np.random.default_rng(np.random.SeedSequence(key)))
        if len(out["energy"]):
            out["event_id"] = np.int64(index)
            return out
    raise RuntimeError(f"generator config produced 100 empty draws for event {index}: check geometry and energies")


def _draw_event(cfg: GeneratorConfig, rng: np.random.Generator) -> dict[str, np.ndarray]:
    ev = _Event(cfg, rng)
    names = list(cfg.species)
    probs = np.array([cfg.species[n] for n in names], float)
    probs /= probs.sum()
    lo = cfg.fiducial_margin * ev.size_cm
    n_vertices = 1 + _negative_binomial(rng, max(cfg.interactions_mean - 1, 1e-6), cfg.interactions_std)
    interaction = 0
    for _ in range(n_vertices):
        vertex = rng.uniform(lo, ev.size_cm - lo, size=3)
        n_particles = 1 + int(rng.poisson(cfg.particles_per_vertex_mean - 1))
        for species in rng.choice(names, size=n_particles, p=probs):
            ev.primary(str(species), vertex, _log_uniform(rng, cfg.kinetic_mev[str(species)]), interaction)
        interaction += 1
    for _ in range(rng.poisson(cfg.crossing_muons_mean)):
        ev.crossing_muon(interaction, _log_uniform(rng, cfg.kinetic_mev["crossing_muon"]))
        interaction += 1
    return ev.voxelize()
