"""Saving and loading pruned models.

`save(pruned, path)` writes one torch.save file holding
  - the report (the plan: which channels of which parameters were kept),
  - every parameter and buffer of the pruned model (weights stored once),
  - the GraphModule's structure, pickled with its tensors on the meta device (no data).
`load(path)` rebuilds the GraphModule from that structure, so the original Python class is not
needed (torch and, for fx-wrapped functions, the libraries the model called must be importable);
`load(path, model=Original(), example_inputs=...)` instead re-applies the plan to the original
architecture with `apply_plan` and loads the saved weights into it: that path reads the file with
`weights_only=True` and unpickles no code at all."""
from __future__ import annotations

import copy
import io
import os
import json
from typing import Dict, Optional

import torch
import torch.fx

from .compiler import apply_plan
from .errors import ConfigError, LoadError, first_line

FORMAT = "fxprune.saved/1"


def save(pruned: torch.fx.GraphModule, path) -> None:
    """Write a pruned GraphModule (from fxprune.compile/apply_plan, possibly fine-tuned) to `path`."""
    report = pruned.meta.get("fxprune")
    if report is None:
        raise ConfigError("save expects the GraphModule returned by fxprune.compile (it carries meta['fxprune'])")
    structure = io.BytesIO()
    torch.save(copy.deepcopy(pruned).to("meta"), structure)  # GraphModule pickles drop .meta; the report goes alongside
    torch.save({"format": FORMAT, "report": json.dumps(report), "tensors": _tensors(pruned),
                "structure": structure.getvalue()}, path)


def load(path, model: Optional[torch.nn.Module] = None, example_inputs=None, *,
         verify: bool = False) -> torch.fx.GraphModule:
    """Load what `save` wrote. Without `model`: rebuild the saved GraphModule (unpickles its
    structure: load only files you trust). With `model` (the original architecture, any weights) and
    `example_inputs`: prune it by the saved plan and load the saved weights into the result."""
    if not os.path.isfile(path):
        raise LoadError(f"fxprune.load: no file at {path}" + (" (it is a directory)" if os.path.isdir(path) else ""))
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, corrupt, or another kind of file (torch raises several types)
        raise LoadError(f"fxprune.load cannot read {path}: it is corrupt or was not written by fxprune.save "
                        f"({type(exc).__name__}: {first_line(exc)})") from None
    if not isinstance(saved, dict) or saved.get("format") != FORMAT:
        raise LoadError(f"{path} is not a file written by fxprune.save (a torch file without fxprune's format tag)")
    try:
        report = json.loads(saved["report"])
    except (KeyError, TypeError, ValueError) as exc:
        raise LoadError(f"{path} has fxprune's format tag but no readable report: {first_line(exc)}") from None
    if model is not None:
        if example_inputs is None:
            raise ConfigError("load(path, model=...) needs example_inputs to re-apply the plan")
        pruned = apply_plan(model, report, example_inputs=example_inputs, verify=verify)
        rebuilt_report = pruned.meta["fxprune"]
    else:
        try:
            pruned = torch.load(io.BytesIO(saved["structure"]), map_location="meta", weights_only=False)
        except Exception as exc:  # the pickled structure names code this environment lacks, or is damaged
            raise LoadError(f"fxprune.load cannot rebuild the model saved in {path}: {type(exc).__name__}: "
                            f"{first_line(exc)}. Load it with load(path, model=<the original architecture>, "
                            f"example_inputs=...) instead") from None
        rebuilt_report = report
    _assign_tensors(pruned, saved["tensors"])
    pruned.meta["fxprune"] = rebuilt_report
    return pruned.eval()


def _tensors(module: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """Every parameter and buffer, non-persistent buffers included (state_dict leaves those out)."""
    out = {name: p.detach().cpu() for name, p in module.named_parameters(remove_duplicate=False)}
    out.update({name: b.detach().cpu() for name, b in module.named_buffers(remove_duplicate=False)})
    return out


def _assign_tensors(module: torch.nn.Module, tensors: Dict[str, torch.Tensor]) -> None:
    """Replace every parameter and buffer of `module` by the saved tensor of the same name; shapes
    and names must match exactly."""
    own = set(_tensors_names(module))
    if own != set(tensors):
        extra, missing = sorted(set(tensors) - own), sorted(own - set(tensors))
        raise ConfigError(f"saved tensors do not fit the model: missing {missing[:3]}, unexpected {extra[:3]}")
    replaced: Dict[int, torch.Tensor] = {}  # keeps tied parameters tied
    for name, value in tensors.items():
        owner_name, _, attr = name.rpartition(".")
        owner = module.get_submodule(owner_name)
        if attr in owner._parameters:
            old = owner._parameters[attr]
            if tuple(old.shape) != tuple(value.shape):
                raise ConfigError(f"saved {name} has shape {tuple(value.shape)}, the model {tuple(old.shape)}")
            if id(old) not in replaced:
                replaced[id(old)] = torch.nn.Parameter(value, requires_grad=old.requires_grad)
            owner._parameters[attr] = replaced[id(old)]
        else:
            old = owner._buffers[attr]
            if old is not None and tuple(old.shape) != tuple(value.shape):
                raise ConfigError(f"saved {name} has shape {tuple(value.shape)}, the model {tuple(old.shape)}")
            owner._buffers[attr] = value


def _tensors_names(module: torch.nn.Module):
    for name, _ in module.named_parameters(remove_duplicate=False):
        yield name
    for name, _ in module.named_buffers(remove_duplicate=False):
        yield name
