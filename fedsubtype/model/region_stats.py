"""Intensity statistics of the input per region: what a linear reader of the image sees, given to the network.

Trained on a few hundred cases, the convolutional features settle on the tumour's size and encode the
enhancement level, its spread and the peritumoral signal worse than plain region means and standard
deviations of the input do (docs/paper-benchmark.md). These statistics have no parameters; with the
model's `read_out` they join the region-pooled features before the shared representation (`statistics`),
and each task also reads them through its own linear map started from a linear model of the training
cases (`linear_heads`, `StatisticsHeads`); `linear_heads_profile` adds the image's mean in distance bands
of the peritumoral shell (`peritumoral_profile`).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedsubtype import TASKS
from fedsubtype.model.regions_pool import weighted_moments

SMOOTH_SIGMA_VOXELS = 1.0
"""Gaussian width of the smoothed image; the residual (image − smoothed) is the fine texture."""

STATS_PER_REGION = 7
"""Mean and standard deviation of the image, the smoothed image and the residual, and log volume fraction."""


def _gaussian_kernel(sigma: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    radius = max(int(math.ceil(2 * sigma)), 1)
    x = torch.arange(-radius, radius + 1, dtype=dtype, device=device)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def smooth(image: torch.Tensor, sigma: float = SMOOTH_SIGMA_VOXELS) -> torch.Tensor:
    """Separable Gaussian blur of [B,1,D,H,W] (edges replicated, so borders are not darkened).

    Each axis is a weighted sum of shifted views: a one-channel 3D convolution is an order of magnitude slower
    on CPU, and this blur runs on every training batch."""
    k = _gaussian_kernel(sigma, image.dtype, image.device)
    r = k.numel() // 2
    out = image
    for axis in range(3):
        pad = [0, 0, 0, 0, 0, 0]
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = r  # F.pad lists the last axis first
        padded, n = F.pad(out, pad, mode="replicate"), out.shape[2 + axis]
        out = sum(k[i] * padded.narrow(2 + axis, i, n) for i in range(k.numel()))
    return out


PROFILE_BANDS: tuple[tuple[int, int], ...] = ((0, 2), (2, 4), (4, 6), (6, 10))
"""Peritumoral distance bands: chessboard distance from the tumour (core and rim), in voxels of a 64³ grid
(scaled to the input's size), each band (lo, hi]. At the default crop the 5 mm shell is 5–11 such voxels thick."""

PROFILE_STATS = 2 * len(PROFILE_BANDS) - 1
"""The mean of the image in each band, then each inner band's mean minus the outermost's."""


def tumour_distance(tumour: torch.Tensor, max_steps: int) -> torch.Tensor:
    """Chessboard distance in voxels from the binary `tumour` [B,1,S,S,S] (0 inside; `max_steps` + 1 beyond
    reach): how many 26-neighbour dilations reach each voxel. On CPU SciPy's two-pass chamfer transform gives
    the same numbers about ten times faster than the dilations (this runs on every training batch)."""
    if tumour.device.type != "cpu":
        return dilation_distance(tumour, max_steps)
    from scipy import ndimage

    beyond = max_steps + 1
    out = np.full(tuple(tumour.shape), beyond, dtype=np.float32)
    for b, inside in enumerate(tumour[:, 0].detach().numpy() > 0.5):
        if inside.any():
            out[b, 0] = np.minimum(ndimage.distance_transform_cdt(~inside, metric="chessboard"), beyond)
    return torch.from_numpy(out).to(tumour.dtype)


def dilation_distance(tumour: torch.Tensor, max_steps: int) -> torch.Tensor:
    """`tumour_distance` by repeated 3×3×3 max-pooling (fast on a GPU)."""
    reached, distance = tumour, torch.zeros_like(tumour)
    for _ in range(max_steps + 1):
        distance = distance + (1.0 - reached)
        reached = F.max_pool3d(reached, 3, stride=1, padding=1)
    return distance


def peritumoral_profile(image: torch.Tensor, masks: torch.Tensor, names: tuple[str, ...]) -> torch.Tensor:
    """[B, PROFILE_STATS] mean of `image` [B,1,S,S,S] in distance bands of the peritumoral shell, and each
    inner band minus the outermost: how peritumoral signal (enhancement, oedema) fades away from the tumour,
    with the shell's own outer tissue as the reference. A band with no voxels takes the shell's mean.

    `masks` [B,R,S,S,S] are the regions `names` (which must include the tumour and peritumoral tissue)."""
    image = image[:, :1].to(torch.float32)
    peri = masks[:, names.index("peritumoral")].unsqueeze(1).to(torch.float32)
    tumour = sum(masks[:, names.index(n)] for n in ("core", "rim") if n in names).unsqueeze(1).clamp(max=1.0)
    scale = image.shape[-1] / 64.0
    distance = tumour_distance(tumour.to(torch.float32), int(math.ceil(PROFILE_BANDS[-1][1] * scale))) / scale
    bands = torch.cat([peri * (distance > lo) * (distance <= hi) for lo, hi in PROFILE_BANDS], dim=1)  # [B,K,...]
    shell = weighted_moments(image, peri, std=False)[:, 0, 0]  # [B]
    mass = bands.flatten(2).sum(-1)
    means = torch.where(mass >= 1.0, weighted_moments(image, bands, std=False)[..., 0], shell.unsqueeze(1))
    return torch.cat([means, means[:, :-1] - means[:, -1:]], dim=1)


def statistics_width(names: tuple[str, ...], profile: bool) -> int:
    """How many numbers `input_statistics` gives for regions `names`."""
    return STATS_PER_REGION * len(names) + (PROFILE_STATS if profile and _has_profile(names) else 0)


def _has_profile(names: tuple[str, ...]) -> bool:
    return "peritumoral" in names and ("core" in names or "rim" in names)


def input_statistics(image: torch.Tensor, masks: torch.Tensor, names: tuple[str, ...], profile: bool) -> torch.Tensor:
    """The statistics a network reads from its input: `region_statistics` over the regions `names`, then,
    with `profile` and a peritumoral region in view, the `peritumoral_profile`."""
    stats = region_statistics(image, masks)
    if profile and _has_profile(names):
        stats = torch.cat([stats, peritumoral_profile(image, masks, names)], dim=1)
    return stats


def region_statistics(image: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """[B, R·7] statistics of `image` [B,1,S,S,S] over each region of `masks` [B,R,S,S,S] (region-major):
    mean and sd of the image, of its smoothed version and of the residual, then log of the region's
    fraction of the volume. An empty region gives zeros and the log of a tiny fraction.

    The smoothing is normalised to the union of the masks (voxels outside them take no part), so a
    variant that does not see a region cannot read it through the blur either."""
    image = image[:, :1].to(torch.float32)
    seen = masks.sum(1, keepdim=True).clamp(max=1.0).to(torch.float32)
    blurred = smooth(image * seen) / smooth(seen).clamp_min(1e-6) * seen
    moments = [weighted_moments(a, masks, std=True) for a in (image, blurred, image - blurred)]  # each [B,R,2]
    fraction = masks.flatten(2).mean(-1).clamp_min(1e-4).log().unsqueeze(-1)  # [B,R,1]
    return torch.cat([*moments, fraction], dim=-1).flatten(1)


class StatisticsHeads(nn.Module):
    """One linear read-out of the region statistics per task (the wide part of a wide-and-deep model).

    Trained from zero alongside the network, these read-outs stay small and all point along the labels'
    common direction (early-stopped gradient descent is a strong ridge, and ER, PR and HER2 are
    correlated), so the deep path decides and the tasks collapse onto one score. They are therefore
    started where a per-task linear model of the training cases ends (`fit_statistics_heads`): the
    statistics standardised (centre and scale kept as buffers; they differ in scale by two orders of
    magnitude), then a logistic regression per biomarker and a ridge regression of logit Ki-67, and the
    network learns on top of them. In a federation each site fits them in the first round on its own
    cases; the averaged weights and buffers then travel like any other.
    """

    def __init__(self, n_features: int, tasks: tuple[str, ...]) -> None:
        super().__init__()
        self.linear = nn.ModuleDict({t: nn.Linear(n_features, 1) for t in tasks})
        for layer in self.linear.values():  # before fitting: the network without them
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        self.register_buffer("center", torch.zeros(n_features))
        self.register_buffer("scale", torch.ones(n_features))
        self.register_buffer("fitted", torch.zeros(()))

    def standardise(self, stats: torch.Tensor) -> torch.Tensor:
        """Statistics [B, F] centred and scaled as on the training cases."""
        return (stats.to(self.center.dtype) - self.center) / self.scale

    def forward(self, stats: torch.Tensor, task: str) -> torch.Tensor:
        """[B] logit contribution of `task` from statistics [B, F]."""
        return self.linear[task](self.standardise(stats)).squeeze(-1)


def unfitted_statistics_heads(model: nn.Module) -> list[tuple[nn.Module, StatisticsHeads]]:
    """(network, its StatisticsHeads) for every statistics read-out in `model` not yet fitted."""
    return [(m, heads) for m in model.modules() for heads in [getattr(m, "statistics_heads", None)]
            if isinstance(heads, StatisticsHeads) and float(heads.fitted) == 0.0]


def fit_statistics_heads(model: nn.Module, data, seed: int = 0, batch_size: int = 32) -> int:
    """Fit every not-yet-fitted StatisticsHeads in `model` on the cases of `data` (items with `image`,
    `regions`, `labels`, `present`; no augmentation): scaler, then per-task linear models. Returns how
    many were fitted; fitted ones (a loaded model, a federated round after the first) are left alone."""
    from torch.utils.data import DataLoader

    from fedsubtype.model.regions_pool import region_masks

    owners = unfitted_statistics_heads(model)
    if not owners or len(data) == 0:
        return 0
    # networks that see the same regions the same way read the same statistics: computed once per view
    readers = {(m.spec.regions, m.cfg.read_out_parts.profile): m for m, _ in owners}
    by_view: dict[tuple, list[torch.Tensor]] = {view: [] for view in readers}
    labels, present = [], []
    with torch.no_grad():
        for batch in DataLoader(data, batch_size=batch_size, shuffle=False):
            image = batch["image"].to(torch.float32)
            labels.append(batch["labels"])
            present.append(batch["present"])
            for view, reader in readers.items():
                by_view[view].append(reader.input_statistics(image, region_masks(batch["regions"], view[0])))
    y = torch.where(torch.cat(present).bool(), torch.cat(labels).double(), torch.tensor(float("nan"))).numpy()
    for m, heads in owners:
        stats = torch.cat(by_view[(m.spec.regions, m.cfg.read_out_parts.profile)]).double().numpy()
        center, scale, fits = linear_read_outs(stats, y, m.tasks, seed)
        with torch.no_grad():
            heads.center.copy_(torch.as_tensor(center))
            heads.scale.copy_(torch.as_tensor(scale))
            for task, (weight, bias) in fits.items():
                heads.linear[task].weight.copy_(torch.as_tensor(weight).reshape(1, -1))
                # the deep head adds its own starting offset (Ki-67: the prior); the sum starts at the fit
                heads.linear[task].bias.fill_(bias - float(m.heads[task][-1].bias))
            heads.fitted.fill_(1.0)
    return len(owners)


def linear_read_outs(stats: np.ndarray, labels: np.ndarray, tasks: tuple[str, ...], seed: int = 0
                     ) -> tuple[np.ndarray, np.ndarray, dict[str, tuple[np.ndarray, float]]]:
    """(centre, scale, {task: (weights, intercept)}) of per-task linear models of `stats` [N, F] on the
    standardised statistics; `labels` [N, 4] in TASKS order, NaN = missing. A task the cases cannot support
    (too few, one class) is left out. What `fit_statistics_heads` starts the read-outs from."""
    center, scale = stats.mean(0), np.maximum(stats.std(0), 1e-3)
    z = (stats - center) / scale
    fits = {task: _linear_fit(z, labels[:, TASKS.index(task)], task, seed) for task in tasks}
    return center, scale, {task: fit for task, fit in fits.items() if fit is not None}


KI67_FIT_RANGE = (0.01, 0.99)
"""Ki-67 fractions are clipped to this range before the logit that the ridge regression fits."""


def _linear_fit(z, y, task: str, seed: int):
    """(weights, intercept) of a per-task linear model on standardised statistics `z` for labels `y` (NaN =
    missing): logistic regression for a biomarker (C by stratified 5-fold cross-validation on log loss), ridge
    on the logit Ki-67 fraction (penalty by leave-one-out). None when the cases cannot support a fit (too
    few, or one class only)."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression, RidgeCV
    from sklearn.model_selection import GridSearchCV, StratifiedKFold

    ok = ~np.isnan(y)
    z, y = z[ok], y[ok]
    if task == "ki67":
        if len(y) < 10:
            return None
        frac = np.clip(y / 100.0, *KI67_FIT_RANGE)
        ridge = RidgeCV(alphas=np.logspace(-2, 3, 11)).fit(z, np.log(frac / (1 - frac)))
        return ridge.coef_, float(ridge.intercept_)
    y = y.astype(int)
    counts = np.bincount(y, minlength=2)
    if counts.min() < 2:
        return None
    folds = StratifiedKFold(int(min(5, counts.min())), shuffle=True, random_state=seed)
    search = GridSearchCV(LogisticRegression(max_iter=2000), {"C": list(np.logspace(-3, 1, 9))},
                          scoring="neg_log_loss", cv=folds).fit(z, y)
    best = search.best_estimator_
    return best.coef_.ravel(), float(best.intercept_[0])
