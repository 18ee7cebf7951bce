"""The feature model: declarations, entity keys, event validation, window and ratio semantics, generated SQL.

Nothing here opens a socket or a file; the stores (`stores/`), the stream worker, the batch job and the scorer
implement what is declared here, and every dependency points this way.
"""
