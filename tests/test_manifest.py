"""Manifest parsing: missing labels stay missing, every table problem is reported, writing round-trips."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedsubtype.errors import ManifestError
from fedsubtype.data.manifest import REQUIRED_COLUMNS, Case, load_manifest, read_manifest, write_manifest

HEADER = ",".join(REQUIRED_COLUMNS)


def _manifest(tmp_path, *rows: str, header: str = HEADER):
    path = tmp_path / "m.csv"
    path.write_text(header + "\n" + "\n".join(rows) + "\n", encoding="utf-8")
    return path


def test_missing_labels_stay_missing(tmp_path):
    path = _manifest(tmp_path, "a,img/a.nii.gz,msk/a.nii.gz,s1,1,,NA,", "b,b.nii.gz,b_m.nii.gz,s2,0,0,1,12.5")
    cases, problems = load_manifest(path)
    assert problems == []
    a, b = cases
    assert a.labels == {"er": 1.0, "pr": None, "her2": None, "ki67": None}
    vec = a.label_vector()
    assert vec[0] == 1.0 and all(math.isnan(v) for v in vec[1:])
    np.testing.assert_array_equal(a.present_vector(), [True, False, False, False])
    assert b.labels["ki67"] == 12.5 and b.present_vector().all()
    assert a.image == tmp_path / "img" / "a.nii.gz"  # relative to the manifest's folder


def test_every_table_problem_is_reported_at_once(tmp_path):
    path = _manifest(
        tmp_path,
        "a,a.nii.gz,a_m.nii.gz,s1,1,0,1,20",
        "a,a2.nii.gz,a2_m.nii.gz,s1,1,0,1,20",      # duplicate
        "b,b.nii.gz,b_m.nii.gz,s1,2,0,1,20",        # er outside {0,1}
        "c,c.nii.gz,c_m.nii.gz,s1,1,0,1,101",       # ki67 > 100
        "d,d.nii.gz,d_m.nii.gz,s1,1,0,1,-3",        # ki67 < 0
        "e,e.nii.gz,e_m.nii.gz,s1,yes,0,1,",        # not a number
        ",f.nii.gz,f_m.nii.gz,s1,1,0,1,",           # empty case_id
        "g,,g_m.nii.gz,,1,0,1,",                    # empty image and site
        "h,h.nii.gz,h_m.nii.gz,s1,0.5,inf,1,",      # 0.5 and inf
    )
    cases, problems = load_manifest(path)
    assert [c.case_id for c in cases] == ["a"]
    lines = [p.line() for p in problems]
    expected = ["a: duplicate case_id (also on row 2)", "b: er='2' must be 0, 1 or empty",
                "c: ki67='101' must be a percentage in [0, 100]", "d: ki67='-3'", "e: er='yes' is not a number",
                "row 8: empty case_id", "g: empty 'image'", "g: empty 'site'", "h: er='0.5'", "h: pr='inf' is not finite"]
    for text in expected:
        assert any(ln.startswith(text) for ln in lines), (text, lines)
    assert all(" — " in ln and "\n" not in ln for ln in lines)
    with pytest.raises(ManifestError, match=r"and \d+ more"):
        read_manifest(path)


def test_missing_columns_and_missing_file_are_one_line_errors(tmp_path):
    path = _manifest(tmp_path, "a,a.nii.gz,s1", header="case_id,image,site")
    with pytest.raises(ManifestError) as exc:
        load_manifest(path)
    assert "missing column(s) mask, er, pr, her2, ki67" in exc.value.line()
    with pytest.raises(ManifestError, match="manifest not found"):
        load_manifest(tmp_path / "absent.csv")
    empty = _manifest(tmp_path)
    _, problems = load_manifest(empty)
    assert problems[0].line().startswith("*: manifest has no rows")


def test_optional_columns_are_kept_and_round_trip(tmp_path):
    path = _manifest(tmp_path, "a,x/a.nii.gz,x/a_m.nii.gz,s1,1,,0,7,train,SIEMENS,3.0",
                     header=HEADER + ",split,manufacturer,field_strength")
    (case,) = read_manifest(path)
    assert case.split == "train" and case.extra == {"manufacturer": "SIEMENS", "field_strength": "3.0"}
    out = tmp_path / "copy" / "m2.csv"
    write_manifest([case], out)
    (again,) = read_manifest(out)
    assert again.image.resolve() == case.image.resolve()
    assert again.labels == case.labels and again.extra == case.extra and again.split == "train"
    assert "../x/a.nii.gz" in out.read_text(encoding="utf-8")


def test_bad_split_and_bom(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("\ufeff" + HEADER + ",split\na,a.nii.gz,a_m.nii.gz,s,1,1,1,1,holdout\n", encoding="utf-8")
    cases, problems = load_manifest(path)
    assert cases == [] and "split='holdout'" in problems[0].what


def test_written_labels_never_turn_missing_into_zero(tmp_path):
    case = Case("a", tmp_path / "a.nii.gz", tmp_path / "m.nii.gz", "s", {"er": 0.0, "pr": None, "her2": 1.0, "ki67": None})
    write_manifest([case], tmp_path / "m.csv")
    row = (tmp_path / "m.csv").read_text(encoding="utf-8").splitlines()[1]
    assert row.endswith(",s,0,,1,")


def test_misnamed_columns_get_a_rename_hint(tmp_path):
    path = _manifest(tmp_path, "a,a.nii.gz,a_m.nii.gz,s,1,1,0,5",
                     header="case_id,image,mask,site,ER,pr,her2,Ki-67")
    with pytest.raises(ManifestError) as exc:
        load_manifest(path)
    line = exc.value.line()
    assert "missing column(s) er, ki67" in line
    assert "rename 'ER' to 'er'; rename 'Ki-67' to 'ki67'" in line
