"""A message's weights as one packed array on the wire (Flower's records around the codec).

`shared_models.protocol.pack_arrays` / `unpack_arrays` are the codec; this module applies it to
a Flower ``RecordDict`` at the transport.
The node's side: `client.node.own_code` unpacks a task's message and packs its reply;
`server.superlink.packing` is the ServerApp's side (the layers keep the two apart, so the
few lines are in both).
"""

from __future__ import annotations

from flwr.app import Array, ArrayRecord, RecordDict

from shared_models.protocol import (
    PACKED_ARRAY,
    PACKED_STYPE,
    PackedArraysError,
    pack_arrays,
    unpack_arrays,
)

__all__ = ["PackedArraysError", "pack_records", "unpack_records"]


def pack_records(content: RecordDict) -> RecordDict:
    """``content`` with each ArrayRecord of several numpy arrays packed into one array
    (`PACKED_ARRAY`); other records, and their order, unchanged."""
    packed = RecordDict()
    for name, record in content.items():
        if (
            isinstance(record, ArrayRecord)
            and len(record) > 1
            and all(array.stype == "numpy.ndarray" for array in record.values())
        ):
            blob = pack_arrays({key: array.numpy() for key, array in record.items()})
            array = Array(dtype="uint8", shape=(len(blob),), stype=PACKED_STYPE, data=blob)
            record = ArrayRecord({PACKED_ARRAY: array})
        packed[name] = record
    return packed


def unpack_records(content: RecordDict) -> RecordDict:
    """``content`` with each packed ArrayRecord (`pack_records`) back to its named arrays.

    Raises:
        PackedArraysError: a packed array is corrupt, or sits beside other arrays.
    """
    unpacked = RecordDict()
    for name, record in content.items():
        if isinstance(record, ArrayRecord) and PACKED_ARRAY in record:
            array = record[PACKED_ARRAY]
            if len(record) != 1 or array.stype != PACKED_STYPE:
                raise PackedArraysError(
                    f"record {name!r} holds {PACKED_ARRAY!r} of type {array.stype!r} beside "
                    f"{len(record) - 1} other array(s); are server and node running the same "
                    "edufl version?"
                )
            arrays = unpack_arrays(bytes(array.data))
            record = ArrayRecord({key: Array(value) for key, value in arrays.items()})
        unpacked[name] = record
    return unpacked
