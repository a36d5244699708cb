"""Weights travel as one packed array per message, and come back exactly as they were sent."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from client.node.packing import pack_records as node_pack
from client.node.packing import unpack_records as node_unpack
from server.superlink.packing import pack_records, unpack_records
from shared_models.protocol import (
    PACKED_ARRAY,
    PackedArraysError,
    pack_arrays,
    unpack_arrays,
    weights_sha256,
)


def _weights() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "lstm.weight_ih_l0": rng.normal(size=(256, 12)).astype(np.float32),
        "lstm.bias_ih_l0": rng.normal(size=256).astype(np.float32),
        "head.weight": rng.normal(size=(1, 64)).astype(np.float64),
        "steps": np.array(7, dtype=np.int64),
        "empty": np.zeros((0, 3), dtype=np.float32),
    }


def test_a_message_s_weights_pack_into_one_array_and_unpack_unchanged():
    weights = _weights()
    content = RecordDict(
        {
            "arrays": ArrayRecord({k: Array(v) for k, v in weights.items()}),
            "config": ConfigRecord({"server-round": 3}),
            "metrics": MetricRecord({"num-examples": 10}),
        }
    )
    packed = pack_records(content)  # the server's side ...
    assert list(packed["arrays"]) == [PACKED_ARRAY]
    assert list(packed) == ["arrays", "config", "metrics"]
    back = node_unpack(packed)  # ... read by the node's, and back
    back = unpack_records(node_pack(back))
    arrays = {k: a.numpy() for k, a in back["arrays"].items()}
    assert list(arrays) == list(weights)
    for name, value in weights.items():
        assert arrays[name].dtype == value.dtype and arrays[name].shape == value.shape
        np.testing.assert_array_equal(arrays[name], value)
    assert weights_sha256(arrays) == weights_sha256(weights)  # the signed digest is unchanged
    assert back["config"]["server-round"] == 3


def test_unpacked_content_passes_through_unpack_unchanged():
    content = RecordDict({"arrays": ArrayRecord({"w": Array(np.ones(3, np.float32))})})
    assert list(unpack_records(pack_records(content))["arrays"]) == ["w"]


def _header(blob: bytes) -> list[dict]:
    size = int.from_bytes(blob[:4], "little")
    return json.loads(blob[4 : 4 + size])


def _with_header(entries: list[dict], payload: bytes) -> bytes:
    header = json.dumps(entries).encode()
    return len(header).to_bytes(4, "little") + header + payload


@pytest.mark.parametrize(
    ("corrupt", "says"),
    [
        (lambda b: b[:-4], "bytes of data"),
        (lambda b: b + b"\0", "bytes after the last array"),
        (lambda b: b[:2], "shorter than its header"),
        (lambda b: (10**6).to_bytes(4, "little") + b[4:], "header in"),
        (lambda b: b[:4] + b"{" + b[5:], "unreadable header"),
    ],
)
def test_a_truncated_or_damaged_packed_array_is_refused_with_a_clear_error(corrupt, says):
    blob = pack_arrays(_weights())
    with pytest.raises(PackedArraysError, match=says) as refused:
        unpack_arrays(corrupt(blob))
    assert "same edufl version" in str(refused.value)


@pytest.mark.parametrize(
    "entry",
    [
        {"name": "w", "dtype": "|O", "shape": [1]},
        {"name": "w", "dtype": "<f4", "shape": [-1]},
        {"name": "", "dtype": "<f4", "shape": [1]},
        {"dtype": "<f4", "shape": [1]},
    ],
)
def test_a_header_naming_no_numeric_array_is_refused(entry):
    with pytest.raises(PackedArraysError):
        unpack_arrays(_with_header([entry], b"\0" * 8))


def test_a_repeated_name_or_a_mis_shaped_entry_is_refused():
    twice = [{"name": "w", "dtype": "<f4", "shape": [1]}] * 2
    with pytest.raises(PackedArraysError, match="repeated"):
        unpack_arrays(_with_header(twice, b"\0" * 8))
    too_big = [{"name": "w", "dtype": "<f4", "shape": [3, 3]}]
    with pytest.raises(PackedArraysError, match="36 bytes of data, 8 left"):
        unpack_arrays(_with_header(too_big, b"\0" * 8))


def test_objects_do_not_pack():
    with pytest.raises(PackedArraysError, match="only numbers"):
        pack_arrays({"w": np.array(["a", None], dtype=object)})


def test_a_packed_record_with_other_arrays_beside_it_is_refused():
    blob = pack_arrays({"w": np.ones(2, np.float32)})
    packed = Array(dtype="uint8", shape=(len(blob),), stype="edufl.packed/1", data=blob)
    content = RecordDict(
        {"arrays": ArrayRecord({PACKED_ARRAY: packed, "x": Array(np.ones(1, np.float32))})}
    )
    with pytest.raises(PackedArraysError, match="beside 1 other"):
        unpack_records(content)
