"""Reading large inputs block by block: rows come back complete and in the order asked, whatever the blocks."""

import pyarrow as pa
import pyarrow.parquet as pq

from core.data import iter_rows, open_dataset, shard_bounds, take_rows


def data(tmp_path, n=10, shards=(4, 6)):
    start = 0
    for k, size in enumerate(shards):
        rows = [{"i": i, "text": f"row {i}"} for i in range(start, start + size)]
        pq.write_table(pa.Table.from_pylist(rows), tmp_path / f"train-{k:05d}.parquet")
        start += size
    return open_dataset(tmp_path)


def test_take_rows_keeps_the_order_asked_across_blocks(tmp_path):
    ds = data(tmp_path)
    order = [7, 2, 9, 0, 3, 3, 8]  # across blocks of 3 rows, unsorted, one row twice
    taken = take_rows(ds, order, block=3)
    assert taken.column("i").to_pylist() == order and taken.schema == ds.data.table.schema
    assert take_rows(ds, [], block=3).num_rows == 0


def test_rows_stream_in_blocks_and_shards_follow_the_input(tmp_path):
    ds = data(tmp_path)
    streamed = [r["i"] for batch in iter_rows(ds, batch_size=2, block=3) for r in batch]
    assert streamed == list(range(10))
    assert shard_bounds(ds, str(tmp_path)) == [(0, 4), (4, 6)]  # aligned with the input's own shards
