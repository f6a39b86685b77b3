"""Does the attention fall where the phantom put the evidence? (`fedsubtype benchmark attention`)

The phantom generator records, per case, how strong each phenotype is and in which tissue it lives
(oedema and peritumoral enhancement in the peritumoral shell, rim enhancement in the rim, necrosis in
the core). For every case we measure the share of fused attention mass in each region and its
enrichment (share ÷ the region's share of the model's field of view), then compare cases with strong
evidence (top third of the latent) with weak evidence (bottom third).
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from fedsubtype import REGION_LABELS
from fedsubtype.configio import atomic_write_text
from fedsubtype.errors import UserError

EVIDENCE: tuple[tuple[str, str], ...] = (
    ("oedema", "peritumoral"),
    ("peri_enhancement", "peritumoral"),
    ("rim_enhancement", "rim"),
    ("necrosis", "core"),
)
"""(latent phenotype, region that carries it)."""


def case_attention(model, bundle, cases: Sequence, cache_dir: Path | None) -> list[dict[str, Any]]:
    """Attention shares and region volume fractions per case, on the model grid."""
    from tqdm.auto import tqdm

    from fedsubtype.data.cache import PreprocessCache
    from fedsubtype.inference.explain import attention_shares
    from fedsubtype.inference.predict import run_model
    from fedsubtype.data.preprocess import preprocess_case

    cache = PreprocessCache(cache_dir, bundle.preprocess_config) if cache_dir else None
    rows = []
    for case in tqdm(cases, desc="attention", unit="case"):
        pre = cache.get(case) if cache else preprocess_case(case, bundle.preprocess_config)
        fused = run_model(model, pre, explain=True)["attention"]["fused"]
        shares = attention_shares(fused, pre.regions)
        n = pre.regions.size
        frac = {r: float((pre.regions == REGION_LABELS[r]).sum() / n) for r in ("core", "rim", "peritumoral")}
        frac["elsewhere"] = 1.0 - sum(frac.values())
        rows.append({"case_id": case.case_id, **{f"share_{k}": v for k, v in shares.items()},
                     **{f"volume_{k}": v for k, v in frac.items()}})
    return rows


def evidence_table(rows: list[dict[str, Any]], latents: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    """Strong vs weak evidence: attention share in the region carrying it, with a Mann–Whitney test."""
    from scipy.stats import mannwhitneyu, spearmanr

    out = []
    for latent, region in EVIDENCE:
        pairs = [(latents[r["case_id"]][latent], r[f"share_{region}"], r[f"volume_{region}"])
                 for r in rows if r["case_id"] in latents and latent in latents[r["case_id"]]]
        if len(pairs) < 9:
            continue
        lat, share, vol = (np.array(v, dtype=float) for v in zip(*pairs))
        lo, hi = np.quantile(lat, [1 / 3, 2 / 3])
        strong, weak = share[lat >= hi], share[lat <= lo]
        enrich = share / np.maximum(vol, 1e-6)
        out.append({
            "latent": latent, "region": region, "n": len(lat),
            "share_strong": float(strong.mean()), "share_weak": float(weak.mean()),
            "mannwhitney_p": float(mannwhitneyu(strong, weak, alternative="greater").pvalue),
            "spearman_rho": float(spearmanr(lat, share).statistic),
            "enrichment_median": float(np.median(enrich)),
        })
    return out


def run_attention_benchmark(model_path: Path, manifest: Path, out: Path, *, case_ids: Sequence[str] | None = None,
                            cache_dir: Path | None = None) -> dict[str, Any]:
    """Measure attention-in-evidence on the cases of a phantom cohort (optionally a subset, e.g. a test split)."""
    from fedsubtype.train.checkpoint import load_model
    from fedsubtype.data.manifest import read_manifest

    latents_csv = Path(manifest).parent / "latents.csv"
    if not latents_csv.is_file():
        raise UserError("latents.csv not found next to the manifest",
                        "this check needs a phantom cohort written by `fedsubtype phantom`", where=str(manifest))
    wanted_latents = {latent for latent, _ in EVIDENCE}
    latents = {r["case_id"]: {k: float(v) for k, v in r.items() if k in wanted_latents and v not in ("", None)}
               for r in csv.DictReader(open(latents_csv, encoding="utf-8"))}
    cases = read_manifest(manifest)
    if case_ids is not None:
        wanted = set(case_ids)
        cases = [c for c in cases if c.case_id in wanted]
        if not cases:
            raise UserError("none of the selected case ids is in the manifest", "check --splits", where=str(manifest))
    model, bundle = load_model(model_path)
    rows = case_attention(model, bundle, cases, cache_dir)
    table = evidence_table(rows, latents)
    overall = {k: float(np.mean([r[f"share_{k}"] for r in rows])) for k in ("core", "rim", "peritumoral", "elsewhere")}
    volume = {k: float(np.mean([r[f"volume_{k}"] for r in rows])) for k in ("core", "rim", "peritumoral", "elsewhere")}
    _write(out, rows, table, overall, volume, len(cases))
    return {"evidence": table, "overall_share": overall, "overall_volume": volume, "n": len(cases)}


def _write(out: Path, rows, table, overall, volume, n: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(out / "attention_per_case.csv", buf.getvalue())
    lines = ["# Attention in the evidence regions", "",
             "> Phantom results are engineering evidence, never clinical claims.", "",
             f"{n} cases. Mean share of fused attention mass per region (and the region's share of the model's "
             "field of view):", "",
             "| region | attention share | volume share | enrichment |", "|---|---|---|---|"]
    for k in ("core", "rim", "peritumoral", "elsewhere"):
        lines.append(f"| {k} | {overall[k]:.3f} | {volume[k]:.3f} | {overall[k] / max(volume[k], 1e-9):.2f}× |")
    lines += ["", "Cases with strong evidence (top third of the latent) vs weak (bottom third): attention share in "
              "the region that carries the evidence; one-sided Mann–Whitney (strong > weak) and Spearman ρ over all.", "",
              "| latent phenotype | region | share (strong) | share (weak) | p | ρ | n |", "|---|---|---|---|---|---|---|"]
    for r in table:
        lines.append(f"| {r['latent']} | {r['region']} | {r['share_strong']:.3f} | {r['share_weak']:.3f} | "
                     f"{r['mannwhitney_p']:.3g} | {r['spearman_rho']:.2f} | {r['n']} |")
    atomic_write_text(out / "attention_evidence.md", "\n".join(lines) + "\n")
