"""Training: the loss, gradient reduction over dp x sp, data, checkpoints and the training loop.

* :mod:`~seqpar.train.loss`: next-token labels, the exact global token-mean loss, ``sync_gradients``.
* :mod:`~seqpar.train.data`: the synthetic long-context recall task and memory-mapped token files.
* :mod:`~seqpar.train.checkpoint`: crash-safe DCP checkpoints that resume at another layout.
* :mod:`~seqpar.train.trainer`: the loop behind ``seqpar demo`` and ``seqpar train``.
"""
from .loss import IGNORE, LossOutput, causal_lm_loss, shift_labels, sync_gradients
from .trainer import TrainConfig, TrainResult, train

__all__ = ["IGNORE", "LossOutput", "causal_lm_loss", "shift_labels", "sync_gradients", "TrainConfig", "TrainResult",
           "train"]
