"""Real storage servers on loopback, started and stopped by tests and benchmarks alike.

``s3`` (rclone serve s3, moto_server), ``azure`` (Azurite), ``gcs`` (fake-gcs-server)
and ``net`` (free ports, installed binaries, probes). Nothing here imports pytest:
tests/fixtures/ wraps these in fixtures.
"""
