"""The spatial multi-task network and its ablation variants, built from one ModelConfig."""

from __future__ import annotations

import math

import torch
from torch import nn

from fedsubtype import TASKS
from fedsubtype.model.attention import MultiScaleFusion, MultiScaleSpatialAttention, resample
from fedsubtype.model.config import ModelConfig
from fedsubtype.model.extractor import FeatureExtractor
from fedsubtype.model.region_stats import StatisticsHeads, input_statistics, statistics_width
from fedsubtype.model.regions_pool import RegionWeighting, region_fractions, region_masks
from fedsubtype.model.variants import VariantSpec, variant_spec

KI67_PRIOR = 0.20
"""Initial Ki-67 prediction (fraction): the population median, so training starts unbiased."""


def _check_inputs(image: torch.Tensor, regions: torch.Tensor) -> None:
    if image.dim() != 5 or regions.dim() != 4:
        raise ValueError(f"expected image [B,C,S,S,S] and regions [B,S,S,S], got {tuple(image.shape)} "
                         f"and {tuple(regions.shape)}")
    if image.shape[0] != regions.shape[0] or image.shape[-3:] != regions.shape[-3:]:
        raise ValueError(f"image {tuple(image.shape)} and regions {tuple(regions.shape)} do not match")
    if any(s % 8 for s in image.shape[-3:]):
        raise ValueError(f"spatial size {tuple(image.shape[-3:])} must be a multiple of 8 (set preprocessing size)")


