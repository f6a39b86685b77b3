"""The spatial multi-task network: shapes, explanations, ablation semantics, Opacus compatibility."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from opacus import GradSampleModule
from opacus.validators import ModuleValidator

from fedsubtype.configio import from_dict
from fedsubtype.errors import ConfigError
from fedsubtype.model import VARIANTS, ModelConfig, build_model, count_parameters, state_bytes

S = 16


def _case(batch: int = 2, size: int = S, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random image and a nested core / rim / peritumoral region map (cubes) inside background."""
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(batch, 1, size, size, size, generator=g)
    regions = torch.zeros(batch, size, size, size, dtype=torch.int64)
    q = size // 8
    regions[:, q:-q, q:-q, q:-q] = 3
    regions[:, 2 * q:-2 * q, 2 * q:-2 * q, 2 * q:-2 * q] = 2
    regions[:, 3 * q:-3 * q, 3 * q:-3 * q, 3 * q:-3 * q] = 1
    return image, regions


def _eval_model(variant: str, seed: int = 0) -> torch.nn.Module:
    return build_model(ModelConfig(variant=variant, width=8, feature_dim=16, hidden_dim=16), seed=seed).eval()


def test_variants_are_the_paper_rows() -> None:
    assert list(VARIANTS) == ["full", "no_multiscale_attention", "no_peritumoral", "no_multitask",
                              "no_shared_extractor", "single_scale_attention", "core_only"]
    assert VARIANTS["full"] == "Full model"


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_outputs_and_explanations_for_every_variant(variant: str) -> None:
    model = _eval_model(variant)
    image, regions = _case()
    with torch.no_grad():
        plain = model(image, regions)
        out = model(image, regions, explain=True)
    assert set(plain) == {"logits", "ki67"}
    assert out["logits"].shape == (2, 3) and out["ki67"].shape == (2,)
    assert torch.all((out["ki67"] > 0) & (out["ki67"] < 1))
    torch.testing.assert_close(plain["logits"], out["logits"])
    att = out["attention"]
    assert "fused" in att
    for name, m in att.items():
        assert m.shape == (2, 1, S, S, S), name
        assert torch.all((m >= 0) & (m <= 1)), name
    w = out["region_weights"]
    assert w.shape == (2, 3)
    assert torch.all(w >= 0)
    torch.testing.assert_close(w.sum(1), torch.ones(2))


def test_attention_scales_per_variant() -> None:
    image, regions = _case()
    keys = {v: set(_eval_model(v)(image, regions, explain=True)["attention"]) for v in
            ("full", "single_scale_attention", "no_multiscale_attention")}
    assert keys["full"] == {"scale_1", "scale_2", "scale_3", "fused"}
    assert keys["single_scale_attention"] == {"scale_3", "fused"}
    assert keys["no_multiscale_attention"] == {"fused"}
    uniform = _eval_model("no_multiscale_attention")(image, regions, explain=True)["attention"]["fused"]
    assert torch.all(uniform == 1)


def test_region_weights_follow_the_variant_and_absent_regions() -> None:
    image, regions = _case()
    w_core = _eval_model("core_only")(image, regions, explain=True)["region_weights"]
    torch.testing.assert_close(w_core, torch.tensor([[1.0, 0.0, 0.0]] * 2))
    w_np = _eval_model("no_peritumoral")(image, regions, explain=True)["region_weights"]
    assert torch.all(w_np[:, 2] == 0) and torch.all(w_np[:, :2] > 0)
    no_peri = torch.where(regions == 3, torch.zeros_like(regions), regions)
    w_full = _eval_model("full")(image, no_peri, explain=True)["region_weights"]
    assert torch.all(w_full[:, 2] == 0)
    torch.testing.assert_close(w_full.sum(1), torch.ones(2))
    empty = torch.zeros_like(regions)
    w_empty = _eval_model("full")(image, empty, explain=True)["region_weights"]
    torch.testing.assert_close(w_empty, torch.full((2, 3), 1 / 3))


