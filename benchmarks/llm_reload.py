"""The pruned small LM (benchmarks/small_lm.py) as a user deploys it: pruned with flap at 20% and 50% of
its non-embedding parameters (per-layer widths, as the allocation chose them), turned back into a
Hugging Face model, saved with save_pruned, loaded with load_pruned in a fresh Python process, and
asked to generate. The fresh process must produce the same tokens as the model before saving, and its
held-out perplexity must be the one measured before saving.

    python benchmarks/llm_reload.py                 # ~2 minutes once the LM is cached

Prints one line per ratio and writes JSON to --out."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import warnings

import numpy as np
import torch

import fxprune
from fxprune.export.huggingface import save_pruned, to_huggingface

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import small_lm  # noqa: E402

RELOAD = """
import json, sys, torch
sys.path.insert(0, {bench!r})
import small_lm
from fxprune.export.huggingface import load_pruned
model = load_pruned({path!r})
prompt = torch.tensor({prompt!r})
tokens = model.generate(prompt, max_new_tokens=32, do_sample=False, pad_token_id=0).tolist()
held = small_lm.tokens_of(small_lm.stdlib_files()[1])
print(json.dumps({{"tokens": tokens, "ppl": small_lm.perplexity(model, held, max_tokens={eval_bytes})}}))
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ratios", default="0.2,0.5")
    parser.add_argument("--eval-bytes", type=int, default=20_000)
    parser.add_argument("--out", default="benchmarks/results/llm_reload.json")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    dense, _ = small_lm.load_or_train()
    train_files, held_files = small_lm.stdlib_files()
    train, held = small_lm.tokens_of(train_files), small_lm.tokens_of(held_files)
    rng = np.random.default_rng(1)
    calibration = [next(small_lm.batches(train, 1, small_lm.SEQ_LEN, rng)) for _ in range(64)]
    example = {"input_ids": calibration[0][0], "use_cache": False}
    embedding = {"model.embed_tokens.weight", "lm_head.weight"}
    n_total = sum(p.numel() for p in dense.parameters())
    n_embed = sum(p.numel() for n, p in dense.named_parameters() if n in embedding)
    prompt = torch.from_numpy(held[:24]).unsqueeze(0)
    rows = []
    for ratio in map(float, args.ratios.split(",")):
        keep = ((1 - ratio) * (n_total - n_embed) + n_embed) / n_total
        pruned = fxprune.compile(dense, fxprune.Budget(params=keep), example_inputs=example, importance="flap",
                                 data=calibration, ignore=["*embed_tokens"])
        model = to_huggingface(dense, pruned).eval()
        with torch.no_grad():
            tokens = model.generate(prompt, max_new_tokens=32, do_sample=False, pad_token_id=0).tolist()
        ppl = small_lm.perplexity(model, held, max_tokens=args.eval_bytes)
        widths = [layer.mlp.down_proj.in_features for layer in model.model.layers]
        heads = [layer.self_attn.q_proj.out_features // model.config.head_dim for layer in model.model.layers]
        with tempfile.TemporaryDirectory() as directory:
            save_pruned(model, directory)
            code = RELOAD.format(bench=os.path.dirname(os.path.abspath(__file__)), path=directory,
                                 prompt=prompt.tolist(), eval_bytes=args.eval_bytes)
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        reloaded = json.loads(out.strip().splitlines()[-1])
        row = {"ratio": ratio, "mlp_widths": widths, "query_heads": heads, "same_tokens": reloaded["tokens"] == tokens,
               "ppl_before_saving": ppl, "ppl_reloaded": reloaded["ppl"]}
        rows.append(row)
        print(f"remove {ratio:.0%}: MLP widths {widths}, query heads {heads}; fresh process generates the same "
              f"{len(tokens[0]) - prompt.shape[1]} tokens: {row['same_tokens']}; perplexity {ppl:.4f} before saving, "
              f"{reloaded['ppl']:.4f} reloaded", flush=True)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(rows, fh, indent=1)
    print(f"wrote {args.out}")
    return 0 if all(r["same_tokens"] and abs(r["ppl_reloaded"] - r["ppl_before_saving"]) < 1e-6 for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
