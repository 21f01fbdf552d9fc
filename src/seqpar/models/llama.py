"""A Llama-style decoder built only from seqpar's parts, unchanged at every parallel degree.

RMSNorm, RoPE on global position ids, GQA attention through :func:`seqpar.attention`
(any strategy), SwiGLU MLP, tied or untied embeddings.  Parallelism comes from
the mesh: ``tp`` splits heads and FFN columns (Megatron), ``sequence_parallel``
keeps norms and residuals on ``[B, S/(sp*t), h]`` shards, ``sp`` splits the
sequence for attention (ring / ulysses / usp / allgather), ``dp`` splits the batch.

Token layout: the caller shards ``input_ids`` over the sp group with
:func:`seqpar.shard` (``[B, S/sp]`` in ``layout`` order); with sequence
parallelism the embedding's reduce-scatter cuts that shard contiguously over tp.

Memory settings (:class:`~seqpar.core.recompute.MemoryConfig`, all exact): activation recomputation
(``recompute="none" | "selective" | "full"``, optional host ``offload`` of the checkpointed layer
inputs, ``checkpoint_every`` k-th layer), ``mlp_tiles`` (each MLP block over sequence tiles), and
``forward(ids, labels=...)``, which computes per-token losses from the final hidden states in token
chunks (:func:`seqpar.tp.vocab_parallel_linear_cross_entropy`) without ever holding the logits.

Fused projections, arranged so a column split over tp gives each rank whole
heads: ``qkv`` rows are ordered per kv group ``[q heads of the group, k, v]``
(each rank gets Hkv/t groups), ``gate_up`` rows per tp rank ``[gate_r, up_r]``.
:meth:`LlamaForCausalLM.load_full_state_dict` / :meth:`full_state_dict`
convert from / to the single-device names (q_proj, k_proj, v_proj, gate, up...).
"""
from __future__ import annotations

import zlib
from typing import Any, cast

import torch
from torch import nn

from ..attention import attention
from ..core import comm
from ..core.configs import ModelConfig, get_config
from ..core.errors import ShapeError, check
from ..core.layout import position_ids as layout_position_ids
from ..core.mesh import Mesh, resolve_mesh
from ..core.recompute import MemoryConfig, Offloader, checkpoint, tiled
from ..tp import ColumnParallelLinear, RMSNorm, RowParallelLinear, VocabParallelEmbedding
from ..tp.cross_entropy import DEFAULT_LOSS_CHUNK, vocab_parallel_linear_cross_entropy

__all__ = ["LlamaForCausalLM", "rope"]


class _LazyInit(dict):
    """A state dict whose tensors are drawn on access, each from a generator seeded by its name."""

    def __init__(self, shapes, seed, std, dtype):
        super().__init__()
        self.shapes, self.seed, self.std, self.dtype = shapes, seed, std, dtype

    def __getitem__(self, name):
        shape = self.shapes[name]
        if name.endswith("norm.weight"):
            return torch.ones(shape, dtype=self.dtype)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + zlib.crc32(name.encode()))
        return (torch.randn(shape, generator=g) * self.std).to(self.dtype)


