"""Tiny generation and embedding models built offline, for tests and benchmarks.

No weights can be downloaded where inferstack is tested, so these helpers build
real Hugging Face model folders in code: a Llama-style decoder with random
weights (``tiny_llama``), a BERT-style encoder exported to ONNX
(``tiny_bert_onnx``), and a byte-level BPE tokenizer trained on local text with
the ``tokenizers`` library. The models are small enough to load in well under a
second, yet exercise the same code paths as a real model: GQA attention, rotary
positions, a chat template, safetensors weights.

Needs the ``llm`` extra (torch, transformers, tokenizers, safetensors).
"""

from __future__ import annotations

import codecs
import contextlib
import io
import shutil
import warnings
from pathlib import Path
from typing import Any

#: Roles of the tiny tokenizer's chat template, each a special token.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}</s>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>"]


def corpus() -> list[str]:
    """Local training text for the tokenizer: the Zen of Python plus inferstack's own prose."""
    with contextlib.redirect_stdout(io.StringIO()):  # importing ``this`` prints the Zen
        import this

    zen = codecs.decode(this.s, "rot13")
    prose = """
Inference servers batch requests so that a model runs once for many clients.
Continuous batching schedules work one iteration at a time: a new request joins
the running batch at the next decode step, and a finished one leaves at once.
The key-value cache holds attention keys and values for every sequence; a fixed
pool of slots makes adding a sequence cheap. Time to first token and inter-token
latency are the numbers users feel. The quick brown fox jumps over the lazy dog.
Hello world! How are you today? Tell me a story about a robot who learned to paint.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000. Punctuation: , . ; : ! ? ( ) [ ] { } " '.
"""
    lines = [line for line in (zen + prose).splitlines() if line.strip()]
    return lines * 4


def train_tokenizer(vocab_size: int = 512) -> Any:
    """A byte-level BPE ``tokenizers.Tokenizer`` trained on :func:`corpus` (deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus(), trainer=trainer)
    return tokenizer


def save_tokenizer(directory: Path, vocab_size: int = 512, *, chat_template: bool = True, **extra: Any) -> Any:
    """Train the tokenizer and save it as a Hugging Face tokenizer (tokenizer.json + config)."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=train_tokenizer(vocab_size),
        bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        chat_template=CHAT_TEMPLATE if chat_template else None,
        **extra,
    )
    fast.save_pretrained(str(directory))
    return fast


def tiny_llama(
    directory: Path,
    *,
    hidden_size: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate_size: int = 128,
    max_position_embeddings: int = 512,
    vocab_size: int = 512,
    seed: int = 0,
    initializer_range: float = 0.25,
) -> Path:
    """Write a random-weight Llama model folder (config, tokenizer, safetensors) to ``directory``.

    ``initializer_range`` is larger than a real model's so the logits are well
    spread: greedy decoding then has clear winners, and comparisons between
    batched and solo runs are not decided by float rounding on near-ties.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = save_tokenizer(directory, vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_position_embeddings,
        initializer_range=initializer_range,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        rope_theta=10000.0,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(str(directory), safe_serialization=True)
    return directory


def write_llm_model(
    root: Path,
    name: str,
    *,
    parameters: dict[str, str] | None = None,
    backend: str = "transformers",
    version: int = 1,
    extra_config: str = "",
    source: Path | None = None,
    **model_kwargs: Any,
) -> Path:
    """A repository entry for a generation model: ``<root>/<name>/config.pbtxt`` and the
    Hugging Face folder in ``<root>/<name>/<version>/model`` (a copy of ``source`` if given,
    else a new :func:`tiny_llama`)."""
    model_dir = Path(root) / name
    target = model_dir / str(version) / "model"
    if source is not None:
        shutil.copytree(source, target)
    else:
        tiny_llama(target, **model_kwargs)
    params = "".join(
        f'  {{ key: "{key}" value: {{ string_value: "{value}" }} }},\n' for key, value in (parameters or {}).items()
    ).rstrip(",\n")
    text = f'name: "{name}"\nbackend: "{backend}"\n{extra_config}\n'
    if params:
        text += f"parameters [\n{params}\n]\n"
    (model_dir / "config.pbtxt").write_text(text)
    return model_dir


def tiny_bert_onnx(directory: Path, *, hidden_size: int = 32, layers: int = 2, heads: int = 2, seed: int = 0) -> Path:
    """A random-weight BERT encoder exported to ONNX (``model.onnx``) with the tiny tokenizer.

    Inputs ``input_ids``, ``attention_mask``, ``token_type_ids`` (INT64 [batch, seq]);
    output ``last_hidden_state`` (FP32 [batch, seq, hidden]) — the layout of a
    sentence-transformers model exported by ``scripts/export_minilm.py``.
    """
    import torch
    from transformers import BertConfig, BertModel

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = save_tokenizer(directory, 512, chat_template=False, model_max_length=128)
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, num_hidden_layers=layers,
        num_attention_heads=heads, intermediate_size=hidden_size * 2, max_position_embeddings=128,
    )
    torch.manual_seed(seed)
    model = BertModel(config).eval()
    export_encoder(model, directory / "model.onnx")
    return directory


def export_encoder(model: Any, path: Path) -> None:
    """Export a Hugging Face encoder to ONNX with dynamic batch and sequence axes."""
    import torch

    class Wrapper(torch.nn.Module):
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> Any:
            return self.inner(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            ).last_hidden_state

    ids = torch.ones((2, 8), dtype=torch.int64)
    axes = {0: "batch", 1: "sequence"}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notes
        torch.onnx.export(
            Wrapper(model), (ids, torch.ones_like(ids), torch.zeros_like(ids)), str(path),
            input_names=["input_ids", "attention_mask", "token_type_ids"],
            output_names=["last_hidden_state"],
            dynamic_axes={"input_ids": axes, "attention_mask": axes, "token_type_ids": axes,
                          "last_hidden_state": axes},
            opset_version=17, dynamo=False,
        )
