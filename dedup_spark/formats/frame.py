"""``dataframe`` / ``table``: rows a Spark session can read (a catalog table, a join, anything).

They are written once, as they are, into the work prefix as parquet with a ``row_id`` column
(a table of ``tables.write_table``: any storage ``pyarrow.fs`` reaches), then read like the
``parquet`` format. A DataFrame is evaluated exactly once, so a non-deterministic one (a sample,
a join without an order) still gives every row one identity, and the stages read files whose
identity (names, sizes, times) keys their results.
"""

from __future__ import annotations

from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from pyspark.sql import types as T

from dedup_spark import tables
from dedup_spark.errors import InputError

# The generated id of a staged row, when the caller names no integer id column.
ROW_ID = "dedup_row_id"
_FLOATS = (T.FloatType, T.DoubleType)


def stage(frame: DataFrame, uri: str, embedding_column: str, id_column: str | None) -> dict[str, object]:
    """Write ``frame`` under ``uri``; the ``input.*`` settings that read it back.

    An integer ``id_column`` is the rows' row_id (it must be unique, as for parquet input); any
    other id column is carried as the rows' key beside a generated row_id (``ROW_ID``)."""
    if embedding_column not in frame.columns:
        raise InputError(f"no embedding column {embedding_column!r}; columns are {frame.columns}")
    if id_column is not None and id_column not in frame.columns:
        raise InputError(f"no id column {id_column!r}; columns are {frame.columns}")
    embedding = frame.schema[embedding_column].dataType
    if embedding.typeName() == "vector":  # pyspark.ml vectors: stored as arrays
        from pyspark.ml.functions import vector_to_array

        frame = frame.withColumn(embedding_column, vector_to_array(F.col(embedding_column), "float32"))
    elif not (isinstance(embedding, T.BinaryType)
              or isinstance(embedding, T.ArrayType) and isinstance(embedding.elementType, _FLOATS)):
        raise InputError(f"embedding column {embedding_column!r} is {embedding.simpleString()}: expected an array "
                         "of floats, an ml vector or binary")
    integer_id = id_column is not None and isinstance(frame.schema[id_column].dataType,
                                                      (T.LongType, T.IntegerType, T.ShortType))
    if not integer_id:
        if ROW_ID in frame.columns:
            raise InputError(f"the input has a column {ROW_ID!r}, the name given to generated row ids; rename it")
        frame = frame.withColumn(ROW_ID, F.monotonically_increasing_id())
    tables.write_table(frame, uri)
    return {"input.uri": uri, "input.format": "parquet", "input.embedding_column": embedding_column,
            "input.id_column": id_column if integer_id else ROW_ID,
            "input.key_column": None if integer_id else id_column}
