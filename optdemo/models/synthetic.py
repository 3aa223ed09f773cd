"""Random-weight OPT checkpoints and a tiny BPE tokenizer, built locally with no network.

They serve three users: the app's built-in ``optdemo/tiny-opt`` model (something to load and chat
with offline), the test suite, and the benchmark (``--build opt-1.3b``). The checkpoints are written
with ``save_pretrained`` and read back through the real ``from_pretrained`` path, so nothing about
loading is faked; only the numbers in the weights are random.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from optdemo.core.catalog import catalog_config_dict
from optdemo.core.chat_prompt import ASSISTANT_TAG, CHAT_PREAMBLE, USER_TAG
from optdemo.core.construction import construction_lock
from optdemo.core.paths import cache_dir

# Special tokens in OPT's order and ids: <s>=0, <pad>=1, </s>=2 (bos and eos), <unk>=3.
SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>")
TOKENIZER_VOCAB_SIZE = 512

# A shrunken OPT: the real OPTForCausalLM architecture (pre-LayerNorm like opt-125m and up) with
# dimensions small enough to load and generate in milliseconds on a 2-core CPU.
TINY_OVERRIDES: dict[str, int] = {
    "hidden_size": 64,
    "ffn_dim": 256,
    "num_hidden_layers": 6,
    "num_attention_heads": 4,
    "word_embed_proj_dim": 64,
    "vocab_size": TOKENIZER_VOCAB_SIZE,
    "max_position_embeddings": 512,
}

# What the built-in tiny model is taught, so that it answers a few questions in the app's chat
# format instead of emitting noise: a demo model should show what the pipeline does.
_EXCHANGES = (
    ("Hello, who are you?", "I am a tiny demo model. I run on this machine, with no download."),
    ("What is the capital of France?", "Paris is the capital of France."),
    (
        "How do you run a model larger than the GPU?",
        "Its layers are spread over the GPU, the CPU memory and the disk, and each layer is brought "
        "where it is needed.",
    ),
    (
        "Why is offloading slow?",
        "Weights on disk must be read back for every token, and weights in RAM must cross the bus.",
    ),
    ("What is OPT?", "Open Pre-trained Transformers, from 125 million to 66 billion parameters."),
    ("Thank you!", "You are welcome."),
)
_TEXTS = (
    "The quick brown fox jumps over the lazy dog.",
    "Once upon a time, a model larger than the GPU still ran: its layers were spread over the GPU, "
    "the CPU memory and the disk.",
    "Memory, bandwidth and latency decide how fast a large model answers.",
)


def _training_documents() -> list[str]:
    docs = [f"{CHAT_PREAMBLE}{USER_TAG} {q}\n{ASSISTANT_TAG} {a}\n{USER_TAG}" for q, a in _EXCHANGES]
    docs += list(_TEXTS)
    return docs


def build_tokenizer(dest: str | os.PathLike[str]) -> None:
    """Train a tiny byte-level BPE tokenizer (GPT-2 style, OPT's special tokens) into ``dest``.

    Saved both as ``tokenizer.json`` and as GPT-2's ``vocab.json``/``merges.txt`` with the
    ``tokenizer_config.json`` that facebook/opt-* repositories ship, so ``AutoTokenizer`` loads it
    the same way it loads a real OPT tokenizer.
    """
    from tokenizers import ByteLevelBPETokenizer

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        _training_documents() * 4,
        vocab_size=TOKENIZER_VOCAB_SIZE,
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS),
        show_progress=False,
    )
    bpe.save_model(str(dest))  # vocab.json + merges.txt
    (dest / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "GPT2Tokenizer",
                "add_bos_token": True,
                "add_prefix_space": False,
                "bos_token": "</s>",
                "eos_token": "</s>",
                "pad_token": "<pad>",
                "unk_token": "<unk>",
                "errors": "replace",
                "model_max_length": 1000000000000000019884624838656,
            },
            indent=2,
        )
    )
    (dest / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": "</s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"})
    )


def build_random_opt(
    dest: str | os.PathLike[str],
    architecture: str = "opt-125m",
    *,
    overrides: dict[str, int] | None = None,
    dtype: str = "float16",
    checkpoint_format: str = "safetensors",
    max_shard_size: str = "2GB",
    seed: int = 0,
) -> Path:
    """Write a random-weight OPT checkpoint plus tokenizer to ``dest`` and return its path.

    Args:
        dest: output directory (created; an existing checkpoint there is overwritten).
        architecture: a catalog name (``opt-125m`` ... ``opt-66b``) whose exact config is used.
        overrides: config fields to change, e.g. :data:`TINY_OVERRIDES` to shrink it.
        dtype: the stored dtype, ``float16`` like the Hub's OPT checkpoints.
        checkpoint_format: ``safetensors`` or ``bin`` (``pytorch_model*.bin`` shards, as on the
            facebook/opt-* main branches).
        max_shard_size: shard size, as ``save_pretrained`` takes it.
        seed: weights are a deterministic function of the seed.
    """
    import torch
    from transformers import AutoModelForCausalLM, OPTConfig

    if checkpoint_format not in ("safetensors", "bin"):
        raise ValueError(f"checkpoint_format must be 'safetensors' or 'bin', not {checkpoint_format!r}")
    fields = {k: v for k, v in catalog_config_dict(architecture).items() if not k.startswith("_")}
    fields.update(overrides or {})
    fields["torch_dtype"] = dtype
    config = OPTConfig(**fields)
    torch.manual_seed(seed)
    with construction_lock:
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    model.eval()
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dest, max_shard_size=max_shard_size)
    if checkpoint_format == "bin":
        _convert_to_bin(dest)
    build_tokenizer(dest)
    return dest


def _convert_to_bin(dest: Path) -> None:
    """Rewrite a safetensors checkpoint as ``pytorch_model*.bin`` shards with the same index."""
    import torch
    from safetensors.torch import load_file

    index_path = dest / "model.safetensors.index.json"
    if index_path.exists():
        index = json.loads(index_path.read_text())
        renames = {
            name: name.replace("model-", "pytorch_model-").replace(".safetensors", ".bin")
            for name in set(index["weight_map"].values())
        }
        for old, new in renames.items():
            torch.save(load_file(dest / old), dest / new)
            (dest / old).unlink()
        index["weight_map"] = {k: renames[v] for k, v in index["weight_map"].items()}
        (dest / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2))
        index_path.unlink()
    else:
        torch.save(load_file(dest / "model.safetensors"), dest / "pytorch_model.bin")
        (dest / "model.safetensors").unlink()


def teach_tiny_model(path: str | os.PathLike[str], steps: int = 100, seed: int = 0) -> None:
    """Fit the tiny model at ``path`` to a few chat exchanges and sentences (a few seconds on a CPU),
    then save it in place. Deterministic for a given seed."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(path)
    with construction_lock:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    batch = tokenizer(_training_documents(), return_tensors="pt", padding=True)
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)  # no loss on padding
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)
    model.train()
    # One thread: these matrices are too small to gain from more, and on a busy machine several
    # OpenMP threads spin against other processes.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(steps):
            model(**batch, labels=labels).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    finally:
        torch.set_num_threads(threads)
    model.eval()
    model.save_pretrained(path)


def ensure_tiny_model(root: str | os.PathLike[str] | None = None) -> Path:
    """Return the built-in tiny OPT model's directory, building (and teaching) it once if missing.

    The build goes to a temporary sibling directory that is renamed into place, so a concurrent or
    interrupted build never leaves a half-written model behind.
    """
    target = Path(root) if root is not None else cache_dir() / "tiny-opt"
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tiny-opt-", dir=target.parent))
    try:
        build_random_opt(staging, "opt-125m", overrides=TINY_OVERRIDES, dtype="float32")
        teach_tiny_model(staging)
        try:
            staging.rename(target)
        except OSError:
            if not (target / "config.json").exists():  # lost a race only if the winner finished
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
