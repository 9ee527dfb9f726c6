"""Prometheus metrics through `prometheus_client` (the reference client: exposition format, histogram buckets and
label handling done right, and a text parser the tests read it back with).

Handlers observe request counts and latencies; the engine's gauges and counters are read from `Engine.stats()` at
scrape time by a custom collector, so the engine thread never touches the metrics. Every name is in the `sparkler_`
namespace; the README lists them. The figures dashboards, autoscalers and inference gateways read from vLLM are
exposed under vLLM's names too (`PeerNames`: `vllm:num_requests_waiting`, `vllm:kv_cache_usage_perc`, ...), each
read from the same counters at scrape time, with vLLM's `model_name` label; SGLang's under its names, with the same
label (`sglang:num_queue_reqs`, `sglang:token_usage`, ...); and llama.cpp's server's under
its names (`LlamaCppNames`: `llamacpp:tokens_predicted_total`, `llamacpp:kv_cache_usage_ratio`, ...).
"""

from __future__ import annotations

import bisect
import time

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

LATENCY = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
PER_TOKEN = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

ENGINE_GAUGES = {
    "running": "sequences decoding",
    "waiting": "requests and preempted sequences waiting for a slot",
    "prefilling": "requests whose long prompt is being prefilled",
    "slots": "decode slots (--max-num-seqs)",
    "free_slots": "decode slots free",
    "kv_pages_total": "KV pages in the pool",
    "kv_pages_free": "KV pages an allocation can take (empty or evictable)",
    "kv_pages_cached": "KV pages holding a reusable prompt prefix",
    "kv_page_size": "tokens per KV page",
    "prefix_cache_hit_rate": "share of prompt tokens served from the prefix cache",
    "max_model_len": "context cap per sequence",
    "lora_slots": "LoRA adapters the devices hold at once (--max-loras; 0: LoRA off)",
    "lora_adapters": "LoRA adapters loaded",
    "sleep_level": "device memory given back by sleep mode: 0 none, 1 the KV pool or the weights kept on the host, "
                   "2 the weights discarded",
    "image_slots": "pictures whose features the devices hold at once (--max-images; 0: the model reads text only)",
    "images_held": "pictures whose features the devices keep, found again by their digest (a slot is reused when "
                   "every slot keeps one)",
}
ENGINE_COUNTERS = {
    "finished": "engine requests finished",
    "aborted": "engine requests aborted (client gone, timed out or drained)",
    "generated_tokens": "tokens generated",
    "steps": "decode steps run",
    "preemptions": "sequences preempted because the KV pool ran dry",
    "device_call_seconds": "seconds the engine spent in calls to the devices (launching programs, reading back)",
    "decodes_ahead": "decodes dispatched before the step before them was read back",
    "prefix_cache_queried_tokens": "prompt tokens looked up in the prefix cache",
    "prefix_cache_hit_tokens": "prompt tokens served from the prefix cache",
    "embedded_inputs": "inputs embedded (/v1/embeddings)",
    "embedded_tokens": "tokens of the inputs embedded",
    "images_encoded": "pictures run through the vision tower (a picture held already is not run again)",
    "spec_decode_verifies": "verify steps run (speculative decoding)",
    "spec_decode_drafts": "drafts verified (one per row with drafted tokens in a verify step)",
    "spec_decode_draft_tokens": "drafted tokens verified",
    "spec_decode_accepted_tokens": "drafted tokens kept",
    "spec_decode_draft_calls": "device calls of the draft model (--speculative-model)",
}


VLLM_GAUGES = {"running": "vllm:num_requests_running", "waiting": "vllm:num_requests_waiting"}
VLLM_COUNTERS = {"preemptions": "vllm:num_preemptions", "generated_tokens": "vllm:generation_tokens",
                 "prefix_cache_queried_tokens": "vllm:prefix_cache_queries",
                 "prefix_cache_hit_tokens": "vllm:prefix_cache_hits",
                 "spec_decode_drafts": "vllm:spec_decode_num_drafts",
                 "spec_decode_draft_tokens": "vllm:spec_decode_num_draft_tokens",
                 "spec_decode_accepted_tokens": "vllm:spec_decode_num_accepted_tokens"}
