"""Validation against a corpus of broken cases written as real files (tests/broken_cases.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from broken_cases import CORPUS, build_corpus
from fedsubtype.cli import main
from fedsubtype.data.manifest import load_manifest
from fedsubtype.data.validation import validate_case, validate_cases, validate_manifest


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return build_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def corpus_cases(corpus):
    cases, problems = load_manifest(corpus)
    assert problems == []
    return {c.case_id: c for c in cases}


@pytest.mark.parametrize("name", list(CORPUS))
def test_each_broken_case_is_reported(corpus_cases, name):
    _, severity, text = CORPUS[name]
    problems = validate_case(corpus_cases[name])
    if severity is None:
        assert problems == []
        return
    matching = [p for p in problems if text in p.what and p.severity == severity]
    assert matching, f"{name}: expected a {severity} containing {text!r}, got {[p.line() for p in problems]}"
    for p in problems:
        assert p.case_id == name
        assert "\n" not in p.line() and " — " in p.line()
    usable = not any(p.severity == "error" for p in problems)
    assert usable == (severity == "warning")


def test_multilabel_names_the_rule(corpus_cases):
    (p,) = validate_case(corpus_cases["multilabel"])
    assert "all non-zero labels are taken as tumour" in p.what


def test_grid_warning_says_resampled_and_disjoint_is_error(corpus_cases):
    (p,) = validate_case(corpus_cases["mask_spacing"])
    assert "resampled nearest-neighbour" in p.what
    (q,) = validate_case(corpus_cases["mask_far_away"])
    assert q.severity == "error" and "does not overlap" in q.what


def test_manifest_report_lists_everything_and_summarises(corpus):
    report = validate_manifest(corpus, workers=2)
    ids_with_errors = {p.case_id for p in report.errors}
    expected_bad = {n for n, (_, sev, _) in CORPUS.items() if sev == "error"}
    assert ids_with_errors == expected_bad
    assert {c.case_id for c in report.cases} == set(CORPUS) - expected_bad
    assert not report.ok
    s = report.summary()
    assert s["rows"] == len(CORPUS) and s["cases"] == len(CORPUS) - len(expected_bad)
    assert sum(s["sites"].values()) == s["cases"]
    assert s["labels"]["her2"]["missing"] == s["cases"]
    assert s["labels"]["er"]["positive"] + s["labels"]["er"]["negative"] == s["cases"]
    assert s["labels"]["ki67"]["present"] == s["cases"]
    lines = report.format()
    assert len(lines) == len(report.problems) + 6


def test_threaded_and_serial_give_the_same_report(corpus_cases):
    cases = list(corpus_cases.values())
    assert validate_cases(cases, workers=1).problems == validate_cases(cases, workers=3).problems


def test_table_problems_and_file_problems_come_together(tmp_path):
    build_corpus(tmp_path, ["good", "missing_file"])
    m = tmp_path / "manifest.csv"
    text = m.read_text(encoding="utf-8").splitlines()
    text[2] = text[2].replace(",site1,1,0,", ",site1,7,0,")  # bad er on the row with a missing image
    text.append(text[1])  # duplicate of 'good'
    text.append(text[1].replace("good,", "ki_bad,").rsplit(",", 1)[0] + ",140")
    m.write_text("\n".join(text) + "\n", encoding="utf-8")
    report = validate_manifest(m)
    lines = [p.line() for p in report.problems]
    assert any(ln.startswith("missing_file: er='7'") for ln in lines)
    assert any(ln.startswith("missing_file: image") and "file not found" in ln for ln in lines)
    assert any(ln.startswith("good: duplicate case_id") for ln in lines)
    assert any(ln.startswith("ki_bad: ki67='140'") for ln in lines)
    assert any(ln.startswith("ki_bad: warning: same image file as case good") for ln in report.problem_lines())
    assert [c.case_id for c in report.cases] == ["good"]
    assert report.summary()["rows"] == 4


def test_cli_exit_codes_and_json(tmp_path, capsys):
    good = build_corpus(tmp_path / "ok", ["good", "multilabel", "at_border"])
    assert main(["validate", str(good), "--workers", "1", "--json", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert "multilabel: warning: mask is not binary" in out
    assert "3 rows, 3 usable cases, 0 errors, 2 warnings" in out
    data = json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))
    assert data["ok"] is True and data["summary"]["cases"] == 3

    bad = build_corpus(tmp_path / "bad", ["good", "empty_mask", "multilabel"])
    assert main(["validate", str(bad), "--quiet"]) == 1
    captured = capsys.readouterr()
    assert "empty_mask: mask is empty" in captured.out
    assert "multilabel: warning" not in captured.out  # --quiet keeps errors only
    assert "1 error(s)" in captured.err


def test_cli_one_line_errors_for_unreadable_manifests(tmp_path, capsys):
    assert main(["validate", str(tmp_path / "nope.csv")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "manifest not found" in err and "Traceback" not in err
    m = tmp_path / "cols.csv"
    m.write_text("case_id,image,site\nA,a.nii.gz,s\n", encoding="utf-8")
    assert main(["validate", str(m)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "missing column(s) mask, er, pr, her2, ki67" in err
    with pytest.raises(SystemExit) as exc:
        main(["validate"])
    assert exc.value.code == 2
    assert main(["validate", str(m), "--workers", "0"]) == 1
    assert "--workers 0" in capsys.readouterr().err


def test_cli_in_a_subprocess(tmp_path):
    import subprocess
    import sys

    manifest = build_corpus(tmp_path, ["good", "constant"])
    run = subprocess.run([sys.executable, "-m", "fedsubtype", "validate", str(manifest), "--workers", "1"],
                         capture_output=True, text=True, encoding="utf-8", timeout=120)
    assert run.returncode == 1, run.stderr
    assert "constant: image is constant" in run.stdout
    assert "Traceback" not in run.stderr


def _pacs_manifest(tmp_path: Path) -> Path:
    """Two DICOM cases as a PACS and a segmentation tool export them: a JPEG-LS series with its SEG mask, and
    a series with a missing slice (whose SEG mask is not reached: one line for the case)."""
    from pydicom.uid import JPEGLSLossless

    from broken_cases import HEADER
    from dicom_cases import reference_case, seg_file, series_datasets, write_series

    img, mask = reference_case()
    datasets = series_datasets(img)
    write_series(datasets, tmp_path / "ok", JPEGLSLossless)
    seg_file(datasets, {"Tumour": mask}, tmp_path / "ok_seg.dcm")
    write_series(series_datasets(img), tmp_path / "gap", skip=(3,))
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(HEADER + "ok,ok,ok_seg.dcm,A,1,0,0,10\ngap,gap,ok_seg.dcm,A,1,0,0,10\n", encoding="utf-8")
    return manifest


def test_dicom_cli_speaks_one_line_per_problem_and_leaves_no_thread_behind(tmp_path, capfd):
    import threading

    manifest = _pacs_manifest(tmp_path)
    threads_before = {t.name for t in threading.enumerate()}
    assert main(["validate", str(manifest), "--workers", "2"]) == 1
    out, err = capfd.readouterr()
    problem_lines = [ln for ln in out.splitlines() if ln.startswith(("ok:", "gap:"))]
    assert len(problem_lines) == 1 and problem_lines[0].startswith("gap: image") and "slice(s) missing" in problem_lines[0]
    assert "WARNING: In" not in out + err and "header" not in out
    assert {t.name for t in threading.enumerate()} == threads_before  # the case pool is joined before the report


def test_dicom_cli_subprocess_exits_after_its_report(tmp_path):
    import subprocess
    import sys

    manifest = _pacs_manifest(tmp_path)
    run = subprocess.run([sys.executable, "-m", "fedsubtype", "validate", str(manifest), "--workers", "2"],
                         capture_output=True, text=True, encoding="utf-8", timeout=300)
    assert run.returncode == 1 and "2 rows, 1 usable cases, 1 errors, 0 warnings" in run.stdout
    assert run.stderr.strip().splitlines() == ["fedsubtype validate: 1 error(s) — fix them, or let the trainer skip "
                                               "unusable cases"]
