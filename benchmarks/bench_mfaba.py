"""MFABA throughput and peak memory against captum's IntegratedGradients (50 steps) and Saliency.

Every case (model x method x steps) runs in a fresh subprocess, so that its peak memory is its own: the
host's peak resident set (``resource.getrusage(RUSAGE_SELF).ru_maxrss``) and, on CUDA,
``torch.cuda.max_memory_allocated``. "base" is the same reading after the model and the input batch were
built, before any attribution, so "peak - base" is the method's working memory.

The models are the paper's four (ResNet50, VGG19, DenseNet201, EfficientNetB0) from
``benchmarks/torch_models.py`` with random weights; ``--models tiny`` is a small CNN for a smoke test.
MFABA runs with ``early_stop=False`` so that it takes exactly ``--steps`` steps (with random weights the
boundary is reached after an arbitrary number of steps, which would make throughput meaningless); the
``mfaba_sharp_es`` method runs with early stopping and reports the mean path length (it also returns the
path, to read the lengths, so its memory is not the plain call's). ``refstyle`` mimics the cost structure
of the reference code (LMBTough/MFABA): stored path, an extra forward and a host sync per step.
IntegratedGradients gets ``internal_batch_size = batch`` (captum's default evaluates all 50 x batch
scaled images in one pass, which needs ~50x the memory), so every method sees the same batch per pass.

Usage::

    python benchmarks/bench_mfaba.py                          # all models, 224x224, batch 16, GPU if any
    python benchmarks/bench_mfaba.py --device cpu --batch 2 --size 112 --models resnet50,efficientnet_b0
    python benchmarks/bench_mfaba.py --models tiny --size 32 --batch 4     # smoke test
    python benchmarks/bench_mfaba.py --json out.json          # also write the rows as JSON
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
METHODS = ("mfaba_sharp", "mfaba_smooth", "mfaba_sharp_es", "refstyle", "ig", "saliency")


def tiny_cnn(num_classes: int = 10):
    from torch import nn

    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
                         nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(4),
                         nn.Flatten(), nn.Linear(32 * 16, num_classes))


def build_model(name: str, num_classes: int):
    if name == "tiny":
        return tiny_cnn(num_classes)
    sys.path.insert(0, HERE)
    try:
        from torch_models import MODELS
    except ImportError as e:  # pragma: no cover - the models file is part of the repository
        raise SystemExit(f"benchmarks/torch_models.py is needed for model {name!r}: {e}")
    return MODELS[name](num_classes=num_classes)


def reference_style_mfaba(model, x, target, steps: int, alpha: float = 0.001):
    """The reference code's cost structure, for comparison (sharp variant, gradients made correct).

    Like LMBTough/MFABA it keeps every path point and gradient until the end, runs one more forward pass
    per step for the early-stop test and brings its result to the host (a GPU sync per step). Unlike it,
    the gradient is fresh at every step, and no sample is removed (so that it takes ``steps`` steps, as
    ``early_stop=False`` does in ours, and the two do the same arithmetic).
    """
    import torch

    points, grads, xt = [x], [], x
    for _ in range(steps):
        xg = xt.detach().requires_grad_(True)
        f = torch.softmax(model(xg), 1).gather(1, target[:, None]).sum()
        (g,) = torch.autograd.grad(f, xg)
        norm = g.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        xt = torch.clamp(xt - 100 * alpha * g / norm, 0, 1).detach()
        points.append(xt)
        grads.append(g)
        with torch.no_grad():
            flipped = (model(xt).argmax(1) != target).cpu().numpy()  # the early-stop test, unused here
        del flipped
    p, g = torch.stack(points), torch.stack(grads)
    return -((p[1:] - p[:-1]) * g).sum(0)


def run_case(a) -> dict:
    """One measurement, in this (fresh) process."""
    import resource

    import torch

    torch.manual_seed(0)
    if a.threads:
        torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    model = build_model(a.model, a.num_classes).to(dev).eval()
    x = torch.rand(a.batch, 3, a.size, a.size, device=dev)
    with torch.no_grad():
        target = model(x).argmax(1)

    steps = a.steps
    if a.method.startswith("mfaba"):
        from deepshap_opt.torch.mfaba import MFABA

        variant = "smooth" if a.method == "mfaba_smooth" else "sharp"
        mf = MFABA(model, variant=variant, steps=steps, early_stop=a.method.endswith("_es"))

        def fn():
            return mf.attribute(x, target, return_path=a.method.endswith("_es"))
    elif a.method == "refstyle":
        def fn():
            return reference_style_mfaba(model, x, target, steps)
    elif a.method == "ig":
        from captum.attr import IntegratedGradients

        ig = IntegratedGradients(model)

        def fn():
            return ig.attribute(x, target=target, n_steps=steps, internal_batch_size=a.batch)
    elif a.method == "saliency":
        from captum.attr import Saliency

        sal = Saliency(model)
        steps = 1

        def fn():
            return sal.attribute(x, target=target, abs=False)
    else:
        raise SystemExit(f"unknown method {a.method!r}; one of {METHODS}")

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    sync()
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base_cuda = torch.cuda.memory_allocated() / 2**20
    out = fn()  # warm-up (cuDNN autotuning, allocator) -- also the memory reading's run
    sync()
    times = []
    for _ in range(a.repeats):
        t0 = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - t0)
    row = dict(model=a.model, method=a.method, steps=steps, batch=a.batch, size=a.size, device=str(dev),
               seconds=min(times), images_per_s=a.batch / min(times),
               base_rss_mb=base_rss, peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    if dev.type == "cuda":
        row.update(base_cuda_mb=base_cuda, peak_cuda_mb=torch.cuda.max_memory_allocated() / 2**20,
                   gpu=torch.cuda.get_device_name())
    if a.method.endswith("_es"):
        row["mean_path_length"] = float(out[1].lengths.float().mean())
    return row


def spawn(args, model: str, method: str, steps: int) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--model", model, "--method", method,
           "--steps", str(steps), "--batch", str(args.batch), "--size", str(args.size),
           "--device", args.device, "--repeats", str(args.repeats), "--num-classes", str(args.num_classes),
           "--threads", str(args.threads)]
    path = os.pathsep.join([os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, PYTHONPATH=path)
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if p.returncode != 0:
        last = (p.stderr.strip().splitlines() or ["?"])[-1]
        return dict(model=model, method=method, steps=steps, error=last)
    return json.loads(p.stdout.strip().splitlines()[-1])


def table(rows, cuda: bool) -> str:
    head = ["model", "method", "steps", "images/s", "peak RSS MB", "base RSS MB"]
    if cuda:
        head += ["peak CUDA MB", "base CUDA MB"]
    head += ["mean T"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['method']} | {r['steps']} | error: {r['error']} |")
            continue
        cells = [r["model"], r["method"], str(r["steps"]), f"{r['images_per_s']:.2f}",
                 f"{r['peak_rss_mb']:.0f}", f"{r['base_rss_mb']:.0f}"]
        if cuda:
            cells += [f"{r['peak_cuda_mb']:.0f}", f"{r['base_cuda_mb']:.0f}"]
        cells.append(f"{r['mean_path_length']:.1f}" if "mean_path_length" in r else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="resnet50,vgg19,densenet201,efficientnet_b0")
    p.add_argument("--methods", default="mfaba_sharp,mfaba_smooth,mfaba_sharp_es,refstyle,ig,saliency")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--memory-steps", default="10,100",
                   help="steps at which MFABA's peak memory is compared (must be flat); empty to skip")
    p.add_argument("--memory-methods", default="mfaba_sharp,refstyle",
                   help="methods whose memory is compared at --memory-steps")
    p.add_argument("--device", default=None)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--threads", type=int, default=0, help="torch threads per case (0: torch's default)")
    p.add_argument("--json", default=None)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        print(json.dumps(run_case(a)))
        return
    if a.device is None:
        import torch

        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    for model in a.models.split(","):
        for method in [m for m in a.methods.split(",") if m]:
            rows.append(spawn(a, model, method, a.steps))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        for method in [m for m in a.memory_methods.split(",") if m]:
            for s in [int(v) for v in a.memory_steps.split(",") if v]:
                rows.append(spawn(a, model, method, s))
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(f"\nbatch {a.batch}, {a.size}x{a.size}, device {a.device}, best of {a.repeats} runs\n")
    print(table(rows, a.device.startswith("cuda")))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