VLLM_RENAMED = {"sparkler_time_to_first_token_seconds": "vllm:time_to_first_token_seconds",
                "sparkler_inter_token_latency_seconds": "vllm:inter_token_latency_seconds",
                "sparkler_e2e_request_latency_seconds": "vllm:e2e_request_latency_seconds",
                "sparkler_request_queue_time_seconds": "vllm:request_queue_time_seconds",
                "sparkler_prompt_tokens": "vllm:prompt_tokens"}
SGLANG_GAUGES = {"running": "sglang:num_running_reqs", "waiting": "sglang:num_queue_reqs",
                 "prefix_cache_hit_rate": "sglang:cache_hit_rate"}
SGLANG_COUNTERS = {"prefix_cache_queried_tokens": "sglang:prompt_tokens",
                   "prefix_cache_hit_tokens": "sglang:cached_tokens", "generated_tokens": "sglang:generation_tokens",
                   "aborted": "sglang:num_aborted_requests"}
SGLANG_RENAMED = {"sparkler_time_to_first_token_seconds": "sglang:time_to_first_token_seconds",
                  "sparkler_inter_token_latency_seconds": "sglang:inter_token_latency_seconds",
                  "sparkler_e2e_request_latency_seconds": "sglang:e2e_request_latency_seconds",
                  "sparkler_request_queue_time_seconds": "sglang:queue_time_seconds"}


def thread_cpu_seconds(ident: int | None) -> float:
    """CPU seconds a live thread of this process has used (its `threading` ident; 0 if none or gone)."""
    try:
        return time.clock_gettime(time.pthread_getcpuclockid(ident)) if ident is not None else 0.0
    except (OSError, AttributeError):  # the thread ended, or a platform without per-thread clocks
        return 0.0


class EngineCollector:
    """Reads the engine's gauges and counters at scrape time, and the CPU time of the threads that serve (`threads`:
    their names and idents)."""

    def __init__(self, stats, threads):
        self.stats, self.threads = stats, threads

    def collect(self):
        """Yield one metric family per engine figure."""
        stats = self.stats()
        for name, doc in ENGINE_GAUGES.items():
            yield GaugeMetricFamily(f"sparkler_{name}", doc, value=stats[name])
        for name, doc in ENGINE_COUNTERS.items():
            yield CounterMetricFamily(f"sparkler_{name}", doc, value=stats[name])
        phases = CounterMetricFamily("sparkler_engine_step_seconds", "seconds of the engine loop by part of its step "
                                     "(engine.engine.PHASES), waits for the devices included", labels=["phase"])
        for phase, seconds in stats["step_seconds"].items():
            phases.add_metric([phase], seconds)
        yield phases
        cpu = CounterMetricFamily("sparkler_thread_cpu_seconds", "CPU seconds of the engine thread and of the HTTP "
                                  "event loop's (the host work per token; the two share the GIL)", labels=["thread"])
        for name, ident in self.threads().items():
            cpu.add_metric([name], thread_cpu_seconds(ident))
        yield cpu


def kv_usage(stats: dict) -> float:
    """The share of the KV pool's pages in use (`Engine.stats`; 1: all)."""
    return 1 - stats["kv_pages_free"] / stats["kv_pages_total"] if stats["kv_pages_total"] else 0.0


def kv_tokens(stats: dict) -> int:
    """The tokens the KV pool's pages in use hold room for (`Engine.stats`)."""
    return (stats["kv_pages_total"] - stats["kv_pages_free"]) * stats["kv_page_size"]


def decode_seconds(stats: dict) -> float:
    """The engine loop's seconds decoding: dispatching decodes and reading them back (`Engine.stats`)."""
    return stats["step_seconds"]["decode"] + stats["step_seconds"]["collect"]


