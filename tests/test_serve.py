"""`slmops serve` as users run it: a real server process on a free loopback port, driven by
the official `openai` client (and raw HTTP for what a client would never send). Answers
must equal `slmops generate` for the same prompt and adapter."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import build_tiny_model

SUITE_SECONDS = 70  # about, on one test worker (conftest: the longest files start first)

KEY = "test-key"
PROMPT = "Phrase: what a lovely day\nTone:"


def _make_adapter(model_dir: Path, out: Path, targets: list[str], rank: int, seed: int) -> Path:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                           LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, init_lora_weights=False))
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, tokenizer_dir) -> dict:
    from slmops.cli.main import main

    root = tmp_path_factory.mktemp("serve")
    model = build_tiny_model("llama", tokenizer_dir, root / "model", hidden_size=64)
    a = _make_adapter(model, root / "a", ["q_proj", "v_proj"], 4, 1)
    b = _make_adapter(model, root / "b", ["q_proj", "o_proj"], 8, 2)
    extra = root / "adapters"
    _make_adapter(model, extra / "c", ["v_proj"], 2, 3)
    assert main(["optimize", "-m", str(model), "--adapter_path", f"{a},{b}", "--adapter_names", "a,b", "--lora_slots", "all",
                 "-o", str(root / "bundle"), "--no_parity", "--log_level", "3"]) == 0
    return {"root": root, "model": model, "bundle": root / "bundle", "a": a, "b": b, "adapter_dir": extra}


class Server:
    """`slmops serve ...` in a subprocess on a free port; stopped (and waited for) on exit."""

    def __init__(self, *args: str):
        self.proc = subprocess.Popen([sys.executable, "-m", "slmops.cli.main", "serve", "--port", "0", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline, lines = time.time() + 120, []
        while time.time() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                break
            lines.append(line)
            found = re.search(r"on (http://127\.0\.0\.1:(\d+))/v1", line)
            if found:
                self.url, self.port = found[1], int(found[2])
                break
        else:
            line = ""
        if not hasattr(self, "url"):
            self.stop()
            raise AssertionError("the server did not start:\n" + "".join(lines) + self.proc.stderr.read())
        threading.Thread(target=self.proc.stderr.read, daemon=True).start()  # keep the pipe drained

    def client(self, key: str = KEY):
        import openai

        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=60)

    def raw(self, method: str, path: str, body: bytes | dict | None = None, key: str | None = KEY, headers: dict | None = None):
        """(status, decoded JSON) of one request sent by hand."""
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        request = urllib.request.Request(self.url + path, data=data, method=method,
                                         headers={"Content-Type": "application/json", **(headers or {})})
        if key:
            request.add_header("Authorization", f"Bearer {key}")
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"null")

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def server(bundle):
    running = Server("-m", str(bundle["bundle"]), "--api_key", KEY, "--adapter_dir", str(bundle["adapter_dir"]),
                     "--max_tokens_limit", "64", "--max_request_bytes", "20000")
    yield running
    running.stop()


def _generate_cli(model: Path, adapters: str, prompt: str, chat: bool, tokens: int = 10) -> dict[str, str]:
    """What `slmops generate` prints for each adapter: {adapter: text}."""
    args = [sys.executable, "-m", "slmops.cli.main", "generate", "-m", str(model), "--adapter", adapters, "--prompt",
            prompt.replace("\n", "\\n"), "--max_new_tokens", str(tokens)] + (["--chat"] if chat else [])
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    answers = {}
    for adapter in adapters.split(","):
        match = re.search(rf"\[\w+ · {re.escape(adapter)}\] {re.escape(prompt)}\n(.*?)\n\(\d+\.\d+ s\)", out, flags=re.S)
        answers[adapter] = match[1]
    return answers


def test_openai_client_models_chat_completions_and_streaming_match_generate(server, bundle):
    client = server.client()
    ids = [m.id for m in client.models.list().data]
    assert ids == ["bundle", "a", "b"]
    chat_expected = _generate_cli(bundle["bundle"], "a,b,base", PROMPT, chat=True)
    plain_expected = _generate_cli(bundle["bundle"], "a,b,base", PROMPT, chat=False)
    for adapter, model_id in (("a", "a"), ("b", "b"), ("base", "bundle")):
        reply = client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": PROMPT}], max_tokens=10,
                                               temperature=0)
        assert reply.choices[0].message.content == chat_expected[adapter], adapter
        assert reply.choices[0].finish_reason in ("stop", "length") and reply.usage.completion_tokens <= 10
        assert reply.model == model_id and reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
        completion = client.completions.create(model=model_id, prompt=PROMPT, max_tokens=10, temperature=0)
        assert completion.choices[0].text == plain_expected[adapter], adapter
        stream = client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": PROMPT}], max_tokens=10,
                                                temperature=0, stream=True, stream_options={"include_usage": True})
        chunks = list(stream)
        assert chunks[0].choices[0].delta.role == "assistant"
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == chat_expected[adapter]
        finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        assert finals == [reply.choices[0].finish_reason]
        assert chunks[-1].usage.completion_tokens == reply.usage.completion_tokens  # the usage chunk comes last
    # stop strings end the text before them; a seed makes sampling repeatable
    text = chat_expected["a"]
    if len(text) > 3:
        cut = client.chat.completions.create(model="a", messages=[{"role": "user", "content": PROMPT}], max_tokens=10, temperature=0,
                                             stop=[text[2:4]])
        assert cut.choices[0].message.content == text[: text.index(text[2:4])] and cut.choices[0].finish_reason == "stop"
    sampled = [client.chat.completions.create(model="b", messages=[{"role": "user", "content": PROMPT}], max_tokens=10,
                                              temperature=1.0, top_p=0.9, seed=7).choices[0].message.content for _ in range(2)]
    assert sampled[0] == sampled[1]


def test_concurrent_requests_with_different_adapters_do_not_mix(server):
    client = server.client()
    prompts = [f"Phrase: item {i} is late again\nTone:" for i in range(4)]
    alone = {(p, m): client.completions.create(model=m, prompt=p, max_tokens=12, temperature=0).choices[0].text
             for p in prompts for m in ("a", "b", "bundle")}
    jobs = [(p, m) for p in prompts for m in ("a", "b", "bundle")] * 2
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda job: client.completions.create(model=job[1], prompt=job[0], max_tokens=12,
                                                                       temperature=0).choices[0].text, jobs))
    assert together == [alone[job] for job in jobs]
    assert len(set(alone.values())) > 3  # the adapters really answer differently


def test_adapters_added_and_removed_at_run_time(server, bundle):
    client = server.client()
    status, body = server.raw("POST", "/v1/adapters", {"name": "c", "path": "c"})
    assert status == 201 and body["id"] == "c", body
    assert "c" in [m.id for m in client.models.list().data]
    with_c = client.completions.create(model="c", prompt=PROMPT, max_tokens=8, temperature=0).choices[0].text
    # PyTorch + PEFT with the same adapter gives the same greedy text (the bundle converted it against its slots)
    expected = _generate_cli(bundle["model"], f"c={bundle['adapter_dir'] / 'c'}", PROMPT, chat=False, tokens=8)
    assert with_c == expected[f"c={bundle['adapter_dir'] / 'c'}"]
    assert server.raw("POST", "/v1/adapters", {"name": "c", "path": "c"})[0] == 409
    assert server.raw("DELETE", "/v1/adapters/a")[0] == 403  # served from the start
    assert server.raw("DELETE", "/v1/adapters/c") == (200, {"id": "c", "object": "model", "deleted": True})
    assert server.raw("POST", "/v1/completions", {"model": "c", "prompt": "x"})[0] == 404


BAD_REQUESTS = [
    # (method, path, body, key, headers, status, words in the message)
    ("POST", "/v1/chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "hi"}]}, KEY, None, 404,
     "The model `nope` does not exist"),
    ("POST", "/v1/chat/completions", b"{not json", KEY, None, 400, "not valid JSON"),
    ("POST", "/v1/chat/completions", {"model": "a"}, KEY, None, 400, "messages: Field required"),
    ("POST", "/v1/chat/completions", {"model": "a", "messages": []}, KEY, None, 400, "messages: List should have at least 1 item"),
    ("POST", "/v1/chat/completions", {"model": "a", "messages": [{"role": "robot", "content": "hi"}]}, KEY, None, 400, "role"),
    ("POST", "/v1/chat/completions", {"model": "a", "messages": [{"role": "user", "content": "hi"}], "n": 2}, KEY, None, 400,
     "n=2 is not supported"),
    ("POST", "/v1/chat/completions", {"model": "a", "messages": [{"role": "user", "content": "hi"}], "temperature": 5}, KEY, None,
     400, "temperature: Input should be less than or equal to 2"),
    ("POST", "/v1/chat/completions", {"model": "a", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 500}, KEY, None,
     400, "over this server's limit of 64"),
    ("POST", "/v1/completions", {"model": "a", "prompt": "word " * 300, "max_tokens": 8}, KEY, None, 400,
     "This model's maximum context length is 256 tokens"),
    ("POST", "/v1/chat/completions", {"model": "a", "messages": [{"role": "user", "content": "hi"}], "stop": list("abcde")}, KEY, None,
     400, "at most 4 stop sequences"),
    ("POST", "/v1/chat/completions", {"model": "a", "messages": [{"role": "user", "content": "hi"}], "tempreature": 1}, KEY, None,
     400, "unknown parameter 'tempreature'"),
    ("POST", "/v1/completions", {"model": "a", "prompt": ["one", "two"]}, KEY, None, 400, "one prompt per request"),
    ("GET", "/v1/models", None, "wrong", None, 401, "missing or wrong API key"),
    ("GET", "/v1/models", None, None, None, 401, "missing or wrong API key"),
    ("POST", "/v1/completions", {"model": "a", "prompt": "x" * 30000}, KEY, None, 413, "over the limit of 20000"),
    ("GET", "/v1/nothing", None, KEY, None, 404, "/v1/nothing: Not Found"),
    ("GET", "/v1/models/zzz", None, KEY, None, 404, "The model `zzz` does not exist"),
    ("POST", "/v1/adapters", {"name": "x", "path": "../bundle/adapters"}, KEY, None, 400, "outside the adapter folder"),
    ("POST", "/v1/adapters", {"name": "../x", "path": "c"}, KEY, None, 400, "use letters, digits"),
    ("POST", "/v1/adapters", {"name": "x", "path": "nothere"}, KEY, None, 404, "does not exist in the adapter folder"),
    ("DELETE", "/v1/adapters/nope", None, KEY, None, 404, "no adapter named 'nope'"),
]


@pytest.mark.parametrize("method,path,body,key,headers,status,words", BAD_REQUESTS, ids=[f"{r[5]}-{i}" for i, r in enumerate(BAD_REQUESTS)])
def test_bad_requests_get_openai_errors(server, method, path, body, key, headers, status, words):
    got, answer = server.raw(method, path, body, key, headers)
    assert got == status, answer
    assert set(answer["error"]) == {"message", "type", "param", "code"}
    assert words in answer["error"]["message"], answer


def test_a_full_queue_is_429_and_a_client_that_leaves_frees_its_slot(tokenizer_dir, tmp_path):
    # Greedy and as long as the context allows: the answer runs over 1,000 tokens unless
    # cancelled, so the probe and the close land while it generates. A model of its own with a
    # 2,048-token context: the shared one's 236 tokens took ~0.1 s, and on a busy machine the
    # answer once ended before the client left. (Sampled answers may end at an early
    # end-of-text token within milliseconds.)
    from slmops.cli.main import main

    model = build_tiny_model("llama", tokenizer_dir, tmp_path / "model", hidden_size=64, max_positions=2048)
    adapters = [_make_adapter(model, tmp_path / name, ["q_proj", "v_proj"], 4, seed) for seed, name in enumerate("ab")]
    assert main(["optimize", "-m", str(model), "--adapter_path", ",".join(map(str, adapters)), "--adapter_names", "a,b",
                 "-o", str(tmp_path / "bundle"), "--no_parity", "--log_level", "3"]) == 0
    longest = 2048 - 20  # the model's context minus the prompt's 20 tokens
    server = Server("-m", str(tmp_path / "bundle"), "--max_concurrency", "1", "--max_queue", "0", "--max_tokens_limit", str(longest))
    try:
        client = server.client("unused")
        whole = client.completions.create(model="a", prompt=PROMPT, max_tokens=longest, temperature=0)
        assert whole.usage.completion_tokens > 1000, whole.usage  # (greedy on this random model: an end-of-text after ~1,300)
        stream = client.completions.create(model="a", prompt=PROMPT, max_tokens=longest, temperature=0, stream=True)
        next(iter(stream))  # the only slot is generating
        status, answer = server.raw("POST", "/v1/completions", {"model": "b", "prompt": PROMPT, "max_tokens": 4}, key=None)
        assert status == 429 and answer["error"]["type"] == "rate_limit_error"
        stream.close()  # the client goes away mid-stream
        deadline = time.time() + 20
        while time.time() < deadline and server.raw("GET", "/health", key=None)[1]["in_flight"]:
            time.sleep(0.1)
        health = server.raw("GET", "/health", key=None)[1]
        assert health["in_flight"] == 0, "the cancelled generation kept its slot"
        assert health["cancelled"] == 1, "the answer ran on after its client left"
        assert client.completions.create(model="b", prompt=PROMPT, max_tokens=4, temperature=0).choices[0].text is not None
    finally:
        server.stop()


def test_pytorch_backend_serves_peft_adapters(bundle):
    """The same API on the PyTorch back end (PEFT adapters loaded once, switched per request)."""
    server = Server("-m", str(bundle["model"]), "--adapter", f"a={bundle['a']},b={bundle['b']}")
    try:
        client = server.client("unused")
        expected = _generate_cli(bundle["model"], f"a={bundle['a']},b={bundle['b']},base", PROMPT, chat=False)
        for model_id, key in (("a", f"a={bundle['a']}"), ("b", f"b={bundle['b']}"), ("model", "base")):
            text = client.completions.create(model=model_id, prompt=PROMPT, max_tokens=10, temperature=0).choices[0].text
            assert text == expected[key], model_id
    finally:
        server.stop()
