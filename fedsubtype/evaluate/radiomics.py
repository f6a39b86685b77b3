"""Radiomics baselines (the paper's "Radiomics (LR)" and "Radiomics (SVM)" rows).

Features come from MIRP (an IBSI-compliant radiomics library; optional extra ``fedsubtype[radiomics]``)
for texture and intensity, and from SimpleITK's label shape statistics for shape, computed over the
tumour (core + rim) and the peritumoral shell. Models are scikit-learn pipelines whose scaling, feature
selection and hyper-parameter search are all fitted inside the training folds only (no leakage).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import SimpleITK as sitk

from fedsubtype import CLASSIFICATION_TASKS, REGION_LABELS, TASKS
from fedsubtype.configio import atomic_write_text, to_dict
from fedsubtype.errors import UserError
from fedsubtype.data.manifest import Case

FEATURE_VERSION = 1
RADIOMICS_REGIONS: dict[str, tuple[int, ...]] = {
    "tumour": (REGION_LABELS["core"], REGION_LABELS["rim"]),
    "peritumoral": (REGION_LABELS["peritumoral"],),
}


@dataclass(frozen=True)
class RadiomicsConfig:
    """Feature extraction settings, stated so a study can report them (IBSI reporting items)."""

    spacing_mm: float = 1.0
    """Isotropic resampling before extraction (SimpleITK, B-spline for the image, nearest for regions)."""
    families: tuple[str, ...] = ("statistics", "intensity_histogram", "glcm", "glrlm", "glszm")
    discretisation: Literal["fixed_bin_number", "fixed_bin_size"] = "fixed_bin_number"
    """MRI intensities have arbitrary units, so a fixed bin number is the usual choice."""
    n_bins: int = 32
    bin_width: float = 0.25
    """Used with fixed_bin_size, in units of the z-scored image (standard deviations)."""
    rim_mm: float = 2.0
    peri_mm: float = 5.0

    def validate(self, where: str = "radiomics") -> None:
        from fedsubtype.errors import ConfigError

        if not 0.1 <= self.spacing_mm <= 5.0:
            raise ConfigError(f"spacing_mm={self.spacing_mm} is out of range", "use 0.1–5 mm", where=where)
        if self.n_bins < 2:
            raise ConfigError(f"n_bins={self.n_bins} is too small", "use at least 2 bins", where=where)
        if self.bin_width <= 0:
            raise ConfigError(f"bin_width={self.bin_width} must be positive", where=where)


def _require_mirp():
    try:
        import mirp  # noqa: F401
    except ImportError:
        raise UserError("the radiomics baselines need MIRP",
                        "install the extra: pip install 'fedsubtype[radiomics]'") from None
    for name in ("mirp", "MIRP"):
        logging.getLogger(name).setLevel(logging.ERROR)
    return mirp


def _resample_iso(image: sitk.Image, spacing: float, interpolator: int) -> sitk.Image:
    size = [max(1, int(round(sz * sp / spacing))) for sz, sp in zip(image.GetSize(), image.GetSpacing())]
    return sitk.Resample(image, size, sitk.Transform(), interpolator, image.GetOrigin(), (spacing,) * 3,
                         image.GetDirection(), 0.0, image.GetPixelID())


def _crop_to_regions(image: sitk.Image, regions: sitk.Image, pad_vox: int = 3) -> tuple[sitk.Image, sitk.Image]:
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(sitk.Cast(regions > 0, sitk.sitkUInt8))
    x, y, z, sx, sy, sz = stats.GetBoundingBox(1)
    lo = [max(0, v - pad_vox) for v in (x, y, z)]
    hi = [min(n, v + s + pad_vox) for v, s, n in zip((x, y, z), (sx, sy, sz), image.GetSize())]
    size = [h - lo_ for h, lo_ in zip(hi, lo)]
    return sitk.RegionOfInterest(image, size, lo), sitk.RegionOfInterest(regions, size, lo)


def _shape_features(mask: sitk.Image, prefix: str) -> dict[str, float]:
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.ComputePerimeterOn()
    stats.Execute(mask)
    if not stats.HasLabel(1):
        return {}
    return {
        f"{prefix}shape_volume_ml": stats.GetPhysicalSize(1) / 1000.0,
        f"{prefix}shape_elongation": stats.GetElongation(1),
        f"{prefix}shape_flatness": stats.GetFlatness(1),
        f"{prefix}shape_roundness": stats.GetRoundness(1),
        f"{prefix}shape_perimeter_mm2": stats.GetPerimeter(1),
        f"{prefix}shape_feret_mm": stats.GetFeretDiameter(1),
    }


def _mirp_features(image: np.ndarray, mask: np.ndarray, cfg: RadiomicsConfig, prefix: str) -> dict[str, float]:
    from mirp import extract_features

    kwargs = dict(base_discretisation_method=cfg.discretisation, intensity_normalisation="standardisation")
    if cfg.discretisation == "fixed_bin_number":
        kwargs["base_discretisation_n_bins"] = cfg.n_bins
    else:
        kwargs["base_discretisation_bin_width"] = cfg.bin_width
    root = logging.getLogger()
    quiet = logging.NullHandler()  # MIRP calls logging.basicConfig(INFO, stdout); a root handler makes that a no-op
    root.addHandler(quiet)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            frames = extract_features(image=image, mask=mask.astype(np.uint8), image_modality="MR",
                                      base_feature_families=list(cfg.families), **kwargs)
    finally:
        root.removeHandler(quiet)
    frame = frames[0]
    feats: dict[str, float] = {}
    for col in frame.columns:
        value = frame[col].iloc[0]
        if col.startswith(("image_", "sample_", "roi_", "mask_")) or isinstance(value, str):
            continue
        try:
            feats[prefix + col] = float(value)
        except (TypeError, ValueError):
            continue
    return feats


def extract_case_features(case: Case, cfg: RadiomicsConfig = RadiomicsConfig()) -> dict[str, float]:
    """Radiomic features of one case over the tumour and its peritumoral shell."""
    _require_mirp()
    from fedsubtype.data.imageio import load_case_images
    from fedsubtype.data.regions import compute_regions

    image, mask = load_case_images(case)
    regions = compute_regions(image, mask, rim_mm=cfg.rim_mm, peri_mm=cfg.peri_mm)
    image, regions = _crop_to_regions(image, regions)
    image = _resample_iso(sitk.Cast(image, sitk.sitkFloat32), cfg.spacing_mm, sitk.sitkBSpline)
    regions = _resample_iso(regions, cfg.spacing_mm, sitk.sitkNearestNeighbor)
    img_arr = sitk.GetArrayFromImage(image)
    reg_arr = sitk.GetArrayFromImage(regions)
    feats: dict[str, float] = {}
    for name, labels in RADIOMICS_REGIONS.items():
        region = np.isin(reg_arr, labels)
        if region.sum() < 8:
            continue
        region_img = sitk.GetImageFromArray(region.astype(np.uint8))
        region_img.CopyInformation(regions)
        feats.update(_shape_features(region_img, f"{name}__"))
        feats.update(_mirp_features(img_arr, region, cfg, f"{name}__"))
    return feats


def _case_key(case: Case, cfg: RadiomicsConfig) -> str:
    h = hashlib.sha256()
    for path in (case.image, case.mask):
        p = Path(path)
        if p.is_dir():
            for f in sorted(p.rglob("*")):
                if f.is_file():
                    h.update(f.read_bytes())
        else:
            h.update(p.read_bytes())
    h.update(json.dumps(to_dict(cfg), sort_keys=True).encode())
    h.update(str(FEATURE_VERSION).encode())
    return h.hexdigest()


def _extract_cached(args: tuple[Case, RadiomicsConfig, Path | None]) -> dict[str, float]:
    case, cfg, cache_dir = args
    if cache_dir is None:
        return extract_case_features(case, cfg)
    path = cache_dir / f"{_case_key(case, cfg)}.json"
    if path.is_file():
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, OSError):
            path.unlink(missing_ok=True)
    feats = extract_case_features(case, cfg)
    atomic_write_text(path, json.dumps(feats))
    return feats


def feature_matrix(cases: Sequence[Case], cfg: RadiomicsConfig = RadiomicsConfig(), *,
                   cache_dir: str | os.PathLike | None = None, workers: int = 1,
                   progress: bool = True) -> tuple[np.ndarray, list[str]]:
    """Features of every case as an (N, F) matrix (NaN where a feature is undefined) and their names.

    Per-case features are cached as JSON keyed by file content and settings, written atomically.
    """
    from tqdm import tqdm

    _require_mirp()
    cache = Path(cache_dir) / "radiomics" if cache_dir else None
    jobs = [(c, cfg, cache) for c in cases]
    if workers > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(workers) as pool:
            rows = list(tqdm(pool.map(_extract_cached, jobs, chunksize=4), total=len(jobs),
                             desc="radiomics", disable=not progress))
    else:
        rows = [_extract_cached(j) for j in tqdm(jobs, desc="radiomics", disable=not progress)]
    names = sorted({k for r in rows for k in r})
    matrix = np.array([[r.get(n, np.nan) for n in names] for r in rows], dtype=np.float64)
    matrix[~np.isfinite(matrix)] = np.nan
    return matrix, names


def _pipeline(kind: Literal["lr", "svm"], task: str, seed: int, k_features: int):
    from sklearn.feature_selection import SelectKBest, VarianceThreshold, f_classif, f_regression
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.model_selection import GridSearchCV, KFold, StratifiedKFold
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC, SVR

    classify = task in CLASSIFICATION_TASKS
    steps = [("impute", SimpleImputer(strategy="median")), ("variance", VarianceThreshold()),
             ("scale", StandardScaler()),
             ("select", SelectKBest(f_classif if classify else f_regression, k=k_features))]
    if classify:
        model = (LogisticRegression(max_iter=2000, class_weight="balanced") if kind == "lr"
                 else SVC(kernel="rbf", probability=True, class_weight="balanced", random_state=seed))
        grid = {"model__C": [0.01, 0.1, 1.0, 10.0]}
        cv, scoring = StratifiedKFold(5, shuffle=True, random_state=seed), "roc_auc"
    else:
        model = Ridge() if kind == "lr" else SVR(kernel="rbf")
        grid = {"model__alpha": [0.1, 1.0, 10.0, 100.0]} if kind == "lr" else {"model__C": [1.0, 10.0, 100.0]}
        cv, scoring = KFold(5, shuffle=True, random_state=seed), "neg_mean_absolute_error"
    return GridSearchCV(Pipeline(steps + [("model", model)]), grid, cv=cv, scoring=scoring, n_jobs=1)


class RadiomicsBaseline:
    """Per-task scikit-learn models on radiomic features: LR (ridge for Ki-67) or RBF-SVM (SVR for Ki-67).

    Each task is fitted on the training cases that have its label; every preprocessing step lives inside
    the cross-validated pipeline, so nothing is fitted on validation or test cases.
    """

    def __init__(self, kind: Literal["lr", "svm"] = "lr", *, k_features: int = 20, seed: int = 0) -> None:
        if kind not in ("lr", "svm"):
            raise UserError(f"unknown radiomics model {kind!r}", "use 'lr' or 'svm'")
        self.kind, self.k_features, self.seed = kind, k_features, seed
        self.models_: dict[str, object] = {}

    def fit(self, features: np.ndarray, labels: np.ndarray) -> "RadiomicsBaseline":
        """Fit one model per task on the rows whose label is present (labels: (N, 4), NaN missing)."""
        features = np.asarray(features, dtype=np.float64)
        for j, task in enumerate(TASKS):
            present = ~np.isnan(labels[:, j])
            y = labels[present, j]
            if task in CLASSIFICATION_TASKS and (len(np.unique(y)) < 2 or min(np.bincount(y.astype(int))) < 5):
                continue
            if task == "ki67" and present.sum() < 10:
                continue
            k = min(self.k_features, features.shape[1])
            search = _pipeline(self.kind, task, self.seed, k)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                search.fit(features[present], y if task in CLASSIFICATION_TASKS else y / 100.0)
            self.models_[task] = search.best_estimator_
        return self

    def predict(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Probabilities (N, 3) for ER/PR/HER2 and Ki-67 in percent (N,); NaN for tasks not fitted."""
        features = np.asarray(features, dtype=np.float64)
        probs = np.full((len(features), len(CLASSIFICATION_TASKS)), np.nan)
        for j, task in enumerate(CLASSIFICATION_TASKS):
            if task in self.models_:
                probs[:, j] = self.models_[task].predict_proba(features)[:, 1]
        ki67 = np.full(len(features), np.nan)
        if "ki67" in self.models_:
            ki67 = np.clip(self.models_["ki67"].predict(features) * 100.0, 0.0, 100.0)
        return probs, ki67
