"""Session fixtures for the end-to-end tests: real ComfyUI servers with random full-size weights.

Fixtures (function-scoped handles onto session-long servers; see support/comfyui.py for the server API):

    comfy_sd15       SD1.5 server + our models; fails (with the reason) if the tiny LLMs or the
                     adapters from the adapter CLI could not be made
    comfy_sd15_core  the same server, without requiring our models (core-node tests)
    comfy_sd2        SD2 (768-v) server + our models;   comfy_sd2_core without requiring them
    comfy_sdxl       SDXL server (--cache-none) + our models; comfy_sdxl_core without requiring them

Model names, exactly as ComfyUI lists them on every server (the node tests and workflows use these):
    unet/        sd15_unet_random.safetensors | sd2_unet_random.safetensors | sdxl_unet_random.safetensors
    vae/         sd_vae_random.safetensors (sd15, sd2) | sdxl_vae_random.safetensors
    clip/        clip_l_random.safetensors                      (sd15 server)
                 clip_g_random.safetensors  SDXL's CLIP-G (sd15 server): with clip_l in DualCLIPLoader(type
                                            "sdxl") it makes an SDXL CLIP without the 16 GB SDXL server
    controlnet/  sd15_controlnet_random.safetensors             (sd15 server)
    LLM/         tiny-qwen2, tiny-llama, broken-half-copied (tiny-qwen2's config and tokenizer, no weights),
                 tiny-t5 (a T5 encoder-decoder, 64 wide, ComfyUI's T5 tokenizer),
                 gemma3-1b-width (a Gemma 3 decoder with Gemma-3-1B's widths but 2 blocks)
    llm_adapters/ tiny-qwen2-sd15.safetensors, tiny-qwen2-sd2.safetensors, tiny-qwen2-sdxl.safetensors,
                  tiny-llama-sd15.safetensors (an adapter for a DIFFERENT LLM: the mismatch test),
                  tiny-qwen2-sd15-timestep.safetensors (timestep-aware, modulation weights drawn so t matters),
                  broken-truncated.safetensors (first half of a real adapter file),
                  broken-pickle.safetensors (a torch.save pickle wearing a .safetensors name),
                  rouwei-gemma-random.safetensors (full-size RouWei-Gemma v0.1 shape, published fused layout),
                  ella-random.safetensors (ELLA-SD1.5-TSC shape reading tiny-t5's 64-wide states)

The SD1.5 server also loads the test-only node LLMDiffProbe (probe_node.py).

Only one server runs at a time: on a shared 24 GiB machine the SDXL server alone peaks near 16 GB, so
acquiring one kind stops the others (they restart on demand), and collection runs the SD1.5 tests
first, then SD2, then SDXL, so each server starts once. The SDXL fixture skips, naming the numbers,
when the machine has less than SDXL_MIN_FREE_GIB available.
"""
from __future__ import annotations

import logging
import os
import shutil
import sys
import time
from pathlib import Path

import pytest

from devkit.comfyui import ComfyServer, repo_root
from devkit.processes import run_in_own_group
from devkit import weights as weights_mod

log = logging.getLogger(__name__)

SDXL_MIN_FREE_GIB = 17
_ORDER = {"comfy_sd15": 0, "comfy_sd15_core": 0, "comfy_sd2": 1, "comfy_sd2_core": 1, "comfy_sdxl": 2, "comfy_sdxl_core": 2,
          "comfy_qwen25_3b": 3}  # test_comfy_llm.py's own server: after the others, which it stops