def rope(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary embedding of ``x [B, S, H, D]`` at positions ``pos [S]`` (or ``[B, S]``), rotate-half form."""
    d = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d)
    ang = pos.to(device=x.device, dtype=torch.float32).unsqueeze(-1) * inv  # [.., S, D/2]
    ang = torch.cat([ang, ang], dim=-1)
    cos, sin = ang.cos().unsqueeze(-2), ang.sin().unsqueeze(-2)  # [.., S, 1, D]
    if cos.dim() == 3:
        cos, sin = cos.unsqueeze(0), sin.unsqueeze(0)
    x1, x2 = x.float().chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x.float() * cos + rotated * sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, mesh: Mesh, sp_on: bool, strategy: str, layout: str, kw):
        super().__init__()
        self.h, self.hkv, self.d = cfg.num_attention_heads, cfg.kv_heads, cfg.d
        self.group = self.h // self.hkv
        self.mesh, self.strategy, self.layout, self.theta = mesh, strategy, layout, cfg.rope_theta or 10000.0
        self.name = "attention"  # set to layers.{i}.attn by the model, for error messages
        self.qkv = ColumnParallelLinear(cfg.hidden_size, (self.h + 2 * self.hkv) * self.d, bias=False, mesh=mesh,
                                        sequence_parallel=sp_on, **kw)
        self.o = RowParallelLinear(self.h * self.d, cfg.hidden_size, bias=False, mesh=mesh,
                                   sequence_parallel=sp_on, **kw)

    def forward(self, x, pos, attn_kwargs, cache=None, recompute_core: bool = False):
        y = self.qkv(x)  # [B, S/sp, (Hkv/t) * (g + 2) * D]
        b, s = y.shape[:2]
        y = y.view(b, s, -1, self.group + 2, self.d)
        q = y[..., :self.group, :].reshape(b, s, -1, self.d)
        k, v = y[..., self.group, :], y[..., self.group + 1, :]
        q, k = rope(q, pos, self.theta), rope(k, pos, self.theta)
        if cache is None:
            def core(q, k, v):
                return attention(q, k, v, causal=True, strategy=self.strategy, mesh=self.mesh, layout=self.layout,
                                 name=self.name, **attn_kwargs)
            # selective recomputation replays the core only where it materialises its scores
            replay = recompute_core and self.strategy == "ring_qk_av"
            out = checkpoint(core, q, k, v) if replay else core(q, k, v)
        else:
            # a KV-cache layer (seqpar.inference) keeps the roped k, v of this rank's tokens and attends
            # in its own way: sequence-parallel over the prompt (prefill), lse-merged across ranks (decode)
            out = cache(q, k, v)
        return self.o(out.reshape(b, s, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, mesh: Mesh, sp_on: bool, kw):
        super().__init__()
        self.gate_up = ColumnParallelLinear(cfg.hidden_size, 2 * cfg.ffn_hidden_size, bias=False, mesh=mesh,
                                            sequence_parallel=sp_on, **kw)
        self.down = RowParallelLinear(cfg.ffn_hidden_size, cfg.hidden_size, bias=False, mesh=mesh,
                                      sequence_parallel=sp_on, **kw)

    def forward(self, x, recompute_act: bool = False):
        y = self.gate_up(x)
        return self.down(checkpoint(_swiglu, y) if recompute_act else _swiglu(y))


def _swiglu(y: torch.Tensor) -> torch.Tensor:
    gate, up = y.chunk(2, dim=-1)
    return nn.functional.silu(gate) * up


class Block(nn.Module):
    memory: MemoryConfig

    def __init__(self, cfg, mesh, sp_on, strategy, layout, kw):
        super().__init__()
        eps = getattr(cfg, "norm_eps", None) or 1e-5
        self.attn_norm = RMSNorm(cfg.hidden_size, eps=eps, sequence_parallel=sp_on, **kw)
        self.attn = Attention(cfg, mesh, sp_on, strategy, layout, kw)
        self.mlp_norm = RMSNorm(cfg.hidden_size, eps=eps, sequence_parallel=sp_on, **kw)
        self.mlp = MLP(cfg, mesh, sp_on, kw)
        self.memory = MemoryConfig()  # set by the model (configure_memory)

    def forward(self, x, pos, attn_kwargs, cache=None):
        # selective recomputation: the norms and the SwiGLU product (elementwise, memory-heavy) are
        # replayed in backward; "full" is applied around whole layers by the model, and its replay in
        # backward is selective (the layer's peak there is smaller; the norms are cheap to run twice)
        sel = self.memory.recompute in ("selective", "full") and cache is None
        h = checkpoint(self.attn_norm, x, modules=[self.attn_norm]) if sel else self.attn_norm(x)
        x = x + self.attn(h, pos, attn_kwargs, cache, recompute_core=sel)
        if self.memory.mlp_tiles > 1:
            return x + tiled(self.mlp_block, x, self.memory.mlp_tiles, modules=[self.mlp_norm, self.mlp])
        h = checkpoint(self.mlp_norm, x, modules=[self.mlp_norm]) if sel else self.mlp_norm(x)
        return x + self.mlp(h, recompute_act=sel)

    def mlp_block(self, x: torch.Tensor) -> torch.Tensor:
        """The token-wise part of the layer (its MLP and the norm before it), without the residual."""
        return self.mlp(self.mlp_norm(x))


class LlamaForCausalLM(nn.Module):
    """Llama-style causal LM over whatever mesh it is given (world 1 included).

    Args:
        config: a :class:`~seqpar.configs.ModelConfig` or registered name (``"tiny"``, ``"llama3-8b"``...).
        mesh: parallel layout; ``None`` means the default mesh (or one process).
        strategy, layout: sequence-parallel attention (see :func:`seqpar.attention`).
        sequence_parallel: Megatron SP on the tp group (norms/residuals on sequence shards).
    """

    memory: MemoryConfig
    offloader: Offloader

    def __init__(self, config: ModelConfig | str, *, mesh: Mesh | None = None, strategy: str = "ring",
                 layout: str = "zigzag", sequence_parallel: bool = True, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None, recompute: str = "none", offload: bool = False,
                 mlp_tiles: int = 1, checkpoint_every: int = 1):
        super().__init__()
        cfg = self.config = get_config(config)
        mesh = self.mesh = resolve_mesh(mesh)
        check(cfg.kv_heads % mesh.tp == 0, ShapeError,
              f"kv heads={cfg.num_key_value_heads} not divisible by tp={mesh.tp}: each tensor-parallel rank needs "
              f"whole kv groups; use tp dividing {cfg.num_key_value_heads}")
        self.sequence_parallel = sp_on = sequence_parallel and mesh.tp > 1
        self.strategy, self.layout = strategy, layout
        kw: dict[str, Any] = {"dtype": dtype, "device": device}
        self.embed = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, mesh=mesh, sequence_parallel=sp_on, **kw)
        self.layers = nn.ModuleList(Block(cfg, mesh, sp_on, strategy, layout, kw) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, eps=1e-5, sequence_parallel=sp_on, **kw)
        self.lm_head = ColumnParallelLinear(cfg.hidden_size, cfg.vocab_size, bias=False, mesh=mesh,
                                            sequence_parallel=sp_on, **kw)
        if cfg.tied_embeddings:
            self.lm_head.weight = self.embed.weight  # both are this rank's [V/t, h] rows
        for i, layer in enumerate(self.blocks):
            layer.attn.name = f"layers.{i}.attn"
        self.offloader = Offloader()
        self.configure_memory(recompute=recompute, offload=offload, mlp_tiles=mlp_tiles,
                              checkpoint_every=checkpoint_every)

    def configure_memory(self, *, recompute: str = "none", offload: bool = False, mlp_tiles: int = 1,
                         checkpoint_every: int = 1) -> MemoryConfig:
        """Set the memory settings (see :class:`~seqpar.core.recompute.MemoryConfig`); returns them.

        Results are unchanged by every setting (up to float rounding of tiled weight-gradient sums).
        ``mlp_tiles`` must be the same on every rank of the tp group.  No communication.
        """
        mem = MemoryConfig(recompute=recompute, offload=offload, mlp_tiles=mlp_tiles,
                                         checkpoint_every=checkpoint_every)
        self.memory = mem
        for layer in self.blocks:
            layer.memory = mem
        return mem

    @property
    def blocks(self) -> list[Block]:
        """The decoder blocks, typed (:attr:`layers` is the ``nn.ModuleList`` that registers them)."""
        return cast("list[Block]", list(self.layers))

    def forward(self, input_ids: torch.Tensor, *, position_ids: torch.Tensor | None = None,
                cu_seqlens=None, seq_info=None, window=None, cache=None, labels: torch.Tensor | None = None,
                loss_chunk: int | None = None):
        """Logits of this rank's tokens, or with ``labels`` the loss computed without them.

        Args:
            input_ids: ``[B, S/sp]`` this rank's tokens in the model's layout (from :func:`seqpar.shard`).
            position_ids: ``[S/sp]`` positions for RoPE; default from the layout (restarting per
                document with ``cu_seqlens`` / ``seq_info``).
        Returns:
            ``[B, S/sp, V/t]`` logits, vocabulary split over tp (feed them to
            :func:`seqpar.tp.vocab_parallel_cross_entropy` or :func:`seqpar.train.causal_lm_loss`).
        Communication: per layer, attention's (see the strategy) and, with tp, Megatron's
        all-gather / reduce-scatter (SP) or all-reduce pairs.

        ``cache``: optional, one KV-cache callable per layer, ``cache[i](q, k, v) -> out`` (BSHD, roped),
        used instead of :func:`seqpar.attention` (see :mod:`seqpar.inference`); None for plain attention.

        ``labels``: ``[B, S/sp]`` shifted targets sharded like the ids: then the return value is the
        per-token loss ``[B, S/sp]`` (float32, 0 where the label is ignored; Megatron's convention),
        computed from the final hidden states and the LM head's weight ``loss_chunk`` tokens at a
        time (:func:`seqpar.tp.vocab_parallel_linear_cross_entropy`, default 4096): the
        ``[B, S/sp, V/t]`` logits never exist.  :func:`seqpar.train.global_token_mean` turns it into
        the loss of :func:`seqpar.train.causal_lm_loss` (equal to it on the logits).  Call the model
        (not a sub-method), so that wrappers such as FSDP see the head's weight used.
        """
        h = self.norm(self.hidden_states(input_ids, position_ids=position_ids, cu_seqlens=cu_seqlens,
                                         seq_info=seq_info, window=window, cache=cache))
        if labels is None:
            return self.lm_head(h)
        return vocab_parallel_linear_cross_entropy(h, self.lm_head.weight, labels.to(h.device),
                                                   group=self.mesh.tp_group,
                                                   chunk=DEFAULT_LOSS_CHUNK if loss_chunk is None else loss_chunk,
                                                   sequence_parallel=self.sequence_parallel)

    def hidden_states(self, input_ids: torch.Tensor, *, position_ids: torch.Tensor | None = None,
                      cu_seqlens=None, seq_info=None, window=None, cache=None) -> torch.Tensor:
        """The last layer's output before the final norm: ``[B, S/sp, h]`` (``[B, S/(sp*t), h]`` with
        sequence_parallel).  Arguments and communication as :meth:`forward`, without the LM head, so a
        caller can apply it to a few tokens only (inference needs the last one)."""
        check(input_ids.dim() == 2, ShapeError, f"input_ids must be [batch, local_seq], got {tuple(input_ids.shape)}")
        if position_ids is None:
            position_ids = layout_position_ids(input_ids.shape[1] * self.mesh.sp if cu_seqlens is None and
                                               seq_info is None else None, layout=self.layout, mesh=self.mesh,
                                               cu_seqlens=cu_seqlens, seq_info=seq_info, device=input_ids.device)
        attn_kwargs = {"cu_seqlens": cu_seqlens, "seq_info": seq_info, "window": window}
        x = self.embed(input_ids)
        mem = self.memory
        if mem.recompute != "full" or cache is not None or not torch.is_grad_enabled():
            for i, layer in enumerate(self.layers):
                x = layer(x, position_ids, attn_kwargs, None if cache is None else cache[i])
            return x
        offloader = self.offloader if mem.offload else None
        self.offloader.new_pass()
        k = mem.checkpoint_every
        for i in range(0, len(self.layers), k):
            chain = list(self.layers[i:i + k])

            def run(x, chain=chain):
                for layer in chain:
                    x = layer(x, position_ids, attn_kwargs)
                return x
            x = checkpoint(run, x, modules=chain, offloader=offloader)
        return x

    # ----------------------------------------------------------------- single-device state

    def full_shapes(self) -> dict[str, tuple[int, ...]]:
        """Names and shapes of the single-device state (:meth:`full_state_dict`)."""
        c = self.config
        h, hkv, d, f, hid = c.num_attention_heads, c.kv_heads, c.d, c.ffn_hidden_size, c.hidden_size
        shapes = {"embed.weight": (c.vocab_size, hid), "norm.weight": (hid,)}
        for i in range(c.num_layers):
            p = f"layers.{i}."
            shapes.update({p + "q_proj.weight": (h * d, hid), p + "k_proj.weight": (hkv * d, hid),
                           p + "v_proj.weight": (hkv * d, hid), p + "o_proj.weight": (hid, h * d),
                           p + "gate.weight": (f, hid), p + "up.weight": (f, hid), p + "down.weight": (hid, f),
                           p + "attn_norm.weight": (hid,), p + "mlp_norm.weight": (hid,)})
        if not c.tied_embeddings:
            shapes["lm_head.weight"] = (c.vocab_size, hid)
        return shapes

    def init_weights(self, seed: int, std: float = 0.02) -> None:
        """Initialise identically at every parallel layout: each single-device tensor is drawn from
        its own generator, seeded by (seed, name), then sharded.  Norms start at 1, the rest at
        N(0, std).  One full tensor at a time is materialised; no communication."""
        self.load_full_state_dict(_LazyInit(self.full_shapes(), seed, std, self.embed.weight.dtype))

    def entries(self, source=None) -> list[StateEntry]:
        """Every single-device tensor as this tp rank holds it: chunk ``tp_rank`` along ``dim``.

        ``source(param)`` picks what to read/write instead of the parameter (its grad, an
        optimizer moment).  One table serves gathering, loading and sharded checkpoints.
        A tensor sharded further by FSDP (a DTensor over dp x sp) is read whole (an all-gather over
        dp x sp: every rank must call) and written back to its shard by :meth:`StateEntry.set`.
        """
        pick = source or (lambda p: p)
        whole = _WholeViews()

        def read(p):
            return whole(pick(p))

        c, g = self.config, self.config.num_attention_heads // self.config.kv_heads
        d, hid = c.d, c.hidden_size
        out = [StateEntry("embed.weight", read(self.embed.weight), 0)]
        for i, layer in enumerate(self.blocks):
            p = f"layers.{i}."
            # fused rows per kv group: [q heads of the group, k, v]; this rank holds Hkv/t groups
            qkv = read(layer.attn.qkv.weight).view(-1, g + 2, d, hid)
            gu = read(layer.mlp.gate_up.weight).view(2, -1, hid)  # this rank's [gate_r; up_r]
            out += [StateEntry(p + "q_proj.weight", qkv[:, :g], 0), StateEntry(p + "k_proj.weight", qkv[:, g], 0),
                    StateEntry(p + "v_proj.weight", qkv[:, g + 1], 0),
                    StateEntry(p + "o_proj.weight", read(layer.attn.o.weight), 1),
                    StateEntry(p + "gate.weight", gu[0], 0), StateEntry(p + "up.weight", gu[1], 0),
                    StateEntry(p + "down.weight", read(layer.mlp.down.weight), 1),
                    StateEntry(p + "attn_norm.weight", read(layer.attn_norm.weight), None),
                    StateEntry(p + "mlp_norm.weight", read(layer.mlp_norm.weight), None)]
        out.append(StateEntry("norm.weight", read(self.norm.weight), None))
        if not c.tied_embeddings:
            out.append(StateEntry("lm_head.weight", read(self.lm_head.weight), 0))
        return whole.attach(out)

    def load_full_state_dict(self, sd, target=None) -> None:
        """Load single-device tensors (names of :meth:`full_state_dict`), keeping this rank's shards.

        ``target(param)`` picks the tensor to fill instead of the parameter (e.g. an optimizer
        moment shaped like it), so optimizer state reshards the same way.  No communication.
        """
        t, r = self.mesh.tp, self.mesh.rank("tp")
        for e in self.entries(target):
            full = sd[e.name]
            e.set(full if e.dim is None else full.chunk(t, e.dim)[r])

    def full_state_dict(self, grads: bool = False, source=None) -> dict[str, torch.Tensor]:
        """Single-device tensors (weights, their gradients, or ``source(param)``) gathered over tp.

        A collective over the tp group: every tp rank must call it.
        """
        source = source or ((lambda p: p.grad) if grads else (lambda p: p))
        with torch.no_grad():
            return {e.name: self._gathered(e) for e in self.entries(source)}

    def _gathered(self, e: StateEntry) -> torch.Tensor:
        """``e``'s single-device tensor: a copy when replicated, else the tp ranks' shards concatenated."""
        if e.dim is None:
            return e.get().clone()
        if self.mesh.tp == 1:  # nothing to gather (and group None would mean the default mesh's sp group)
            return e.get()
        return comm.all_gather(e.get(), e.dim, self.mesh.tp_group)


class _Whole:
    """A DTensor's full value (a copy) and how to write it back to the DTensor's local shard."""

    def __init__(self, dt) -> None:
        with torch.no_grad():  # detached: written in place by StateEntry.set
            self.dt, self.full = dt, dt.full_tensor().detach()

    def push(self) -> None:
        from torch.distributed.tensor import distribute_tensor

        # every rank holds the same full value: each keeps its own shard, no communication
        with torch.no_grad():
            local = distribute_tensor(self.full, self.dt.device_mesh, self.dt.placements, src_data_rank=None)
            self.dt.to_local().detach().copy_(local.to_local())


class _WholeViews:
    """``source`` adapter of :meth:`LlamaForCausalLM.entries`: plain tensors as they are, DTensors whole."""

    def __init__(self) -> None:
        self.wholes: dict[int, _Whole] = {}

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        if not hasattr(t, "full_tensor"):
            return t
        if id(t) not in self.wholes:
            self.wholes[id(t)] = _Whole(t)
        return self.wholes[id(t)].full

    def attach(self, entries: list[StateEntry]) -> list[StateEntry]:
        """Give each entry viewing a whole copy the DTensor to write back to."""
        by_storage = {w.full.untyped_storage().data_ptr(): w for w in self.wholes.values()}
        for e in entries:
            e.owner = by_storage.get(e.view.untyped_storage().data_ptr())
        return entries


class StateEntry:
    """One single-device tensor's local shard: ``view`` of the (fused) parameter, split along ``dim``."""

    def __init__(self, name: str, view: torch.Tensor, dim: int | None):
        self.name, self.view, self.dim = name, view, dim
        self.owner: _Whole | None = None  # the FSDP-sharded tensor ``view`` is a whole copy of

    def get(self) -> torch.Tensor:
        """The shard as a 2-D (or 1-D) tensor laid out like the single-device one (a copy when fused)."""
        v = self.view.detach()
        return v.reshape(-1, v.shape[-1]) if v.dim() > 2 else v

    def set(self, value: torch.Tensor) -> None:
        with torch.no_grad():
            self.view.copy_(value.reshape(self.view.shape))
        if self.owner is not None:
            self.owner.push()
