"""The one LightningModule: a Hugging Face backbone, optionally LoRA-wrapped, driven by a task."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import time
from typing import Any, Literal, Optional, Union

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import OptimizerCallable
from peft import prepare_model_for_kbit_training
from torch import nn
from torchmetrics import MeanMetric

from finetune.backbone import load_config_and_tokenizer, load_model
from finetune.errors import InputError, NonFiniteLossError
from finetune.fsdp import shard_module
from finetune.lora import LoraSettings, apply_lora, keep_4bit_layers_trainable, quantized_loading
from finetune.pipeline import STAGE_SPLITS, merge_predictions, predict_batch, settle_task
from finetune.precision import BackboneDtype, autocast, default_device, keep_trained_weights_fp32, resolve_dtype
from finetune.schedule import LinearWarmupDecay, SchedulerCallable
from finetune.task import Task

#: Version of what checkpoints hold; `on_load_checkpoint` refuses others with a message. 3: a decoder's chat options
#: nested under the task's `chat`, the epoch's metric states saved mid-epoch.
CHECKPOINT_FORMAT = 3


class FineTuneModule(LightningModule):
    """Fine-tunes `backbone` for `task`.

    Args:
        backbone: Hugging Face model name or local model directory.
        task: the task plugin: a registered name (`classification`) or a class_path with init_args.
        lora: LoRA settings; `null` fine-tunes every weight instead.
        optimizer: called with the trainable parameters.
        scheduler: called with the optimizer and the run's total optimizer steps; stepped every step.
        gradient_checkpointing: trade compute for memory (non-reentrant, which works with LoRA).
        backbone_dtype: the dtype of the frozen backbone's weights and of the forward's matmuls (autocast):
            `float32`; `bfloat16` (half the memory of the frozen weights and, where the device computes bf16
            natively, about twice the speed); `float16` (GPUs, with `trainer.precision: 16-mixed`, which scales
            the loss); `auto`: bfloat16 on a GPU that supports it or a CPU with AVX512_BF16 or AMX, else float32.
            The weights that train (LoRA, heads) stay fp32 and checkpoints keep them so.
        quantization: load the frozen backbone in 4-bit NF4 (double quantization; computing in
            `backbone_dtype`) or 8-bit through bitsandbytes (QLoRA), on a CUDA GPU or a CPU.
        skip_nonfinite_batches: skip (and count, as `train/skipped_batches`) a batch whose loss is
            NaN or infinite instead of stopping the run with a message naming the step and examples.
        trust_remote_code: allow a backbone to run code from its repository. Off: only turn it on
            for repositories you trust.
        allow_pickle_weights: allow backbone weights stored as pickle (`pytorch_model.bin`), which
            can run code when loaded. Off: safetensors only.
    """

    def __init__(
        self,
        backbone: str,
        task: Union[Task, str],
        lora: Optional[LoraSettings] = LoraSettings(),
        optimizer: OptimizerCallable = torch.optim.AdamW,
        scheduler: SchedulerCallable = LinearWarmupDecay,
        gradient_checkpointing: bool = False,
        backbone_dtype: BackboneDtype = "float32",
        quantization: Optional[Literal["4bit", "8bit"]] = None,
        skip_nonfinite_batches: bool = False,
        trust_remote_code: bool = False,
        allow_pickle_weights: bool = False,
    ) -> None:
        super().__init__()
        check_optimizer(optimizer, scheduler)  # (before the backbone loads: a bad learning rate fails in seconds)
        self.lora = LoraSettings(**lora) if isinstance(lora, dict) else lora
        self.save_hyperparameters()
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.backbone = backbone
        self.gradient_checkpointing = gradient_checkpointing
        self.backbone_dtype = backbone_dtype
        #: The dtype of the frozen weights and of autocast, settled in `configure_model`.
        self.compute_dtype = torch.float32
        self.quantization = quantization
        self.trust_remote_code = trust_remote_code
        self.skip_nonfinite_batches = skip_nonfinite_batches
        self.allow_pickle_weights = allow_pickle_weights
        self.skipped_batches = 0
        self.resumed_epoch: Optional[dict[str, Any]] = None  # (from a checkpoint saved mid-epoch)
        self.rollouts: dict[int, dict[str, Any]] = {}  # (a rollout task's batches being reused, by micro-batch)
        self.rollout_end = 0.0  # (when the step's rollout ended: what follows is training)
        # Loaded now, so a wrong backbone fails before any data is read; the weights load in
        # `configure_model`, once the data has told the task what it needs (e.g. the label count).
        self.backbone_config, self.tokenizer = load_config_and_tokenizer(backbone, trust_remote_code)
        self.task = settle_task(task, self.backbone_config, self.tokenizer)
        #: What each split's metrics and prediction merging need (`Task.split_context`), from `connect`.
        self.contexts: dict[str, Any] = {}
        self._store_plain_hparams()
        self.model: Optional[nn.Module] = None
        self.reference_model: Optional[nn.Module] = None  # (a frozen copy, for a task comparing to the reference)
        self.metrics = nn.ModuleDict()
        # Only what is trained goes into checkpoints; the frozen backbone comes from `backbone`.
        self.strict_loading = False

    # --- building --------------------------------------------------------------------------
    def connect(self, task: Task, contexts: dict[str, Any]) -> None:
        """The task as the data settled it (with what it learned from the training rows, e.g. the label set) and
        the splits' contexts: before the Trainer builds the model (`finetune.pipeline.connect`)."""
        if self.model is not None and task != self.task:
            raise RuntimeError("FineTuneModule.connect: the model is built already, for another task")
        self.task = task
        self.contexts = contexts
        self._store_plain_hparams()

    def configure_model(self) -> None:
        if self.model is not None:  # Lightning calls this once per stage
            return
        device = self.target_device()
        self.compute_dtype = resolve_dtype(self.backbone_dtype, device)
        model, new_weights = load_model(
            self.task.model_class(self.backbone_config), self.backbone, self.trust_remote_code,
            self.allow_pickle_weights, dtype=self.compute_dtype, **self.task.model_kwargs(),
            **quantized_loading(self.quantization, self.lora, self.compute_dtype, device),
        )
        if model.config.pad_token_id is None:  # decoders have none: a classification head finds the last
            model.config.pad_token_id = self.tokenizer.pad_token_id  # real token by it, generate pads with it
        if self.quantization:
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=self.gradient_checkpointing)
            keep_4bit_layers_trainable(model)
        elif self.gradient_checkpointing:
            non_reentrant = {"use_reentrant": False}
            if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.25, where the old name warns
                model.activation_checkpointing_enable(activation_checkpointing_kwargs=non_reentrant)
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=non_reentrant)
        if self.lora is not None:
            # Weights the pretrained checkpoint lacked (the head; a pooler some checkpoints drop)
            # are random: they must be trained, and saved, in full.
            new_modules = {key.rsplit(".", 1)[0] for key in new_weights}
            present = {name for name, _ in model.named_modules()}
            heads = [h for h in self.task.head_modules if any(n == h or n.endswith("." + h) for n in present)]
            model = apply_lora(model, self.lora, sorted(set(heads) | new_modules))
        keep_trained_weights_fp32(model)
        if self.task.compares_to_reference and self.lora is None:
            # (with LoRA the reference is the model with its adapter switched off: no second copy)
            self.reference_model = copy.deepcopy(model).requires_grad_(False).eval()
        model.train()  # from_pretrained returns eval mode, which would switch dropout off
        self.model = model
        if self.device_mesh is not None:  # (FSDP2: finetune.fsdp.FSDP2Strategy)
            shard_module(self, self.device_mesh)
        self.losses = nn.ModuleDict({f"{split}_loss": MeanMetric() for split in ("val", "test")})

    def target_device(self) -> torch.device:
        """Where the model will run: the Trainer's device, or (loaded outside one) a GPU if there is one."""
        try:
            return self.trainer.strategy.root_device
        except RuntimeError:  # (not attached to a Trainer: export, serve, evaluate)
            return default_device()

    def autocast(self) -> contextlib.AbstractContextManager:
        """The forward's autocast to the backbone's dtype (nothing for fp32)."""
        return autocast(self.device, self.compute_dtype)

    def setup(self, stage: str) -> None:
        # Metrics are built per stage: they receive what the task needs of a split (its context), e.g. QA's
        # contexts and answers. (Keys are suffixed: `train` would shadow nn.Module.train.)
        for split in (s for s in STAGE_SPLITS[stage] if s != "predict"):
            self.metrics[f"{split}_metrics"] = self.task.metrics(split, self.contexts.get(split))

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory([p for p in self.parameters() if p.requires_grad])
        scheduler = self.scheduler_factory(optimizer, self.trainer.estimated_stepping_batches)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # --- steps -----------------------------------------------------------------------------
    def computes_metrics(self, split: str) -> bool:
        fitting = self.trainer.state.fn == "fit"
        return self.task.computes_metrics(split, self.current_epoch if fitting else None)

    def _step(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        with self.autocast():
            outputs = self.task_outputs(batch)
        loss = self.task.loss(outputs, batch)
        if stage == "train":
            for name, value in self.task.step_logs(outputs, batch).items():
                self.log(f"train/{name}", float(value), on_step=True, on_epoch=False, sync_dist=True)
        if self.computes_metrics(stage):
            with self.autocast():  # (generation tasks generate here)
                self.task.update_metrics(self.metrics[f"{stage}_metrics"], outputs, batch, self.model, self.tokenizer)
        if stage != "train":  # exact mean over the split, weighted by what each batch's loss averages over
            self.losses[f"{stage}_loss"].update(loss.detach(), self.task.loss_weight(batch))
        return loss

    def task_outputs(self, batch: dict[str, torch.Tensor]) -> Any:
        """The task's `forward` on the model; paired with the reference's when the task compares to it."""
        outputs = self.task.forward(self.model, batch)
        return (outputs, self.reference_outputs(batch)) if self.task.compares_to_reference else outputs

    def reference_outputs(self, batch: dict[str, torch.Tensor]) -> Any:
        """The task's `forward` on the backbone as it was before training, without gradients."""
        with torch.no_grad():
            if self.reference_model is not None:
                return self.task.forward(self.reference_model, batch)
            with self.model.disable_adapter():  # (PEFT: the base model, heads as loaded)
                return self.task.forward(self.model, batch)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # Dropout masks depend on (seed, step, micro-batch, process) only, so a run resumed from any
        # checkpoint continues exactly as the uninterrupted one would (no random state to carry over).
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0)) + 1_000_003 * self.global_step + self.global_rank
        accumulate = self.trainer.accumulate_grad_batches
        torch.manual_seed(seed + (7_919 * (batch_idx % accumulate) if accumulate > 1 else 0))

    def on_train_start(self) -> None:
        # (loss sum, items) of this process's micro-batches of the step, and of the epoch's steps (global)
        self.step_totals = torch.zeros(2, dtype=torch.float64, device=self.device)
        self.epoch_totals = torch.zeros(2, dtype=torch.float64)
        resumed, self.resumed_epoch = self.resumed_epoch, None
        if resumed and resumed["epoch"] == self.current_epoch:  # (mid-epoch: the epoch's metrics continue)
            self.epoch_totals = resumed["loss_totals"].clone()
            if self.global_rank == 0:  # (the states saved are every process's, synced: counted once)
                for metric, states in zip(self.metrics["train_metrics"].values(), resumed["metric_states"]):
                    for name, value in states.items():
                        setattr(metric, name, value)

    def epoch_state(self) -> dict[str, Any]:
        """What the training epoch has summed so far (its loss totals and its metric states, over every process),
        so that a run resumed mid-epoch reports the same epoch metrics as an uninterrupted one."""
        metric_states = []
        for metric in self.metrics["train_metrics"].values():
            metric.sync(should_sync=self.trainer.world_size > 1)
            metric_states.append({name: value.clone() if isinstance(value, torch.Tensor) else [v.clone() for v in value]
                                  for name, value in metric.metric_state.items()})
            metric.unsync(should_unsync=self.trainer.world_size > 1)
        return {"epoch": self.current_epoch, "loss_totals": self.epoch_totals.clone(), "metric_states": metric_states}

    def rollout_batch(self, batch: dict[str, Any], batch_idx: int, stage: str = "train") -> dict[str, Any]:
        """The batch a task that trains on what the model generates makes with it (`Task.rollout`): in training
        made at the first of every `rollout_steps()` optimizer steps and reused (and checkpointed) until then."""
        if type(self.task).rollout is Task.rollout:
            return batch
        if stage != "train":
            with torch.no_grad(), self.autocast():
                rollout = self.task.rollout(self.model, batch, self.tokenizer, None)
            return batch if rollout is None else rollout
        slot = batch_idx % self.trainer.accumulate_grad_batches
        if self.global_step % self.task.rollout_steps() == 0 or slot not in self.rollouts:
            start = time.perf_counter()
            self.model.eval()
            with torch.no_grad(), self.autocast():
                rollout = self.task.rollout(self.model, batch, self.tokenizer, self.global_step)
            self.model.train()
            if rollout is None:
                return batch
            samples = rollout.pop("samples", None)
            if samples and self.global_rank == 0 and self.trainer.log_dir:
                with open(os.path.join(self.trainer.log_dir, "samples.jsonl"), "a", encoding="utf-8") as file:
                    file.writelines(json.dumps({"step": self.global_step, **row}) + "\n" for row in samples)
            self.rollouts[slot] = rollout
            self.log("train/rollout_seconds", time.perf_counter() - start, on_step=True, on_epoch=False)
        self.rollout_end = time.perf_counter()
        return {key: value.to(self.device) for key, value in self.rollouts[slot].items()}  # (a checkpoint's: on CPU)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.rollouts:  # (the training time of a step, apart from its rollout's)
            self.log("train/train_seconds", time.perf_counter() - self.rollout_end, on_step=True, on_epoch=False)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        batch = self.rollout_batch(batch, batch_idx)
        loss = self._step(batch, "train")
        finite = bool(torch.isfinite(loss))  # (one host sync per step: the price of stopping at the bad step)
        if self.trainer.world_size > 1:  # every process takes the same decision, or the others hang in all-reduce
            finite = self.trainer.strategy.reduce_boolean_decision(finite, all=True)
        if finite:
            weight = self.task.loss_weight(batch)
            self.step_totals += torch.stack([loss.detach().double() * weight, self.step_totals.new_tensor(weight)])
            # The batch's sum: `on_before_optimizer_step` divides the gradients by the number of items of the
            # whole step (all micro-batches, all processes), so a step's loss is the exact mean over its items.
            return loss * weight
        if self.skip_nonfinite_batches:
            self.skipped_batches += 1
            self.log("train/skipped_batches", float(self.skipped_batches))
            # Zero gradients, not None: every process still takes part in the gradient all-reduce.
            return sum(p.sum() for p in self.parameters() if p.requires_grad) * 0.0
        examples = batch["index"].tolist()
        raise NonFiniteLossError(
            f"the training loss is {loss.item() if not torch.isfinite(loss) else 'not finite in another process'} at "
            f"step {self.global_step} (epoch {self.current_epoch}, batch "
            f"{batch_idx}; examples {examples[:16]}{'...' if len(examples) > 16 else ''}, 0-based rows of "
            "data.train_file). Lower the learning rate, check those rows, or set model.skip_nonfinite_batches: true"
        )

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # The gradients hold the sum of item losses' gradients, divided by Lightning (accumulate_grad_batches)
        # and by DDP/FSDP (their mean over processes): rescale them to the mean over the step's items.
        totals = self.step_totals
        if self.trainer.world_size > 1:
            totals = self.trainer.strategy.reduce(totals.clone(), reduce_op="sum")
        loss_sum, items = totals.tolist()
        self.step_totals.zero_()
        parameters = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not items:  # every batch of the step was skipped: no update at all (optimizers skip grad None)
            for p in parameters:
                p.grad = None
            return
        scale = self.trainer.accumulate_grad_batches * self.trainer.world_size / items
        for p in parameters:
            p.grad.mul_(scale)
        self.epoch_totals += torch.tensor([loss_sum, items], dtype=torch.float64)
        self.log("train/loss", loss_sum / items, on_step=True, on_epoch=False, prog_bar=True)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._step(self.rollout_batch(batch, batch_idx, "val"), "val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._step(self.rollout_batch(batch, batch_idx, "test"), "test")

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> list[dict[str, Any]]:
        with self.autocast():
            return predict_batch(self.task, self.model, self.tokenizer, batch)

    def merge_predictions(self, predicted: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """All predicted features of a predict run (any order) -> one row per input, in input order."""
        return merge_predictions(self.task, predicted, self.contexts.get("predict"))

    def _log_metrics(self, stage: str) -> None:
        # Computed once per epoch (torchmetrics syncs the states across processes here).
        values = {}
        if stage != "train":
            values[f"{stage}/loss"] = self.losses[f"{stage}_loss"].compute()
            self.losses[f"{stage}_loss"].reset()
        metrics = self.metrics[f"{stage}_metrics"]
        for name, value in metrics.compute().items() if metrics and self.computes_metrics(stage) else ():
            if value.ndim:
                raise TypeError(f"Task.metrics: metric {name!r} computes a tensor of shape {tuple(value.shape)}; "
                                "return one scalar per name (torchmetrics' ClasswiseWrapper names per-class values)")
            values[f"{stage}/{name}"] = value
        metrics.reset()
        if not values:
            return
        # The values are already global; sync_dist only tells Lightning so (averaging equal numbers).
        self.log_dict(values, prog_bar=False, sync_dist=True)
        if stage != "train" and not self.trainer.sanity_checking:
            summary = "  ".join(f"{k}={v:.4f}" for k, v in values.items())
            self.print(f"epoch {self.current_epoch} {summary}")

    def on_train_epoch_end(self) -> None:
        loss_sum, items = self.epoch_totals.tolist()
        if items:  # the mean over the epoch's items (the steps' values are global already: sync_dist averages equals)
            self.log("train/loss_epoch", loss_sum / items, sync_dist=True)
        self.epoch_totals.zero_()
        self._log_metrics("train")

    def on_validation_epoch_end(self) -> None:
        self._log_metrics("val")

    def on_test_epoch_end(self) -> None:
        self._log_metrics("test")

    # --- checkpoints -----------------------------------------------------------------------
    def _store_plain_hparams(self) -> None:
        # Hyperparameters as plain data, so checkpoints load with `weights_only=True` and a
        # checkpoint alone rebuilds the module (`load_from_checkpoint`, `--ckpt_path`).
        self.hparams["task"] = self.task.config()  # includes what the task learned (e.g. labels)
        if dataclasses.is_dataclass(self.hparams.get("lora")):
            self.hparams["lora"] = dataclasses.asdict(self.hparams["lora"])
        for key in ("optimizer", "scheduler"):  # Python callables (not CLI config) cannot be stored safely
            if key in self.hparams and not isinstance(self.hparams[key], (dict, str)):
                del self.hparams[key]

    def dequantized(self) -> FineTuneModule:
        """This QLoRA module with its frozen 4-bit or 8-bit weights dequantized into dense ones (the backbone's
        dtype): what the adapter trained against, so merging it there gives the model that was trained (merging
        into the quantized layers would round each update away; into the Hub's weights, a model never trained)."""
        dense = type(self)(**{**self.hparams, "quantization": None})
        dense.connect(self.task, self.contexts)
        dense.configure_model()
        quantized = copy.deepcopy(self.model)
        quantized.get_base_model().dequantize(dtype=self.compute_dtype)  # (transformers: bitsandbytes layers -> Linear)
        dense.model.load_state_dict(quantized.state_dict())
        return dense.eval()

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """What a checkpoint stores of the weights: the adapter and the fully trained modules."""
        trainable = self.trainable_names()
        return {k: v for k, v in self.state_dict().items() if k in trainable}

    def trainable_names(self) -> set[str]:
        return {name for name, p in self.named_parameters() if p.requires_grad}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        trainable = self.trainable_names()  # (Lightning filled state_dict already: filter, don't recompute)
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        self._store_plain_hparams()
        checkpoint["hyper_parameters"] = dict(self.hparams)
        checkpoint["finetune_format"] = CHECKPOINT_FORMAT
        if self.trainer.training:
            checkpoint["finetune_epoch"] = self.epoch_state()
            if self.rollouts and self.task.rollout_steps() > 1:  # (reused by the next steps)
                checkpoint["finetune_rollouts"] = self.rollouts

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        check_format(checkpoint)
        self.resumed_epoch = checkpoint.get("finetune_epoch")
        self.rollouts = checkpoint.get("finetune_rollouts", {})
        trainable = self.trainable_names()
        saved = set(checkpoint["state_dict"])
        # A checkpoint that also holds the frozen weights (DeepSpeed saves the whole module) loads:
        # those are the backbone's own, unchanged by LoRA. Extra adapter weights still do not.
        frozen = {name for name, p in self.named_parameters() if not p.requires_grad}
        if trainable <= saved and saved - trainable <= frozen:
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
            saved = trainable
        if saved != trainable:
            missing, unexpected = sorted(trainable - saved), sorted(saved - trainable)
            raise InputError(
                "checkpoint does not match this model's trainable weights "
                f"(missing: {missing[:5]}{'...' if len(missing) > 5 else ''}; "
                f"unexpected: {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}). "
                "Was it written with another backbone, task or LoRA setting?"
            )


def check_optimizer(optimizer: OptimizerCallable, scheduler: SchedulerCallable) -> None:
    """The optimizer's and the scheduler's arguments, checked by building them for one dummy weight."""
    try:
        built = optimizer([nn.Parameter(torch.zeros(1))])
    except (ValueError, TypeError) as err:
        raise InputError(f"model.optimizer: {err}") from err
    try:
        scheduler(built, 1)
    except (ValueError, TypeError) as err:
        raise InputError(f"model.scheduler: {err}") from err


def check_format(checkpoint: dict[str, Any], path: str = "the checkpoint") -> None:
    """Refuse, with a message, a checkpoint written by another version of finetune's format."""
    found = checkpoint.get("finetune_format")
    if found != CHECKPOINT_FORMAT:
        written = f"format {found}" if found else "an earlier format (before tasks were dataclasses)"
        raise InputError(f"--ckpt_path: {path} was written by a finetune of {written}; this version reads format "
                         f"{CHECKPOINT_FORMAT}. Load it with the finetune version that wrote it (e.g. to `finetune "
                         "export` it), or train again")
