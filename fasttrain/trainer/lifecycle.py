"""One train() call around the loop: the set-up (output folder, seed, a fresh model from
model_init, the train loader and its epoch plan, activation checkpointing, instruments, FSDP,
optimizer and scheduler, loss scaler, the data-parallel wrapper, a fresh TrainerState, the
RunState, the Checkpointer and the resume, the metrics log, SIGTERM handler, peer watchdog,
NEFTune), HF's end-of-training record, and the teardown that releases what the set-up made.

Handed the Trainer itself (as eval_calls.py is): the set-up goes through the methods an
HF subclass may override (call_model_init, get_train_dataloader,
create_optimizer_and_scheduler, evaluate, log, the loop), so overrides are honoured, and it
writes the attributes the loop then reads (those listed in `Trainer.__init__`, and
`_start_step`). May import the trainer package's siblings and every lower layer; trainer.py
only for its type.
"""
from __future__ import annotations

import copy
import math
import time
from typing import TYPE_CHECKING

from fasttrain.callbacks import TrainerState
from fasttrain.checkpoint import hf_layout
from fasttrain.checkpoint.checkpointer import Checkpointer, RunComponents, prepare_output_dir
from fasttrain.optim.merged_groups import own_lr_per_group
from fasttrain.optim.schedules import LRScheduler
from fasttrain.trainer import hf_options, loaders
from fasttrain.trainer.batch_size_search import first_batch_size, run_with_shrinking_batch
from fasttrain.trainer.checkpointing import build_checkpointer, resume_run
from fasttrain.trainer.graph_tail import graph_tail_for
from fasttrain.trainer.instruments import Instruments
from fasttrain.trainer.logging_step import train_end_record
from fasttrain.trainer.loss_paths import loss_is_scaled_for_ga
from fasttrain.trainer.metrics_log import MetricsLogger
from fasttrain.trainer.optimizer_step import GradClipper
from fasttrain.trainer.parallelize import checkpoint_activations_from_args, shard_from_args
from fasttrain.trainer.run_state import RunState
from fasttrain.trainer.utils import TrainOutput, run_cleanup

if TYPE_CHECKING:
    from fasttrain.trainer.trainer import Trainer


def train(trainer: Trainer, resume) -> TrainOutput:
    """train()'s body: one run, or with auto_find_batch_size one per batch size tried."""
    trainer._memory.start("train")
    try:
        if not trainer.args.auto_find_batch_size:
            return _train_once(trainer, resume)
        given = trainer.optimizer, trainer.lr_scheduler  # a retry builds its own again, as the first try did
        requested = trainer.args  # left as the caller made it, as HF leaves it

        def attempt(batch_size):
            trainer.args = copy.copy(requested)
            trainer.args.per_device_train_batch_size = batch_size
            trainer.optimizer, trainer.lr_scheduler = given
            return _train_once(trainer, resume)
        return run_with_shrinking_batch(attempt, first_batch_size(trainer.args, resume))
    finally:
        trainer._memory.stop("train")  # after a failure (a success has reported it)


