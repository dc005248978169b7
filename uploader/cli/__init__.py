"""The ``ckpt-uploader`` command line: one module per command."""
