"""ComfyUI's real frontend in headless Chromium (Debian's package, driven by Playwright).

    browser()                         context manager: a fresh Chromium profile; yields a Playwright context
    open_frontend(context, url)       a page with ComfyUI loaded (window.app.graph ready), past the first-visit
                                      template gallery; .messages collects alerts and page errors
    load_file(page, path)             what a drop of the file on the canvas does: the page's file input
    read_graph(page)                  every node as the frontend holds it after drawing: id, type, title,
                                      pos, size, bounding rectangle (title bar included), widgets (name, value,
                                      visible), missing (the node type is not registered)
    toasts(page)                      the text and severity of every toast shown
    overlaps(nodes)                   pairs of nodes whose drawn rectangles intersect

Chromium is /usr/bin/chromium (`apt-get install chromium`); Playwright's own browser download is never
used, and every network feature that would reach outside is switched off.
"""
from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
VIEWPORT = {"width": 1600, "height": 1000}

_READ_GRAPH = """() => app.graph._nodes.map(n => ({
    id: n.id, type: n.type, title: n.title, pos: [...n.pos], size: [...n.size], bounding: [...n.boundingRect],
    missing: !LiteGraph.registered_node_types[n.type] || n.has_errors === true,
    widgets: (n.widgets || []).map(w => ({name: w.name, value: w.value, visible: n.isWidgetVisible ? n.isWidgetVisible(w) : true,
                                          serialize: w.serialize !== false && w.options?.serialize !== false})),
    widgets_values: n.serialize().widgets_values ?? []}))"""


@contextlib.contextmanager
def browser():
    from playwright.sync_api import sync_playwright

    profile = tempfile.mkdtemp(prefix="llmdiff-chromium-")
    try:
        with sync_playwright() as p:
            context = p.chromium.launch_persistent_context(profile, executable_path=CHROMIUM, headless=True,
                                                           viewport=VIEWPORT, args=CHROMIUM_ARGS)
            try:
                yield context
            finally:
                context.close()
    finally:
        shutil.rmtree(profile, ignore_errors=True)


def open_frontend(context, url: str, timeout_s: float = 120):
    skip_first_visit_gallery(url)
    page = context.new_page()
    page.messages = []
    page.responses = []  # (status, url) of every answer the page received
    page.on("response", lambda r: page.responses.append((r.status, r.url)))
    page.on("dialog", lambda d: (page.messages.append(f"alert: {d.message}"), d.dismiss()))
    page.on("pageerror", lambda e: page.messages.append(f"page error: {e}"))
    # The profile's cache would answer a thumbnail a previous page fetched with no network event, and a test
    # reads the page's responses to see what the frontend asked for.
    context.new_cdp_session(page).send("Network.setCacheDisabled", {"cacheDisabled": True})
    page.goto(url, timeout=timeout_s * 1000)
    page.wait_for_function("window.app && window.app.graph && window.app.canvas", timeout=timeout_s * 1000)
    page.wait_for_selector("input[type=file]", state="attached", timeout=timeout_s * 1000)
    close_dialogs(page)
    return page


def skip_first_visit_gallery(url: str) -> None:
    """Mark the server's user as past the first visit, when the frontend opens the template gallery by itself
    (some seconds after the page loads, so it would cover whatever a test does next)."""
    import urllib.request

    request = urllib.request.Request(f"{url}/api/settings/Comfy.TutorialCompleted", data=b"true", method="POST",
                                     headers={"Content-Type": "application/json"})
    urllib.request.urlopen(request, timeout=30).read()


def close_dialogs(page) -> None:
    """Close open dialogs (the template browser) with their close button."""
    for _ in range(5):
        button = page.query_selector(".p-dialog-mask button:has(i.pi-times)")
        if not button:
            return
        button.click()
        time.sleep(0.5)


def clear_toasts(page) -> None:
    page.evaluate("() => document.querySelectorAll('.p-toast-message').forEach(t => t.remove())")


def toasts(page) -> list[tuple[str, str]]:
    """(severity, text) of every toast on screen; severity is PrimeVue's: success, info, warn, error."""
    return page.evaluate("""() => [...document.querySelectorAll('.p-toast-message')].map(t => {
        const severity = [...t.classList].find(c => /^p-toast-message-(success|info|warn|error|secondary|contrast)$/.test(c));
        return [severity ? severity.replace('p-toast-message-', '') : 'unknown', t.innerText.trim()]; })""")


def settle(page) -> None:
    """Let the canvas draw twice so sizes and bounding boxes are the drawn ones."""
    page.evaluate("() => new Promise(r => { app.canvas.setDirty(true, true); requestAnimationFrame(() => requestAnimationFrame(r)); })")
    time.sleep(0.5)


def load_file(page, path: Path) -> None:
    """Open a workflow file as a drop on the canvas does (the frontend's file handler)."""
    page.set_input_files("input[type=file]", str(path))
    page.wait_for_function("(n) => app.graph._nodes.length === n", arg=_node_count(path), timeout=60000)
    settle(page)


def _node_count(path: Path) -> int:
    import json

    return len(json.loads(Path(path).read_text(encoding="utf-8"))["nodes"])


def read_graph(page) -> list[dict]:
    return page.evaluate(_READ_GRAPH)


def view(page) -> dict:
    """The canvas transform, its size in the window, and whether the canvas draws nodes in low quality (plain
    boxes without text: below the zoom where node text reaches LiteGraph.Canvas.MinFontSizeForLOD)."""
    return page.evaluate("""() => { const ds = app.canvas.ds, c = app.canvas.canvas;
        return {offset: [...ds.offset], scale: ds.scale, width: c.clientWidth, height: c.clientHeight,
                low_quality: app.canvas.low_quality}; }""")


def overlaps(nodes: list[dict]) -> list[tuple[str, str]]:
    found = []
    for i, a in enumerate(nodes):
        ax, ay, aw, ah = a["bounding"]
        for b in nodes[i + 1:]:
            bx, by, bw, bh = b["bounding"]
            if ax < bx + bw and bx < ax + aw and ay < by + bh and by < ay + ah:
                found.append((f"{a['title']} (node {a['id']})", f"{b['title']} (node {b['id']})"))
    return found
