"""Operations: metrics through prometheus_client, back-pressure (429), timeouts (504), slow readers, graceful drain
on SIGTERM, and property-based fuzzing of both completion routes."""

import json
import os
import resource
import signal
import socket
import threading
import time
import urllib.request

import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from conftest import live_server
from engine.engine import PHASES
from server.app import STALL_TIMEOUT
from server.child import spawn
from test_server import HELLO, MODEL, http, metric


def test_metrics_parse_and_count_the_requests_just_made(api, client):
    route = "/v1/chat/completions"
    hist = ["sparkler_time_to_first_token_seconds", "sparkler_e2e_request_latency_seconds",
            "sparkler_request_queue_time_seconds", "sparkler_inter_token_latency_seconds"]
    before = {h: metric(api, h, h + "_count") for h in hist}
    ok = metric(api, "sparkler_requests", "sparkler_requests_total", route=route, status="200")
    length = metric(api, "sparkler_requests", "sparkler_requests_total", route=route, finish_reason="length")
    bad = metric(api, "sparkler_requests", "sparkler_requests_total", route=route, status="400")
    device = metric(api, "sparkler_device_call_seconds", "sparkler_device_call_seconds_total")
    step = "sparkler_engine_step_seconds"
    phases = {p: metric(api, step, step + "_total", phase=p) for p in PHASES}
    cpu = "sparkler_thread_cpu_seconds"
    threads = {t: metric(api, cpu, cpu + "_total", thread=t) for t in ("engine", "event_loop")}
    prompts = metric(api, "vllm:prompt_tokens", "vllm:prompt_tokens_total", model_name=MODEL)
    for _ in range(3):
        client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=6, extra_body={"ignore_eos": True})
    list(client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=6, stream=True,
                                        extra_body={"ignore_eos": True}))
    http(api, "POST", route, {"messages": HELLO, "temperature": 9})
    assert metric(api, "sparkler_requests", "sparkler_requests_total", route=route, status="200") == ok + 4
    lengths = metric(api, "sparkler_requests", "sparkler_requests_total", route=route, finish_reason="length")
    assert lengths == length + 4
    assert metric(api, "sparkler_requests", "sparkler_requests_total", route=route, status="400") == bad + 1
    after = {h: metric(api, h, h + "_count") for h in hist}
    assert after["sparkler_time_to_first_token_seconds"] == before["sparkler_time_to_first_token_seconds"] + 4
    assert after["sparkler_e2e_request_latency_seconds"] == before["sparkler_e2e_request_latency_seconds"] + 5
    assert after["sparkler_request_queue_time_seconds"] == before["sparkler_request_queue_time_seconds"] + 4
    assert after["sparkler_inter_token_latency_seconds"] == before["sparkler_inter_token_latency_seconds"] + 4 * 5
    itl = "sparkler_inter_token_latency_seconds"  # observed a chunk's tokens at once: the buckets still add up
    assert metric(api, itl, itl + "_bucket", le="+Inf") == after[itl] and metric(api, itl, itl + "_sum") > 0
    assert metric(api, "sparkler_kv_pages_total", "sparkler_kv_pages_total") == api.engine.sched.pools[0].capacity
    assert metric(api, "sparkler_free_slots", "sparkler_free_slots") == 32
    assert metric(api, "sparkler_device_call_seconds", "sparkler_device_call_seconds_total") > device  # launches
    assert all(metric(api, step, step + "_total", phase=p) > t for p, t in phases.items())  # every part of a step ran
    assert all(metric(api, cpu, cpu + "_total", thread=t) > s for t, s in threads.items())  # both threads worked
    # vLLM's names for the figures dashboards and autoscalers read: the same values (one scrape), with the model
    _, text, _ = http(api, "GET", "/metrics")
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    one = lambda name, sample, **labels: next(s.value for s in fams[name].samples  # noqa: E731
                                              if s.name == sample and labels.items() <= s.labels.items())
    for h in hist:
        theirs = h.replace("sparkler_", "vllm:")
        assert one(theirs, theirs + "_count", model_name=MODEL) == one(h, h + "_count") > 0
    asked = api.model.tokenizer.apply_chat_template(HELLO, add_generation_prompt=True)
    assert one("vllm:prompt_tokens", "vllm:prompt_tokens_total", model_name=MODEL) >= prompts + 4 * len(asked)
    pairs = (("vllm:generation_tokens", "sparkler_generated_tokens"), ("vllm:num_preemptions", "sparkler_preemptions"),
             ("vllm:prefix_cache_queries", "sparkler_prefix_cache_queried_tokens"),
             ("vllm:num_requests_running", "sparkler_running"))
    for theirs, ours in pairs:
        suffix = "_total" if fams[ours].type == "counter" else ""
        assert one(theirs, theirs + suffix, model_name=MODEL) == one(ours, ours + suffix)
    used = one("vllm:kv_cache_usage_perc", "vllm:kv_cache_usage_perc", model_name=MODEL)
    assert used == pytest.approx(1 - one("sparkler_kv_pages_free", "sparkler_kv_pages_free")
                                 / api.engine.sched.pools[0].capacity)
    # ... and llama.cpp's server's names (its --metrics), from the same scrape
    pairs = (("llamacpp:tokens_predicted", "sparkler_generated_tokens"), ("llamacpp:n_decode", "sparkler_steps"),
             ("llamacpp:requests_processing", "sparkler_running"), ("llamacpp:requests_deferred", "sparkler_waiting"))
    for theirs, ours in pairs:
        suffix = "_total" if fams[ours].type == "counter" else ""
        assert one(theirs, theirs + suffix) == one(ours, ours + suffix)
    computed = one("sparkler_prefix_cache_queried_tokens", "sparkler_prefix_cache_queried_tokens_total") - one(
        "sparkler_prefix_cache_hit_tokens", "sparkler_prefix_cache_hit_tokens_total")
    assert one("llamacpp:prompt_tokens", "llamacpp:prompt_tokens_total") == computed > 0
    assert one("llamacpp:kv_cache_usage_ratio", "llamacpp:kv_cache_usage_ratio") == pytest.approx(used)
    assert one("llamacpp:predicted_tokens_seconds", "llamacpp:predicted_tokens_seconds") > 0
    assert one("llamacpp:prompt_tokens_seconds", "llamacpp:prompt_tokens_seconds") > 0
    # ... and SGLang's (its --enable-metrics), with its model_name label
    for h, theirs in (("sparkler_time_to_first_token_seconds", "sglang:time_to_first_token_seconds"),
                      ("sparkler_request_queue_time_seconds", "sglang:queue_time_seconds")):
        assert one(theirs, theirs + "_count", model_name=MODEL) == one(h, h + "_count") > 0
    pairs = (("sglang:generation_tokens", "sparkler_generated_tokens"), ("sglang:num_queue_reqs", "sparkler_waiting"),
             ("sglang:prompt_tokens", "sparkler_prefix_cache_queried_tokens"),
             ("sglang:cached_tokens", "sparkler_prefix_cache_hit_tokens"),
             ("sglang:num_running_reqs", "sparkler_running"), ("sglang:num_aborted_requests", "sparkler_aborted"))
    for theirs, ours in pairs:
        suffix = "_total" if fams[ours].type == "counter" else ""
        assert one(theirs, theirs + suffix, model_name=MODEL) == one(ours, ours + suffix)
    assert one("sglang:num_requests", "sglang:num_requests_total", model_name=MODEL) == one(
        "sparkler_finished", "sparkler_finished_total") + one("sparkler_aborted", "sparkler_aborted_total") > 0
    assert one("sglang:token_usage", "sglang:token_usage", model_name=MODEL) == pytest.approx(used)
    held = one("sglang:max_total_num_tokens", "sglang:max_total_num_tokens", model_name=MODEL)
    assert held == api.engine.sched.pools[0].capacity * api.engine.page_size
    assert one("sglang:num_used_tokens", "sglang:num_used_tokens", model_name=MODEL) == pytest.approx(used * held)
    assert one("sglang:gen_throughput", "sglang:gen_throughput", model_name=MODEL) > 0


