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
import os
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from ..core import layout as layout_mod
from ..core.comm import reduce_in_place
from ..core.configs import FIELD_NAMES, get_config
from ..core.errors import CommError, ConfigError, SeqParError, ShapeError, check
from ..core.layout import LAYOUTS
from ..core.mesh import Mesh, init
from ..core.recompute import MemoryConfig
from ..core.strategies import SP_STRATEGIES
from ..models import LlamaForCausalLM
from ..tp import skip_init
from ..tp.cross_entropy import vocab_parallel_argmax
from .data import make_data
from .fsdp import check_zero_stage, clip_gradients, reduce_gradients, shard_model
from .loss import IGNORE, causal_lm_loss, global_token_mean
from .metrics import MetricsWriter

__all__ = ["TrainConfig", "TrainResult", "train"]

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}

#: keys a [model] table may hold: ModelConfig's own fields, and the Hugging Face / GPT-2 config.json
#: spellings that ModelConfig.from_mapping reads
MODEL_KEYS = frozenset(FIELD_NAMES) | {
    "num_hidden_layers", "intermediate_size", "n_embd", "d_model", "n_head", "num_heads", "n_layer", "n_inner",
    "num_query_groups", "n_kv_head", "kv_channels", "tie_word_embeddings", "rotary_emb_base", "rotary_base",
    "n_positions", "n_ctx", "_name_or_path", "model_type", "hidden_act", "activation_function",
    "hidden_activation", "activation", "rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon", "layernorm_epsilon",
    "attention_dropout", "hidden_dropout", "attn_pdrop", "resid_pdrop", "embd_pdrop", "hidden_dropout_prob",
    "attention_probs_dropout_prob", "attention_bias", "add_bias_linear", "mlp_bias"}