class SpatialMultiTaskNet(nn.Module):
    """Extractor(s) -> multi-scale fusion -> multi-scale spatial attention -> region weighting ->
    representation -> one head per task (plus, with the `linear_heads` read-outs, a linear map of the
    region statistics per task added to its output).

    Attention, region weighting and the representation are one set shared by every task. With
    `shared_extractor=False` each task gets its own extractor, while fusion and that set stay shared.
    """

    def __init__(self, cfg: ModelConfig, spec: VariantSpec, tasks: tuple[str, ...] = TASKS) -> None:
        super().__init__()
        self.cfg, self.spec, self.tasks = cfg, spec, tuple(tasks)
        in_ch = cfg.in_channels + (len(spec.regions) if cfg.region_channels else 0)
        n_extractors = 1 if spec.shared_extractor else len(self.tasks)
        self.extractors = nn.ModuleList([FeatureExtractor(in_ch, cfg.width, cfg.blocks, cfg.groups)
                                         for _ in range(n_extractors)])
        channels = self.extractors[0].channels
        self.fusion = MultiScaleFusion(channels, cfg.feature_dim, cfg.groups)
        parts = cfg.read_out_parts
        self.attention = (MultiScaleSpatialAttention(channels, spec.attention_scales)
                          if spec.attention_scales else None)
        self.region_weighting = RegionWeighting(cfg.feature_dim, spec.regions)
        extra = statistics_width(spec.regions, parts.profile) if parts.statistics else 0
        self.representation = nn.Sequential(nn.Linear(cfg.feature_dim + extra, cfg.hidden_dim), nn.SiLU(),
                                            nn.Dropout(cfg.dropout))
        half = max(cfg.hidden_dim // 2, 1)
        self.heads = nn.ModuleDict({t: nn.Sequential(nn.Linear(cfg.hidden_dim, half), nn.SiLU(), nn.Linear(half, 1))
                                    for t in self.tasks})
        if parts.linear_heads:  # wide path: a linear map of the region statistics per task, fitted when training starts
            self.statistics_heads = StatisticsHeads(statistics_width(spec.regions, parts.profile), self.tasks)
        if "ki67" in self.heads:
            with torch.no_grad():
                self.heads["ki67"][-1].bias.fill_(math.log(KI67_PRIOR / (1 - KI67_PRIOR)))

    def _tower(self, extractor: nn.Module, x: torch.Tensor, masks: torch.Tensor, stats: torch.Tensor | None,
               explain: bool) -> dict:
        """Features of one extractor through attention, region weighting and the representation; `stats`
        (the region statistics, with the `statistics` read-out) join the pooled vector before the latter."""
        feats = extractor(x)
        fused_feats = self.fusion(feats)
        grid = tuple(fused_feats.shape[-3:])
        fractions = region_fractions(masks, grid)
        attention, maps = (None, {}) if self.attention is None else self.attention(feats, grid)
        vector, weights = self.region_weighting(fused_feats, fractions, attention)
        if stats is not None:
            vector = torch.cat([vector, stats.to(vector.dtype)], dim=1)
        out: dict = {"representation": self.representation(vector)}
        if explain:
            full = tuple(x.shape[-3:])
            att = {name: resample(m, full) for name, m in maps.items()}
            att["fused"] = resample(attention, full) if attention is not None else torch.ones_like(x[:, :1])
            out.update(region_weights=weights, attention=att)
        return out

    def prepare_for_training(self, train_data: torch.utils.data.Dataset, *, private: bool, seed: int) -> None:
        """Start the statistics read-outs from per-task linear models of the training cases, once. Under
        differential privacy that fit is skipped (DP-SGD would not cover it): the read-outs start at zero and
        learn with the rest of the network. Called by the training loop before it takes any averaged copy."""
        from fedsubtype.model.region_stats import fit_statistics_heads

        if not private:
            fit_statistics_heads(self, train_data, seed)

    def input_statistics(self, image: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """[B, F] parameter-free statistics of the input over this variant's regions `masks` (what
        `read_out` reads)."""
        return input_statistics(image, masks, self.spec.regions, self.cfg.read_out_parts.profile)

    def raw_outputs(self, image: torch.Tensor, regions: torch.Tensor, explain: bool = False
                    ) -> tuple[dict[str, torch.Tensor], dict]:
        """Per-task pre-activation outputs (logit per biomarker, Ki-67 logit) and the explanation."""
        _check_inputs(image, regions)
        masks = region_masks(regions, self.spec.regions)
        parts = self.cfg.read_out_parts
        stats = self.input_statistics(image, masks) if parts.statistics or parts.linear_heads else None
        x = image * masks.sum(1, keepdim=True) if self.cfg.mask_input else image
        if self.cfg.region_channels:
            x = torch.cat([x, masks], dim=1)
        into_representation = stats if parts.statistics else None
        towers = [self._tower(e, x, masks, into_representation, explain) for e in self.extractors]
        raw = {}
        for i, task in enumerate(self.tasks):
            rep = towers[i if len(towers) > 1 else 0]["representation"]
            raw[task] = self.heads[task](rep).squeeze(-1)
            if parts.linear_heads:
                raw[task] = raw[task] + self.statistics_heads(stats, task).to(raw[task].dtype)
        return raw, (_average_explanations(towers) if explain else {})

    def forward(self, image: torch.Tensor, regions: torch.Tensor, explain: bool = False) -> dict:
        """`image` [B,1,S,S,S], `regions` [B,S,S,S] (0 bg, 1 core, 2 rim, 3 peri) -> task outputs."""
        raw, explanation = self.raw_outputs(image, regions, explain)
        return {**_assemble(raw), **explanation}


class PerTaskEnsemble(nn.Module):
    """Four independent single-task networks (nothing shared); outputs look like the multi-task model's."""

    def __init__(self, cfg: ModelConfig, spec: VariantSpec) -> None:
        super().__init__()
        self.cfg, self.spec = cfg, spec
        single = VariantSpec(spec.attention_scales, spec.regions, shared_extractor=True, multitask=True)
        self.members = nn.ModuleDict({t: SpatialMultiTaskNet(cfg, single, tasks=(t,)) for t in TASKS})

    prepare_for_training = SpatialMultiTaskNet.prepare_for_training  # fits every member's read-outs at once

    def forward(self, image: torch.Tensor, regions: torch.Tensor, explain: bool = False) -> dict:
        """Same contract as SpatialMultiTaskNet.forward; explanations are averaged over the members."""
        raw, explanations = {}, []
        for task, member in self.members.items():
            member_raw, explanation = member.raw_outputs(image, regions, explain)
            raw[task] = member_raw[task]
            explanations.append(explanation)
        out = _assemble(raw)
        if explain:
            out.update(_average_explanations(explanations))
        return out


def _assemble(raw: dict[str, torch.Tensor]) -> dict:
    """Per-task raw outputs -> {"logits": [B,3] (er, pr, her2), "ki67": [B] in (0,1)}."""
    out = {}
    cls = [raw[t] for t in TASKS[:3] if t in raw]
    if cls:
        out["logits"] = torch.stack(cls, dim=1)
    if "ki67" in raw:
        out["ki67"] = torch.sigmoid(raw["ki67"])
    return out


def _average_explanations(towers: list[dict]) -> dict:
    """Explanations of several towers (per-task extractors or members) averaged into one set."""
    names = towers[0]["attention"].keys()
    return {
        "attention": {n: torch.stack([t["attention"][n] for t in towers]).mean(0) for n in names},
        "region_weights": torch.stack([t["region_weights"] for t in towers]).mean(0),
    }


def build_model(cfg: ModelConfig | None = None, seed: int | None = None) -> nn.Module:
    """The network for `cfg.variant` (default: the full model); `seed` fixes the initial weights."""
    cfg = cfg or ModelConfig()
    cfg.validate("model")
    spec = variant_spec(cfg.variant)
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        model: nn.Module = SpatialMultiTaskNet(cfg, spec) if spec.multitask else PerTaskEnsemble(cfg, spec)
    return model


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    """Number of (trainable) parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def state_bytes(model: nn.Module) -> int:
    """Bytes of one weight update on the wire: every tensor of the state dict at its dtype."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())
