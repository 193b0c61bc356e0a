"""shardgrad: distributed data-parallel autograd.

`shardgrad.core` is the autograd engine; `shardgrad.Client` talks to a coordinator.
"""

__version__ = "0.1.0"
__all__ = ["Client", "ClientError", "LocalCluster", "parse_spec", "train_local"]


def __getattr__(name):
    # Lazy, so `python -m shardgrad.cli` can set BLAS threads before NumPy is imported.
    if name in ("Client", "ClientError"):
        from . import client

        return getattr(client, name)
    if name == "LocalCluster":
        from .cluster import LocalCluster

        return LocalCluster
    if name == "parse_spec":
        from .jobspec import parse_spec

        return parse_spec
    if name == "train_local":
        from .training import train_local

        return train_local
    raise AttributeError(f"module 'shardgrad' has no attribute {name!r}")
