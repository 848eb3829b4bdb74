"""Data larger than memory (tda_jax.data.source): memory-mapped datasets and random-access record
sources give the drivers exactly the in-memory results, are read one batch at a time, and are
validated block by block with errors that still name the row."""

import json

import flax.linen as nn
import jax
import numpy as np
import pytest
from test_store import _problem

import tda_jax.data.dataset as dataset_module
from tda_jax.attribution import fit_curvature, pairwise_scores, self_scores
from tda_jax.curvature.fit import inspect_model
from tda_jax.data import (
    Dataset,
    batch_iterator,
    from_source,
    load_memmap_dataset,
    row_chunks,
    save_memmap_dataset,
    subset,
    take_rows,
)
from tda_jax.io import fingerprint
from tda_jax.losses import check_targets, classification_margin, softmax_cross_entropy

LOSS = softmax_cross_entropy()


class RecordSource:
    """A grain-style random-access source (``__len__``, ``__getitem__(i) -> record``) over arrays.

    ``slicing``: ``source[a:b]`` returns a list of records; ``batched``: ``__getitems__`` reads many.
    ``limit``: refuse any read of more rows than that at once (the drivers must read batch by batch).
    Every read is logged as (how, rows).
    """

    def __init__(self, dataset, slicing=False, batched=False, limit=None, as_tuple=False):
        self.x, self.y = np.asarray(dataset.inputs), np.asarray(dataset.targets)
        self.slicing, self.limit, self.as_tuple, self.reads = slicing, limit, as_tuple, []
        if batched:
            self.__getitems__ = self._getitems

    def __len__(self):
        return len(self.x)

    def _record(self, i):
        return (self.x[i], self.y[i]) if self.as_tuple else {"inputs": self.x[i], "targets": self.y[i]}

    def _check(self, count):
        if self.limit is not None and count > self.limit:
            raise AssertionError(f"asked for {count} rows at once (limit {self.limit})")

    def __getitem__(self, key):
        if isinstance(key, slice):
            if not self.slicing:
                raise TypeError("records are read one index at a time")
            rows = range(*key.indices(len(self)))
            self._check(len(rows))
            self.reads.append(("slice", len(rows)))
            return [self._record(i) for i in rows]
        self.reads.append(("item", 1))
        return self._record(int(key))

    def _getitems(self, keys):
        self._check(len(keys))
        self.reads.append(("items", len(keys)))
        return [self._record(i) for i in keys]

    def __array__(self, *args, **kwargs):
        raise AssertionError("the whole source was converted to an array")


def _assert_same(reference, results, name):
    curvature, pairwise, own = results
    for a, b in zip(jax.tree.leaves(reference[0].factors), jax.tree.leaves(curvature.factors)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)
    np.testing.assert_array_equal(pairwise, reference[1], err_msg=name)
    np.testing.assert_array_equal(own, reference[2], err_msg=name)
    assert curvature.settings["data_fingerprint"] == reference[0].settings["data_fingerprint"]


def _run(apply_fn, params, queries, train):
    curvature = fit_curvature(apply_fn, params, train, strategy="ekfac", loss=LOSS, batch_size=32)
    pairwise = pairwise_scores(apply_fn, params, curvature, queries, train, loss=LOSS,
                               measurement=classification_margin, train_batch_size=32)
    return curvature, pairwise, self_scores(apply_fn, params, curvature, train, loss=LOSS,
                                            batch_size=32)


def test_memmap_and_record_sources_give_the_in_memory_results_exactly(tmp_path, monkeypatch):
    apply_fn, params, train, queries = _problem(num_train=90)  # 90: the last batch is padded
    reference = _run(apply_fn, params, queries, train)

    # Written in uneven batches (13 rows) into chunks of 32 rows: never whole in memory.
    batches = ({"inputs": train.inputs[i:i + 13], "targets": train.targets[i:i + 13]}
               for i in range(0, 90, 13))
    mapped = save_memmap_dataset(tmp_path / "train", batches, num_examples=90, num_classes=3,
                                 chunk_rows=32)
    assert isinstance(mapped.inputs, np.memmap) and isinstance(mapped.targets, np.memmap)
    _assert_same(reference, _run(apply_fn, params, queries, mapped), "memmap")
    # Record sources, read in blocks no larger than a batch: whole-array work is block by block.
    monkeypatch.setattr(dataset_module, "CHUNK_BYTES", 16 * 4 * 4)  # 16 rows of inputs per block
    for options in ({"slicing": True}, {"batched": True}, {"as_tuple": True}):
        source = RecordSource(train, limit=32, **options)
        _assert_same(reference, _run(apply_fn, params, from_source(RecordSource(queries)),
                                     from_source(source, num_classes=3)), str(options))
        kinds = {how for how, _ in source.reads}
        # One call per batch where the source allows it (slices or __getitems__).
        assert kinds == ({"item", "slice"} if options.get("slicing") else
                         {"item", "items"} if options.get("batched") else {"item"}), options
    # The drivers take a source directly too (num_classes is then not checked).
    _assert_same(reference, _run(apply_fn, params, RecordSource(queries), RecordSource(train)), "raw")