@pytest.fixture(scope="module")
def small_api(smollm):
    """Two slots, at most four requests waiting, streams cut 8 events behind."""
    from engine.runner import RunnerConfig

    rc = RunnerConfig(max_num_seqs=2, max_model_len=512, decode_steps=4, kv_cache_gb=0.1, decode_batch_sizes=(2,))
    yield from live_server(smollm, rc, max_queued=4, max_buffer=8)


def wait_idle(api, timeout: float = 60) -> dict:
    """Poll /health until every slot is free and nothing waits; the last health body."""
    deadline = time.time() + timeout
    while True:
        _, health, _ = http(api, "GET", "/health")
        if (health["free_slots"] == health["slots"] and not health["waiting"]) or time.time() > deadline:
            return health
        time.sleep(0.1)


def test_a_burst_fills_the_free_slots_and_the_queue_then_gets_429(small_api):
    body = {"messages": HELLO, "max_tokens": 24, "ignore_eos": True, "temperature": 0}
    results = [None] * 14
    gate = threading.Barrier(14)

    def one(i):
        gate.wait()
        results[i] = http(small_api, "POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})

    threads = [threading.Thread(target=one, args=(i,)) for i in range(14)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    refused = [r for r in results if r[0] == 429]
    done = [r for r in results if r[0] == 200]
    assert len(refused) + len(done) == 14 and len(done) == 2 + 4  # both slots filled, then the queue
    for _, err, headers in refused:
        assert err["error"]["type"] == "rate_limit_error" and err["error"]["message"] and headers["Retry-After"]
    assert all(r[1]["usage"]["completion_tokens"] == 24 and r[1]["choices"][0]["finish_reason"] == "length"
               for r in done)
    assert http(small_api, "POST", "/v1/chat/completions", body)[0] == 200


def test_the_queue_counts_a_waiting_call_by_its_choices(small_api):
    """Two slots, four queued: a call of 3 prompts x n 2 waiting behind a running one weighs 6 sequences, so a plain
    call after it gets 429 (counted once, it would have been the second of four in the queue)."""
    c = openai.OpenAI(base_url=small_api.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    running = c.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=120, n=2, stream=True,
                                   extra_body={"ignore_eos": True})
    next(iter(running))  # both slots taken
    big = {}
    waiting = threading.Thread(target=lambda: big.setdefault("r", c.completions.create(
        model=MODEL, prompt=["a", "b", "c"], n=2, max_tokens=4, extra_body={"ignore_eos": True})))
    waiting.start()
    deadline = time.time() + 30
    while small_api.server.backlog(1) != 6 and time.time() < deadline:
        time.sleep(0.02)
    assert small_api.server.backlog(1) == 6
    with pytest.raises(openai.RateLimitError) as e:
        c.completions.create(model=MODEL, prompt="hi", max_tokens=2)
    assert "6 sequences waiting" in e.value.message
    assert sum(1 for _ in running) > 0
    waiting.join()
    assert len(big["r"].choices) == 6 and all(ch.finish_reason == "length" for ch in big["r"].choices)
    assert c.completions.create(model=MODEL, prompt="hi", max_tokens=2).choices[0].text is not None


def test_a_request_timeout_frees_its_slot(small_api):
    srv = small_api.server
    srv.request_timeout = 1.0
    try:
        body = {"messages": HELLO, "max_tokens": 500, "ignore_eos": True}
        status, err, _ = http(small_api, "POST", "/v1/chat/completions", body)
        assert status == 504 and err["error"]["code"] == "timeout"
        assert wait_idle(small_api)["free_slots"] == 2
        req = urllib.request.Request(small_api.url + "/v1/chat/completions", method="POST",
                                     data=json.dumps({**body, "stream": True}).encode())
        with urllib.request.urlopen(req, timeout=60) as r:
            events = [line[6:] for line in r.read().decode().splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == "timeout"
        assert wait_idle(small_api)["free_slots"] == 2
    finally:
        srv.request_timeout = None


def stalled_body(api) -> socket.socket:
    """A connection that sent a chat request's headers and half of its body, and then nothing."""
    body = json.dumps({"model": MODEL, "messages": HELLO, "max_tokens": 2}).encode()
    s = socket.create_connection(("127.0.0.1", int(api.url.rsplit(":", 1)[1])))
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body[:len(body) // 2])
    return s


CHAIN = "root ::= r0\n" + "".join(f'r{i} ::= "k{i}" r{i + 1} | "x"\n' for i in range(3000)) + 'r3000 ::= "e"\n'


def test_parsing_is_bounded_stalled_uploads_lock_nobody_out_and_the_request_timeout_cuts_them(small_api):
    """Calls waiting to be parsed count against what could be seated or queued (2 slots + 4): with six held on the
    grammar converter (a 3,000-rule GBNF chain takes it ~4 s), a seventh gets a 429 before it is parsed. Uploads
    that stall halfway do not count (seven of them once locked everyone out with 429 until the body timeout):
    a request beside them is served. A stalled body gets a 408 at --request-timeout."""
    srv = small_api.server
    stalled = [stalled_body(small_api) for _ in range(7)]
    try:
        deadline = time.time() + 30
        while srv.stages["reading"] < 7 and time.time() < deadline:
            time.sleep(0.02)
        assert srv.stages["reading"] == 7
        assert http(small_api, "POST", "/v1/chat/completions", {"messages": HELLO, "max_tokens": 2})[0] == 200
    finally:
        for s in stalled:
            s.close()
    body = {"messages": HELLO, "max_tokens": 2, "response_format": {"type": "grammar", "grammar": CHAIN}}
    slow = [threading.Thread(target=http, args=(small_api, "POST", "/v1/chat/completions", body)) for _ in range(6)]
    for t in slow:
        t.start()
    while srv.stages["parsing"] < 6 and time.time() < deadline:
        time.sleep(0.02)
    status, err, headers = http(small_api, "POST", "/v1/chat/completions", {"messages": HELLO, "max_tokens": 2})
    assert status == 429 and "6 requests being parsed" in err["error"]["message"] and headers["Retry-After"]
    for t in slow:
        t.join(60)
    assert srv.unadmitted == 0
    srv.request_timeout = 1.0
    try:
        s = stalled_body(small_api)
        s.settimeout(30)
        reply = s.recv(65536).decode()
        s.close()
        assert reply.startswith("HTTP/1.1 408") and '"code": "request_timeout"' in reply
        assert http(small_api, "POST", "/v1/chat/completions", {"messages": HELLO, "max_tokens": 2})[0] == 200
    finally:
        srv.request_timeout = None


def test_the_request_timeout_covers_parsing(small_api):
    """A 3,000-rule GBNF chain takes the grammar converter about 4 s (its own limit is 5 s): under a 1 s
    --request-timeout the call gets its 504 at 1 s, not whatever parsing takes."""
    srv = small_api.server
    srv.request_timeout = 1.0
    try:
        t0 = time.time()
        status, err, _ = http(small_api, "POST", "/v1/chat/completions", {
            "messages": HELLO, "max_tokens": 2, "response_format": {"type": "grammar", "grammar": CHAIN}})
        assert status == 504 and err["error"]["code"] == "timeout" and time.time() - t0 < 3
    finally:
        srv.request_timeout = None


def test_a_slow_reader_does_not_hold_up_a_fast_stream(small_api):
    body = json.dumps({"model": MODEL, "messages": HELLO, "max_tokens": 400, "ignore_eos": True, "stream": True,
                       "logprobs": True, "top_logprobs": 20}).encode()
    slow = socket.socket()
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
    slow.connect(("127.0.0.1", int(small_api.url.rsplit(":", 1)[1])))
    slow.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)  # and never read
    try:
        time.sleep(0.5)
        client = openai.OpenAI(base_url=small_api.url + "/v1", api_key="x", max_retries=0, timeout=120)
        chunks = list(client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=32, stream=True,
                                                     stream_options={"include_usage": True},
                                                     temperature=0, extra_body={"ignore_eos": True}))
        assert chunks[-1].usage.completion_tokens == 32  # greedy: a fixed reply (a sampled one once had 16 empty)
        whole = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=32, temperature=0,
                                               extra_body={"ignore_eos": True})
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == whole.choices[0].message.content
        assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) >= 8  # a dispatch's 4 tokens each
    finally:
        slow.close()
    assert wait_idle(small_api, 120)["free_slots"] == 2