TIMINGS: dict[str, float] = {}  # fixture build wall times, reported at the end of the session
PEAKS: dict[str, int | None] = {}  # server peak RSS in MB, reported at the end of the session


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Mark every test here e2e, and group them by server so each server starts once per session."""
    e2e_dir = Path(__file__).parent
    for item in items:
        if e2e_dir in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.e2e)

    def rank(item):
        used = [r for name, r in _ORDER.items() if name in getattr(item, "fixturenames", ())]
        # test_workflows picks its server at run time from the workflow's family ("sd2_adapter" -> comfy_sd2).
        workflow = getattr(getattr(item, "callspec", None), "params", {}).get("workflow")
        if isinstance(workflow, str):
            used.append(_ORDER.get(f"comfy_{workflow.split('_', 1)[0]}", -1))
        return max(used) if used else -1

    items.sort(key=rank)  # stable: keeps file order inside each group


def _timed(label: str):
    class _Timer:
        def __enter__(self):
            self.start = time.monotonic()

        def __exit__(self, *exc):
            TIMINGS[label] = round(time.monotonic() - self.start, 1)
            log.info("%s took %.1f s", label, TIMINGS[label])
    return _Timer()


def _mem_available_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return 0.0


# --- our models: tiny LLMs and adapters made by the real CLI -------------------------------------------

def _adapter_init(llm: Path, target: str, out: Path, *extra: str) -> None:
    cmd = [sys.executable, "-m", "adapter", "init", "--llm", str(llm), "--target", target, "--out", str(out), *extra]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(repo_root())] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    proc = run_in_own_group(cmd, env, timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd[1:])}` failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")


@pytest.fixture(scope="session")
def _our_models(tmp_path_factory):
    """(LLM folders, adapter files, error): built once per session. An error fails every test that needs
    these models (see _with_our_models) while the core-node harness tests still run."""
    folder = tmp_path_factory.mktemp("our_models")
    llms, adapters = {}, {}
    try:
        with _timed("our models (tiny LLMs + adapter init)"):
            from devkit.tiny_models import make_tiny_llm

            llms["tiny-qwen2"] = make_tiny_llm(family="qwen2")
            llms["tiny-llama"] = make_tiny_llm(family="llama")
            half = folder / "broken-half-copied"
            shutil.copytree(llms["tiny-qwen2"], half, ignore=shutil.ignore_patterns("*.safetensors", "*.safetensors.index.json"))
            llms["broken-half-copied"] = half
            for target in ("sd15", "sd2", "sdxl"):
                out = folder / f"tiny-qwen2-{target}.safetensors"
                _adapter_init(llms["tiny-qwen2"], target, out)
                adapters[out.name] = out
            out = folder / "tiny-llama-sd15.safetensors"
            _adapter_init(llms["tiny-llama"], "sd15", out)
            adapters[out.name] = out
            out = folder / "tiny-qwen2-sd15-timestep.safetensors"
            _adapter_init(llms["tiny-qwen2"], "sd15", out, "--timestep-aware")
            adapters[out.name] = _with_timestep_weights(out)
            data = (folder / "tiny-qwen2-sd15.safetensors").read_bytes()
            (folder / "broken-truncated.safetensors").write_bytes(data[: len(data) // 2])
            adapters["broken-truncated.safetensors"] = folder / "broken-truncated.safetensors"
            adapters["broken-pickle.safetensors"] = _pickle_file(folder / "broken-pickle.safetensors")
            # The published adapters' shapes (docs/public_adapters.md) and their text models.
            from devkit.foreign_files import cached_public_adapters
            from devkit.tiny_encoders import make_gemma3_1b_width, make_tiny_t5

            llms["tiny-t5"] = make_tiny_t5()
            llms["gemma3-1b-width"] = make_gemma3_1b_width()
            adapters.update(cached_public_adapters())
        return llms, adapters, ""
    except Exception as exc:  # noqa: BLE001 - reported by every test that needs these models
        log.warning("our models could not be made: %s", exc)
        return llms, adapters, f"{type(exc).__name__}: {exc}"


def _with_timestep_weights(path: Path) -> Path:
    """Give a fresh timestep-aware adapter's modulation values, as training would: at init it is zero, so
    the adapter equals the static one at every timestep and a test could not see the timestep act."""
    import torch

    from adapter import load_adapter, save_adapter

    adapter = load_adapter(path)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in adapter.named_parameters():
            if ".modulation." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    save_adapter(path, adapter)
    return path


def _pickle_file(path: Path) -> Path:
    """What a user gets by renaming a .pt/.ckpt: a torch zip-pickle. Only ever written here, to check
    that the loader refuses it; nothing in the project loads pickles."""
    import torch

    torch.save({"weight": torch.zeros(2, 2)}, path)
    return path


# --- servers: one at a time --------------------------------------------------------------------------

class _Servers:
    """Starts a server kind on demand and stops the others first (memory: see the module doc)."""

    def __init__(self, our_models):
        self.our_models = our_models
        self.running: dict[str, ComfyServer] = {}
        self.peaks: dict[str, int | None] = {}

    def acquire(self, kind: str) -> ComfyServer:
        if kind in self.running:
            if self.running[kind].alive:
                return self.running[kind]
            log.warning("the %s server died; starting a new one. Its log ends:\n%s", kind, self.running[kind].log_tail())
            self._stop(kind)
        for other in list(self.running):
            self._stop(other)
        if kind == "sdxl":
            free = _mem_available_gib()
            if free < SDXL_MIN_FREE_GIB:
                pytest.skip(f"the SDXL server needs ~{SDXL_MIN_FREE_GIB} GiB of available RAM (peaks near 16 GB "
                            f"loading the UNet in fp32); this machine has {free:.1f} GiB available now")
        with _timed(f"{kind} weights (cached after the first build)"):
            weights = weights_mod.build(kind)
        with _timed(f"{kind} server start"):
            server = ComfyServer(f"e2e-{kind}", cache_none=(kind == "sdxl"))
            if kind == "sd15":  # the test-only probe node for the instrumented cross-attention test
                (server.base_dir / "custom_nodes" / "llmdiff_probe.py").symlink_to(Path(__file__).with_name("probe_node.py"))
            self._link(server, kind, weights)
            server.start()
        self.running[kind] = server
        return server

    def _link(self, server: ComfyServer, kind: str, weights) -> None:
        server.link_model("unet", weights.unet, f"{kind}_unet_random.safetensors")
        server.link_model("vae", weights.vae, "sdxl_vae_random.safetensors" if kind == "sdxl" else "sd_vae_random.safetensors")
        if kind == "sd15":
            server.link_model("clip", weights.clip_l, "clip_l_random.safetensors")
            server.link_model("clip", weights_mod.build_clip_g().clip_g, "clip_g_random.safetensors")
            server.link_model("controlnet", weights.controlnet, "sd15_controlnet_random.safetensors")
        llms, adapters, _ = self.our_models
        for name, path in llms.items():
            server.link_model("LLM", path, name)
        for name, path in adapters.items():
            server.link_model("llm_adapters", path, name)

    def _stop(self, kind: str) -> None:
        server = self.running.pop(kind)
        server.stop()
        self.peaks[kind] = server.peak_rss_mb()
        log.info("stopped %s server: peak RSS %s MB", kind, self.peaks[kind])

    def stop_all(self) -> None:
        for kind in list(self.running):
            self._stop(kind)


@pytest.fixture(scope="session")
def _servers(_our_models):
    servers = _Servers(_our_models)
    yield servers
    servers.stop_all()
    PEAKS.update(servers.peaks)


def pytest_terminal_summary(terminalreporter):
    """Print how long each slow fixture took and how much memory each server used (the report's numbers)."""
    if TIMINGS or PEAKS:
        terminalreporter.write_line(f"[e2e] fixture wall times (s): {TIMINGS}")
        terminalreporter.write_line(f"[e2e] server peak RSS (MB): {PEAKS}")


def _with_our_models(servers: _Servers, kind: str) -> ComfyServer:
    error = servers.our_models[2]
    if error:
        pytest.fail(f"our models (tiny LLMs, adapters from `python -m adapter init`) could not be made: {error}")
    return servers.acquire(kind)


@pytest.fixture
def comfy_sd15(_servers) -> ComfyServer:
    return _with_our_models(_servers, "sd15")


@pytest.fixture
def comfy_sd15_core(_servers) -> ComfyServer:
    return _servers.acquire("sd15")


@pytest.fixture
def comfy_sd2(_servers) -> ComfyServer:
    return _with_our_models(_servers, "sd2")


@pytest.fixture
def comfy_sd2_core(_servers) -> ComfyServer:
    return _servers.acquire("sd2")


@pytest.fixture
def comfy_sdxl(_servers) -> ComfyServer:
    return _with_our_models(_servers, "sdxl")


@pytest.fixture
def comfy_sdxl_core(_servers) -> ComfyServer:
    return _servers.acquire("sdxl")


@pytest.fixture(scope="session")
def e2e_tools():
    """This file's helpers for test modules that run a server of their own (test_comfy_llm.py): making an
    adapter with the real CLI, available RAM, and the timing / peak-RSS tables printed at the end."""
    from types import SimpleNamespace

    return SimpleNamespace(adapter_init=_adapter_init, mem_available_gib=_mem_available_gib, timed=_timed,
                           timings=TIMINGS, peaks=PEAKS)
