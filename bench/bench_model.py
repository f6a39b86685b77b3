"""Training speed, peak memory and bytes per weight update: the full model against MONAI's 3D ResNet-18.

The full model is timed as `fedsubtype train` builds it (with its default read-out of the region
statistics) and without the read-out (`full_plain`, read_out none: what the statistics cost per step).

Each measurement runs in a fresh subprocess (so peak RSS belongs to that model alone); the two models
alternate within one run, so a busy shared CPU slows both alike. Reports medians over the timed steps
of all rounds, and the ratios. Run:  nice -n 10 python bench/bench_model.py [--out results/bench_model.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

REFERENCE = "monai_resnet18"
REFERENCE_CL = "monai_resnet18_channels_last"
OURS = "full"
PLAIN = "full_plain"


def _rss_mib() -> float:
    with open("/proc/self/statm", encoding="utf-8") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _build(name: str):
    import monai
    import torch

    from fedsubtype.model import ModelConfig, build_model
    if name in (REFERENCE, REFERENCE_CL):
        net = monai.networks.nets.resnet18(spatial_dims=3, n_input_channels=1, num_classes=4)
        return net.to(memory_format=torch.channels_last_3d) if name == REFERENCE_CL else net
    torch.manual_seed(0)
    if name == PLAIN:
        return build_model(ModelConfig(variant=OURS, read_out="none"), seed=0)
    return build_model(ModelConfig(variant=name), seed=0)


def worker(name: str, size: int, batch: int, warmup: int, steps: int, threads: int) -> dict:
    """Time forward + backward + AdamW step on one synthetic batch; peak RSS over the steps."""
    import torch

    if threads > 0:
        torch.set_num_threads(threads)

    from fedsubtype.model import count_parameters, state_bytes
    from fedsubtype.model.loss import JointLoss

    g = torch.Generator().manual_seed(0)
    image = torch.randn(batch, 1, size, size, size, generator=g)
    regions = torch.zeros(batch, size, size, size, dtype=torch.int64)
    grid = torch.stack(torch.meshgrid(*[torch.arange(size, dtype=torch.float32)] * 3, indexing="ij"))
    dist = ((grid - size / 2) ** 2).sum(0).sqrt()
    regions[:, dist < 0.35 * size] = 3
    regions[:, dist < 0.25 * size] = 2
    regions[:, dist < 0.2 * size] = 1
    labels = torch.cat([torch.randint(0, 2, (batch, 3), generator=g).float(), 100 * torch.rand(batch, 1, generator=g)], 1)
    present = torch.ones(batch, 4, dtype=torch.bool)
    model = _build(name).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss_fn = JointLoss()

    if name == REFERENCE_CL:
        image = image.contiguous(memory_format=torch.channels_last_3d)

    def outputs() -> dict:
        if name in (REFERENCE, REFERENCE_CL):
            raw = model(image)
            return {"logits": raw[:, :3], "ki67": torch.sigmoid(raw[:, 3])}
        return model(image, regions)

    baseline = _rss_mib()
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        loss, _ = loss_fn(outputs(), labels, present)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"model": name, "step_s": times, "rss_before_mib": baseline, "peak_rss_mib": peak,
            "peak_increase_mib": peak - baseline, "params": count_parameters(model),
            "bytes_per_update": state_bytes(model), "threads": torch.get_num_threads()}


def _run_worker(name: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--worker", name, "--size", str(args.size), "--batch", str(args.batch),
           "--warmup", str(args.warmup), "--steps", str(args.steps), "--threads", str(args.threads)]
    env = dict(os.environ)
    if not args.spin:
        # on a shared CPU, spin-waiting OpenMP threads thrash (10x slower here); both models get the same
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    done = subprocess.run(cmd, capture_output=True, text=True, encoding="utf-8", check=False, env=env)
    if done.returncode:
        raise SystemExit(f"bench worker {name} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _variant_sizes() -> dict:
    from fedsubtype.model import VARIANTS, ModelConfig, build_model, count_parameters, state_bytes
    sizes = {}
    for v in VARIANTS:
        m = build_model(ModelConfig(variant=v), seed=0)
        sizes[v] = {"params": count_parameters(m), "bytes_per_update": state_bytes(m)}
    return sizes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64, help="input edge S (default 64)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per subprocess")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per subprocess")
    parser.add_argument("--rounds", type=int, default=2, help="alternating subprocess pairs")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per model (0: torch's default)")
    parser.add_argument("--spin", action="store_true", help="keep OpenMP's default spin-waiting (see docs/model.md)")
    parser.add_argument("--channels-last-reference", action="store_true",
                        help="also time ResNet-18 in channels-last format (the layout trick the full model uses)")
    parser.add_argument("--out", help="also write the results as JSON here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.size, args.batch, args.warmup, args.steps, args.threads)))
        return 0

    names = [OURS, PLAIN, REFERENCE] + ([REFERENCE_CL] if args.channels_last_reference else [])
    runs: dict[str, list[dict]] = {name: [] for name in names}
    for r in range(args.rounds):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            res = _run_worker(name, args)
            runs[name].append(res)
            print(f"round {r + 1}/{args.rounds} {name}: steps {[round(t, 2) for t in res['step_s']]} s, "
                  f"peak RSS +{res['peak_increase_mib']:.0f} MiB", flush=True)
    summary = {}
    for name, rs in runs.items():
        med = statistics.median(t for res in rs for t in res["step_s"])
        summary[name] = {"median_step_s": med, "samples_per_s": args.batch / med,
                         "peak_increase_mib": max(x["peak_increase_mib"] for x in rs),
                         "peak_rss_mib": max(x["peak_rss_mib"] for x in rs),
                         "params": rs[0]["params"], "bytes_per_update": rs[0]["bytes_per_update"]}
    ours, ref = summary[OURS], summary[REFERENCE]
    ratios = {"throughput_ratio": ours["samples_per_s"] / ref["samples_per_s"],
              "bytes_ratio": ours["bytes_per_update"] / ref["bytes_per_update"],
              "read_out_step_ratio": ours["median_step_s"] / summary[PLAIN]["median_step_s"]}
    if REFERENCE_CL in summary:
        ratios["throughput_ratio_vs_channels_last"] = ours["samples_per_s"] / summary[REFERENCE_CL]["samples_per_s"]
    result = {"setting": {"size": args.size, "batch": args.batch, "warmup": args.warmup, "steps": args.steps,
                          "rounds": args.rounds, "threads": runs[OURS][0]["threads"],
                          "omp_wait_policy": "default (spin)" if args.spin else "PASSIVE",
                          "load_avg_1min_end": os.getloadavg()[0]},
              "models": summary, "ratios": ratios, "variant_sizes": _variant_sizes()}
    print(f"\ninput {args.size}^3, batch {args.batch}, forward+backward+AdamW, medians of "
          f"{args.rounds * args.steps} steps")
    print(f"{'model':<30}{'params':>12}{'MiB/update':>12}{'samples/s':>11}{'peak +MiB':>11}{'peak RSS MiB':>14}")
    for name, s in summary.items():
        print(f"{name:<30}{s['params']:>12,}{s['bytes_per_update'] / 2**20:>12.2f}{s['samples_per_s']:>11.2f}"
              f"{s['peak_increase_mib']:>11.0f}{s['peak_rss_mib']:>14.0f}")
    print(f"throughput ratio (full / resnet18): {ratios['throughput_ratio']:.1f}x   "
          f"bytes ratio: 1/{1 / ratios['bytes_ratio']:.0f}   "
          f"step time with / without the read-out: {ratios['read_out_step_ratio']:.2f}x")
    if REFERENCE_CL in summary:
        print(f"throughput ratio (full / channels-last resnet18): {ratios['throughput_ratio_vs_channels_last']:.1f}x")
    print("variant sizes: " + ", ".join(f"{k} {v['params']:,}" for k, v in result["variant_sizes"].items()))
    if args.out:
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        from fedsubtype.configio import atomic_write_text
        atomic_write_text(args.out, json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