def test_a_client_that_takes_nothing_is_cut_after_the_stall_timeout_and_one_behind_is_told(small_api):
    """A streaming client that stops reading altogether never comes back for the events it is behind, so
    `max_buffer` alone would never cut it: the server's writes block. After `stall_timeout` seconds of that its
    connection is reset (not a clean end it could mistake for a whole reply) and the call is marked cut (accounted
    as 408); before, the handler and connection stayed forever and held up shutdown by minutes. A client that fell
    `max_buffer` events behind (`StreamOverflow`) gets an error event before the end, where it used to get a clean
    end that the SDKs took for a whole reply. The streams are `Server.write` inside `Server.streaming`, as every
    API's stream is, on real sockets: 64 MiB to a client that never reads (more than the kernel's buffers hold,
    which a model's reply here is not), and a stream that overflows after its first event."""
    import asyncio

    from aiohttp import web

    from engine.llm import StreamOverflow
    from server.app import Call

    srv, calls = small_api.server, {}

    async def flood(request):
        resp, call = web.StreamResponse(), Call(rid="flood")
        calls["flood"] = call
        async with srv.streaming(request, resp, call, fail=None):
            await resp.prepare(request)
            for _ in range(64):
                await srv.write(resp, b"x" * (1 << 20))
        return resp

    async def behind(request):
        resp, call = web.StreamResponse(), Call(rid="behind")
        calls["behind"] = call

        async def fail(e):
            await srv.write(resp, b"data: " + json.dumps(e.body()).encode() + b"\n\n")

        async with srv.streaming(request, resp, call, fail):
            await resp.prepare(request)
            await srv.write(resp, b"data: {}\n\n")
            raise StreamOverflow("as AsyncEngine raises it")
        return resp

    app = web.Application()
    app.router.add_get("/flood", flood)
    app.router.add_get("/behind", behind)
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    runner = web.AppRunner(app)

    async def start():
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        return runner.addresses[0][1]

    port = asyncio.run_coroutine_threadsafe(start(), loop).result()
    stalled = socket.socket()
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
    stalled.connect(("127.0.0.1", port))
    stalled.sendall(b"GET /flood HTTP/1.1\r\nHost: x\r\n\r\n")  # and never read
    srv.stall_timeout = 1.0
    try:
        deadline = time.time() + 60
        while not ("flood" in calls and calls["flood"].cut) and time.time() < deadline:
            time.sleep(0.1)
        assert calls["flood"].cut
        stalled.settimeout(10)
        got = 0
        with pytest.raises(ConnectionResetError):  # what the buffers held, then the reset
            while chunk := stalled.recv(1 << 20):
                got += len(chunk)
        assert got < 64 << 20
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/behind", timeout=30) as r:
            events = [line[6:] for line in r.read().decode().splitlines() if line.startswith("data: ")]
        assert json.loads(events[-1])["error"]["code"] == "client_too_slow" and calls["behind"].cut
    finally:
        srv.stall_timeout = STALL_TIMEOUT
        stalled.close()
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result()
        loop.call_soon_threadsafe(loop.stop)


