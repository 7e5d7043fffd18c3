"""Conversion to and from other formats: `hf` writes and reads transformers' LlamaForCausalLM folders."""
