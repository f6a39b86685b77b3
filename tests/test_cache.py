"""The preprocessing cache: hits, invalidation by config and by content, damaged entries, concurrent writers."""

from __future__ import annotations

import logging
import multiprocessing
import os
from dataclasses import replace

import numpy as np
import pytest

from fedsubtype.data.cache import PreprocessCache, content_hash
from fedsubtype.configio import atomic_write_bytes
from fedsubtype.errors import ImageReadError, UserError
from fedsubtype.data.manifest import Case
from fedsubtype.data.preprocess import PreprocessConfig

CFG = PreprocessConfig(size=16, margin_mm=2.0)


def test_miss_then_hit_returns_the_same_arrays(tmp_path, write_case):
    case = write_case(tmp_path / "data")
    cache = PreprocessCache(tmp_path / "cache", CFG)
    first, status1 = cache.fetch(case)
    second, status2 = cache.fetch(case)
    assert (status1, status2) == ("miss", "hit")
    assert np.array_equal(first.regions, second.regions)
    assert np.allclose(first.image, second.image, atol=1e-2)  # float16 on disk
    assert second.image.dtype == np.float32 and second.meta == first.meta
    assert cache.path(case).is_file() and cache.path(case).stat().st_size < 16**3 * 3
    # a second cache object over the same folder (another process, later) finds it too
    assert PreprocessCache(tmp_path / "cache", CFG).fetch(case)[1] == "hit"


def test_config_change_gives_a_new_key(tmp_path, write_case):
    case = write_case(tmp_path / "data")
    a = PreprocessCache(tmp_path / "cache", CFG)
    b = PreprocessCache(tmp_path / "cache", replace(CFG, peri_mm=4.0))
    assert a.key(case) != b.key(case)
    a.get(case)
    assert b.fetch(case)[1] == "miss"
    assert a.key(case) == PreprocessCache(tmp_path / "other", PreprocessConfig(size=16, margin_mm=2.0)).key(case)


def test_changed_file_invalidates_but_a_touch_does_not(tmp_path, write_case):
    case = write_case(tmp_path / "data")
    cache = PreprocessCache(tmp_path / "cache", CFG)
    key = cache.key(case)
    cache.get(case)
    os.utime(case.image, ns=(1_000_000_000, 1_000_000_000))  # same bytes, new mtime
    assert cache.key(case) == key and cache.fetch(case)[1] == "hit"
    write_case(tmp_path / "data", seed=1)  # same paths, new image content
    assert cache.key(case) != key
    assert cache.fetch(case)[1] == "miss"


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage"])
def test_damaged_entry_is_detected_and_rebuilt(tmp_path, caplog, damage, write_case):
    case = write_case(tmp_path / "data")
    cache = PreprocessCache(tmp_path / "cache", CFG)
    good = cache.get(case)
    path = cache.path(case)
    blob = bytearray(path.read_bytes())
    if damage == "truncate":
        blob = blob[: len(blob) // 2]
    elif damage == "flip":
        blob[len(blob) // 2] ^= 0xFF
    else:
        blob = bytearray(b"not a cache entry at all")
    path.write_bytes(bytes(blob))
    with caplog.at_level(logging.WARNING, logger="fedsubtype.data.cache"):
        again, status = cache.fetch(case)
    assert status == "rebuilt"
    assert "damaged cache entry" in caplog.text and case.case_id in caplog.text
    assert np.array_equal(again.regions, good.regions)
    assert cache.fetch(case)[1] == "hit"


def _write_entry(path: str, blob: bytes, barrier) -> None:
    barrier.wait()  # both writers replace the same entry at the same moment, many times over
    for _ in range(200):
        atomic_write_bytes(path, blob)


def test_two_processes_writing_one_entry_leave_it_valid(tmp_path, write_case):
    case = write_case(tmp_path / "data")
    cache = PreprocessCache(tmp_path / "cache", CFG)
    pc, status = cache.fetch(case)
    assert status == "miss"
    blob = cache.path(case).read_bytes()
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_write_entry, args=(str(cache.path(case)), blob, barrier)) for _ in range(2)]
    for p in procs:
        p.start()
    reads = {"hit": 0}
    while any(p.is_alive() for p in procs):  # a reader during the writes sees whole entries only
        status = cache.fetch(case)[1]
        reads[status] = reads.get(status, 0) + 1
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    assert set(reads) == {"hit"}, reads
    assert cache.fetch(case)[1] == "hit"
    assert not list(cache.path(case).parent.glob("*.tmp")), "no temporary files left behind"


def test_warm_counts_and_parallel_workers(tmp_path, write_case):
    cases = [write_case(tmp_path / "data", f"c{i}", seed=i, radius_mm=5.0 + i) for i in range(3)]
    cache = PreprocessCache(tmp_path / "cache", CFG)
    cold = cache.warm(cases[:2], progress=False)
    assert (cold["cases"], cold["miss"], cold["hit"], cold["rebuilt"], cold["failed"]) == (2, 2, 0, 0, 0)
    assert cold["cases_per_s"] > 0
    cache.path(cases[0]).write_bytes(b"broken")
    again = cache.warm(cases, workers=2, progress=False)
    assert (again["hit"], again["miss"], again["rebuilt"]) == (1, 1, 1)
    assert cache.warm(cases, progress=False)["hit"] == 3


def test_warm_raises_or_skips_a_bad_case(tmp_path, write_case):
    good = write_case(tmp_path / "data", "good")
    empty = write_case(tmp_path / "data", "empty", radius_mm=0.1)  # no voxel inside the tumour
    cache = PreprocessCache(tmp_path / "cache", CFG)
    with pytest.raises(UserError, match="^empty: the tumour mask is empty"):
        cache.warm([good, empty], progress=False)
    report = cache.warm([good, empty], progress=False, skip_bad=True)
    assert (report["hit"], report["failed"]) == (1, 1)
    assert report["problems"] == ["empty: the tumour mask is empty — check the segmentation file (every case needs a tumour)"]


def test_missing_file_is_a_user_error(tmp_path, write_case):
    case = write_case(tmp_path / "data")
    broken = Case("gone", tmp_path / "nope.nii.gz", case.mask, "A", case.labels)
    with pytest.raises(ImageReadError, match="cannot read"):
        PreprocessCache(tmp_path / "cache", CFG).key(broken)


def test_content_hash_of_a_dicom_like_folder(tmp_path):
    folder = tmp_path / "series"
    folder.mkdir()
    (folder / "a.dcm").write_bytes(b"one")
    (folder / "b.dcm").write_bytes(b"two")
    first = content_hash(folder)
    (folder / "b.dcm").write_bytes(b"TWO")
    assert content_hash(folder) != first
