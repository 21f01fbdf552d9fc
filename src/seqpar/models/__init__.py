"""Reference models built from seqpar's parts."""
from .llama import LlamaForCausalLM, rope

__all__ = ["LlamaForCausalLM", "rope"]