def test_a_stream_whose_consumer_falls_behind_is_cut_and_its_request_aborted(small_api, smollm):
    """The loopback socket buffers megabytes, so the cut is shown on the stream itself: a consumer that stops
    reading while 48 tokens are made (counted, not timed: a shape may compile meanwhile; an event is a dispatch's 4
    tokens) finds `StreamOverflow` and the engine frees the request's slot."""
    import asyncio

    from engine import SamplingParams
    from engine.llm import StreamOverflow

    aengine, eng = small_api.server.aengine, small_api.engine
    aborted = eng.aborted

    async def lagging():
        req = eng.make_request([1, 2, 3, 4], SamplingParams(temperature=0, max_tokens=480, ignore_eos=True))
        events = aengine.stream(req)
        deadline = time.time() + 300
        while len(req.choices[0].token_ids) < 48 and time.time() < deadline:  # more than 8 events pile up
            await asyncio.sleep(0.05)
        with pytest.raises(StreamOverflow):
            async for _ in events:
                pass
        return req

    req = asyncio.run(lagging())
    assert wait_idle(small_api)["free_slots"] == 2 and eng.aborted == aborted + 1
    assert 8 <= len(req.choices[0].token_ids) < 480 and req.choices[0].finish_reason == "abort"


def test_a_stream_closed_before_its_first_step_aborts_its_request(small_api):
    """A call cut while its response was still being prepared closes its events before they started: the request
    is aborted then too (an async generator closed unstarted skips its `finally`; it held its slot to the end)."""
    import asyncio

    from engine import SamplingParams

    aengine, eng = small_api.server.aengine, small_api.engine
    aborted = eng.aborted

    async def cut():
        req = eng.make_request([1, 2, 3, 4], SamplingParams(temperature=0, max_tokens=480, ignore_eos=True))
        await aengine.stream(req).aclose()
        return req

    req = asyncio.run(cut())
    assert wait_idle(small_api)["free_slots"] == 2 and eng.aborted == aborted + 1
    assert len(req.choices[0].token_ids) < 480 and req.choices[0].finish_reason == "abort"


