"""One live cluster for the endpoint's test modules (1 prefill + 1 decode, a tiny llama), the
openai client and the tokenizer, shared by the package; prompts and helpers the modules share."""

import openai
import pytest

from tests.workers.engine.helpers import hf_greedy

PROMPTS = ["The capital of France is", "KV blocks move", "hello world, hello pdserve! 0123456789 and more"]
N = 12


@pytest.fixture(scope="package")
def model_dir(tiny_checkpoint):
    return tiny_checkpoint("llama")


@pytest.fixture(scope="package")
def cluster(pdserve_cluster, model_dir):
    c = pdserve_cluster(model_dir, prefix="openai")
    yield c
    c.stop()


@pytest.fixture(scope="package")
def client(cluster):
    return openai.OpenAI(base_url=cluster.url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="package")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def expected(model_dir, tokenizer, prompt_ids):
    return hf_greedy(model_dir, prompt_ids, N)


def model_name(cluster):
    return cluster.config.model.served_model_name