def test_drivers_read_one_batch_at_a_time_and_never_convert_the_whole_array(tmp_path,
                                                                          monkeypatch):
    apply_fn, params, train, queries = _problem(num_train=96)
    monkeypatch.setattr(dataset_module, "CHUNK_BYTES", 16 * 4 * 4)
    source = RecordSource(train, slicing=True, limit=16)
    data = from_source(source, num_classes=3)
    curvature = fit_curvature(apply_fn, params, data, strategy="kfac", loss=LOSS, batch_size=16)
    stored = pairwise_scores(apply_fn, params, curvature, queries, data, loss=LOSS,
                             measurement=classification_margin, train_batch_size=16,
                             store=tmp_path / "scores", store_chunk_batches=3)
    own = self_scores(apply_fn, params, curvature, data, loss=LOSS, batch_size=16,
                      store=tmp_path / "self", store_chunk_batches=2)
    assert max(rows for _, rows in source.reads) == 16
    # Each driver reads the data 4 times: its fingerprint (inputs, then targets), the target check
    # and its pass (K-FAC has one); plus the first row to probe the source and pad batches.
    assert 12 * 96 <= sum(rows for _, rows in source.reads) <= 12 * 96 + 8
    expected = pairwise_scores(apply_fn, params, curvature, queries, train, loss=LOSS,
                               measurement=classification_margin, train_batch_size=16)
    np.testing.assert_array_equal(np.asarray(stored), expected)
    np.testing.assert_array_equal(np.asarray(own), self_scores(apply_fn, params, curvature, train,
                                                               loss=LOSS, batch_size=16))
    with pytest.raises(AssertionError, match="limit 16"):  # the guard itself works
        source[0:17]


def test_validation_errors_name_the_row_in_memmaps_and_sources(tmp_path, monkeypatch):
    apply_fn, params, train, _ = _problem(num_train=96)
    monkeypatch.setattr(dataset_module, "CHUNK_BYTES", 16 * 4)  # 16 labels per block
    labels = np.array(train.targets)
    labels[[53, 70]] = [7, -1]
    np.save(tmp_path / "y.npy", labels)
    np.save(tmp_path / "x.npy", train.inputs)
    mapped = Dataset(np.load(tmp_path / "x.npy", mmap_mode="r"),
                     np.load(tmp_path / "y.npy", mmap_mode="r"), 3)
    bad = Dataset(train.inputs, labels, 3)
    for data in (mapped, from_source(RecordSource(bad, limit=16)), bad):
        with pytest.raises(ValueError, match=r"train.targets has 2 label\(s\) outside \[0, 3\).*"
                                             r"row 53: 7, row 70: -1\)"):
            fit_curvature(apply_fn, params, data, strategy="kfac", loss=LOSS, batch_size=16)
    # Token targets and token ids, read block by block, still name row and position.
    tokens = np.ones((40, 5), np.int32)
    tokens[33, 2], tokens[17] = 9, -1
    np.save(tmp_path / "t.npy", tokens)
    mapped_tokens = np.load(tmp_path / "t.npy", mmap_mode="r")
    assert len(list(row_chunks(mapped_tokens))) == 14  # 3 rows each
    with pytest.raises(ValueError, match=r"1 token id\(s\) outside \[0, 8\).*row 33 position 2: 9"):
        check_targets(mapped_tokens, 8, "token", "train.targets", positions=5)
    tokens[33, 2] = 1
    np.save(tmp_path / "t.npy", tokens)
    with pytest.raises(ValueError, match=r"rows \[17\] have no token with a loss"):
        check_targets(np.load(tmp_path / "t.npy", mmap_mode="r"), 8, "token", "train.targets", 5)

    class Embedder(nn.Module):
        @nn.compact
        def __call__(self, ids):
            return nn.Dense(3)(nn.Embed(8, 4)(ids)).mean(axis=1)

    ids = np.ones((40, 5), np.int32)
    ids[29, 4] = 8
    np.save(tmp_path / "ids.npy", ids)
    model = Embedder()
    embed_params = model.init(jax.random.key(0), ids[:1])["params"]
    lazy_ids = Dataset(np.load(tmp_path / "ids.npy", mmap_mode="r"), np.zeros(40, np.int32), 3)
    with pytest.raises(ValueError, match=r"train.inputs rows \[29\] hold token ids outside \[0, 8\).*"
                                         r"row 29 has \[8\]"):
        inspect_model(lambda p, x: model.apply({"params": p}, x), embed_params, lazy_ids)


