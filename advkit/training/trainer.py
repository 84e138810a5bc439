"""The trainer: every recipe (standard, adversarial, TRADES, MART, distillation, noise)
runs through it; a recipe turns a batch into a loss (``advkit.training.Recipe``).

Training is deterministic for a given seed (the shuffling order of every epoch
is drawn from ``seed + epoch``), checkpoints every epoch, and resumes where an
interrupted run stopped: ``state.pt`` holds weights, optimizer, scheduler and RNG
states, written atomically and read back with ``weights_only=True``.

Launched by ``torchrun``, training is data parallel: the model is wrapped in
DistributedDataParallel, each process takes a contiguous shard of every global batch,
and only rank 0 writes checkpoints. The global batch, and so the optimisation, is the
same as in one process; the random draws of a recipe (random starts, noise) differ.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from advkit import data as datasets
from advkit._files import atomic_path
from advkit.distributed import World
from advkit.evaluation.accuracy import accuracy
from advkit.models import checkpoint, zoo
from advkit.progress import progress_bar
from advkit.threat import ThreatModel
from advkit.training.denoising import reconstruction_mse
from advkit.training.recipe import Recipe, StopTraining
from advkit.training.registry import build_recipe

OPTIMIZERS = ("adam", "sgd")
SCHEDULES = ("constant", "cosine", "step", "onecycle")
#: fp32, or mixed precision: bf16 autocast (CPU or GPU), fp16 autocast with loss scaling (GPU).
PRECISIONS = ("fp32", "bf16", "fp16")
#: The held-out metric in the history (a classifier's accuracy, or a reconstructing
#: recipe's mean squared error) and its name in the checkpoint's metrics.
_HELD_OUT = {"val_acc": "clean_accuracy", "val_mse": "reconstruction_mse"}

@dataclass
class TrainConfig:
    """Everything that determines a training run (recorded in the checkpoint)."""

    arch: str = "small_cnn"
    dataset: str = "mnist"
    epochs: int = 2
    batch_size: int = 128
    lr: float = 1e-3
    optimizer: str = "adam"
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: str = "onecycle"
    seed: int = 0
    train_limit: int | None = None
    val_limit: int | None = 10000
    recipe: str = "standard"
    lipschitz: bool = False
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    precision: str = "fp32"

    def __post_init__(self) -> None:
        if self.arch not in zoo.ARCHITECTURES:
            raise ValueError(f"unknown architecture {self.arch!r}: use one of "
                             f"{', '.join(zoo.ARCHITECTURES)}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}: use one of "
                             f"{', '.join(OPTIMIZERS)}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}: use one of "
                             f"{', '.join(PRECISIONS)}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}: use one of "
                             f"{', '.join(SCHEDULES)}")
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 (got {getattr(self, name)})")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0 (got {self.lr})")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0 (got {self.weight_decay})")


@dataclass
class TrainResult:
    model: nn.Module
    checkpoint: Path
    history: list[dict[str, float]]
    seconds: float


def train(config: TrainConfig, out_dir: str | Path, *, resume: bool = True,
          progress: bool = True, recipe: Recipe | None = None,
          device: str | torch.device = "cpu",
          log: Callable[[str], None] = print) -> TrainResult:
    """Train ``config.arch`` on ``config.dataset``; checkpoint to ``out_dir`` every epoch.

    ``recipe`` (default: standard training) turns each batch into a loss; its name
    must be ``config.recipe`` and its parameters are recorded with the config.
    Returns the trained model (eval mode), the path of its advkit checkpoint
    (``out_dir/model.safetensors``) and the per-epoch history. With ``resume``, a run
    interrupted in ``out_dir`` continues after its last finished epoch.

    A reconstructing recipe (``recipe.reconstructs``, e.g. ``denoising``) trains a zoo
    autoencoder instead of a classifier; its history and metrics hold the held-out
    reconstruction MSE (``val_mse``, ``reconstruction_mse``) in place of accuracies.
    """
    recipe = recipe or Recipe()
    if recipe.name != config.recipe:
        raise ValueError(f"config.recipe is {config.recipe!r} but the recipe is "
                         f"{recipe.name!r}; set TrainConfig(recipe={recipe.name!r})")
    kind = zoo.ARCHITECTURES[config.arch].kind
    if recipe.reconstructs != (kind == "autoencoder"):
        wanted = zoo.AUTOENCODERS if recipe.reconstructs else zoo.CLASSIFIERS
        raise ValueError(f"the {recipe.name} recipe trains "
                         f"{'an autoencoder' if recipe.reconstructs else 'a classifier'} but "
                         f"{config.arch} is the zoo's {kind} kind: use one of "
                         f"{', '.join(wanted)} (CLI: --arch)")
    record = config_record(config, recipe)
    if config.precision == "fp16" and torch.device(device).type != "cuda":
        raise ValueError("fp16 mixed precision needs a CUDA device (it relies on loss "
                         "scaling); on a CPU use precision='bf16' (CLI: --precision bf16)")
    world = World.join(device)
    if world.size > 1 and torch.device(device).type == "cuda":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', world.rank))}"
    log = log if world.main else (lambda _: None)
    progress = progress and world.main
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    x_train, y_train = datasets.load(config.dataset, "train", config.train_limit)
    x_val, y_val = datasets.load(config.dataset, "test", config.val_limit)
    channels = x_train.shape[1]
    classes = {} if recipe.reconstructs else {"num_classes":
                                              datasets.num_classes(config.dataset)}
    kwargs = {**classes, "channels": channels, "lipschitz": config.lipschitz,
              **config.arch_kwargs}
    torch.manual_seed(config.seed)
    model = zoo.create(config.arch, **kwargs).to(device)
    steps_per_epoch = -(-x_train.shape[0] // config.batch_size)
    if 0 < x_train.shape[0] % config.batch_size < world.size or config.batch_size < world.size:
        raise ValueError(f"every batch needs at least one image per process ({world.size}): "
                         f"change batch_size ({config.batch_size}) or train_limit")
    # A recipe of several parts (a GAN's critic, generator and inverter) gives each its own
    # optimizer and schedule and steps them in its own order within a batch (Recipe.step):
    # alternating players cannot share one optimizer step, and one trainer keeps the
    # seeding, checkpoints and bit-for-bit resume the same for them.
    parts = recipe.parts(model)
    if len(parts) > 1 and world.size > 1:
        raise ValueError(f"the {recipe.name} recipe trains {len(parts)} parts with optimizers "
                         "of their own, which data-parallel training does not split: run it "
                         "in one process (without torchrun)")
    optimizers = {name: _optimizer(config, part) for name, part in parts.items()}
    schedulers = {name: _scheduler(config, opt, steps_per_epoch)
                  for name, opt in optimizers.items()}
    # Mixed precision: the recipe's forward passes (its attack's included) run under
    # autocast; fp16 gradients are scaled so that small ones do not flush to zero.
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.precision)
    scaler = torch.amp.GradScaler("cuda", enabled=config.precision == "fp16")
    history: list[dict[str, float]] = []
    start_epoch, elapsed, stopped = 0, 0.0, ""
    state_path = out_dir / "state.pt"
    if resume and state_path.exists():
        try:
            state = torch.load(state_path, map_location=device, weights_only=True)
        except Exception as err:  # torch raises several types for a truncated or foreign file
            raise ValueError(f"{state_path} is damaged and cannot be resumed from ({err}); "
                             "pass resume=False (CLI: --no-resume) to start over") from err
        saved = _with_defaults(json.loads(state["config"]))
        if saved != record:
            raise ValueError(f"{out_dir} holds a run with another configuration "
                             f"({_diff(saved, record)}); pick a new output folder "
                             "or pass resume=False (CLI: --no-resume) to start over")
        model.load_state_dict(state["model"])
        _load_states(optimizers, state["optimizer"])
        _load_states(schedulers, state["scheduler"])
        if "scaler" in state:
            scaler.load_state_dict(state["scaler"])
        rng = state["rng"]
        torch.set_rng_state(rng[world.rank] if isinstance(rng, list) and len(rng) == world.size
                            else rng[0] if isinstance(rng, list) else rng)
        history, start_epoch = json.loads(state["history"]), int(state["epoch"]) + 1
        elapsed, stopped = float(state["seconds"]), str(state.get("stopped", ""))
        log(f"resuming {out_dir} after epoch {start_epoch} of {config.epochs}")
    ckpt = out_dir / "model.safetensors"
    net = world.wrap(model, device)
    for epoch in range(start_epoch, config.epochs):
        if stopped:
            break
        t0 = time.perf_counter()
        recipe.start_epoch(epoch, config.epochs)
        order = torch.randperm(x_train.shape[0],
                               generator=torch.Generator().manual_seed(config.seed + epoch))
        model.train()
        seen, loss_sum, correct = 0, 0.0, 0
        with progress_bar(progress, f"epoch {epoch + 1}/{config.epochs}",
                          steps_per_epoch) as bar:
            for i in range(steps_per_epoch):
                batch = order[i * config.batch_size:(i + 1) * config.batch_size]
                idx = world.shard(batch)
                xb, yb = x_train[idx].to(device), y_train[idx].to(device)
                recipe.start_step(epoch * steps_per_epoch + i, steps_per_epoch)
                share = idx.numel() * world.size / batch.numel()

                def update(part: str, loss: Tensor, share: float = share) -> None:
                    # Data parallel: gradients are averaged over processes, so weigh each
                    # process's mean loss by its share of the batch: the step is then the
                    # single-process step on the whole batch.
                    scaled = loss.float() * share
                    optimizers[part].zero_grad(set_to_none=True)
                    with torch.autocast(torch.device(device).type, enabled=False):
                        scaler.scale(scaled).backward()
                    scaler.step(optimizers[part])

                with torch.autocast(torch.device(device).type, dtype=autocast_dtype,
                                    enabled=autocast_dtype is not None):
                    loss, logits = recipe.step(net, xb, yb, update)
                scaler.update()
                for scheduler in schedulers.values():
                    scheduler.step()
                seen += yb.shape[0]
                loss_sum += loss.item() * yb.shape[0]
                if recipe.reconstructs:  # the "logits" are the reconstruction
                    bar.advance(f"loss {loss_sum / seen:.4f}")
                else:
                    correct += int((logits.argmax(1) == yb).sum())
                    bar.advance(f"loss {loss_sum / seen:.4f}  acc {correct / seen:.2%}")
        seen, loss_sum, correct = world.sum(seen, loss_sum, correct)
        model.eval()
        if config.lipschitz:
            zoo.settle_spectral_norms(model, x_val[:16].to(device))
        try:
            extra = recipe.end_epoch(model, epoch, x_val, y_val)
        except StopTraining as stop:
            stopped, extra = str(stop), {}
            log(stopped)
        if recipe.reconstructs:
            val_mse = reconstruction_mse(model, x_val, device=device)
            held_out, scores = {"val_mse": val_mse}, f"test mse {val_mse:.4g}"
        else:
            val_acc = accuracy(model, x_val, y_val, device=device)
            held_out = {"train_acc": correct / seen, "val_acc": val_acc}
            scores = f"train acc {correct / seen:.2%}, test acc {val_acc:.2%}"
        elapsed += time.perf_counter() - t0
        history.append({"epoch": epoch + 1, "loss": loss_sum / seen, **held_out, **extra,
                        "seconds": elapsed})
        log(f"epoch {epoch + 1}/{config.epochs}: loss {loss_sum / seen:.4f}, {scores}"
            + "".join(f", {k.replace('_', ' ')} {v:.2%}" for k, v in extra.items())
            + f" ({elapsed:.0f} s)")
        metrics = _metrics(history[-1], int(x_val.shape[0]))
        # One process records its RNG state as it is, several record theirs in rank order.
        rng = world.gather(torch.get_rng_state()) if world.on else torch.get_rng_state()
        if not world.main:
            world.barrier()
            continue
        checkpoint.save(model, ckpt, architecture=config.arch, arch_kwargs=kwargs,
                        dataset=config.dataset, recipe=config.recipe, config=record,
                        metrics=metrics, history=history, seconds=elapsed,
                        **({"stopped": stopped} if stopped else {}))
        with atomic_path(state_path) as tmp:
            torch.save({
                "model": model.state_dict(), "optimizer": _states(optimizers),
                "scheduler": _states(schedulers), "rng": rng,
                **({"scaler": scaler.state_dict()} if scaler.is_enabled() else {}),
                "epoch": epoch, "config": json.dumps(record), "stopped": stopped,
                "history": json.dumps(history), "seconds": elapsed,
            }, tmp)
        world.barrier()
    model.eval()
    if world.main and history and not _holds(ckpt, model):
        # The state file is the run's record; a checkpoint that does not hold its weights
        # (truncated, overwritten) is written again from it rather than trusted.
        log(f"{ckpt} does not hold the run's weights; writing it again from {state_path.name}")
        metrics = _metrics(history[-1], int(x_val.shape[0]))
        checkpoint.save(model, ckpt, architecture=config.arch, arch_kwargs=kwargs,
                        dataset=config.dataset, recipe=config.recipe, config=record,
                        metrics=metrics, history=history, seconds=elapsed,
                        **({"stopped": stopped} if stopped else {}))
    return TrainResult(model=model, checkpoint=ckpt, history=history, seconds=elapsed)


def _metrics(last: dict[str, float], val_samples: int) -> dict[str, Any]:
    """The checkpoint's metrics from an epoch's history row: its held-out metric (clean
    accuracy, or reconstruction MSE), the number of held-out images, the recipe's extras."""
    key = next(k for k in _HELD_OUT if k in last)
    return {_HELD_OUT[key]: last[key], "val_samples": val_samples,
            **{k: v for k, v in last.items()
               if k not in ("epoch", "loss", "train_acc", key, "seconds")},
            "torch_threads": torch.get_num_threads()}


