"""Phantom cohort: determinism, manifest contract, prevalences, phenotype directions, oracle range,
image geometry, atomic writing and the CLI's one-line errors."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from fedsubtype.cli import main as cli_main
from fedsubtype.errors import UserError
from fedsubtype.data.manifest import read_manifest
from fedsubtype.phantom import cohort as cohort_mod
from fedsubtype.phantom import generate_cohort, sample_labels
from fedsubtype.phantom.biology import SEER_GROUP_PREVALENCE, SiteBiology, sample_biology
from fedsubtype.phantom.oracle import fit_oracle, latent_columns, oracle_metrics, score_oracle, split_ids
from fedsubtype.phantom.scanner import ScannerProfile, reorient, site_profiles, site_sizes


def _digest(folder: Path) -> dict[str, str]:
    return {str(f.relative_to(folder)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(folder.rglob("*")) if f.is_file()}


@pytest.fixture(scope="module")
def labels_2000() -> pd.DataFrame:
    """Labels, true biology and latents of 2000 cases (no images)."""
    return sample_labels(2000, sites=5, seed=7)


# ---------------------------------------------------------------- determinism and files

def test_same_seed_same_bytes_regardless_of_workers(tmp_path: Path) -> None:
    a = generate_cohort(tmp_path / "a", cases=8, sites=2, seed=3, workers=2, progress=False).parent
    b = generate_cohort(tmp_path / "b", cases=8, sites=2, seed=3, workers=1, progress=False).parent
    da, db = _digest(a), _digest(b)
    assert len(da) == 8 * 2 + 3  # images, masks, manifest.csv, latents.csv, phantom.json
    assert da == db


def test_different_seed_different_images(tmp_path: Path, phantom_cohort: Path) -> None:
    other = generate_cohort(tmp_path / "c", cases=4, sites=1, seed=4, workers=1, progress=False).parent
    mine = _digest(phantom_cohort.parent)
    theirs = _digest(other)
    assert not set(mine.values()) & set(v for k, v in theirs.items() if k.startswith("images/"))


def test_manifest_contract_and_latents(phantom_cohort: Path) -> None:
    cases = read_manifest(phantom_cohort)
    assert len(cases) == 30
    assert len({c.site for c in cases}) == 3
    for c in cases:
        assert c.image.is_file() and c.mask.is_file()
        for task in ("er", "pr", "her2"):
            assert c.labels[task] in (None, 0.0, 1.0)
        assert c.labels["ki67"] is None or 0 <= c.labels["ki67"] <= 100
        assert {"manufacturer", "field_strength", "scanner"} <= set(c.extra)
    latents = pd.read_csv(phantom_cohort.parent / "latents.csv", dtype={"case_id": str})
    assert set(latent_columns()) <= set(latents.columns)
    assert sorted(latents["case_id"]) == sorted(c.case_id for c in cases)
    header = phantom_cohort.read_text(encoding="utf-8").splitlines()[0].split(",")
    assert not set(latent_columns()) & set(header), "latents must stay out of the manifest"
    marker = json.loads((phantom_cohort.parent / "phantom.json").read_text(encoding="utf-8"))
    assert marker["cases"] == 30 and marker["seed"] == 0


def test_images_have_site_geometry_and_contained_tumour(phantom_cohort: Path) -> None:
    profiles = {p.name: p.scanner for p in site_profiles(3)}
    for case in read_manifest(phantom_cohort):
        img, msk = sitk.ReadImage(str(case.image)), sitk.ReadImage(str(case.mask))
        scanner = profiles[case.site]
        expected_spacing = tuple(scanner.spacing[a] for a in scanner.axes)
        assert img.GetSpacing() == pytest.approx(expected_spacing)
        assert img.GetSize() == tuple(scanner.shape[a] for a in scanner.axes)
        direction = np.array(img.GetDirection()).reshape(3, 3)
        for i, (ax, flip) in enumerate(zip(scanner.axes, scanner.flips)):
            assert direction[ax, i] == (-1.0 if flip else 1.0)
        assert img.GetPixelID() == sitk.sitkInt16 and msk.GetPixelID() == sitk.sitkUInt8
        assert msk.GetSize() == img.GetSize() and msk.GetDirection() == img.GetDirection()
        assert msk.GetOrigin() == pytest.approx(img.GetOrigin())
        m = sitk.GetArrayFromImage(msk)
        a = sitk.GetArrayFromImage(img).astype(float)
        assert set(np.unique(m)) == {0, 1}
        for axis in range(3):  # at least 2 voxels of free space on every face
            for edge in (0, 1, -1, -2):
                assert not np.take(m, edge, axis=axis).any(), f"{case.case_id}: tumour touches the border"
        assert a[m > 0].mean() > np.median(a[a > np.percentile(a, 30)]), f"{case.case_id}: tumour not enhancing"


def test_reorient_keeps_every_voxel_in_place() -> None:
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 1000, size=(5, 6, 7)).astype(np.int16)
    spacing, origin = (0.8, 0.9, 2.0), np.array([-10.0, 5.0, 3.0])
    for axes, flips in [((0, 1, 2), (True, True, False)), ((2, 0, 1), (False, True, True)), ((1, 0, 2), (False, True, False))]:
        scanner = ScannerProfile("X", "Y", 3.0, spacing, arr.shape, 1.0, 0.0, 0.0, 0.0, True, axes=axes, flips=flips)
        data, sp, org, direction = reorient(arr, spacing, origin, scanner)
        img = sitk.GetImageFromArray(data.transpose(2, 1, 0))
        img.SetSpacing(sp)
        img.SetOrigin(org)
        img.SetDirection(direction)
        canon = sitk.DICOMOrient(img, "LPS")
        assert np.array_equal(sitk.GetArrayFromImage(canon).transpose(2, 1, 0), arr)
        assert canon.GetOrigin() == pytest.approx(tuple(origin))


def test_interrupted_run_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = cohort_mod.render_case
    calls = {"n": 0}

    def failing(case, seed):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(case, seed)

    monkeypatch.setattr(cohort_mod, "render_case", failing)
    with pytest.raises(KeyboardInterrupt):
        generate_cohort(tmp_path / "out", cases=5, sites=1, seed=0, workers=1, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_refuses_foreign_folder_but_replaces_a_phantom(tmp_path: Path) -> None:
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine", encoding="utf-8")
    with pytest.raises(UserError, match="not a phantom cohort"):
        generate_cohort(foreign, cases=8, sites=2, seed=0, workers=1, progress=False)
    assert (foreign / "keep.txt").read_text(encoding="utf-8") == "mine"
    out = tmp_path / "cohort"
    generate_cohort(out, cases=5, sites=1, seed=0, workers=1, progress=False)
    generate_cohort(out, cases=4, sites=1, seed=1, workers=1, progress=False)
    assert len(read_manifest(out / "manifest.csv")) == 4
    assert len(list((out / "images").iterdir())) == 4


# ---------------------------------------------------------------- sites, labels and phenotypes

def test_site_sizes_non_iid_with_external_74() -> None:
    sizes = site_sizes(960, site_profiles(5))
    assert sum(sizes) == 960 and sizes[-1] == 74
    assert len(set(sizes)) == 5 and min(sizes) >= 4
    small = site_sizes(96, site_profiles(5))
    assert sum(small) == 96 and small[-1] == round(96 * 74 / 960)


def test_true_prevalence_matches_seer() -> None:
    rng = np.random.default_rng(11)
    bio = [sample_biology(rng, SiteBiology()) for _ in range(4000)]
    er = np.array([b.er for b in bio])
    pr = np.array([b.pr for b in bio])
    her2 = np.array([b.her2 for b in bio])
    hr = (er | pr).astype(bool)
    groups = [np.mean(hr & (her2 == 0)), np.mean(hr & (her2 == 1)), np.mean(~hr & (her2 == 1)), np.mean(~hr & (her2 == 0))]
    assert groups == pytest.approx(list(SEER_GROUP_PREVALENCE), abs=0.025)
    assert np.mean((er == 1) & (pr == 0)) == pytest.approx(0.07, abs=0.015)
    assert np.mean((er == 0) & (pr == 1)) == pytest.approx(0.01, abs=0.008)
    ki = np.array([b.ki67 for b in bio])
    assert 16 <= np.median(ki) <= 24
    assert ki.mean() > np.median(ki)  # right-skewed
    assert np.median(ki[er == 0]) > np.median(ki[er == 1]) + 10
    assert np.median(ki[her2 == 1]) > np.median(ki[her2 == 0]) + 5


def test_sites_differ_and_labels_are_missing_like_public_cohorts(labels_2000: pd.DataFrame) -> None:
    df = labels_2000
    tn = df.assign(tn=(df.true_er == 0) & (df.true_pr == 0) & (df.true_her2 == 0)).groupby("site")["tn"].mean()
    assert tn["site2"] > tn["site1"] + 0.1  # trial-like site enriched for triple-negative
    assert df.loc[df.site == "site2", "ki67"].isna().all()  # a site without Ki-67
    assert df["ki67"].notna().any()
    for task in ("pr", "her2"):
        assert 0.0 < df[task].isna().mean() < 0.15
    flips = (df["er"].notna()) & (df["er"] != df["true_er"])
    assert 0.0 < flips.mean() < 0.05  # a little label noise, not much


def test_phenotypes_follow_the_literature(labels_2000: pd.DataFrame) -> None:
    df = labels_2000
    er_neg, er_pos = df[df.true_er == 0], df[df.true_er == 1]
    for name in ("rim_enhancement", "necrosis", "oedema"):
        assert er_neg[name].mean() > er_pos[name].mean() + 0.05, name
    assert er_pos["spiculation"].mean() > er_neg["spiculation"].mean() + 0.1
    h_pos, h_neg = df[df.true_her2 == 1], df[df.true_her2 == 0]
    for name in ("heterogeneity_coarse", "peri_enhancement", "diameter_mm"):
        assert h_pos[name].mean() > h_neg[name].mean(), name
    assert np.corrcoef(np.log(df.true_ki67), df.heterogeneity_fine)[0, 1] > 0.3
    assert np.corrcoef(np.log(df.true_ki67), df.diameter_mm)[0, 1] > 0.1
    hr = (df.true_er == 1) | (df.true_pr == 1)
    assert df.loc[hr, "bpe"].mean() > df.loc[~hr, "bpe"].mean()


def test_every_latent_varies_within_each_subtype(labels_2000: pd.DataFrame) -> None:
    """Evidence is partial: no latent is a deterministic function of the subtype."""
    for _, group in labels_2000.groupby("subtype"):
        assert (group[latent_columns()].std() > 0).all()


def test_oracle_is_good_but_not_perfect(labels_2000: pd.DataFrame) -> None:
    train, test = split_ids(labels_2000, 0.25, seed=0)
    df = labels_2000.set_index("case_id")
    m = score_oracle(fit_oracle(df.loc[train], df.loc[train]), df.loc[test], df.loc[test])
    for task in ("er", "pr", "her2"):
        assert 0.6 < m[f"{task}_auc"] < 0.99, (task, m)
    assert 0.85 <= m["er_auc"] <= 0.97
    assert 0.76 <= m["pr_auc"] <= 0.93 and 0.76 <= m["her2_auc"] <= 0.93
    assert 4.0 <= m["ki67_mae"] <= 9.0


def test_oracle_metrics_on_a_written_cohort(phantom_cohort: Path) -> None:
    ids = [c.case_id for c in read_manifest(phantom_cohort)]
    m = oracle_metrics(phantom_cohort.parent, ids[:22], ids[22:], seed=0)
    assert {"er_auc", "pr_auc", "her2_auc", "avg_auc", "ki67_mae", "n_er"} <= set(m)
    assert m["n_er"] <= 8
    with pytest.raises(UserError, match="not in the cohort"):
        oracle_metrics(phantom_cohort.parent, ["nope"], ids[:3])
    out = subprocess.run([sys.executable, "-m", "fedsubtype.phantom.oracle", str(phantom_cohort.parent)],
                         capture_output=True, text=True, encoding="utf-8", timeout=120)
    assert out.returncode == 0, out.stderr
    assert "ER AUC" in out.stdout and "Ki-67 MAE" in out.stdout


# ---------------------------------------------------------------- CLI

@pytest.mark.parametrize("argv, message", [
    (["--cases", "5", "--sites", "3"], "too few for 3 site(s)"),
    (["--cases", "100", "--sites", "13"], "out of range"),
    (["--cases", "100", "--sites", "0"], "out of range"),
    (["--cases", "100", "--seed", "-2"], "negative"),
    (["--cases", "100", "--workers", "0"], "at least 1"),
])
def test_cli_rejects_bad_arguments(tmp_path: Path, capsys: pytest.CaptureFixture, argv: list[str], message: str) -> None:
    assert cli_main(["phantom", "--out", str(tmp_path / "o"), *argv]) == 1
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_cli_refuses_non_empty_foreign_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "notes.txt").write_text("x", encoding="utf-8")
    assert cli_main(["phantom", "--out", str(tmp_path), "--cases", "12", "--sites", "3"]) == 1
    err = capsys.readouterr().err.strip()
    assert "not a phantom cohort" in err and len(err.splitlines()) == 1


def test_cli_writes_a_cohort(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "c"
    assert cli_main(["phantom", "--out", str(out), "--cases", "4", "--sites", "1", "--workers", "1", "--no-progress"]) == 0
    assert "wrote 4 cases" in capsys.readouterr().out
    assert len(read_manifest(out / "manifest.csv")) == 4
