"""A model card generated from a `model.pt`: data, metrics with CIs, privacy spent, intended use, limits."""

from __future__ import annotations

from typing import Any

from fedsubtype import CLASSIFICATION_TASKS, TASKS
from fedsubtype.train.checkpoint import ModelBundle
from fedsubtype.configio import to_dict


def _num(v: Any, spec: str = ".3f") -> str:
    try:
        return format(float(v), spec)
    except (TypeError, ValueError):
        return "n/a"


def _ci(ci: Any, spec: str = ".3f") -> str:
    if isinstance(ci, (list, tuple)) and len(ci) == 2:
        return f"{_num(ci[0], spec)}–{_num(ci[1], spec)}"
    return "n/a"


def _cohort_lines(name: str, cohort: dict[str, Any] | None) -> list[str]:
    if not cohort:
        return [f"- {name}: not recorded"]
    sites = ", ".join(f"{s} ({n})" for s, n in (cohort.get("sites") or {}).items()) or "not recorded"
    lines = [f"- **{name}**: {cohort.get('n_cases', 'n/a')} cases; sites: {sites}"]
    for task in TASKS:
        lab = (cohort.get("labels") or {}).get(task) or {}
        if task in CLASSIFICATION_TASKS:
            detail = f"{lab.get('positive', 'n/a')} positive of {lab.get('n', 'n/a')} (prevalence {_num(lab.get('prevalence'), '.2f')})"
        else:
            detail = f"{lab.get('n', 'n/a')} labelled, median {_num(lab.get('median'), '.1f')}%"
        lines.append(f"  - {task.upper()}: {detail}; missing {lab.get('missing', 'n/a')}")
    return lines


def _metrics_lines(title: str, m: dict[str, Any] | None) -> list[str]:
    if not m:
        return []
    lines = [f"**{title}** — mean AUC {_num(m.get('mean_auc'))}", "",
             "| Task | AUC | 95 % CI | n |", "|---|---|---|---|"]
    for task in CLASSIFICATION_TASKS:
        t = m.get(task) or {}
        lines.append(f"| {task.upper()} | {_num(t.get('auc'))} | {_ci(t.get('auc_ci'))} | {t.get('n', 'n/a')} |")
    k = m.get("ki67") or {}
    lines += ["", f"Ki-67: MAE {_num(k.get('mae'), '.1f')} pp (95 % CI {_ci(k.get('mae_ci'), '.1f')}), "
                  f"Pearson r {_num(k.get('pearson_r'), '.2f')}, n = {k.get('n', 'n/a')}", ""]
    return lines


def _privacy_lines(privacy: Any) -> list[str]:
    if not privacy:
        return ["No differential privacy was applied during training (ε = ∞)."]
    if isinstance(privacy, dict):
        sites = privacy.get("sites") if isinstance(privacy.get("sites"), dict) else None
        if sites:
            return [f"- {s}: ε = {_num(v.get('epsilon'), '.2f')} at δ = {v.get('delta', 'n/a')} "
                    f"({v.get('accountant', 'n/a')} accountant)" for s, v in sites.items()]
        return [f"- {k}: {v}" for k, v in privacy.items()]
    return [str(privacy)]


_HEADER = [
    "> **Research use only. Not for clinical decisions.** A model trained on the phantom cohort is an "
    "engineering artefact, not a clinical model: its figures are evidence that the software works, never "
    "clinical claims.",
    "",
]

