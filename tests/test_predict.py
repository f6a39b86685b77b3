"""`fedsubtype predict` / `--explain` / `model-card` on a model really trained on a tiny phantom."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from fedsubtype.cli import main
from fedsubtype.data.manifest import read_manifest
from fedsubtype.evaluate.metrics import SUBTYPES


@pytest.fixture(scope="module")
def trained_model(phantom_cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("predict") / "run"
    code = main(["train", "--manifest", str(phantom_cohort), "--out", str(out), "--epochs", "1", "--size", "16",
                 "--n-boot", "20", "--quiet", "--cache", str(out.parent / "cache")])
    assert code == 0
    return out / "model.pt"


def _predict_json(capsys, *args: str) -> dict:
    capsys.readouterr()
    assert main(["predict", *args]) == 0
    return json.loads(capsys.readouterr().out)


def test_single_case_json_has_probabilities_thresholds_subtype_and_region_weights(trained_model, phantom_cohort, capsys):
    case = read_manifest(phantom_cohort)[0]
    out = _predict_json(capsys, "--model", str(trained_model), "--image", str(case.image), "--mask", str(case.mask))
    assert set(out["probabilities"]) == {"er", "pr", "her2"}
    assert all(0.0 <= p <= 1.0 for p in out["probabilities"].values())
    for task, th in out["thresholds"].items():
        assert 0.0 < th["value"] < 1.0 and th["source"]
    assert 0.0 <= out["ki67_percent"] <= 100.0
    assert out["subtype"]["label"] in SUBTYPES
    assert "St Gallen" in out["subtype"]["rule"]
    assert sum(out["region_weights"].values()) == pytest.approx(1.0, abs=1e-3)
    assert set(out["attention_share"]) == {"core", "rim", "peritumoral", "elsewhere"}
    assert sum(out["attention_share"].values()) == pytest.approx(1.0, abs=1e-3)


def test_explain_writes_maps_on_the_input_grid_and_a_figure(trained_model, phantom_cohort, tmp_path, capsys):
    case = read_manifest(phantom_cohort)[1]
    out = _predict_json(capsys, "--model", str(trained_model), "--image", str(case.image), "--mask", str(case.mask),
                        "--explain", str(tmp_path))
    ref = sitk.ReadImage(str(case.image))
    maps = out["explanation"]["attention_maps"]
    assert "fused" in maps and len(maps) >= 4  # three scales + fused
    for path in maps.values():
        img = sitk.ReadImage(path)
        assert img.GetSize() == ref.GetSize()
        assert np.allclose(img.GetSpacing(), ref.GetSpacing())
        assert np.allclose(img.GetOrigin(), ref.GetOrigin(), atol=1e-4)
        assert np.allclose(img.GetDirection(), ref.GetDirection(), atol=1e-6)
    fused = sitk.GetArrayFromImage(sitk.ReadImage(maps["fused"]))
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(case.mask))) > 0
    assert fused[mask].mean() > 0  # attention lands on the tumour's grid position
    png = Path(out["explanation"]["figure"])
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cohort_mode_writes_one_row_per_case(trained_model, phantom_cohort, tmp_path, capsys):
    assert main(["predict", "--model", str(trained_model), "--manifest", str(phantom_cohort), "--out", str(tmp_path)]) == 0
    rows = list(csv.DictReader(open(tmp_path / "predictions.csv", encoding="utf-8")))
    cases = read_manifest(phantom_cohort)
    assert [r["case_id"] for r in rows] == [c.case_id for c in cases]
    assert {"er_prob", "subtype", "weight_peritumoral", "attention_peritumoral"} <= set(rows[0])


def test_explanations_change_when_weights_are_shuffled(trained_model, phantom_cohort):
    """Randomisation sanity check (Adebayo et al. 2018): explanations must depend on the learned weights."""
    from fedsubtype.train.checkpoint import load_model
    from fedsubtype.inference.predict import run_model
    from fedsubtype.data.preprocess import preprocess_case

    model, bundle = load_model(trained_model)
    case = read_manifest(phantom_cohort)[2]
    pre = preprocess_case(case, bundle.preprocess_config)
    before = run_model(model, pre, explain=True)["attention"]["fused"]
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            flat = p.view(-1)
            flat.copy_(flat[torch.randperm(flat.numel(), generator=gen)])
    after = run_model(model, pre, explain=True)["attention"]["fused"]
    corr = np.corrcoef(before.ravel(), after.ravel())[0, 1]
    assert not np.allclose(before, after)
    assert corr < 0.9


def test_bad_inputs_are_one_line_errors(trained_model, phantom_cohort, tmp_path, capsys):
    case = read_manifest(phantom_cohort)[0]
    assert main(["predict", "--model", str(trained_model), "--image", str(case.image)]) == 1
    assert "--image and --mask go together" in capsys.readouterr().err
    assert main(["predict", "--model", str(trained_model), "--image", str(tmp_path / "no.nii.gz"),
                 "--mask", str(case.mask)]) == 1
    assert "file not found" in capsys.readouterr().err
    corrupt = tmp_path / "model.pt"
    corrupt.write_bytes(trained_model.read_bytes()[:1000])
    assert main(["predict", "--model", str(corrupt), "--image", str(case.image), "--mask", str(case.mask)]) == 1
    err = capsys.readouterr().err.strip()
    assert "corrupt" in err and len(err.splitlines()) == 1
    empty = sitk.Image(sitk.ReadImage(str(case.mask)))
    empty = empty * 0
    sitk.WriteImage(empty, str(tmp_path / "empty.nii.gz"))
    assert main(["predict", "--model", str(trained_model), "--image", str(case.image),
                 "--mask", str(tmp_path / "empty.nii.gz")]) == 1
    assert "empty" in capsys.readouterr().err.lower()


def test_model_card_from_a_trained_model(trained_model, tmp_path):
    out = tmp_path / "card.md"
    assert main(["model-card", "--model", str(trained_model), "--out", str(out)]) == 0
    text = out.read_text(encoding="utf-8")
    assert "Research use only" in text and "not a clinical model" in text
    assert "| ER |" in text and "Training" in text and "ε = ∞" in text


def test_attention_evidence_check_on_the_phantom(trained_model, phantom_cohort, tmp_path):
    out = tmp_path / "attention"
    assert main(["benchmark", "attention", "--model", str(trained_model), "--manifest", str(phantom_cohort),
                 "--out", str(out)]) == 0
    rows = list(csv.DictReader(open(out / "attention_per_case.csv", encoding="utf-8")))
    assert len(rows) == len(read_manifest(phantom_cohort))
    for r in rows:
        shares = [float(r[f"share_{k}"]) for k in ("core", "rim", "peritumoral", "elsewhere")]
        assert sum(shares) == pytest.approx(1.0, abs=1e-3) and min(shares) >= 0
    md = (out / "attention_evidence.md").read_text(encoding="utf-8")
    assert "| oedema | peritumoral |" in md and "| necrosis | core |" in md


def test_attention_check_needs_a_phantom(trained_model, tmp_path, capsys):
    manifest = tmp_path / "m.csv"
    manifest.write_text("case_id,image,mask,site,er,pr,her2,ki67\n", encoding="utf-8")
    assert main(["benchmark", "attention", "--model", str(trained_model), "--manifest", str(manifest)]) == 1
    assert "latents.csv not found" in capsys.readouterr().err


def test_a_model_file_written_by_a_federation_predicts_and_gets_a_card(phantom_cohort, tmp_path, capsys):
    """The coordinator's RunStore writes model.pt; predict and model-card take it unchanged."""
    from fedsubtype.federation.site_algo import get_weights
    from fedsubtype.model import ModelConfig, build_model
    from fedsubtype.data.preprocess import PreprocessConfig
    from fedsubtype.federation.runstore import RunStore

    model_cfg, prep_cfg = ModelConfig(width=8, groups=4, feature_dim=32, hidden_dim=32), PreprocessConfig(size=16)
    fixed = {"value": 0.5, "method": "fixed (federated: per-case validation predictions stay at the sites)"}
    path = RunStore(tmp_path / "fed").save_final_model(
        get_weights(build_model(model_cfg, seed=0)), model_cfg, prep_cfg,
        {"source": "federated", "strategy": "fedprox", "rounds": 2, "sites": ["site1", "site2"],
         "thresholds": {t: fixed for t in ("er", "pr", "her2")}})
    case = read_manifest(phantom_cohort)[3]
    out = _predict_json(capsys, "--model", str(path), "--image", str(case.image), "--mask", str(case.mask))
    assert all(th["value"] == 0.5 and th["source"].startswith("fixed") for th in out["thresholds"].values())
    assert main(["model-card", "--model", str(path), "--out", str(tmp_path / "card.md")]) == 0
    assert "Training: federated" in (tmp_path / "card.md").read_text(encoding="utf-8")
