"""Sparkler engine: jitted decode over a KV cache, continuous batching, and the functional sampler."""

from engine.engine import Engine
from engine.requests import Delta, Request
from engine.llm import LLM, AsyncEngine, CompletionOutput, RequestOutput
from engine.params import InvalidRequest, SamplingParams
from engine.runner import RunnerConfig

__all__ = ["LLM", "AsyncEngine", "Engine", "Request", "Delta", "SamplingParams", "InvalidRequest", "RunnerConfig",
           "CompletionOutput", "RequestOutput"]
