"""Conversion to and from other formats: `hf` writes and reads transformers' LlamaForCausalLM folders."""

from llamalite.export.hf import ExportError, export_checkpoint, import_hf

__all__ = ["ExportError", "export_checkpoint", "import_hf"]
