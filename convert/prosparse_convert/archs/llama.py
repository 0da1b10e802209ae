"""LLaMA and ProSparse's SparseLlama (the same weights; FATReLU from hidden_act / hidden_act_param)."""

from ..params import ModelParams, llama_params

HF_CLASSES = ("LlamaForCausalLM", "SparseLlamaForCausalLM")
HF_MODEL_TYPES = ("llama", "sparsellama")


def params(cfg: dict, name: str) -> ModelParams:
    return llama_params(cfg, "llama", name)
