"""The end of a step that has something to do: log, evaluate, save, or stop on a signal.

Handed the Trainer (like lifecycle.py): the flags the callbacks set decide what runs, and the
overridable methods (`log` through `_log_training`, `_evaluate`, `_save_checkpoint`) are
called through it, so a subclass's versions are the ones that run. The Trainer checks first
whether anything is to be done at all (most steps: nothing) and calls this only then.
"""
from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from fasttrain.trainer.evaluation import update_best

if TYPE_CHECKING:
    from fasttrain.trainer.trainer import Trainer

logger = logging.getLogger("fasttrain")


def log_evaluate_save(trainer: Trainer, agree_now: bool) -> None:
    """One logging / evaluation / saving pass at the end of a step; `agree_now`: this step is
    on the cadence every rank computes alike (where ranks agree on a preemption stop)."""
    args, st, control, run = trainer.args, trainer.state, trainer.control, trainer.run
    step = st.global_step
    preempted = preemption_agreed(run, trainer.dist, agree_now)
    if preempted:
        control.should_save = control.should_training_stop = True
    if control.should_log:
        trainer._log_training(run.window.flush(trainer.dist))
    metrics, paused = None, control.should_evaluate or control.should_save
    new_best = False  # a best result belongs to a checkpoint of this step only
    if control.should_evaluate and trainer.eval_dataset is not None:
        with trainer._instruments.expect_compiles("evaluation (dropout off)"):
            metrics = trainer._evaluate(None, trainer._ignore_keys_for_eval)
        new_best = update_best(metrics, args, st)
        if args.save_strategy == "best":
            control.should_save = new_best or preempted  # a preemption saves regardless
    # the epoch-end pass after a stop mid-epoch must not write the step's checkpoint again
    saved = run.saved_step == step and not new_best
    if control.should_save and (args.save_strategy != "no" or preempted) and not saved:
        # a preemption save must be on disk before the process exits
        trainer._save_checkpoint(metrics, blocking=preempted, best=new_best)
        trainer._event("on_save")
    trainer.checkpointer.poll()  # a failed background save surfaces here, at the next step
    if preempted and not saved:
        logger.warning("received %s: saved checkpoint-%d and stopped cleanly",
                       run.stop_signal or "SIGTERM (on another rank)", step)
    if paused:
        run.window.t0 = time.perf_counter()  # tokens/s counts training time only
    control.should_log = control.should_evaluate = control.should_save = False


def preemption_agreed(run, dist, agree_now: bool) -> bool:
    """Whether to save and stop now. One process decides at the end of the step the signal
    arrived in. Ranks may receive it in different steps, so under data parallelism they
    agree at the next logging-cadence step (every logging_steps, epoch end, last step), never
    in between: no rank can stop while another still trains."""
    requested = run.stop_signal is not None
    if not dist.enabled:
        return requested
    return dist.any_flag(requested) if agree_now else False