@pytest.mark.parametrize("size", [24, 32])
def test_other_input_sizes(size: int) -> None:
    image, regions = _case(batch=1, size=size)
    out = _eval_model("full")(image, regions, explain=True)
    assert out["logits"].shape == (1, 3)
    assert out["attention"]["fused"].shape == (1, 1, size, size, size)


def test_bad_input_shapes_are_reported() -> None:
    model = _eval_model("full")
    image, regions = _case(size=16)
    with pytest.raises(ValueError, match="multiple of 8"):
        model(image[..., :12, :12, :12], regions[..., :12, :12, :12])
    with pytest.raises(ValueError, match="do not match"):
        model(image, regions[:1])


def _perturb(image: torch.Tensor, where: torch.Tensor, seed: int = 5) -> torch.Tensor:
    noise = torch.randn(image.shape, generator=torch.Generator().manual_seed(seed)) * 3
    return torch.where(where.unsqueeze(1), image + noise, image)


def test_core_only_ignores_rim_peritumoral_and_background() -> None:
    model = _eval_model("core_only")
    image, regions = _case()
    with torch.no_grad():
        ref = model(image, regions)
        changed = model(_perturb(image, regions != 1), regions)
        relabelled = model(image, torch.where(regions == 3, torch.zeros_like(regions), regions))
    for out in (changed, relabelled):
        torch.testing.assert_close(out["logits"], ref["logits"])
        torch.testing.assert_close(out["ki67"], ref["ki67"])
    with torch.no_grad():
        core_changed = model(_perturb(image, regions == 1), regions)
    assert not torch.allclose(core_changed["logits"], ref["logits"])


def test_no_peritumoral_ignores_the_peritumoral_shell_but_not_the_rim() -> None:
    image, regions = _case()
    model = _eval_model("no_peritumoral")
    with torch.no_grad():
        ref = model(image, regions)
        peri = model(_perturb(image, regions == 3), regions)
        rim = model(_perturb(image, regions == 2), regions)
        full_ref = _eval_model("full")(image, regions)
        full_peri = _eval_model("full")(_perturb(image, regions == 3), regions)
    torch.testing.assert_close(peri["logits"], ref["logits"])
    torch.testing.assert_close(peri["ki67"], ref["ki67"])
    assert not torch.allclose(rim["logits"], ref["logits"])
    assert not torch.allclose(full_peri["logits"], full_ref["logits"])  # the full model does see it


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_only_groupnorm_and_opacus_compatible(variant: str) -> None:
    model = build_model(ModelConfig(variant=variant))
    assert ModuleValidator.validate(model, strict=True) == []
    kinds = {type(m).__name__ for m in model.modules()}
    assert "GroupNorm" in kinds
    assert not any("BatchNorm" in k or "InstanceNorm" in k for k in kinds)