def children(pid: int) -> list[int]:
    """The live (not zombie) processes whose parent is `pid`."""
    out = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):  # not a process, or gone meanwhile
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            out.append(int(entry))
    return out


def alive(pid: int) -> bool:
    """A process with this pid runs (a zombie does not count)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_sigterm_drains_streams_in_flight_and_exits_0(tmp_path):
    """Streams in flight at SIGTERM finish, and so does a background response waiting for a slot (stored as it
    ended); a new request gets a 503, the process exits 0, and the grammar sandbox's child process (started by a
    structured-output request) is gone with it. The server runs HTTPS here (`--ssl-certfile`, a certificate from
    trustme's throwaway CA, which the client trusts)."""
    import ssl

    import httpx
    import trustme

    from server.store import ResponseStore

    db, ca = str(tmp_path / "responses.sqlite"), trustme.CA()
    issued = ca.issue_cert("127.0.0.1")
    issued.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    issued.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    child = spawn("--max-num-seqs", "2", "--max-model-len", "512", "--kv-cache-gb", "0.1", "--decode-batch-sizes", "2",
                  "--warmup", "none", "--drain-timeout", "120", "--responses-db", db, "--ssl-certfile",
                  str(tmp_path / "cert.pem"), "--ssl-keyfile", str(tmp_path / "key.pem"),
                  timeout=240)  # small_api's: programs from the store
    proc, lines = child.proc, child.lines
    trusted = ssl.create_default_context()
    ca.configure_trust(trusted)
    try:
        assert child.url.startswith("https://127.0.0.1:")
        with pytest.raises(openai.APIConnectionError):  # a client that does not trust the certificate
            openai.OpenAI(base_url=child.url + "/v1", api_key="x", max_retries=0).models.list()
        client = openai.OpenAI(base_url=child.url + "/v1", api_key="x", max_retries=0, timeout=300,
                               http_client=httpx.Client(verify=trusted, timeout=300))
        client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=4,
                                       response_format={"type": "json_object"})
        sandbox = children(proc.pid)
        assert len(sandbox) == 1  # the grammar was checked in a child process
        got, started = [None] * 2, [threading.Event() for _ in range(2)]

        def stream(i):
            n = 0
            for c in client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=48, stream=True,
                                                    stream_options={"include_usage": True},
                                                    extra_body={"ignore_eos": True, "seed": i}):
                started[i].set()
                n = c.usage.completion_tokens if c.usage else n
            got[i] = n

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        assert all(e.wait(120) for e in started)
        later = client.responses.create(model=MODEL, input="Hi", max_output_tokens=8, background=True,
                                        extra_body={"ignore_eos": True})
        assert later.status == "queued"  # both slots are taken
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        try:
            client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2)
            raise AssertionError("a request during the drain was served")
        except openai.APIStatusError as e:
            assert e.status_code == 503 and e.response.headers["Retry-After"] and e.body["code"] == "shutting_down"
        for t in threads:
            t.join(300)
        assert got == [48, 48]
        assert proc.wait(120) == 0, "".join(lines)
        assert not alive(sandbox[0])
        stored = ResponseStore(db).get(later.id)[0]
        assert stored["status"] == "incomplete" and stored["usage"]["output_tokens"] == 8
    finally:
        if proc.poll() is None:
            proc.kill()


