"""The nightly fuzz target (``tox -e fuzz``): the property tests at 25x the CI counts, split over processes.

Why split: a process that explained many Keras models used to grow by ~7 MB an example (the TF backend's
``tf.custom_gradient`` registrations held every explainer; fixed, see ``docs/reliability.md``). Slices still
keep a failing slice's replay short and let ``--jobs`` processes share the work, so every property that goes
through Keras runs in slices of at most ``--slice`` examples, one pytest process per slice.

Reproducible: every process runs with ``DEEPSHAP_FUZZ_RANDOM=1`` (hypothesis' derandomization off) and its own
``--hypothesis-seed``, ``--seed + the slice's index`` (slices of different properties have disjoint indices),
so a run draws different examples in every slice and the same ones on every run with the same ``--seed``.
Each slice's command is printed and logged; rerunning it alone replays that slice. ``--hypothesis-show-statistics``
gives the number of examples each process ran, which the summary adds up per property.

    python -m tests.fuzz_run                          # the tox -e fuzz counts (DEEPSHAP_FUZZ_EXAMPLES=5000)
    python -m tests.fuzz_run --examples 400 --jobs 1  # smaller
    python -m tests.fuzz_run --only mlp_three          # one property
    python -m tests.fuzz_run --out DIR --resume       # go on with a run that was stopped (or --max-minutes)

Exit status 0 only if every process passed. Logs and ``summary.json`` go to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROPS = "tests/test_properties.py"
CROSS = "tests/test_properties_cross.py"
# (name, file, test function, fraction of DEEPSHAP_FUZZ_EXAMPLES it runs (random_nets.n_examples), goes
# through Keras: split into slices)
PROPERTIES = [
    ("mlp_three", CROSS, "test_mlp_three_backends_float32", 1, True),
    ("cnn_three", CROSS, "test_cnn_three_backends_float32", 1 / 4, True),
    ("mlp_keras64", CROSS, "test_mlp_torch_keras_float64", 1 / 10, True),
    ("mlp_onnx64", CROSS, "test_mlp_torch_onnx_float64", 1 / 10, False),
    ("torch_mlp64", PROPS, "test_completeness_float64", 1, False),
    ("torch_mlp32", PROPS, "test_completeness_float32", 1 / 4, False),
    ("torch_cnn64", PROPS, "test_cnn_completeness_float64", 1 / 4, False),
]
PROPERTY_TESTS = [p[2] for p in PROPERTIES]


def n_examples(examples: int, fraction: float, floor: int = 10) -> int:
    """The count of a property for ``DEEPSHAP_FUZZ_EXAMPLES=examples``: ``SETTINGS``' ``max_examples`` (fraction
    1), else ``random_nets.n_examples(fraction)``."""
    return examples if fraction == 1 else max(int(examples * fraction), floor)


def env_examples(count: int, fraction: float) -> int:
    """The smallest ``DEEPSHAP_FUZZ_EXAMPLES`` that gives ``count`` (≥ 10) examples to a property of ``fraction``."""
    e = max(int(count / fraction) - 2, 1)
    while n_examples(e, fraction, floor=0) < count:
        e += 1
    if n_examples(e, fraction) != count:
        raise ValueError(f"no DEEPSHAP_FUZZ_EXAMPLES gives {count} examples at fraction {fraction}")
    return e


@dataclass
class Job:
    name: str                      # property name, or "regressions"
    index: int                     # slice number within the property
    target: int                    # examples asked for
    env_examples: int
    seed: int
    args: list = field(default_factory=list)
    # results
    rc: int | None = None
    examples: int = 0              # examples run (passing + failing test cases), from hypothesis' statistics
    failing: int = 0
    invalid: int = 0               # cases hypothesis rejected while generating (not run)
    wall_s: float = 0.0
    cpu_s: float = 0.0
    maxrss_mb: float = 0.0
    log: str = ""
    failures: list = field(default_factory=list)

    def command(self):
        return [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--hypothesis-show-statistics",
                f"--hypothesis-seed={self.seed}", *self.args]

    def env(self):
        return {"DEEPSHAP_FUZZ_RANDOM": "1", "DEEPSHAP_FUZZ_EXAMPLES": str(self.env_examples),
                "TF_CPP_MIN_LOG_LEVEL": "3"}

    def shell(self):
        env = " ".join(f"{k}={v}" for k, v in self.env().items())
        return f"{env} {shlex.join(self.command()[1:]).replace('-m pytest', 'python -m pytest', 1)}"


def plan(examples: int, slice_size: int, seed: int, only: list[str] | None, regressions: bool) -> list[Job]:
    jobs = []
    for p, (name, path, test, fraction, keras) in enumerate(PROPERTIES):
        if only and not any(o in name or o in test for o in only):
            continue
        total = n_examples(examples, fraction)
        # a CNN example registers ~2x the gradient functions of an MLP one: half the slice
        size = (slice_size // 2 if "cnn" in name else slice_size) if keras else total
        k = math.ceil(total / size)
        counts = [total // k + (i < total % k) for i in range(k)]     # k near-equal slices
        for i, c in enumerate(counts):
            # n_examples floors at 10: a smaller slice runs 10
            c = max(c, 10)
            jobs.append(Job(name, i, c, env_examples(c, fraction), seed + 1000 * p + i,
                            [f"{path}::{test}"]))
    if regressions and not only:
        # the explicit regression tests of both modules (not the properties): once, at the CI settings
        desel = " and ".join(f"not {t}" for t in PROPERTY_TESTS)
        jobs.append(Job("regressions", 0, 0, 200, seed + 1000 * len(PROPERTIES), [PROPS, CROSS, "-k", desel]))
    # the minutes-long torch/ONNX properties and the regression tests first, then the Keras slices (the
    # three-backend MLP property, the float64 one, the CNN one: ~1 s of CPU an example): a run cut short has
    # covered the most properties
    keras = {name for name, *_, k in PROPERTIES if k}
    return sorted(jobs, key=lambda j: (j.name in keras, j.name == "cnn_three"))


STAT_RE = re.compile(r"(\d+) passing, (\d+) failing, and (\d+) invalid")


def parse(job: Job, text: str):
    """Examples run (generate phase; the shrink phase's cases and the explicit ``@example``s are not counted)
    and the failure reports."""
    for block in re.split(r"\n(?=tests/\S+::\S+:\n)", text.split("Hypothesis Statistics", 1)[-1]):
        gen = re.search(r"during generate phase.*?\n(?:.*\n)*?\s*- " + STAT_RE.pattern, block)
        if gen:
            job.examples += int(gen.group(1)) + int(gen.group(2))
            job.failing += int(gen.group(2))
            job.invalid += int(gen.group(3))
    if job.rc not in (0, 5):
        # pytest's short summary lines and each failure's falsifying example / reproduction blob
        job.failures = [ln for ln in text.splitlines()
                        if ln.startswith(("FAILED", "ERROR", "Falsifying example", "@reproduce_failure",
                                          "E   ", "XPASS"))
                        or re.match(r"\s+spec=", ln)][:40]


def result_path(out: str, job: Job) -> str:
    return os.path.join(out, f"{job.name}-{job.index:03d}.json")


def run(jobs: list[Job], n_parallel: int, out: str, nice: int, quiet: bool, resume: bool = False,
        max_minutes: float | None = None):
    pending, running = list(jobs), {}
    if resume:     # processes that finished in an earlier run into the same --out (same plan and seed)
        for job in jobs:
            if os.path.exists(result_path(out, job)):
                with open(result_path(out, job)) as f:
                    prev = json.load(f)
                if prev["seed"] == job.seed and prev["env_examples"] == job.env_examples:
                    vars(job).update(prev)
                    pending.remove(job)
        if not quiet:
            print(f"resuming: {len(jobs) - len(pending)} processes already done", flush=True)
    t_all = time.time()
    done = len(jobs) - len(pending)
    while pending or running:
        if max_minutes is not None and pending and time.time() - t_all > 60 * max_minutes:
            if not quiet:
                print(f"--max-minutes {max_minutes:g} reached: {len(pending)} processes not started "
                      f"(--resume goes on)", flush=True)
            pending = []
            if not running:
                break
        while pending and len(running) < n_parallel:
            job = pending.pop(0)
            job.log = os.path.join(out, f"{job.name}-{job.index:03d}.log")
            fh = open(job.log, "w")
            fh.write(f"$ {job.shell()}\n")
            fh.flush()
            pre = (lambda: os.nice(nice)) if nice else None
            proc = subprocess.Popen(job.command(), cwd=ROOT, env={**os.environ, **job.env()}, stdout=fh,
                                    stderr=subprocess.STDOUT, preexec_fn=pre)
            running[proc.pid] = (job, proc, fh, time.time())
        pid, status, ru = os.wait4(-1, 0)
        if pid not in running:
            continue
        job, proc, fh, t0 = running.pop(pid)
        proc.returncode = os.waitstatus_to_exitcode(status)
        fh.close()
        job.rc, job.wall_s = proc.returncode, time.time() - t0
        job.cpu_s, job.maxrss_mb = ru.ru_utime + ru.ru_stime, ru.ru_maxrss / 1024
        with open(job.log, errors="replace") as f:
            parse(job, f.read())
        with open(result_path(out, job), "w") as f:
            json.dump(asdict(job), f, indent=1)
        done += 1
        if not quiet:
            status = "pass" if job.rc == 0 else f"FAIL rc={job.rc}"
            print(f"[{done}/{len(jobs)} {time.time() - t_all:7.0f}s] {job.name}#{job.index} seed={job.seed}: "
                  f"{job.examples} examples ({job.invalid} invalid), {status}, {job.wall_s:.0f}s wall, "
                  f"{job.cpu_s:.0f}s CPU, {job.maxrss_mb:.0f} MB max RSS", flush=True)
            for ln in job.failures:
                print("    " + ln, flush=True)
    return time.time() - t_all


def summarize(jobs: list[Job], wall: float, out: str) -> bool:
    print(f"\n{'property':<14} {'examples':>8} {'asked':>7} {'procs':>5} {'failed':>6} {'CPU s':>7} "
          f"{'wall s':>7} {'max RSS MB':>10}")
    names = list(dict.fromkeys(j.name for j in jobs))
    total_ex = 0
    for name in names:
        js = [j for j in jobs if j.name == name]
        ex = sum(j.examples for j in js)
        total_ex += ex
        print(f"{name:<14} {ex:>8} {sum(j.target for j in js):>7} {len(js):>5} "
              f"{sum(j.rc not in (0, None) for j in js):>6} {sum(j.cpu_s for j in js):>7.0f} "
              f"{sum(j.wall_s for j in js):>7.0f} {max(j.maxrss_mb for j in js):>10.0f}")
    bad = [j for j in jobs if j.rc not in (0, None)]
    not_run = [j for j in jobs if j.rc is None]
    if not_run:
        print(f"\nnot run: {', '.join(f'{j.name}#{j.index}' for j in not_run)}")
    cpu = sum(j.cpu_s for j in jobs)
    print(f"\n{total_ex} examples in {len(jobs)} processes; {cpu:.0f} s CPU, {wall:.0f} s wall; "
          f"{len(bad)} failed process(es). Logs: {out}")
    for j in bad:
        print(f"\nFAILED {j.name}#{j.index} (rc={j.rc}), log {j.log}; rerun with:\n  {j.shell()}")
        for ln in j.failures:
            print("    " + ln)
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump({"wall_s": wall, "cpu_s": cpu, "examples": total_ex, "jobs": [asdict(j) for j in jobs]}, f,
                  indent=1)
    return not bad and not not_run


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--examples", type=int, default=int(os.environ.get("DEEPSHAP_FUZZ_EXAMPLES", "5000")),
                    help="DEEPSHAP_FUZZ_EXAMPLES of the whole run (the three-backend MLP property's count; the "
                    "others run their fraction of it, as in CI). Default: $DEEPSHAP_FUZZ_EXAMPLES or 5000")
    ap.add_argument("--slice", type=int, default=250,
                    help="most examples of a Keras MLP property in one process, half that for the CNN one")
    ap.add_argument("--jobs", type=int, default=2, help="processes at once")
    ap.add_argument("--seed", type=int, default=20261123, help="base hypothesis seed")
    ap.add_argument("--only", action="append", help="run only the properties whose name contains this")
    ap.add_argument("--no-regressions", action="store_true", help="skip the explicit regression tests")
    ap.add_argument("--nice", type=int, default=0, help="os.nice() increment of the pytest processes")
    ap.add_argument("--out", help="log directory (default: a new temporary one)")
    ap.add_argument("--resume", action="store_true",
                    help="skip the processes that already finished in --out (same plan and --seed)")
    ap.add_argument("--max-minutes", type=float,
                    help="start no process after this many minutes (the summary lists those not run)")
    ap.add_argument("--dry-run", action="store_true", help="print the commands only")
    ap.add_argument("-q", "--quiet", action="store_true")
    a = ap.parse_args(argv)
    jobs = plan(a.examples, a.slice, a.seed, a.only, not a.no_regressions)
    if a.dry_run:
        for j in jobs:
            print(f"{j.name}#{j.index} ({j.target} examples): {j.shell()}")
        return 0
    out = a.out or tempfile.mkdtemp(prefix="deepshap_fuzz_")
    os.makedirs(out, exist_ok=True)
    print(f"{len(jobs)} processes, {a.jobs} at a time, base seed {a.seed}, logs in {out}", flush=True)
    if a.resume and not a.out:
        ap.error("--resume needs --out")
    wall = run(jobs, a.jobs, out, a.nice, a.quiet, a.resume, a.max_minutes)
    return 0 if summarize(jobs, wall, out) else 1


if __name__ == "__main__":
    sys.exit(main())
