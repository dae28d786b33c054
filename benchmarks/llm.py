"""Width pruning of a small Llama-style LM (benchmarks/small_lm.py: trained here on the Python standard
library's source, bytes as tokens), measured by held-out perplexity and onnxruntime latency.

For 20% and 50% of the non-embedding parameters removed (attention heads, whole GQA groups, and MLP
channels; the hidden size is kept: ignore=["*embed_tokens"]), every importance (l1, taylor, wanda,
flap) with and without bias compensation, against Torch-Pruning's LLM recipe (its examples/LLMs:
MetaPruner, group L2 magnitude, heads and hidden size at the same ratio, round_to=4) with its ratio
searched to the same non-embedding parameter count. Every model's held-out perplexity is measured
before and after the same short recovery (AdamW at 2e-4, next-byte loss, the same batches for all), and the dense,
best-fxprune and Torch-Pruning models are timed in onnxruntime at batch 1 x 128 tokens.

    python benchmarks/llm.py                       # trains the LM on first use (~35 min), then ~30 min
    python benchmarks/llm.py --ratios 0.2 --importances flap --recovery-steps 0

Prints a table and writes JSON to --out."""
from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import sys
import time
import warnings
from typing import Dict, List, Optional

import numpy as np
import torch

import fxprune
from fxprune.export.huggingface import to_huggingface

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import small_lm  # noqa: E402

SEQ = small_lm.SEQ_LEN
ACTIVATION_IMPORTANCES = {"wanda": fxprune.WandaImportance, "flap": fxprune.FluctuationImportance}


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ratios", default="0.2,0.5", help="fractions of the non-embedding parameters to remove")
    parser.add_argument("--importances", default="l1,taylor,wanda,flap")
    parser.add_argument("--calibration", type=int, default=64, help="calibration sequences of 128 bytes")
    parser.add_argument("--calibration-batches", type=int, default=32,
                        help="of those, how many the activation importances and bias compensation read")
    parser.add_argument("--recovery-steps", type=int, default=40)
    parser.add_argument("--eval-bytes", type=int, default=100_000)
    parser.add_argument("--no-peer", action="store_true")
    parser.add_argument("--checkpoint", help="the small LM (default: the cache; trained there if absent)")
    parser.add_argument("--out", default="benchmarks/results/llm.json")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    dense, record = small_lm.load_or_train(path=args.checkpoint)
    train_files, held_files = small_lm.stdlib_files()
    train, held = small_lm.tokens_of(train_files), small_lm.tokens_of(held_files)
    rng = np.random.default_rng(1)
    calibration = [next(small_lm.batches(train, 1, SEQ, rng)) for _ in range(args.calibration)]
    example = {"input_ids": calibration[0][0], "use_cache": False}
    recovery_batches = small_lm.batches(train, 8, SEQ, np.random.default_rng(2))
    recovery = [next(recovery_batches) for _ in range(args.recovery_steps)]

    def ppl(model) -> float:
        return small_lm.perplexity(model, held, max_tokens=args.eval_bytes)

    fidelity_inputs = torch.from_numpy(held[: 64 * SEQ].reshape(64, SEQ))
    with torch.no_grad():
        dense_logits = small_lm.logits_of(dense(fidelity_inputs, use_cache=False)).double()

    def fidelity(model) -> dict:
        """How far the pruned model's next-byte predictions are from the dense model's on the first 64
        held-out windows: KL(dense || pruned) per token and the mean squared difference of the logits
        (the error bias compensation's mean shift is built to shrink, which need not move the first)."""
        with torch.no_grad():
            logits = small_lm.logits_of(model(fidelity_inputs, use_cache=False)).double()
        kl = torch.nn.functional.kl_div(logits.log_softmax(-1), dense_logits.log_softmax(-1), log_target=True,
                                        reduction="none").sum(-1).mean()
        return {"kl_from_dense": kl.item(), "logit_mse": ((logits - dense_logits) ** 2).mean().item()}

    def loss_fn(output, target):
        logits = small_lm.logits_of(output)
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))

    embedding = {"model.embed_tokens.weight", "lm_head.weight"}
    n_total = sum(p.numel() for p in dense.parameters())
    n_embed = sum(p.numel() for n, p in dense.named_parameters() if n in embedding)
    rows = [{"method": "dense", "ratio": 0.0, "non_embedding_params": n_total - n_embed, "ppl": ppl(dense)}]
    print(f"dense: {rows[0]['non_embedding_params']} non-embedding parameters, held-out perplexity {rows[0]['ppl']:.3f} "
          f"(trained {record['steps']} steps)", flush=True)
    best: Dict[float, tuple] = {}
    for ratio in map(float, args.ratios.split(",")):
        keep = ((1 - ratio) * (n_total - n_embed) + n_embed) / n_total
        for importance in args.importances.split(","):
            for compensation in (False, True):
                start = time.perf_counter()
                scorer = ACTIVATION_IMPORTANCES[importance](args.calibration_batches) \
                    if importance in ACTIVATION_IMPORTANCES else importance
                pruned = fxprune.compile(dense, fxprune.Budget(params=keep), example_inputs=example, importance=scorer,
                                         data=calibration, loss_fn=loss_fn, ignore=["*embed_tokens"],
                                         bias_compensation=args.calibration_batches if compensation else False)
                seconds = time.perf_counter() - start
                model = to_huggingface(dense, pruned)
                row = {"method": f"fxprune {importance}" + (" +bias comp." if compensation else ""), "ratio": ratio,
                       "compile_seconds": seconds, **fidelity(model),
                       "removed_inputs_mean_share": pruned.meta["fxprune"].get("bias_compensation", {}).get(
                           "removed_inputs_mean_share"),
                       **measure(model, ppl, recovery, embedding)}
                rows.append(row)
                print(line(row), flush=True)
                if ratio not in best or row["ppl"] < best[ratio][0]["ppl"]:
                    best[ratio] = (row, pruned)
        if not args.no_peer:
            target = best[ratio][0]["non_embedding_params"]
            model, tp_ratio = torch_pruning_llm(dense, calibration[0][0], target, embedding)
            row = {"method": "Torch-Pruning (its LLM example)", "ratio": ratio, "tp_pruning_ratio": tp_ratio,
                   **fidelity(model), **measure(model, ppl, recovery, embedding)}
            rows.append(row)
            print(line(row), flush=True)
            best[ratio] = best[ratio] + (model,)
        with open(args.out, "w") as fh:
            json.dump({"record": record, "rows": rows}, fh, indent=1)
    rows.append({"method": "onnxruntime latency, batch 1 x 128 bytes", **latency(dense, best, example)})
    print(json.dumps(rows[-1], indent=1))
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump({"record": record, "rows": rows}, fh, indent=1)
    print(f"wrote {args.out}")
    return 0