def test_the_drain_timeout_ends_what_is_left_as_a_shutdown_and_a_stalled_upload_does_not_hold_the_exit(tmp_path):
    """Past --drain-timeout, requests still running get the 503 `shutting_down` that new ones get (they used to get
    a 500 "engine failed"), whole or as a stream's error event, and a background response is stored failed with
    it; a client that sent half a body and stalled does not hold the exit (it used to add 70-90 s); and the server
    raised its open-files limit at start."""
    from server.store import ResponseStore

    db = str(tmp_path / "responses.sqlite")
    child = spawn("--max-num-seqs", "2", "--max-model-len", "512", "--kv-cache-gb", "0.1", "--decode-batch-sizes", "2",
                  "--warmup", "none", "--drain-timeout", "2", "--responses-db", db, timeout=240)
    proc = child.proc
    try:
        with open(f"/proc/{proc.pid}/limits") as f:
            soft = next(line.split()[3] for line in f if line.startswith("Max open files"))
        assert soft == "unlimited" or int(soft) >= min(resource.getrlimit(resource.RLIMIT_NOFILE)[1], 65536)
        client = openai.OpenAI(base_url=child.url + "/v1", api_key="x", max_retries=0, timeout=300)
        got, started = {}, threading.Event()

        def whole():
            try:
                client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=480,
                                               extra_body={"ignore_eos": True})
            except openai.APIStatusError as e:
                got["whole"] = (e.status_code, e.body["code"])

        def stream():
            try:
                for _ in client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=480, stream=True,
                                                        extra_body={"ignore_eos": True}):
                    started.set()
            except openai.APIError as e:
                got["stream"] = e.body["code"]

        threads = [threading.Thread(target=whole), threading.Thread(target=stream)]
        for t in threads:
            t.start()
        assert started.wait(120)
        behind = client.responses.create(model=MODEL, input="Hi", max_output_tokens=480, background=True,
                                         extra_body={"ignore_eos": True})
        upload = socket.create_connection(("127.0.0.1", int(child.url.rsplit(":", 1)[1])))
        upload.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{\"prompt\": ")
        time.sleep(0.5)
        t0 = time.time()
        proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(120)
        assert got == {"whole": (503, "shutting_down"), "stream": "shutting_down"}
        assert proc.wait(60) == 0 and time.time() - t0 < 2 + 10 + 8  # drain, error events, the grace, slack
        upload.close()
        stored = ResponseStore(db).get(behind.id)[0]
        assert stored["status"] == "failed" and stored["error"]["code"] == "shutting_down"
    finally:
        if proc.poll() is None:
            proc.kill()


