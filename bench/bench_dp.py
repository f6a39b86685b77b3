"""DP-SGD step time ÷ plain step time for the full model, per Opacus per-sample-gradient mode, in one run.

    nice -n 10 python bench/bench_dp.py                 # full model, batch 8, 64³ (the issue's setting)
    python bench/bench_dp.py --size 32 --steps 3        # quicker look

For each mode (Opacus hooks with fedsubtype's grouped-convolution Conv3d per-case gradients — the default —,
Opacus hooks with its stock unfold-based Conv3d sampler, functorch, ghost clipping) the script first checks it is *correct* on a
small batch — its clipped, summed gradient (σ = 0) must equal a per-sample reference computed one case at
a time with plain autograd — then times forward + backward + clip/noise + AdamW steps on the full model
at the chosen size, alternating with plain (non-DP) steps in the same process (P, D, P, D, … so both see
the same load on a shared machine). Reports medians after warm-up of wall and process-CPU time and the
median per-pair ratio DP ÷ plain (CPU time is the headline on a shared CPU; target ≤ 2.0), writes JSON to results/bench/bench_dp.json and names the
fastest correct mode (fedsubtype.privacy.engine.DEFAULT_GRAD_SAMPLE_MODE should be it).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

MODES = ("hooks", "hooks-unfold", "functorch", "ghost")
"""`hooks` uses fedsubtype.privacy.conv_grad for Conv3d (what the DP engine uses); `hooks-unfold` Opacus's own."""


def opacus_mode(mode: str) -> str:
    """Register the Conv3d per-case gradient the mode stands for; return Opacus's grad_sample_mode."""
    from fedsubtype.privacy.conv_grad import register

    register(native=mode != "hooks-unfold")
    return "hooks" if mode == "hooks-unfold" else mode
TARGET_RATIO = 2.0


