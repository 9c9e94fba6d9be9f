"""terralayr-etl: the terralayr revenue API into Parquet and DuckDB."""

from terralayr_etl.allocators import configure_allocators

# Before any import of pyarrow, polars, DuckDB or Prefect: see allocators.py.
configure_allocators()

__version__ = "0.1.0"