def test_asyncios_failed_accepts_are_logged_once_in_ten_seconds(caplog):
    """Out of file descriptors, asyncio reports every failed accept through the loop's exception handler (325 MB of
    log in 100 s, measured); `sparkler serve` lets one through per 10 s. Other errors pass."""
    import asyncio
    import logging

    from server.__main__ import ACCEPT_FAILED, Throttled

    throttle, logger = Throttled(ACCEPT_FAILED), logging.getLogger("asyncio")
    logger.addFilter(throttle)
    loop = asyncio.new_event_loop()
    try:
        with caplog.at_level(logging.ERROR, logger="asyncio"):
            for _ in range(1000):
                loop.call_exception_handler({"message": ACCEPT_FAILED, "exception": OSError(24, "Too many open files")})
            loop.call_exception_handler({"message": "something else"})
        assert [r.getMessage().splitlines()[0] for r in caplog.records] == [ACCEPT_FAILED, "something else"]
    finally:
        logger.removeFilter(throttle)
        loop.close()


def test_a_request_aiohttp_cannot_parse_is_one_warning_line_and_the_server_serves_on(api, caplog):
    """A bad chunk size, header or method gets aiohttp's 400; `sparkler serve` logs it as one WARNING line, at most
    one per 10 s, where aiohttp logs an ERROR with a traceback."""
    import logging

    from server.__main__ import Malformed

    logger, quiet = logging.getLogger("aiohttp.server"), Malformed()
    logger.addFilter(quiet)
    try:
        with caplog.at_level(logging.WARNING, logger="aiohttp.server"):
            for raw in (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nZZ\r\n",
                        b"GET /v1/models HTTP/1.1\r\nHo st: x\r\n\r\n", b"GARBAGE\r\n\r\n"):
                with socket.create_connection(("127.0.0.1", int(api.url.rsplit(":", 1)[1])), timeout=30) as s:
                    s.sendall(raw)
                    assert s.recv(100).startswith(b"HTTP/1.0 400")
            time.sleep(0.5)  # (logged after the answer)
        records = [r for r in caplog.records if r.name == "aiohttp.server"]
        assert [(r.levelname, r.exc_info) for r in records] == [("WARNING", None)], records
        assert "Invalid character in chunk size" in records[0].getMessage()
    finally:
        logger.removeFilter(quiet)
    status, out, _ = http(api, "GET", "/v1/models")
    assert status == 200 and out["data"]


