"""Every file a run writes or reads back: atomic writes and the allow-listed file reader."""