def _train_once(trainer: Trainer, resume_from_checkpoint) -> TrainOutput:
    """One training run with `trainer.args`."""
    args = trainer.args
    prepare_output_dir(args.output_dir, bool(resume_from_checkpoint), args.overwrite_output_dir,
                       trainer.dist.is_main)
    hf_options.seed_everything(args)
    if trainer.model_init is not None:  # as HF: a fresh model (and optimizer) seeded by args.seed
        trainer._set_model(trainer.call_model_init())
        trainer.callback_handler.model = trainer.model
        trainer.optimizer = trainer.lr_scheduler = None
    trainer._stream = None
    loader = trainer.get_train_dataloader()
    micro_per_epoch, max_steps, num_epochs = loaders.plan_epochs(
        args, None if trainer._stream is not None else len(loader))
    # activation checkpointing -> compile (in Instruments) -> FSDP -> optimizer
    checkpoint_activations_from_args(trainer.model, args)
    # From here on threads, files and handlers exist: whatever fails, the finally below
    # releases them, and a cleanup step that fails too never hides the first error.
    trainer._instruments = Instruments(args, trainer.model, trainer.dist, trainer.train_dataset)
    trainer.run = trainer.checkpointer = trainer._neftune = None
    failed = True
    trainer._in_train = True  # bf16/fp16_full_eval cast only outside training, as HF
    try:
        start_step, start_time = _begin(trainer, loader, resume_from_checkpoint, max_steps, num_epochs)
        if args.eval_on_start:  # as HF: a sanity evaluation before the first step, no schedule step
            trainer._evaluate(None, trainer._ignore_keys_for_eval, skip_scheduler=True)
            trainer.model_wrapped.train()
            trainer.run.window.t0 = time.perf_counter()
        with trainer._instruments.oom_guard():
            trainer._run_epochs(loader, num_epochs, micro_per_epoch)
        trainer.checkpointer.wait()
        failed = False
    except RuntimeError as e:
        lost = trainer.dist.peer_lost(e, "a collective of the training loop")
        if lost is None:
            raise
        raise lost from None  # fasttrain's message instead of the transport's
    finally:
        _finish(trainer, failed)
    st = trainer.state
    runtime = time.perf_counter() - start_time
    if args.load_best_model_at_end and st.best_model_checkpoint:
        hf_layout.load_weights(trainer.model, st.best_model_checkpoint)
    rest = trainer.run.window.flush(trainer.dist)  # steps after the last logging step count too
    if rest:
        trainer.run.add_logged_window(rest)
    train_loss = trainer.run.mean_logged_loss()
    metrics = train_end_record(runtime, st.global_step - start_step, train_loss, st.total_flos,
                               samples_per_step=args.per_device_train_batch_size
                               * args.gradient_accumulation_steps * trainer.dist.world_size)
    trainer._memory.stop_and_update("train", metrics)
    trainer.log(dict(metrics))  # train()'s writers are closed: this one opens and closes its own
    metrics["epoch"] = st.epoch
    metrics["train_tokens"] = st.num_input_tokens_seen
    trainer._event("on_train_end")
    return TrainOutput(st.global_step, train_loss, metrics)


def _begin(trainer: Trainer, loader, resume_from_checkpoint, max_steps: int, num_epochs: int):
    args = trainer.args
    trainer._fsdp = shard_from_args(trainer.model, args, trainer.dist,
                                    optimizer_given=trainer.optimizer is not None)
    built_optimizer = trainer.optimizer is None
    trainer.create_optimizer_and_scheduler(max_steps)
    if built_optimizer and not isinstance(trainer.lr_scheduler, LRScheduler):
        own_lr_per_group(trainer.optimizer)  # its groups shared one LR tensor (optim.merged_groups)
    trainer.scaler = trainer._build_scaler()
    trainer.model_wrapped = trainer.dist.wrap(trainer.model, args)
    handler = trainer.callback_handler
    handler.optimizer, handler.lr_scheduler = trainer.optimizer, trainer.lr_scheduler
    trainer.callback_handler.train_dataloader = loader
    # as HF: each train() starts from a fresh TrainerState (a resume then loads the saved one)
    st = trainer.state = TrainerState(is_world_process_zero=trainer.dist.is_main,
                                      is_local_process_zero=trainer.dist.local_rank == 0)
    st.max_steps, st.num_train_epochs = max_steps, num_epochs
    st.compute_steps(args, max_steps)
    st.train_batch_size = args.per_device_train_batch_size
    trainer._clipper = GradClipper([p for p in trainer.model.parameters() if p.requires_grad])
    trainer._losses.args = args  # auto_find_batch_size gives each attempt its own copy of the arguments
    # one count of skipped steps: the LR schedule's when it is ours (it holds the LR on them)
    schedule_counts = isinstance(trainer.lr_scheduler, LRScheduler) and trainer.lr_scheduler.device_mode
    trainer.run = RunState(trainer.device, trainer.dist.world_size, args.per_device_train_batch_size,
                           skipped=trainer.lr_scheduler.skipped.view(()) if schedule_counts else None,
                           skips_counted_elsewhere=schedule_counts)
    trainer.run.window.nan_inf_filter = args.logging_nan_inf_filter
    trainer._graph_tail = graph_tail_for(args, device=trainer.device, optimizer=trainer.optimizer,
                                         scaler=trainer.scaler, lr_scheduler=trainer.lr_scheduler, run=trainer.run,
                                         clipper=trainer._clipper, callbacks=trainer.callback_handler.callbacks)
    trainer.checkpointer = _build_checkpointer(trainer)
    if resume_from_checkpoint:
        resume_run(trainer.checkpointer, resume_from_checkpoint, args=args, run=trainer.run, state=st,
                   steps_per_epoch=lambda: math.ceil(len(loader) / args.gradient_accumulation_steps),
                   stream=trainer._stream, dist=trainer.dist,
                   built_optimizer=getattr(trainer, "_built_optimizer", False))
    trainer._logger = MetricsLogger(args, trainer.dist.is_main, max_steps, resume=bool(resume_from_checkpoint),
                                    history=st.log_history if resume_from_checkpoint else None)
    trainer.run.install_sigterm_handler()
    trainer.dist.start_watchdog(args.ddp_heartbeat_timeout)
    trainer.model_wrapped.train()  # evaluation restores the mode it found
    trainer._event("on_train_begin")
    start_time = time.perf_counter()
    trainer._start_step = st.global_step
    trainer._initial_num_input_tokens_seen = st.num_input_tokens_seen
    # HF counts num_items_in_batch (for one micro-batch too) for the losses that divide by it:
    # a compute_loss_func, or a subclass's training_step on a model that takes loss kwargs
    hf_step = trainer._training_step_overridden()
    counts = trainer.compute_loss_func is not None or (hf_step and trainer.model_accepts_loss_kwargs)
    trainer._step_rules = (
        hf_step, counts,
        loss_is_scaled_for_ga(trainer._compute_loss_overridden(), getattr(trainer, "loss_is_scaled_for_ga", None),
                              trainer.model_accepts_loss_kwargs))
    trainer.run.window.t0 = start_time  # set-up and resume time are not training time
    trainer._neftune = hf_options.activate_neftune(trainer.model, args.neftune_noise_alpha)
    return st.global_step, start_time


