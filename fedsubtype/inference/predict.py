"""Predictions for new cases from a `model.pt`: biomarker probabilities, calls, Ki-67, subtype, region weights."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from fedsubtype import CLASSIFICATION_TASKS, TASKS
from fedsubtype.train.checkpoint import ModelBundle
from fedsubtype.configio import atomic_write_text
from fedsubtype.errors import UserError
from fedsubtype.data.manifest import Case

if TYPE_CHECKING:
    from fedsubtype.data.preprocess import PreprocessedCase

REGION_WEIGHT_NAMES: tuple[str, ...] = ("core", "rim", "peritumoral")


def threshold_info(bundle: ModelBundle) -> dict[str, dict[str, Any]]:
    """Decision threshold per task and where it came from (validation-chosen or fixed)."""
    stored = bundle.metadata.get("thresholds") or {}
    out = {}
    for task in CLASSIFICATION_TASKS:
        entry = stored.get(task)
        if isinstance(entry, dict):
            out[task] = {"value": float(entry.get("value", 0.5)), "source": str(entry.get("source", entry.get("method", "stored")))}
        elif entry is not None:
            out[task] = {"value": float(entry), "source": "stored"}
        else:
            out[task] = {"value": 0.5, "source": "fixed (no threshold stored in the model file)"}
    return out


def subtype_of(calls: dict[str, int], ki67: float) -> tuple[str, str]:
    """Molecular subtype by the St Gallen surrogate rules, and the rule that produced it."""
    from fedsubtype.evaluate.metrics import SubtypeRules, subtype_from_biomarkers

    rules = SubtypeRules()
    label = subtype_from_biomarkers(np.array([calls["er"]]), np.array([calls["pr"]]), np.array([calls["her2"]]),
                                    np.array([ki67]), rules)[0]
    hr = "HR+" if calls["er"] or calls["pr"] else "HR−"
    her2 = "HER2+" if calls["her2"] else "HER2−"
    cut = getattr(rules, "ki67_cutoff", 20.0)
    ki = f"Ki-67 {'≥' if ki67 >= cut else '<'} {cut:g}%"
    pr = "PR+" if calls["pr"] else "PR−"
    return str(label), f"St Gallen surrogate: {hr} ({'ER+' if calls['er'] else 'ER−'}, {pr}), {her2}, {ki} → {label}"


def _tensors(pre: PreprocessedCase, device: torch.device) -> dict[str, torch.Tensor]:
    return {"image": torch.as_tensor(np.asarray(pre.image, dtype=np.float32))[None, None].to(device),
            "regions": torch.as_tensor(np.asarray(pre.regions, dtype=np.int64))[None].to(device)}


@torch.no_grad()
def run_model(model: nn.Module, pre: PreprocessedCase, *, explain: bool = False) -> dict[str, Any]:
    """One preprocessed case through the model: probabilities, Ki-67 (percent), region weights, maps."""
    device = next(model.parameters()).device
    model.eval()
    out = model(**_tensors(pre, device), explain=explain)
    result: dict[str, Any] = {
        "probabilities": {t: float(p) for t, p in zip(CLASSIFICATION_TASKS, torch.sigmoid(out["logits"][0]).tolist())},
        "ki67": float(out["ki67"][0]) * 100.0,
    }
    if "region_weights" in out:
        result["region_weights"] = {n: float(w) for n, w in zip(REGION_WEIGHT_NAMES, out["region_weights"][0].tolist())}
    if explain:
        result["attention"] = {k: v[0, 0].cpu().numpy() for k, v in out["attention"].items()}
    return result


def describe(case_id: str, raw: dict[str, Any], bundle: ModelBundle) -> dict[str, Any]:
    """The JSON a user sees for one case."""
    thresholds = threshold_info(bundle)
    calls = {t: int(raw["probabilities"][t] >= thresholds[t]["value"]) for t in CLASSIFICATION_TASKS}
    subtype, rule = subtype_of(calls, raw["ki67"])
    out = {
        "case_id": case_id,
        "probabilities": {t: round(v, 4) for t, v in raw["probabilities"].items()},
        "thresholds": thresholds,
        "calls": {t: ("positive" if c else "negative") for t, c in calls.items()},
        "ki67_percent": round(raw["ki67"], 2),
        "subtype": {"label": subtype, "rule": rule},
        "region_weights": {k: round(v, 4) for k, v in raw.get("region_weights", {}).items()},
        "model": {"path": str(bundle.path) if bundle.path else None, "variant": getattr(bundle.model_config, "variant", None),
                  "fedsubtype_version": bundle.fedsubtype_version},
        "disclaimer": "research use only; not for clinical decisions",
    }
    return out


def _checked_case(image: Path, mask: Path, case_id: str | None = None) -> Case:
    from fedsubtype.data.validation import validate_case

    case = Case(case_id or Path(image).name.split(".")[0], Path(image), Path(mask), "", {t: None for t in TASKS})
    errors = [p for p in validate_case(case) if p.severity == "error"]
    if errors:
        raise UserError(errors[0].what, errors[0].fix or "fix the input", where=str(image))
    return case


def predict_one(model: nn.Module, bundle: ModelBundle, image: Path, mask: Path, *,
                explain_dir: Path | None = None, case_id: str | None = None) -> dict[str, Any]:
    """Predict one image + mask; with `explain_dir`, also write NIfTI attention maps and a PNG figure."""
    from fedsubtype.inference.explain import attention_maps_on_image, attention_shares, explanation_figure, write_attention_niftis
    from fedsubtype.data.preprocess import preprocess_case

    case = _checked_case(image, mask, case_id)
    pre = preprocess_case(case, bundle.preprocess_config)
    raw = run_model(model, pre, explain=True)
    result = describe(case.case_id, raw, bundle)
    result["attention_share"] = {k: round(v, 4) for k, v in attention_shares(raw["attention"]["fused"], pre.regions).items()}
    if explain_dir is not None:
        from fedsubtype.data.imageio import load_case_images
        from fedsubtype.data.regions import compute_regions

        img, msk = load_case_images(case)
        maps = attention_maps_on_image(raw["attention"], pre.meta, img)
        result["explanation"] = {"attention_maps": write_attention_niftis(maps, explain_dir, case.case_id)}
        cfg = bundle.preprocess_config
        regions = compute_regions(img, msk, rim_mm=cfg.rim_mm, peri_mm=cfg.peri_mm)
        caption = (f"{case.case_id}: ER {result['probabilities']['er']:.2f}, PR {result['probabilities']['pr']:.2f}, "
                   f"HER2 {result['probabilities']['her2']:.2f}, Ki-67 {result['ki67_percent']:.0f}% → "
                   f"{result['subtype']['label']}  (research use only)")
        png = Path(explain_dir) / f"{case.case_id}_explanation.png"
        explanation_figure(img, regions, maps["fused"], caption, png)
        result["explanation"]["figure"] = str(png)
        atomic_write_text(Path(explain_dir) / f"{case.case_id}_prediction.json", json.dumps(result, indent=2))
    return result


PREDICTION_COLUMNS: tuple[str, ...] = (
    "case_id", "site", *[f"{t}_prob" for t in CLASSIFICATION_TASKS], *[f"{t}_call" for t in CLASSIFICATION_TASKS],
    "ki67_pred", "subtype", *[f"weight_{r}" for r in REGION_WEIGHT_NAMES],
    *[f"attention_{r}" for r in ("core", "rim", "peritumoral", "elsewhere")],
)


def predict_cohort(model: nn.Module, bundle: ModelBundle, cases: Sequence[Case], out_csv: Path, *,
                   cache_dir: Path | None = None, progress: bool = True,
                   on_case: Callable[[Case, dict[str, Any]], None] | None = None) -> int:
    """Predict every case (reusing the preprocessing cache) and write one CSV row per case (atomic)."""
    from tqdm.auto import tqdm

    from fedsubtype.data.cache import PreprocessCache
    from fedsubtype.inference.explain import attention_shares
    from fedsubtype.data.preprocess import preprocess_case

    cache = PreprocessCache(cache_dir, bundle.preprocess_config) if cache_dir else None
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(PREDICTION_COLUMNS)
    for case in tqdm(cases, desc="predict", unit="case", disable=not progress):
        pre = cache.get(case) if cache else preprocess_case(case, bundle.preprocess_config)
        raw = run_model(model, pre, explain=True)
        res = describe(case.case_id, raw, bundle)
        shares = attention_shares(raw["attention"]["fused"], pre.regions)
        writer.writerow([case.case_id, case.site, *[f"{res['probabilities'][t]:.4f}" for t in CLASSIFICATION_TASKS],
                         *[int(res["calls"][t] == "positive") for t in CLASSIFICATION_TASKS],
                         f"{res['ki67_percent']:.2f}", res["subtype"]["label"],
                         *[f"{res['region_weights'].get(r, float('nan')):.4f}" for r in REGION_WEIGHT_NAMES],
                         *[f"{shares[r]:.4f}" for r in ("core", "rim", "peritumoral", "elsewhere")]])
        if on_case:
            on_case(case, {**res, "attention_share": shares})
    atomic_write_text(out_csv, buf.getvalue())
    return len(cases)
