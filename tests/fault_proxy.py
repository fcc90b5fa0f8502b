"""A fault-injecting HTTP proxy for the served-backend tests: it answers requests with
planned faults (429 with Retry-After, 500, a stalled answer) and passes the others on to
the real server (serve.LlamaServer)."""

import json
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FaultProxy:
    """An HTTP proxy on 127.0.0.1 that applies `faults` to the next requests, in order:
      "429": Too Many Requests with Retry-After: <retry_after>
      "500": Internal Server Error
      "stall": reads the request and answers nothing until the client gives up
      "no_logprobs": passes it on, and drops the log-probabilities from the answer
    `always` (a fault) applies to every request once `faults` is used up and `passes`
    requests have gone through. `log` records (path, what was done) per request."""

    def __init__(self, upstream, faults=(), always=None, passes=0, retry_after=1):
        self.upstream = upstream.rstrip("/")
        self.faults = list(faults)
        self.always, self.passes, self.retry_after = always, passes, retry_after
        self.log = []
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                proxy._handle(self)

            def do_POST(self):
                proxy._handle(self)

            def log_message(self, *args):  # quiet
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def _next_fault(self):
        with self.lock:
            if self.faults:
                return self.faults.pop(0)
            if self.passes > 0:
                self.passes -= 1
                return None
            return self.always

    def _handle(self, handler):
        body = handler.rfile.read(int(handler.headers.get("Content-Length") or 0))
        fault = self._next_fault()
        self.log.append((handler.path, fault or "passed"))
        if fault == "stall":
            self.stopped.wait(600)  # until the proxy stops; the client times out first
            return
        if fault in ("429", "500"):
            handler.send_response(int(fault))
            if fault == "429":
                handler.send_header("Retry-After", str(self.retry_after))
            handler.send_header("Content-Length", "0")
            handler.end_headers()
            return
        path = handler.path[len("/v1"):] if handler.path.startswith("/v1") else handler.path
        request = urllib.request.Request(self.upstream + path, data=body or None,
                                         method=handler.command,
                                         headers={k: v for k, v in handler.headers.items()
                                                  if k.lower() in ("content-type",
                                                                   "authorization")})
        try:
            with urllib.request.urlopen(request, timeout=600) as response:
                status, payload = response.status, response.read()
        except urllib.error.HTTPError as error:
            status, payload = error.code, error.read()
        if fault == "no_logprobs" and status == 200:  # as a server without them answers
            answer = json.loads(payload)
            for choice in answer.get("choices", []):
                choice["logprobs"] = None
            payload = json.dumps(answer).encode()
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(payload)))
        handler.end_headers()
        handler.wfile.write(payload)

    def stop(self):
        self.stopped.set()
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