def test_save_load_round_trip_errors_and_killed_writes(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 3, 2)).astype(np.float32)
    y = rng.integers(0, 4, 50).astype(np.int32)
    mask = (rng.uniform(size=(50, 3)) > 0.3).astype(np.float32)
    parts = [Dataset(x[i:i + 7], y[i:i + 7], 4, mask[i:i + 7]) for i in range(0, 50, 7)]
    data = save_memmap_dataset(tmp_path / "d", parts, num_examples=50, chunk_rows=16)
    for got, want in zip(data, (x, y, None, mask)):
        if want is not None:
            assert isinstance(got, np.memmap) and got.dtype == want.dtype
            np.testing.assert_array_equal(got, want)
    assert data.num_classes is None
    header = json.loads((tmp_path / "d" / "dataset.json").read_text())
    assert header["fields"] == ["inputs", "targets", "input_mask"] and header["num_examples"] == 50
    assert fingerprint(data.inputs) == fingerprint(x)
    # A Dataset (here memory-mapped itself) is copied block by block; batches match in memory.
    copy = save_memmap_dataset(tmp_path / "copy", data, num_classes=4)
    assert copy.num_classes == 4
    for a, b in zip(batch_iterator(copy, 16), batch_iterator(Dataset(x, y, 4, mask), 16)):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    np.testing.assert_array_equal(subset(copy, np.array([-1, 3])).inputs, x[[-1, 3]])
    np.testing.assert_array_equal(take_rows(copy.targets, [4, 5, 6]), y[4:7])

    with pytest.raises(FileExistsError, match="already holds a dataset"):
        save_memmap_dataset(tmp_path / "d", parts, num_examples=50)
    with pytest.raises(ValueError, match="num_examples is required"):
        save_memmap_dataset(tmp_path / "e", parts)
    with pytest.raises(ValueError, match="held 49 rows but num_examples=50"):
        save_memmap_dataset(tmp_path / "d", [Dataset(x[:49], y[:49], 4)], num_examples=50,
                            overwrite=True)
    with pytest.raises(ValueError, match="batch 1 has fields"):
        save_memmap_dataset(tmp_path / "d", [(x[:2], y[:2]), (x[2:], y[2:], mask[2:])],
                            num_examples=50, overwrite=True)

    def killed():  # a writer that dies after 20 rows: its chunks stay incomplete, no header
        yield x[:20], y[:20]
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        save_memmap_dataset(tmp_path / "k", killed(), num_examples=50, chunk_rows=16)
    with pytest.raises(FileNotFoundError, match="no memory-mapped dataset"):
        load_memmap_dataset(tmp_path / "k")
    (tmp_path / "k" / "dataset.json").write_text(json.dumps(
        {"format": "tda_jax.MemmapDataset", "version": 1, "num_examples": 50, "num_classes": None,
         "fields": ["inputs", "targets"]}))
    with pytest.raises(ValueError, match=r"k/inputs is incomplete \(3 chunk\(s\) missing\)"):
        load_memmap_dataset(tmp_path / "k")
    again = save_memmap_dataset(tmp_path / "k", [(x, y)], num_examples=50, overwrite=True)
    np.testing.assert_array_equal(again.inputs, x)


def test_grain_array_record_source(tmp_path):
    grain = pytest.importorskip("grain")
    from array_record.python.array_record_module import ArrayRecordWriter

    apply_fn, params, train, queries = _problem(num_train=64)
    path = str(tmp_path / "train.array_record")
    writer = ArrayRecordWriter(path, "group_size:1")
    for x, y in zip(train.inputs, train.targets):  # a record: 4 float32 inputs then the label
        writer.write(np.concatenate([x, np.array([y], np.float32)]).tobytes())
    writer.close()

    def decode(record: bytes):
        values = np.frombuffer(record, np.float32)
        return values[:4], values[4].astype(np.int32)

    source = grain.sources.ArrayRecordDataSource([path])
    data = from_source(source, num_classes=3, decode=decode)
    assert data.inputs.shape == (64, 4) and data.targets.dtype == np.int32
    reference = _run(apply_fn, params, queries, train)
    _assert_same(reference, _run(apply_fn, params, queries, data), "grain ArrayRecordDataSource")


def _rss_file_mb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("RssFile:"))


@pytest.mark.skipif(not hasattr(__import__("mmap"), "MADV_DONTNEED"), reason="needs madvise")
def test_passes_over_a_memmap_release_its_pages(tmp_path):
    rows = 2**18  # 32 MiB of float32 [rows, 32]
    array = np.lib.format.open_memmap(tmp_path / "x.npy", "w+", np.float32, (rows, 32))
    array[:] = 1.0
    array.flush()
    del array
    data = Dataset(np.load(tmp_path / "x.npy", mmap_mode="r"), np.zeros(rows, np.int32), 2)
    before = _rss_file_mb()
    total = sum(float(batch["inputs"][-1, 0]) for batch in batch_iterator(data, 4096))
    fingerprint(data.inputs)
    assert total == rows // 4096
    # Without releasing them, the 32 MiB of pages read would stay resident in this process.
    assert _rss_file_mb() - before < 8