class LlamaCppNames:
    """The engine's figures under llama.cpp's server's metric names (`llamacpp:`, what its `--metrics` exposes), for
    the dashboards written against it: prompt tokens computed (not served from the prefix cache) and generated, the
    decode steps, the engine loop's seconds in prefill and in decoding (dispatch and read-back) and the rates they
    give, the KV pool's use, and the requests running and waiting."""

    def __init__(self, stats):
        self.stats = stats

    def collect(self):
        """Yield the llama.cpp-named families."""
        s = self.stats()
        prompt = s["prefix_cache_queried_tokens"] - s["prefix_cache_hit_tokens"]
        prompt_s = s["step_seconds"]["prefill"]
        decode_s = decode_seconds(s)
        for name, doc, value in (
                ("prompt_tokens", "Number of prompt tokens processed.", prompt),
                ("prompt_seconds", "Prompt process time", prompt_s),
                ("tokens_predicted", "Number of generation tokens processed.", s["generated_tokens"]),
                ("tokens_predicted_seconds", "Predict process time", decode_s),
                ("n_decode", "Total number of llama_decode() calls", s["steps"])):
            yield CounterMetricFamily(f"llamacpp:{name}", doc, value=value)
        for name, doc, value in (
                ("n_busy_slots_per_decode", "Average number of busy slots per llama_decode() call",
                 s["generated_tokens"] / s["steps"] if s["steps"] else 0.0),
                ("prompt_tokens_seconds", "Average prompt throughput in tokens/s.",
                 prompt / prompt_s if prompt_s else 0.0),
                ("predicted_tokens_seconds", "Average generation throughput in tokens/s.",
                 s["generated_tokens"] / decode_s if decode_s else 0.0),
                ("kv_cache_usage_ratio", "KV-cache usage. 1 means 100 percent usage.", kv_usage(s)),
                ("kv_cache_tokens", "KV-cache tokens.", kv_tokens(s)),
                ("requests_processing", "Number of requests processing.", s["running"]),
                ("requests_deferred", "Number of requests deferred.", s["waiting"])):
            yield GaugeMetricFamily(f"llamacpp:{name}", doc, value=value)


def vllm_computed(s: dict) -> list[tuple[type, str, str, float]]:
    """vLLM's figures computed from `Engine.stats`: `(family kind, name, doc, value)`."""
    return [(GaugeMetricFamily, "vllm:kv_cache_usage_perc", "share of the KV pool's pages in use (1: all)",
             kv_usage(s))]


def sglang_computed(s: dict) -> list[tuple[type, str, str, float]]:
    """SGLang's figures computed from `Engine.stats`: the requests ended (finished or aborted, as SGLang counts
    them), the KV pool's tokens (SGLang's "token usage"), the decoding rate since the start over the engine loop's
    decode time (SGLang's is over its last logging interval), and speculative decoding's accept length (tokens a
    row's verify keeps, its own included) and rate."""
    decode_s = decode_seconds(s)
    drafts, drafted, kept = (s[f"spec_decode_{k}"] for k in ("drafts", "draft_tokens", "accepted_tokens"))
    g = GaugeMetricFamily
    return [(CounterMetricFamily, "sglang:num_requests", "engine requests ended (finished or aborted)",
             s["finished"] + s["aborted"]),
            (g, "sglang:num_used_tokens", "KV pool tokens in use", kv_tokens(s)),
            (g, "sglang:token_usage", "share of the KV pool's tokens in use (1: all)", kv_usage(s)),
            (g, "sglang:max_total_num_tokens", "tokens the KV pool holds", s["kv_pages_total"] * s["kv_page_size"]),
            (g, "sglang:gen_throughput", "tokens generated per second of the engine's decoding, since the start",
             s["generated_tokens"] / decode_s if decode_s else 0.0),
            (g, "sglang:spec_accept_length", "tokens a row's verify keeps, on average (drafted and its own)",
             1 + kept / drafts if drafts else 0.0),
            (g, "sglang:spec_accept_rate", "share of drafted tokens kept", kept / drafted if drafted else 0.0)]