_USE_AND_LIMITS = [
    "## Intended use",
    "- Research on imaging biomarkers of breast cancer (ER, PR, HER2, Ki-67, surrogate molecular subtype) and on "
    "federated learning across institutions.",
    "- Not intended for diagnosis, treatment selection or any clinical decision. Immunohistochemistry and "
    "in-situ hybridisation on tissue remain the reference standard.",
    "",
    "## Known limits",
    "- A model trained on the phantom cohort has learned the phantom's generative rules, not human biology.",
    "- Performance on a new institution, scanner, field strength or contrast protocol is unknown until measured "
    "there (see leave-one-site-out results); recalibrate thresholds on local validation data.",
    "- Input is a single post-contrast phase and a given tumour mask: segmentation errors change the core, rim "
    "and peritumoral regions and therefore the prediction.",
    "- Ki-67 is missing from most public cohorts, so its head may have seen few labels (see counts above).",
    "- Surrogate subtypes follow the St Gallen rules with the stored cut-offs; they are not PAM50 subtypes.",
    "",
]


def render_model_card(bundle: ModelBundle) -> str:
    """The card as Markdown. Only aggregate information stored in the model file is used."""
    md = bundle.metadata
    mc = to_dict(bundle.model_config)
    lines = [
        f"# Model card — fedsubtype {mc.get('variant', 'full')} model",
        "",
        *_HEADER,
        "## Model",
        *_model_lines(bundle, mc, to_dict(bundle.preprocess_config)),
        "",
        "## Training data",
        *_cohort_lines("Training", md.get("training_cohort")),
        *_cohort_lines("Validation", md.get("validation_cohort")),
        *_cohort_lines("Test", md.get("test_cohort")),
        "",
        "## Metrics",
        *_all_metrics_lines(md.get("metrics") or {}),
        "",
        "## Privacy",
        *_privacy_lines(md.get("privacy")),
        "",
        *_USE_AND_LIMITS,
    ]
    return "\n".join(lines)


def _model_lines(bundle: ModelBundle, mc: dict[str, Any], pc: dict[str, Any]) -> list[str]:
    """The "Model" section: file, training run, architecture, input and decision thresholds."""
    md = bundle.metadata
    return [
        f"- File: `{bundle.path.name if bundle.path else 'model.pt'}`, format v{bundle.format_version}, written by "
        f"fedsubtype {bundle.fedsubtype_version or 'n/a'} on {bundle.created or 'n/a'}",
        f"- Training: {md.get('source', 'n/a')}; best epoch/round {md.get('best_epoch', md.get('rounds', 'n/a'))}; "
        f"{md.get('samples_seen', 'n/a')} samples seen",
        f"- Architecture: spatial multi-task 3D network (variant `{mc.get('variant')}`, width {mc.get('width')}); "
        "shared residual extractor with GroupNorm, multi-scale spatial attention, core/rim/peritumoral region "
        "weighting, heads for ER, PR, HER2 (probabilities) and Ki-67 (percent)",
        f"- Input: one post-contrast DCE-MRI phase + tumour mask; resampled to {pc.get('spacing_mm')} mm, "
        f"{pc.get('size')}³ crop around the tumour; rim {pc.get('rim_mm')} mm, peritumoral shell {pc.get('peri_mm')} mm",
        _thresholds_line(md.get("thresholds")),
    ]


def _thresholds_line(thresholds: dict[str, Any] | None) -> str:
    """Stored decision thresholds with where each came from, or the fixed 0.5 when none were stored."""
    if not thresholds:
        return "- Decision thresholds: 0.5 (fixed)"
    return "- Decision thresholds: " + ", ".join(
        f"{t.upper()} {_num((v or {}).get('value') if isinstance(v, dict) else v, '.2f')}"
        f" ({(v or {}).get('source', (v or {}).get('method', 'stored')) if isinstance(v, dict) else 'stored'})"
        for t, v in thresholds.items())


def _all_metrics_lines(metrics: dict[str, Any]) -> list[str]:
    """One metrics table per evaluated split, or a line saying that none was recorded."""
    lines: list[str] = []
    shown = False
    for name, m in metrics.items():
        if isinstance(m, dict):
            lines += _metrics_lines(name.replace("_", " "), m)
            shown = True
    if not shown:
        lines.append("No metrics recorded in the model file.")
    return lines
