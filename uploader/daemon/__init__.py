"""The uploader daemon (``ckpt-uploader watch``): intake, settling, the journal, the engine."""
