"""The spatial multi-task network and its ablation variants, built from one ModelConfig."""

from __future__ import annotations

import math

import torch
from torch import nn

from fedsubtype import REGION_LABELS, TASKS
from fedsubtype.model.attention import MultiScaleFusion, MultiScaleSpatialAttention, resample
from fedsubtype.model.config import ModelConfig
from fedsubtype.model.extractor import FeatureExtractor
from fedsubtype.model.region_stats import StatisticsHeads, input_statistics, statistics_width
from fedsubtype.model.regions_pool import RegionWeighting, region_fractions, region_masks
from fedsubtype.model.variants import VariantSpec, variant_spec

KI67_PRIOR = 0.20
"""Initial Ki-67 prediction (fraction): the population median, so training starts unbiased."""


SIZE_FEATURES = 2
"""Inputs added by `physical_size`: log(1 + tumour volume in mL), log(field of view / 40 mm)."""

TUMOUR_REGIONS = ("core", "rim")


def size_features(regions: torch.Tensor, voxel_mm: torch.Tensor | None, seen: tuple[str, ...]) -> torch.Tensor:
    """[B,2] physical size of the tumour from the region map [B,S,S,S] and the voxel edge [B] in mm.

    Only the tumour regions a variant sees are counted, so `core_only` gets the core's volume.
    """
    if voxel_mm is None:
        raise ValueError("this model uses the tumour's physical size: pass voxel_mm (field of view / S, in mm)")
    voxel_mm = voxel_mm.to(torch.float32).reshape(-1)
    if voxel_mm.shape[0] != regions.shape[0] or not bool(torch.isfinite(voxel_mm).all() and (voxel_mm > 0).all()):
        raise ValueError(f"voxel_mm must be one positive size per case, got {voxel_mm.tolist()}")
    labels = [REGION_LABELS[r] for r in TUMOUR_REGIONS if r in seen]
    voxels = torch.isin(regions, torch.tensor(labels, device=regions.device)).flatten(1).sum(1).to(torch.float32)
    volume_ml = voxels * voxel_mm ** 3 / 1000.0
    fov_mm = voxel_mm * regions.shape[-1]
    return torch.stack([torch.log1p(volume_ml), torch.log(fov_mm / 40.0)], dim=1)


def _check_inputs(image: torch.Tensor, regions: torch.Tensor) -> None:
    if image.dim() != 5 or regions.dim() != 4:
        raise ValueError(f"expected image [B,C,S,S,S] and regions [B,S,S,S], got {tuple(image.shape)} "
                         f"and {tuple(regions.shape)}")
    if image.shape[0] != regions.shape[0] or image.shape[-3:] != regions.shape[-3:]:
        raise ValueError(f"image {tuple(image.shape)} and regions {tuple(regions.shape)} do not match")
    if any(s % 8 for s in image.shape[-3:]):
        raise ValueError(f"spatial size {tuple(image.shape[-3:])} must be a multiple of 8 (set preprocessing size)")


class _Branch(nn.Module):
    """What turns the fused feature map into one representation: multi-scale attention (None when the
    variant has none), region weighting, and the representation layer."""

    def __init__(self, cfg: ModelConfig, spec: VariantSpec, channels: tuple[int, ...]) -> None:
        super().__init__()
        self.attention = (MultiScaleSpatialAttention(channels, spec.attention_scales)
                          if spec.attention_scales else None)
        self.region_weighting = RegionWeighting(cfg.feature_dim, spec.regions, cfg.pooling, cfg.region_mixing)
        extra = (SIZE_FEATURES if cfg.physical_size else 0) + (
            statistics_width(spec.regions, cfg.peritumoral_profile) if cfg.region_statistics else 0)
        self.representation = nn.Sequential(nn.Linear(self.region_weighting.out_dim + extra, cfg.hidden_dim), nn.SiLU(),
                                            nn.Dropout(cfg.dropout))