def _holds(path: Path, model: nn.Module) -> bool:
    """Whether the checkpoint at ``path`` reads back as ``model``'s weights."""
    try:
        # load_checkpoint checks the file's weights against its own recorded fingerprint.
        stored = checkpoint.load_checkpoint(path).advkit_metadata.get("fingerprint")
    except (ValueError, OSError, KeyError):
        return False
    return stored == checkpoint.fingerprint(model)


def split(settings: dict[str, Any]) -> tuple[dict[str, Any], ThreatModel, dict[str, Any]]:
    """``settings`` (see :func:`advkit.training.presets.resolve`) as (TrainConfig fields,
    threat model, recipe options)."""
    config_fields = {f.name for f in fields(TrainConfig)}
    config = {k: v for k, v in settings.items() if k in config_fields}
    threat = ThreatModel(settings.get("norm", "linf"), settings.get("eps", 0.3))
    options = {k: v for k, v in settings.items()
               if k not in config_fields and k not in ("norm", "eps")}
    return config, threat, options


def train_defense(defense: str, settings: dict[str, Any], run_dir: str | Path, *,
                  resume: bool = True, progress: bool = True,
                  device: str | torch.device = "cpu",
                  log: Callable[[str], None] = print) -> TrainResult:
    """Train ``defense`` with ``settings`` (see :func:`advkit.training.presets.resolve`)
    in ``run_dir``: the one place that turns a defense name and its settings into a
    trained model, for the CLI and the benchmark alike.

    Defensive distillation first trains its teacher at the same temperature in
    ``run_dir/teacher``. Returns the :class:`TrainResult`; its ``seconds`` include the
    teacher's. A finished run in ``run_dir`` with the same settings is reused, not
    repeated (``resume``).
    """
    fields_, threat, options = split(settings)
    config = TrainConfig(**fields_)
    run_dir = Path(run_dir)
    teacher, teacher_seconds = None, 0.0
    if defense == "distillation":
        teacher_recipe = build_recipe("temperature", threat, **options)
        log(f"training the distillation teacher at T={teacher_recipe.temperature:g}")
        done = train(replace(config, recipe="temperature"), run_dir / "teacher", resume=resume,
                     progress=progress, device=device, recipe=teacher_recipe, log=log)
        teacher, teacher_seconds = done.model, done.seconds
    recipe = build_recipe(defense, threat, teacher=teacher, **options)
    result = train(replace(config, recipe=recipe.name), run_dir, resume=resume,
                   progress=progress, device=device, recipe=recipe, log=log)
    return replace(result, seconds=result.seconds + teacher_seconds)


