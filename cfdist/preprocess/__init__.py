"""The preprocessing job: raw structure files -> content-hashed Parquet shards, on Ray Data.

    job.py          plan chunks, process them on Ray Data workers, finalise (duplicates, rejects, manifest)
    splits.py       which split a structure goes to: a split file, or a salted hash of its id or of
                    its group (a metadata field such as a trajectory id, an id prefix, the composition)
    statistics.py   sufficient statistics per chunk, merged exactly into the manifest
    cli.py          ``cfdist preprocess`` / ``python preprocess/build_shards.py``

Readers of the input formats live in :mod:`cfdist.io`; the manifest in :mod:`cfdist.manifest`.
"""