def measure(model, ppl, recovery, embedding) -> dict:
    """Perplexity before and after the same short recovery (a copy is trained)."""
    result = {"non_embedding_params": sum(p.numel() for n, p in model.named_parameters() if n not in embedding),
              "ppl": ppl(model)}
    if recovery:
        tuned = copy.deepcopy(model).train()
        optimizer = torch.optim.AdamW(tuned.parameters(), lr=2e-4, weight_decay=0.0)
        for step, (x, y) in enumerate(recovery):
            for group in optimizer.param_groups:     # a 5-step warm-up: Adam's first steps are full-size
                group["lr"] = 2e-4 * min(1.0, (step + 1) / 5)
            loss = torch.nn.functional.cross_entropy(tuned(x, use_cache=False).logits.reshape(-1, 256), y.reshape(-1))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        result["ppl_recovered"] = ppl(tuned.eval())
    return result


def torch_pruning_llm(dense, ids, target_params: int, embedding):
    """Torch-Pruning's LLM recipe, its pruning ratio bisected until the non-embedding parameter count is
    closest to fxprune's (from above: never given fewer parameters)."""
    import torch_pruning as tp

    def prune(ratio: float):
        model = copy.deepcopy(dense)
        heads = {}
        for name, m in model.named_modules():
            if name.endswith("self_attn"):
                heads[m.q_proj] = model.config.num_attention_heads
                heads[m.k_proj] = heads[m.v_proj] = model.config.num_key_value_heads
        pruner = tp.pruner.MetaPruner(model, example_inputs=ids,
                                      importance=tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean"),
                                      global_pruning=False, pruning_ratio=ratio, ignored_layers=[model.lm_head],
                                      num_heads=heads, prune_num_heads=True, prune_head_dims=False,
                                      head_pruning_ratio=ratio, round_to=4, output_transform=lambda out: out.logits,
                                      forward_fn=lambda m, x: m(x, use_cache=False))
        for group in pruner.step(interactive=True):
            group.prune()
        for name, m in model.named_modules():     # what its example updates by hand after pruning
            if name.endswith("self_attn"):
                m.num_key_value_groups = m.q_proj.out_features // m.k_proj.out_features
        return model.eval(), sum(p.numel() for n, p in model.named_parameters() if n not in embedding)

    lo, hi, best = 0.0, 0.9, None
    for _ in range(12):
        mid = (lo + hi) / 2
        model, params = prune(mid)
        if params >= target_params:
            best, lo = (model, mid), mid
        else:
            hi = mid
    return best


def latency(dense, best, example) -> dict:
    """onnxruntime (1 thread) latency of the dense model, each ratio's best fxprune result and
    Torch-Pruning's, interleaved."""
    from fxprune.export.benchmark import benchmark_onnxruntime
    ids = example["input_ids"]
    dense_graph = fxprune.compile(dense, 1.0, example_inputs=example, verify=False)
    models = {"dense": dense_graph}
    for ratio, entry in best.items():
        models[f"fxprune@{ratio:g}"] = entry[1]
        if len(entry) > 2:
            models[f"torch-pruning@{ratio:g}"] = fxprune.compile(entry[2], 1.0, example_inputs={
                "input_ids": ids, "use_cache": False}, verify=False)
    result = benchmark_onnxruntime(models, (ids,), name="small_lm", batch_sizes=(1,), threads=1, runs=50,
                                   max_seconds=60)
    dense_ms = result.dense.latency[1].median_ms
    return {row.name: {"ms": row.latency[1].median_ms, "speedup": dense_ms / row.latency[1].median_ms}
            for row in result.rows}


def line(row: dict) -> str:
    recovered = f", after recovery {row['ppl_recovered']:.3f}" if "ppl_recovered" in row else ""
    return (f"{row['method']:<34s} remove {row['ratio']:.0%}: {row['non_embedding_params']} non-embedding params, "
            f"perplexity {row['ppl']:.3f}{recovered}; KL from dense {row['kl_from_dense']:.4f}, "
            f"logit MSE {row['logit_mse']:.4f}" + _mean_share(row))


def _mean_share(row: dict) -> str:
    """The compensated layers' range of 'share of the removed inputs' second moment that is their mean'."""
    shares = list((row.get("removed_inputs_mean_share") or {}).values())
    return f"; removed inputs' mean share {min(shares):.3f}-{max(shares):.3f}" if shares else ""


if __name__ == "__main__":
    raise SystemExit(main())
