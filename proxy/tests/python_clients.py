"""The real Python clients through the running proxy.

Run by .ci/run after `pip install openai huggingface_hub` in a venv:

    python proxy/tests/python_clients.py target/debug/cold-start-proxy

A vLLM-like server on 127.0.0.1 answers `503 {"error":"Server is unavailable.
Please try again later."}` to its first requests (a cold start), then serves
chat completions, streamed or not. The `openai` client (streaming chat) and
huggingface_hub's `InferenceClient` (chat completion), both of which raise on
a 503 by themselves, are pointed at the proxy and must get their answers.
"""

import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

COLD_REQUESTS = 2
UNAVAILABLE = b'{"error":"Server is unavailable. Please try again later."}'


class Upstream(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    seen = []
    lock = threading.Lock()

    def log_message(self, *args):
        pass

    def do_POST(self):
        length = int(self.headers.get("content-length", 0))
        body = json.loads(self.rfile.read(length) or b"{}")
        with Upstream.lock:
            Upstream.seen.append(self.path)
            cold = len(Upstream.seen) <= COLD_REQUESTS
        if cold:
            self.send_response(503)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(UNAVAILABLE)))
            self.end_headers()
            self.wfile.write(UNAVAILABLE)
            return
        if body.get("stream"):
            self.send_response(200)
            self.send_header("content-type", "text/event-stream")
            self.send_header("connection", "close")
            self.end_headers()
            for word in ["Hello", " from", " a", " warm", " model"]:
                chunk = {
                    "id": "c1",
                    "object": "chat.completion.chunk",
                    "created": 0,
                    "model": body.get("model", "m"),
                    "choices": [{"index": 0, "delta": {"content": word}, "finish_reason": None}],
                }
                self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                self.wfile.flush()
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
            self.close_connection = True
            return
        answer = json.dumps(
            {
                "id": "c2",
                "object": "chat.completion",
                "created": 0,
                "model": body.get("model", "m"),
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "Hello!"},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
            }
        ).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)


def start_upstream():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Upstream)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def start_proxy(binary, upstream_port):
    proxy = subprocess.Popen(
        [
            binary,
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            f"http://127.0.0.1:{upstream_port}",
            "--model-key",
            "model",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    line = proxy.stdout.readline()
    address = next(w for w in line.split() if w.startswith("127.0.0.1:")).rstrip(",")
    return proxy, f"http://{address}"


def main():
    binary = sys.argv[1]
    upstream = start_upstream()
    proxy, base = start_proxy(binary, upstream.server_address[1])
    try:
        import openai

        Upstream.seen.clear()
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="not-needed", max_retries=0)
        stream = client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "Hi"}], stream=True
        )
        words = [c.choices[0].delta.content for c in stream if c.choices and c.choices[0].delta.content]
        assert "".join(words) == "Hello from a warm model", words
        assert len(Upstream.seen) == COLD_REQUESTS + 1, Upstream.seen
        print(f"openai {openai.__version__}: streamed {len(words)} events through a cold start")

        from huggingface_hub import InferenceClient
        import huggingface_hub

        Upstream.seen.clear()
        hub = InferenceClient(base_url=base)
        answer = hub.chat_completion(messages=[{"role": "user", "content": "Hi"}], model="m")
        assert answer.choices[0].message.content == "Hello!", answer
        assert len(Upstream.seen) == COLD_REQUESTS + 1, Upstream.seen
        print(f"huggingface_hub {huggingface_hub.__version__}: answered through a cold start")
    finally:
        proxy.terminate()
        proxy.wait(timeout=30)
        upstream.shutdown()
    print("2 passed, 0 failed")


if __name__ == "__main__":
    main()