@dataclass
class TrainConfig:
    """Everything a run needs; ``seqpar train`` reads it from TOML or YAML (same keys).

    Attributes:
        model: a registered name (``tiny``, ``llama3-8b``...) or a table of Hugging Face
            ``config.json`` sizes (``hidden_size``, ``num_attention_heads``, ``num_hidden_layers``...).
        strategy: sequence-parallel attention: ``ring``, ``ulysses``, ``allgather``, ``usp`` or ``ring_qk_av``.
        layout: which tokens each sp rank holds: ``zigzag`` (balanced causal work), ``contiguous`` or ``stripe``.
        tp: tensor-parallel degree (Megatron); the rest of the world is dp x sp.
        ulysses: Ulysses degree inside sp (``strategy = "usp"``); the ring takes the rest of sp.
        dp: data-parallel degree; unset: 1, and sp takes the whole world left after tp.
        sequence_parallel: with ``tp > 1``, Megatron sequence parallelism (norms and residuals on sequence shards).
        seq_len: tokens per sequence, the whole sequence (split over the sp ranks).
        micro_batch: sequences per data-parallel rank per step.
        steps: optimizer steps of the whole run (a resumed run continues up to it).
        lr: peak AdamW learning rate (betas 0.9, 0.95): linear warm-up, then cosine decay to 10%.
        warmup: steps of linear warm-up.
        weight_decay: AdamW weight decay.
        grad_clip: clip the global gradient norm (over every rank) to this; 0 turns clipping off.
        data: the data table: ``{kind = "recall", pairs = 8}`` (synthetic associative recall across the
            sequence) or ``{kind = "tokens", path = "tokens.bin", dtype = "uint16"}`` (a memory-mapped file of
            token ids: uint16, uint32 or int32).
        seed: seeds the weights and the data, identically at every parallel layout.
        device: ``cpu`` or ``cuda`` (under torchrun each rank takes ``cuda:LOCAL_RANK``).
        dtype: parameters and activations: ``float32``, ``bfloat16``, ``float16`` or ``float64``.
        checkpoint_dir: where checkpoints are written; a run resumes from the latest one there, at any layout.
        save_every: save a checkpoint every this many steps (0: never).
        log_every: log on rank 0 every this many steps.
        eval_batches: batches of the token-accuracy evaluation at the end.
        peak_tflops: per-device peak, for the MFU estimate (989 for an H100 in bf16); unset: no MFU.
        timeout: seconds a collective may wait before the run fails (when seqpar starts the process group).
        recompute: activation recomputation: ``none``, ``selective`` (norms and the SwiGLU product replayed
            in backward) or ``full`` (each layer replayed from its input).  None of the memory settings
            changes the results.
        offload: with ``recompute = "full"``, the checkpointed layer inputs wait in host memory (copied on a
            side stream on CUDA, prefetched one layer ahead in backward).
        checkpoint_every: with ``recompute = "full"``, checkpoint every k-th layer's input and replay chains
            of k layers (k times fewer checkpoints).
        mlp_tiles: each MLP block (its norm and the MLP) over this many sequence tiles (1: off).
        loss_chunk: > 0: the loss from the final hidden states in chunks of this many tokens, the logits
            never held (0: the loss from the logits).
        zero_stage: 0 (replicated), 2 or 3: FSDP2 over dp x sp (3 also frees each layer's gathered weights
            after its forward).
        offload_optimizer: with ``zero_stage`` 2 or 3, the sharded weights, gradients and optimizer state in
            host memory (AdamW steps on the CPU).
    """

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
    save_every: int = 0  # also saved at the last step whenever checkpoint_dir is set
    log_dir: str | None = None  # metrics.jsonl and TensorBoard events; default: checkpoint_dir
    log_every: int = 10
    eval_batches: int = 2
    peak_tflops: float | None = None  # per device, for the MFU estimate (989 for an H100 in bf16)
    timeout: float = 600.0  # seconds a collective may wait before the run fails (when seqpar starts the group)
    # memory beyond attention (seqpar.core.recompute, seqpar.train.fsdp); none changes the results
    recompute: str = "none"  # "none" | "selective" | "full"
    offload: bool = False  # recompute="full": checkpointed layer inputs in host memory
    checkpoint_every: int = 1  # recompute="full": checkpoint every k-th layer's input (chains of k layers)
    mlp_tiles: int = 1  # each MLP block over this many sequence tiles
    loss_chunk: int = 0  # > 0: the loss from the hidden states, this many tokens at a time (no logits)
    zero_stage: int = 0  # 0, 2 or 3: FSDP2 over dp x sp for 2 and 3
    offload_optimizer: bool = False  # zero_stage 2/3: sharded params, grads, optimizer state in host memory

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        """Validate every key and value of a config mapping (the tables of a TOML/YAML file).

        Raises ConfigError naming an unknown key of any table (with the known ones), a bad value, an
        unknown model, strategy or layout, a missing token file, or ``device = "cuda"`` without CUDA.
        """
        check(isinstance(d, dict), ConfigError, f"a config is a mapping of keys, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        check(not unknown, ConfigError, f"unknown config keys {unknown}: known keys are {sorted(names)}")
        if isinstance(d.get("model"), dict):
            bad = sorted(set(d["model"]) - MODEL_KEYS)
            check(not bad, ConfigError, f"unknown key(s) {bad} in [model]: use Hugging Face config.json names "
                                        f"{sorted(MODEL_KEYS - set(FIELD_NAMES))} or {sorted(FIELD_NAMES)}")
        try:
            cfg = cls(**d)
        except TypeError as e:
            raise ConfigError(f"config: {e}") from None
        _validate(cfg)
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
            if sys.version_info >= (3, 11):
                import tomllib
            else:  # Python 3.10: the same parser, from PyPI (a dependency there)
                import tomli as tomllib
            try:
                mapping = tomllib.loads(text)
            except tomllib.TOMLDecodeError as e:
                raise ConfigError(f"config file {str(path)!r} is not valid TOML: {e}") from None
            return cls.from_dict(mapping)
        if path.suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ModuleNotFoundError as e:
                raise ConfigError("YAML configs need PyYAML: pip install pyyaml, or use TOML") from e
            try:
                mapping = yaml.safe_load(text) or {}
            except yaml.YAMLError as e:
                raise ConfigError(f"config file {str(path)!r} is not valid YAML: {e}") from None
            return cls.from_dict(mapping)
        raise ConfigError(f"config {str(path)!r}: use a .toml or .yaml file")


def _positive_int(cfg: TrainConfig, name: str, low: int) -> None:
    value = getattr(cfg, name)
    check(isinstance(value, int) and not isinstance(value, bool) and value >= low, ConfigError,
          f"{name} = {value!r} must be an integer >= {low}")


def _validate(cfg: TrainConfig) -> None:
    """Each value named with its fix, on every rank alike, before any process group or collective."""
    for name, low in (("steps", 1), ("micro_batch", 1), ("seq_len", 2), ("tp", 1), ("ulysses", 1),
                      ("save_every", 0), ("log_every", 0), ("warmup", 0), ("eval_batches", 0), ("seed", 0)):
        _positive_int(cfg, name, low)
    if cfg.dp is not None:
        _positive_int(cfg, "dp", 1)
    check(cfg.dtype in DTYPES, ConfigError, f"dtype={cfg.dtype!r}: use one of {sorted(DTYPES)}")
    check(cfg.device in ("cpu", "cuda"), ConfigError, f"device={cfg.device!r}: use 'cpu' or 'cuda'")
    check(cfg.device != "cuda" or torch.cuda.is_available(), ConfigError,
          f"device = 'cuda' but this machine has no CUDA device (torch {torch.__version__}, "
          f"torch.cuda.is_available() is False): use device = 'cpu', or run where a GPU and a CUDA build of torch are")
    check(cfg.strategy in SP_STRATEGIES, ConfigError,
          f"strategy = {cfg.strategy!r}: use one of {', '.join(SP_STRATEGIES)}")
    check(cfg.layout in LAYOUTS, ConfigError, f"layout = {cfg.layout!r}: use one of {', '.join(LAYOUTS)}")
    check(isinstance(cfg.lr, (int, float)) and cfg.lr > 0, ConfigError, f"lr = {cfg.lr!r} must be a number > 0")
    for name in ("checkpoint_dir", "log_dir"):
        value = getattr(cfg, name)
        check(value is None or isinstance(value, str), ConfigError, f"{name} = {value!r} must be a path (a string)")
    model = get_config(cfg.model)  # names a missing key or an unknown model now, not on every rank later
    make_data(cfg.data, model.vocab_size, cfg.seq_len, cfg.seed)  # unknown keys, bad values, a missing file
    cfg.memory()  # names a bad memory setting now
    check_zero_stage(cfg.zero_stage, cfg.offload_optimizer)
    check(isinstance(cfg.loss_chunk, int) and not isinstance(cfg.loss_chunk, bool) and cfg.loss_chunk >= 0,
          ConfigError, f"loss_chunk={cfg.loss_chunk!r}: tokens per loss chunk, a positive int (0: the loss from "
          f"the logits)")


@dataclass
class TrainResult:
    losses: list[float]
    accuracy: float
    tokens_per_s: float
    peak_mem_mb: list[float]  # per rank
    world_size: int
    mfu: float | None = None
    start_step: int = 0  # the checkpoint's step the run resumed from (0: a fresh run)
    steps: int = 0  # the step the run ended at (cfg.steps)

    @property
    def finished_before(self) -> bool:
        """The checkpoint was already at (or past) ``steps``: nothing was trained."""
        return self.start_step >= self.steps and not self.losses


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
            reduce_in_place(stats, mesh.dp_sp_group)
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


def _world_size() -> int:
    """The world this run will have: the process group's, else torchrun's ``WORLD_SIZE`` (read before the
    group exists, so a layout that does not fit fails on every rank before any rendezvous), else 1."""
    if dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def _save_due(cfg: TrainConfig, step: int) -> bool:
    """Save after ``step`` (1-based): every ``save_every`` steps, and always after the last one."""
    return bool(cfg.checkpoint_dir) and ((cfg.save_every > 0 and step % cfg.save_every == 0) or step == cfg.steps)


def train(cfg: TrainConfig, *, mesh: Mesh | None = None, log: Callable[[dict], None] | None = None,
          on_step: Callable[[dict], None] | None = None) -> TrainResult:
    """Train the reference model on the current world (or ``mesh``) and return the result.

    Every rank must call it (``log`` and ``on_step`` may be given on rank 0 only; they are called on
    global rank 0).  ``log``, every ``log_every`` steps and at the last one, receives ``{"step", "steps",
    "loss", "lr", "tokens_per_s", "elapsed_s", "peak_mem_mb"}`` (peak memory per rank, gathered: a
    collective every rank joins); ``on_step``, after every step, the same without ``peak_mem_mb`` (no
    communication), plus ``step_time_s``.  With ``checkpoint_dir`` the run resumes from its latest
    checkpoint, saves every ``save_every`` steps and after the last step; a run whose checkpoint is
    already at ``steps`` trains nothing (``result.finished_before``).  Metrics go to
    ``log_dir`` (default ``checkpoint_dir``): ``metrics.jsonl`` and TensorBoard events
    (:class:`~seqpar.train.metrics.MetricsWriter`).
    """
    if mesh is None:
        world = _world_size()
        check(world % (cfg.tp * cfg.ulysses) == 0, ConfigError,
              f"tp={cfg.tp} x ulysses={cfg.ulysses} does not divide the world size {world}: launch a multiple of "
              f"{cfg.tp * cfg.ulysses} ranks (torchrun --nproc-per-node) or lower tp / ulysses")
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
    log_dir = cfg.log_dir or cfg.checkpoint_dir
    writer = MetricsWriter(log_dir, start) if rank0 and log_dir and start < cfg.steps else None
    try:
        losses, elapsed, tokens = _loop(model, opt, data, cfg, mesh, device, start, writer,
                                        log if rank0 else None, on_step if rank0 else None)
    finally:
        if writer is not None:
            writer.close()
    acc = _accuracy(model, data, cfg, mesh, device)
    tps = tokens / elapsed if elapsed > 0 else 0.0
    mfu = None
    if cfg.peak_tflops and losses:
        mfu = tps * _flops_per_token(model, cfg.seq_len) / (cfg.peak_tflops * 1e12 * max(1, mesh.world_size))
    return TrainResult(losses, acc, tps, _gather_mem(cfg.device), mesh.world_size, mfu, start, cfg.steps)


def _loop(model, opt, data, cfg: TrainConfig, mesh: Mesh, device, start: int, writer: MetricsWriter | None,
          log, on_step) -> tuple[list[float], float, int]:
    """Steps ``start .. cfg.steps - 1``: train, save, report.  Returns (losses, seconds, tokens)."""
    losses: list[float] = []
    t_start, tokens = time.perf_counter(), 0
    tokens_per_step = cfg.micro_batch * mesh.dp * cfg.seq_len
    for step in range(start, cfg.steps):
        t_step = time.perf_counter()
        try:
            losses.append(_step(model, opt, data, cfg, mesh, step, device))
        except SeqParError:
            raise
        except RuntimeError as e:  # gloo/NCCL errors: a peer died or a collective timed out
            rank = dist.get_rank() if dist.is_initialized() else 0
            raise CommError(f"training step {step + 1} failed on rank {rank}: {e} -- a peer rank died or a "
                            f"collective timed out (timeout {cfg.timeout:.0f} s)") from e
        tokens += tokens_per_step
        now = time.perf_counter()
        if cfg.checkpoint_dir and _save_due(cfg, step + 1):
            from .checkpoint import save

            save(cfg.checkpoint_dir, model, opt, step + 1)
        info: dict = {"step": step + 1, "steps": cfg.steps, "loss": losses[-1], "lr": _lr(cfg, step),
                "tokens_per_s": tokens / (now - t_start), "elapsed_s": now - t_start}
        if on_step is not None:
            on_step({**info, "step_time_s": now - t_step})
        if (cfg.log_every and (step + 1) % cfg.log_every == 0) or step + 1 == cfg.steps:
            info["peak_mem_mb"] = _gather_mem(cfg.device)  # a collective: every rank joins, whether or not it logs
            if log is not None:
                log(info)
        if writer is not None:
            writer.write(info)
    return losses, time.perf_counter() - t_start, tokens


def _gather_mem(device: str) -> list[float]:
    mine = torch.tensor([_peak_mem_mb(device)], dtype=torch.float64)
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [mine.item()]
    out = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(out, mine)
    return [t.item() for t in out]
