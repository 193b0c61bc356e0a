"""shardgrad: distributed data-parallel autograd."""
