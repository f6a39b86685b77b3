"""Secure aggregation settings (`secure_aggregation:` in federation.yaml): Flower's SecAgg+ parameters, the
combinations it rules out, and the per-round protocol values derived from the number of sampled sites.

With it on, the coordinator receives each site's update (its weights minus the global weights it sent)
only masked, and learns only their example-weighted mean (docs/federation.md, "Secure aggregation").
No Flower import here: federation/config.py imports this module.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np

from fedsubtype.errors import ConfigError

MODULUS_RANGE = 2**32
"""Masks are drawn in [0, 2^32) (Flower's default and largest modulus)."""


@dataclass
class SecureAggregationConfig:
    """SecAgg+ (Bell et al. 2020) as Flower implements it; every value may be left out (defaults below)."""

    enabled: bool = False
    """Mask every site's update so that the coordinator sees only the sum over the round's sites."""
    num_shares: int | None = None
    """Secret shares per site, its own included (its neighbours in the protocol); None: every sampled site."""
    reconstruction_threshold: int | None = None
    """Shares needed to unmask a site (the fewest sites a round can end with); None: a majority of num_shares."""
    clipping_range: float = 32.0
    """Each update value, scaled by the site's example count / max_weight (at most 1), is clipped to ±this. The
    first round's update carries the read-outs' fitted start (region-statistic centres up to 4.1 in `quick`, a
    log volume fraction down to -9): ±2 clipped it and cost `quick` 0.008 mean AUC; ±32 leaves it whole,
    and the quantiser's step (2 × 32 / quantization_range, ≈ 1.2e-7 for 3-4 sites) stays far below any update."""
    quantization_range: int | None = None
    """Integer levels of the quantiser; None: 2^31 / (sites rounded up to a power of two), so the masked sum
    of every sampled site stays below the 2^32 modulus."""
    max_weight: int | None = None
    """Largest example count of a site; None: the largest count the sites declared (`sites:`) or reported
    earlier in this run, else reply_checks.max_examples. A tight value gives a finer quantisation."""

    def validate(self, where: str = "secure_aggregation") -> None:
        """Check each value on its own (ConfigError naming the key); the checks that need the rest of
        federation.yaml are in `combination_problem`."""

        def bad(key: str, what: str, fix: str) -> ConfigError:
            return ConfigError(what, fix, where=f"{where}.{key}")

        if self.num_shares is not None and self.num_shares < 2:
            raise bad("num_shares", f"must be at least 2, got {self.num_shares}", "use e.g. 3, or remove it")
        t = self.reconstruction_threshold
        if t is not None and t < 2:
            raise bad("reconstruction_threshold", f"must be at least 2, got {t}", "use e.g. 2, or remove it")
        if t is not None and self.num_shares is not None and t > self.num_shares:
            raise bad("reconstruction_threshold", f"{t} is more than num_shares {self.num_shares}",
                      "lower it or raise num_shares")
        if not (math.isfinite(self.clipping_range) and self.clipping_range > 0):
            raise bad("clipping_range", f"must be positive, got {self.clipping_range}", "use e.g. 32")
        q = self.quantization_range
        if q is not None and not 2 <= q <= MODULUS_RANGE // 4:
            raise bad("quantization_range", f"must be in [2, 2^30], got {q}", "use e.g. 2**24, or remove it")
        if self.max_weight is not None and self.max_weight < 1:
            raise bad("max_weight", f"must be at least 1, got {self.max_weight}", "use the largest site's cases")


def threshold_for(num_shares: int) -> int:
    """The default reconstruction threshold: a strict majority of the shares, at least 2."""
    return max(2, num_shares // 2 + 1)


def quantization_for(num_sites: int) -> int:
    """The default quantisation range for `num_sites` summed vectors: 2^31 / next power of two ≥ num_sites."""
    return 2 ** (31 - max(1, math.ceil(math.log2(max(num_sites, 2)))))


def combination_problem(sa: SecureAggregationConfig, strategy: str, robust_strategies: tuple[str, ...],
                        clip_norm_ratio: float | None, site_dp_server_side: bool, min_sites: int,
                        listed_sites: int) -> tuple[str, str, str] | None:
    """(key, what, fix) when secure aggregation cannot hold with these settings (None when it can)."""
    hidden = "needs each site's update, which secure aggregation hides"
    if strategy in robust_strategies:
        return "strategy", f"{strategy} {hidden}", "use fedavg or fedprox, or turn secure_aggregation off"
    if clip_norm_ratio is not None:
        return "robust.clip_norm_ratio", f"server-side clipping {hidden}", "remove it, or turn secure_aggregation off"
    if site_dp_server_side:
        return ("site_level_dp.side", f"server-side clipping {hidden}",
                "use side: client (each site clips its own update), or turn secure_aggregation off")
    if min_sites < 2:
        return "min_sites", "secure aggregation needs at least 2 sites a round", "raise min_sites to 2 or more"
    t = sa.reconstruction_threshold
    if t is not None and t > min_sites:
        return ("secure_aggregation.reconstruction_threshold", f"{t} is more than min_sites {min_sites}: a round "
                "with min_sites sites could never be unmasked", "lower it or raise min_sites")
    n = sa.num_shares
    if n is not None and listed_sites and n > listed_sites:
        return ("secure_aggregation.num_shares", f"{n} is more than the {listed_sites} listed sites",
                "lower it or remove it (every sampled site)")
    return None


@dataclass
class Protocol:
    """The SecAgg+ values of one round (sent to the sites in the setup stage)."""

    num_shares: int
    threshold: int
    clipping_range: float
    quantization_range: int
    max_weight: float
    modulus_range: int = MODULUS_RANGE

    def weight_of(self, count: float) -> int:
        """The integer weight a site with `count` examples gives its update (as Flower's mod computes it)."""
        return round(count / self.max_weight * self.quantization_range)

    def error_bound(self, counts: list[float], largest_update: float | None = None) -> float:
        """Largest absolute error of the secure mean against the example-weighted mean of the same unclipped
        updates from `counts`' sites: each quantised value moves by less than one level (stochastic
        rounding), and each weight by less than half a level (largest_update: the largest |value|, default
        the most that clipping lets through)."""
        total = sum(self.weight_of(c) for c in counts)
        level = 2 * self.clipping_range / self.quantization_range
        rounding = len(counts) * level * self.quantization_range / max(total, 1)
        biggest = largest_update if largest_update is not None else self.clipping_range * self.max_weight / min(counts)
        weights = max(abs(self.weight_of(c) * self.max_weight / self.quantization_range - c) / c for c in counts)
        return rounding + 2 * weights * biggest


def protocol_for(sa: SecureAggregationConfig, sampled: int, max_weight: float) -> Protocol | str:
    """The round's protocol values for `sampled` sites, or why the round cannot be run securely."""
    if sampled < 2:
        return f"secure aggregation needs at least 2 sampled sites, got {sampled}"
    shares = min(sa.num_shares or sampled, sampled)
    if shares < sampled and shares % 2 == 0:  # SecAgg+ neighbours are symmetric around a site: an odd count
        shares += 1
    threshold = sa.reconstruction_threshold or threshold_for(shares)
    if threshold > shares:
        return f"reconstruction_threshold {threshold} is more than the {shares} shares of this round's sites"
    levels = int(sa.quantization_range or quantization_for(sampled))
    if sampled * levels >= MODULUS_RANGE:
        return f"quantization_range {levels} × {sampled} sites would overflow the 2^32 modulus of the masked sum"
    return Protocol(num_shares=shares, threshold=threshold, clipping_range=float(sa.clipping_range),
                    quantization_range=levels, max_weight=float(sa.max_weight or max_weight))


def mask_generator(seed: bytes, num_range: int, dimensions_list: list[tuple[int, ...]]) -> list[np.ndarray]:
    """The masks a secret expands to: Flower's `pseudo_rand_gen` contract (values in [0, num_range - 1)), but
    seeded with the whole secret (SHA-256 into PCG64) where Flower 1.42 folds it to 32 bits, few enough for a
    coordinator to search when a round sums only two sites."""
    gen = np.random.Generator(np.random.PCG64(int.from_bytes(hashlib.sha256(seed).digest(), "little")))
    return [np.asarray(gen.integers(0, num_range - 1, size=d or None, dtype=np.int64), dtype=np.int64)
            for d in dimensions_list]
