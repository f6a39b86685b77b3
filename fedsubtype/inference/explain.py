"""Explanations a radiologist can open: attention maps on the original image grid, shares per region, a figure."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np
import SimpleITK as sitk

from fedsubtype import REGION_LABELS
from fedsubtype.data.imageio import write_image

SHARE_REGIONS: tuple[str, ...] = ("core", "rim", "peritumoral", "elsewhere")


def attention_shares(attention: np.ndarray, regions: np.ndarray) -> dict[str, float]:
    """Fraction of (non-negative) attention mass in core, rim, peritumoral tissue and elsewhere."""
    att = np.clip(np.asarray(attention, dtype=np.float64), 0, None)
    total = att.sum()
    if total <= 0:
        return {r: 0.0 for r in SHARE_REGIONS}
    shares = {name: float(att[regions == REGION_LABELS[name]].sum() / total) for name in ("core", "rim", "peritumoral")}
    shares["elsewhere"] = float(max(0.0, 1.0 - sum(shares.values())))
    return shares


def attention_maps_on_image(attention: Mapping[str, np.ndarray], meta: dict[str, Any],
                            reference: sitk.Image) -> dict[str, sitk.Image]:
    """Every model-grid attention map put back on the input image's grid (size, spacing, origin, direction)."""
    from fedsubtype.data.preprocess import to_image_grid

    return {name: to_image_grid(np.asarray(arr, dtype=np.float32), meta, reference, interpolator="linear")
            for name, arr in attention.items()}


def write_attention_niftis(maps: Mapping[str, sitk.Image], out_dir: Path, case_id: str) -> dict[str, str]:
    """Write each map as `<case_id>_attention_<name>.nii.gz` (atomic) so it overlays in 3D Slicer / ITK-SNAP."""
    paths = {}
    for name, img in maps.items():
        path = Path(out_dir) / f"{case_id}_attention_{name}.nii.gz"
        write_image(sitk.Cast(img, sitk.sitkFloat32), path)
        paths[name] = str(path)
    return paths


def _centroid_index(regions: np.ndarray) -> tuple[int, int, int]:
    tumour = np.argwhere(np.isin(regions, (REGION_LABELS["core"], REGION_LABELS["rim"])))
    if len(tumour) == 0:
        return tuple(s // 2 for s in regions.shape)  # type: ignore[return-value]
    return tuple(int(v) for v in np.round(tumour.mean(0)))  # type: ignore[return-value]


def explanation_figure(image: sitk.Image, regions: sitk.Image, fused: sitk.Image, caption: str, path: Path) -> None:
    """PNG: axial, coronal and sagittal slices through the tumour centroid, region contours, fused attention."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    orient = sitk.DICOMOrientImageFilter()
    orient.SetDesiredCoordinateOrientation("LPS")  # display convention: axial rows anterior->posterior
    img = sitk.GetArrayFromImage(orient.Execute(image)).astype(np.float32)  # z, y, x
    reg = sitk.GetArrayFromImage(orient.Execute(regions))
    att = sitk.GetArrayFromImage(orient.Execute(fused)).astype(np.float32)
    spacing = orient.Execute(image).GetSpacing()  # x, y, z
    z, y, x = _centroid_index(reg)
    views = [("axial", img[z], reg[z], att[z], spacing[1] / spacing[0]),
             ("coronal", img[:, y][::-1], reg[:, y][::-1], att[:, y][::-1], spacing[2] / spacing[0]),
             ("sagittal", img[:, :, x][::-1], reg[:, :, x][::-1], att[:, :, x][::-1], spacing[2] / spacing[1])]
    lo, hi = np.percentile(img[reg > 0] if (reg > 0).any() else img, [1, 99.5])
    vmax = float(att.max()) or 1.0
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.6))
    colors = {"core": "#ffd400", "rim": "#ff5a1f", "peritumoral": "#00e5ff"}
    for ax, (name, im, rg, at, aspect) in zip(axes, views):
        ax.imshow(im, cmap="gray", vmin=lo - (hi - lo) * 0.6, vmax=hi, aspect=aspect, interpolation="nearest")
        shown = np.ma.masked_less(at, 0.15 * vmax)
        ax.imshow(shown, cmap="inferno", alpha=0.45, vmin=0, vmax=vmax, aspect=aspect, interpolation="bilinear")
        for region, color in colors.items():
            m = (rg == REGION_LABELS[region]).astype(float)
            if m.any():
                ax.contour(m, levels=[0.5], colors=color, linewidths=0.8)
        ax.set_title(name)
        ax.axis("off")
    handles = [plt.Line2D([], [], color=c, label=r) for r, c in colors.items()]
    fig.legend(handles=handles, loc="upper right", fontsize=8)
    fig.suptitle(caption, fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
