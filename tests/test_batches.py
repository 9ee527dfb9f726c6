"""OpenAI's Files and Batches APIs (`server/batches.py`) through the official openai client over a real socket."""

import json
import time
import urllib.error
import urllib.request

import openai
import pytest

MODEL = "smollm2-135m-instruct"
CHAT = "/v1/chat/completions"


def line(custom_id: str, body: dict, url: str = CHAT) -> str:
    """One input line of a batch."""
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body})


def upload(client, lines: list[str]):
    """The lines uploaded as a batch input file."""
    return client.files.create(file=("in.jsonl", ("\n".join(lines) + "\n").encode()), purpose="batch")


def wait(client, batch_id: str, until=("completed", "failed", "cancelled", "expired"), timeout: float = 300):
    """The batch once its status is one of `until`."""
    end = time.monotonic() + timeout
    while True:
        batch = client.batches.retrieve(batch_id)
        if batch.status in until:
            return batch
        assert time.monotonic() < end, f"the batch is still {batch.status}"
        time.sleep(0.1)


def results(client, file_id: str) -> list[dict]:
    """A batch output or error file's lines."""
    return [json.loads(x) for x in client.files.content(file_id).text.splitlines()]


def test_a_batch_answers_each_line_as_its_route_does_and_splits_errors_from_output(client):
    """Upload, create, poll and download: each 200 line's body is what the live route answers (greedy chat), in the
    input's order with its custom_id; a line the route refuses (400) goes to the error file with its status and
    error body; counts, listing and deletion are OpenAI's."""
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "Name a fruit."}], "max_tokens": 8,
            "temperature": 0}
    other = {**chat, "messages": [{"role": "user", "content": "Name a color."}]}
    lines = [line("fruit", chat), line("empty", {**chat, "messages": []}), line("color", other)]
    source = upload(client, lines)
    assert source.purpose == "batch" and source.filename == "in.jsonl" and source.id.startswith("file-")
    batch = client.batches.create(input_file_id=source.id, endpoint=CHAT, completion_window="24h",
                                  metadata={"run": "one"})
    assert batch.status in ("validating", "in_progress") and batch.metadata == {"run": "one"}
    batch = wait(client, batch.id)
    assert batch.status == "completed", batch.errors
    assert (batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed) == (3, 2, 1)
    assert batch.in_progress_at and batch.completed_at and batch.expires_at == batch.created_at + 24 * 3600
    out = results(client, batch.output_file_id)
    assert [r["custom_id"] for r in out] == ["fruit", "color"]
    for r, body in zip(out, (chat, other)):
        assert r["response"]["status_code"] == 200 and r["error"] is None and r["id"].startswith("batch_req_")
        want = client.chat.completions.create(**body).choices[0].message.content
        assert r["response"]["body"]["choices"][0]["message"]["content"] == want
    (err,) = results(client, batch.error_file_id)
    assert err["custom_id"] == "empty" and err["response"]["status_code"] == 400
    assert err["response"]["body"]["error"]["param"] == "messages"
    listed = {f.id: f for f in client.files.list().data}
    assert {source.id, batch.output_file_id, batch.error_file_id} <= set(listed)
    assert listed[batch.output_file_id].purpose == "batch_output"
    assert listed[batch.error_file_id].bytes == len(client.files.content(batch.error_file_id).content)
    assert batch.id in {b.id for b in client.batches.list().data}
    assert client.files.delete(source.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(source.id)
    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve("batch_none")


def test_a_batch_with_bad_lines_fails_naming_each_and_bad_calls_get_400s(client):
    """Lines that are not JSON, lack or repeat a custom_id, or name another URL fail the batch before any runs
    (OpenAI's `errors`, numbered from 1); a missing file is a 404; a wrong endpoint, window or purpose a 400."""
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    lines = [line("a", chat), "not json", json.dumps({"method": "POST", "url": CHAT, "body": chat}), line("a", chat),
             line("b", {"model": MODEL, "prompt": "x"}, "/v1/completions"), line(["c"], chat),
             "[" * 100_000 + "]" * 100_000, line("d", chat)[:-1] + ', "x": "\udcff"}']  # nests past Python's stack
    data = ("\n".join(lines) + "\n").encode(errors="surrogateescape")  # the last line's byte 0xff: no UTF-8
    batch = client.batches.create(input_file_id=client.files.create(file=("in.jsonl", data), purpose="batch").id,
                                  endpoint=CHAT, completion_window="24h")
    batch = wait(client, batch.id)
    assert batch.status == "failed" and batch.failed_at and batch.output_file_id is None
    assert [(e.line, e.code) for e in batch.errors.data] == [
        (2, "invalid_request"), (3, "missing_custom_id"), (4, "duplicate_custom_id"), (5, "mismatched_url"),
        (6, "missing_custom_id"), (7, "invalid_request"), (8, "invalid_request")]
    assert "UTF-8" in batch.errors.data[-1].message
    good = upload(client, [line("a", chat)]).id
    with pytest.raises(openai.NotFoundError):
        client.batches.create(input_file_id="file-none", endpoint=CHAT, completion_window="24h")
    for kw, param in (({"endpoint": "/v1/models"}, "endpoint"), ({"completion_window": "1h"}, "completion_window")):
        with pytest.raises(openai.BadRequestError) as e:
            client.batches.create(**{"input_file_id": good, "endpoint": CHAT, "completion_window": "24h", **kw})
        assert e.value.body["param"] == param
    with pytest.raises(openai.BadRequestError) as e:
        client.files.create(file=("x.jsonl", b"{}\n"), purpose="fine-tune")
    assert e.value.body["param"] == "purpose"
    nested = (b'--xx\r\nContent-Type: multipart/mixed; boundary=yy\r\nContent-Disposition: form-data; name="file"'
              b'\r\n\r\n--yy\r\nContent-Disposition: attachment; filename="a"\r\n\r\nabc\r\n--yy--\r\n--xx--\r\n')
    charset = (b'--xx\r\nContent-Disposition: form-data; name="purpose"\r\nContent-Type: text/plain; charset=bogus'
               b'\r\n\r\nbatch\r\n--xx--\r\n')
    header = b'--xx\r\nContent-Disposition: form-data; name="purpose"\r\nBad Header Line\r\n\r\nbatch\r\n--xx--\r\n'
    encoding = (b'--xx\r\nContent-Disposition: form-data; name="purpose"\r\nContent-Transfer-Encoding: bogus'
                b'\r\n\r\nbatch\r\n--xx--\r\n')
    # a part that is itself multipart, a field in a charset or a transfer encoding no one knows, a broken part
    # header: 400s
    for form in (nested, charset, header, encoding):
        asked = urllib.request.Request(str(client.base_url) + "files", data=form,
                                       headers={"Content-Type": "multipart/form-data; boundary=xx"})
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(asked, timeout=30)
        assert e.value.code == 400 and json.load(e.value)["error"]["param"] == "file"


def test_uploads_stream_past_the_body_limit_up_to_the_file_limit(client, api, monkeypatch):
    """A file larger than the server's JSON body limit (1 MiB here) uploads whole and reads back the same; one past
    --max-file-mb is a 413."""
    data = b"".join(line(f"id{i}", {"model": MODEL, "prompt": "x" * 200}).encode() + b"\n" for i in range(6000))
    assert len(data) > api.server.max_body
    f = client.files.create(file=("big.jsonl", data), purpose="batch")
    assert f.bytes == len(data) and client.files.content(f.id).content == data
    monkeypatch.setattr(api.server.batches, "max_file", 1000)
    with pytest.raises(openai.APIStatusError) as e:
        client.files.create(file=("big.jsonl", data), purpose="batch")
    assert e.value.status_code == 413
    assert f.id in {x.id for x in client.files.list().data} and len(client.files.list(limit=1).data) == 1


def long_lines(n: int, tokens: int = 256) -> list[str]:
    """`n` requests that each run for `tokens` tokens."""
    body = {"model": MODEL, "prompt": "Count:", "max_tokens": tokens, "ignore_eos": True, "temperature": 0}
    return [line(f"r{i}", {**body, "prompt": f"Count {i}:"}, "/v1/completions") for i in range(n)]


def test_a_cancelled_batch_stops_its_requests_and_keeps_what_finished(client, api):
    """Cancelling a running batch aborts the lines in flight (the engine is left with no work) and sends no more;
    it ends `cancelled` with counts below the total."""
    batch = client.batches.create(input_file_id=upload(client, long_lines(48)).id, endpoint="/v1/completions",
                                  completion_window="24h")
    wait(client, batch.id, until=("in_progress",))
    assert client.batches.cancel(batch.id).status == "cancelling"
    batch = wait(client, batch.id)
    assert batch.status == "cancelled" and batch.cancelling_at and batch.cancelled_at
    done = batch.request_counts.completed + batch.request_counts.failed
    assert done < batch.request_counts.total == 48
    end = time.monotonic() + 30
    while api.engine.has_work():
        assert time.monotonic() < end, "the batch's requests still run after its cancel"
        time.sleep(0.1)
    assert client.batches.cancel(batch.id).status == "cancelled"  # an ended batch stays as it is


def test_a_batch_past_its_window_expires_with_its_unanswered_lines_as_errors(client, api, monkeypatch):
    """A batch still running when its window closes (2 s here, 24 h served) stops, and each line it did not answer
    is in the error file as `batch_expired`, so every line is accounted for."""
    from server import batches

    monkeypatch.setattr(batches, "WINDOW", 2)
    batch = client.batches.create(input_file_id=upload(client, long_lines(48)).id, endpoint="/v1/completions",
                                  completion_window="24h")
    batch = wait(client, batch.id)
    assert batch.status == "expired" and batch.expired_at
    errors = results(client, batch.error_file_id)
    answered = results(client, batch.output_file_id) if batch.output_file_id else []
    assert sorted(r["custom_id"] for r in errors + answered) == sorted(f"r{i}" for i in range(48))
    assert any(r["error"] and r["error"]["code"] == "batch_expired" for r in errors)
    assert batch.request_counts.failed == len(errors) and batch.request_counts.completed == len(answered)


def test_a_fault_of_the_servers_fails_the_batch_with_every_line_accounted_for(client, api, monkeypatch):
    """When sending fails for a reason of the server's own (here its loopback listener will not start), the batch
    ends `failed` with a `server_error`, each line in the error file; an Anthropic batch ends with each `errored`.
    Nothing is left `in_progress`."""
    import anthropic

    async def broken() -> str:
        raise OSError("no port to listen on")

    monkeypatch.setattr(api.server.batches.loopback, "start", broken)
    batch = client.batches.create(input_file_id=upload(client, long_lines(3)).id, endpoint="/v1/completions",
                                  completion_window="24h")
    batch = wait(client, batch.id)
    assert batch.status == "failed" and batch.failed_at and batch.errors.data[0].code == "server_error"
    errors = results(client, batch.error_file_id)
    assert [r["custom_id"] for r in errors] == ["r0", "r1", "r2"]
    assert {r["error"]["code"] for r in errors} == {"server_error"} and batch.request_counts.failed == 3
    claude = anthropic.Anthropic(base_url=api.url, api_key="unused", max_retries=0, timeout=120)
    params = {"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]}
    mb = claude.messages.batches.create(requests=[{"custom_id": "a", "params": params}])
    mb = wait_ended(claude, mb.id)
    assert mb.request_counts.errored == 1
    (res,) = claude.messages.batches.results(mb.id)
    assert res.result.type == "errored" and res.result.error.type == "api_error"


@pytest.fixture()
def claude(api):
    """The official anthropic client pointed at the live server."""
    import anthropic

    return anthropic.Anthropic(base_url=api.url, api_key="unused", max_retries=0, timeout=120)


def wait_ended(claude, batch_id: str, timeout: float = 300):
    """The message batch once it has ended."""
    end = time.monotonic() + timeout
    while (batch := claude.messages.batches.retrieve(batch_id)).processing_status != "ended":
        assert time.monotonic() < end, f"the message batch is still {batch.processing_status}"
        time.sleep(0.1)
    return batch


def test_a_message_batch_answers_each_request_as_messages_does(claude):
    """Anthropic's Message Batches through the anthropic client: each request's result is the message
    `/v1/messages` answers (greedy), an invalid one `errored` with Anthropic's error body; counts, listing, results
    and deletion; bad batches are 400s in Anthropic's shape."""
    import anthropic

    ask = {"model": MODEL, "max_tokens": 8, "temperature": 0}
    reqs = [{"custom_id": "fruit", "params": {**ask, "messages": [{"role": "user", "content": "Name a fruit."}]}},
            {"custom_id": "bad", "params": {**ask, "messages": [{"role": "tool", "content": "x"}]}},
            {"custom_id": "color", "params": {**ask, "messages": [{"role": "user", "content": "Name a color."}]}}]
    batch = claude.messages.batches.create(requests=reqs)
    assert batch.type == "message_batch" and batch.id.startswith("msgbatch_") and batch.results_url is None
    batch = wait_ended(claude, batch.id)
    counts = batch.request_counts
    assert (counts.succeeded, counts.errored, counts.processing, counts.canceled) == (2, 1, 0, 0) and batch.ended_at
    got = {r.custom_id: r.result for r in claude.messages.batches.results(batch.id)}
    assert set(got) == {"fruit", "bad", "color"}
    for r in reqs[::2]:
        params = {k: v for k, v in r["params"].items() if k != "temperature"}
        want = claude.messages.create(**params, extra_body={"temperature": 0})
        assert got[r["custom_id"]].type == "succeeded"
        assert got[r["custom_id"]].message.content[0].text == want.content[0].text
    assert got["bad"].type == "errored" and got["bad"].error.error.type == "invalid_request_error"
    assert batch.id in {b.id for b in claude.messages.batches.list(limit=5).data}
    assert claude.messages.batches.delete(batch.id).type == "message_batch_deleted"
    with pytest.raises(anthropic.NotFoundError):
        claude.messages.batches.retrieve(batch.id)
    for bad in ([], [reqs[0], reqs[0]], [{"custom_id": "no spaces", "params": reqs[0]["params"]}]):
        with pytest.raises(anthropic.BadRequestError) as e:
            claude.messages.batches.create(requests=bad)
        assert e.value.body["error"]["type"] == "invalid_request_error"


def test_a_canceled_message_batch_ends_with_every_request_accounted_for(claude, api):
    """Canceling a running message batch stops its requests in flight; the batch ends with a result for every
    request, those it did not finish `canceled`, and cannot be deleted while it runs."""
    import anthropic

    params = {"model": MODEL, "max_tokens": 256, "ignore_eos": True, "temperature": 0}
    reqs = [{"custom_id": f"r{i}", "params": {**params, "messages": [{"role": "user", "content": f"Count {i}"}]}}
            for i in range(48)]
    batch = claude.messages.batches.create(requests=reqs)
    with pytest.raises(anthropic.BadRequestError):
        claude.messages.batches.delete(batch.id)
    assert claude.messages.batches.cancel(batch.id).processing_status in ("canceling", "ended")
    batch = wait_ended(claude, batch.id)
    assert batch.cancel_initiated_at and batch.request_counts.canceled > 0
    kinds = [r.result.type for r in claude.messages.batches.results(batch.id)]
    assert len(kinds) == 48 and kinds.count("canceled") == batch.request_counts.canceled
    end = time.monotonic() + 30
    while api.engine.has_work():
        assert time.monotonic() < end, "the batch's requests still run after its cancel"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def urgent_api(smollm):
    """A live server like `api` (its programs) that seats work by priority."""
    from conftest import ENGINE, live_server

    from engine.runner import RunnerConfig

    yield from live_server(smollm, RunnerConfig(**ENGINE, scheduling_policy="priority"))


def test_under_priority_scheduling_a_batch_runs_behind_interactive_requests(urgent_api):
    """--scheduling-policy priority: a batch's lines run at --batch-priority (1) unless they name one, so a client's
    request at the default 0 takes a seat from the batch (a preemption: more lines than slots are in flight, so the
    queue is never empty) and is answered while the batch still runs; a line that names its own priority keeps it."""
    client = openai.OpenAI(base_url=urgent_api.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    urgent_api.server.batches.concurrency = 64
    lines = long_lines(48, 96)  # 32 running take 8 pages each: the pool is not the limit
    lines[0] = line("mine", {"model": MODEL, "prompt": "Hi", "max_tokens": 1, "priority": -3}, "/v1/completions")
    batch = client.batches.create(input_file_id=upload(client, lines).id, endpoint="/v1/completions",
                                  completion_window="24h")
    sched = urgent_api.engine.sched
    end = time.monotonic() + 120
    while not (sched.waiting and [r.priority for r, _ in list(sched.running.values())] == [1] * 32):
        assert time.monotonic() < end, "the batch never filled the slots"  # ("mine" ran first, and is done)
        time.sleep(0.02)
    before = sched.preemptions
    reply = client.completions.create(model=MODEL, prompt="Quick:", max_tokens=4, temperature=0)
    assert reply.choices[0].finish_reason == "length" and sched.preemptions > before
    assert client.batches.retrieve(batch.id).status == "in_progress"
    client.batches.cancel(batch.id)
    batch = wait(client, batch.id)
    out = results(client, batch.output_file_id)
    assert out[0]["custom_id"] == "mine" and out[0]["response"]["status_code"] == 200


def test_results_held_past_a_gap_are_written_once_and_not_counted_unanswered():
    """`InOrder`: results arriving out of order wait for the lines before them; a stopped batch writes those held
    and reports only the lines with no result (an expired batch's `batch_expired` lines)."""
    from server.batch import InOrder, lines_of

    written = []
    order = InOrder(6, lambda out: written.append(out["i"]))
    for i in (0, 3, 5):
        order.put(i, {"i": i})
    assert written == [0]
    assert order.rest() == [1, 2, 4] and written == [0, 3, 5]
    assert lines_of('{"a": "x\u2028y"}\r\n\n{"b": 1}\n') == ['{"a": "x\u2028y"}', '{"b": 1}']


def test_a_results_file_cut_short_by_a_kill_loses_only_its_last_line(tmp_path):
    """`answered` (what a resumed batch has done): a last line the server was killed writing is dropped from the file,
    so that request is sent again and its result appended whole."""
    from server.batches import answered

    path = tmp_path / "out.jsonl"
    assert answered(str(path)) == []
    path.write_text('{"custom_id": "a"}\n{"custom_id": "b"}\n{"custom_id": "c", "resp')
    assert [r["custom_id"] for r in answered(str(path))] == ["a", "b"]
    assert path.read_text() == '{"custom_id": "a"}\n{"custom_id": "b"}\n'
