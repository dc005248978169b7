"""One call from what a command was given to the settings it runs with.

:func:`resolve` takes the parsed command line as a plain mapping (``vars(args)``: the
config layer never sees argparse), reads the config file it names (``config``), and
returns :class:`Options`: where the store is (URI, ``[store]`` table and store flags)
and, for ``watch``/``push``, the :class:`uploader.config.options.WatchOptions` (flags
over the ``[watch]`` table over the defaults). Flags always win over the file.

The mapping's keys are the flags' destinations: ``uri`` or ``to`` (the store URI; both
only when they agree),
``config``, ``prefix``, the store fields (:data:`uploader.config.files.STORE_FIELDS`
and the TLS keys) and the :data:`uploader.config.options.WATCH_KEYS`. A key that is
absent or None counts as not given.

Example::

    options = resolve({"to": "s3://ckpts/exp1", "keep_local": 3})
    store = options.location.hparams.initialize_object(**options.store_options())
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from uploader.config.files import (
    STORE_FIELDS,
    TLS_KEYS,
    load_config_file,
    parse_extra_kwargs,
    store_location,
)
from uploader.config.hparams import StoreLocation
from uploader.config.options import WATCH_KEYS, WatchOptions
from uploader.errors import ConfigError

__all__ = ["Options", "resolve"]


@dataclass(frozen=True)
class Options:
    """Everything a command was told, resolved: the store and the daemon's settings
    (the defaults for a command that runs no daemon)."""

    location: StoreLocation
    watch: WatchOptions = WatchOptions()

    def store_options(self) -> dict[str, Any]:
        """The keyword arguments of :class:`uploader.transfer.store.ObjectStore` that
        the options set (part size, concurrency, request retries, digest kind, container
        creation)."""
        return {
            "part_size": self.watch.part_size,
            "concurrency": self.watch.concurrency,
            "retry": self.watch.retry,
            "digest": self.watch.digest,
            "create_container": self.watch.create_container,
        }


def resolve(flags: Mapping[str, Any], *, reading: bool = False) -> Options:
    """The options that ``flags`` (a parsed command line as a mapping) and the config
    file it names ask for.

    ``reading``: for a command that only reads the store (``pull``, ``ls``, ``verify``):
    the daemon's flags and the ``[watch]`` table are not read, and a ``latest`` or
    ``rank_N`` component of the URI's path starts the location's ``target`` (see
    :func:`uploader.config.hparams.parse_uri`).
    Raises ConfigError, naming the setting, for anything that is not valid.
    """
    config = flags.get("config")
    cfg = load_config_file(config)
    watch = WatchOptions()
    if not reading:
        watch = WatchOptions.resolve(
            {key: flags.get(key) for key in WATCH_KEYS},
            cfg["watch"],
            where=f"config file {config}",
        )
    store = {key: flags.get(key) for key in (*STORE_FIELDS, *TLS_KEYS)}
    store["extra_init_kwargs"] = parse_extra_kwargs(store["extra_init_kwargs"])
    location = store_location(
        _uri(flags), store, cfg["store"], flags.get("prefix"), split_target=reading
    )
    return Options(location, watch)


def _uri(flags: Mapping[str, Any]) -> str | None:
    """The URI given positionally (``uri``) or as ``--to``; both only when they agree."""
    uri, to = flags.get("uri"), flags.get("to")
    if uri and to and uri != to:
        raise ConfigError(
            f"the destination is given twice, as URI {uri!r} and as --to {to!r}; give it "
            "once, e.g. 'ckpt-uploader push RUN_DIR URI'"
        )
    return uri or to  # type: ignore[no-any-return]
