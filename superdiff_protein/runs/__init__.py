"""Every file a run writes or reads back: atomic writes, the run directory (``rundir``: layout, ``samples.csv``
schema, lock, resume, shard merge), plots, and the allow-listed file reader."""
