"""FLAP's bias compensation checked on two small LMs that differ in their MLP: the Llama-style one
(gated SiLU MLP) and an OPT-style sibling (ungated ReLU MLP), both trained here by small_lm.py.

Bias compensation adds, to each linear layer that loses inputs, the calibration mean of what those
inputs contributed. It can only restore the part of a removed input that is its mean: the report's
`removed_inputs_mean_share`. A gated MLP's down projection reads products act(gate) * up whose means
are small; a ReLU MLP's reads non-negative activations whose means are large. For each model, ratio
(of the non-embedding parameters removed) and importance, held-out perplexity and KL from the dense
model with and without compensation, the same plan both times (compensation never changes what is
removed), no retraining.

    python benchmarks/bias_compensation.py       # trains the OPT-style LM on first use (~10 min)

Prints a table and writes JSON to --out."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import warnings
from typing import List, Optional

import numpy as np
import torch

import fxprune

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import small_lm  # noqa: E402

SEQ = small_lm.SEQ_LEN
BATCH = 16
IMPORTANCES = {"wanda": fxprune.WandaImportance, "flap": fxprune.FluctuationImportance}


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--archs", default="llama,opt")
    parser.add_argument("--ratios", default="0.2,0.5", help="fractions of the non-embedding parameters to remove")
    parser.add_argument("--importances", default="flap,wanda")
    parser.add_argument("--calibration-batches", type=int, default=8, help=f"batches of {BATCH} x {SEQ} bytes")
    parser.add_argument("--eval-batches", type=int, default=48, help=f"held-out batches of {BATCH} x {SEQ} bytes")
    parser.add_argument("--out", default="benchmarks/results/bias_compensation.json")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    train_files, held_files = small_lm.stdlib_files()
    train, held = small_lm.tokens_of(train_files), small_lm.tokens_of(held_files)
    rng = np.random.default_rng(1)
    calibration = [next(small_lm.batches(train, BATCH, SEQ, rng)) for _ in range(args.calibration_batches)]
    n_eval = args.eval_batches * BATCH
    held_x = torch.from_numpy(held[: n_eval * SEQ].reshape(n_eval, SEQ))
    held_y = torch.from_numpy(held[1: n_eval * SEQ + 1].reshape(n_eval, SEQ))

    def evaluate(model, dense_logits=None) -> dict:
        """Held-out perplexity, and KL(dense || model) per byte when the dense logits are given."""
        total, kl, logits_all = 0.0, 0.0, []
        with torch.no_grad():
            for i in range(0, n_eval, BATCH):
                logits = small_lm.logits_of(model(input_ids=held_x[i: i + BATCH])).double()
                total += torch.nn.functional.cross_entropy(logits.reshape(-1, 256), held_y[i: i + BATCH].reshape(-1),
                                                           reduction="sum").item()
                if dense_logits is None:
                    logits_all.append(logits.float())
                else:
                    kl += torch.nn.functional.kl_div(logits.log_softmax(-1), dense_logits[i // BATCH].double().log_softmax(-1),
                                                     log_target=True, reduction="sum").item()
        result = {"ppl": float(np.exp(total / held_y.numel()))}
        if dense_logits is None:
            result["logits"] = logits_all
        else:
            result["kl_from_dense"] = kl / held_y.numel()
        return result

    rows = []
    for arch in args.archs.split(","):
        dense, record = small_lm.load_or_train(arch=arch)
        # embeddings: token and position tables and the output projection (llm.py counts them alike)
        embedding = {id(m.weight) for m in dense.modules() if isinstance(m, torch.nn.Embedding)}
        embedding.add(id(dense.get_output_embeddings().weight))
        n_total = sum(p.numel() for p in dense.parameters())
        n_embed = sum(p.numel() for p in dense.parameters() if id(p) in embedding)
        base = evaluate(dense)
        dense_logits = base.pop("logits")
        rows.append({"arch": arch, "method": "dense", "ratio": 0.0, **base})
        print(f"{arch}: dense held-out perplexity {base['ppl']:.3f} ({n_total - n_embed} non-embedding parameters)",
              flush=True)
        example = {"input_ids": calibration[0][0], "use_cache": False}
        for ratio in map(float, args.ratios.split(",")):
            keep = ((1 - ratio) * (n_total - n_embed) + n_embed) / n_total
            for importance in args.importances.split(","):
                for compensation in (False, True):
                    start = time.perf_counter()
                    pruned = fxprune.compile(dense, fxprune.Budget(params=keep), example_inputs=example,
                                             importance=IMPORTANCES[importance](args.calibration_batches),
                                             data=calibration, ignore=["*embed_tokens"],
                                             bias_compensation=args.calibration_batches if compensation else False)
                    report = pruned.meta["fxprune"]
                    shares = report.get("bias_compensation", {}).get("removed_inputs_mean_share", {})
                    row = {"arch": arch, "method": importance + (" +bias comp." if compensation else ""),
                           "ratio": ratio, "compile_seconds": time.perf_counter() - start,
                           "params_ratio": report["params"]["ratio"],
                           "removed_inputs_mean_share": shares,
                           "mean_share_median": float(np.median(list(shares.values()))) if shares else None,
                           **evaluate(pruned, dense_logits)}
                    if compensation:
                        row.update(removed_input_tails(dense, report, held_x[:2 * BATCH]))
                    rows.append(row)
                    print(line(row), flush=True)
        with open(args.out, "w") as fh:
            json.dump({"rows": rows}, fh, indent=1)
    print(summary(rows))
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump({"rows": rows}, fh, indent=1)
    print(f"wrote {args.out}")
    return 0


def removed_input_tails(dense, report: dict, inputs: torch.Tensor) -> dict:
    """How the removed inputs of the compensated layers are distributed over positions, in the dense
    model on held-out bytes (medians over the removed channels of all layers): the share of positions
    where a channel is ~0, and the share of its energy (sum of x^2) in its top 5 % of positions. A
    sparse or heavy-tailed channel has a small mean for its energy; a constant cannot stand in for it."""
    layers = report["bias_compensation"]["layers"]
    seen = {}
    hooks = [dense.get_submodule(name).register_forward_pre_hook(
        lambda module, args, name=name: seen.__setitem__(name, args[0].detach().reshape(-1, args[0].shape[-1])))
        for name in layers]
    try:
        with torch.no_grad():
            dense(input_ids=inputs)
    finally:
        for hook in hooks:
            hook.remove()
    near_zero, top_share = [], []
    for name in layers:
        x = seen[name]
        kept = np.zeros(x.shape[1], dtype=bool)
        kept[report["modules"][name]["in"]] = True
        removed = x[:, torch.from_numpy(~kept)]
        energy = removed ** 2
        top = torch.sort(energy, 0, descending=True)[0][: max(1, energy.shape[0] // 20)].sum(0)
        live = energy.sum(0) > 0
        near_zero.append((removed.abs() < 1e-3).float().mean(0))
        top_share.append(top[live] / energy.sum(0)[live])
    return {"removed_near_zero_share": float(torch.cat(near_zero).median()),
            "removed_top5pct_energy_share": float(torch.cat(top_share).median())}


def line(row: dict) -> str:
    share = f"  mean share (median layer) {row['mean_share_median']:.2f}" if row.get("mean_share_median") else ""
    if "removed_near_zero_share" in row:
        share += (f"; removed channels ~0 at {row['removed_near_zero_share']:.2f} of positions, top 5% of positions "
                  f"hold {row['removed_top5pct_energy_share']:.2f} of their energy")
    return (f"  {row['arch']:6s} {row['ratio']:.0%} {row['method']:20s} ppl {row['ppl']:.3f}  "
            f"KL {row['kl_from_dense']:.4f}{share}")


def summary(rows: List[dict]) -> str:
    """Per model, ratio and importance: perplexity without -> with compensation."""
    out = ["", f"{'model':8s} {'ratio':>5s} {'importance':10s} {'ppl':>8s} {'+comp.':>8s} {'change':>8s} {'mean share':>10s}"]
    plain = {(r["arch"], r["ratio"], r["method"]): r for r in rows}
    for r in rows:
        if not r["method"].endswith("+bias comp."):
            continue
        base = plain[(r["arch"], r["ratio"], r["method"].split()[0])]
        out.append(f"{r['arch']:8s} {r['ratio']:5.0%} {r['method'].split()[0]:10s} {base['ppl']:8.3f} {r['ppl']:8.3f} "
                   f"{r['ppl'] / base['ppl'] - 1:+8.2%} {r['mean_share_median']:10.2f}")
    return "\n".join(out)


if __name__ == "__main__":
    raise SystemExit(main())
