"""AOFP (Approximated Oracle Filter Pruning, Ding et al., ICML 2019) over arbitrary channel groups.

The model keeps training on its *base path*: the graph run with every removed channel zeroed wherever
it is read (the masked original of verify.py, differentiable), so pruning while training changes
nothing that the final rewrite would not. For every searching group a random half R of its search
space is masked in a *score path* whose damage is measured at the group's consumers only (damage
isolation): for each layer c that contracts the group's channels (a conv with groups=1, a linear),

    T = sum_c ||O_c - O^_c||^2 / sum_c ||O_c||^2,

O_c being c's output on the base input and O^_c on the input with R zeroed too, both after c's
BatchNorm when one follows (score_bn decides its statistics) and both masked by c's own base mask.
The per-group binary search (passes/aofp_search.py) turns these damages into pruning moves; training
stops at the first move after which the remaining FLOPs meet the target.

Cost: c is linear in its input, so O_c - O^_c = c(X restricted to R) without bias: one convolution
over the |R| sampled input channels per consumer, on the base path's captured activations. All score
paths of a step together cost about half a forward pass, and nothing leaves the device per step
except one float per group.

Deviations from the official code (DingXiaoH/AOFP), all documented in ALGORITHMS.md's [I] items:
  - groups are fxprune's coupled channel groups (a residual stream masks every tensor of the stage and
    sums T over all its consumers); the official code prunes only plain conv chains / inner convs;
  - the consumer's activation is not applied before measuring (the official ResNet-56 scorer also
    measures before the add, without ReLU; its VGG scorer includes the ReLU);
  - score_bn defaults to "base_stats" (the ablated output is normalised with the base batch's
    statistics) rather than the official "batch"; the score path never updates running statistics;
  - the stagger uses the position in the target list, not the conv index;
  - the FLOPs target is checked after every move, not only at the end of an epoch (the official
    check); with short halves a whole epoch of moves overshoots the target by far.
Requires: ChannelGroups, CostModel, a training loader. Produces: PrunePlan (and trains gm in place)."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fxprune.cost import CostModel
from fxprune.errors import ConfigError, NoPrunableChannelsError
from fxprune.importance import Importance, ImportanceData
from fxprune.ir import ChannelGroups, ChannelMap, PrunePlan
from fxprune.layers import batch_norm_after, weight_decay_groups
from fxprune.verify import MaskedOriginal
from .aofp_search import AOFPSearch, AOFPSearchConfig

log = logging.getLogger("fxprune")


@dataclass
class AOFP(Importance):
    """AOFP settings (defaults from the official PyTorch code, ALGORITHMS.md 1.5).

    theta: damage threshold for a move; iters_per_half: H; warmup_iters: W; min_channels: alive
    channels a group keeps at least; score_bn: "base_stats" | "batch" (official) | "eval";
    variant: "pytorch" | "tf" search semantics; lr/momentum/weight_decay: the SGD that keeps training
    the base path (constant lr, no decay on norm parameters and biases); max_epochs: stop even if the
    FLOPs target is not met; seed: sampling and nothing else.
    flops_aware (fxprune extension, off by default): each group's threshold is theta times the FLOPs
    one of its channels costs over the mean of that across groups, so a move weighs damage against the
    FLOPs it saves. The paper's test is FLOPs-blind: on CIFAR ResNet-20 at a 50 % FLOPs target it cut the
    cheap, parameter-heavy last stage hardest (theta 0.02 kept 40 % of the parameters)."""

    theta: float = 0.01
    iters_per_half: int = 1000
    warmup_iters: int = 500
    min_channels: int = 1
    score_bn: str = "base_stats"
    variant: str = "pytorch"
    single_dropout: bool = False
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 1e-4
    max_epochs: float = 100.0
    flops_aware: bool = False
    seed: int = 0
    log_every: int = 200
    name: str = field(default="aofp", init=False)
    requires_data = True     # the training set: compile(..., data=train_loader)
    trains_model = True      # compile hands it a private copy of the weights
    decides_widths = True    # its masks are the plan: no allocation pass

    def plan_with_results(self, gm, groups: ChannelGroups, cost: CostModel, budget, data: ImportanceData):
        """The plan AOFP's masks reach while training, and its run for the report: steps, epochs, the
        FLOPs ratio after each epoch, and the search history (every move and finished group)."""
        if budget.flops is None:
            raise ConfigError("AOFP stops at a FLOPs target: give the budget as a FLOPs fraction")
        run = AOFPPass(self, budget.flops, data.loss_fn if data is not None else None)
        plan = run.run(gm, groups, cost, data.batches)
        return plan, {"steps": run.steps, "epochs": run.epochs, "trajectory": [float(r) for r in run.trajectory],
                      "history": _jsonable(run.history)}

    def __post_init__(self):
        if self.score_bn not in ("base_stats", "batch", "eval"):
            raise ConfigError(f"AOFP score_bn must be 'base_stats', 'batch' or 'eval', got {self.score_bn!r}")
        if self.theta <= 0 or self.iters_per_half < 1 or self.warmup_iters < 0 or self.max_epochs <= 0:
            raise ConfigError("AOFP needs theta > 0, iters_per_half >= 1, warmup_iters >= 0, max_epochs > 0")

    def search_config(self) -> AOFPSearchConfig:
        return AOFPSearchConfig(theta=self.theta, iters_per_half=self.iters_per_half, warmup_iters=self.warmup_iters,
                                min_channels=self.min_channels, variant=self.variant,
                                single_dropout=self.single_dropout)


@dataclass
class Consumer:
    """A layer that contracts a group's channels: where its damage is measured."""

    node: str
    module: nn.Module
    positions: np.ndarray  # input positions (along the contracted dim) holding the group's channels
    units: np.ndarray  # the unit at each of those positions
    bn: Optional[nn.Module]  # BatchNorm applied right after, if any


