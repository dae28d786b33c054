"""Fine-tune (or train) a model after pruning, in plain PyTorch: SGD/AdamW, per-step cosine schedule
with warmup, label smoothing, knowledge distillation from the dense model, gradient clipping, a
per-step callback, evaluation and BatchNorm recalibration.

    pruned = fxprune.compile(model, 0.5, example_inputs=(x,))
    history = finetune(pruned, train_loader, FinetuneConfig(epochs=5, lr=0.01, distill_alpha=0.5),
                       teacher=model, eval_loader=val_loader, device="cuda")
    evaluate(pruned, val_loader, device="cuda")["top1"]

Everything works on any nn.Module; torch.fx GraphModules are nn.Modules, so fxprune's output needs
nothing special. Progress goes to the "fxprune" logger at INFO level."""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..layers import weight_decay_groups

log = logging.getLogger("fxprune")

Device = Union[str, torch.device]
# callback(step, model, loss): step counts optimizer steps from 1; returning "stop" ends training.
Callback = Callable[[int, nn.Module, float], Optional[str]]

__all__ = ["FinetuneConfig", "finetune", "evaluate", "recalibrate_bn", "make_optimizer", "lr_at",
           "distillation_loss"]


@dataclass
class FinetuneConfig:
    """How to fine-tune. The defaults are the usual ImageNet-style SGD recipe, shortened.

    epochs: passes over train_loader; may be fractional: round(epochs * len(train_loader)) optimizer
        steps are taken (0.5 = half an epoch).
    lr: peak learning rate (reached after warmup_steps).
    optimizer: "sgd" (with `momentum`, Nesterov) or "adamw".
    momentum: SGD momentum (ignored by AdamW, which keeps its default betas).
    weight_decay: L2/decoupled decay of conv/linear weights only; never of biases or normalisation
        (BN/LN/GN) affine parameters (see make_optimizer for why).
    schedule: "cosine" (per step, from lr down to 0 at the end) or "constant"; both after a linear
        warmup of warmup_steps steps when warmup_steps > 0.
    label_smoothing: for the default cross-entropy loss.
    distill_alpha: weight in [0, 1] of the distillation loss; needs a teacher (0: no distillation).
    distill_temperature: softmax temperature T of the distillation loss.
    max_grad_norm: clip the global gradient norm to this (None: no clipping).
    seed: seeds torch's RNG for the run (dropout, DataLoader shuffling, anything random inside).
    log_every: optimizer steps between progress lines (<= 0: per-epoch lines only).
    """

    epochs: float = 10
    lr: float = 0.01
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    warmup_steps: int = 0
    label_smoothing: float = 0.0
    distill_alpha: float = 0.0
    distill_temperature: float = 4.0
    max_grad_norm: Optional[float] = None
    seed: int = 0
    log_every: int = 50

    def validate(self) -> None:
        """Raise ConfigError naming the first invalid field (before any training happens)."""
        checks = [
            (self.epochs >= 0, f"epochs must be >= 0, got {self.epochs}"),
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (self.optimizer in ("sgd", "adamw"), f"optimizer must be 'sgd' or 'adamw', got {self.optimizer!r}"),
            (0 <= self.momentum < 1, f"momentum must be in [0, 1), got {self.momentum}"),
            (self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}"),
            (self.schedule in ("cosine", "constant"), f"schedule must be 'cosine' or 'constant', got {self.schedule!r}"),
            (self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps}"),
            (0 <= self.label_smoothing < 1, f"label_smoothing must be in [0, 1), got {self.label_smoothing}"),
            (0 <= self.distill_alpha <= 1, f"distill_alpha must be in [0, 1], got {self.distill_alpha}"),
            (self.distill_temperature > 0, f"distill_temperature must be > 0, got {self.distill_temperature}"),
            (self.max_grad_norm is None or self.max_grad_norm > 0,
             f"max_grad_norm must be None or > 0, got {self.max_grad_norm}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)


# --------------------------------------------------------------------------------------------------
# Building blocks (public so that other methods and the tests can use them directly)
# --------------------------------------------------------------------------------------------------

def make_optimizer(model: nn.Module, config: FinetuneConfig) -> torch.optim.Optimizer:
    """The optimizer for `model`'s trainable parameters: config.weight_decay on conv/linear weights,
    none on biases and normalisation affine parameters (fxprune.layers.weight_decay_groups says why)."""
    groups = weight_decay_groups(model, config.weight_decay)
    if config.optimizer == "sgd":
        # Nesterov needs momentum > 0; with momentum 0 it is plain SGD.
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum,
                               nesterov=config.momentum > 0)
    return torch.optim.AdamW(groups, lr=config.lr)


def lr_at(step: int, total_steps: int, config: FinetuneConfig) -> float:
    """Learning rate for 0-based optimizer step `step` of `total_steps`.

    Warmup: linear from lr/warmup_steps (step 0) to lr (step warmup_steps-1), so the first step is
    never taken at lr 0 (a wasted step). Cosine: from lr at the first step after warmup towards 0; the
    last step gets lr * (1 - cos(pi/n))/2, close to 0 but not 0, so that it still does something."""
    w = config.warmup_steps
    if step < w:
        return config.lr * (step + 1) / w
    if config.schedule == "constant":
        return config.lr
    n = max(total_steps - w, 1)
    progress = min((step - w) / n, 1.0)
    return config.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(teacher/T) || softmax(student/T)), averaged over the batch (Hinton et al. 2015).

    The T^2 factor keeps the gradient's magnitude independent of T (soft-target gradients scale as
    1/T^2), so distill_alpha means the same at any temperature. Works on log-probabilities
    throughout (log_target=True) to stay finite when the teacher is very confident."""
    t = temperature
    s = F.log_softmax(student_logits.float() / t, dim=-1)
    p = F.log_softmax(teacher_logits.float() / t, dim=-1)
    # "batchmean" is the true KL per sample; "mean" would also divide by the number of classes.
    return F.kl_div(s.reshape(-1, s.shape[-1]), p.reshape(-1, p.shape[-1]), reduction="batchmean",
                    log_target=True) * (t * t)


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------

def _split_batch(batch: Any) -> Tuple[Tuple[Any, ...], Any]:
    """(inputs, target) from a loader batch (x, y); x may itself be a tuple/list of model inputs."""
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise ConfigError(f"loader batches must be (inputs, target) pairs, got {type(batch).__name__}"
                          + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else ""))
    x, y = batch
    return (tuple(x) if isinstance(x, (tuple, list)) else (x,)), y


def _to(obj: Any, device: torch.device) -> Any:
    # non_blocking overlaps host->GPU copies with compute when the loader pins memory; no-op on CPU.
    return obj.to(device, non_blocking=True) if isinstance(obj, torch.Tensor) else obj


def _batch_size(inputs: Sequence[Any]) -> int:
    first = inputs[0]
    return int(first.shape[0]) if isinstance(first, torch.Tensor) and first.ndim > 0 else 1


def _correct(logits: torch.Tensor, y: Any) -> Optional[torch.Tensor]:
    """Number of top-1 hits as a tensor (no host sync), or None when the target is not class indices
    (soft labels, regression targets): accuracy is then undefined and left out."""
    if (isinstance(logits, torch.Tensor) and isinstance(y, torch.Tensor) and logits.ndim == 2 and y.ndim == 1
            and not y.is_floating_point() and y.shape[0] == logits.shape[0]):
        return (logits.argmax(dim=1) == y).sum()
    return None


def _loader_len(loader: Iterable, what: str) -> int:
    try:
        return len(loader)  # type: ignore[arg-type]
    except TypeError:
        raise ConfigError(f"{what} must have len() (the number of batches per epoch), "
                          f"got {type(loader).__name__}") from None


def _unshare(model: nn.Module, other: nn.Module) -> int:
    """Give `model` its own copy of every parameter/buffer whose storage it shares with `other`;
    returns how many. Training `model` in place would otherwise write into `other` (a pruned model
    whose unpruned tensors still alias the dense model's, say). Assigning .data keeps each Parameter
    object (and so module attributes, hooks and optimizer references) as it is."""
    def storages(m: nn.Module) -> set:
        return {t.untyped_storage().data_ptr() for t in list(m.parameters()) + list(m.buffers())
                if t.untyped_storage().nbytes() > 0}
    shared = storages(other)
    count = 0
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            if t.untyped_storage().nbytes() > 0 and t.untyped_storage().data_ptr() in shared:
                t.data = t.data.clone()
                count += 1
    return count


def _cuda_devices(device: torch.device) -> List[int]:
    """The CUDA devices whose RNG state fork_rng must save and restore (none on a CPU run)."""
    if device.type != "cuda":
        return []
    return [device.index if device.index is not None else torch.cuda.current_device()]


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------

def evaluate(model: nn.Module, loader: Iterable, device: Device = "cpu") -> Dict[str, float]:
    """Top-1 accuracy and mean cross-entropy of `model` over `loader` (batches of (x, y), y class
    indices): {"top1": float in [0, 1], "loss": float, "n": number of samples}.

    Both are averaged per sample, not per batch, so an uneven last batch counts for what it holds.
    The model is moved to `device` (in place) and run in eval mode under no_grad; its previous
    train/eval mode is restored afterwards."""
    device = torch.device(device)
    was_training = model.training
    model.to(device).eval()
    correct = torch.zeros((), dtype=torch.long, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    n = 0
    try:
        with torch.no_grad():
            for batch in loader:
                inputs, y = _split_batch(batch)
                inputs, y = tuple(_to(t, device) for t in inputs), _to(y, device)
                logits = model(*inputs)
                hits = _correct(logits, y)
                if hits is None:
                    raise ConfigError("evaluate needs 2-D logits and 1-D integer class labels, got output "
                                      f"{tuple(getattr(logits, 'shape', ()))} and target {tuple(getattr(y, 'shape', ()))}")
                # Accumulate on the device; one host sync at the end instead of one per batch.
                correct += hits
                loss_sum += F.cross_entropy(logits.float(), y, reduction="sum").double()
                n += int(y.shape[0])
    finally:
        model.train(was_training)
    if n == 0:
        raise ConfigError("evaluate got an empty loader")
    return {"top1": correct.item() / n, "loss": loss_sum.item() / n, "n": n}


def recalibrate_bn(model: nn.Module, loader: Iterable, n_batches: int = 50, *, device: Device = "cpu") -> nn.Module:
    """Re-estimate every BatchNorm's running mean/var from the first `n_batches` batches of `loader`.

    Pruning (and fine-tuning with a small batch) leaves running statistics that no longer describe
    the activations; re-estimating them often recovers accuracy for free. The statistics are reset and
    accumulated with momentum=None, i.e. as a cumulative average of the per-batch statistics (every
    batch weighs the same, unlike the default exponential average that forgets the early batches).

    Only the BN layers are put in train mode; everything else (dropout, in particular) stays in eval
    mode, so the statistics are those of the activations the model sees at inference. Runs under
    no_grad, restores each BN's momentum, and leaves the model in eval mode. Returns `model`."""
    if n_batches < 1:
        raise ConfigError(f"n_batches must be >= 1, got {n_batches}")
    device = torch.device(device)
    model.to(device).eval()
    bns = [m for m in model.modules()
           if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns:
        log.warning("recalibrate_bn: the model has no BatchNorm layer with running statistics; nothing to do")
        return model
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()  # zero mean, unit var, num_batches_tracked = 0
        bn.momentum = None        # cumulative moving average
        bn.train()
    seen = 0
    try:
        with torch.no_grad():
            for batch in loader:
                if seen >= n_batches:
                    break
                inputs, _ = _split_batch(batch)
                model(*(_to(t, device) for t in inputs))
                seen += 1
    finally:
        for bn, momentum in zip(bns, momenta):
            bn.momentum = momentum
        model.eval()
    if seen == 0:
        raise ConfigError("recalibrate_bn got an empty loader (the running statistics are now reset)")
    log.info("recalibrated %d BatchNorm layer(s) on %d batch(es)", len(bns), seen)
    return model


def finetune(model: nn.Module, train_loader: Iterable, config: Optional[FinetuneConfig] = None, *,
             teacher: Optional[nn.Module] = None, eval_loader: Optional[Iterable] = None,
             loss_fn: Optional[Callable[[Any, Any], torch.Tensor]] = None, device: Device = "cpu",
             callback: Optional[Callback] = None) -> Dict[str, Any]:
    """Train `model` in place on `train_loader` and leave it in eval mode; return the history.

    train_loader: iterable of (x, y) batches with len() (x may be a tuple of model inputs); if it has
        set_epoch(e), that is called with the 0-based epoch before each pass (e.g. a
        DistributedSampler's or your own deterministic reshuffling).
    config: FinetuneConfig (None: the defaults). round(epochs * len(train_loader)) steps are taken.
    teacher: the dense model for knowledge distillation when config.distill_alpha > 0; run in eval
        mode under no_grad, moved to `device`, its values never changed and its train/eval mode
        restored at the end. loss = (1-alpha) * task_loss + alpha * T^2 * KL(teacher_T || student_T).
    eval_loader: evaluated (top-1, loss) after every (possibly partial) epoch.
    loss_fn: task loss loss_fn(outputs, y) (default: cross-entropy with config.label_smoothing).
    device: where to train; the model (and teacher) are moved there in place.
    callback: callback(step, model, loss) after every optimizer step (step counts from 1, loss is that
        step's loss as a float); returning the string "stop" ends training after that step.

    Aliasing: if the model shares parameter/buffer storage with the teacher, the model gets its own
    copies first (a warning says so), so the teacher is never written to. A model aliasing some other
    module that is not passed as teacher would be written through: pass the dense model as teacher, or
    give the model its own tensors, if that matters.

    Determinism: torch's RNG is seeded with config.seed for the run (dropout, DataLoader shuffling),
    inside torch.random.fork_rng so the caller's RNG state is left as it was. Same seed, same model
    and same loader give identical weights on CPU (GPU kernels may add their own nondeterminism
    unless torch.use_deterministic_algorithms(True)).

    History: {"epochs": [per-epoch dicts: epoch, steps, train_loss, train_acc, eval_top1, eval_loss,
    seconds], "train_loss", "train_acc", "eval_top1" (per-epoch lists; accuracy None when the target
    is not class indices), "lr" (every step's lr), "lr_summary" ({"first", "max", "last"}), "steps",
    "total_steps", "stopped_early", "seconds", "images"}."""
    config, teacher = _checked_setup(model, config, teacher)
    steps_per_epoch = _loader_len(train_loader, "train_loader")
    if eval_loader is not None:
        _loader_len(eval_loader, "eval_loader")
    total_steps = int(round(config.epochs * steps_per_epoch))
    n_epochs = math.ceil(total_steps / steps_per_epoch) if steps_per_epoch else 0
    device = torch.device(device)

    history: Dict[str, Any] = {"epochs": [], "train_loss": [], "train_acc": [], "eval_top1": [], "lr": [],
                               "lr_summary": None, "steps": 0, "total_steps": total_steps,
                               "stopped_early": False, "seconds": 0.0, "images": 0}
    model.to(device)
    if total_steps == 0:
        log.warning("finetune: 0 steps (epochs=%s, %d batches per epoch); nothing to do", config.epochs, steps_per_epoch)
        model.eval()
        return history

    optimizer = make_optimizer(model, config)
    if loss_fn is None:
        loss_fn = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    teacher_was_training = teacher.training if teacher is not None else False
    if teacher is not None:
        teacher.to(device).eval()  # eval: BN running stats must not move, dropout must be off
        n_shared = _unshare(model, teacher)
        if n_shared:
            log.warning("finetune: %d parameter/buffer tensor(s) of the model shared storage with the teacher; "
                        "the model got its own copies so that training leaves the teacher unchanged", n_shared)
    alpha, temperature = config.distill_alpha, config.distill_temperature

    log.info("finetune: %d step(s) (%.4g epoch(s) of %d batches), %s lr %.4g %s schedule, warmup %d, "
             "weight decay %.3g%s, on %s", total_steps, config.epochs, steps_per_epoch, config.optimizer,
             config.lr, config.schedule, config.warmup_steps, config.weight_decay,
             f", distillation alpha {alpha} T {temperature}" if teacher is not None else "", device)

    runner = _StepRunner(model, optimizer, loss_fn, teacher, alpha, temperature, config.max_grad_norm)
    start = time.perf_counter()
    step, stop = 0, False
    try:
        with torch.random.fork_rng(devices=_cuda_devices(device)):
            torch.manual_seed(config.seed)  # seeds CPU and every CUDA device
            for epoch in range(n_epochs):
                if hasattr(train_loader, "set_epoch"):
                    train_loader.set_epoch(epoch)  # type: ignore[attr-defined]
                epoch_start = time.perf_counter()
                totals, step, stop = _train_epoch(runner, train_loader, config, history, epoch, n_epochs, step,
                                                  total_steps, device, callback)
                if totals["steps"] == 0:  # the loader yielded nothing this epoch
                    raise ConfigError(f"train_loader yielded no batch in epoch {epoch + 1} though len() is {steps_per_epoch}")
                record = _epoch_record(model, totals, epoch, eval_loader, device)
                record["seconds"] = time.perf_counter() - epoch_start
                history["epochs"].append(record)
                for key in ("train_loss", "train_acc", "eval_top1"):
                    history[key].append(record[key])
                history["images"] += totals["seen"]
                log.info("epoch %d/%d done: %d steps, train loss %.4f acc %s%s, %.1f s", epoch + 1, n_epochs,
                         totals["steps"], record["train_loss"],
                         "n/a" if record["train_acc"] is None else f"{record['train_acc']:.4f}",
                         "" if eval_loader is None else f", eval top1 {record['eval_top1']:.4f} loss {record['eval_loss']:.4f}",
                         record["seconds"])
                if stop:
                    break
    finally:
        # Whatever happens (stop, error, KeyboardInterrupt): the model ends in eval mode and the
        # teacher goes back to the mode it was given in.
        model.eval()
        # Free the last step's gradients: the model is handed back for inference/export, where they
        # would only hold memory (as much as the weights), and stale ones would mislead later users.
        optimizer.zero_grad(set_to_none=True)
        if teacher is not None:
            teacher.train(teacher_was_training)

    lrs = history["lr"]
    history.update(steps=step, stopped_early=stop, seconds=time.perf_counter() - start,
                   lr_summary={"first": lrs[0], "max": max(lrs), "last": lrs[-1]} if lrs else None)
    log.info("finetune: %d step(s) in %.1f s%s", step, history["seconds"],
             " (stopped early by the callback)" if stop else "")
    return history


def _checked_setup(model: nn.Module, config: Optional[FinetuneConfig],
                   teacher: Optional[nn.Module]) -> Tuple[FinetuneConfig, Optional[nn.Module]]:
    """The config (defaults for None) and the teacher finetune will use, or a ConfigError."""
    config = FinetuneConfig() if config is None else config
    config.validate()
    if config.distill_alpha > 0 and teacher is None:
        raise ConfigError(f"distill_alpha={config.distill_alpha} needs a teacher (pass teacher=the dense model), "
                          "or set distill_alpha=0")
    if teacher is not None and config.distill_alpha == 0:
        log.warning("finetune: a teacher was given but distill_alpha=0; it is not used")
        teacher = None
    if teacher is model:
        raise ConfigError("the teacher must be a different module from the model being trained")
    return config, teacher


@dataclass
class _StepRunner:
    """One optimizer step of fine-tuning (task loss, optionally distilled from the teacher)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    loss_fn: Callable[[Any, Any], torch.Tensor]
    teacher: Optional[nn.Module]
    alpha: float
    temperature: float
    max_grad_norm: Optional[float]

    def step(self, inputs: Tuple[Any, ...], y: Any, lr: float) -> Tuple[torch.Tensor, Any]:
        """Returns the detached loss and outputs. A function of its own so that the step's autograd
        graph (outputs, losses) dies when it returns instead of being kept alive by loop variables
        until the next step's forward has built a second one."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        outputs = self.model(*inputs)
        task_loss = self.loss_fn(outputs, y)
        if self.teacher is not None:
            with torch.no_grad():  # the teacher is a fixed target: no graph, no gradients
                teacher_outputs = self.teacher(*inputs)
            kd = distillation_loss(outputs, teacher_outputs, self.temperature)
            # alpha == 1: the task loss is left out entirely (0 * inf would be nan).
            loss = task_loss * (1.0 - self.alpha) + kd * self.alpha if self.alpha < 1 else kd
        else:
            loss = task_loss
        # set_to_none: frees the gradient memory between steps and skips a memset.
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.max_grad_norm is not None:
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
        self.optimizer.step()
        return loss.detach(), (outputs.detach() if isinstance(outputs, torch.Tensor) else None)


def _train_epoch(runner: _StepRunner, train_loader: Iterable, config: FinetuneConfig, history: Dict[str, Any],
                 epoch: int, n_epochs: int, step: int, total_steps: int, device: torch.device,
                 callback: Optional[Callback]) -> Tuple[Dict[str, Any], int, bool]:
    """One pass over the loader (or up to total_steps): ({"steps", "seen", "loss_sum", "correct" or None},
    the step count after it, whether the callback asked to stop)."""
    runner.model.train()  # (again after each evaluation) BN uses batch stats and updates its running ones
    # Running sums stay on the device as detached tensors: no autograd graph is kept alive across
    # steps and there is no host sync per step (only at log lines).
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    acc_known, seen, epoch_steps, stop = True, 0, 0, False
    window_start, window_images = time.perf_counter(), 0
    for batch in train_loader:
        inputs, y = _split_batch(batch)
        inputs, y = tuple(_to(t, device) for t in inputs), _to(y, device)
        lr = lr_at(step, total_steps, config)
        detached, outputs = runner.step(inputs, y, lr)
        step += 1
        epoch_steps += 1
        bs = _batch_size(inputs)
        loss_sum += detached.double() * bs
        hits = _correct(outputs, y)
        if hits is None:
            acc_known = False
        else:
            correct += hits
        seen += bs
        window_images += bs
        history["lr"].append(lr)

        loss_value: Optional[float] = None
        if callback is not None or (config.log_every > 0 and step % config.log_every == 0):
            loss_value = detached.item()
            if not math.isfinite(loss_value):
                raise FloatingPointError(f"finetune: loss is {loss_value} at step {step} "
                                         f"(epoch {epoch + 1}, lr {lr:.4g}); lower lr or set max_grad_norm")
        if config.log_every > 0 and step % config.log_every == 0:
            now = time.perf_counter()
            log.info("epoch %d/%d step %d/%d loss %.4f (avg %.4f) acc %s lr %.4g %.0f img/s",
                     epoch + 1, n_epochs, step, total_steps, loss_value, loss_sum.item() / seen,
                     f"{correct.item() / seen:.4f}" if acc_known else "n/a", lr,
                     window_images / max(now - window_start, 1e-9))
            window_start, window_images = now, 0
        if callback is not None and callback(step, runner.model, loss_value) == "stop":
            log.info("finetune: callback asked to stop at step %d", step)
            stop = True
            break
        if step >= total_steps:
            break  # a fractional last epoch (checked here: fetching a batch we won't use costs I/O)
    totals = {"steps": epoch_steps, "seen": seen, "loss_sum": loss_sum.item(),
              "correct": correct.item() if acc_known else None}
    return totals, step, stop


def _epoch_record(model: nn.Module, totals: Dict[str, Any], epoch: int, eval_loader: Optional[Iterable],
                  device: torch.device) -> Dict[str, Any]:
    """The history entry of one epoch: train loss and accuracy, and the evaluation if a loader is given."""
    if totals["seen"] == 0:
        raise ConfigError(f"train_loader yielded only empty batches in epoch {epoch + 1}")
    train_loss = totals["loss_sum"] / totals["seen"]
    if not math.isfinite(train_loss):
        raise FloatingPointError(f"finetune: loss became {train_loss} in epoch {epoch + 1}; lower lr or set max_grad_norm")
    train_acc = totals["correct"] / totals["seen"] if totals["correct"] is not None else None
    record: Dict[str, Any] = {"epoch": epoch + 1, "steps": totals["steps"], "train_loss": train_loss,
                              "train_acc": train_acc, "eval_top1": None, "eval_loss": None}
    if eval_loader is not None:
        ev = evaluate(model, eval_loader, device)
        record["eval_top1"], record["eval_loss"] = ev["top1"], ev["loss"]
    return record
