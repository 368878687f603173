"""The synthetic water Cherenkov generator against closed-form physics: the Cherenkov angle and threshold, the ring
radius on the wall, photoelectrons proportional to track length, the pi0 -> gamma gamma invariant mass, arrival
times, dark noise, and labels that agree with the charge each particle gave."""

from __future__ import annotations

import math

import numpy as np
import pytest

from raysvc.data.sources.wch_generator import (
    CATEGORIES,
    MASS,
    N_WATER,
    WChGeneratorConfig,
    cherenkov_cos,
    expected_pe,
    frank_tamm_per_m,
    generate_wch_event,
    pi0_decay,
    pmt_layout,
    track_steps,
)

CFG = WChGeneratorConfig()


def _emitter(z0: float, d=(0.0, 0.0, 1.0), spread_deg: float = 0.5):
    """One short beta = 1 emission step at (0, 0, z0) along d: expected PE and PE-weighted times per PMT."""
    pmts, normals = pmt_layout(CFG)
    lam, lam_t = expected_pe(
        CFG,
        np.array([[0.0, 0.0, z0]]),
        np.array([d]),
        np.array([1e6]),
        np.array([1 / N_WATER]),
        np.array([math.radians(spread_deg)]),
        np.array([0.0]),
        pmts,
        normals,
    )
    return pmts, lam, lam_t


def test_tank_is_lined_with_about_10_8k_inward_pmts():
    pmts, normals = pmt_layout(CFG)
    assert 10_500 < len(pmts) < 11_100
    r = np.hypot(pmts[:, 0], pmts[:, 1])
    on_barrel = np.isclose(r, CFG.radius_m)
    on_caps = np.isclose(np.abs(pmts[:, 2]), CFG.half_height_m)
    assert np.all(on_barrel | on_caps) and np.all(r <= CFG.radius_m + 1e-9)
    np.testing.assert_allclose(np.linalg.norm(normals, axis=1), 1.0)
    assert np.all(np.einsum("pk,pk->p", normals, -pmts) > 0)  # every normal points into the tank


def test_cherenkov_angle_threshold_and_yield():
    assert math.degrees(math.acos(cherenkov_cos(1.0))) == pytest.approx(41.25, abs=0.01)
    beta = np.array([0.76, 0.8, 0.9, 0.99])
    np.testing.assert_allclose(cherenkov_cos(beta), 1 / (1.33 * beta))
    assert np.isnan(cherenkov_cos(0.75)) and frank_tamm_per_m(0.75) == 0  # below beta = 1 / n
    # Frank-Tamm at beta = 1 between 300 and 600 nm: about 332 photons per cm of track
    want = 2 * math.pi / 137.036 * (1 - 1 / 1.33**2) * (1 / 300e-9 - 1 / 600e-9)
    assert frank_tamm_per_m(1.0) == pytest.approx(want) and 330 < want / 100 < 335
    # a muon radiates only above T = m (1 / sqrt(1 - 1/n^2) - 1) = 54.6 MeV
    t_th = MASS["muon"] * (1 / math.sqrt(1 - 1 / N_WATER**2) - 1)
    rng = np.random.default_rng(0)
    assert t_th == pytest.approx(54.6, abs=0.1)
    below = track_steps(CFG, "muon", np.zeros(3), np.array([0.0, 0.0, 1.0]), t_th - 1, rng)
    above = track_steps(CFG, "muon", np.zeros(3), np.array([0.0, 0.0, 1.0]), t_th + 30, rng)
    assert len(below["photons"]) == 0 and len(above["photons"]) > 0


@pytest.mark.parametrize("z0", [10.0, 5.0, 0.0])
def test_ring_radius_on_the_cap_is_distance_times_tan_theta(z0):
    pmts, lam, _ = _emitter(z0)
    top = np.isclose(pmts[:, 2], CFG.half_height_m)
    r = np.hypot(pmts[top, 0], pmts[top, 1])
    want = (CFG.half_height_m - z0) * math.tan(math.acos(1 / N_WATER))
    assert lam[top].sum() / lam.sum() > 0.999  # all the light on the cap it points at
    assert (lam[top] * r).sum() / lam[top].sum() == pytest.approx(want, rel=0.01)


def test_arrival_time_is_the_light_path_in_water():
    pmts, lam, lam_t = _emitter(0.0, spread_deg=20)
    seen = lam > 1e-6
    np.testing.assert_allclose(lam_t[seen] / lam[seen], np.linalg.norm(pmts[seen], axis=1) * N_WATER / 0.299792458)