def per_sample_loss(out: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """[B] losses, each from one case only (BCE on ER/PR/HER2 + MSE on Ki-67 in 0–1) — what DP-SGD needs."""
    bce = nn.functional.binary_cross_entropy_with_logits(out["logits"], labels[:, :3], reduction="none").sum(1)
    return bce + (out["ki67"].reshape(-1) - labels[:, 3]) ** 2


def make_batch(batch: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A seeded synthetic batch shaped like the real one (image, region map, labels)."""
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(batch, 1, size, size, size, generator=g)
    regions = torch.randint(0, 4, (batch, size, size, size), generator=g)
    labels = torch.cat([torch.randint(0, 2, (batch, 3), generator=g).float(), torch.rand(batch, 1, generator=g)], 1)
    return image, regions, labels


def private(model: nn.Module, mode: str, batch: int, sigma: float, clip: float) -> tuple[nn.Module, Any]:
    """Model and DPOptimizer from Opacus' PrivacyEngine for one grad-sample mode (no data loader needed)."""
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    dummy = DataLoader(TensorDataset(torch.zeros(batch * 4, 1)), batch_size=batch)
    engine = PrivacyEngine(accountant="prv")
    out = engine.make_private(module=model, optimizer=opt, data_loader=dummy, noise_multiplier=sigma,
                              max_grad_norm=clip, poisson_sampling=False, grad_sample_mode=opacus_mode(mode),
                              criterion=nn.MSELoss())
    module, dp_opt = out[0], out[1]
    dp_opt.expected_batch_size = batch
    return module, dp_opt


def dp_backward(module: nn.Module, opt: Any, mode: str, image, regions, labels) -> None:
    """Zero the gradients and back-propagate one batch in `mode` (ghost clipping needs its double backward)."""
    opt.zero_grad(set_to_none=True)
    losses = per_sample_loss(module(image, regions), labels)
    if mode == "ghost":
        from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping

        DPTensorFastGradientClipping(module, opt, losses, "mean").backward()
    else:
        losses.mean().backward()


def dp_step(module: nn.Module, opt: Any, mode: str, image, regions, labels) -> None:
    """One DP-SGD step in `mode`."""
    dp_backward(module, opt, mode, image, regions, labels)
    opt.step()


def reference_gradient(model: nn.Module, image, regions, labels, clip: float) -> list[torch.Tensor]:
    """Σ_i clip(∇ℓ_i) / B computed one case at a time with plain autograd."""
    params = [p for p in model.parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in params]
    for i in range(image.shape[0]):
        loss = per_sample_loss(model(image[i:i + 1], regions[i:i + 1]), labels[i:i + 1]).sum()
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]
        norm = torch.sqrt(sum((g ** 2).sum() for g in grads))
        factor = min(1.0, clip / (float(norm) + 1e-6))
        for t, g in zip(total, grads):
            t.add_(g, alpha=factor)
    return [t / image.shape[0] for t in total]


def check_correct(build: Callable[[], nn.Module], mode: str, size: int, batch: int) -> tuple[bool, float, str]:
    """Does `mode`'s clipped gradient (σ = 0) match the per-sample reference? (ok, max relative error, note)."""
    clip = 0.05  # small enough that most cases are clipped, so clipping is really exercised
    image, regions, labels = make_batch(batch, size, seed=1)
    base = build().train()  # Opacus records activations in training mode only
    for m in base.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.p = 0.0  # so the per-case passes and the batched pass see the same function
    ref = reference_gradient(copy.deepcopy(base), image, regions, labels, clip)
    try:
        module, opt = private(copy.deepcopy(base), mode, batch, sigma=0.0, clip=clip)
        dp_backward(module, opt, mode, image, regions, labels)
        opt.pre_step()
        got = [p.grad for p in opt.params]
    except Exception as exc:  # noqa: BLE001 - a mode that cannot handle a layer is reported, not fatal
        return False, float("nan"), f"not applicable: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
    num = max(float((g - r).abs().max()) for g, r in zip(got, ref))
    den = max(float(r.abs().max()) for r in ref)
    rel = num / max(den, 1e-12)
    return rel < 1e-3, rel, "matches the per-sample reference" if rel < 1e-3 else "differs from the per-sample reference"


def timed(step: Callable[[], None]) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one step."""
    w0, c0 = time.perf_counter(), time.process_time()
    step()
    return time.perf_counter() - w0, time.process_time() - c0


def interleaved(plain: Callable[[], None], dp: Callable[[], None], warmup: int, steps: int) -> dict[str, Any]:
    """Plain and DP steps alternated (P, D, P, D, …) so both see the same load on a shared CPU.

    Returns medians of wall and CPU time for each, and the median of the per-pair ratios.
    """
    for _ in range(warmup):
        plain()
        dp()
    pw, pc, dw, dc = [], [], [], []
    for _ in range(steps):
        w, c = timed(plain)
        pw.append(w)
        pc.append(c)
        w, c = timed(dp)
        dw.append(w)
        dc.append(c)
    med = statistics.median
    return {"plain_wall_s": med(pw), "dp_wall_s": med(dw), "plain_cpu_s": med(pc), "dp_cpu_s": med(dc),
            "ratio_wall": med([d / p for d, p in zip(dw, pw)]), "ratio_cpu": med([d / p for d, p in zip(dc, pc)]),
            "plain_wall_all_s": pw, "dp_wall_all_s": dw}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=64, help="cubic input size (default 64)")
    ap.add_argument("--batch", type=int, default=8, help="batch size (default 8)")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per mode (median reported)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed warm-up steps per mode")
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--check-size", type=int, default=24, help="input size of the correctness check")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--out", type=Path, default=Path("results/bench/bench_dp.json"))
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.getLogger("opacus").setLevel(logging.ERROR)
    if args.threads:
        torch.set_num_threads(args.threads)
    from fedsubtype.model import ModelConfig, build_model

    device = torch.device(args.device)
    torch.manual_seed(0)
    init = build_model(ModelConfig()).state_dict()

    def build() -> nn.Module:
        model = build_model(ModelConfig())
        model.load_state_dict(init)
        return model

    print(f"full model ({sum(p.numel() for p in build().parameters()):,} parameters), batch {args.batch}, "
          f"{args.size}³, {args.warmup} warm-up + {args.steps} timed steps per mode, device {device}, "
          f"{torch.get_num_threads()} threads", flush=True)
    image, regions, labels = (t.to(device) for t in make_batch(args.batch, args.size, seed=0))

    plain = build().to(device).train()
    plain_opt = torch.optim.AdamW(plain.parameters(), lr=1e-3)

    def plain_step() -> None:
        plain_opt.zero_grad(set_to_none=True)
        per_sample_loss(plain(image, regions), labels).mean().backward()
        plain_opt.step()

    results: dict[str, Any] = {"size": args.size, "batch": args.batch, "steps": args.steps, "warmup": args.warmup,
                               "device": str(device), "threads": torch.get_num_threads(), "modes": {}}
    for mode in args.modes:
        ok, err, note = check_correct(build, mode, args.check_size, batch=4)
        entry: dict[str, Any] = {"correct": ok, "max_rel_error": err, "note": note}
        if ok:
            module, opt = private(build().to(device), mode, args.batch, sigma=1.0, clip=1.0)
            module.train()
            entry.update(interleaved(plain_step, lambda: dp_step(module, opt, mode, image, regions, labels),
                                     args.warmup, args.steps))
            verdict = "meets" if entry["ratio_cpu"] <= TARGET_RATIO else "misses"
            print(f"{mode:>9}: DP ÷ plain = {entry['ratio_cpu']:.2f} (CPU time), {entry['ratio_wall']:.2f} (wall); "
                  f"median {entry['dp_wall_s']:.2f} s vs {entry['plain_wall_s']:.2f} s per step; "
                  f"{verdict} the ≤ {TARGET_RATIO} target; {note} (max rel. error {err:.1e})", flush=True)
        else:
            print(f"{mode:>9}: skipped — {note}", flush=True)
        results["modes"][mode] = entry
    ok_modes = {m: e for m, e in results["modes"].items() if e.get("correct")}
    fastest = min(ok_modes, key=lambda m: ok_modes[m]["ratio_cpu"]) if ok_modes else None
    results["fastest_correct_mode"] = fastest
    print(f"fastest correct mode: {fastest}" + (f" (DP ÷ plain = {ok_modes[fastest]['ratio_cpu']:.2f})" if fastest else ""))
    from fedsubtype.configio import atomic_write_text

    atomic_write_text(args.out, json.dumps(results, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