def _finish(trainer: Trainer, failed: bool) -> None:
    """Release everything train() holds. After a failure, cleanup errors are logged and
    the original error propagates; after success the first cleanup error is raised."""
    trainer._in_train = False
    logger_, trainer._logger = trainer._logger, None  # evaluate() after train() opens and closes its own
    saver, neftune, trainer._neftune = trainer.checkpointer, trainer._neftune, None
    run_cleanup((
        ("removing the NEFTune hook", neftune.remove if neftune is not None else None),
        ("waiting for the background checkpoint save",
         None if saver is None else saver.drain if failed else saver.wait),
        ("restoring the SIGTERM handler", trainer.run.restore_sigterm_handler if trainer.run else None),
        ("releasing the optimizer tail's CUDA graph", trainer._graph_tail.close if trainer._graph_tail else None),
        ("stopping the peer watchdog", lambda: trainer.dist.stop_watchdog(clean=not failed)),
        ("closing the training log", logger_.close if logger_ is not None else None),
        ("closing the progress bars", (lambda: _close_progress_bars(trainer)) if failed else None),
        ("writing the profile", lambda: _finish_instruments(trainer))), failed)


def _close_progress_bars(trainer: Trainer) -> None:
    for callback in trainer.callback_handler.callbacks:  # on success, on_train_end closes them
        if hasattr(callback, "close_bars"):
            callback.close_bars()


def _finish_instruments(trainer: Trainer) -> None:
    trainer.profile_summary = None
    trainer.profile_summary = trainer._instruments.finish(trainer.dist.is_main,
                                                          quiet=trainer.args.disable_tqdm)


def _build_checkpointer(trainer: Trainer) -> Checkpointer:
    args = trainer.args
    components = RunComponents(
        model=trainer.model, optimizer=trainer.optimizer, lr_scheduler=trainer.lr_scheduler,
        run_state=trainer.run, trainer_state=trainer.state, scaler=trainer.scaler,
        callbacks=trainer.callback_handler, training_args=args.to_dict(),
        restore_callbacks=args.restore_callback_states_from_checkpoint, control=trainer.control,
        args_object=args, model_only=args.save_only_model)
    return build_checkpointer(args, components, trainer.dist, sharded=trainer._fsdp is not None)
