"""Every shipped workflow opened in ComfyUI's real frontend, in headless Chromium, as a user opens it.

The SD1.5 test server (with our tiny models) serves its own frontend package (1.32.9 for ComfyUI 0.3.75);
the browser is the distribution's Chromium driven by Playwright (tests/browser/frontend.py). For every
workflows/*.json, opened both from the template browser and by a file drop:
- no alert, no error or warning toast (the frontend's schema check, missing nodes, bad links);
- no node type the server does not know;
- no two node rectangles overlap, as the frontend has drawn them (title bar included);
- every widget value equals the file's, and the whole graph is inside the window at the saved view, at a
  zoom where the frontend draws node text (0.6 or more);
- the template card's thumbnail loads.
Then the SD1.5 workflow, with the fixture's models picked in its widgets, is queued with the Run button and
an image must appear in its Save Image node. Screenshots of each workflow land in outputs/browser/
(LLMDIFF_BROWSER_OUT overrides) for a reviewer.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
from playwright.sync_api import TimeoutError as PlaywrightTimeout

from devkit.comfyui import repo_root

pytestmark = pytest.mark.skipif(not shutil.which("chromium") and not Path("/usr/bin/chromium").exists(),
                                reason="no /usr/bin/chromium: `apt-get install chromium` (make setup does it as root)")

WORKFLOW_DIR = repo_root() / "workflows"
WORKFLOWS = sorted(p.stem for p in WORKFLOW_DIR.glob("*.json"))
PACK_MODULE = "ComfyUI-LLM-Diff-Adapter"  # the pack's folder name in custom_nodes, as /workflow_templates keys it


def out_dir() -> Path:
    folder = Path(os.environ.get("LLMDIFF_BROWSER_OUT", repo_root() / "outputs" / "browser"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def context():
    from browser import frontend

    with frontend.browser() as ctx:
        yield ctx


@pytest.fixture
def page(context, comfy_sd15):
    from browser import frontend

    page = frontend.open_frontend(context, comfy_sd15.url)
    yield page
    page.close()


def file_nodes(workflow: str) -> tuple[dict, dict]:
    """The workflow file, and its nodes by id."""
    ui = json.loads((WORKFLOW_DIR / f"{workflow}.json").read_text(encoding="utf-8"))
    return ui, {n["id"]: n for n in ui["nodes"]}


def check_opened(page, workflow: str, how: str) -> None:
    from browser import frontend

    ui, saved = file_nodes(workflow)
    nodes = frontend.read_graph(page)
    problems = [m for m in page.messages if m.startswith("alert")]
    problems += [f"{sev} toast: {text}" for sev, text in frontend.toasts(page) if sev in ("error", "warn")]
    assert not problems, f"{workflow} ({how}): " + "\n".join(problems)
    assert sorted(n["id"] for n in nodes) == sorted(saved), f"{workflow} ({how}): nodes differ from the file"
    missing = [f"{n['type']} (node {n['id']})" for n in nodes if n["missing"]]
    assert not missing, f"{workflow} ({how}): node types the frontend does not know: {missing}"
    overlapping = frontend.overlaps(nodes)
    assert not overlapping, f"{workflow} ({how}): overlapping nodes: {overlapping}"
    for n in nodes:
        values = n["widgets_values"]
        assert values == saved[n["id"]].get("widgets_values", []), \
            f"{workflow} ({how}): {n['title']} (node {n['id']}) widget values {values} != the file's {saved[n['id']].get('widgets_values')}"
    from browser.relayout import MIN_SCALE, hidden

    view = frontend.view(page)
    scale, (ox, oy) = view["scale"], view["offset"]
    assert [round(ox, 1), round(oy, 1), round(scale, 2)] == [*ui["extra"]["ds"]["offset"], ui["extra"]["ds"]["scale"]]
    # Readable as it opens: below about 0.57 the frontend draws every node as a plain box until one zooms in.
    assert scale >= MIN_SCALE and not view["low_quality"], \
        f"{workflow} ({how}): opens at scale {scale:.2f} (low quality: {view['low_quality']}); it must be {MIN_SCALE} or more"
    for n in nodes:
        x, y, w, h = n["bounding"]
        left, top, right, bottom = (x + ox) * scale, (y + oy) * scale, (x + w + ox) * scale, (y + h + oy) * scale
        # Inside the part of the window no toolbar, side bar, canvas info or minimap covers.
        assert not hidden(left, top, right, bottom), \
            f"{workflow} ({how}): {n['title']} (node {n['id']}) is not in view at the saved view: {left:.0f},{top:.0f}-{right:.0f},{bottom:.0f}"


@pytest.mark.parametrize("workflow", WORKFLOWS)
def test_workflow_opens_from_a_file_drop(page, workflow):
    from browser import frontend

    frontend.load_file(page, WORKFLOW_DIR / f"{workflow}.json")
    time.sleep(1.0)  # a schema alert or missing-node toast arrives after the graph is built
    check_opened(page, workflow, "file drop")
    page.screenshot(path=str(out_dir() / f"{workflow}.png"))


def open_template_browser(page):
    page.get_by_role("button", name="Templates").first.click()
    page.wait_for_selector(".p-dialog", timeout=30000)
    page.get_by_text(PACK_MODULE, exact=True).first.click()


@pytest.mark.parametrize("workflow", WORKFLOWS)
def test_workflow_opens_from_the_template_browser(page, workflow, comfy_sd15):
    from browser import frontend

    open_template_browser(page)
    title = page.locator(".p-dialog").get_by_text(workflow, exact=True).first  # the card's title: the file name
    title.scroll_into_view_if_needed()
    # The card's picture: the frontend fetches <name>.jpg from the pack's workflows/ and shows it as a blob.
    # The card renders its <img> after its title, so the image is looked up again at every poll.
    drawn = """(el) => { for (let e = el; e; e = e.parentElement) { const img = e.querySelector('img');
        if (img) return img.complete && img.naturalWidth > 0; } return false; }"""
    try:
        page.wait_for_function(drawn, arg=title.element_handle(), timeout=90000)
    except PlaywrightTimeout:
        pytest.fail(f"{workflow}: the template card's thumbnail was not drawn within 90 s")
    thumbnail = f"/workflow_templates/{PACK_MODULE}/{workflow}.jpg"
    answers = [status for status, url in page.responses if url.endswith(thumbnail)]
    if not answers:  # drawn without a network event (a cache the CDP switch did not reach): ask the server itself
        answers = [page.request.get(comfy_sd15.url + "/api" + thumbnail).status]
    assert answers and all(status == 200 for status in answers), \
        f"{workflow}: {thumbnail} answered {answers}: {[r for r in page.responses if 'workflow_templates' in r[1]]}"
    page.screenshot(path=str(out_dir() / f"template_browser_{workflow}.png"))
    title.click()
    page.wait_for_function("(n) => app.graph._nodes.length === n", arg=len(file_nodes(workflow)[1]), timeout=60000)
    frontend.settle(page)
    time.sleep(1.0)
    check_opened(page, workflow, "template browser")


FIXTURE_VALUES = {  # the e2e SD1.5 server's models (tests/e2e/conftest.py), picked as a user would
    "UNETLoader": {"unet_name": "sd15_unet_random.safetensors"},
    "VAELoader": {"vae_name": "sd_vae_random.safetensors"},
    "LLMDiffLoadLLM": {"llm_name": "tiny-qwen2"},
    "LLMDiffLoadAdapter": {"adapter_name": "tiny-qwen2-sd15.safetensors"},
    "EmptyLatentImage": {"width": 64, "height": 64},
    "KSampler": {"steps": 2},
}


def test_sd15_workflow_queued_from_the_ui_makes_an_image(page, comfy_sd15):
    from browser import frontend

    frontend.load_file(page, WORKFLOW_DIR / "sd15_adapter.json")
    page.evaluate("""(values) => { for (const n of app.graph._nodes) for (const [name, v] of Object.entries(values[n.type] || {})) {
        const w = n.widgets.find(w => w.name === name); w.value = v; w.callback?.(v); } }""", FIXTURE_VALUES)
    before = {p.name for p in comfy_sd15.output_dir.rglob("*.png")}
    page.get_by_role("button", name="Run").first.click()
    page.wait_for_function("""() => app.graph._nodes.some(n => n.type === 'SaveImage' && n.imgs && n.imgs.length
        && n.imgs[0].complete && n.imgs[0].naturalWidth > 0)""", timeout=600000)
    errors = [f"{sev}: {text}" for sev, text in frontend.toasts(page) if sev == "error"]
    assert not errors, errors
    size = page.evaluate("() => { const i = app.graph._nodes.find(n => n.type === 'SaveImage').imgs[0]; return [i.naturalWidth, i.naturalHeight]; }")
    assert size == [64, 64]
    assert {p.name for p in comfy_sd15.output_dir.rglob("*.png")} - before, "no new image file in the server's output folder"
    page.screenshot(path=str(out_dir() / "sd15_adapter_after_run.png"))


def test_advanced_inputs_fold_away_and_enhance_prompt_starts_on_a_fixed_seed(page):
    """The pack's frontend extension (web/llm_diff_adapter.js), on nodes made fresh as from the node library."""
    state = page.evaluate("""() => {
        const show = (n) => n.widgets.filter(w => n.isWidgetVisible(w)).map(w => w.name);
        const encode = LiteGraph.createNode('LLMDiffTextEncode'); app.graph.add(encode);
        const folded = {visible: show(encode), height: encode.computeSize()[1]};
        encode.toggleAdvanced();
        const shown = {visible: show(encode), height: encode.computeSize()[1]};
        const enhance = LiteGraph.createNode('LLMDiffEnhancePrompt'); app.graph.add(enhance);
        return {folded, shown, control: enhance.widgets.find(w => w.name === 'control_after_generate').value,
                llm: show((() => { const n = LiteGraph.createNode('LLMDiffLoadLLM'); app.graph.add(n); return n; })())};
    }""")
    assert state["folded"]["visible"] == ["text", "clip_mode", "llm_strength", "clip_strength"], state
    assert state["llm"] == ["llm_name", "dtype"], state
    assert state["shown"]["visible"][:4] == state["folded"]["visible"] and "target_height" in state["shown"]["visible"]
    assert state["shown"]["height"] > state["folded"]["height"], state  # folded widgets give their room back
    assert state["control"] == "fixed", state
