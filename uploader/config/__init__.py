"""Configuration: the store's hparams and URIs, config files, and every option's default."""
