"""Time `make figures` as a new user meets it: a fresh clone, `.venv` built by make, every notebook re-executed.
Not a test.

    python3 bench/make_figures.py               # both runs below (about 18 minutes on 2 cores); writes
                                                # bench/results/make_figures.md
    python3 bench/make_figures.py --runs empty  # one of them (does not write the results file)

Two runs, one after the other, each in a new `git clone` of this repository's committed HEAD (so uncommitted
changes are not measured) in a temporary folder, with an empty uv download cache (`UV_CACHE_DIR`) and an empty
matplotlib cache (`MPLCONFIGDIR`), as on a machine that never built the project:

* ``empty``: the capture cache (`COVSVD_CACHE_DIR`) starts empty, so the moments the notebooks share and every
  notebook's own captures are computed;
* ``warm``: the capture cache the first run filled, so only what no cache holds is computed.

Each run times `make venv` (torch by pip, then the project by uv) and then `make figures` (which finds `.venv`
built), reads the runner's report (the shared capture, every notebook's seconds) and checks that the figure data
the run wrote (`figures/data/*.csv`) are byte for byte the committed ones. The load average before and after each
run is recorded: other work on the machine makes every number larger.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "make_figures.md"
RUNS = ("empty", "warm")
SHARED = re.compile(r"shared moments \((?P<state>[^)]*)\) in (?P<s>[\d.]+) s")
ROW = re.compile(r"^(?P<name>\d\d_\w+)\s+(?P<cells>\d+)\s+(?P<s>[\d.]+)\s+(?P<figs>\d+)$", re.M)
TOTAL = re.compile(r"total \(wall clock\)\s+(?P<s>[\d.]+)")


def timed(cmd: list[str], cwd: Path, env: dict[str, str], log: Path) -> float:
    """Run ``cmd``; its output goes to ``log``; raises with the log's tail if it fails. Returns wall seconds."""
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.run(cmd, cwd=cwd, env=env, stdout=fh, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}) in {cwd}:\n{log.read_text()[-3000:]}")
    return seconds


def one_run(mode: str, tmp: Path, capture_cache: Path) -> dict:
    clone = tmp / f"clone-{mode}"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    env = dict(os.environ, UV_CACHE_DIR=str(tmp / f"uv-{mode}"), MPLCONFIGDIR=str(tmp / f"mpl-{mode}"),
               COVSVD_CACHE_DIR=str(capture_cache))
    load_before = os.getloadavg()[0]
    venv = timed(["make", "venv"], clone, env, tmp / f"venv-{mode}.log")
    figures = timed(["make", "figures"], clone, env, tmp / f"figures-{mode}.log")
    report = (tmp / f"figures-{mode}.log").read_text()
    shared = SHARED.search(report)
    changed = subprocess.run(["git", "status", "--porcelain", "--", "figures/data"], cwd=clone, check=True,
                             capture_output=True, text=True).stdout.split("\n")
    return dict(mode=mode, venv=venv, figures=figures, shared=float(shared["s"]), shared_state=shared["state"],
                notebooks=float(TOTAL.search(report)["s"]) - float(shared["s"]),
                per_notebook={m["name"]: float(m["s"]) for m in ROW.finditer(report)},
                changed=[line[3:] for line in changed if line.strip()], load=(load_before, os.getloadavg()[0]),
                commit=subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=clone, check=True,
                                      capture_output=True, text=True).stdout.strip())


def minutes(s: float) -> str:
    return f"{int(s // 60)} min {s % 60:.1f} s"


def render(runs: list[dict]) -> str:
    lines = [
        "# `make figures` from a fresh clone",
        "",
        f"`python3 bench/make_figures.py` ({platform.node() or 'this machine'}: {os.cpu_count()} cores, "
        f"Python {platform.python_version()}; commit {runs[0]['commit']}; "
        f"{time.strftime('%Y-%m-%d', time.gmtime())}). Each run: a new clone, `make venv` with empty uv and "
        "matplotlib caches, then `make figures` (the notebooks two at a time, longest first, after the shared "
        "capture). Seconds are wall time.",
        "",
        "| capture cache | `make venv` | shared moments | notebooks | whole `make figures` (venv included) "
        "| figure data as committed | load average before / after |",
        "|---|---:|---:|---:|---:|---|---|",
    ]
    for r in runs:
        same = "yes, byte for byte" if not r["changed"] else f"no: {', '.join(r['changed'])}"
        lines.append(f"| {r['mode']} | {r['venv']:.1f} | {r['shared']:.1f} ({r['shared_state']}) | "
                     f"{r['notebooks']:.1f} | {r['venv'] + r['figures']:.1f} ({minutes(r['venv'] + r['figures'])}) "
                     f"| {same} | {r['load'][0]:.2f} / {r['load'][1]:.2f} |")
    names = sorted({n for r in runs for n in r["per_notebook"]})
    lines += ["", "Seconds per notebook (kernel start to finish; two run at once, so they add up to about twice "
              "the notebooks' wall time):", "",
              "| notebook | " + " | ".join(f"{r['mode']} cache" for r in runs) + " |",
              "|---|" + "---:|" * len(runs)]
    for n in names:
        lines.append(f"| {n} | " + " | ".join(f"{r['per_notebook'].get(n, float('nan')):.1f}" for r in runs) + " |")
    lines += ["", "Sums: " + "; ".join(f"{r['mode']} {sum(r['per_notebook'].values()):.1f} s over "
                                      f"{r['notebooks']:.1f} s of wall time" for r in runs), ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", nargs="+", choices=RUNS, default=list(RUNS),
                    help="which runs (default both: empty first, then warm on the cache it filled)")
    args = ap.parse_args(argv)
    if "warm" in args.runs and "empty" not in args.runs:
        sys.exit("--runs warm needs the cache an 'empty' run fills: run both (the default)")
    with tempfile.TemporaryDirectory(prefix="covsvd-make-figures-") as d:
        tmp = Path(d)
        cache = tmp / "capture-cache"
        runs = []
        for mode in RUNS:
            if mode in args.runs:
                runs.append(one_run(mode, tmp, cache))
                r = runs[-1]
                print(f"{mode} cache: venv {r['venv']:.1f} s, make figures {r['figures']:.1f} s "
                      f"(shared {r['shared']:.1f} s), whole {minutes(r['venv'] + r['figures'])}; "
                      f"figure data changed: {r['changed'] or 'none'}", flush=True)
    text = render(runs)
    print(text)
    if list(args.runs) == list(RUNS):
        RESULTS.write_text(text)
        print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
