"""Loading the pack imports only its own node definitions: transformers, the adapter library and every other
third-party package wait for a node's first run, so ComfyUI starts as fast with the pack as without it.

Checked by what the import adds to `sys.modules` in a fresh interpreter that has first imported what
ComfyUI itself loads before custom nodes (not by timing it: a shared machine makes any time bound flaky).
"""
import json
import subprocess
import sys
from pathlib import Path

PROBE = r"""
import json, sys
from devkit import comfy_pack
comfy_pack.comfy_importable()       # ComfyUI's own modules, loaded before custom nodes
before = set(sys.modules)
comfy_pack.node_classes()           # import the package, call comfy_entrypoint, build every schema
print(json.dumps(sorted(set(sys.modules) - before)))
"""


def test_loading_the_pack_imports_only_its_node_modules():
    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120, cwd=repo,
                          env={"PYTHONPATH": str(repo), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    new = json.loads(proc.stdout.strip().splitlines()[-1])
    pack = "llm_diff_pack"
    assert f"{pack}.nodes.entrypoint" in new, f"the probe did not import the pack: {new}"  # the check below is not vacuous
    foreign = sorted({m.split(".")[0] for m in new} - {pack} - set(sys.stdlib_module_names))
    assert not foreign, f"packages imported at load time instead of on first use: {foreign}"
    own = [m for m in new if m.split(".")[0] == pack]
    not_nodes = [m for m in own if m not in (pack, f"{pack}.nodes") and not m.startswith(f"{pack}.nodes.")]
    assert not not_nodes, f"imported at load time instead of on first use: {not_nodes}"
