"""The model: a pure nn.Module (llama.py), its torch-free config (config.py), KV cache, presets and LoRA.

Nothing is imported here, so that `llamalite.model.config` and `llamalite.model.presets` load without torch.
"""
