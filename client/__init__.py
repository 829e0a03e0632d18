"""Flower ClientApp: builds the submodel it is told to build, trains its LoRA locally, replies (``client.app:app``)."""

__all__: list[str] = []
