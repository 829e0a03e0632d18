"""Flower ServerApp and the DevFT strategy: turns stages and rounds into messages (``server.app:app``)."""

__all__: list[str] = []