def _assert_per_sample_gradients(model: torch.nn.Module) -> None:
    """Opacus computes a finite per-sample gradient for every parameter of `model` (batch of 3)."""
    gsm = GradSampleModule(model)
    out = gsm(*_case(batch=3))
    (out["logits"].sum() + out["ki67"].sum()).backward()
    for name, p in model.named_parameters():
        assert p.grad_sample is not None and p.grad_sample.shape[0] == 3, name
        assert torch.isfinite(p.grad_sample).all(), name


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_opacus_per_sample_gradients_for_every_parameter() -> None:
    _assert_per_sample_gradients(build_model(ModelConfig(width=8, feature_dim=16, hidden_dim=16), seed=0))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_gradients_reach_every_parameter(variant: str) -> None:
    model = build_model(ModelConfig(variant=variant, width=8, feature_dim=16, hidden_dim=16, dropout=0.0), seed=1)
    image, regions = _case()
    out = model(image, regions)
    (out["logits"].sum() + out["ki67"].sum()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        if variant == "full":
            assert p.grad.abs().sum() > 0, name


def test_same_seed_same_model_and_outputs() -> None:
    image, regions = _case()
    a, b, c = _eval_model("full", seed=7), _eval_model("full", seed=7), _eval_model("full", seed=8)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    with torch.no_grad():
        torch.testing.assert_close(a(image, regions)["logits"], b(image, regions)["logits"], rtol=0, atol=0)
        assert not torch.allclose(a(image, regions)["logits"], c(image, regions)["logits"])


def test_separate_extractors_and_independent_networks() -> None:
    shared = build_model(ModelConfig(variant="full"))
    separate = build_model(ModelConfig(variant="no_shared_extractor"))
    single = build_model(ModelConfig(variant="no_multitask"))
    assert len(shared.extractors) == 1 and len(separate.extractors) == 4
    assert len(separate.heads) == 4 and separate.attention is not None  # attention/regions stay shared
    assert set(single.members) == {"er", "pr", "her2", "ki67"}
    assert all(len(m.heads) == 1 and len(m.extractors) == 1 for m in single.members.values())
    # in no_multitask, the ER loss moves only the ER member
    image, regions = _case()
    single.train()
    single(image, regions)["logits"][:, 0].sum().backward()
    for task, member in single.members.items():
        got = any(p.grad is not None and p.grad.abs().sum() > 0 for p in member.parameters())
        assert got == (task == "er"), task


def test_size_budget_for_federation() -> None:
    model = build_model(ModelConfig())
    n = count_parameters(model)
    assert 100_000 < n < 1_000_000
    buffers = sum(b.numel() for b in model.buffers())  # the read-outs' scaler (2 x 28) and fitted marker
    assert buffers == 57 and state_bytes(model) == 4 * (n + buffers)  # float32


def test_config_from_yaml_mapping() -> None:
    cfg = from_dict(ModelConfig, {"variant": "core_only", "width": 8, "blocks": [1, 2, 1]}, "model")
    assert cfg.blocks == (1, 2, 1) and cfg.variant == "core_only"
    with pytest.raises(ConfigError, match="variant"):
        from_dict(ModelConfig, {"variant": "nope"}, "model")
    with pytest.raises(ConfigError, match="unknown key 'widht'"):
        from_dict(ModelConfig, {"widht": 8}, "model")
    with pytest.raises(ConfigError, match="dropout"):
        from_dict(ModelConfig, {"dropout": 1.5}, "model")


def test_read_out_is_one_option_with_its_allowed_values_in_one_place() -> None:
    from fedsubtype.model.config import READ_OUT_PARTS, READ_OUTS

    assert READ_OUTS == ("none", "statistics", "linear_heads", "linear_heads_profile")
    default = ModelConfig()  # the default network reads the statistics through every read-out
    assert default.read_out == "linear_heads_profile" and default.read_out_parts == READ_OUT_PARTS["linear_heads_profile"]
    parts = [READ_OUT_PARTS[name] for name in READ_OUTS]  # each value adds to the one before it
    assert [(p.statistics, p.linear_heads, p.profile) for p in parts] == [
        (False, False, False), (True, False, False), (True, True, False), (True, True, True)]
    with pytest.raises(ConfigError, match="model.read_out.*'wide' is not allowed.*linear_heads_profile") as err:
        from_dict(ModelConfig, {"read_out": "wide"}, "model")
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="model.read_out"):
        ModelConfig(read_out="wide").validate()  # built in code, not from YAML: the same values
    for removed in ("stem", "pooling", "region_mixing", "task_branches", "physical_size", "region_statistics",
                    "statistics_heads", "peritumoral_profile"):
        with pytest.raises(ConfigError, match=f"unknown key '{removed}'"):
            from_dict(ModelConfig, {removed: False}, "model")