def test_photoelectrons_grow_in_proportion_to_the_cherenkov_track_length():
    rng = np.random.default_rng(1)
    pmts, normals = pmt_layout(CFG)
    lengths, pe = [], []
    for _ in range(16):
        d = rng.normal(size=3)
        d /= np.linalg.norm(d)
        st = track_steps(CFG, "muon", np.zeros(3), d, float(rng.uniform(300, 1500)), rng)
        lam, _ = expected_pe(
            CFG, *(st[k] for k in ("points", "dirs", "photons", "cos_theta", "spread", "times")), pmts, normals
        )
        lengths.append(len(st["photons"]) * CFG.step_m)
        pe.append(lam.sum())
    per_m = np.array(pe) / np.array(lengths)
    assert np.corrcoef(lengths, pe)[0, 1] > 0.99 and per_m.std() / per_m.mean() < 0.15


def test_pi0_photons_have_the_pi0_mass_and_at_least_the_minimum_opening_angle():
    rng = np.random.default_rng(2)
    m = MASS["pi0"]
    for _ in range(200):
        d = rng.normal(size=3)
        d /= np.linalg.norm(d)
        ke = float(rng.uniform(1, 2000))
        (d1, e1), (d2, e2) = pi0_decay(rng, d, ke)
        cos12 = float(d1 @ d2)
        assert math.sqrt(2 * e1 * e2 * (1 - cos12)) == pytest.approx(m, rel=1e-6)
        assert e1 + e2 == pytest.approx(ke + m, rel=1e-9)
        assert math.acos(np.clip(cos12, -1, 1)) >= 2 * math.asin(m / (ke + m)) - 1e-6
        p = (e1 * d1 + e2 * d2) / math.sqrt((ke + m) ** 2 - m * m)  # momentum conserved along the pi0
        np.testing.assert_allclose(p, d, atol=1e-6)


def test_events_are_deterministic_and_labels_follow_the_charge():
    a, b = generate_wch_event(CFG, 5, 3), generate_wch_event(CFG, 5, 3)
    for k in ("pmt", "charge", "time", "particle"):
        np.testing.assert_array_equal(a[k], b[k])
    for index in range(4):
        ev = generate_wch_event(CFG, 5, index)
        parts = ev["particles"]
        lit = ev["particle"] >= 0
        assert ev["rings"] >= 1 and lit.sum() > 0
        for j in np.flatnonzero(lit)[:200]:  # the owner gave the most PE, and is among the contributors
            assert ev["particle"][j] in ev["contributors"][j]
            assert ev["category"][j] == parts["pid"][ev["particle"][j]]
        assert np.all(ev["category"][~lit] == -1)
        names = [CATEGORIES[p] for p in parts["pid"]]
        rings = [i for i, n in enumerate(names) if n != "pi0" and ev["ring_pe"][i] >= CFG.ring_min_pe]
        assert ev["rings"] == len(rings)
        np.testing.assert_allclose(np.linalg.norm(parts["direction"], axis=1), 1.0, rtol=1e-5)
        e = np.sqrt(parts["momentum"].astype(float) ** 2 + parts["mass"].astype(float) ** 2)
        ke = e - parts["mass"]
        assert np.all(ke[parts["primary"] == 1] <= CFG.kinetic_mev[1] * (1 + 1e-5))


def test_dark_noise_matches_the_rate_over_the_window():
    cfg = WChGeneratorConfig(dark_rate_khz=50.0, species={"muon": 1.0}, particles={1: 1.0})
    n_pmt = len(pmt_layout(cfg)[0])
    p = 1 - math.exp(-50.0 * 1e-6 * (cfg.window_ns[1] - cfg.window_ns[0]))
    dark_only, expected = 0, 0.0
    for index in range(6):
        ev = generate_wch_event(cfg, 9, index)
        lit = int((ev["particle"] >= 0).sum())
        dark_only += int((ev["particle"] < 0).sum())
        expected += (n_pmt - lit) * p  # a dark hit on a lit PMT keeps the ring's label
        lo, hi = cfg.window_ns
        t = ev["time"][ev["particle"] < 0]
        assert np.all((t >= lo) & (t <= hi))
    assert abs(dark_only - expected) < 4 * math.sqrt(expected)


def test_a_pi0_event_records_its_two_photons_whose_truth_gives_the_pi0_mass():
    cfg = WChGeneratorConfig(species={"pi0": 1.0}, particles={1: 1.0})
    for index in range(3):
        parts = generate_wch_event(cfg, 4, index)["particles"]
        assert [CATEGORIES[p] for p in parts["pid"]] == ["pi0", "gamma", "gamma"]
        assert parts["primary"].tolist() == [1, 0, 0]
        p = parts["momentum"][1:, None].astype(float) * parts["direction"][1:].astype(float)  # gamma 4-momenta
        e = parts["momentum"][1:].astype(float)
        mass = math.sqrt(max(e.sum() ** 2 - float(np.sum(p.sum(0) ** 2)), 0.0))
        assert mass == pytest.approx(MASS["pi0"], rel=1e-3)
