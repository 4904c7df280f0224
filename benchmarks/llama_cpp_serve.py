"""Served, not just loaded: an MLA model exported by kvforge, behind llama-cpp-python's OpenAI-compatible
server on 127.0.0.1, answers completion and chat requests exactly as kvforge's own greedy decoding does,
and the KV cache llama.cpp allocates is the one ``kvforge inspect`` computes.

    pip install -e '.[llama-cpp]'
    python -m benchmarks.llama_cpp_serve [--requests 4] [--max-tokens 24]

The model: stories260K-mha converted to MLA (kv_lora_rank 24 + a shared 8-dim rotary key) and exported
as a ``deepseek2`` GGUF (f32) with a chat template added to its tokenizer. The server runs it with
llama.cpp's absorbed MLA (a latent K cache, no V cache). Each request is greedy (temperature 0); the
local reference tokenizes the same prompt with the model's tokenizer (chat: its chat template) and
decodes greedily with kvforge's CausalLM. Prints a table and exits non-zero on any mismatch.
"""

from __future__ import annotations

import argparse
import json
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch

from benchmarks.common import print_table
from benchmarks.llama_cpp_parity import ROWS, kvforge_model
from kvforge.arch import generate, kv_cache_bytes
from kvforge.conversion import load_pretrained
from kvforge.conversion.gguf import export_gguf

# Starts with the BOS token as Llama-style templates do: chat prompts get no automatic BOS, neither in
# transformers (apply_chat_template tokenizes without special tokens) nor in llama-cpp-python.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
PROMPTS = [
    "Once upon a time, there was a little girl named",
    "The dog ran to the park and",
    "Tom and his mom went to the store. They",
    "One day, a big bird",
    "Lily liked to play with her ball. One day",
    "The sun was shining and the",
]
# llama.cpp's allocation log, e.g. "llama_kv_cache: size = 0.23 MiB (512 cells, 5 layers, ...), K (f16): 0.23 MiB, V (f16): 0.00 MiB"
KV_LOG = re.compile(
    r"llama_kv_cache: +size = +([\d.]+) MiB \( *(\d+) cells.*K \((\w+)\): +([\d.]+) MiB, V \((\w+)\): +([\d.]+) MiB"
)
# Greedy, and nothing else: the server's defaults add a repeat penalty (1.1) that changes greedy picks.
GREEDY = {"temperature": 0, "top_k": 1, "repeat_penalty": 1.0}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def post(port: int, path: str, body: dict) -> dict:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


def wait_ready(port: int, server: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with {server.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError("the server did not answer /v1/models in time")


def local_greedy(model, tokenizer, ids: list[int], steps: int) -> str:
    """kvforge's greedy continuation as text: the decoded whole minus the decoded prompt (a continuation
    decoded alone loses the leading space a sentencepiece token carries)."""
    out = generate(model, torch.tensor([ids]), steps)[0, len(ids) :].tolist()
    if tokenizer.eos_token_id in out:
        out = out[: out.index(tokenizer.eos_token_id)]
    prompt = tokenizer.decode(ids, skip_special_tokens=True)
    return tokenizer.decode(ids + out, skip_special_tokens=True)[len(prompt) :]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--requests", type=int, default=4, help="completion requests, and as many chat requests"
    )
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--n-ctx", type=int, default=4096, help="server context (cache cells)")
    args = parser.parse_args()
    from transformers import AutoTokenizer

    rows, failures = [], 0
    with tempfile.TemporaryDirectory(prefix="llama-cpp-serve-") as scratch:
        scratch = Path(scratch)
        directory = ROWS["stories-mla"].build(scratch)
        config_file = directory / "tokenizer_config.json"
        settings = json.loads(config_file.read_text())
        config_file.write_text(json.dumps({**settings, "chat_template": CHAT_TEMPLATE}, indent=2))
        pretrained = load_pretrained(directory)
        gguf, said = export_gguf(
            pretrained.config, pretrained.state_dict, scratch / "mla.gguf", tokenizer_from=directory
        )
        print(f"exported {gguf.name}: " + "; ".join(said))
        model, tokenizer = kvforge_model(directory), AutoTokenizer.from_pretrained(directory)
        port = free_port()
        log = open(scratch / "server.log", "w")  # noqa: SIM115 - the server writes it while we run
        command = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1"]
        command += ["--port", str(port), "--n_ctx", str(args.n_ctx), "--n_threads", "2"]
        command += ["--type_k", "0", "--type_v", "0"]  # f32 K/V cache: kvforge's reference runs in f32
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_ready(port, server)
            for prompt in PROMPTS[: args.requests]:
                served = post(
                    port,
                    "/v1/completions",
                    {"prompt": prompt, "max_tokens": args.max_tokens, **GREEDY},
                )
                expected = local_greedy(model, tokenizer, tokenizer(prompt)["input_ids"], args.max_tokens)
                same = served["choices"][0]["text"] == expected
                failures += not same
                text = served["choices"][0]["text"]
                rows.append(["completion", prompt[:32], "yes" if same else f"NO: {text!r} vs {expected!r}"])
            for prompt in PROMPTS[: args.requests]:
                messages = [{"role": "user", "content": prompt}]
                body = {"messages": messages, "max_tokens": args.max_tokens, **GREEDY}
                served = post(port, "/v1/chat/completions", body)
                # as transformers tokenizes a chat (no special tokens added: the template writes them)
                rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
                ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
                expected = local_greedy(model, tokenizer, ids, args.max_tokens)
                text = served["choices"][0]["message"]["content"]
                if served["usage"]["prompt_tokens"] != len(ids):
                    text += f" [server prompt {served['usage']['prompt_tokens']} tokens, local {len(ids)}]"
                same = text == expected
                failures += not same
                rows.append(["chat", prompt[:32], "yes" if same else f"NO: {text!r} vs {expected!r}"])
        finally:
            server.terminate()
            server.wait(timeout=30)
            log.close()
        found = KV_LOG.search((scratch / "server.log").read_text())
        if found:
            cells, cache_type = int(found.group(2)), found.group(3)
            expected = kv_cache_bytes(pretrained.config, cells, {"f32": "fp32", "f16": "fp16"}[cache_type])
            served_mib, v_mib = float(found.group(1)), float(found.group(6))
            same = round(expected / 2**20, 2) == served_mib and v_mib == 0.0
            failures += not same
            rows.append(
                [
                    "KV cache",
                    f"{cells} cells, {cache_type}",
                    f"llama.cpp {served_mib:.2f} MiB (K {found.group(4)}, V {v_mib:.2f}: the latent only) vs "
                    f"kvforge inspect {expected / 2**20:.2f} MiB ({expected:,} bytes): {'equal' if same else 'DIFFERENT'}",
                ]
            )
        else:
            failures += 1
            rows.append(["KV cache", "-", "no llama_kv_cache size line in the server log"])
    print_table(
        "llama_cpp.server (127.0.0.1) vs kvforge greedy, MLA as deepseek2",
        ["request", "prompt", "equal"],
        rows,
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
