"""Coverage on the models users bring: fxprune and Torch-Pruning, model by model, side by side.

Zoos (random weights, nothing downloaded):
    timm            the smallest variants of every timm model family (the module a model is defined in),
                    two per family by parameter count (three where a family has many), `--limit` at most;
    transformers    Hugging Face encoders, decoders (GQA), encoder-decoders, vision and audio models from
                    small configs, with keyword inputs (budget 0.75: their residual stream is the output);
    detection       torchvision detection and segmentation, Ultralytics YOLOv8n and YOLO11n from yaml;

Each model runs in its own child process with a time limit (`--timeout`), so a hang or a crash is one row,
not the end of the run. In the child, for the model at budget 0.5 (FLOPs):
    fxprune   compile(model, 0.5, example_inputs, verify=True) with the default options. Status "ok" only
              when it verified and at least one channel was pruned; "frozen" when it ran but nothing could
              be pruned (a failure in this table); "error: <FxPruneError subclass>" for a clear fxprune
              error; "crash: <exception type>" for any other exception (a bug). Also: FLOPs kept, the share
              of channel units that were prunable (not frozen; groups frozen only because they are the
              model's outputs, such as the classes, are left out), the top frozen reasons, seconds;
    tp        Torch-Pruning's MagnitudePruner (L1, pruning_ratio 0.3, classifier ignored), then a forward
              pass of the result: "ok" if both ran, else the exception type. Torch-Pruning verifies nothing,
              so "ok" only means it did not raise.

    python benchmarks/coverage.py --zoo timm --limit 150            # about an hour on 2 cores
    python benchmarks/coverage.py --zoo timm --models resnet18,vit_tiny_patch16_224

Prints a row per model, a summary and the most common frozen reasons and errors; writes JSON to --out
after every model."""
from __future__ import annotations

import argparse
import collections
import concurrent.futures
import json
import os
import re
import subprocess
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))


# ---------------------------------------------------------------------------------------------- zoos
def timm_zoo(limit: int, max_params: float, per_family: int = 2) -> list:
    """The `per_family` smallest models of every timm family (one more where a family has 30 or more),
    by parameter count on the meta device; families in alphabetical order, so a small --limit with
    --per-family 1 still samples across families."""
    import timm
    import torch
    from timm.models import _registry
    by_family = collections.defaultdict(list)
    for name in timm.list_models():
        by_family[_registry._model_to_module.get(name, "?")].append(name)
    chosen = []
    for family, names in sorted(by_family.items()):
        sized = []
        for name in sorted(names, key=_size_hint)[:12]:  # a cheap pre-filter before building on meta
            try:
                with torch.device("meta"):
                    model = timm.create_model(name, pretrained=False)
                sized.append((sum(p.numel() for p in model.parameters()), name))
            except Exception:
                continue
        sized = sorted(s for s in sized if s[0] <= max_params)
        take = per_family + 1 if len(names) >= 30 and per_family > 1 else per_family
        chosen.extend(name for _, name in sized[:take])
    return chosen[:limit]


_SIZE_WORDS = ["atto", "femto", "pico", "nano", "xxs", "xs", "tiny", "mini", "small", "s", "b0", "lite", "18", "mobile"]


def _size_hint(name: str) -> tuple:
    """Small-model names first (tiny, nano, b0, 18, ...); then shorter names."""
    parts = re.split(r"[_.]", name)
    rank = min((i for i, w in enumerate(_SIZE_WORDS) if w in parts or any(p.startswith(w) for p in parts)),
               default=len(_SIZE_WORDS))
    return rank, len(name), name


def _needs_native_size(model) -> bool:
    """ViT-style models check the input against a fixed image size."""
    patch_embed = getattr(model, "patch_embed", None)
    return bool(getattr(patch_embed, "strict_img_size", False) or getattr(model, "img_size", None))


def build_timm(name: str):
    import timm
    import torch
    model = timm.create_model(name, pretrained=False).eval()
    size = timm.data.resolve_model_data_config(model).get("input_size", (3, 224, 224))
    if max(size[1:]) > 256 and not _needs_native_size(model):
        size = (size[0], min(size[1], 256), min(size[2], 256))  # keeps the run short
    return model, (torch.randn(1, *size),)


