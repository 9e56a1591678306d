"""The notebook runner behind ``make figures`` / ``python -m covsvd figures``: execute notebooks headless.

Each notebook ``notebooks/NN_topic.ipynb`` runs top to bottom in a fresh ``python3`` kernel (the .venv's,
when run from it), with the working directory ``notebooks/``, no cell timing recorded, and a time budget
per notebook.

* Full mode: the executed notebook is written back in place (outputs kept, so GitHub shows them) and
  figures go to ``figures/`` (or ``$COVSVD_FIGURES_DIR``); afterwards any ``NN_*`` figure the notebook
  used to write but did not write this time is removed, so ``figures/`` matches the notebooks.
* Quick mode (``COVSVD_QUICK=1`` in the kernel): the notebooks in ``notebooks/`` are left untouched;
  executed copies and figures go to a temporary directory.

A failing cell stops the run with :class:`NotebookError`, whose message names the notebook, the cell
(index and source) and the traceback.

With ``jobs > 1`` the moments every notebook reads (the default model's full capture of the train and held-out
splits, :func:`prime_moments`) are captured first with every thread, then the notebooks run ``jobs`` at a time,
longest first: each full run records its wall time in the notebook's metadata, rounded, and the next run starts
from it (longest-processing-time order, so no long notebook starts last). A notebook's time depends on the capture
cache, so there are two records: ``covsvd.seconds`` for runs that found the shared moments cached and
``covsvd.seconds_cold`` for runs that had to capture them (a machine that never ran the notebooks, where their own
captures are not cached either); a run is ordered by the record of its own case.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from .plotting import FIGURES_DIR_ENV, NAME_PATTERN, QUICK_ENV, project_root

KERNEL_NAME = "python3"
TIMEOUT_FULL_S = 600  # per notebook
TIMEOUT_QUICK_S = 300
NOTEBOOK_GLOB = "[0-9][0-9]_*.ipynb"
#: the calibration tokens of the shared captures per mode (the notebooks' ``cp.by_mode(full=None, quick=4096)``)
SHARED_TOKENS = {"full": None, "quick": 4096}
SECONDS_KEY = "seconds"  # nb.metadata["covsvd"][SECONDS_KEY]: the last full run's wall time, shared moments cached
COLD_SECONDS_KEY = "seconds_cold"  # ... and of the last full run that captured the shared moments
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class NotebookError(RuntimeError):
    """A notebook failed: the message names the notebook, the cell and the traceback."""


@dataclass(frozen=True)
class NotebookRun:
    name: str  # the notebook's stem, e.g. "05_ablations"
    seconds: float  # wall time of run_notebook: kernel start and shutdown included
    cells: int  # code cells executed
    executed: Path  # where the executed notebook was written
    figures: tuple[str, ...]  # figure names it wrote (NN_*.png)


def notebooks_dir() -> Path:
    return project_root() / "notebooks"


def find_notebooks(only: Sequence[str] | None = None, directory: str | os.PathLike | None = None) -> list[Path]:
    """The notebooks ``NN_*.ipynb`` in order; ``only`` keeps those whose name starts with any entry
    (``"03"``, ``"03_oblique_p"``). Raises when nothing is found or an ``only`` entry matches nothing."""
    base = Path(directory) if directory is not None else notebooks_dir()
    found = sorted(base.glob(NOTEBOOK_GLOB))
    if not found:
        raise NotebookError(f"no notebooks matching {NOTEBOOK_GLOB} in {base}")
    if not only:
        return found
    picked = []
    for sel in only:
        sel = Path(sel).stem  # accept "05", "05_ablations" or "notebooks/05_ablations.ipynb"
        hits = [p for p in found if p.stem.startswith(sel)]
        if not hits:
            raise NotebookError(f"--only {sel!r} matches none of {[p.stem for p in found]}")
        picked += [p for p in hits if p not in picked]
    return sorted(picked)


def kernel_env(quick: bool, figures_dir: Path, threads: int | None = None) -> dict[str, str]:
    """The environment of the notebook kernel: mode, figure directory, offline, inline plots, and (``threads``)
    how many threads torch / OpenMP / MKL may use."""
    env = dict(os.environ)
    if threads is not None:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env.update(
        {
            QUICK_ENV: "1" if quick else "0",
            FIGURES_DIR_ENV: str(figures_dir),
            # make exports MPLBACKEND=Agg; the kernel must use the inline backend or no plot is kept.
            "MPLBACKEND": "module://matplotlib_inline.backend_inline",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "PYTHONHASHSEED": "0",
            "PYDEVD_DISABLE_FILE_VALIDATION": "1",
            # transformers imports tqdm.auto, which warns in a kernel without ipywidgets; notebooks run
            # with progress=False, so the warning is noise in every saved notebook.
            "PYTHONWARNINGS": "ignore::Warning:tqdm.auto",
        }
    )
    # MKL/OpenMP threads busy-wait between parallel regions, which makes small decompositions many times
    # slower on a shared or loaded machine. Passive waiting makes many small ops slower instead (each wakes the
    # sleeping threads), which the notebooks' short captures can afford; the benchmarks run without it.
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return env


def _figure_files(figures_dir: Path, prefix: str) -> dict[Path, int]:
    files = [*figures_dir.glob(f"{prefix}_*.png"), *figures_dir.glob(f"{prefix}_*.svg"),
             *(figures_dir / "data").glob(f"{prefix}_*.csv")]
    return {p: p.stat().st_mtime_ns for p in files if NAME_PATTERN.fullmatch(p.stem)}


def _cell_failure(name: str, index: int | None, cell, err: Exception) -> NotebookError:
    source = "".join(cell.source) if cell is not None else "(unknown cell)"
    tb = _ANSI.sub("", getattr(err, "traceback", "") or str(err))
    count = getattr(cell, "execution_count", None) if cell is not None else None
    where = (f"cell {index}" + (f" (In [{count}])" if count else "")) if index is not None else "a cell"
    head = f"{getattr(err, 'ename', type(err).__name__)}: {getattr(err, 'evalue', '')}".rstrip(": ")
    return NotebookError(
        f"notebook {name} failed at {where} ({head})\n"
        f"--- cell {index} source ---\n{source}\n--- traceback ---\n{tb.strip()}"
    )


def run_notebook(
    path: str | os.PathLike,
    *,
    quick: bool,
    figures_dir: str | os.PathLike,
    timeout: float | None = None,
    write_to: str | os.PathLike | None = None,
    on_cell: Callable[[int, int], None] | None = None,
    threads: int | None = None,
    cold: bool = False,
) -> NotebookRun:
    """Execute one notebook in a fresh kernel; raise :class:`NotebookError` on any cell error or timeout.

    Args:
        quick: sets ``COVSVD_QUICK`` in the kernel.
        figures_dir: sets ``COVSVD_FIGURES_DIR`` in the kernel (where ``save_figure`` writes).
        timeout: seconds for the whole notebook (default 600 full, 300 quick).
        write_to: where to write the executed notebook; ``None`` writes it back over ``path``.
        on_cell: called as ``on_cell(code_cell_number, n_code_cells)`` before each code cell (progress).
        threads: the kernel's thread count (``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS``); ``None``: inherited.
        cold: a full run records its wall time under ``covsvd.seconds_cold`` (the shared moments were captured
            for this run) instead of ``covsvd.seconds``.
    """
    t0 = time.monotonic()
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError

    path = Path(path).resolve()
    name = path.stem
    figures_dir = Path(figures_dir).resolve()
    (figures_dir / "data").mkdir(parents=True, exist_ok=True)
    budget = float(timeout if timeout is not None else (TIMEOUT_QUICK_S if quick else TIMEOUT_FULL_S))
    nb = nbformat.read(path, as_version=4)
    code_cells = [i for i, c in enumerate(nb.cells) if c.cell_type == "code"]
    prefix = name[:2]
    before = _figure_files(figures_dir, prefix)

    deadline = t0 + budget
    current: dict = {"index": None, "cell": None}

    def on_cell_start(cell, cell_index, **_):
        current.update(index=cell_index, cell=cell)
        if on_cell is not None and cell.cell_type == "code":
            on_cell(code_cells.index(cell_index) + 1, len(code_cells))

    client = NotebookClient(
        nb,
        kernel_name=KERNEL_NAME,
        record_timing=False,
        allow_errors=False,
        timeout_func=lambda cell: max(1, int(deadline - time.monotonic())),
        startup_timeout=180,
        on_cell_start=on_cell_start,
        resources={"metadata": {"path": str(path.parent)}},
    )
    # The kernel's own stderr (ipykernel's transport warning, C-level crashes) goes to a log that is
    # shown only when something fails; cell output (stdout/stderr of the code) stays in the notebook.
    with tempfile.TemporaryFile(mode="w+b", prefix=f"covsvd-kernel-{name}-") as log:
        try:
            client.execute(env=kernel_env(quick, figures_dir, threads), stderr=log)
        except CellExecutionError as e:
            raise _cell_failure(name, current["index"], current["cell"], e) from None
        except (CellTimeoutError, TimeoutError) as e:
            raise NotebookError(
                f"notebook {name} ran past its {budget:.0f} s budget at cell {current['index']}:\n"
                f"{''.join(current['cell'].source) if current['cell'] is not None else ''}\n({e})"
            ) from None
        except DeadKernelError as e:
            log.seek(0)
            tail = log.read().decode(errors="replace")[-4000:]
            raise NotebookError(
                f"notebook {name}: the kernel died at cell {current['index']} ({e})\n--- kernel stderr ---\n{tail}"
            ) from None
    out = Path(write_to) if write_to is not None else path
    out.parent.mkdir(parents=True, exist_ok=True)
    nb.metadata.get("language_info", {}).pop("version", None)  # the machine's Python: churn in git, no content
    seconds = time.monotonic() - t0
    if not quick:
        _record_seconds(nb, seconds, COLD_SECONDS_KEY if cold else SECONDS_KEY)
    nbformat.write(nb, out)
    after = _figure_files(figures_dir, prefix)
    for stale in [p for p, m in before.items() if after.get(p) == m]:  # not rewritten this run
        stale.unlink()
    written = tuple(sorted({p.stem for p in after if p.suffix == ".png" and after[p] != before.get(p)}))
    return NotebookRun(name, seconds, len(code_cells), out, written)


def _record_seconds(nb, seconds: float, key: str = SECONDS_KEY) -> None:
    """Store the wall time in ``nb.metadata["covsvd"][key]`` (to 10 s), only when it moved by more than 20%
    (the schedule needs the order of magnitude; a new value on every run would be churn in git)."""
    meta = nb.metadata.setdefault("covsvd", {})
    old = meta.get(key)
    if not isinstance(old, (int, float)) or abs(seconds - old) > 0.2 * old:
        meta[key] = int(round(seconds, -1)) or 10


def recorded_seconds(path: str | os.PathLike, cold: bool = False) -> float | None:
    """The wall time the last full run recorded in the notebook (``None`` if it has none); ``cold``: the record
    of runs that captured the shared moments, or the other one when there is none."""
    import json

    with open(path, encoding="utf-8") as f:
        meta = json.load(f).get("metadata", {}).get("covsvd", {})
    for key in (COLD_SECONDS_KEY, SECONDS_KEY) if cold else (SECONDS_KEY,):
        value = meta.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


def longest_first(paths: Sequence[Path], cold: bool = False) -> list[Path]:
    """``paths`` by recorded wall time (:func:`recorded_seconds`), longest first; notebooks without one first of
    all (their cost is unknown); ties in file order."""
    def key(item):
        k, path = item
        seconds = recorded_seconds(path, cold)
        return (-(float("inf") if seconds is None else seconds), k)

    return [p for _, p in sorted(enumerate(paths), key=key)]


def prime_moments(quick: bool, stream: TextIO = sys.stderr) -> tuple[float, bool]:
    """Capture (or find in the cache) the moments every notebook reads: the default model's full second moments
    of the train and held-out splits (:func:`covsvd.cached_capture`, the calls the notebooks make, with
    :data:`SHARED_TOKENS`), using every thread. Returns the seconds it took and whether it captured any."""
    import covsvd
    from covsvd.capture import CaptureOptions, cache_path

    t0 = time.monotonic()
    model, tok = covsvd.load_default_model()
    tokens = SHARED_TOKENS["quick" if quick else "full"]
    states, captured = [], False
    for split in ("train", "heldout"):
        batches = covsvd.calibration_batches(tok, split=split, max_tokens=tokens)
        hit = cache_path(model, batches, None, CaptureOptions.make(kind="full")).is_file()
        if not hit:  # a cached file is left for the notebooks to read: loading it here would be wasted I/O
            covsvd.cached_capture(model, batches, kind="full", progress=stream.isatty())
            captured = True
        states.append(f"{split} {'cached' if hit else 'captured'}")
    seconds = time.monotonic() - t0
    stream.write(f"shared moments ({', '.join(states)}) in {seconds:.1f} s\n")
    stream.flush()
    return seconds, captured


class _Progress:
    """One status line: which notebook, its cell, its elapsed time and the total (redrawn each second on a
    terminal; plain lines otherwise, e.g. under make's log or CI)."""

    def __init__(self, n: int, stream: TextIO):
        self.n, self.stream = n, stream
        self.tty = stream.isatty()
        self.t_all = time.monotonic()
        self.k, self.name, self.cell, self.cells, self.t_nb = 0, "", 0, 0, self.t_all
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _line(self) -> str:
        now = time.monotonic()
        where = f"cell {self.cell:>2}/{self.cells:<2}" if self.cells else "starting kernel"
        return (f"[{self.k}/{self.n}] {self.name:<22} {where:<15} "
                f"{now - self.t_nb:6.1f} s   total {now - self.t_all:6.1f} s")

    def _tick(self) -> None:
        while not self._stop.wait(1.0):
            self.stream.write("\r" + self._line())
            self.stream.flush()

    def start(self, k: int, name: str) -> None:
        self.k, self.name, self.cell, self.cells, self.t_nb = k, name, 0, 0, time.monotonic()
        if self.tty:
            self._stop.clear()
            self._thread = threading.Thread(target=self._tick, daemon=True)
            self._thread.start()
        else:
            self.stream.write(f"[{k}/{self.n}] {name} ... (total so far {time.monotonic() - self.t_all:.1f} s)\n")
            self.stream.flush()

    def on_cell(self, cell: int, cells: int) -> None:
        self.cell, self.cells = cell, cells

    def stop(self, message: str) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            self.stream.write("\r" + " " * len(self._line()) + "\r")
        self.stream.write(message + "\n")
        self.stream.flush()


def run_figures(
    only: Sequence[str] | None = None,
    quick: bool = False,
    timeout: float | None = None,
    stream: TextIO = sys.stderr,
    jobs: int = 1,
) -> list[NotebookRun]:
    """Execute the notebooks (all, or ``only``), print progress and per-notebook times; return the runs.

    Figures go to ``$COVSVD_FIGURES_DIR`` if set, else ``figures/`` (full) or a new temporary directory
    (quick). ``jobs > 1``: :func:`prime_moments` first, then the notebooks ``jobs`` at a time, longest first
    (:func:`longest_first`), each kernel with ``cpu_count // jobs`` threads; the per-notebook report stays in
    notebook order. Raises :class:`NotebookError` for the first failing notebook (with ``jobs > 1``, after the
    running ones finish).
    """
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs={jobs!r} must be a positive int")
    paths = find_notebooks(only)
    override = os.environ.get(FIGURES_DIR_ENV, "").strip()
    if quick:
        tmp = Path(tempfile.mkdtemp(prefix="covsvd-figures-quick-"))
        figures_dir = Path(override) if override else tmp / "figures"
        executed_dir: Path | None = tmp / "notebooks"
    else:
        figures_dir = Path(override) if override else project_root() / "figures"
        executed_dir = None
    mode = "quick" if quick else "full"
    stream.write(f"covsvd figures ({mode} mode, {jobs} at a time): {len(paths)} notebook(s) -> figures in "
                 f"{figures_dir}\n")
    progress = _Progress(len(paths), stream)

    def options(path: Path) -> dict:
        return dict(quick=quick, figures_dir=figures_dir, timeout=timeout,
                    write_to=None if executed_dir is None else executed_dir / path.name)

    if jobs == 1 or len(paths) < 2:
        runs = [_run_one(k, path, progress, options(path)) for k, path in enumerate(paths, 1)]
    else:
        _, cold = prime_moments(quick, stream)
        runs = _run_parallel(paths, jobs, progress, options, stream, cold)
    total = time.monotonic() - progress.t_all
    stream.write(f"{'notebook':<24}{'cells':>6}{'seconds':>10}{'figures':>9}\n")
    for r in runs:
        stream.write(f"{r.name:<24}{r.cells:>6}{r.seconds:>10.1f}{len(r.figures):>9}\n")
    stream.write(f"{'total (wall clock)':<30}{total:>10.1f}\n")
    where = f"executed copies in {executed_dir}, " if executed_dir is not None else "notebooks written back, "
    stream.write(f"{where}figures in {figures_dir}\n")
    stream.flush()
    return runs


def _run_one(k: int, path: Path, progress: _Progress, options: dict) -> NotebookRun:
    progress.start(k, path.stem)
    try:
        run = run_notebook(path, on_cell=progress.on_cell, **options)
    except BaseException:
        progress.stop(f"[{k}/{progress.n}] {path.stem} FAILED after {time.monotonic() - progress.t_nb:.1f} s")
        raise
    progress.stop(f"[{k}/{progress.n}] {run.name:<22} {run.cells:>3} cells {run.seconds:7.1f} s  "
                  f"{len(run.figures)} figure(s)")
    return run


def _run_parallel(paths: list[Path], jobs: int, progress: _Progress, options, stream: TextIO,
                  cold: bool) -> list[NotebookRun]:
    """Run ``paths`` ``jobs`` at a time in worker processes, longest first (by the records of ``cold`` runs or of
    warm ones); one line per finished notebook as it finishes; returns the runs in notebook order."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    threads = max(1, (os.cpu_count() or 1) // jobs)
    done: dict[Path, NotebookRun] = {}
    failure: BaseException | None = None
    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(run_notebook, path, threads=threads, cold=cold, **options(path)): path
                   for path in longest_first(paths, cold)}
        for future in as_completed(futures):
            path = futures[future]
            try:
                run = done[path] = future.result()
                stream.write(f"[{len(done)}/{progress.n}] {run.name:<22} {run.cells:>3} cells "
                             f"{run.seconds:7.1f} s  {len(run.figures)} figure(s)\n")
            except BaseException as e:  # the others finish; the first failure is raised
                stream.write(f"{path.stem} FAILED\n")
                failure = failure or e
            stream.flush()
    if failure is not None:
        raise failure
    return [done[p] for p in paths]