# ---- fuzzing ---------------------------------------------------------------------------------------------------

FIELDS = ["model", "messages", "prompt", "temperature", "top_p", "top_k", "min_p", "typical_p", "frequency_penalty",
          "presence_penalty", "repetition_penalty", "logit_bias", "mirostat_target", "mirostat_lr", "seed", "n",
          "max_tokens", "max_completion_tokens", "stop", "ignore_eos", "logprobs", "top_logprobs", "echo", "echo_last",
          "raw_output", "return_token_ids", "stream", "stream_options", "context_length_exceeded_behavior",
          "response_format", "tools", "user", "prompt_cache_max_len", "prompt_cache_isolation_key", "suffix",
          "best_of"]
COUNTS = {"max_tokens", "max_completion_tokens", "n", "echo_last"}  # large valid values would only be slow


def json_values(small_ints: bool = False):
    """Any JSON value (nested lists and objects included); `small_ints` keeps integers below 9."""
    ints = st.integers(-3, 8) if small_ints else st.one_of(st.integers(-5, 300), st.sampled_from([-2**63, 2**40]))
    scalars = st.one_of(st.none(), st.booleans(), ints, st.floats(allow_nan=False, allow_infinity=False),
                        st.text(max_size=12))
    return st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.text(max_size=8), inner, max_size=4), max_leaves=12)


# max_output_tokens stays 2 (removed, it would be the default 2048: minutes of decoding; its checks are max_tokens')
R_FIELDS = ["model", "input", "instructions", "temperature", "top_p", "top_k", "tools",
            "tool_choice", "parallel_tool_calls", "text", "reasoning", "store", "previous_response_id", "stream",
            "metadata", "stop", "seed", "reasoning_effort", "chat_template_kwargs"]
A_FIELDS = ["model", "messages", "system", "max_tokens", "stop_sequences", "temperature", "top_p", "top_k", "tools",
            "tool_choice", "metadata", "stream", "thinking", "output_config"]
ROUTES = {"/v1/chat/completions": ({"messages": HELLO, "max_tokens": 2}, FIELDS),
          "/v1/completions": ({"prompt": "Once upon a time", "max_tokens": 2}, FIELDS),
          "/v1/responses": ({"input": "Once upon a time", "max_output_tokens": 2}, R_FIELDS),
          "/v1/messages": ({"messages": HELLO, "max_tokens": 2}, A_FIELDS)}


def mutated(route: str):
    """A small valid body for `route` with one field set to a random JSON value (or removed)."""
    base, fields = ROUTES[route]
    return st.sampled_from(fields).flatmap(lambda f: st.one_of(
        json_values(f in COUNTS), st.just(...)).map(lambda v: (f, v))).map(
        lambda fv: {k: v for k, v in {**base, fv[0]: fv[1]}.items() if v is not ...}).map(
        bounded if route in ("/v1/chat/completions", "/v1/completions") else lambda body: body)


def bounded(body: dict) -> dict:
    """A chat or completions body whose mutation removed its count, or set it to null, keeps 2 tokens through the
    other field: the default (2,048, the context's room here) would decode ~1,000 tokens, ~25 s per example."""
    if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
        return {**body, "max_completion_tokens": 2}
    return body


@pytest.mark.parametrize("route", list(ROUTES))
def test_random_json_in_every_field_gets_a_200_or_a_clean_4xx(api, route):
    @settings(max_examples=60, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(mutated(route))
    def one(body):
        status, out, _ = http(api, "POST", route, body, {"Content-Type": "application/json"})
        assert status == 200 or 400 <= status < 500, (body, status, out)
        if status != 200 and route == "/v1/messages":  # Anthropic's shape
            assert out["type"] == "error" and set(out["error"]) == {"type", "message"} and out["error"]["message"]
        elif status != 200:
            assert set(out["error"]) == {"message", "type", "param", "code"} and out["error"]["message"], out

    one()
    status, out, _ = http(api, "POST", route, ROUTES[route][0])
    assert status == 200 and out["usage"]["completion_tokens" if "completions" in route else "output_tokens"] >= 1
    assert wait_idle(api)["free_slots"] == 32