def test_the_model_config_loads_without_torch() -> None:
    """The CLI's parsers read the allowed values from the config module before anything imports torch."""
    import subprocess
    import sys

    code = ("import sys; from fedsubtype.model.config import READ_OUTS; from fedsubtype.migrate import run_identity; "
            "print('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"


def test_weighted_moments_match_a_hand_computed_mean_and_standard_deviation() -> None:
    from fedsubtype.model.regions_pool import weighted_moments

    g = torch.Generator().manual_seed(3)
    feats = torch.randn(2, 3, 2, 2, 2, generator=g, dtype=torch.float64)
    weights = torch.rand(2, 2, 2, 2, 2, generator=g, dtype=torch.float64)
    weights[1, 1] = 0.0
    weights[1, 1, 0, 0, 0] = 0.5  # one voxel: mean = that value, spread 0
    out = weighted_moments(feats, weights, std=True)
    assert out.shape == (2, 2, 6)
    for b in range(2):
        for r in range(2):
            w = weights[b, r].flatten()
            for c in range(3):
                f = feats[b, c].flatten()
                mean = float((w * f).sum() / w.sum())
                sd = math.sqrt(float((w * (f - mean) ** 2).sum() / w.sum()))
                assert out[b, r, c].item() == pytest.approx(mean, abs=1e-9)
                assert out[b, r, 3 + c].item() == pytest.approx(sd, abs=1e-3)  # sqrt(var + 1e-6)
    assert out[1, 1, 3:].max().item() == pytest.approx(1e-3, rel=1e-3)
    torch.testing.assert_close(weighted_moments(feats, weights, std=False), out[..., :3])


def test_region_statistics_by_hand() -> None:
    from fedsubtype.model.region_stats import STATS_PER_REGION, region_statistics, smooth
    from fedsubtype.model.regions_pool import region_masks

    g = torch.Generator().manual_seed(5)
    flat = torch.full((1, 1, 8, 8, 8), 2.5)
    torch.testing.assert_close(smooth(flat), flat)  # edges replicated: a constant stays constant
    image = torch.randn(2, 1, 8, 8, 8, generator=g, dtype=torch.float64)
    regions = torch.zeros(2, 8, 8, 8, dtype=torch.int64)
    regions[:, 2:6, 2:6, 2:6] = 3
    regions[:, 3:5, 3:5, 3:5] = 1
    regions[1, 3:5, 3:5, 3:5] = 2  # case 1 has no core
    masks = region_masks(regions, ("core", "rim", "peritumoral"))
    stats = region_statistics(image, masks).reshape(2, 3, STATS_PER_REGION)
    seen = (regions > 0).unsqueeze(1).float()  # all three regions: the blur is normalised to their union
    blurred = (smooth(image.float() * seen) / smooth(seen)).double()
    for b in range(2):
        for r, label in enumerate((1, 2, 3)):
            sel = regions[b] == label
            if not sel.any():
                assert stats[b, r, :6].abs().max().item() < 2e-3  # empty region: zeros (sd = sqrt(1e-6))
                assert stats[b, r, 6].item() == pytest.approx(math.log(1e-4))
                continue
            for k, arr in enumerate((image[b, 0], blurred[b, 0], image[b, 0] - blurred[b, 0])):
                v = arr[sel]
                assert stats[b, r, 2 * k].item() == pytest.approx(v.mean().item(), abs=1e-5)
                assert stats[b, r, 2 * k + 1].item() == pytest.approx(v.std(unbiased=False).item(), abs=1e-3)
            assert stats[b, r, 6].item() == pytest.approx(math.log(sel.sum().item() / 512))


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_region_statistics_widen_only_the_representation_and_respect_the_variant() -> None:
    from fedsubtype.model.region_stats import STATS_PER_REGION

    small = dict(width=8, feature_dim=16, hidden_dim=16)
    plain = build_model(ModelConfig(**small, read_out="none"), seed=0)
    stats = build_model(ModelConfig(**small, read_out="statistics"), seed=0)
    # only the representation's layer (16 units) widens: it reads 3 regions' statistics too
    assert count_parameters(stats) - count_parameters(plain) == 3 * STATS_PER_REGION * 16
    image, regions = _case()
    core_only = build_model(ModelConfig(**small, variant="core_only", read_out="statistics"), seed=0).eval()
    with torch.no_grad():  # the statistics, too, only see the regions the variant keeps
        ref = core_only(image, regions)
        changed = core_only(_perturb(image, regions != 1), regions)
    torch.testing.assert_close(changed["logits"], ref["logits"])
    with torch.no_grad():  # and they do carry the input's intensity: a brighter core changes the outputs
        stats.eval()
        brighter = stats(image + 0.5 * (regions == 1).unsqueeze(1), regions)["logits"]
        assert not torch.allclose(brighter, stats(image, regions)["logits"])
    _assert_per_sample_gradients(build_model(ModelConfig(**small, read_out="statistics"), seed=0))


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_statistics_heads_start_from_per_task_linear_models_of_the_training_cases() -> None:
    from sklearn.linear_model import LogisticRegression

    from fedsubtype.model.region_stats import STATS_PER_REGION, fit_statistics_heads, region_statistics
    from fedsubtype.model.regions_pool import region_masks

    small = dict(width=8, feature_dim=16, hidden_dim=16)
    plain = build_model(ModelConfig(**small, read_out="statistics"), seed=0).eval()
    wide = build_model(ModelConfig(**small, read_out="linear_heads"), seed=0).eval()
    # over the `statistics` read-out: one linear map (3 regions x 7 statistics + bias) per task, nothing else
    assert count_parameters(wide) - count_parameters(plain) == 4 * (3 * STATS_PER_REGION + 1)
    g = torch.Generator().manual_seed(3)
    n = 40
    image = torch.randn(n, 1, 16, 16, 16, generator=g)
    regions = torch.zeros(n, 16, 16, 16, dtype=torch.int64)
    regions[:, 3:13, 3:13, 3:13] = 3
    regions[:, 5:11, 5:11, 5:11] = 2
    regions[:, 6:10, 6:10, 6:10] = 1
    her2 = (torch.arange(n) % 2).float()
    image[:, 0][regions == 3] += (0.8 * her2[:, None]).expand(n, 16 ** 3)[(regions == 3).flatten(1)]
    heads = wide.statistics_heads
    with torch.no_grad():  # not yet fitted: exactly the network without them
        torch.testing.assert_close(wide(image, regions)["logits"], plain(image, regions)["logits"])
    labels = torch.stack([1 - her2, torch.full((n,), float("nan")), her2, torch.full((n,), 20.0)], 1)
    present = ~labels.isnan()
    data = [{"image": image[i], "regions": regions[i], "labels": labels[i].nan_to_num(0.0), "present": present[i]}
            for i in range(n)]
    private = build_model(ModelConfig(**small, read_out="linear_heads"), seed=0)
    private.prepare_for_training(data, private=True, seed=0)  # DP-SGD would not cover the fit: none is made
    assert float(private.statistics_heads.fitted) == 0.0 and float(private.statistics_heads.center.abs().sum()) == 0.0
    wide.prepare_for_training(data, private=False, seed=0)
    assert float(heads.fitted) == 1.0
    assert fit_statistics_heads(wide, data) == 0  # fitted read-outs are kept (loaded models, later rounds)
    stats = region_statistics(image, region_masks(regions, ("core", "rim", "peritumoral"))).double()
    torch.testing.assert_close(heads.center, stats.mean(0).float())
    z = ((stats - stats.mean(0)) / stats.std(0, unbiased=False).clamp_min(1e-3)).numpy()
    # HER2 starts at the logistic regression of the training cases (its C chosen by cross-validation) ...
    for c in np.logspace(-3, 1, 9):
        ref = LogisticRegression(C=c, max_iter=2000).fit(z, her2.numpy())
        if np.allclose(ref.coef_.ravel(), heads.linear["her2"].weight.detach().numpy().ravel(), atol=1e-3):
            break
    else:
        raise AssertionError("HER2's read-out is not a logistic regression of the training cases")
    with torch.no_grad():  # ... and the network's HER2 logit is that fit plus the deep head's own output
        raw, _ = wide.raw_outputs(image, regions)
        plain_raw, _ = plain.raw_outputs(image, regions)
    expected = torch.as_tensor(ref.decision_function(z)).float() + plain_raw["her2"] - float(plain.heads["her2"][-1].bias.detach())
    torch.testing.assert_close(raw["her2"], expected, rtol=1e-3, atol=1e-3)
    assert float(heads.linear["pr"].weight.detach().abs().sum()) == 0.0  # no PR label anywhere: left at zero
    assert {"statistics_heads.center", "statistics_heads.scale", "statistics_heads.fitted"} <= set(wide.state_dict())
    core_only = build_model(ModelConfig(**small, variant="core_only", read_out="linear_heads"), seed=0)
    assert core_only.statistics_heads.linear["er"].in_features == STATS_PER_REGION  # only the regions it sees
    _assert_per_sample_gradients(build_model(ModelConfig(**small, read_out="linear_heads"), seed=0))


def test_tumour_distance_is_the_chessboard_distance() -> None:
    from scipy import ndimage

    from fedsubtype.model.region_stats import dilation_distance, tumour_distance

    rng = np.random.default_rng(2)
    tumour = np.zeros((3, 20, 20, 20), dtype=bool)
    tumour[0, 8:12, 6:10, 9:11] = True
    tumour[1][rng.random((20, 20, 20)) > 0.995] = True  # scattered voxels: an irregular shape
    batch = torch.from_numpy(tumour).float().unsqueeze(1)  # case 2 has no tumour: beyond reach everywhere
    for measure in (tumour_distance, dilation_distance):  # SciPy's transform on CPU, the dilations elsewhere
        distance = measure(batch, max_steps=6)[:, 0].numpy()
        for b in range(2):
            expected = ndimage.distance_transform_cdt(~tumour[b], metric="chessboard")
            np.testing.assert_array_equal(distance[b], np.minimum(expected, 7))  # beyond reach: max_steps + 1
        np.testing.assert_array_equal(distance[2], np.full((20, 20, 20), 7.0))


def test_peritumoral_profile_reads_band_means_by_hand() -> None:
    from fedsubtype.model.region_stats import PROFILE_BANDS, PROFILE_STATS, peritumoral_profile
    from fedsubtype.model.regions_pool import region_masks

    size = 64  # the bands are defined in voxels of a 64³ grid
    regions = torch.zeros(2, size, size, size, dtype=torch.int64)
    regions[:, 18:46, 18:46, 18:46] = 3  # shell 10 voxels thick around the tumour
    regions[:, 28:36, 28:36, 28:36] = 2
    regions[:, 30:34, 30:34, 30:34] = 1
    regions[1, 18:46, 18:46, 18:26] = 0  # case 1: the outer part of one side is cut off (not in the body)
    idx = torch.arange(size)
    # chessboard distance from the cube [28, 36)³ along each axis, then the maximum over axes
    axis = torch.clamp(torch.maximum(28 - idx, idx - 35), min=0)
    distance = torch.maximum(torch.maximum(axis[:, None, None], axis[None, :, None]), axis[None, None, :]).float()
    image = (10.0 - distance).expand(2, 1, size, size, size).clone()  # brightness falls off with distance
    names = ("core", "rim", "peritumoral")
    profile = peritumoral_profile(image, region_masks(regions, names), names)
    assert profile.shape == (2, PROFILE_STATS)
    for b in range(2):
        peri = regions[b] == 3
        means = [image[b, 0][peri & (distance > lo) & (distance <= hi)].mean().item() for lo, hi in PROFILE_BANDS]
        np.testing.assert_allclose(profile[b, :4].numpy(), means, rtol=1e-5)
        np.testing.assert_allclose(profile[b, 4:].numpy(), np.array(means[:3]) - means[3], rtol=1e-5, atol=1e-5)
    assert profile[0, 0].item() == pytest.approx(10 - 1.5 + 0.0, abs=0.2)  # band (0, 2]: mostly distances 1 and 2
    # a shell thinner than the outer band: that band takes the shell's mean instead of nothing
    thin = regions.clone()
    thin[(thin == 3)] = 0
    thin[:, 26:38, 26:38, 26:38] = torch.where(thin[:, 26:38, 26:38, 26:38] == 0, 3, thin[:, 26:38, 26:38, 26:38])
    thin_profile = peritumoral_profile(image, region_masks(thin, names), names)
    shell_mean = image[0, 0][thin[0] == 3].mean().item()
    assert thin_profile[0, 3].item() == pytest.approx(shell_mean, rel=1e-5)
    # at 32³ the same bands are half as many voxels wide: the profile follows the field of view, not the grid
    half = peritumoral_profile(image[:, :, ::2, ::2, ::2], region_masks(regions[:, ::2, ::2, ::2], names), names)
    assert half[0, :4].numpy() == pytest.approx(profile[0, :4].numpy(), abs=0.6)


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_peritumoral_profile_joins_the_statistics_of_variants_that_see_the_shell() -> None:
    from fedsubtype.model.region_stats import PROFILE_STATS, STATS_PER_REGION, fit_statistics_heads

    small = dict(width=8, feature_dim=16, hidden_dim=16)
    wide = build_model(ModelConfig(**small, read_out="linear_heads_profile"), seed=0)
    assert wide.statistics_heads.linear["her2"].in_features == 3 * STATS_PER_REGION + PROFILE_STATS
    plain = build_model(ModelConfig(**small, read_out="linear_heads"), seed=0)
    # the representation (16 units) and each task's read-out read the profile's numbers too
    assert count_parameters(wide) - count_parameters(plain) == PROFILE_STATS * 16 + 4 * PROFILE_STATS
    # a variant that does not see peritumoral tissue gets no profile (nor does the value change anything there)
    for variant in ("no_peritumoral", "core_only"):
        blind = build_model(ModelConfig(**small, variant=variant, read_out="linear_heads_profile"), 0)
        seen = len(blind.spec.regions)
        assert blind.statistics_heads.linear["er"].in_features == seen * STATS_PER_REGION
        same = build_model(ModelConfig(**small, variant=variant, read_out="linear_heads"), 0)
        assert count_parameters(blind) == count_parameters(same)
    image, regions = _case(batch=12, size=32)
    image[::2, 0] += 0.7 * ((regions[::2] == 3) & (image[::2, 0] > -5)).float()  # brighter shell in half the cases
    her2 = (torch.arange(12) % 2 == 0).float()
    labels = torch.stack([her2, her2, her2, torch.full((12,), 20.0)], 1)
    data = [{"image": image[i], "regions": regions[i], "labels": labels[i], "present": torch.ones(4, dtype=torch.bool)}
            for i in range(12)]
    assert fit_statistics_heads(wide, data) == 1  # the fit sees the profile too (the scaler has 28 entries)
    assert wide.statistics_heads.center.shape == (3 * STATS_PER_REGION + PROFILE_STATS,)
    with torch.no_grad():
        out = wide.eval()(image, regions)["logits"][:, 2]
    assert (out[::2].min() > out[1::2].max()).item()  # the read-out separates the brighter shells
    _assert_per_sample_gradients(build_model(ModelConfig(**small, read_out="linear_heads_profile"), 0))
