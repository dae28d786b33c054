"""Pruned Hugging Face models that stay Hugging Face models: `generate`, the KV cache, save and load.

fxprune's result is a GraphModule (a traced forward, no cache, no `generate`). Its parameters carry
the original model's qualified names, so the user's model class can take them back:

    pruned = fxprune.compile(model, 0.5, example_inputs={"input_ids": ids, "use_cache": False})
    hf = to_huggingface(model, pruned)            # a copy of `model`, every layer at its pruned width
    hf.generate(ids, max_new_tokens=20)
    save_pruned(hf, "out/")                       # save_pretrained + the widths in config.json
    hf = load_pruned("out/")                      # any process: config + shapes from the checkpoint

Layers are resized to the shapes of the pruned tensors (nn.Linear, nn.Embedding and norm weights;
a bias that bias compensation added is created), so per-layer widths need no new modelling code.
Attention modules that keep `num_key_value_groups` (Llama, Mistral, Qwen2 and relatives, which infer
the head count from the tensor size) get it from their projections' widths; config.json records it
per layer under "fxprune" and load_pruned restores it."""
from __future__ import annotations

import copy
import json
import os
from typing import Any, Dict

import torch
from torch import nn

FORMAT = "fxprune.huggingface/1"


def to_huggingface(model: nn.Module, pruned: nn.Module) -> nn.Module:
    """A copy of the Hugging Face `model` with every parameter and buffer replaced by the pruned
    GraphModule's tensor of the same name (same qualified names; the user's model is not touched)."""
    result = copy.deepcopy(model)
    state = {k: v for k, v in pruned.state_dict().items()}
    _resize_to(result, {k: tuple(v.shape) for k, v in state.items()})
    persistent = result.state_dict()     # non-persistent buffers (rotary inv_freq) are not the pruner's to change
    state = {k: v for k, v in state.items() if k in persistent or k not in dict(result.named_buffers())}
    missing, unexpected = result.load_state_dict(state, strict=False)
    expected_missing = {k for k, _ in result.named_buffers() if k not in state}
    if set(missing) - expected_missing or unexpected:
        raise ValueError(f"the pruned model's tensors do not match {type(model).__name__}: missing "
                         f"{sorted(set(missing) - expected_missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
    _set_head_groups(result)
    return result.eval()


def save_pruned(model: nn.Module, directory: str) -> None:
    """save_pretrained, with what load_pruned needs in config.json["fxprune"]."""
    model.config.fxprune = {"format": FORMAT, "head_groups": _head_groups(model)}
    model.save_pretrained(directory)


def load_pruned(directory: str, model_class: Any = None) -> nn.Module:
    """The model save_pruned wrote: its class built from config.json, each layer resized to the
    checkpoint's shapes, the weights loaded (strictly), in eval mode."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM
    config = AutoConfig.from_pretrained(directory)
    recorded = getattr(config, "fxprune", None)
    if not isinstance(recorded, dict) or recorded.get("format") != FORMAT:
        raise ValueError(f"{directory} was not written by fxprune.export.huggingface.save_pruned")
    model = (model_class or AutoModelForCausalLM).from_config(config)
    state: Dict[str, torch.Tensor] = {}
    index = os.path.join(directory, "model.safetensors.index.json")
    files = sorted(set(json.load(open(index))["weight_map"].values())) if os.path.exists(index) else ["model.safetensors"]
    for name in files:
        state.update(load_file(os.path.join(directory, name)))
    _resize_to(model, {k: tuple(v.shape) for k, v in state.items()})
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {k for k in missing if _tied(model, k)}
    buffers = {k for k, _ in model.named_buffers()}
    if set(missing) - tied - buffers or unexpected:
        raise ValueError(f"{directory}: checkpoint and model differ: missing {sorted(set(missing) - tied - buffers)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")
    for name, groups in recorded.get("head_groups", {}).items():
        model.get_submodule(name).num_key_value_groups = groups
    return model.eval()


def _tied(model: nn.Module, name: str) -> bool:
    """A parameter the checkpoint leaves out because it is tied to another (lm_head to the embedding)."""
    return name.endswith("lm_head.weight") and getattr(model.config, "tie_word_embeddings", False)


def _resize_to(model: nn.Module, shapes: Dict[str, tuple]) -> None:
    """Give every parameter/buffer named in `shapes` that shape (values are loaded afterwards), and
    the layer attributes that describe it; create biases the shapes have and the model does not."""
    for name, shape in shapes.items():
        module_name, _, local = name.rpartition(".")
        try:
            module = model.get_submodule(module_name)
        except AttributeError:
            continue
        current = getattr(module, local, None)
        if current is None and local == "bias" and isinstance(module, nn.Linear):
            module.bias = nn.Parameter(torch.zeros(shape, dtype=module.weight.dtype))
            continue
        if not isinstance(current, torch.Tensor) or tuple(current.shape) == shape:
            continue
        new = torch.empty(shape, dtype=current.dtype)
        if isinstance(current, nn.Parameter):
            setattr(module, local, nn.Parameter(new, requires_grad=current.requires_grad))
        else:
            module._buffers[local] = new
        if isinstance(module, nn.Linear) and local == "weight":
            module.out_features, module.in_features = shape
        elif isinstance(module, nn.Embedding) and local == "weight":
            module.num_embeddings, module.embedding_dim = shape
        elif isinstance(module, nn.LayerNorm) and local == "weight":
            module.normalized_shape = tuple(shape)


def _head_groups(model: nn.Module) -> Dict[str, int]:
    """Query heads per key/value head of every attention module that keeps num_key_value_groups."""
    groups = {}
    for name, module in model.named_modules():
        if hasattr(module, "num_key_value_groups") and hasattr(module, "q_proj") and hasattr(module, "k_proj"):
            q, k = module.q_proj.weight.shape[0], module.k_proj.weight.shape[0]
            if k and q % k == 0:
                groups[name] = q // k
    return groups


def _set_head_groups(model: nn.Module) -> None:
    for name, groups in _head_groups(model).items():
        model.get_submodule(name).num_key_value_groups = groups