# ---- Hugging Face transformers: small random configs (never downloaded), keyword inputs
_LAYERS = dict(num_hidden_layers=2, num_attention_heads=4, intermediate_size=256, hidden_size=64, vocab_size=1000)
_GQA = dict(_LAYERS, num_key_value_heads=2)
_TEXT = {  # name: (model class, config class, config)
    "bert": ("BertModel", "BertConfig", _LAYERS),
    "roberta": ("RobertaModel", "RobertaConfig", _LAYERS),
    "distilbert": ("DistilBertModel", "DistilBertConfig",
                   dict(n_layers=2, n_heads=4, dim=64, hidden_dim=256, vocab_size=1000)),
    "gpt2": ("GPT2Model", "GPT2Config", dict(n_layer=2, n_head=4, n_embd=64, vocab_size=1000)),
    "opt": ("OPTModel", "OPTConfig", dict(num_hidden_layers=2, num_attention_heads=4, hidden_size=64, ffn_dim=256,
                                          word_embed_proj_dim=64, vocab_size=1000)),
    "llama": ("LlamaModel", "LlamaConfig", _GQA),
    "qwen2": ("Qwen2Model", "Qwen2Config", _GQA),
    "mistral": ("MistralModel", "MistralConfig", _GQA),
    "gemma": ("GemmaModel", "GemmaConfig", dict(_GQA, head_dim=16)),
    "phi": ("PhiModel", "PhiConfig", _LAYERS),
    "phi3": ("Phi3Model", "Phi3Config", dict(_GQA, pad_token_id=0)),
    "t5": ("T5Model", "T5Config", dict(num_layers=2, num_heads=4, d_model=64, d_kv=16, d_ff=256, vocab_size=1000)),
    "bart": ("BartModel", "BartConfig", dict(encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                                             decoder_attention_heads=4, d_model=64, encoder_ffn_dim=256,
                                             decoder_ffn_dim=256, vocab_size=1000)),
}
_VISION = {
    "vit": ("ViTModel", "ViTConfig", dict(_LAYERS, image_size=32, patch_size=8)),
    "swin": ("SwinModel", "SwinConfig", dict(image_size=32, patch_size=2, embed_dim=16, depths=[1, 1], num_heads=[2, 4],
                                             window_size=4)),
    "convnext": ("ConvNextModel", "ConvNextConfig", dict(hidden_sizes=[16, 32], depths=[1, 1], num_stages=2)),
}


def build_transformers(name: str):
    import torch
    import transformers
    if name in _TEXT or name in _VISION:
        model_class, config_class, config = {**_TEXT, **_VISION}[name]
        model = getattr(transformers, model_class)(getattr(transformers, config_class)(**config)).eval()
        if name in _VISION:
            return model, {"pixel_values": torch.randn(1, 3, 32, 32)}
        inputs = {"input_ids": torch.randint(0, 1000, (2, 16)), "attention_mask": torch.ones(2, 16, dtype=torch.long)}
        if model.config.is_encoder_decoder:
            inputs["decoder_input_ids"] = torch.randint(0, 1000, (2, 8))
        if "use_cache" in model.config:
            inputs["use_cache"] = False  # the forward without a KV cache is what is pruned
        return model, inputs
    if name == "clip":
        model = transformers.CLIPModel(transformers.CLIPConfig(
            text_config=dict(_LAYERS, max_position_embeddings=32),
            vision_config=dict(_LAYERS, image_size=32, patch_size=8))).eval()
        return model, {"input_ids": torch.randint(0, 1000, (2, 16)), "pixel_values": torch.randn(2, 3, 32, 32),
                       "attention_mask": torch.ones(2, 16, dtype=torch.long)}
    if name == "whisper_encoder":
        config = transformers.WhisperConfig(d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                                            decoder_attention_heads=4, encoder_ffn_dim=256, decoder_ffn_dim=256,
                                            num_mel_bins=16, max_source_positions=32, vocab_size=1000, pad_token_id=0,
                                            bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)
        return transformers.WhisperModel(config).encoder.eval(), {"input_features": torch.randn(1, 16, 64)}
    if name == "wav2vec2":
        config = transformers.Wav2Vec2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                             intermediate_size=256, conv_dim=(16, 16), conv_stride=(5, 2),
                                             conv_kernel=(10, 3), num_conv_pos_embeddings=16,
                                             num_conv_pos_embedding_groups=4)
        return transformers.Wav2Vec2Model(config).eval(), {"input_values": torch.randn(1, 1600)}
    raise KeyError(name)


TRANSFORMERS_ZOO = [*_TEXT, *_VISION, "clip", "whisper_encoder", "wav2vec2"]

# ---- detection and segmentation: torchvision (random weights, no backbone weights) and Ultralytics YOLO
DETECTION_ZOO = ["fasterrcnn_mobilenet_v3_large_fpn", "retinanet_resnet50_fpn", "fcos_resnet50_fpn",
                 "ssdlite320_mobilenet_v3_large", "maskrcnn_resnet50_fpn", "deeplabv3_mobilenet_v3_large",
                 "fcn_resnet50", "lraspp_mobilenet_v3_large", "yolov8n", "yolo11n"]


