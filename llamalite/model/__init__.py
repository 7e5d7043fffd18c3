from llamalite.model.llama import Llama, ModelConfig

__all__ = ["Llama", "ModelConfig"]
