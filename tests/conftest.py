"""Shared fixtures. `phantom_cohort`: a small phantom cohort (30 cases, 3 sites, seed 0), written once per session.
`tiny_phantom`: a smaller one (24 cases, 2 sites, seed 3) for the simulation tests, written once per test module.
`write_case`: writes one small synthetic case (image + tumour mask, NIfTI) and returns its `Case`."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import pytest

from fedsubtype import TASKS
from fedsubtype.data.manifest import Case


@pytest.fixture(scope="session")
def phantom_cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Manifest path of a 30-case, 3-site phantom cohort (seed 0) under a session temp folder."""
    from fedsubtype.phantom import generate_cohort

    return generate_cohort(tmp_path_factory.mktemp("phantom") / "cohort", cases=30, sites=3, seed=0, progress=False)


@pytest.fixture(scope="module")
def tiny_phantom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Cohort folder (manifest.csv inside) of a 24-case, 2-site phantom (seed 3); the scenario cache goes beside it."""
    from fedsubtype.phantom import generate_cohort

    root = tmp_path_factory.mktemp("phantom")
    generate_cohort(root / "cohort", cases=24, sites=2, seed=3, workers=1, progress=False)
    return root / "cohort"


def synthetic_case(folder: Path, case_id: str = "c1", *, seed: int = 0, radius_mm: float = 6.0, site: str = "A",
                   labels: Mapping[str, float | None] | None = None) -> Case:
    """A body-with-air volume (16 x 40 x 40 voxels of 2 x 1 x 1 mm) holding a spherical tumour, written as
    `<case_id>_img.nii.gz` and `<case_id>_mask.nii.gz` in `folder`; noise drawn from `seed`. Labels default
    to ER+, HER2-, PR and Ki-67 missing; tasks left out of `labels` are missing."""
    import SimpleITK as sitk

    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(np.arange(16) * 2.0, np.arange(40) * 1.0, np.arange(40) * 1.0, indexing="ij")
    tumour = ((x - 19.3) ** 2 + (y - 18.7) ** 2 + (z - 15.2) ** 2 <= radius_mm**2).astype(np.uint8)
    arr = 100 + 5 * rng.standard_normal(z.shape) + 80 * tumour
    arr[y > 34] = 1.0
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, a in (("img", arr.astype(np.float32)), ("mask", tumour)):
        im = sitk.GetImageFromArray(a)
        im.SetSpacing((1.0, 1.0, 2.0))
        paths.append(folder / f"{case_id}_{name}.nii.gz")
        sitk.WriteImage(im, str(paths[-1]))
    given = {"er": 1.0, "her2": 0.0} if labels is None else labels
    return Case(case_id, paths[0], paths[1], site, {t: given.get(t) for t in TASKS})


@pytest.fixture(scope="session")
def write_case() -> Callable[..., Case]:
    """The synthetic-case writer (see `synthetic_case`), for tests and module-scoped fixtures alike."""
    return synthetic_case


@pytest.fixture
def procs(tmp_path: Path):
    """Real processes a test starts (SuperLink, SuperNodes, coordinator, sites); all killed at the end, also on failure."""
    from fedutil import Procs

    p = Procs(tmp_path)
    try:
        yield p
    finally:
        p.close()
