"""Training: the loss, gradient reduction over dp x sp, data, checkpoints and the training loop.

* :mod:`~seqpar.train.loss`: next-token labels and the exact global token-mean loss.
* :mod:`~seqpar.train.grads`: gradient reduction over dp x sp (``sync_gradients``) and clipping.
* :mod:`~seqpar.train.data`: the synthetic long-context recall task and memory-mapped token files.
* :mod:`~seqpar.train.checkpoint`: crash-safe DCP checkpoints that resume at another layout.
* :mod:`~seqpar.train.trainer`: the loop behind ``seqpar demo`` and ``seqpar train``.
"""
from .grads import clip_grad_norm, sync_gradients
from .loss import (
    IGNORE,
    IGNORE_INDEX,
    LossOutput,
    causal_lm_loss,
    causal_lm_loss_from_hidden,
    global_token_mean,
    shift_labels,
)
from .trainer import TrainConfig, TrainResult, train

__all__ = ["IGNORE", "IGNORE_INDEX", "LossOutput", "causal_lm_loss", "causal_lm_loss_from_hidden", "global_token_mean",
           "shift_labels", "sync_gradients", "clip_grad_norm", "TrainConfig", "TrainResult", "train"]
