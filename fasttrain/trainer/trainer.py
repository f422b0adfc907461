"""The Trainer: the one module that knows the others and composes them into a step.

A step (one optimizer update) = `gradient_accumulation_steps` micro-batches:
  count valid label tokens of the whole step (host data, no sync) -> forward under autocast
  -> loss = sum over valid tokens / that count -> backward (gradient sync overlapped when
  data parallel) -> unscale + overflow check (fp16) -> clip -> optimizer step skipped on a
  device-side flag -> LR schedule advanced on the device -> zero grads.
Nothing in a step reads a device value on the host; logging steps do (marked `# sync:`).

This file keeps the loop and every method an HF subclass may override (compute_loss,
training_step, log, evaluate, prediction_step, get_*_dataloader, create_optimizer, ...);
the loop calls them through `self`. Their bodies live beside it, handed what they use:
loss_paths.py, optimizer_step.py, logging_step.py, evaluation.py, loaders.py,
checkpointing.py, script_helpers.py, step_end.py (a step's log/evaluate/save pass); the
set-up and teardown of a train() call are lifecycle.py's, those of evaluate/predict/evaluation_loop/prediction_step eval_calls.py's.
"""
from __future__ import annotations

import logging
import warnings
from typing import Callable, Optional

import torch
from torch.utils.data import DataLoader, Dataset

from fasttrain.checkpoint.checkpointer import Checkpointer
from fasttrain.callbacks import (CallbackHandler, DefaultFlowCallback, PrinterCallback, ProgressCallback,
                                 TrainerControl, TrainerState)
from fasttrain.data.columns import collate_or_explain
from fasttrain.data.datasets import check_examples, check_first_batch, default_data_collator
from fasttrain.distributed.sampler import ShardedSampler
from fasttrain.trainer.metrics_log import MetricsLogger
from fasttrain.ops.label_smoothing import LabelSmoother
from fasttrain.optim.factory import build_optimizer, decay_parameter_names, optimizer_cls_and_kwargs
from fasttrain.precision.mixed import (DynamicLossScaler, autocast_context, cast_floating_params_,
                                 needs_loss_scaler)
from fasttrain.optim.schedules import build_scheduler, step_on_metrics
from fasttrain.trainer import eval_calls, hf_options, lifecycle, loaders
from fasttrain.profiler.memory_metrics import MemoryMetrics
from fasttrain.trainer.checkpointing import save_model_folder, save_step
from fasttrain.trainer.evaluation import resolve_eval_dataset
from fasttrain.trainer.instruments import Instruments
from fasttrain.trainer.logging_step import history_record, stamp, training_record, write_outside_train
from fasttrain.trainer.loss_paths import LossPaths, micro_batch_losses, model_takes_loss_kwargs
from fasttrain.trainer.optimizer_step import GradClipper, optimizer_step
from fasttrain.data.streaming import StreamShard
from fasttrain.trainer import script_helpers, step_end
from fasttrain.trainer.run_state import RunState
from fasttrain.trainer.utils import (PredictionOutput, forward_arg_names, samples_in, take, to_device, tokens_in,
                                     uses_label_shift, vocab_size_of)
from fasttrain.training_args import TrainingArguments

logger = logging.getLogger("fasttrain")


