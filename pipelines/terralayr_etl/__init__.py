"""terralayr-etl: the terralayr revenue API into Parquet and DuckDB."""

__version__ = "0.1.0"
