"""A small Llama-style causal LM trained here, on text every machine has offline: the Python standard
library's own source files (bytes as tokens, so no tokenizer is downloaded). Files whose name hashes
to 0 mod 10 are held out as the test set.

    python benchmarks/small_lm.py                      # train (about 35 minutes on one core) and cache
    python benchmarks/small_lm.py --steps 100          # a shorter run
    python benchmarks/small_lm.py --arch opt           # the OPT-style sibling (ReLU MLP, LayerNorm, biases)

`load_or_train()` is what benchmarks/llm.py calls: the checkpoint is cached under
$FXPRUNE_CACHE/small_lm (default ~/.cache/fxprune/small_lm), never committed."""
from __future__ import annotations

import argparse
import json
import math
import os
import sysconfig
import time
import zlib
from typing import List, Optional, Tuple

import numpy as np
import torch

from fxprune.cache import cache_dir as fxprune_cache_dir

CONFIG = dict(vocab_size=256, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
              num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=256,
              rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=None, eos_token_id=None,
              pad_token_id=None, attn_implementation="sdpa")
# An OPT-style sibling of about the same size: an ungated ReLU MLP (its down projection reads
# non-negative inputs with large means, unlike the gated SiLU MLP above), LayerNorm and biases.
OPT_CONFIG = dict(vocab_size=256, hidden_size=256, ffn_dim=1024, num_hidden_layers=4, num_attention_heads=8,
                  max_position_embeddings=256, word_embed_proj_dim=256, activation_function="relu", dropout=0.0,
                  attention_dropout=0.0, pad_token_id=None, bos_token_id=None, eos_token_id=None,
                  tie_word_embeddings=True, attn_implementation="sdpa")
ARCHS = {"llama": CONFIG, "opt": OPT_CONFIG}
SEQ_LEN = 128


def cache_dir() -> str:
    return fxprune_cache_dir("small_lm")


def stdlib_files() -> Tuple[List[str], List[str]]:
    """(train, held-out) .py files of the standard library's top level and packages (tests excluded)."""
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for directory, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in ("site-packages", "test", "tests", "idlelib", "__pycache__")
                         and not d.startswith(("lib2to3", "turtledemo")))
        files += [os.path.join(directory, n) for n in sorted(names) if n.endswith(".py")]
    rel = [os.path.relpath(f, root) for f in files]
    held = [f for f, r in zip(files, rel) if zlib.crc32(r.encode()) % 10 == 0]
    train = [f for f, r in zip(files, rel) if zlib.crc32(r.encode()) % 10 != 0]
    return train, held


def tokens_of(files: List[str]) -> np.ndarray:
    """The files' bytes end to end (each followed by a NUL as a document separator)."""
    chunks = []
    for f in files:
        with open(f, "rb") as fh:
            chunks.append(fh.read() + b"\0")
    return np.frombuffer(b"".join(chunks), dtype=np.uint8).astype(np.int64)


def build_model(seed: int = 0, arch: str = "llama"):
    from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM
    torch.manual_seed(seed)
    config_class, model_class = {"llama": (LlamaConfig, LlamaForCausalLM), "opt": (OPTConfig, OPTForCausalLM)}[arch]
    settings = ARCHS[arch]
    config = config_class(**{k: v for k, v in settings.items() if k != "attn_implementation"})
    config._attn_implementation = settings["attn_implementation"]
    return model_class(config)


def batches(data: np.ndarray, batch: int, seq_len: int, rng: np.random.Generator):
    while True:
        starts = rng.integers(0, len(data) - seq_len - 1, size=batch)
        x = np.stack([data[s: s + seq_len + 1] for s in starts])
        yield torch.from_numpy(x[:, :-1]), torch.from_numpy(x[:, 1:])


@torch.no_grad()
def perplexity(model, data: np.ndarray, seq_len: int = SEQ_LEN, max_tokens: int = 200_000, batch: int = 16) -> float:
    """exp(mean next-token loss) over consecutive windows of the held-out bytes (the first max_tokens)."""
    model.eval()
    data = data[: max_tokens + 1]
    n = (len(data) - 1) // seq_len
    x = torch.from_numpy(data[: n * seq_len].reshape(n, seq_len))
    y = torch.from_numpy(data[1: n * seq_len + 1].reshape(n, seq_len))
    total, count = 0.0, 0
    for i in range(0, n, batch):
        logits = logits_of(model(x[i: i + batch]))
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y[i: i + batch].reshape(-1),
                                                 reduction="sum")
        total, count = total + loss.item(), count + y[i: i + batch].numel()
    return math.exp(total / count)


def logits_of(output):
    """Logits from a Hugging Face output, a dict (a traced model's) or a tensor."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict):
        return output["logits"]
    return output.logits


def train(steps: int = 900, batch: int = 16, lr: float = 2e-3, seed: int = 0, log_every: int = 50,
          threads: int = 1, arch: str = "llama"):
    """AdamW with a 100-step warm-up and a cosine decay over `steps` steps of batch x SEQ_LEN bytes, on
    one thread (a fixed number of steps: the result does not depend on how busy the machine is)."""
    torch.set_num_threads(threads)
    train_files, held_files = stdlib_files()
    data, held = tokens_of(train_files), tokens_of(held_files)
    model = build_model(seed, arch)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.95))
    rng = np.random.default_rng(seed)
    start, step = time.time(), 0
    model.train()
    for x, y in batches(data, batch, SEQ_LEN, rng):
        scale = min(1.0, (step + 1) / 100) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for group in optimizer.param_groups:
            group["lr"] = lr * max(scale, 0.02)
        loss = torch.nn.functional.cross_entropy(model(x).logits.reshape(-1, 256), y.reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        if step % log_every == 0:
            print(f"step {step}/{steps}  loss {loss.item():.3f}  {time.time() - start:.0f} s", flush=True)
        if step == steps:
            break
    model.eval()
    return model, {"arch": arch, "steps": step, "seconds": time.time() - start, "train_bytes": int(len(data)),
                   "held_out_bytes": int(len(held)), "batch": batch, "seq_len": SEQ_LEN, "lr": lr,
                   "held_out_perplexity": perplexity(model, held)}


def load_or_train(steps: int = 900, path: Optional[str] = None, arch: str = "llama"):
    """The trained small LM and its record, trained on first use and cached."""
    path = path or os.path.join(cache_dir(), "small_lm.pt" if arch == "llama" else f"small_lm_{arch}.pt")
    if os.path.exists(path):
        stored = torch.load(path, weights_only=False)
        model = build_model(arch=arch)
        model.load_state_dict(stored["state_dict"])
        return model.eval(), stored["record"]
    model, record = train(steps, arch=arch)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save({"state_dict": model.state_dict(), "record": record, "config": ARCHS[arch]}, path)
    return model, record


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=900)
    parser.add_argument("--out", default=None, help="checkpoint path (default: the cache)")
    parser.add_argument("--arch", default="llama", choices=sorted(ARCHS))
    args = parser.parse_args()
    train_files, held_files = stdlib_files()
    print(f"{len(train_files)} training files, {len(held_files)} held out")
    model, record = load_or_train(args.steps, args.out, args.arch)
    print(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
