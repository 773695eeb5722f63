"""The pack must import in well under a second and leave transformers/the adapter library for first use.

Measured in a fresh interpreter that has first imported what ComfyUI itself has loaded before it
imports custom nodes, so only the pack's own cost is timed (as ComfyUI's "Import times for custom
nodes" line reports it).
"""
import json
import subprocess
import sys
from pathlib import Path

PROBE = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
import test_nodes_pack as helper
helper.comfy_importable()           # ComfyUI's own modules, loaded before custom nodes
before = set(sys.modules)
start = time.perf_counter()
helper.node_classes()               # import the package, call comfy_entrypoint, build every schema
elapsed = time.perf_counter() - start
new = sorted(set(sys.modules) - before)
print(json.dumps({"seconds": elapsed, "new": new}))
"""


def test_pack_imports_fast_and_lazily():
    unit_dir = Path(__file__).parent
    proc = subprocess.run([sys.executable, "-c", PROBE, str(unit_dir)], capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(unit_dir.parent), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    heavy = [m for m in result["new"] if m.startswith("llm_diff_pack.adapter") or m.split(".")[0] in ("einops", "safetensors", "transformers")]
    assert not heavy, f"imported at load time instead of on first use: {heavy}"
    assert result["seconds"] < 0.5, f"the pack took {result['seconds']:.2f} s to import"
