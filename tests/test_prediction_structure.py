"""Rank structure of a benchmark folder's predictions: a collapsed row is recognised as one."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from research.prediction_structure import latent_profile, main, output_correlations


def _write(folder: Path, row: str, seed: int, frame: pd.DataFrame) -> None:
    run = folder / "runs" / row / f"seed{seed}"
    run.mkdir(parents=True)
    frame.to_csv(run / "test.csv", index=False)


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    n = 200
    ids = [f"c{i:03d}" for i in range(n)]
    score = rng.normal(size=n)
    sigmoid = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
    collapsed = pd.DataFrame({"case_id": ids, "er_prob": sigmoid(-score), "pr_prob": sigmoid(-2 * score + 1),
                              "her2_prob": sigmoid(score), "ki67_pred": 20 + 5 * score})
    independent = pd.DataFrame({"case_id": ids, **{c: rng.random(n) for c in ("er_prob", "pr_prob", "her2_prob")},
                                "ki67_pred": rng.random(n)})
    _write(tmp_path, "full", 0, collapsed)
    _write(tmp_path, "radiomics_lr", 0, independent)
    latents = {"case_id": ids, "diameter_mm": np.exp(score)}
    latents.update({c: rng.random(n) for c in ("spiculation", "necrosis", "heterogeneity_fine", "heterogeneity_coarse",
                                               "rim_enhancement", "oedema", "peri_enhancement")})
    pd.DataFrame(latents).to_csv(tmp_path / "latents.csv", index=False)
    return tmp_path


def test_a_row_whose_outputs_are_one_score_has_unit_rank_correlations(folder: Path) -> None:
    table = output_correlations(folder).set_index("row")
    assert table.loc["full", "er~pr"] == pytest.approx(1.0)
    assert table.loc["full", "er~her2"] == pytest.approx(-1.0)
    assert table.loc["full", "er~ki67"] == pytest.approx(-1.0)
    assert abs(table.loc["radiomics_lr", "er~pr"]) < 0.2


def test_latent_profile_finds_the_latent_the_score_follows(folder: Path) -> None:
    profile = latent_profile(folder, folder / "latents.csv").set_index(["row", "output"])
    assert profile.loc[("full", "her2_prob"), "diameter_mm"] == pytest.approx(1.0)
    assert profile.loc[("full", "er_prob"), "diameter_mm"] == pytest.approx(-1.0)
    assert abs(profile.loc[("full", "her2_prob"), "necrosis"]) < 0.2


def test_a_folder_without_runs_is_a_one_line_error(tmp_path: Path, capsys) -> None:
    assert main([str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert "no runs/<row>/seed<k>/test.csv" in err and len(err.splitlines()) == 1
