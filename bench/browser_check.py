"""Browser check of the explorer widget: JupyterLab in headless Chromium renders it and a slider moves it. Not a test.

    .venv/bin/python bench/browser_check.py                    # writes docs/explorer.png
    .venv/bin/python bench/browser_check.py --out /tmp/x.png --full --keep-server

What it does, in order (each step waits for the page, with a deadline, and fails naming the step):

1. copies notebooks/09_explorer.ipynb into a temporary directory (JupyterLab's autosave never touches the
   repository's notebook) and starts ``.venv/bin/jupyter lab`` there on 127.0.0.1 with a random token
   (``--allow-root`` when run as root), the kernel in quick mode (``COVSVD_QUICK=1``) unless ``--full``;
2. opens the notebook in headless Chromium (selenium + chromedriver; ``--no-sandbox`` as root), runs every cell
   (JupyterLab's own ``notebook:run-all-cells`` command) and waits for the explorer's image to render;
3. drags the ``r`` slider's handle (to the right by default) and waits until the kernel has redrawn the figure (a new image) and
   the numbers show the new r;
4. scrolls the widget into view and saves a screenshot (PNG, written atomically) to ``--out``.

Needs Chromium and its driver (Debian: ``apt-get install chromium chromium-driver``) and the python package
``selenium`` in the .venv (``.venv/bin/pip install selenium``; a development tool, not a covsvd dependency).
Prints what it saw (r before and after, the time each step took) and exits 0, or 1 with the failing step.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "09_explorer.ipynb"
DEFAULT_OUT = ROOT / "docs" / "explorer.png"


class CheckFailed(RuntimeError):
    """A step of the check did not complete; the message names it."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what: str, predicate, timeout: float, poll: float = 0.5):
    """``predicate()``'s first truthy value within ``timeout`` seconds; raises :class:`CheckFailed` naming ``what``."""
    deadline = time.monotonic() + timeout
    last_error = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as e:  # noqa: BLE001 - the page is still loading; retry until the deadline
            last_error = e
        time.sleep(poll)
    raise CheckFailed(f"timed out after {timeout:.0f} s waiting for {what}" + (f" (last error: {last_error})" if last_error else ""))


def lab_settings(directory: Path) -> None:
    """JupyterLab user settings: no pop-ups (news, update checks) in the screenshot, and every cell kept in the
    page (no windowing), so the widget's output is there to find whatever the scroll position."""
    for plugin, values in (("apputils-extension/notification", {"fetchNews": "false", "checkForUpdates": False}),
                           ("notebook-extension/tracker", {"windowingMode": "none"})):
        path = directory / "@jupyterlab" / f"{plugin}.jupyterlab-settings"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))


