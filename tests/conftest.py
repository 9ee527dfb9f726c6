"""Shared fixtures. torch is imported first: it is the test-only reference for transformers' models."""

import os

import torch  # noqa: F401  (before transformers, so its models are available to the tests)
import pytest

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def smollm():
    """The packaged default model, loaded once per test session."""
    from models import load_model

    return load_model("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def smollm_path():
    """Path of the default model's GGUF file."""
    from models.packaged import resolve

    return resolve("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def llm(smollm):
    """An offline engine over the default model (8 slots, 1024 tokens)."""
    from engine import LLM

    return LLM(smollm, max_num_seqs=8, max_model_len=1024, decode_steps=4)
