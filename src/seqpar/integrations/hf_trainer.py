"""Sequence-parallel ``transformers.Trainer`` and TRL ``SFTTrainer``: the usual trainer, plus ``sp=``.

The one line a Trainer user changes (launch with ``torchrun`` or ``accelerate launch``)::

    from seqpar.integrations.hf import Trainer        # instead of: from transformers import Trainer
    trainer = Trainer(model=model, args=args, train_dataset=ds, data_collator=collator,
                      sp=4, strategy="ring")          # sp ranks share each sequence; dp = world / sp
    trainer.train()

``SFTTrainer`` (importable when ``trl`` is installed) is the same mixin on TRL's trainer.
Every step equals the stock Trainer on one process over the same global batches.

How each part of the Trainer is made exact on the ``dp x sp`` mesh:

* **Mesh**: the Trainer sets up ``torch.distributed`` as usual (``TrainingArguments``,
  accelerate); the mesh is then built over that world (``sp`` defaults to the whole world,
  ``ulysses`` splits it for ``strategy="usp"``), or passed as ``mesh=``.
* **Model**: :func:`seqpar.integrations.hf.apply` routes attention through seqpar (also for
  ``model_init`` models).
* **Data**: accelerate shards each DataLoader over every process; the ``sp`` ranks of a
  group must see the *same* batch, so loaders are sharded over ``dp`` only (accelerate's own
  ``prepare_data_loader`` with ``dp`` processes: samplers, seeds, ``set_epoch``, skipping on
  resume and ``even_batches`` behave as in HF).  The first batch of every training and
  evaluation run is compared across each sp group, so a data pipeline that differs between
  ranks (an unseeded shuffle) fails loudly instead of training on mixed-up shards.
* **Batches**: padded, flattened (``DataCollatorWithFlattening``, TRL ``padding_free`` /
  packing) or differently packed rows are put in shard_batch's form
  (:func:`~seqpar.integrations._hf_trainer_batch.sequence_batch`: right padding dropped,
  documents from ``position_ids`` / ``cu_seq_lens``), then sharded by
  :func:`~seqpar.integrations.hf.shard_batch` (labels shifted per document *before* sharding, so
  documents never see each other on any rank and none loses a target at a shard edge).  The
  last token of a document gets no target: HF's collators already mask the first label of each
  document; a packed batch whose labels do not would have the stock model predict the next
  document's first token, which seqpar does not.
* **Loss**: :func:`seqpar.train.causal_lm_loss` in :meth:`SeqParTrainerMixin.forward_and_loss`,
  rescaled to HF's ``num_items_in_batch`` (targets over the whole accumulation window and every
  dp rank), so the update is the global token mean exactly as the stock Trainer's.
* **Gradients**: parameters are replicated over dp and sp; the Trainer's DDP (accelerate) runs
  over the whole world, which is ``dp x sp`` (tp = 1), and averages, which the loss's
  ``dp * sp`` factor turns into the exact sum (see :mod:`seqpar.train.loss`).  Accumulation uses
  DDP's ``no_sync`` as in HF; clipping sees the reduced gradients.
* **Logging**: each micro-batch reports its share of the *global* loss, the same on every rank,
  so ``loss``, ``train_loss`` and every ``report_to`` integration log the true loss.
* **Evaluation / predict**: the loss is the global token mean of each global batch; logits are
  gathered over sp into global order (padding removed, rows restored) and gathered over dp
  only for metrics.  FLOPs and ``num_input_tokens_seen`` count each sp group once.
* **Checkpoints**: HF's own (``save_model``, ``resume_from_checkpoint``, the RNG state of each
  rank); the model's weights are those of the plain HF model (``save_pretrained`` works, and the
  saved config names the implementation the model was built with, not "seqpar").

Refused at construction (a :class:`~seqpar.errors.ConfigError` naming the fix): DeepSpeed, FSDP
(``fsdp=`` or ``accelerate launch`` with an FSDP config), accelerate's ``ParallelismConfig``,
tensor parallelism, ``torch_compile``, Liger kernels, ``label_smoothing_factor``,
``compute_loss_func``, ``average_tokens_across_devices=False`` with several ranks, ``nn.DataParallel``
(several GPUs in one process), a CPU world without ``use_cpu=True``, and with ``sp > 1``:
``dispatch_batches=True``, ``train_sampling_strategy="batch_rebalance"``, NEFTune.  TRL: ``loss_type``
other than ``"nll"`` and MoE router auxiliary losses.

Tested with transformers 5.24, accelerate 1.16 and trl 1.16.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, cast

import torch
import torch.distributed as dist
import transformers

from ..attention import STRATEGIES
from ..core.comm import reduce_in_place
from ..core.debug import debug_enabled
from ..core.errors import ConfigError, check
from ..core.layout import get_layout, unshard
from ..core.mesh import Mesh, init
from ..core.recompute import MemoryConfig
from ..train.loss import LossOutput, causal_lm_loss
from ._hf_batch import INFO_KEY, shard_batch
from ._hf_trainer_batch import SequenceBatch, count_targets, sequence_batch
from .hf import apply
from .hf_memory import model_loss

__all__ = ["SeqParTrainerMixin", "Trainer"]  # and SFTTrainer, built on first access (it needs trl)


def _flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")


def _check_args(args: Any, compute_loss_func: Any) -> None:
    """Refuse what the seqpar Trainer cannot run exactly; args only, so every rank agrees (no communication)."""
    check(not getattr(args, "deepspeed", None) and not _flag("ACCELERATE_USE_DEEPSPEED"), ConfigError,
          "the seqpar Trainer does not support DeepSpeed yet (its engine partitions parameters and reduces "
          "gradients itself): drop deepspeed= / the accelerate DeepSpeed config and train with DDP (the default)")
    check(not getattr(args, "fsdp", None) and not _flag("ACCELERATE_USE_FSDP"), ConfigError,
          "the seqpar Trainer does not support FSDP through accelerate yet: drop fsdp= / the accelerate FSDP config "
          "(DDP over dp x sp is the default); FSDP2 over dp x sp runs in seqpar.train")
    check(getattr(args, "parallelism_config", None) is None, ConfigError,
          "accelerate's ParallelismConfig (cp/sp/tp) would shard the sequence or weights a second time: drop "
          "parallelism_config and give sp= / ulysses= to the seqpar Trainer")
    check(not getattr(args, "torch_compile", False), ConfigError,
          "torch_compile is not supported with seqpar attention in the Trainer yet (packed batches and the ring's "
          "asynchronous transfers do not trace): set torch_compile=False")
    check(not getattr(args, "use_liger_kernel", False), ConfigError,
          "Liger kernels replace the model's forward and loss with ones that see the whole sequence: set "
          "use_liger_kernel=False (seqpar computes the loss on sequence shards)")
    check(not getattr(args, "label_smoothing_factor", 0), ConfigError,
          "label_smoothing_factor is not supported by the seqpar Trainer: its loss is seqpar.train.causal_lm_loss "
          "(plain next-token cross-entropy); set label_smoothing_factor=0")
    check(compute_loss_func is None, ConfigError,
          "compute_loss_func is not supported by the seqpar Trainer: each rank holds a shard of the logits, and the "
          "global token-mean loss is computed by seqpar.train.causal_lm_loss; subclass and override "
          "forward_and_loss instead")


def _trainer_mesh(mesh: Mesh | None, sp: int | None, ulysses: int | None) -> Mesh:
    """The dp x sp mesh over the Trainer's world (collective: creates the process groups)."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    if mesh is not None:
        check(sp is None and ulysses is None, ConfigError, "pass either mesh= or sp= / ulysses=, not both")
        check(mesh.world_size == world, ConfigError,
              f"{mesh} spans {mesh.world_size} ranks but the Trainer runs on {world}: build the mesh over the "
              f"whole world")
        return mesh
    return init(sp=world if sp is None else sp, ulysses=ulysses)