class AOFPPass:
    """Runs AOFP on `gm` (trained in place) and returns the plan its base masks describe."""

    def __init__(self, config: AOFP, flops_target: float, loss_fn=None):
        self.config, self.flops_target = config, flops_target
        self.loss_fn = loss_fn or F.cross_entropy

    def run(self, gm: torch.fx.GraphModule, groups: ChannelGroups, cost: CostModel, loader) -> PrunePlan:
        trainer = self.trainer(gm, groups, cost=cost)
        keep, search = trainer.keep, trainer.search
        flops0 = cost.flops(np.ones(groups.n_units, dtype=bool))
        log.info("AOFP: %d target groups, theta %g, H %d, warm-up %d, FLOPs target %.1f%%", len(trainer.targets),
                 self.config.theta, self.config.iters_per_half, self.config.warmup_iters, 100 * self.flops_target)
        it, epoch, start, trajectory = 0, 0, time.perf_counter(), []
        batches = ImportanceData(loader, self.loss_fn)  # names a batch that does not fit the model
        max_steps = int(round(self.config.max_epochs * len(loader)))
        gm.train()
        while it < max_steps:
            if hasattr(loader, "set_epoch"):
                loader.set_epoch(epoch)
            for x, y in loader:
                with batches.batch(it, (x,), y):
                    loss, events = trainer.step(it, x, y)
                it += 1
                if events and cost.flops(keep) / flops0 <= self.flops_target:
                    break  # target met: stop now rather than at the epoch's end (short halves overshoot)
                if it % self.config.log_every == 0:
                    log.info("AOFP step %d: loss %.3f, FLOPs %.1f%%, %.1f steps/s", it, loss.item(),
                             100 * cost.flops(keep) / flops0, it / (time.perf_counter() - start))
                if it >= max_steps:
                    break
            epoch += 1
            ratio = cost.flops(keep) / flops0
            trajectory.append(ratio)
            log.info("AOFP epoch %d: FLOPs %.1f%% of the original (target %.1f%%)", epoch, 100 * ratio,
                     100 * self.flops_target)
            if ratio <= self.flops_target or search.finished:
                break
        gm.eval()
        self.trajectory, self.steps, self.epochs = trajectory, it, epoch
        self.history = search.history
        ratio = cost.flops(keep) / flops0
        if ratio > self.flops_target:
            log.warning("AOFP stopped at %.1f%% of the FLOPs, above the %.1f%% target (max_epochs or every group "
                        "finished): lower theta or raise max_epochs", 100 * ratio, 100 * self.flops_target)
        return PrunePlan(keep)

    # -------------------------------------------------------------------------------- setup
    def trainer(self, gm, groups: ChannelGroups, search: Optional[AOFPSearch] = None,
                cost: Optional[CostModel] = None) -> "AOFPTrainer":
        """The training state of one run (search, base masks, optimizer); `search` may be given to
        measure with other settings. `cost` is needed for flops_aware thresholds."""
        targets, consumers = self.targets(gm, groups)
        if not targets:
            raise NoPrunableChannelsError("AOFP found no prunable group read by a conv (groups=1) or linear layer")
        theta_scale = None
        if self.config.flops_aware:
            if cost is None:
                raise ConfigError("AOFP(flops_aware=True) needs the cost model")
            per_channel = cost.unit_cost("flops")
            channel_flops = np.array([per_channel[groups.groups[g].units].mean() for g in targets])
            theta_scale = channel_flops / channel_flops.mean()
            log.info("AOFP: FLOPs-aware thresholds, theta x %s", np.round(theta_scale, 2).tolist())
        search = search or AOFPSearch([groups.groups[g].size for g in targets], self.config.search_config(),
                                      seed=self.config.seed,
                                      frozen=[groups.unit_frozen[groups.groups[g].units] for g in targets],
                                      theta_scale=theta_scale)
        return AOFPTrainer(self, gm, groups, targets, consumers, search)

    def targets(self, gm, groups: ChannelGroups):
        consumers: Dict[int, List[Consumer]] = {}
        for node in gm.graph.nodes:
            if node.op != "call_module" or not node.args:
                continue
            module = gm.get_submodule(node.target)
            if isinstance(module, nn.Conv2d) and module.groups == 1:
                dim = 1
            elif isinstance(module, nn.Linear):
                dim = -1
            else:
                continue
            source = groups.maps.get(getattr(node.args[0], "name", None))
            if not isinstance(source, ChannelMap):
                continue
            elements = source.dims[dim if dim >= 0 else source.ndim - 1]
            if elements is None:
                continue
            units = groups.units_of(elements)
            bn = batch_norm_after(gm, node)
            for g in np.unique(groups.unit_group[units]):
                group = groups.groups[int(g)]
                if not group.prunable:
                    continue
                positions = np.nonzero(groups.unit_group[units] == g)[0]
                consumers.setdefault(int(g), []).append(Consumer(node.name, module, positions, units[positions], bn))
        return sorted(consumers), consumers

    def optimizer(self, gm) -> torch.optim.Optimizer:
        return torch.optim.SGD(weight_decay_groups(gm, self.config.weight_decay), lr=self.config.lr,
                               momentum=self.config.momentum)

    # -------------------------------------------------------------------------------- damage
    def damages(self, targets, samples, consumers, captured, groups: ChannelGroups) -> List[Optional[float]]:
        """T of every sampled group, brought to the host in one transfer per step."""
        sampled = [(i, self.damage(consumers[g], captured, groups.groups[g].units[s]))
                   for i, (g, s) in enumerate(zip(targets, samples)) if s is not None and len(s)]
        out: List[Optional[float]] = [None] * len(targets)
        if sampled:
            for (i, _), t in zip(sampled, torch.stack([t for _, t in sampled]).tolist()):
                out[i] = t
        return out

    def damage(self, consumers: List[Consumer], captured: Dict[str, Any], sampled_units: np.ndarray) -> torch.Tensor:
        """T for masking `sampled_units` (global unit ids) on top of the base masks, as a 0-d tensor
        left on the device."""
        numerator = denominator = torch.zeros((), dtype=torch.float64)
        for c in consumers:
            x, out, out_keep = captured[c.node]
            mask = np.isin(c.units, sampled_units)
            if not mask.any():
                continue
            idx = torch.as_tensor(c.positions[mask])
            delta = self._linear_part(c.module, x, idx)
            base = out
            if c.bn is not None:
                base, delta = self._through_bn(c.bn, out, delta)
            if out_keep is not None:
                shape = [1] * delta.ndim
                shape[1 if delta.ndim > 2 else -1] = -1
                base, delta = base * out_keep.reshape(shape), delta * out_keep.reshape(shape)
            numerator = numerator + delta.pow(2).sum().double()
            denominator = denominator + base.pow(2).sum().double()
        return torch.where(denominator > 0, numerator / denominator.clamp_min(1e-300), torch.zeros_like(numerator))

    @staticmethod
    def _linear_part(module: nn.Module, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """module(x restricted to the input positions idx) without bias: O - O^ for a linear layer."""
        if isinstance(module, nn.Conv2d):
            return F.conv2d(x.index_select(1, idx), module.weight.index_select(1, idx), None, module.stride,
                            module.padding, module.dilation)
        return F.linear(x.index_select(-1, idx), module.weight.index_select(1, idx))

    def _through_bn(self, bn: nn.Module, out: torch.Tensor, delta: torch.Tensor):
        """(BN(O), BN(O) - BN(O^)) under the chosen statistics."""
        dims = [d for d in range(out.ndim) if d != 1]
        shape = [1] * out.ndim
        shape[1] = -1
        weight = bn.weight if bn.weight is not None else torch.ones(out.shape[1])
        bias = bn.bias if bn.bias is not None else torch.zeros(out.shape[1])
        if self.config.score_bn == "batch":  # official: the ablated output gets its own batch statistics
            def norm(t):
                return F.batch_norm(t, None, None, weight, bias, training=True, eps=bn.eps)
            base = norm(out)
            return base, base - norm(out - delta)
        if self.config.score_bn == "eval":
            mean, var = bn.running_mean, bn.running_var
        else:
            mean, var = out.mean(dims), out.var(dims, unbiased=False)
        scale = (weight / torch.sqrt(var + bn.eps)).reshape(shape)
        base = (out - mean.reshape(shape)) * scale + bias.reshape(shape)
        return base, delta * scale


class AOFPTrainer:
    """One AOFP run's state; `step` is one training step with every searching group's score path."""

    def __init__(self, aofp: AOFPPass, gm, groups: ChannelGroups, targets, consumers, search: AOFPSearch):
        self.aofp, self.gm, self.groups = aofp, gm, groups
        self.targets, self.consumers, self.search = targets, consumers, search
        self.keep = np.ones(groups.n_units, dtype=bool)
        self.optimizer = aofp.optimizer(gm)
        self.wanted = {c.node for cs in consumers.values() for c in cs}

    def step(self, it: int, x, y):
        """Base-path SGD step, then the damages of this step's samples; returns (loss, events)."""
        samples = self.search.sample(it)
        runner = _Capturing(self.gm, self.groups, self.keep, self.wanted)
        loss = self.aofp.loss_fn(runner.run(x), y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        with torch.no_grad():
            damages = self.aofp.damages(self.targets, samples, self.consumers, runner.captured, self.groups)
        self.search.record(samples, damages)
        events = self.search.step_end(it)
        for event in events:
            log.debug("AOFP group %s: %s", self.targets[event.get("group", 0)], event)
        for g, alive in zip(self.targets, self.search.masks):
            self.keep[self.groups.groups[g].units] = alive
        return loss, events


class _Capturing(MaskedOriginal):
    """The base path (the masked original, differentiable) that keeps, for each consumer, its input,
    output and output keep-mask, detached, for the score paths."""

    def __init__(self, gm, groups: ChannelGroups, keep: np.ndarray, wanted: set):
        super().__init__(gm, groups, keep)
        self.wanted, self.captured = wanted, {}

    def run_node(self, n):
        result = super().run_node(n)
        if n.name in self.wanted and n.op == "call_module":
            x = self.env[n.args[0]]
            m = self.groups.maps.get(n.name)
            out_keep = None
            if isinstance(m, ChannelMap):
                d = 1 if result.ndim > 2 else result.ndim - 1
                if m.dims[d] is not None:
                    out_keep = self.kept_mask(m.dims[d])
                    out_keep = out_keep.to(result.dtype) if out_keep is not None else None
            self.captured[n.name] = (x.detach(), result.detach(), out_keep)
        return result


def _jsonable(value: Any) -> Any:
    """numpy scalars and arrays in nested dicts/lists as plain Python numbers and lists."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value