class SpatialMultiTaskNet(nn.Module):
    """Extractor(s) -> multi-scale fusion -> multi-scale spatial attention -> region weighting ->
    representation -> one head per task (plus, with `statistics_heads`, a linear map of the region
    statistics per task added to its output).

    By default attention, region weighting and the representation are one set shared by every task;
    with `task_branches` each task has its own set over the shared extractor and fusion (as in
    multi-task attention networks), so a task can look at its own voxels and regions. With
    `shared_extractor=False` each task gets its own extractor, while fusion (and, without
    `task_branches`, attention, region weighting and the representation) stay shared.
    """

    def __init__(self, cfg: ModelConfig, spec: VariantSpec, tasks: tuple[str, ...] = TASKS) -> None:
        super().__init__()
        self.cfg, self.spec, self.tasks = cfg, spec, tuple(tasks)
        in_ch = cfg.in_channels + (len(spec.regions) if cfg.region_channels else 0)
        n_extractors = 1 if spec.shared_extractor else len(self.tasks)
        self.extractors = nn.ModuleList([FeatureExtractor(in_ch, cfg.width, cfg.blocks, cfg.groups, cfg.stem)
                                         for _ in range(n_extractors)])
        channels = self.extractors[0].channels
        self.fusion = MultiScaleFusion(channels, cfg.feature_dim, cfg.groups)
        if cfg.task_branches:  # one attention, region weighting and representation per task
            self.task_branches = nn.ModuleDict({t: _Branch(cfg, spec, channels) for t in self.tasks})
        else:  # one set, shared by every task (module names kept as they were for stored weights)
            shared = _Branch(cfg, spec, channels)
            self.attention, self.region_weighting, self.representation = (shared.attention, shared.region_weighting,
                                                                          shared.representation)
        half = max(cfg.hidden_dim // 2, 1)
        self.heads = nn.ModuleDict({t: nn.Sequential(nn.Linear(cfg.hidden_dim, half), nn.SiLU(), nn.Linear(half, 1))
                                    for t in self.tasks})
        if cfg.statistics_heads:  # wide path: a linear map of the region statistics per task, fitted when training starts
            self.statistics_heads = StatisticsHeads(statistics_width(spec.regions, cfg.peritumoral_profile), self.tasks)
        if "ki67" in self.heads:
            with torch.no_grad():
                self.heads["ki67"][-1].bias.fill_(math.log(KI67_PRIOR / (1 - KI67_PRIOR)))

    def _tower(self, extractor: nn.Module, x: torch.Tensor, masks: torch.Tensor, extra: torch.Tensor | None,
               explain: bool, tasks: tuple[str, ...]) -> dict:
        """Features of one extractor through the branches of `tasks` (all the same branch when shared);
        `extra` (size features, region statistics) joins the pooled vector before the representation."""
        feats = extractor(x)
        fused_feats = self.fusion(feats)
        grid = tuple(fused_feats.shape[-3:])
        fractions = region_fractions(masks, grid)
        # (tasks served, branch): one per task with task_branches, else the shared set serves them all
        groups = [((t,), self.task_branches[t]) for t in tasks] if self.cfg.task_branches else [(tasks, self)]
        reps, explanations = {}, []
        for served, branch in groups:
            attention, maps = (None, {}) if branch.attention is None else branch.attention(feats, grid)
            vector, weights = branch.region_weighting(fused_feats, fractions, attention)
            if extra is not None:
                vector = torch.cat([vector, extra.to(vector.dtype)], dim=1)
            reps.update(dict.fromkeys(served, branch.representation(vector)))
            if explain:
                full = tuple(x.shape[-3:])
                att = {name: resample(m, full) for name, m in maps.items()}
                att["fused"] = (resample(attention, full) if attention is not None
                                else torch.ones_like(x[:, :1]))
                explanations.append({"region_weights": weights, "attention": att})
        out: dict = {"representation": reps}
        if explain:
            out.update(_average_explanations(explanations))
        return out

    def input_statistics(self, image: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """[B, F] parameter-free statistics of the input over this variant's regions `masks` (what
        `region_statistics` and `statistics_heads` read)."""
        return input_statistics(image, masks, self.spec.regions, self.cfg.peritumoral_profile)

    def raw_outputs(self, image: torch.Tensor, regions: torch.Tensor, voxel_mm: torch.Tensor | None = None,
                    explain: bool = False) -> tuple[dict[str, torch.Tensor], dict]:
        """Per-task pre-activation outputs (logit per biomarker, Ki-67 logit) and the explanation."""
        _check_inputs(image, regions)
        masks = region_masks(regions, self.spec.regions)
        extras = []  # appended to the region-pooled vector before the representation
        if self.cfg.physical_size:
            extras.append(size_features(regions, voxel_mm, self.spec.regions))
        stats = (self.input_statistics(image, masks) if self.cfg.region_statistics or self.cfg.statistics_heads
                 else None)
        if self.cfg.region_statistics:
            extras.append(stats)
        extra = torch.cat(extras, dim=1) if extras else None
        x = image * masks.sum(1, keepdim=True) if self.cfg.mask_input else image
        if self.cfg.region_channels:
            x = torch.cat([x, masks], dim=1)
        if len(self.extractors) == 1:
            towers = [self._tower(self.extractors[0], x, masks, extra, explain, self.tasks)]
        else:
            towers = [self._tower(e, x, masks, extra, explain, (t,)) for e, t in zip(self.extractors, self.tasks)]
        raw = {}
        for i, task in enumerate(self.tasks):
            rep = towers[i if len(towers) > 1 else 0]["representation"][task]
            raw[task] = self.heads[task](rep).squeeze(-1)
            if self.cfg.statistics_heads:
                raw[task] = raw[task] + self.statistics_heads(stats, task).to(raw[task].dtype)
        return raw, (_average_explanations(towers) if explain else {})

    def forward(self, image: torch.Tensor, regions: torch.Tensor, voxel_mm: torch.Tensor | None = None,
                explain: bool = False) -> dict:
        """`image` [B,1,S,S,S], `regions` [B,S,S,S] (0 bg, 1 core, 2 rim, 3 peri), `voxel_mm` [B] (needed
        with `physical_size`) -> task outputs."""
        raw, explanation = self.raw_outputs(image, regions, voxel_mm, explain)
        return {**_assemble(raw), **explanation}


class PerTaskEnsemble(nn.Module):
    """Four independent single-task networks (nothing shared); outputs look like the multi-task model's."""

    def __init__(self, cfg: ModelConfig, spec: VariantSpec) -> None:
        super().__init__()
        self.cfg, self.spec = cfg, spec
        single = VariantSpec(spec.attention_scales, spec.regions, shared_extractor=True, multitask=True)
        self.members = nn.ModuleDict({t: SpatialMultiTaskNet(cfg, single, tasks=(t,)) for t in TASKS})

    def forward(self, image: torch.Tensor, regions: torch.Tensor, voxel_mm: torch.Tensor | None = None,
                explain: bool = False) -> dict:
        """Same contract as SpatialMultiTaskNet.forward; explanations are averaged over the members."""
        raw, explanations = {}, []
        for task, member in self.members.items():
            member_raw, explanation = member.raw_outputs(image, regions, voxel_mm, explain)
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