class Trainer:
    def __init__(self, model=None, args: Optional[TrainingArguments] = None, data_collator=None,
                 train_dataset: Optional[Dataset] = None, eval_dataset=None, processing_class=None,
                 model_init: Optional[Callable] = None, compute_loss_func: Optional[Callable] = None,
                 compute_metrics: Optional[Callable] = None, callbacks=None, optimizers=(None, None),
                 optimizer_cls_and_kwargs: Optional[tuple] = None,
                 preprocess_logits_for_metrics: Optional[Callable] = None, *, tokenizer=None):
        """HF 5's parameters in HF's order (`tokenizer`, HF 4's name for processing_class, by
        keyword). compute_loss_func(outputs, labels, num_items_in_batch=...) replaces the loss
        of batches with labels; optimizer_cls_and_kwargs = (class, its keyword arguments with
        "lr") replaces args.optim, as in HF."""
        self.args = args if args is not None else TrainingArguments(output_dir="trainer_output")
        if not isinstance(self.args, TrainingArguments):
            raise TypeError("args must be a fasttrain.TrainingArguments")
        self.model_init = model_init
        if model is None and model_init is not None:
            model = self.call_model_init()
        if not isinstance(model, torch.nn.Module):
            raise TypeError("Trainer needs `model`, a torch.nn.Module, or `model_init`, a function "
                            f"returning one (got model={type(model).__name__})")
        self.processing_class = processing_class if processing_class is not None else tokenizer
        self.data_collator = data_collator or default_data_collator
        self.train_dataset, self.eval_dataset = train_dataset, eval_dataset
        self.compute_metrics = compute_metrics
        self.preprocess_logits_for_metrics = preprocess_logits_for_metrics
        self.optimizer, self.lr_scheduler = optimizers
        if optimizer_cls_and_kwargs is not None and self.optimizer is not None:
            raise ValueError("Trainer got both optimizers=(optimizer, ...) and optimizer_cls_and_kwargs; "
                             "pass one: a built optimizer, or the class and arguments to build it with")
        self.optimizer_cls_and_kwargs = optimizer_cls_and_kwargs
        hf_options.apply_log_level(self.args)
        self.dist = self._build_distributed()
        self.device = self.dist.device
        self._memory = MemoryMetrics(not self.args.skip_memory_metrics, self.device)  # HF's memory metrics
        self._memory.start("init")
        # the loss of a micro-batch and the step's token counts (caches included)
        self._losses = LossPaths(self.args, label_shift=False)
        self.compute_loss_func = compute_loss_func
        self._set_model(model)
        if self._losses.label_smoothing and getattr(getattr(self.model, "config", None), "problem_type",
                                                      None) == "multi_label_classification":
            warnings.warn("Label smoothing is not compatible with multi-label classification (its labels are "
                          "float vectors, not class indices): label_smoothing_factor is ignored for this run")
            self._losses.label_smoothing = 0.0
        self.scaler = None
        self._in_train = False
        self._accepts_loss_kwargs: Optional[bool] = None  # model_accepts_loss_kwargs when a script sets it
        self._eval_loaders: dict = {}  # id(dataset) -> (dataset, loader) with persistent workers
        self.state = TrainerState(is_world_process_zero=self.dist.is_main,
                                  is_local_process_zero=self.dist.local_rank == 0)
        self.control = TrainerControl()
        # HF's order: the flow callback first (its flags are visible to the user's callbacks),
        # the console last
        console = PrinterCallback if self.args.disable_tqdm else ProgressCallback
        self.callback_handler = CallbackHandler([DefaultFlowCallback, *(callbacks or []), console],
                                                self.model, self.processing_class,
                                                self.optimizer, self.lr_scheduler)
        # built by train(): the loop's mutable state and the components that act on it
        self.run: Optional[RunState] = None
        self.checkpointer: Optional[Checkpointer] = None
        self._instruments: Optional[Instruments] = None
        self._measured = frozenset()  # keys of the record being logged kept out of log_history
        self._graph_tail = None  # trainer/graph_tail.py, built by train() when asked for
        self._ignore_keys_for_eval = None  # train(ignore_keys_for_eval=...), for its evaluations
        self._initial_num_input_tokens_seen = 0  # at this train()'s start (after a resume)
        # decided by train(): (a subclass's training_step to call, count the labels always (HF
        # hands the count on), the loss is normalised over the step)
        self._step_rules = (False, False, True)
        self._step_micro_batches = None  # micro-batches of the step being taken
        self._train_sampler: Optional[ShardedSampler] = None
        self._clipper: Optional[GradClipper] = None  # the trainable parameters, clipped
        self._fsdp = None
        self._stream: Optional[StreamShard] = None  # an iterable train_dataset's shard
        self._logger: Optional[MetricsLogger] = None
        self.profile_summary: Optional[dict] = None
        self._flops = script_helpers.FlopCounter()
        self._check_strategies()
        self.control = self.callback_handler.call_event("on_init_end", self.args, self.state, self.control)
        self._memory.stop("init")

    def _check_strategies(self) -> None:
        """Fail now on a strategy that cannot run, instead of silently never running it."""
        if self.args.eval_strategy != "no" and self.eval_dataset is None:
            raise ValueError(
                f"TrainingArguments.eval_strategy={self.args.eval_strategy!r} needs an evaluation set, "
                "but no eval_dataset was given: pass Trainer(eval_dataset=...) or set eval_strategy='no'")

    def _set_model(self, model) -> None:
        self.model = model.to(self.device)
        self.model_wrapped = self.model
        self._losses.label_shift = uses_label_shift(model)
        self._forward_args = forward_arg_names(model)
        hf_options.apply_model_options(self.model, self.args)

    def call_model_init(self, trial=None):
        """A fresh model from `model_init` (called with `trial` if it takes an argument)."""
        return script_helpers.call_model_init(self.model_init, trial)

    # ------------------------------------------------------------------ callbacks
    def add_callback(self, callback):
        self.callback_handler.add_callback(callback)

    def pop_callback(self, callback):
        return self.callback_handler.pop_callback(callback)

    def remove_callback(self, callback):
        self.callback_handler.remove_callback(callback)

    def _event(self, name: str, **kwargs):
        self.control = self.callback_handler.call_event(name, self.args, self.state, self.control, **kwargs)

    # ------------------------------------------------------------------ building
    def _build_distributed(self):
        from fasttrain.distributed.context import DistContext
        return DistContext.from_args(self.args)

    def create_optimizer(self, model=None):
        """The optimizer args.optim names over HF's weight-decay groups of `model` (default:
        the Trainer's), unless one was given; HF's signature."""
        if self.optimizer is None:
            model = self.model if model is None else model
            if self.args.master_weights:  # low-precision weights, fp32 masters in FusedAdamW
                cast_floating_params_(model, torch.bfloat16 if self.args.bf16 else torch.float16)
            self.optimizer = build_optimizer(self.args, model, self.optimizer_cls_and_kwargs)
            # from args.optim (a resume checks it matches)
            self._built_optimizer = self.optimizer_cls_and_kwargs is None
        return self.optimizer

    def get_decay_parameter_names(self, model) -> list:
        """Names of the parameters weight decay applies to, by HF's rule (the groups
        create_optimizer builds; overrides of create_optimizer call this, as HF's do)."""
        return decay_parameter_names(model)

    @staticmethod
    def get_optimizer_cls_and_kwargs(args, model=None) -> tuple:
        """(optimizer class, its keyword arguments with "lr") for args.optim, as HF's:
        `cls(groups, **kwargs)` builds what create_optimizer would; given the model, the LR is
        a tensor on its device where the optimizer takes one (no host sync per step)."""
        params = None if model is None else next(iter(model.parameters()), None)
        return optimizer_cls_and_kwargs(args, None if params is None else params.device)

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self.lr_scheduler is None:
            self.lr_scheduler = build_scheduler(self.args, optimizer or self.optimizer, num_training_steps)
        return self.lr_scheduler

    def create_optimizer_and_scheduler(self, num_training_steps: int):
        self.create_optimizer()
        self.create_scheduler(num_training_steps, self.optimizer)

    def _build_scaler(self):
        return DynamicLossScaler() if needs_loss_scaler(self.args.bf16, self.args.fp16) else None

    def _autocast(self):
        return autocast_context(self.device.type, bf16=self.args.bf16, fp16=self.args.fp16)

    def autocast_smart_context_manager(self, cache_enabled: Optional[bool] = True):
        """HF's name for the mixed-precision context of a forward (bf16/fp16 autocast or none)."""
        return self._autocast()

    def compute_loss_context_manager(self):
        """The context HF's training_step (and overrides copied from it) compute the loss in."""
        return self._autocast()

    def get_train_dataloader(self) -> DataLoader:
        loader, self._stream, self._train_sampler = loaders.train_loader(
            self.train_dataset, self.model, collate=self._collate, args=self.args, dist=self.dist,
            device=self.device, processing_class=self.processing_class)
        return loader

    def _collate(self, features):
        check_examples(features, "the dataset")  # one isinstance per example
        batch = collate_or_explain(self.data_collator, features)
        keep = self._forward_args
        if self.args.remove_unused_columns and keep is not None and not batch.keys() <= keep:
            batch = {k: v for k, v in batch.items() if k in keep}
        return batch

    # ------------------------------------------------------------------ the step
    def compute_loss(self, model, inputs: dict, return_outputs: bool = False,
                     num_items_in_batch: Optional[torch.Tensor] = None):
        """Loss of one micro-batch. With `num_items_in_batch` (valid label tokens of the whole
        optimizer step) the result is this micro-batch's summed token loss divided by it, so
        the micro-batch losses of a step add up to the step's exact mean."""
        return self._losses.compute_loss(model, inputs, return_outputs, num_items_in_batch)

    @property
    def compute_loss_func(self) -> Optional[Callable]:
        return self._losses.compute_loss_func

    @compute_loss_func.setter
    def compute_loss_func(self, func: Optional[Callable]) -> None:
        if func is not None and not callable(func):
            raise TypeError(f"compute_loss_func must be callable as func(outputs, labels, "
                            f"num_items_in_batch=...), got {type(func).__name__}")
        self._losses.compute_loss_func = func

    # HF's attributes that scripts, callbacks and overrides copied from HF's methods read
    @property
    def is_in_train(self) -> bool:
        return self._in_train

    @property
    def model_accepts_loss_kwargs(self) -> bool:
        """Whether the model's forward takes num_items_in_batch (HF's test: **kwargs or
        accepts_loss_kwargs), unless set: as in HF, a script or subclass may assign it (HF's
        own test helpers set False for a model that returns a per-batch mean). It decides, as
        in HF, whether an overridden compute_loss's result counts as normalised over the step
        and whether a subclass's training_step is handed num_items_in_batch; fasttrain's own
        compute_loss weighs each micro-batch by its label count either way."""
        if self._accepts_loss_kwargs is not None:
            return self._accepts_loss_kwargs
        return model_takes_loss_kwargs(self.model)

    @model_accepts_loss_kwargs.setter
    def model_accepts_loss_kwargs(self, value: bool) -> None:
        self._accepts_loss_kwargs = None if value is None else bool(value)

    @property
    def label_names(self) -> list:
        return list(self.args.label_names or ["labels"])

    @property
    def label_smoother(self):
        """HF's LabelSmoother for label_smoothing_factor > 0 (built on fasttrain's op), else None."""
        factor = self._losses.label_smoothing
        return LabelSmoother(factor) if factor else None

    @label_smoother.setter
    def label_smoother(self, smoother) -> None:
        """As HF's attribute: None turns smoothing off; a smoother with an `epsilon` (HF's
        LabelSmoother or fasttrain's) sets it."""
        if smoother is not None and not isinstance(getattr(smoother, "epsilon", None), (int, float)):
            raise TypeError(f"trainer.label_smoother must be None or a LabelSmoother with an epsilon "
                            f"(transformers.trainer_pt_utils.LabelSmoother or fasttrain's), got "
                            f"{type(smoother).__name__}; for another loss override compute_loss")
        self._losses.label_smoothing = 0.0 if smoother is None else float(smoother.epsilon)

    @property
    def is_fsdp_enabled(self) -> bool:
        return bool(self.args.fsdp)

    is_deepspeed_enabled = False  # fasttrain has no DeepSpeed path (TrainingArguments refuses `deepspeed`)
    deepspeed = None
    place_model_on_device = True  # the model is moved to its device at construction
    current_flos = 0  # each step's FLOPs are in state.total_flos as the step ends

    def _compute_loss_overridden(self) -> bool:
        return type(self).compute_loss is not Trainer.compute_loss

    def training_step(self, model, inputs: dict, num_items_in_batch: Optional[torch.Tensor] = None) -> torch.Tensor:
        """HF's: forward and backward of one micro-batch (under autocast, through
        compute_loss, the loss scaled for the step's accumulation and ranks, through the loss
        scaler); returns the loss as the step logs it, detached. train() calls it for every
        micro-batch when a subclass overrides it (HF's signature); otherwise the same work
        runs inline in the step, with no call per micro-batch."""
        # HF's rule: the loss is normalised over the step when an explicit loss_is_scaled_for_ga
        # says so, or it was divided by num_items_in_batch (fasttrain's compute_loss, a model
        # taking loss kwargs, a compute_loss_func); else it is divided by the micro-batches
        scaled_for_ga = getattr(self, "loss_is_scaled_for_ga", None)
        if scaled_for_ga is None:
            scaled_for_ga = self.compute_loss_func is not None or (num_items_in_batch is not None and (
                not self._compute_loss_overridden() or self.model_accepts_loss_kwargs))
        inputs = to_device(inputs, self.device)
        with self._autocast():
            loss = self.compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
        micro_batches = self._step_micro_batches or self.args.gradient_accumulation_steps
        scaled, logged = micro_batch_losses(loss, micro_batches, not scaled_for_ga, self.dist.world_size)
        (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
        return logged.detach()

    def _training_step_overridden(self) -> bool:
        return "training_step" in vars(self) or type(self).training_step is not Trainer.training_step

    def _train_step(self, batches: list) -> torch.Tensor:
        """One optimizer step over the micro-batches in `batches`; returns the step's mean
        loss as a device tensor (never read here; it may still reference the freed autograd
        graph: detach it before keeping it)."""
        model = self.model_wrapped
        losses = self._losses
        batches = [to_device(b, self.device) for b in batches]  # labels are counted on the device
        losses.last_labels = [losses.labels(b) for b in batches]  # references: read on logging steps
        has_labels = all(lab is not None for lab in losses.last_labels)
        # decided once per train() (lifecycle): a subclass's training_step(model, inputs,
        # num_items) to call per micro-batch; whether to count the step's labels even for one
        # micro-batch (a loss that divides by the count); whether compute_loss's result is
        # normalised over the whole step
        hf_step, count_always, scaled_for_ga = self._step_rules
        num_items = losses.step_token_count(batches, self.dist, count_always) if has_labels else None
        world, n = self.dist.world_size, len(batches)
        # a loss that is a per-micro-batch mean (no labels, or an override HF would divide by the
        # accumulation steps) is averaged over the step's micro-batches
        own_mean = not (has_labels and scaled_for_ga)
        step_loss = None
        inst = self._instruments
        if hf_step:
            self._step_micro_batches = n
            hf_items = num_items if count_always else None  # what HF hands it
        for i, batch in enumerate(batches):
            last = i == n - 1
            with self.dist.no_sync(model, enabled=not last):
                inst.observe_batch(batch)
                if hf_step:
                    logged = self.training_step(model, batch, hf_items)
                else:
                    with self._autocast():
                        loss = self.compute_loss(model, batch, num_items_in_batch=num_items)
                    inst.lap("forward")
                    scaled, logged = micro_batch_losses(loss, n, own_mean, world)
                    (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
                step_loss = logged if step_loss is None else step_loss + logged
                inst.lap("backward")
            if not last:
                self._event("on_substep_end")
        if hf_step:
            self._step_micro_batches = None
        losses.end_step()
        with torch.no_grad():
            self._optimizer_step(step_loss)
        inst.lap("optimizer")
        return step_loss

    def _optimizer_step(self, step_loss: torch.Tensor) -> None:
        """Unscale, clip and step, skipping on a device-side flag (trainer/optimizer_step.py);
        then drop the gradients; with cuda_graph_optimizer, all of it replayed from one CUDA
        graph (trainer/graph_tail.py)."""
        if self._graph_tail is not None:
            self._graph_tail.step(step_loss, self._event)
            return
        optimizer_step(step_loss, args=self.args, optimizer=self.optimizer, scaler=self.scaler,
                       lr_scheduler=self.lr_scheduler, run=self.run, clipper=self._clipper, event=self._event)
        self.dist.zero_grad(self.model_wrapped, self.optimizer)

    # ------------------------------------------------------------------ the loop
    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None, **kwargs):
        """HF's signature. `ignore_keys_for_eval`: output keys the evaluations during training
        leave out of the predictions (as evaluate(ignore_keys=...)). `trial` belongs to HF's
        hyperparameter_search, which fasttrain does not have."""
        if kwargs:
            raise TypeError(f"train() got unexpected arguments {sorted(kwargs)}; it takes "
                            "resume_from_checkpoint, trial and ignore_keys_for_eval, as HF's")
        if trial is not None:
            raise ValueError("train(trial=...) is HF's hyperparameter-search hook and fasttrain has no "
                             "hyperparameter_search: set each trial's values on TrainingArguments "
                             "(or in model_init) and call train() once per trial")
        self._ignore_keys_for_eval = ignore_keys_for_eval
        return lifecycle.train(self, resume_from_checkpoint or self.args.resume_from_checkpoint)

    @property
    def _train_batch_size(self) -> int:
        """HF's name for the per-process training batch (what auto_find_batch_size found)."""
        return self.args.train_batch_size

    def _run_epochs(self, loader, num_epochs: int, micro_per_epoch: int):
        args, st, run = self.args, self.state, self.run
        ga = args.gradient_accumulation_steps
        while run.epoch < num_epochs and st.global_step < st.max_steps:
            if self._stream is not None:
                self._stream.set_epoch(run.epoch)  # a new pass over the stream
            else:
                self._train_sampler.set_epoch(run.epoch, skip=run.micro_batches_done * args.per_device_train_batch_size)
            self._event("on_epoch_begin")
            iterator = iter(loader)
            ended = False  # a stream's pass ran out
            inst = self._instruments
            while run.micro_batches_done < micro_per_epoch and st.global_step < st.max_steps:
                self._event("on_step_begin")
                inst.step_begin()
                batches = take(iterator, min(ga, micro_per_epoch - run.micro_batches_done))
                inst.lap("data")
                if not batches:
                    ended = True
                    break
                if st.global_step == self._start_step:  # bad input fails here, by name, not in torch
                    check_first_batch(batches[0], vocab_size_of(self.model), "train_dataset")
                run.advance(len(batches))
                step_loss = self._train_step(batches)
                tokens = samples = flos = 0  # host ints from the batches' shapes
                for b in batches:
                    tokens, samples = tokens + tokens_in(b), samples + samples_in(b)
                    flos += self.floating_point_ops(b)
                inst.step_end(st.global_step + 1, tokens, samples)
                st.global_step += 1
                st.epoch = run.epoch + run.micro_batches_done / micro_per_epoch
                seen = hf_options.tokens_seen(batches, args) if args.include_num_input_tokens_seen == "non_padding" \
                    else tokens  # every input_ids position, as tokens_seen counts it
                st.num_input_tokens_seen += seen * self.dist.world_size
                st.total_flos += flos * self.dist.world_size
                run.window.add(step_loss, run.grad_norm, tokens)
                if args.torch_empty_cache_steps:
                    hf_options.maybe_empty_cache(args, st.global_step, self.device)
                self._event("on_step_end")  # DefaultFlowCallback sets the flags, others may change them
                self._maybe_log_save_evaluate(epoch_end=False)
                if self.control.should_training_stop or self.control.should_epoch_stop:
                    break
            if ended or run.micro_batches_done >= micro_per_epoch or self.control.should_epoch_stop:
                run.next_epoch()  # a checkpoint saved now resumes at the next epoch
            self._event("on_epoch_end")  # also when max_steps or a callback ended training mid-epoch
            self._maybe_log_save_evaluate(epoch_end=True)
            if self.control.should_training_stop:
                break

    def _maybe_log_save_evaluate(self, epoch_end: bool):
        """Act on the flags the callbacks set (DefaultFlowCallback decides the cadence)."""
        st, control = self.state, self.control
        # every rank computes this cadence alike (a callback's should_log may differ per rank)
        agree_now = epoch_end or st.global_step >= st.max_steps or st.global_step % st.logging_steps == 0
        if not (control.should_log or control.should_evaluate or control.should_save or agree_now
                or self.run.stop_signal is not None):
            self.checkpointer.poll()  # most steps: nothing to log, save or agree on
            return
        step_end.log_evaluate_save(self, agree_now)

    def _evaluate(self, trial, ignore_keys_for_eval, skip_scheduler: bool = False) -> dict:
        """An evaluation during training, as HF's method of this name (subclasses override
        it): evaluate(), then a metric-driven schedule (reduce_lr_on_plateau, greedy) steps
        on metric_for_best_model unless `skip_scheduler`."""
        metrics = self.evaluate(ignore_keys=ignore_keys_for_eval)
        if not skip_scheduler:
            step_on_metrics(self.lr_scheduler, metrics, self.args.metric_for_best_model)
        return metrics

    def _log_training(self, window: dict):
        if not window:
            return
        record, self._measured = training_record(
            window, args=self.args, state=self.state, run=self.run, lr_scheduler=self.lr_scheduler,
            optimizer=self.optimizer, scaler=self.scaler, instruments=self._instruments, losses=self._losses)
        try:
            self.log(record)  # through self: a subclass's log() sees the whole record
        finally:
            self._measured = frozenset()

    def log(self, logs: dict, start_time: Optional[float] = None):
        """HF's: `logs` to log_history, the callbacks' on_log and the run's log. Given the
        run's start (time.time()) and tokens counted (include_num_input_tokens_seen), the
        session's train_runtime and train_tokens_per_second are added, as HF adds them."""
        st = self.state
        for key, value in logs.items():  # a 0-d tensor (a device LR a subclass logs) as the number it
            if isinstance(value, torch.Tensor) and value.dim() == 0:  # holds now: the history is JSON
                logs[key] = value.item()  # sync: logging only
        if start_time is not None and self.args.include_num_input_tokens_seen != "no":
            logs.update(script_helpers.session_speed(start_time, st.num_input_tokens_seen
                                                     - self._initial_num_input_tokens_seen))
        record = stamp(logs, st, self.args)
        st.log_history.append(history_record(record, self._measured))
        self._event("on_log", logs=logs)
        if self._logger is not None:
            self._logger.log(record, st.global_step)
            return
        write_outside_train(record, self.args, self.dist.is_main, st.global_step)

    # ------------------------------------------------------------------ checkpoints
    def _save_checkpoint(self, metrics=None, blocking: bool = False, best: bool = False) -> str:
        """Save `checkpoint-<global_step>`; `best`: it holds the new best model."""
        return save_step(self.checkpointer, self.state.global_step, run=self.run, scaler=self.scaler,
                         stream=self._stream, dist=self.dist, num_workers=self.args.dataloader_num_workers,
                         best=best, blocking=blocking)

    def save_model(self, output_dir=None, _internal_call: bool = False) -> None:
        """Weights (safetensors) and config of the model, for inference or fine-tuning
        (`_internal_call`: HF's flag for its hub push, which fasttrain does not make)."""
        save_model_folder(self.model, output_dir or self.args.output_dir, self.args, self.processing_class,
                          dist=self.dist, sharded=self._fsdp is not None)

    # ------------------------------------------------------------------ evaluation (HF API)
    def get_eval_dataloader(self, eval_dataset=None) -> DataLoader:
        """The evaluation DataLoader (HF's contract: a subclass may return its own).
        `eval_dataset` may be a dataset, or the name of one when Trainer(eval_dataset=...)
        is a dict. With dataloader_persistent_workers (and workers), one loader per dataset is
        kept, as HF keeps it: its worker pool lives across evaluations instead of being
        started for each."""
        dataset = resolve_eval_dataset(eval_dataset, self.eval_dataset)
        if not (self.args.dataloader_persistent_workers and self.args.dataloader_num_workers > 0):
            return self._eval_loader(dataset, "evaluation")
        cached = self._eval_loaders.get(id(dataset))
        if cached is None or cached[0] is not dataset:
            cached = self._eval_loaders[id(dataset)] = (dataset, self._eval_loader(dataset, "evaluation"))
        return cached[1]

    def get_test_dataloader(self, test_dataset) -> DataLoader:
        """The DataLoader predict() reads `test_dataset` with."""
        if test_dataset is None:
            raise ValueError("predict() needs a test dataset: predict(test_dataset)")
        return self._eval_loader(test_dataset, "test")

    def _eval_loader(self, dataset, description: str) -> DataLoader:
        return loaders.eval_loader(dataset, description, self.model, collate=self._collate, args=self.args,
                                   dist=self.dist, device=self.device)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict:
        if eval_dataset is None and isinstance(self.eval_dataset, dict):
            eval_dataset = self.eval_dataset
        if isinstance(eval_dataset, dict):
            metrics = {}
            for name, ds in eval_dataset.items():
                metrics.update(self.evaluate(ds, ignore_keys, f"{metric_key_prefix}_{name}"))
            return metrics
        return eval_calls.evaluate_one(self, eval_dataset, ignore_keys, metric_key_prefix)

    def predict(self, test_dataset, ignore_keys=None, metric_key_prefix: str = "test") -> PredictionOutput:
        return eval_calls.predict(self, test_dataset, ignore_keys, metric_key_prefix)

    def prediction_step(self, model, inputs: dict, prediction_loss_only: bool, ignore_keys=None):
        """(loss_sum, token_count, logits, labels) of one batch; logits None when not needed."""
        return eval_calls.prediction_step(self, model, inputs, prediction_loss_only, ignore_keys)

    def evaluation_loop(self, dataloader, description: str = "Evaluation", prediction_loss_only=None,
                        ignore_keys=None, metric_key_prefix: str = "eval") -> PredictionOutput:
        """Loss (token-weighted, as training), predictions and metrics over `dataloader`."""
        return eval_calls.evaluation_loop(self, dataloader, description, prediction_loss_only, metric_key_prefix)

    # ------------------------------------------------------------------ what HF's scripts call
    def is_world_process_zero(self) -> bool:
        return self.dist.is_main

    def is_local_process_zero(self) -> bool:
        return self.dist.local_rank == 0

    def metrics_format(self, metrics: dict) -> dict:
        """Metrics for reading: runtimes as h:mm:ss.ss, total_flos in GF, floats to 4 places."""
        return script_helpers.metrics_format(metrics)

    def log_metrics(self, split: str, metrics: dict) -> None:
        """Print `metrics` as an aligned table under a `***** {split} metrics *****` header."""
        if self.is_world_process_zero():
            script_helpers.print_metrics(split, self.metrics_format(metrics))

    def save_metrics(self, split: str, metrics: dict, combined: bool = True) -> None:
        """`{split}_results.json` in output_dir; with `combined`, merged into all_results.json."""
        if self.is_world_process_zero():
            script_helpers.save_metrics(self.args.output_dir, split, metrics, combined)

    def _load_callback_state(self) -> None:
        """HF's (private) name, which HF's callback tests call: put back the callbacks' and the
        control's states from `self.state.stateful_callbacks`, as a resume does, when
        restore_callback_states_from_checkpoint is set."""
        if self.args.restore_callback_states_from_checkpoint:
            self.callback_handler.restore_state(self.state.stateful_callbacks, self.control)

    def save_state(self) -> None:
        """trainer_state.json in output_dir (HF's layout)."""
        if self.is_world_process_zero():
            script_helpers.save_state(self.args.output_dir, self.state, self.callback_handler, self.control)

    def create_model_card(self, language=None, license=None, tags=None, model_name=None, finetuned_from=None,
                          tasks=None, dataset_tags=None, dataset=None, dataset_args=None, **kwargs) -> None:
        """A README.md in output_dir (HF's card, without the hub metadata it cannot fetch
        offline); HF's parameters in HF's order."""
        if self.is_world_process_zero():
            script_helpers.create_model_card(self.args, self.state.log_history, model_name, finetuned_from,
                                             tasks, dataset, language, license, tags)

    def num_examples(self, dataloader) -> int:
        """Examples behind a DataLoader: its dataset's length, else batches x batch size."""
        return script_helpers.num_examples(dataloader)

    def num_tokens(self, train_dl, max_steps=None) -> int:
        """Input tokens of one pass over `train_dl` (or of `max_steps` batches)."""
        return script_helpers.num_tokens(train_dl, max_steps)

    def floating_point_ops(self, inputs: dict) -> int:
        """FLOPs of one forward+backward on `inputs` (HF's estimate unless the model counts)."""
        return self._flops(self.model, inputs)

    def get_num_trainable_parameters(self) -> int:
        return script_helpers.trainable_parameters(self.model)

    def get_total_train_batch_size(self, args) -> int:
        return script_helpers.total_train_batch_size(args, self.dist.world_size)

    def store_flos(self) -> None:
        """HF's: fold the FLOPs counted since the last call into state.total_flos. fasttrain
        adds each step's FLOPs (over all ranks) as the step ends: nothing is pending."""

    def get_learning_rates(self) -> list:
        return script_helpers.learning_rates(self.optimizer, self.lr_scheduler)

    def get_optimizer_group(self, param=None):
        """The optimizer's param group holding `param`, or every group's params without it."""
        return script_helpers.optimizer_group(self.optimizer, param)
