"""The stream worker: a faust-streaming app keeping exact 10-minute windows per card in Redis."""
