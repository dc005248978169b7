"""One thin adapter per provider family; see ``base.Backend`` for the interface."""