def build_detection(name: str):
    import torch
    if name.startswith("yolo"):
        os.environ.setdefault("YOLO_OFFLINE", "1")
        from ultralytics.nn.tasks import DetectionModel
        return DetectionModel(f"{name}.yaml", verbose=False).eval(), (torch.randn(1, 3, 160, 160),)
    from torchvision.models import detection, segmentation
    module = segmentation if hasattr(segmentation, name) else detection
    model = getattr(module, name)(weights=None, weights_backbone=None).eval()
    return model, (torch.randn(1, 3, 160, 160),)

BUILDERS = {"timm": build_timm, "transformers": build_transformers, "detection": build_detection}
# The residual stream of a transformer is its output (kept whole), so half the FLOPs of these small
# configs is out of reach by heads and MLP widths alone; 0.75 asks for a real cut of both.
BUDGETS = {"timm": 0.5, "transformers": 0.75, "detection": 0.5}


# ---------------------------------------------------------------------------------------------- child
def run_one(zoo: str, name: str, tool: str) -> dict:
    import torch
    import fxprune
    torch.manual_seed(0)
    row = {"model": name, "zoo": zoo}
    try:
        model, inputs = BUILDERS[zoo](name)
    except Exception as exc:
        row.update(fx="build failed", error=f"{type(exc).__name__}: {str(exc)[:200]}")
        return row
    row["params"] = sum(p.numel() for p in model.parameters())
    if tool == "tp":
        row["tp"] = run_tp(model, inputs)
        return row
    start = time.perf_counter()
    try:
        pruned = fxprune.compile(model, BUDGETS[zoo], example_inputs=inputs, verify=True)
        report = pruned.meta["fxprune"]
        # the model's outputs (classes, boxes) always keep their size: not channels one could prune
        inner = [g for g in report["groups"] if not (g["reasons"] and all("graph output" in r for r in g["reasons"]))]
        units = sum(g["size"] for g in inner)
        frozen = sum(g["frozen"] for g in inner)
        row.update(flops_ratio=report["flops"]["ratio"], prunable_share=(units - frozen) / max(units, 1),
                   verified=report["verification"]["passed"],
                   reasons=_top_reasons(g for grp in report["groups"] for g in grp["reasons"]))
        row["fx"] = "ok" if report["flops"]["ratio"] < 0.999 else "frozen"
    except fxprune.NoPrunableChannelsError as exc:
        row.update(fx="frozen", error=str(exc)[:400])
    except fxprune.FxPruneError as exc:
        row.update(fx=f"error: {type(exc).__name__}", error=str(exc)[:400])
    except Exception as exc:
        row.update(fx=f"crash: {type(exc).__name__}", error=traceback.format_exc()[-800:])
    row["fx_seconds"] = time.perf_counter() - start
    return row


def _top_reasons(reasons, n: int = 5) -> list:
    # node names differ per model: count the reason with the node name taken out
    counts = collections.Counter(re.sub(r"%[A-Za-z_]\w* \(", "%node (", r) for r in reasons)
    return [r for r, _ in counts.most_common(n) if "graph output" not in r]


def run_tp(model, inputs) -> str:
    try:
        import copy
        import torch
        import torch_pruning as tp
    except ImportError:
        return "not installed"
    try:
        model = copy.deepcopy(model)
        outputs = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1:]
        pruner = tp.pruner.MagnitudePruner(model, inputs, importance=tp.importance.MagnitudeImportance(p=1),
                                           pruning_ratio=0.3, ignored_layers=outputs)
        pruner.step()
        with torch.no_grad():
            model(**inputs) if isinstance(inputs, dict) else model(*inputs)
        return "ok"
    except Exception as exc:
        return f"{type(exc).__name__}"


