"""The training loop behind ``seqpar demo`` and ``seqpar train``: one code path for both.

Every rank builds the same global batch for a step (:mod:`seqpar.train.data`), keeps its
data-parallel rows and its sequence shard, runs the reference model, and
reduces gradients over dp x sp (:func:`seqpar.train.sync_gradients`).  The
reported loss is the exact global token mean, so a run at any parallel layout
can be compared with one process.
"""
from __future__ import annotations

import dataclasses
import math
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from ..core import layout as layout_mod
from ..core.configs import get_config
from ..core.errors import CommError, ConfigError, SeqParError, ShapeError, check
from ..core.mesh import Mesh, init
from ..models import LlamaForCausalLM
from ..models.recompute import MemoryConfig
from ..tp._base import skip_init
from ..tp.cross_entropy import vocab_parallel_argmax
from .data import make_data
from .fsdp import check_zero_stage, clip_gradients, reduce_gradients, shard_model
from .loss import IGNORE, causal_lm_loss, global_token_mean

__all__ = ["TrainConfig", "TrainResult", "train"]

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class TrainConfig:
    """Everything a run needs; ``seqpar train`` reads it from TOML or YAML (same keys)."""

    model: str | dict = "tiny"
    strategy: str = "ring"
    layout: str = "zigzag"
    tp: int = 1
    ulysses: int = 1
    dp: int | None = None
    sequence_parallel: bool = True
    seq_len: int = 256
    micro_batch: int = 8  # sequences per data-parallel rank per step
    steps: int = 300
    lr: float = 3e-3
    warmup: int = 20
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    data: dict = field(default_factory=lambda: {"kind": "recall", "pairs": 8})
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    checkpoint_dir: str | None = None
    save_every: int = 0
    log_every: int = 10
    eval_batches: int = 2
    peak_tflops: float | None = None  # per device, for the MFU estimate (989 for an H100 in bf16)
    timeout: float = 600.0  # seconds a collective may wait before the run fails (when seqpar starts the group)
    # memory beyond attention (seqpar.models.recompute, seqpar.train.fsdp); none changes the results
    recompute: str = "none"  # "none" | "selective" | "full"
    offload: bool = False  # recompute="full": checkpointed layer inputs in host memory
    checkpoint_every: int = 1  # recompute="full": checkpoint every k-th layer's input (chains of k layers)
    mlp_tiles: int = 1  # each MLP block over this many sequence tiles
    loss_chunk: int = 0  # > 0: the loss from the hidden states, this many tokens at a time (no logits)
    zero_stage: int = 0  # 0, 2 or 3: FSDP2 over dp x sp for 2 and 3
    offload_optimizer: bool = False  # zero_stage 2/3: sharded params, grads, optimizer state in host memory

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        check(not unknown, ConfigError, f"unknown config keys {unknown}: known keys are {sorted(names)}")
        cfg = cls(**d)
        check(cfg.dtype in DTYPES, ConfigError, f"dtype={cfg.dtype!r}: use one of {sorted(DTYPES)}")
        check(cfg.device in ("cpu", "cuda"), ConfigError, f"device={cfg.device!r}: use 'cpu' or 'cuda'")
        check(cfg.steps >= 1 and cfg.micro_batch >= 1 and cfg.seq_len >= 2, ConfigError,
              "steps, micro_batch must be >= 1 and seq_len >= 2")
        get_config(cfg.model)  # names a missing key or an unknown model now, not on every rank later
        cfg.memory()  # names a bad memory setting now
        check_zero_stage(cfg.zero_stage, cfg.offload_optimizer)
        check(isinstance(cfg.loss_chunk, int) and cfg.loss_chunk >= 0, ConfigError,
              f"loss_chunk={cfg.loss_chunk!r}: tokens per loss chunk, a positive int (0: the loss from the logits)")
        return cfg

    def memory(self) -> MemoryConfig:
        """The model's memory settings (raises ConfigError naming a bad one)."""
        return MemoryConfig(recompute=self.recompute, offload=self.offload, mlp_tiles=self.mlp_tiles,
                            checkpoint_every=self.checkpoint_every)

    @classmethod
    def load(cls, path: str | Path) -> TrainConfig:
        """Read a ``.toml`` or ``.yaml``/``.yml`` file."""
        path = Path(path)
        check(path.is_file(), ConfigError, f"config file {str(path)!r} does not exist")
        text = path.read_text()
        if path.suffix == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib
            return cls.from_dict(tomllib.loads(text))
        if path.suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ModuleNotFoundError as e:
                raise ConfigError("YAML configs need PyYAML: pip install pyyaml, or use TOML") from e
            return cls.from_dict(yaml.safe_load(text) or {})
        raise ConfigError(f"config {str(path)!r}: use a .toml or .yaml file")


