"""Training-time overhead of AttributionLogger on a small CNN.

The same training run (digits CNN with BatchNorm and dropout, Adam, batch 64, sklearn's bundled digits,
nothing downloaded) is timed without the logger and with it attached to the optimizer
(``every_n_steps=100`` by default), alternating the two for ``--repeats`` rounds. Reported per method:

* ``wall overhead`` — (time with the logger − time without) / time without;
* ``in-hook share`` — the time spent inside the logs (sum of the records' ``seconds``) / time without:
  less sensitive to a noisy, shared machine than the wall-clock difference;
* the number of logs and the mean seconds per log (DeepSHAP: the reference cache is rebuilt at each log,
  since the weights changed; the probe is then explained for one target class per row).

It also checks that the two runs end with bit-identical parameters.

    python benchmarks/bench_logger.py                                   # 500 steps, every 100, DeepSHAP
    python benchmarks/bench_logger.py --steps 300 --methods deepshap,mfaba --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def small_cnn():
    from torch import nn

    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 2 * 2, 64), nn.ReLU(), nn.Dropout(0.2), nn.Linear(64, 10))


def load_digits_tensors():
    import torch
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images / 16.0, dtype=torch.float32).unsqueeze(1)
    return x, torch.tensor(d.target)


def run(x, y, steps, batch, logger_args=None):
    """Train ``steps`` optimizer steps; returns (seconds, model, logger or None)."""
    import torch
    from torch import nn

    from deepshap_opt.torch import AttributionLogger

    torch.manual_seed(0)
    model = small_cnn()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    logger = None
    if logger_args is not None:
        logger = AttributionLogger(model, x[:logger_args["background"]], x[-logger_args["probe"]:],
                                   every_n_steps=logger_args["every"], method=logger_args["method"],
                                   targets=y[-logger_args["probe"]:],
                                   method_kwargs={"steps": 20} if logger_args["method"] == "mfaba" else None)
        logger.attach(opt)
    torch.manual_seed(1)
    order = torch.cat([torch.randperm(len(x)) for _ in range(steps * batch // len(x) + 1)])
    t0 = time.perf_counter()
    for i in range(steps):
        idx = order[i * batch:(i + 1) * batch]
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    seconds = time.perf_counter() - t0
    if logger is not None:
        logger.close()
    return seconds, model, logger


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--every", type=int, default=100)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--background", type=int, default=32)
    ap.add_argument("--probe", type=int, default=8)
    ap.add_argument("--methods", default="deepshap", help="comma-separated: deepshap,mfaba")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared machine)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    x, y = load_digits_tensors()
    run(x, y, 5, args.batch)                                  # warm-up (allocator, kernels)
    rows = []
    for method in args.methods.split(","):
        base, hooked, in_hook, logs = [], [], [], 0
        identical = True
        for _ in range(args.repeats):
            t_plain, m_plain, _ = run(x, y, args.steps, args.batch)
            t_log, m_log, logger = run(x, y, args.steps, args.batch, dict(
                every=args.every, method=method, background=args.background, probe=args.probe))
            base.append(t_plain)
            hooked.append(t_log)
            in_hook.append(sum(r.seconds for r in logger.records))
            logs = len(logger.records)
            identical &= all(torch.equal(a, b) for a, b in zip(m_plain.state_dict().values(),
                                                                m_log.state_dict().values()))
        b, h, k = min(base), min(hooked), min(in_hook)
        rows.append(dict(method=method, steps=args.steps, every=args.every, batch=args.batch,
                         background=args.background, probe=args.probe, logs=logs, train_s=b, with_logger_s=h,
                         wall_overhead_pct=100 * (h - b) / b, in_hook_s=k, in_hook_pct=100 * k / b,
                         seconds_per_log=k / max(logs, 1), bit_identical=identical))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{args.threads} threads, load average {load:.1f} at the end")
    print(f"{'method':<9} {'steps':>5} {'every':>5} {'logs':>4} {'train s':>8} {'+logger s':>9} "
          f"{'wall ovh %':>10} {'in-hook %':>9} {'s/log':>6} {'bit-identical':>13}")
    for r in rows:
        print(f"{r['method']:<9} {r['steps']:>5} {r['every']:>5} {r['logs']:>4} {r['train_s']:>8.2f} "
              f"{r['with_logger_s']:>9.2f} {r['wall_overhead_pct']:>10.1f} {r['in_hook_pct']:>9.1f} "
              f"{r['seconds_per_log']:>6.3f} {r['bit_identical']!s:>13}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(rows=rows, load_average=load, argv=sys.argv[1:]), fh, indent=1)
    return rows


if __name__ == "__main__":
    main()
