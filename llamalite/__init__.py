"""llamalite: pretrain LLaMA-style language models data-efficiently, then instruction-tune them."""

__version__ = "0.1.0"