def start_lab(workdir: Path, port: int, token: str, quick: bool, log) -> subprocess.Popen:
    jupyter = Path(sys.executable).with_name("jupyter")
    if not jupyter.exists():
        raise CheckFailed(f"no {jupyter}: run this with the project's .venv python (make venv)")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               COVSVD_QUICK="1" if quick else "0", COVSVD_FIGURES_DIR=str(workdir / "figures"),
               JUPYTERLAB_SETTINGS_DIR=str(workdir / "lab-settings"), JUPYTER_RUNTIME_DIR=str(workdir / "runtime"))
    lab_settings(workdir / "lab-settings")
    cmd = [str(jupyter), "lab", "--no-browser", f"--port={port}", "--ServerApp.ip=127.0.0.1",
           f"--ServerApp.token={token}", f"--ServerApp.root_dir={workdir}", "--LabApp.expose_app_in_browser=True",
           "--LabApp.news_url=None", "--ServerApp.port_retries=0"]
    if os.geteuid() == 0:
        cmd.append("--allow-root")
    return subprocess.Popen(cmd, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def server_up(port: int, token: str) -> bool:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status?token={token}", timeout=2) as r:
        return r.status == 200


def browser(width: int, height: int):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    for arg in ("--headless=new", f"--window-size={width},{height}", "--disable-gpu", "--disable-dev-shm-usage",
                "--hide-scrollbars", "--force-device-scale-factor=1"):
        opts.add_argument(arg)
    if os.geteuid() == 0:
        opts.add_argument("--no-sandbox")  # Chromium refuses to run as root with its sandbox
    binary = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if binary:
        opts.binary_location = binary
    driver_path = shutil.which("chromedriver")
    service = Service(driver_path) if driver_path else Service()
    return webdriver.Chrome(options=opts, service=service)


# JavaScript run in the page: the explorer's controls and image, found by their ipywidgets classes
JS_STATE = """
const sliders = [...document.querySelectorAll('.widget-hslider')];
const r = sliders.find(s => (s.querySelector('.widget-label') || {}).textContent === 'r');
const img = document.querySelector('.widget-image');
const html = [...document.querySelectorAll('.widget-html-content')].map(e => e.textContent).join(' | ');
return {
  r: r ? r.querySelector('.widget-readout').textContent.trim() : null,
  img: img && img.complete && img.naturalWidth > 0 ? img.src.length + ':' + img.src.slice(-64) : null,
  numbers: html,
  kernel: (() => { const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;
                    const k = w && w.sessionContext && w.sessionContext.session && w.sessionContext.session.kernel;
                    return k ? k.status : null; })(),
  errors: [...document.querySelectorAll('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]')]
            .map(e => e.textContent).filter(t => t.includes('Error')).slice(0, 3),
};
"""


def run(args: argparse.Namespace) -> dict:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    from covsvd.util.files import atomic_write

    t0 = time.monotonic()
    times: dict[str, float] = {}
    workdir = Path(tempfile.mkdtemp(prefix="covsvd-browser-check-"))
    shutil.copy(NOTEBOOK, workdir / NOTEBOOK.name)
    port, token = args.port or free_port(), secrets.token_hex(16)
    log = open(workdir / "jupyter.log", "w")  # noqa: SIM115 - closed in finally
    server = driver = None
    try:
        server = start_lab(workdir, port, token, quick=not args.full, log=log)
        wait_for("JupyterLab to answer /api/status", lambda: server.poll() is None and server_up(port, token), 120)
        times["server"] = time.monotonic() - t0
        driver = browser(args.width, args.height)
        driver.get(f"http://127.0.0.1:{port}/lab/tree/{NOTEBOOK.name}?token={token}&reset")
        wait_for("the notebook to open with an idle kernel", lambda: driver.execute_script(
            "const a = window.jupyterapp; const w = a && a.shell.currentWidget;"
            "return !!(w && w.sessionContext && w.sessionContext.session && w.sessionContext.session.kernel"
            " && w.sessionContext.session.kernel.status === 'idle');"), 180)
        times["notebook open"] = time.monotonic() - t0
        driver.execute_script("window.jupyterapp.shell.collapseLeft();"
                              "window.jupyterapp.commands.execute('notebook:run-all-cells');")

        def state() -> dict:
            return driver.execute_script(JS_STATE)

        def rendered():
            s = state()
            return s if s["img"] and s["r"] else None

        before = wait_for("the explorer widget to render its figure", rendered, args.timeout)
        times["widget rendered"] = time.monotonic() - t0
        handle = driver.execute_script(
            "const s = [...document.querySelectorAll('.widget-hslider')].find("
            "x => (x.querySelector('.widget-label') || {}).textContent === 'r');"
            "s.scrollIntoView({block: 'center'}); return s.querySelector('.noUi-handle');")
        ActionChains(driver).click_and_hold(handle).move_by_offset(args.drag, 0).release().perform()
        def redrawn():
            s = state()
            return s if s["r"] != before["r"] and s["img"] != before["img"] and f"r = {s['r']}" in s["numbers"] else None

        after = wait_for("the figure to redraw after the r slider moved", redrawn, 120)
        times["slider moved, figure redrawn"] = time.monotonic() - t0
        # let the remaining cells finish so the page is quiet, then frame the widget
        wait_for("the kernel to go idle", lambda: state()["kernel"] == "idle", args.timeout)
        widget = driver.find_element(By.CSS_SELECTOR, ".widget-vbox")
        driver.execute_script("arguments[0].scrollIntoView({block: 'start'}); window.scrollBy(0, -60);", widget)
        time.sleep(1.0)
        png = driver.get_screenshot_as_png()

        atomic_write(args.out, lambda tmp: Path(tmp).write_bytes(png))
        if not args.out.is_file() or args.out.stat().st_size < 10_000:
            raise CheckFailed(f"the screenshot {args.out} is missing or empty")
        times["screenshot"] = time.monotonic() - t0
        return dict(r_before=before["r"], r_after=after["r"], image_changed=after["img"] != before["img"],
                    stderr_errors=after["errors"], screenshot=str(args.out), seconds=times, workdir=str(workdir))
    except Exception:
        if driver is not None:
            try:
                (workdir / "page.html").write_text(driver.page_source)
                driver.save_screenshot(str(workdir / "failure.png"))
            except Exception:  # noqa: BLE001 - best effort diagnostics
                pass
        print(f"diagnostics in {workdir} (jupyter.log, page.html, failure.png)", file=sys.stderr)
        args.keep_server = True  # keep the evidence
        raise
    finally:
        if driver is not None:
            driver.quit()
        if server is not None and server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)  # the server and the kernels it started (its own session)
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
        log.close()
        if not args.keep_server:
            shutil.rmtree(workdir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="screenshot path (PNG; default docs/explorer.png)")
    p.add_argument("--port", type=int, default=0, help="JupyterLab port (default: a free one)")
    p.add_argument("--full", action="store_true", help="run the notebook in full mode (default: COVSVD_QUICK=1)")
    p.add_argument("--timeout", type=float, default=600, help="seconds to wait for the notebook's cells")
    p.add_argument("--drag", type=int, default=40, help="pixels to drag the r slider's handle (negative: left)")
    p.add_argument("--width", type=int, default=1400)
    p.add_argument("--height", type=int, default=1300)
    p.add_argument("--keep-server", action="store_true", help="keep the temporary directory (logs) afterwards")
    args = p.parse_args(argv)
    try:
        import selenium  # noqa: F401
    except ImportError:
        print("needs selenium in this python: .venv/bin/pip install selenium (and apt-get install chromium "
              "chromium-driver)", file=sys.stderr)
        return 1
    try:
        report = run(args)
    except CheckFailed as e:
        print(f"browser check FAILED: {e}", file=sys.stderr)
        return 1
    print(json.dumps(report, indent=2))
    ok = report["image_changed"] and report["r_before"] != report["r_after"] and not report["stderr_errors"]
    print("browser check", "passed" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
