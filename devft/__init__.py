"""devft: developmental federated fine-tuning of language models with LoRA on Flower."""

__version__ = "0.1.0"

__all__ = ["__version__"]