class SeqParTrainerMixin:
    """Sequence parallelism for a ``transformers.Trainer`` subclass (see the module docs).

    Extra keyword arguments: ``sp`` (sequence-parallel degree; default: the whole world),
    ``ulysses`` (ulysses degree inside sp, for ``strategy="usp"``), ``strategy`` (see
    :func:`seqpar.attention`), ``layout`` (sequence layout), or ``mesh`` (a prebuilt
    :class:`~seqpar.Mesh` instead of sp / ulysses).  The mesh is ``trainer.mesh``.

    Memory settings (none changes the results): ``loss_chunk`` (tokens per chunk of a training loss
    computed from the final hidden states and the LM head's weight, never the ``[S/sp, V]`` logits;
    evaluation keeps its logits), ``recompute`` / ``offload`` / ``mlp_tiles`` (per-layer checkpointing
    with host offload, tiled MLPs: :func:`seqpar.integrations.hf_memory.apply_memory`).
    """

    # compute_loss normalises by num_items_in_batch, i.e. over the whole accumulation window
    loss_is_scaled_for_ga: bool | None = True
    mesh: Mesh

    def __init__(self, *args: Any, sp: int | None = None, ulysses: int | None = None, strategy: str = "ring",
                 layout: str = "zigzag", mesh: Mesh | None = None, loss_chunk: int | None = None,
                 recompute: str = "none", offload: bool = False, mlp_tiles: int = 1, **kwargs: Any) -> None:
        check(strategy in STRATEGIES, ConfigError, f"unknown strategy {strategy!r}: choose one of {STRATEGIES}")
        get_layout(layout)
        check(loss_chunk is None or (isinstance(loss_chunk, int) and loss_chunk > 0), ConfigError,
              f"loss_chunk={loss_chunk!r}: give a positive number of tokens per chunk (or None for the logits' loss)")
        self.seqpar_strategy, self.seqpar_layout = strategy, layout
        self.seqpar_loss_chunk = loss_chunk
        self.seqpar_memory = MemoryConfig(recompute, offload, mlp_tiles)
        targs = kwargs.get("args", args[1] if len(args) > 1 else None)
        if targs is not None:
            _check_args(targs, kwargs.get("compute_loss_func"))
        super().__init__(*args, **kwargs)
        targs = self.args  # type: ignore[attr-defined]
        _check_args(targs, getattr(self, "compute_loss_func", None))
        self._check_world(targs)
        self.mesh = _trainer_mesh(mesh, sp, ulysses)
        self._check_layout(targs)
        self._apply(self.model)  # type: ignore[attr-defined]
        if self.mesh.sp > 1:
            _shard_loaders_over_dp(self.accelerator, self.mesh)  # type: ignore[attr-defined]
        self._check_batch_once = True
        self._micro_loss: torch.Tensor | None = None

    # ---- construction -------------------------------------------------------------------------

    def _check_world(self, args: Any) -> None:
        acc = self.accelerator  # type: ignore[attr-defined]
        check(not getattr(self, "is_deepspeed_enabled", False) and not getattr(self, "is_fsdp_enabled", False),
              ConfigError, "the seqpar Trainer does not support DeepSpeed or FSDP through accelerate yet: launch "
                           "without them (DDP over dp x sp is the default)")
        world = dist.get_world_size() if dist.is_initialized() else 1
        env_world = int(os.environ.get("WORLD_SIZE", "1"))
        check(acc.num_processes == max(world, env_world), ConfigError,
              f"this process is one of {max(world, env_world)} ranks but the Trainer runs as {acc.num_processes} "
              f"(on CPU, transformers only trains distributed with use_cpu=True): pass TrainingArguments(use_cpu=True) "
              f"or set ACCELERATE_USE_CPU=1")
        check(getattr(args, "n_gpu", 1) <= 1, ConfigError,
              f"{args.n_gpu} GPUs in one process would run nn.DataParallel: launch one process per GPU "
              f"(torchrun --nproc-per-node N, or accelerate launch)")
        check(world == 1 or getattr(args, "average_tokens_across_devices", True), ConfigError,
              "average_tokens_across_devices=False averages per-rank means; the seqpar Trainer computes the exact "
              "global token mean: set average_tokens_across_devices=True")

    def _check_layout(self, args: Any) -> None:
        if self.mesh.sp == 1:
            return
        check(args.accelerator_config.dispatch_batches is not True, ConfigError,
              "dispatch_batches=True splits one batch across every rank; the ranks of a sequence-parallel group must "
              "each see the whole batch: leave accelerator_config dispatch_batches unset")
        check(getattr(args, "train_sampling_strategy", "random") != "batch_rebalance", ConfigError,
              "train_sampling_strategy='batch_rebalance' balances batches over every rank, not over data-parallel "
              "groups: use 'random', 'sequential' or 'group_by_length' with sp > 1")
        check(getattr(args, "neftune_noise_alpha", None) is None, ConfigError,
              "NEFTune scales its noise by the sequence length, which each rank sees only a shard of: drop "
              "neftune_noise_alpha with sp > 1")

    def _build_accelerator_args(self, **kwargs: Any) -> dict[str, Any]:
        """HF's accelerator arguments; with ``recompute`` or ``mlp_tiles`` DDP runs with a static graph.

        seqpar's checkpoint and tiles replay a layer inside backward, so a parameter's gradient hook can
        fire once per tile and outside the graph DDP sees from the outputs: DDP then needs
        ``static_graph=True`` (it counts the hooks in the first step) and no search for unused parameters.
        """
        args = super()._build_accelerator_args(**kwargs)  # type: ignore[misc]
        memory = self.seqpar_memory
        if memory.recompute == "none" and memory.mlp_tiles == 1:
            return args
        check(self.args.ddp_static_graph is not False, ConfigError,  # type: ignore[attr-defined]
              "recompute / mlp_tiles replay layers inside backward, which DDP supports with a static graph only: "
              "leave ddp_static_graph unset (or True)")
        from accelerate.utils import DistributedDataParallelKwargs

        args["kwargs_handlers"] = [
            dataclasses.replace(h, find_unused_parameters=False, static_graph=True)
            if isinstance(h, DistributedDataParallelKwargs) else h for h in args.get("kwargs_handlers", [])]
        return args

    def _apply(self, model: Any) -> None:
        """Route ``model``'s attention through seqpar (a PEFT model: its base model)."""
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        m = self.seqpar_memory
        apply(base, self.mesh, strategy=self.seqpar_strategy, layout=self.seqpar_layout, recompute=m.recompute,
              offload=m.offload, mlp_tiles=m.mlp_tiles)

    def call_model_init(self, trial: Any = None) -> Any:
        model = super().call_model_init(trial)  # type: ignore[misc]
        if hasattr(self, "mesh"):  # during __init__ the model is prepared once the mesh exists
            self._apply(model)
        return model

    # ---- batches ----------------------------------------------------------------------------

    def _sequence_batch(self, inputs: dict[str, Any]) -> SequenceBatch:
        seq = sequence_batch(inputs)
        if self._check_batch_once or debug_enabled():
            _check_same_batch(seq, self.mesh)
            self._check_batch_once = False
        return seq

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> torch.Tensor | None:
        """Targets in the whole accumulation window over every dp rank (each sp group counts its batch once)."""
        if not batch_samples:
            return None
        total = sum(count_targets(sequence_batch(b)).to(device) for b in batch_samples)
        return reduce_in_place(torch.as_tensor(total, device=device), self.mesh.dp_group)

    def get_total_train_batch_size(self, args: Any) -> int:
        return self._train_batch_size * args.gradient_accumulation_steps * self.mesh.dp  # type: ignore

    def floating_point_ops(self, inputs: dict[str, Any]) -> int:
        return super().floating_point_ops(inputs) // self.mesh.sp  # type: ignore[misc]

    def _track_num_input_tokens(self, inputs: dict[str, Any]) -> None:
        state = self.state  # type: ignore[attr-defined]
        before = state.num_input_tokens_seen
        super()._track_num_input_tokens(inputs)  # type: ignore[misc]
        state.num_input_tokens_seen = before + (state.num_input_tokens_seen - before) // self.mesh.sp

    # ---- loss -------------------------------------------------------------------------------

    def forward_and_loss(self, model: Any, local: dict[str, Any], labels: torch.Tensor | None
                         ) -> tuple[Any, LossOutput | None]:
        """The model on this rank's shard, and the exact global token-mean loss of its labels.

        The one place the loss is computed.  With ``loss_chunk`` set and the model training, the loss
        comes from the final hidden states and the LM head's weight in chunks of that many tokens
        (:func:`seqpar.integrations.hf_memory.model_loss`) and ``out`` is None: no logits exist.
        Communication: the model's attention over sp; the loss's all-reduce over dp x sp.
        """
        if labels is not None and self.seqpar_loss_chunk is not None and model.training:
            batch = {**local, "labels": labels, "use_cache": False}
            return None, model_loss(model, batch, self.mesh, chunk=self.seqpar_loss_chunk)
        out = model(**local, use_cache=False)
        return out, (None if labels is None else causal_lm_loss(out.logits, labels, self.mesh))

    def _forward(self, model: Any, inputs: dict[str, Any]) -> tuple[SequenceBatch, dict, Any, LossOutput | None]:
        seq = self._sequence_batch(inputs)
        local = shard_batch(seq.tensors, self.mesh, self.seqpar_layout)
        labels = local.pop("labels", None)
        local.pop("shift_labels", None)  # HF's own loss is not computed (no labels reach the model)
        out, lo = self.forward_and_loss(model, local, labels)
        if lo is not None:
            self._record_metrics(seq, out, labels, lo)
        return seq, local, out, lo

    def _record_metrics(self, seq: SequenceBatch, outputs: Any, labels: torch.Tensor, lo: LossOutput) -> None:
        """Hook for trainers that log more than the loss (TRL)."""

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: torch.Tensor | int | None = None) -> Any:
        """This rank's share of the loss; DDP's average over dp x sp gives the gradient of the global token mean.

        With ``num_items_in_batch`` (the Trainer passes the targets of the whole accumulation window
        over every rank) the loss is normalised by it, as HF's; without, by this batch's targets.
        """
        check(inputs.get("labels") is not None, ConfigError,
              "the seqpar Trainer trains causal LMs from labels: the collator must return labels (e.g. "
              "DataCollatorForLanguageModeling(mlm=False) or DataCollatorWithFlattening)")
        _, _, out, maybe = self._forward(model, inputs)
        lo = cast(LossOutput, maybe)  # labels were given
        loss = lo.loss
        share = lo.value
        if num_items_in_batch is not None:
            # lo.loss = local_sum * dp * sp / tokens: renormalise from this batch's tokens to the window's
            scale = lo.tokens.clamp(min=1) / torch.as_tensor(num_items_in_batch, dtype=torch.float64,
                                                             device=lo.tokens.device).clamp(min=1)
            loss = loss * scale.to(loss.dtype)
            share = share * scale
        if model.training:
            self._micro_loss = share.detach()
        return (loss, out) if return_outputs else loss

    def training_step(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """HF's step (forward, backward); returns this micro-batch's share of the *global* loss (every rank)."""
        self._micro_loss = None
        local = super().training_step(*args, **kwargs)  # type: ignore[misc]
        if self._micro_loss is None:  # a subclass computed its own loss: HF's (this rank's) value
            return local
        return self._micro_loss.to(device=self.args.device, dtype=torch.float32)

    # ---- evaluation and prediction -----------------------------------------------------------

    def evaluation_loop(self, *args: Any, **kwargs: Any) -> Any:
        self._check_batch_once = True
        if self.mesh.sp > 1:  # HF resets gather_function to accelerate's at the end of every loop
            self.gather_function = self._gather_over_dp
        return super().evaluation_loop(*args, **kwargs)  # type: ignore[misc]

    def train(self, *args: Any, **kwargs: Any) -> Any:
        self._check_batch_once = True
        return super().train(*args, **kwargs)  # type: ignore[misc]

    def prediction_step(self, model: Any, inputs: dict[str, Any], prediction_loss_only: bool,
                        ignore_keys: list[str] | None = None) -> tuple[Any, Any, Any]:
        """(global token-mean loss of the global batch, full logits ``[B, S, V]`` in order, labels)."""
        inputs = self._prepare_inputs(inputs)  # type: ignore[attr-defined]
        with torch.no_grad(), self.compute_loss_context_manager():  # type: ignore[attr-defined]
            seq, local, out, lo = self._forward(model, inputs)
        loss = None if lo is None else lo.value.to(torch.float32)
        if prediction_loss_only:
            return loss, None, None
        logits = unshard(out.logits.detach(), 1, layout=self.seqpar_layout, mesh=self.mesh,
                         seq_info=local[INFO_KEY])
        return loss, seq.rows(logits), inputs.get("labels")

    def _gather_over_dp(self, data: Any) -> Any:
        """accelerate's ``gather_for_metrics`` over dp only: sp ranks hold the same samples."""
        from accelerate.utils import recursively_apply

        group, n = self.mesh.dp_group, self.mesh.dp

        def one(t: torch.Tensor) -> torch.Tensor:
            t = t.contiguous() if t.dim() else t[None]
            if n == 1:
                return t
            parts = [torch.empty_like(t) for _ in range(n)]
            dist.all_gather(parts, t, group=group)
            return torch.cat(parts)

        try:
            out = recursively_apply(one, data, error_on_other_type=True)
            objects = False
        except TypeError:
            gathered: list[Any] = [None] * n
            dist.all_gather_object(gathered, data, group=group)
            out, objects = [x for part in gathered for x in part], True
        state = self.accelerator.gradient_state  # type: ignore[attr-defined]
        if state.end_of_dataloader and state.remainder > 0:  # even_batches repeated samples to fill the last batch
            keep = state.remainder
            return out[:keep] if objects else recursively_apply(lambda t: t[:keep], out)
        return out


def _check_same_batch(seq: SequenceBatch, mesh: Mesh) -> None:
    """Every rank of each sp group holds the same batch (one small all-reduce over sp, read on the host).

    Different batches would make the ranks shard different sequences: wrong gradients, or a hang.
    """
    if mesh.sp == 1:
        return
    ids = seq.tensors["input_ids"]
    weights = torch.arange(ids.numel(), device=ids.device, dtype=torch.long) % 8191 + 1
    fingerprint = torch.stack([torch.tensor(ids.numel(), device=ids.device), (ids.flatten() * weights).sum()])
    both = torch.cat([fingerprint, -fingerprint])
    reduce_in_place(both, mesh.sp_group, "max")
    check(bool((both[:2] == -both[2:]).all()), ConfigError,
          "the ranks of a sequence-parallel group got different batches: every rank of an sp group must load the "
          "same samples (seed any shuffling, e.g. TrainingArguments(seed=..., data_seed=...); an IterableDataset "
          "must yield the same order on every rank)")


def _shard_loaders_over_dp(accelerator: Any, mesh: Mesh) -> None:
    """Make ``accelerator.prepare`` shard DataLoaders over dp instead of every process.

    accelerate splits each loader into one shard per process; the sp ranks of a group must read
    the same shard, so they take the shard of their dp rank.  This is accelerate's own
    ``prepare_data_loader`` with ``dp`` processes (same samplers, seeds and ``even_batches``), set on
    this accelerator instance only.  Batches are never dispatched from rank 0 (each dp group reads
    its own, an IterableDataset through accelerate's ``IterableDatasetShard``).
    """
    from accelerate.data_loader import prepare_data_loader

    def prepare(data_loader: Any, device_placement: bool | None = None, slice_fn_for_dispatch: Any = None) -> Any:
        if getattr(data_loader, "_is_accelerate_prepared", False):
            return data_loader
        if device_placement is None:
            device_placement = accelerator.device_placement
        prepared = prepare_data_loader(
            data_loader, accelerator.device, num_processes=mesh.dp, process_index=mesh.rank("dp"),
            split_batches=accelerator.split_batches, put_on_device=device_placement,
            rng_types=accelerator.rng_types.copy(), dispatch_batches=False, even_batches=accelerator.even_batches,
            use_seedable_sampler=accelerator.use_seedable_sampler, data_seed=accelerator.dataloader_config.data_seed,
            non_blocking=accelerator.non_blocking, use_stateful_dataloader=accelerator.use_stateful_dataloader)
        accelerator._dataloaders.append(prepared)  # what Accelerator.prepare_data_loader records (save_state)
        return prepared

    accelerator.prepare_data_loader = prepare


class Trainer(SeqParTrainerMixin, transformers.Trainer):
    """``transformers.Trainer`` with sequence parallelism: the usual arguments plus ``sp=``, ``ulysses=``,
    ``strategy=``, ``layout=`` (or ``mesh=``).  See :mod:`seqpar.integrations.hf_trainer`."""


def _sft_trainer() -> type:
    """The seqpar mixin on TRL's SFTTrainer (built on first use: importing seqpar needs no trl)."""
    try:
        import trl
    except ImportError as e:
        raise ImportError("seqpar.integrations.hf.SFTTrainer needs TRL: pip install trl") from e

    class SFTTrainer(SeqParTrainerMixin, trl.SFTTrainer):  # type: ignore[misc]
        """TRL's ``SFTTrainer`` with sequence parallelism: the usual arguments plus ``sp=``, ``ulysses=``,
        ``strategy=``, ``layout=`` (or ``mesh=``).  Packing and ``padding_free`` give ``position_ids``
        restarting at every document, which seqpar turns into ``cu_seqlens``.  The loss is seqpar's (TRL's
        fused LM head sees one shard); TRL's ``entropy``, ``mean_token_accuracy`` and ``num_tokens`` are
        computed exactly from the shards."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            loss_type = getattr(self.args, "loss_type", "nll")
            check(loss_type == "nll", ConfigError,
                  f"loss_type={loss_type!r} is not supported by the seqpar SFTTrainer: its loss is "
                  f"seqpar.train.causal_lm_loss (loss_type='nll')")
            check(not getattr(self, "aux_loss_enabled", False), ConfigError,
                  "MoE router auxiliary losses are not supported by the seqpar SFTTrainer: set the model config's "
                  "output_router_logits=False")

        def _record_metrics(self, seq: SequenceBatch, outputs: Any, labels: torch.Tensor, lo: LossOutput) -> None:
            if outputs is None:  # loss_chunk: no logits to measure; tokens are still counted
                self._count_train_tokens(seq)
                return
            # TRL's definitions over the tokens with a target: softmax entropy and top-1 accuracy, exact over dp x sp
            with torch.no_grad():
                logp = torch.log_softmax(outputs.logits.float(), dim=-1)
                valid = labels != -100
                entropy = -(logp.exp() * logp).sum(-1)
                top1 = (logp.argmax(-1) == labels) & valid
                sums = torch.stack([(entropy * valid).sum().double(), top1.sum().double()])
                reduce_in_place(sums, self.mesh.dp_sp_group)
            n = float(lo.tokens)
            mode = "train" if getattr(self.model, "training", False) else "eval"
            self._metrics[mode]["entropy"].append(float(sums[0]) / n if n else 0.0)
            self._metrics[mode]["mean_token_accuracy"].append(float(sums[1]) / n if n else 0.0)
            if mode == "train":
                self._count_train_tokens(seq)
            self._metrics[mode]["num_tokens"] = [self._total_train_tokens]

        def _count_train_tokens(self, seq: SequenceBatch) -> None:
            # tokens fed to the model (TRL: mask sum, or the flattened length), each group once
            fed = seq.real_tokens.clone()
            self._total_train_tokens += int(reduce_in_place(fed, self.mesh.dp_group).item())
            self._metrics["train"]["num_tokens"] = [self._total_train_tokens]

    return SFTTrainer


def __getattr__(name: str) -> Any:
    if name == "SFTTrainer":
        cls = _sft_trainer()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
