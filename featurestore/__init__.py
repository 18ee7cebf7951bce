"""The shared core: feature definitions, entity keys, window and ratio semantics, online and offline stores.

Every other package (ingest, streaming, batch, serving) imports from here; nothing here imports them.
"""
