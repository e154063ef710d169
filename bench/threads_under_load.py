#!/usr/bin/env python3
"""Threads that share the machine: four small jobs, each timed quiet, beside a CPU-bound
process, and as two processes at once, against the same job on one thread.

    python3 bench/threads_under_load.py [--sae build/release/sae] [--repeats 3] [--only 1,3]

Jobs (all on the repository's tiny test model and built-in data, so the benchmark needs no
download): the tiny release (2 layers x 2 variants, as tests/test_release.cpp), the default
job's training (`sae demo`, fewer tokens), a tiny Gemma-2 forward (`sae activations`), and
`sae eval` of a demo SAE on 262144 tokens. Modes:
  quiet      the machine otherwise idle;
  busy       beside one CPU-bound process that this script starts and stops;
  2 at once  two copies started together (the wall time until both end).
Each mode runs with --threads 1 and with sae.cpp's default thread count; OMP_* variables are
removed from the children's environment so the defaults are what a user gets. Times are the
median of --repeats runs. Standard library only.
"""

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = os.path.join(ROOT, "tests/goldens/gemma2/gqa_window/model")


def clean_env():
    return {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "GOMP_"))}


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return " ".join(x for x in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile")
                                    if x in have)
    except OSError:
        pass
    return "?"


def prepare(sae, work):
    """The inputs: a .jsonl corpus, a prompt file, a demo SAE and 262144 tokens of its data."""
    with open(os.path.join(ROOT, "tests/data/tiny_corpus.txt")) as f:
        lines = [l for l in f.read().split("\n") if l]
    with open(os.path.join(work, "pile-00.jsonl"), "w") as f:
        for i in range(400):
            f.write(json.dumps({"text": f"{lines[i % len(lines)]} {i}"}) + "\n")
    with open(os.path.join(work, "prompts.txt"), "w") as f:
        for i in range(40 * len(lines)):
            f.write(f"{lines[i % len(lines)]} {i}\n")
    subprocess.run([sae, "--threads", "1", "demo", "-o", os.path.join(work, "demo"), "--tokens",
                    "100000"], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   env=clean_env())
    # heldout.npy is [16384, 64] f32: repeat its rows 16 times into one [262144, 64] file.
    with open(os.path.join(work, "demo/heldout.npy"), "rb") as f:
        raw = f.read()
    header_len = 10 + int.from_bytes(raw[8:10], "little")
    body = raw[header_len:]
    header = "{'descr': '<f4', 'fortran_order': False, 'shape': (262144, 64), }"
    header += " " * (64 - (10 + len(header) + 1) % 64) + "\n"
    with open(os.path.join(work, "eval.npy"), "wb") as f:
        f.write(b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode())
        for _ in range(16):
            f.write(body)


def jobs(work):
    release = ["release", "--model", MODEL, "--dataset", os.path.join(work, "pile-*.jsonl"),
               "--layers", "0,2", "--tokens", "20000", "--model-name", "tiny-gemma2",
               "--context-size", "16", "--prompts-per-forward", "4", "--n-batches-in-buffer", "4",
               "--holdout-every", "10", "--heldout-tokens", "512", "--ce-windows", "2",
               "--log-every", "50", "--set", "sae.d_sae=64", "--set", "sae.k=4", "--set",
               "sae.matryoshka_widths=[16,64]", "--set", "training.batch_size=64", "--set",
               "training.checkpoint_every_steps=50", "--set", "optimizer.lr=3e-3"]
    return [
        ("tiny release (2 layers x 2 variants, 20k tokens)", lambda out: release + ["-o", out]),
        ("default job's training (sae demo, 1M tokens)",
         lambda out: ["demo", "-o", out, "--tokens", "1000000"]),
        ("tiny Gemma-2 forward (sae activations, 3 layers)",
         lambda out: ["activations", "--model", MODEL, "--file",
                      os.path.join(work, "prompts.txt"), "--layers", "0-2", "-o",
                      os.path.join(out, "acts.safetensors")]),
        ("sae eval (d_sae 128, 262144 tokens)",
         lambda out: ["eval", os.path.join(work, "demo/batchtopk/sae"),
                      os.path.join(work, "eval.npy")]),
    ]