class PeerNames:
    """The engine's and the server's figures under another server's metric names (vLLM's, SGLang's), with its
    `model_name` label: the engine's from `stats()` (`gauges` and `counters`: ours -> theirs; `computed(stats)`:
    figures of their own), the server's histograms and counters (`sources`) renamed as they are collected (`renamed`;
    a source it does not name is left out), so each value is counted once."""

    def __init__(self, stats, sources, model_name: str, gauges: dict, counters: dict, renamed: dict, computed):
        self.stats, self.sources, self.labels = stats, sources, {"model_name": model_name}
        self.gauges, self.counters, self.renamed, self.computed = gauges, counters, renamed, computed

    def collect(self):
        """Yield the families under their names."""
        stats, names = self.stats(), list(self.labels)
        for ours, theirs in self.gauges.items():
            yield self._one(GaugeMetricFamily(theirs, ENGINE_GAUGES[ours], labels=names), stats[ours])
        for kind, theirs, doc, value in self.computed(stats):
            yield self._one(kind(theirs, doc, labels=names), value)
        for ours, theirs in self.counters.items():
            yield self._one(CounterMetricFamily(theirs, ENGINE_COUNTERS[ours], labels=names), stats[ours])
        for source in self.sources:
            for fam in source.collect():
                theirs = self.renamed.get(fam.name)
                if theirs is None:
                    continue
                out = Metric(theirs, fam.documentation, fam.type)
                for sample in fam.samples:
                    out.add_sample(theirs + sample.name[len(fam.name):], {**sample.labels, **self.labels},
                                   sample.value)
                yield out

    def _one(self, family, value: float):
        family.add_metric(list(self.labels.values()), value)
        return family


class TokenLatency:
    """A histogram of time per token that observes a chunk's `n` tokens at once (`observe(seconds, n)`): each of
    them took `seconds / n`. A stream's chunk carries a dispatch's tokens, and `prometheus_client`'s `Histogram`
    takes one value per call (a lock and a bucket search each), which was most of the event loop's metrics work per
    token. SGLang's collector observes a chunk's tokens at once the same way. Only the event loop observes and
    scrapes, so it needs no lock."""

    def __init__(self, name: str, doc: str, buckets: tuple[float, ...]):
        self.name, self.doc, self.bounds = name, doc, buckets
        self.counts = [0] * (len(buckets) + 1)  # the last: above every bound (+Inf)
        self.total = 0.0

    def observe(self, seconds: float, n: int = 1) -> None:
        """`n` tokens that took `seconds` together."""
        self.counts[bisect.bisect_left(self.bounds, seconds / n)] += n
        self.total += seconds

    def collect(self):
        """The histogram family, cumulative buckets as Prometheus exposes them."""
        cumulative, running = [], 0
        for bound, count in zip((*map(str, self.bounds), "+Inf"), self.counts):
            running += count
            cumulative.append((bound, running))
        yield HistogramMetricFamily(self.name, self.doc, buckets=cumulative, sum_value=self.total)


class Metrics:
    """One registry per server: request counters and latency histograms, plus the engine collector."""

    def __init__(self, stats, threads, model_name: str = ""):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("sparkler_requests", "HTTP completion requests by route, status and finish reason",
                                ["route", "status", "finish_reason"], registry=r)
        self.ttft = Histogram("sparkler_time_to_first_token_seconds", "arrival to the first generated token",
                              buckets=LATENCY, registry=r)
        self.itl = TokenLatency("sparkler_inter_token_latency_seconds", "time between generated tokens of a choice",
                                PER_TOKEN)
        r.register(self.itl)
        self.e2e = Histogram("sparkler_e2e_request_latency_seconds", "arrival to the last byte of the response",
                             buckets=LATENCY, registry=r)
        self.queue = Histogram("sparkler_request_queue_time_seconds", "arrival to admission into a decode slot",
                               buckets=LATENCY, registry=r)
        self.prompt_tokens = Counter("sparkler_prompt_tokens", "prompt tokens of the completion requests answered",
                                     registry=r)
        r.register(EngineCollector(stats, threads))
        sources = (self.ttft, self.itl, self.e2e, self.queue, self.prompt_tokens)
        r.register(PeerNames(stats, sources, model_name, VLLM_GAUGES, VLLM_COUNTERS, VLLM_RENAMED, vllm_computed))
        r.register(PeerNames(stats, sources, model_name, SGLANG_GAUGES, SGLANG_COUNTERS, SGLANG_RENAMED,
                             sglang_computed))
        r.register(LlamaCppNames(stats))

    def render(self) -> bytes:
        """The registry in Prometheus' text exposition format."""
        return generate_latest(self.registry)