# ---------------------------------------------------------------------------------------------- parent
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zoo", choices=sorted(BUILDERS), default="timm")
    parser.add_argument("--models", help="comma-separated names (default: the zoo's selection)")
    parser.add_argument("--limit", type=int, default=150)
    parser.add_argument("--max-params", type=float, default=60e6)
    parser.add_argument("--per-family", type=int, default=2, help="models per timm family")
    parser.add_argument("--timeout", type=float, default=150, help="seconds per model and tool")
    parser.add_argument("--tool", choices=["fx", "tp"], default="fx", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per child")
    parser.add_argument("--jobs", type=int, default=1, help="models run at once (each child uses --threads)")
    parser.add_argument("--out", default=None, help="JSON output (default benchmarks/results/coverage_<zoo>.json)")
    parser.add_argument("--peer-from", help="take Torch-Pruning's column from this earlier JSON of the same zoo "
                                            "instead of running it again (it is the slow half of a run, and "
                                            "does not change when fxprune does)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # child mode: run one model, print its row
    args = parser.parse_args()
    if args.one:
        import torch
        torch.set_num_threads(args.threads)
        print("ROW " + json.dumps(run_one(args.zoo, args.one, args.tool)))
        return 0

    if args.models:
        names = args.models.split(",")
    elif args.zoo == "transformers":
        names = TRANSFORMERS_ZOO
    elif args.zoo == "detection":
        names = DETECTION_ZOO
    else:
        names = timm_zoo(args.limit, args.max_params, args.per_family)
    out = args.out or os.path.join(HERE, "results", f"coverage_{args.zoo}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    print(f"{len(names)} {args.zoo} models, budget {BUDGETS[args.zoo]} (FLOPs), {args.threads} thread(s), {args.timeout:.0f} s each\n")
    print(f"{'model':44s} {'fxprune':28s} {'flops':>6s} {'prun.':>6s} {'s':>6s}  torch-pruning")
    rows = []

    earlier = {}
    if args.peer_from:
        with open(args.peer_from) as f:
            earlier = {r["model"]: r.get("tp", "-") for r in json.load(f)["rows"]}

    def both_tools(name: str) -> dict:
        row = child(args, name, "fx")
        row["tp"] = earlier.get(name, "not in --peer-from") if args.peer_from else child(args, name, "tp").get("tp", "-")
        return row

    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        for name, row in zip(names, pool.map(both_tools, names)):
            rows.append(row)
            _print_row(name, row)
            with open(out, "w") as f:
                json.dump({"zoo": args.zoo, "budget": BUDGETS[args.zoo], "rows": rows,
                           "how": " ".join(sys.argv[1:])}, f, indent=1)
    summarise(rows)
    print(f"\nwrote {out}")
    return 0


def _print_row(name: str, row: dict) -> None:
    flops = f"{row['flops_ratio']:.3f}" if "flops_ratio" in row else "-"
    share = f"{row['prunable_share']:.2f}" if "prunable_share" in row else "-"
    print(f"{name[:44]:44s} {row['fx'][:28]:28s} {flops:>6s} {share:>6s} {row.get('fx_seconds', 0):6.1f}  "
          f"{row.get('tp', '-')}", flush=True)


def child(args, name: str, tool: str) -> dict:
    """One tool on one model in a fresh process, with the time limit; a crash or hang is a row too."""
    env = dict(os.environ, FXPRUNE_VERIFY="0", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, __file__, "--zoo", args.zoo, "--one", name, "--tool", tool, "--threads", str(args.threads)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"model": name, "fx": "timeout", "tp": "timeout"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("ROW ")]
    if lines:
        return json.loads(lines[-1][4:])
    return {"model": name, "fx": f"crash: exit {proc.returncode}", "tp": f"exit {proc.returncode}",
            "error": proc.stderr[-800:]}


def summarise(rows: list) -> None:
    n = len(rows)
    good = [r for r in rows if r["fx"] == "ok" and r.get("prunable_share", 0) >= 0.8]
    ok = [r for r in rows if r["fx"] == "ok"]
    crashes = [r for r in rows if r["fx"].startswith("crash")]
    tp_ok = sum(r.get("tp") == "ok" for r in rows)
    print(f"\nfxprune: {len(ok)}/{n} verified with channels pruned, {len(good)}/{n} with >= 80% of units prunable; "
          f"{len(crashes)} crashes (non-fxprune exceptions). Torch-Pruning ran (unverified) on {tp_ok}/{n}.")
    statuses = collections.Counter(r["fx"] for r in rows)
    print("status counts: " + ", ".join(f"{k} {v}" for k, v in statuses.most_common()))
    reasons = collections.Counter(reason for r in rows for reason in r.get("reasons", []))
    errors = collections.Counter(re.sub(r"%[A-Za-z_]\w*", "%node", r.get("error", "").split("\n")[0])[:160]
                                 for r in rows if r["fx"] != "ok")
    print("most common frozen reasons (models):")
    for reason, count in reasons.most_common(12):
        print(f"  {count:3d}  {reason[:150]}")
    print("most common failures (models):")
    for error, count in errors.most_common(12):
        print(f"  {count:3d}  {error}")


if __name__ == "__main__":
    sys.exit(main())
