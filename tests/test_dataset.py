"""CaseDataset items and batching, label matrix, and the seeded, region-aligned augmentation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, default_collate

from fedsubtype.data.augment import build_augmentation
from fedsubtype.data.cache import PreprocessCache
from fedsubtype.data.dataset import CaseDataset
from fedsubtype.errors import ConfigError
from fedsubtype.data.manifest import Case, read_manifest
from fedsubtype.data.preprocess import PreprocessConfig

CFG = PreprocessConfig(size=16, margin_mm=2.0)


@pytest.fixture(scope="module")
def two_cases(tmp_path_factory, write_case):
    folder = tmp_path_factory.mktemp("ds")
    cases = [write_case(folder, "a", site="S1", labels={"er": 1.0, "her2": 0.0, "ki67": 35.0}),
             write_case(folder, "b", seed=1, site="S2", labels={"pr": 0.0})]
    return cases, PreprocessCache(folder / "cache", CFG)


def test_item_keys_shapes_dtypes_and_missing_labels(two_cases):
    cases, cache = two_cases
    ds = CaseDataset(cases, cache)
    assert len(ds) == 2
    item = ds[0]
    assert set(item) == {"image", "regions", "voxel_mm", "labels", "present", "case_id", "site"}
    pre = cache.get(cases[0])
    assert item["voxel_mm"].dtype == torch.float32 and item["voxel_mm"].ndim == 0
    assert float(item["voxel_mm"]) == pytest.approx(pre.meta["fov_mm"] / 16)
    assert item["image"].shape == (1, 16, 16, 16) and item["image"].dtype == torch.float32
    assert item["regions"].shape == (16, 16, 16) and item["regions"].dtype == torch.int64
    assert item["labels"].dtype == torch.float32 and item["present"].dtype == torch.bool
    assert item["labels"].tolist() == [1.0, 0.0, 0.0, 35.0]
    assert item["present"].tolist() == [True, False, True, True]
    other = ds[1]
    assert other["labels"].tolist() == [0.0, 0.0, 0.0, 0.0]
    assert other["present"].tolist() == [False, True, False, False]
    assert (item["case_id"], item["site"], other["site"]) == ("a", "S1", "S2")


def test_default_collate_batches_items(two_cases):
    cases, cache = two_cases
    batch = next(iter(DataLoader(CaseDataset(cases, cache), batch_size=2, collate_fn=default_collate)))
    assert batch["image"].shape == (2, 1, 16, 16, 16)
    assert batch["regions"].shape == (2, 16, 16, 16)
    assert batch["present"].shape == (2, 4) and batch["present"].dtype == torch.bool
    assert batch["case_id"] == ["a", "b"] and batch["site"] == ["S1", "S2"]


def test_label_matrix_has_nan_for_missing_and_reads_no_image(tmp_path):
    cases = [Case("x", tmp_path / "missing.nii.gz", tmp_path / "missing_mask.nii.gz", "S",
                  {"er": 1.0, "pr": None, "her2": 0.0, "ki67": 12.5})]
    m = CaseDataset(cases, PreprocessCache(tmp_path / "cache", CFG)).label_matrix()
    assert m.shape == (1, 4)
    assert m[0, 0] == 1.0 and np.isnan(m[0, 1]) and m[0, 2] == 0.0 and m[0, 3] == 12.5
    assert CaseDataset([], PreprocessCache(tmp_path / "cache", CFG)).label_matrix().shape == (0, 4)


def _blob_item(size=24):
    """Image = 10 inside an off-centre tumour-like blob, 0 elsewhere; regions mark the same blob."""
    idx = np.indices((size,) * 3)
    blob = ((idx[0] - 9) ** 2 + (idx[1] - 13) ** 2 + (idx[2] - 11) ** 2) <= 25
    regions = torch.from_numpy(np.where(blob, 2, 0).astype(np.int64))
    image = torch.from_numpy(10.0 * blob.astype(np.float32))[None]
    return {"image": image, "regions": regions, "case_id": "blob"}


def test_augmentation_is_deterministic_with_a_seed():
    item = _blob_item()
    a = build_augmentation(7)(item)
    b = build_augmentation(7)(item)
    c = build_augmentation(8)(item)
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["regions"], b["regions"])
    assert not torch.equal(a["image"], c["image"])
    assert a["case_id"] == "blob" and a["image"].shape == (1, 24, 24, 24)
    assert a["regions"].shape == (24, 24, 24) and a["regions"].dtype == torch.int64
    assert torch.equal(item["image"], _blob_item()["image"]), "the input must not be modified"


def test_augmentation_keeps_regions_aligned_with_the_image():
    item = _blob_item()
    moved = 0
    for seed in range(6):
        out = build_augmentation(seed, strength=1.5)(item)
        blob_reg = out["regions"] > 0
        image = out["image"][0]
        blob_img = image > (image[blob_reg].median() + image[~blob_reg].median()) / 2
        dice = 2 * (blob_img & blob_reg).sum() / (blob_img.sum() + blob_reg.sum())
        assert dice > 0.9, (seed, float(dice))
        assert set(out["regions"].unique().tolist()) <= {0, 2}
        moved += int(not torch.equal(out["regions"], item["regions"]))
    assert moved >= 3, "the spatial transforms must actually move the regions"
    with pytest.raises(ConfigError):
        build_augmentation(0, strength=-1)


def test_dataset_augmentation_does_not_depend_on_order(two_cases):
    cases, cache = two_cases
    ds = CaseDataset(cases, cache, augment=build_augmentation(3))
    forward = [ds[0]["image"], ds[1]["image"]]
    backward = [ds[1]["image"], ds[0]["image"]][::-1]
    assert all(torch.equal(f, b) for f, b in zip(forward, backward))
    ds.augment.set_random_state(seed=12345)  # what a DataLoader worker_init may do: items must not change
    assert torch.equal(ds[0]["image"], forward[0])
    ds.set_epoch(1)
    assert not torch.equal(ds[0]["image"], forward[0])


def test_phantom_cases_preprocess_through_the_dataset(phantom_cohort, tmp_path):
    cases = read_manifest(phantom_cohort)[:3]
    ds = CaseDataset(cases, PreprocessCache(tmp_path / "cache", PreprocessConfig(size=24)))
    for i in range(len(ds)):
        item = ds[i]
        counts = torch.bincount(item["regions"].ravel(), minlength=4)
        assert (counts[1:] > 0).all(), f"{item['case_id']}: every region must be present"
        assert torch.isfinite(item["image"]).all()
        body = item["image"][0][item["regions"] > 0]
        assert body.abs().mean() < 10
    assert ds.label_matrix().shape == (3, 4)