def run_copies(sae, argv_of, threads, copies, work):
    """Starts `copies` processes at once; the wall time until the last one ends."""
    outs = [tempfile.mkdtemp(dir=work) for _ in range(copies)]
    pre = ["--threads", str(threads)] if threads else []
    t0 = time.perf_counter()
    procs = [subprocess.Popen([sae] + pre + argv_of(o), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, env=clean_env()) for o in outs]
    for p in procs:
        _, err = p.communicate()
        if p.returncode != 0:
            sys.exit(f"job failed ({p.returncode}): {err.decode()[-2000:]}")
    dt = time.perf_counter() - t0
    for o in outs:
        shutil.rmtree(o, ignore_errors=True)
    return dt


def median_time(sae, argv_of, threads, copies, repeats, work, busy):
    times = []
    for _ in range(repeats):
        hog = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
        try:
            if hog:
                time.sleep(0.2)  # let it take its core
            times.append(run_copies(sae, argv_of, threads, copies, work))
        finally:
            if hog:
                hog.kill()
                hog.wait()
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sae", default=os.path.join(ROOT, "build/release/sae"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--only", default="", help="jobs to run by number, e.g. 1,3 (default: all)")
    args = ap.parse_args()
    only = {int(x) for x in args.only.split(",") if x}

    default_line = subprocess.run([args.sae, "demo", "--help"], capture_output=True,
                                  env=clean_env())  # proves the binary runs
    if default_line.returncode != 0:
        sys.exit(f"{args.sae} does not run")
    print(f"command: {' '.join([sys.executable] + sys.argv)}")
    print(f"machine: {cpu_model()}, {os.cpu_count()} CPUs ({len(os.sched_getaffinity(0))} in "
          f"the affinity mask), flags: {cpu_flags()}")
    with tempfile.TemporaryDirectory() as work:
        prepare(args.sae, work)
        probe = subprocess.run([args.sae, "demo", "-o", os.path.join(work, "probe"), "--tokens",
                                "1000"], capture_output=True, text=True, env=clean_env())
        threads_line = next((l for l in probe.stderr.splitlines() if l.startswith("threads:")),
                            "threads: ?")
        print(f"default {threads_line} (OMP_* and GOMP_* removed from the environment)")
        print(f"median of {args.repeats} runs; ratio = default threads / 1 thread, in the same "
              f"mode\n")
        print("| job | mode | 1 thread (s) | default threads (s) | ratio |")
        print("|---|---|---|---|---|")
        for number, (name, argv_of) in enumerate(jobs(work), 1):
            if only and number not in only:
                continue
            one_quiet = median_time(args.sae, argv_of, 1, 1, args.repeats, work, False)
            many_quiet = median_time(args.sae, argv_of, 0, 1, args.repeats, work, False)
            one_busy = median_time(args.sae, argv_of, 1, 1, args.repeats, work, True)
            many_busy = median_time(args.sae, argv_of, 0, 1, args.repeats, work, True)
            two_one = median_time(args.sae, argv_of, 1, 2, args.repeats, work, False)
            two_many = median_time(args.sae, argv_of, 0, 2, args.repeats, work, False)
            print(f"| {name} | quiet | {one_quiet:.2f} | {many_quiet:.2f} | "
                  f"{many_quiet / one_quiet:.2f} |")
            print(f"| | beside a busy process | {one_busy:.2f} | {many_busy:.2f} | "
                  f"{many_busy / one_busy:.2f} |")
            print(f"| | 2 at once | {two_one:.2f} | {two_many:.2f} | "
                  f"{two_many / two_one:.2f} |", flush=True)


if __name__ == "__main__":
    main()
