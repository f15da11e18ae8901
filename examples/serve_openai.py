"""Serve a tiny aligned LLaVA with vLLM's OpenAI-compatible server and ask it about one image.

Run with the vLLM environment (bash scripts/make_vllm_env.sh):

    .vllm-venv/bin/python examples/serve_openai.py

It saves a tiny aligned checkpoint (random weights: the answer is gibberish, the path is real), starts
`normalign serve` on 127.0.0.1, sends one chat request with an image, prints the answer and stops the server.
With a real checkpoint: `normalign serve out/aligned-llava` and any OpenAI client.
"""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request

from normalign_vllm.testing import save_tiny_aligned, tiny_images

PORT = 8765
URL = f"http://127.0.0.1:{PORT}"


def image_url() -> str:
    buffer = io.BytesIO()
    tiny_images(1)[0].save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def wait_ready(server: subprocess.Popen, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with code {server.returncode}")
        try:
            with urllib.request.urlopen(f"{URL}/health", timeout=2):
                return
        except OSError:
            time.sleep(2)
    raise TimeoutError(f"the server did not become ready within {timeout_s} s")


def main() -> None:
    root = tempfile.mkdtemp(prefix="normalign-serve-")
    folder, _ = save_tiny_aligned(root)
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    normalign = [sys.executable, "-m", "hf_normalign", "serve"]
    args = [folder, "--host", "127.0.0.1", "--port", str(PORT), "--max-model-len", "256", "--enforce-eager"]
    log = open(os.path.join(root, "server.log"), "w")  # noqa: SIM115  (open for the server's lifetime)
    server = subprocess.Popen([*normalign, *args], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_ready(server)
        content = [{"type": "image_url", "image_url": {"url": image_url()}}, {"type": "text", "text": "describe"}]
        body = {"model": folder, "messages": [{"role": "user", "content": content}], "max_tokens": 8}
        request = urllib.request.Request(
            f"{URL}/v1/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=120) as response:
            reply = json.load(response)
        answer, tokens = reply["choices"][0]["message"]["content"], reply["usage"]["completion_tokens"]
        print(f"answer: {answer!r} ({tokens} tokens)")
    except BaseException:
        log.flush()
        with open(log.name) as f:
            print(f.read()[-4000:], file=sys.stderr)  # the server's own account of what went wrong
        raise
    finally:
        server.terminate()
        server.wait(timeout=60)
        log.close()


if __name__ == "__main__":
    main()
