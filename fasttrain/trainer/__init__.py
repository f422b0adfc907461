"""The Trainer: the one package that knows the others and composes them into a step.

Owns the training loop and the HF-compatible methods (`trainer.py`: every method an HF
subclass may override stays there, and internal callers go through it), the loop's mutable
state in one object (`run_state.py`: position, logging window, device-side counters, stop
signal), and the pieces the loop is built from, each handed what it uses: the loss of a
micro-batch and the step's token counts (`loss_paths.py`), the optimizer step and clipping
(`optimizer_step.py`), the logging step (`logging_step.py`), evaluation and prediction
(`evaluation.py`), DataLoaders (`loaders.py`), resume and model folders (`checkpointing.py`),
the profiler + compile monitor wiring (`instruments.py`), the metrics log (`metrics_log.py`),
the small methods HF scripts call (`script_helpers.py`), HF's options around the step
(`hf_options.py`), HF's auto_find_batch_size retry (`batch_size_search.py`), activation
checkpointing + FSDP (`parallelize.py`), the set-up and teardown of one train() call around
the loop (`lifecycle.py`), a step's log/evaluate/save pass (`step_end.py`) and the bodies of
evaluate(), predict(), evaluation_loop() and prediction_step() (`eval_calls.py`): the
three siblings handed the Trainer itself, to call its overridable methods; and batch helpers
(`utils.py`). Save/resume is `fasttrain.checkpoint.Checkpointer`, handed the components.
May import every other fasttrain package; nothing else imports it (the CLI excepted).
"""
from fasttrain.trainer.trainer import Trainer

__all__ = ["Trainer"]