@dataclass
class TrainResult:
    losses: list[float]
    accuracy: float
    tokens_per_s: float
    peak_mem_mb: list[float]  # per rank
    world_size: int
    mfu: float | None = None


def _peak_mem_mb(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _lr(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up, then cosine decay to 10%."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * t)))


def _flops_per_token(model: LlamaForCausalLM, seq_len: int) -> float:
    """6N for the matmuls plus causal attention (6 * L * h * S, half of the dense 12 L h S)."""
    n = sum(p.numel() for p in model.parameters()) * model.mesh.tp
    c = model.config
    return 6 * n + 6 * c.num_layers * c.num_attention_heads * c.head_dim * seq_len


def _local_batch(data, cfg: TrainConfig, mesh: Mesh, step: int, device, vocab: int):
    ids, labels = data.batch(step, cfg.micro_batch * mesh.dp)
    # every rank reads the whole global batch: checked here, a bad id fails on every rank alike, before
    # the embedding of the one rank holding it would raise while the others wait in a collective
    lo, hi = int(ids.min()), int(ids.max())
    check(0 <= lo and hi < vocab, ShapeError,
          f"step {step + 1}: token ids span [{lo}, {hi}] but the model's vocabulary is [0, {vocab}): the data "
          f"was tokenized for another vocabulary (check data.path / data.dtype and model.vocab_size)")
    rows = slice(mesh.rank("dp") * cfg.micro_batch, (mesh.rank("dp") + 1) * cfg.micro_batch)
    ids_l = layout_mod.shard(ids[rows], 1, layout=cfg.layout, mesh=mesh)
    labels_l = layout_mod.shard(labels[rows], 1, layout=cfg.layout, mesh=mesh, pad_value=IGNORE)
    return ids_l.to(device), labels_l.to(device)


def _accuracy(model, data, cfg, mesh, device) -> float:
    """Token accuracy on fresh batches (exact over the whole dp x sp x tp layout)."""
    correct = total = 0.0
    with torch.no_grad():
        for i in range(cfg.eval_batches):
            ids, labels = _local_batch(data, cfg, mesh, 10**9 + i, device, model.config.vocab_size)
            pred = vocab_parallel_argmax(model(ids), group=mesh.tp_group)
            valid = labels != IGNORE
            stats = torch.tensor([float(((pred == labels) & valid).sum()), float(valid.sum())])
            if mesh.dp_sp_group is not None:
                dist.all_reduce(stats, group=mesh.dp_sp_group)
            correct, total = correct + stats[0].item(), total + stats[1].item()
    return correct / max(total, 1.0)


def _step(model, opt, data, cfg: TrainConfig, mesh: Mesh, step: int, device) -> float:
    ids, labels = _local_batch(data, cfg, mesh, step, device, model.config.vocab_size)
    for g in opt.param_groups:
        g["lr"] = _lr(cfg, step)
    if cfg.loss_chunk:
        out = global_token_mean(model(ids, labels=labels, loss_chunk=cfg.loss_chunk), labels, mesh)
    else:
        out = causal_lm_loss(model(ids), labels, mesh)
    out.loss.backward()
    reduce_gradients(model, mesh)  # FSDP or not
    if cfg.grad_clip:
        clip_gradients(model, cfg.grad_clip, mesh)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(out.value)


def train(cfg: TrainConfig, *, mesh: Mesh | None = None,
          log: Callable[[dict], None] | None = None) -> TrainResult:
    """Train the reference model on the current world (or ``mesh``) and return the result.

    Every rank must call it (``log`` may be given on rank 0 only).  ``log`` (called on global
    rank 0 every ``log_every`` steps) receives ``{"step", "steps", "loss", "tokens_per_s", "peak_mem_mb"}``.
    """
    if mesh is None:
        world = dist.get_world_size() if dist.is_initialized() else 1
        check(world % (cfg.tp * cfg.ulysses) == 0, ConfigError,
              f"tp={cfg.tp} x ulysses={cfg.ulysses} does not divide the world size {world}")
        mesh = init(tp=cfg.tp, dp=cfg.dp, ulysses=cfg.ulysses, timeout=cfg.timeout)
    device = torch.device(cfg.device if cfg.device == "cpu" else f"cuda:{torch.cuda.current_device()}")
    with skip_init():  # init_weights draws the same weights at every layout
        model = LlamaForCausalLM(cfg.model, mesh=mesh, strategy=cfg.strategy, layout=cfg.layout,
                                 sequence_parallel=cfg.sequence_parallel, dtype=DTYPES[cfg.dtype], device=device,
                                 **dataclasses.asdict(cfg.memory()))
    model.init_weights(cfg.seed)
    if cfg.zero_stage:
        shard_model(model, mesh, zero_stage=cfg.zero_stage, offload_optimizer=cfg.offload_optimizer)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    data = make_data(cfg.data, model.config.vocab_size, cfg.seq_len, cfg.seed)
    start = 0
    if cfg.checkpoint_dir:
        from .checkpoint import load_latest

        start = load_latest(cfg.checkpoint_dir, model, opt)
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    losses, t_start, tokens = [], time.perf_counter(), 0
    tokens_per_step = cfg.micro_batch * mesh.dp * cfg.seq_len
    for step in range(start, cfg.steps):
        try:
            losses.append(_step(model, opt, data, cfg, mesh, step, device))
        except SeqParError:
            raise
        except RuntimeError as e:  # gloo/NCCL errors: a peer died or a collective timed out
            rank = dist.get_rank() if dist.is_initialized() else 0
            raise CommError(f"training step {step + 1} failed on rank {rank}: {e} -- a peer rank died or a "
                            f"collective timed out (timeout {cfg.timeout:.0f} s)") from e
        tokens += tokens_per_step
        if cfg.checkpoint_dir and cfg.save_every and (step + 1) % cfg.save_every == 0:
            from .checkpoint import save

            save(cfg.checkpoint_dir, model, opt, step + 1)
        if (cfg.log_every and (step + 1) % cfg.log_every == 0) or step + 1 == cfg.steps:
            mem = _gather_mem(cfg.device)  # a collective: every rank joins, whether or not it logs
            if rank0 and log is not None:
                log({"step": step + 1, "steps": cfg.steps, "loss": losses[-1],
                     "tokens_per_s": tokens / (time.perf_counter() - t_start), "peak_mem_mb": mem})
    elapsed = time.perf_counter() - t_start
    acc = _accuracy(model, data, cfg, mesh, device)
    tps = tokens / elapsed if elapsed > 0 else 0.0
    mfu = None
    if cfg.peak_tflops:
        mfu = tps * _flops_per_token(model, cfg.seq_len) / (cfg.peak_tflops * 1e12 * max(1, mesh.world_size))
    return TrainResult(losses, acc, tps, _gather_mem(cfg.device), mesh.world_size, mfu)


def _gather_mem(device: str) -> list[float]:
    mine = torch.tensor([_peak_mem_mb(device)], dtype=torch.float64)
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [mine.item()]
    out = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(out, mine)
    return [t.item() for t in out]