def _states(objects: dict[str, Any]) -> dict[str, Any]:
    """The state dicts of the parts' optimizers (or schedules); the whole model's alone is
    stored as it was before recipes had parts, so older runs resume."""
    if list(objects) == ["model"]:
        return objects["model"].state_dict()
    return {name: obj.state_dict() for name, obj in objects.items()}


def _load_states(objects: dict[str, Any], states: dict[str, Any]) -> None:
    if list(objects) == ["model"]:
        objects["model"].load_state_dict(states)
        return
    for name, obj in objects.items():
        obj.load_state_dict(states[name])


def _optimizer(config: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    if config.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=config.lr,
                                weight_decay=config.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                           weight_decay=config.weight_decay, nesterov=config.momentum > 0)


def _scheduler(config: TrainConfig, optimizer: torch.optim.Optimizer,
               steps_per_epoch: int) -> torch.optim.lr_scheduler.LRScheduler:
    total = config.epochs * steps_per_epoch
    if config.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, total)
    if config.schedule == "step":  # divide by 10 at 50% and 75% of training
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, [total // 2, total * 3 // 4], 0.1)
    if config.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, config.lr, total_steps=total)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


def config_record(config: TrainConfig, recipe: Recipe | None = None) -> dict[str, Any]:
    """The configuration as recorded in checkpoints: config fields and recipe parameters."""
    return {**_jsonable(config), "recipe_params": (recipe or Recipe()).params()}


def _with_defaults(saved: dict[str, Any]) -> dict[str, Any]:
    """A recorded configuration with the defaults of config fields added since it was
    written (a run recorded before ``precision`` existed trained in fp32)."""
    defaults = {f.name: f.default for f in fields(TrainConfig) if f.default is not MISSING}
    return {**{k: v for k, v in defaults.items() if k not in saved}, **saved}


def _jsonable(config: TrainConfig) -> dict[str, Any]:
    return json.loads(json.dumps(asdict(config)))


def _diff(a: dict[str, Any], b: dict[str, Any]) -> str:
    return ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b))
                     if a.get(k) != b.get(k))
