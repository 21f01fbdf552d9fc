"""Named setups for documented snippets (``<!-- test: setup=NAME -->``): the inputs a snippet takes
as given, defined here so that the page shows only what it teaches.  Each is Python source run
before the snippet, on every rank alike."""
from __future__ import annotations

SETUPS: dict[str, str] = {
    # README's API tour: full q, k, v [B, S, H, D] (GQA 8/4 heads) of two packed documents
    "tour_attention": """
import torch
g = torch.Generator().manual_seed(0)
S = 512
q = torch.randn(1, S, 8, 16, generator=g)
k, v = torch.randn(1, S, 4, 16, generator=g), torch.randn(1, S, 4, 16, generator=g)
cu = [0, 200, S]
""",
    # docs/inference.md: the tiny reference model's single-device weights, a prompt [B, S], next tokens [B]
    "inference_reference": """
import torch
import seqpar
from seqpar.models import LlamaForCausalLM as _Llama
config = "tiny"
_single = _Llama(config, mesh=seqpar.Mesh())
_single.init_weights(seed=0)
weights = _single.full_state_dict()
prompt = torch.randint(0, 128, (2, 64), generator=torch.Generator().manual_seed(0))
next_ids = torch.tensor([5, 7])
""",
    # docs/inference.md: a tiny random Llama saved as a local checkpoint (``name``), a prompt, next tokens
    "inference_hf": """
import torch
import torch.distributed as dist
import seqpar
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM as _HFLlama
from seqpar.integrations import hf
from seqpar.inference import decode_step, generate, prefill
name = "tiny-llama"
torch.manual_seed(0)
# under torch.distributed, save_pretrained is collective (rank 0 writes): every rank calls it
_HFLlama(LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                     num_hidden_layers=2, vocab_size=256)).save_pretrained(name)
dist.barrier()
prompt = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(0))
next_ids = torch.tensor([3])
""",
}
