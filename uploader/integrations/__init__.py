"""Callbacks for other trainers: PyTorch Lightning and the Hugging Face Trainer.

Each callback starts the same worker process that :class:`uploader.RunDirectoryUploader`
and :class:`uploader.Sidecar` use (``python -m uploader watch``, see
:mod:`uploader.launch.worker`) on the directory its trainer checkpoints into, checks it
cheaply while training runs, and drains it when training ends::

    from uploader.integrations.lightning import UploaderCallback      # Lightning
    from uploader.integrations.transformers import UploaderCallback   # HF Trainer

Each module imports its framework only when ``UploaderCallback`` is first looked up, so
``import uploader`` and ``import uploader.integrations`` import neither torch nor any
framework. Resume from the bucket with :func:`uploader.fetch_latest`.
"""

from __future__ import annotations

__all__: list[str] = []
